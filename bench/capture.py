"""Capture benchmark: exfilwatch's Linux source against ``inotifywait -m -r``.

Run as root (it changes ``fs.inotify.max_queued_events`` between runs and restores it), with
the interpreter of the environment exfilwatch is installed in (``.venv/bin/python`` in a
checkout; the ``exfilwatch`` command next to it is the one measured)::

    python bench/capture.py --quick       # 20,000 files, 20 s idle
    python bench/capture.py               # 20,000 and 100,000 files, 300 s idle
    python bench/capture.py --json        # JSON on stdout instead of tables
    python bench/capture.py --json r.json # tables, and JSON in r.json

Progress goes to stderr; the result tables (or ``--json``) go to stdout.

Bursts
    A separate process (this script's hidden ``_generate`` mode, so the burst does not share
    a GIL or a core with the tool) touches N existing files of a pre-built tree, as fast as it
    can. ``write`` opens each file O_WRONLY, overwrites its bytes at offset 0 and closes it:
    OPEN, MODIFY, CLOSE_WRITE (exfilwatch: opened, modified, closed_write), 3 events a file.
    It does not truncate: a truncate and a write are two MODIFY events the kernel merges only
    when the reader has not read the queue in between, so the expected count would depend on
    timing. ``read`` opens, reads and closes each file: OPEN, CLOSE_NOWRITE (opened,
    closed_nowrite), 2 events a file. File k of a burst is ``files/d{k % 100}/f{k // 100}``,
    so every burst spreads over all 100 directories.

    Each tool runs alone, one after the other: start it, wait until it is watching (exfilwatch:
    its ``source_ready`` health record is in the output file; inotifywait: "Watches
    established." on stderr), start the generator, then poll the tool's output file every
    10 ms until the expected number of event lines has arrived, or the tool has been quiet
    (no new output and under 8% of a core) for ``--quiet-seconds`` after the generator
    finished. Then it reads the tool's CPU time and peak RSS (VmHWM), stops it with SIGTERM
    and counts exactly in the flushed output.

    captured   distinct (path, action) pairs of the expected kinds on the burst's paths
               (a duplicate is counted as "extra", not as captured)
    loss       expected - captured
    reported   exfilwatch: an ``event_loss`` health record; inotifywait: a Q_OVERFLOW line
               in its output or anything about an overflow on stderr (it prints nothing)
    burst s    the generator's own time from its first to its last file operation
    elapsed s  from the generator's first operation to the last arrival of an event line
               in the tool's output (a 10 ms poll), the time until the tool has said it all
    drain s    elapsed - burst: how long the tool lagged behind the burst
    read s     exfilwatch only: from the generator's first operation to the @timestamp of the
               last workload event, which is when exfilwatch's reader read it (the rest of
               elapsed is its pipeline: stat, JSON, write)
    events/s   events that had arrived by the last arrival / elapsed. Both tools are bounded
               by the generator's speed, so a ratio near 1 means "kept up"
    CPU s      user + system time of the tool's process (and children) during the burst,
               from "watching" to "done", so start-up is not in it
    peak RSS   VmHWM of the tool's process, start-up included
    load1      the machine's 1-minute load average when the run started (noise indicator)

    Runs per size and workload, in this order: exfilwatch with the raised kernel queue
    (max_queued_events 1,048,576, what the agent sets itself as root), inotifywait with the
    same, inotifywait with the kernel default 16,384, and exfilwatch with 16,384 and
    ``inotify.apply_sysctl: false``; then, once per size and workload, both tools at 16,384
    "stalled": stopped with SIGSTOP before the burst and resumed (SIGCONT) 0.2 s after it,
    a consumer that fell behind, so the kernel queue overflows for both (does exfilwatch say
    so where inotifywait drops silently?). ``--skip-default-queue`` leaves these out. The
    comparison (events/s ratio and CPU ratio, exfilwatch / inotifywait) is made on the same
    raised setting; with ``--repeat`` it uses medians. The machine is noisy: read ratios,
    never absolute times.

Start-up
    Time from spawning the process to "watching" on a tree of 10,000 directories (exfilwatch:
    the ``source_ready`` line is in its output, so Python start-up and imports are in it, as
    the owner sees them; inotifywait: "Watches established."), median of
    ``--startup-repeats`` alternating runs, with the watch count read from the inotify fd's
    fdinfo, the CPU seconds spent to get there and the RSS at that point.

Idle
    exfilwatch watching both trees (10,101 directories, 100,000 files) with the default
    heartbeat (60 s) for ``--idle-seconds`` with no file activity: CPU seconds / wall seconds
    as % of one core, and RSS at start, max (sampled every 5 s) and end. inotifywait watches
    the same trees at the same time as a reference; running both at once is fair here since
    neither has anything to do.

Trees (``--dir``, default /var/tmp/exfilwatch-bench), built once and reused, never deleted:
on ext4, creating files right after deleting a large tree is 10-30x slower for minutes.
    files/    100 directories x 1,000 files of 17 bytes (100,000 files)
    dirs/     100 directories x (1 + 99 subdirectories) = 10,000 directories, no files
    configs/  generated exfilwatch configs
    runs/     tool output and stderr, deleted after counting unless ``--keep-output``
A tree is checked by counting its entries; missing entries are created, nothing is removed.
Before the first burst every file is read once, so no tool pays for a cold cache.

Kernel settings: ``max_queued_events`` and (when below 65,536) ``max_user_watches`` are
saved at start and restored at exit, also on Ctrl-C or SIGTERM.

Standard library and psutil only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import common
import psutil
from common import (
    MB,
    PYTHON,
    BenchError,
    Cleanup,
    cell,
    code_version,
    cpu_seconds,
    epoch,
    exfilwatch_command,
    interruptible,
    machine,
    peak_rss_bytes,
    print_header,
    progress,
    remove_files,
    tail_text,
    wait_for_text,
)

DEFAULT_DIR = "/var/tmp/exfilwatch-bench"
FILE_DIRS = 100
FILES_PER_DIR = 1_000
MAX_FILES = FILE_DIRS * FILES_PER_DIR
DIR_TOP = 100
DIR_SUB = 99
DIR_COUNT = DIR_TOP * (1 + DIR_SUB)
CONTENT = b"exfilwatch bench\n"
SYSCTL_DIR = "/proc/sys/fs/inotify/"
RAISED_QUEUE = 1_048_576
DEFAULT_QUEUE = 16_384
MIN_WATCHES = 65_536
POLL_SECONDS = 0.01
READY_POLL_SECONDS = 0.005
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 15.0
QUEUE_ATTEMPTS = 3
STALL_EXTRA_SECONDS = 0.2
CPU_SAMPLE_SECONDS = 0.25
BUSY_CPU_SECONDS = 0.02  # per CPU_SAMPLE_SECONDS: 8% of a core is "still working"
LAUNCH_ATTEMPTS = 4
LAUNCH_RETRY_SECONDS = 5.0
IDLE_SETTLE_SECONDS = 2.0
IDLE_SAMPLE_SECONDS = 5.0

# Numbers in every column, the first one included: all right-aligned.
table = functools.partial(common.table, first_left=False)

WORKLOAD_ACTIONS: dict[str, tuple[str, ...]] = {
    "write": ("opened", "modified", "closed_write"),
    "read": ("opened", "closed_nowrite"),
}
INOTIFY_ACTIONS = {
    "OPEN": "opened",
    "MODIFY": "modified",
    "CLOSE_WRITE": "closed_write",
    "CLOSE_NOWRITE": "closed_nowrite",
}
INOTIFYWAIT_EVENTS = (
    "open,modify,close_write,close_nowrite,create,delete,moved_from,moved_to,attrib"
)
EXFILWATCH_READY = b'"action":"source_ready"'
INOTIFYWAIT_READY = b"Watches established."

# trees ---------------------------------------------------------------------------------


def file_path(root: str, k: int) -> str:
    return f"{root}/d{k % FILE_DIRS:03d}/f{k // FILE_DIRS:04d}"


def workload_paths(root: str, n: int) -> list[str]:
    return [file_path(root, k) for k in range(n)]


def ensure_file_tree(root: str) -> dict[str, Any]:
    """100 x 1,000 small files; creates only what is missing."""
    began = time.monotonic()
    created = 0
    for d in range(FILE_DIRS):
        dpath = f"{root}/d{d:03d}"
        os.makedirs(dpath, exist_ok=True)
        with os.scandir(dpath) as it:
            have = {e.name for e in it}
        for i in range(FILES_PER_DIR):
            name = f"f{i:04d}"
            if name in have:
                continue
            fd = os.open(f"{dpath}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, CONTENT)
            finally:
                os.close(fd)
            created += 1
    return {
        "path": root,
        "files": MAX_FILES,
        "created": created,
        "seconds": round(time.monotonic() - began, 2),
    }


def ensure_dir_tree(root: str) -> dict[str, Any]:
    """100 directories with 99 subdirectories each: 10,000 directories under `root`."""
    began = time.monotonic()
    created = 0
    for a in range(DIR_TOP):
        top = f"{root}/t{a:03d}"
        os.makedirs(top, exist_ok=True)
        with os.scandir(top) as it:
            have = {e.name for e in it if e.is_dir(follow_symlinks=False)}
        for b in range(DIR_SUB):
            name = f"s{b:02d}"
            if name not in have:
                os.mkdir(f"{top}/{name}")
                created += 1
    return {
        "path": root,
        "directories": DIR_COUNT,
        "created": created,
        "seconds": round(time.monotonic() - began, 2),
    }


def warm_up(root: str) -> float:
    """Read every file once so that no tool's run pays for a cold inode or page cache."""
    began = time.monotonic()
    for path in workload_paths(root, MAX_FILES):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.read(fd, 4096)
        finally:
            os.close(fd)
    return time.monotonic() - began


# the generator (a separate process) ------------------------------------------------------


def generate(workload: str, root: str, n: int) -> int:
    """The burst. Prints its own start and end (CLOCK_MONOTONIC is system-wide)."""
    paths = workload_paths(root, n)
    op_open, op_close, op_read, op_pwrite = os.open, os.close, os.read, os.pwrite
    wall = time.time()
    began = time.monotonic()
    if workload == "write":
        for path in paths:
            fd = op_open(path, os.O_WRONLY)
            op_pwrite(fd, CONTENT, 0)
            op_close(fd)
    elif workload == "read":
        for path in paths:
            fd = op_open(path, os.O_RDONLY)
            op_read(fd, 4096)
            op_close(fd)
    else:
        print(f"unknown workload {workload!r}", file=sys.stderr)
        return 2
    ended = time.monotonic()
    print(json.dumps({"start": began, "end": ended, "start_wall": wall, "files": n}), flush=True)
    return 0


# kernel settings ---------------------------------------------------------------------


class Sysctl:
    """fs.inotify.* values: set for a run, the originals restored at exit."""

    def __init__(self) -> None:
        self.saved: dict[str, int] = {}
        self.writable = os.geteuid() == 0

    @staticmethod
    def read(name: str) -> int:
        with open(SYSCTL_DIR + name) as fh:
            return int(fh.read().strip())

    def set(self, name: str, value: int) -> int:
        """Sets `value` when we can; returns the value in effect."""
        current = self.read(name)
        if current == value or not self.writable:
            return current
        self.saved.setdefault(name, current)
        with open(SYSCTL_DIR + name, "w") as fh:
            fh.write(str(value))
        return self.read(name)

    def restore(self) -> None:
        for name, value in self.saved.items():
            try:
                with open(SYSCTL_DIR + name, "w") as fh:
                    fh.write(str(value))
            except OSError as exc:
                progress(f"could not restore {name}={value}: {exc}")
            else:
                progress(f"restored fs.inotify.{name} = {value}")
        self.saved.clear()


# processes -----------------------------------------------------------------------------


def inotify_watches(pid: int) -> int | None:
    """Watches held by the process's inotify instances (counted in /proc/PID/fdinfo)."""
    total = 0
    found = False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                total += sum(1 for line in fh if line.startswith("inotify wd:"))
            found = True
        except OSError:
            continue
    return total if found else None


# output files --------------------------------------------------------------------------


class OutputTail:
    """Follows a tool's output file and counts the lines of the workload's event kinds with
    bytes.count (cheap: this runs beside the tool; exact counting is done after the run)."""

    def __init__(self, path: str, tool: str, actions: tuple[str, ...]) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - kept open across polls, closed in close()
        self._rest = b""
        if tool == "exfilwatch":
            self._needles = [f'"action":"{a}"'.encode() for a in actions]
        else:  # line starts, without the ",ISDIR" variants (directory listings)
            names = {v: k for k, v in INOTIFY_ACTIONS.items()}
            self._needles = [
                f"\n{names[a]} /".encode()
                if names[a] in ("OPEN", "MODIFY")
                else f"\n{names[a]},CLOSE /".encode()
                for a in actions
            ]
        self.count = 0

    def poll(self) -> bool:
        """Reads what was appended; True when complete lines arrived."""
        data = self._fh.read()
        if not data:
            return False
        buf = self._rest + data
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            self._rest = buf
            return False
        lines, self._rest = b"\n" + buf[:cut], buf[cut:]
        self.count += sum(lines.count(needle) for needle in self._needles)
        return True

    def close(self) -> None:
        self._fh.close()


@dataclass
class Counted:
    captured: int = 0
    extra: int = 0
    other: int = 0
    overflow_lines: int = 0
    loss_records: list[dict[str, Any]] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    last_timestamp: str = ""


def count_exfilwatch(path: str, expected: set[str], actions: tuple[str, ...]) -> Counted:
    seen: dict[str, set[str]] = {a: set() for a in actions}
    c = Counted()
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                rec = json.loads(raw)
            except ValueError:
                c.other += 1
                continue
            ev = rec.get("event", {})
            if ev.get("kind") == "event":
                action = ev.get("action")
                fpath = rec.get("file", {}).get("path")
                bucket = seen.get(action)
                if bucket is None or fpath not in expected:
                    c.other += 1
                elif fpath in bucket:
                    c.extra += 1
                else:
                    bucket.add(fpath)
                    stamp = rec.get("@timestamp", "")
                    c.last_timestamp = max(c.last_timestamp, stamp)
                continue
            action = ev.get("action")
            health = rec.get("exfilwatch", {}).get("health", {})
            if action == "event_loss":
                c.loss_records.append({"reason": ev.get("reason"), **health})
            elif action in ("source_ready", "agent_stopped", "rescan_completed"):
                c.health[action] = health
    c.captured = sum(len(s) for s in seen.values())
    return c


def count_inotifywait(path: str, expected: set[str], actions: tuple[str, ...]) -> Counted:
    seen: dict[str, set[str]] = {a: set() for a in actions}
    c = Counted()
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.rstrip(b"\n").decode("utf-8", "surrogateescape")
            names, _, fpath = line.partition(" ")
            flags = names.split(",")
            if "Q_OVERFLOW" in flags or "Q_OVERFLOW" in line:
                c.overflow_lines += 1
                continue
            if "ISDIR" in flags:
                c.other += 1
                continue
            matched = False
            for flag in flags:
                action = INOTIFY_ACTIONS.get(flag)
                bucket = seen.get(action) if action is not None else None
                if bucket is None or fpath not in expected:
                    continue
                matched = True
                if fpath in bucket:
                    c.extra += 1
                else:
                    bucket.add(fpath)
            if not matched:
                c.other += 1
    c.captured = sum(len(s) for s in seen.values())
    return c


# runs ----------------------------------------------------------------------------------


@dataclass
class Context:
    base: str
    files_root: str
    dirs_root: str
    configs: str
    runs: str
    exfilwatch: str
    inotifywait: str
    sysctl: Sysctl
    quiet_seconds: float
    keep_output: bool
    cleanup: Cleanup
    defaults: bool = False  # the shipped defaults for all but `watch` (destinations and all)


def write_config(
    ctx: Context, name: str, roots: Sequence[str], *, apply_sysctl: bool, heartbeat: str | None
) -> str:
    lines = ["# generated by bench/capture.py", "watch:"]
    for root in roots:
        lines += [f"  - path: {root}", "    tags: [bench]"]
    lines += ["sinks:", "  - type: stdout"]
    if not ctx.defaults:
        # The capture path alone: no destination discovery, lineage index or process polling
        # competing for the same core during a burst (bench/enrich.py measures those).
        lines += [
            "locations: {enabled: false}",
            "lineage: {enabled: false}",
            "processes: {enabled: false}",
        ]
    if heartbeat is not None:
        lines.append(f"heartbeat_interval: {heartbeat}")
    if not apply_sysctl:
        lines += ["inotify:", "  apply_sysctl: false"]
    path = os.path.join(ctx.configs, f"{name}.yaml")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def exfilwatch_argv(ctx: Context, config: str, output: str) -> list[str]:
    return [ctx.exfilwatch, "record", "--config", config, "--output", output]


def inotifywait_argv(ctx: Context, roots: Sequence[str], output: str) -> list[str]:
    # Without -q it says "Watches established." on stderr: our readiness signal.
    return [
        ctx.inotifywait,
        "-m",
        "-r",
        "--format",
        "%e %w%f",
        "-e",
        INOTIFYWAIT_EVENTS,
        *roots,
        "-o",
        output,
    ]


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    ps: psutil.Process
    output: str
    errpath: str
    spawned: float
    ready: float


def launch(ctx: Context, tool: str, tag: str, roots: Sequence[str], **cfg: Any) -> Launched:
    """Starts `tool` on `roots` and waits until it watches every directory. This machine may
    be shared with test runs that briefly lower fs.inotify.max_user_watches: a start that
    fails or watches too few directories is retried after a pause."""
    want = sum(_count_dirs(ctx, r) for r in roots)
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        try:
            run = _launch_once(ctx, tool, tag, roots, **cfg)
        except BenchError as exc:
            if attempt == LAUNCH_ATTEMPTS:
                raise
            progress(f"  {exc}; again in {LAUNCH_RETRY_SECONDS:.0f} s")
        else:
            have = inotify_watches(run.proc.pid) or 0
            if have >= want or attempt == LAUNCH_ATTEMPTS:
                return run
            progress(f"  {tool} watches {have:,} of {want:,} directories; again")
            ctx.cleanup.stop(run.proc, STOP_TIMEOUT)
        time.sleep(LAUNCH_RETRY_SECONDS)
    raise BenchError(f"{tool} did not start")


def _count_dirs(ctx: Context, root: str) -> int:
    """Directories to watch under `root`, itself included (our trees' layouts are known)."""
    if root == ctx.files_root:
        return 1 + FILE_DIRS
    if root == ctx.dirs_root:
        return 1 + DIR_COUNT
    return 1 + sum(len(dirs) for _, dirs, _ in os.walk(root))


def _launch_once(ctx: Context, tool: str, tag: str, roots: Sequence[str], **cfg: Any) -> Launched:
    output = os.path.join(ctx.runs, f"{tag}.out")
    errpath = os.path.join(ctx.runs, f"{tag}.err")
    remove_files(output, errpath)
    if tool == "exfilwatch":
        config = write_config(ctx, tag, roots, **cfg)
        argv = exfilwatch_argv(ctx, config, output)
        ready_file, needle = output, EXFILWATCH_READY
    else:
        argv = inotifywait_argv(ctx, roots, output)
        ready_file, needle = errpath, INOTIFYWAIT_READY
    with open(errpath, "wb") as errfh:
        spawned = time.monotonic()
        proc = ctx.cleanup.spawn(argv, stderr=errfh)
    ready = wait_for_text(
        proc, ready_file, needle, tool, errpath, READY_TIMEOUT, READY_POLL_SECONDS
    )
    return Launched(proc, psutil.Process(proc.pid), output, errpath, spawned, ready)


def source_ready(path: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        for raw in fh:
            if EXFILWATCH_READY in raw:
                health: dict[str, Any] = json.loads(raw)["exfilwatch"]["health"]
                return health
    return {}


@dataclass
class BurstRun:
    size: int
    workload: str
    tool: str
    queue: int
    expected: int
    captured: int = 0
    loss: int = 0
    extra: int = 0
    loss_reported: bool = False
    loss_detail: str = ""
    captured_at_done: int = 0
    done: str = ""
    burst_s: float = 0.0
    elapsed_s: float = 0.0
    drain_s: float = 0.0
    read_s: float | None = None
    events_per_s: float = 0.0
    generator_files_per_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    stop_s: float = 0.0
    exit_code: int | None = None
    load1: float = 0.0
    queue_note: str = ""
    stalled: bool = False
    agent: dict[str, Any] = field(default_factory=dict)


def run_burst(
    ctx: Context, tool: str, size: int, workload: str, queue: int, *, stall: bool = False
) -> BurstRun:
    actions = WORKLOAD_ACTIONS[workload]
    os.sync()  # the previous write burst's dirty pages are not written back during this one
    for attempt in range(1, QUEUE_ATTEMPTS + 1):
        # The kernel fixes an instance's queue size when it is made. Another root process
        # (an agent under test) may raise the sysctl meanwhile: check it after "watching".
        in_effect = ctx.sysctl.set("max_queued_events", queue)
        tag = f"{tool}-{workload}-{size}-q{in_effect}"
        run = launch(
            ctx,
            tool,
            tag,
            [ctx.files_root],
            apply_sysctl=queue >= RAISED_QUEUE,
            heartbeat="1h",
        )
        after = ctx.sysctl.read("max_queued_events")
        if after == in_effect or queue >= RAISED_QUEUE or attempt == QUEUE_ATTEMPTS:
            break
        progress(f"  max_queued_events changed to {after:,} while {tool} started: again")
        ctx.cleanup.stop(run.proc, STOP_TIMEOUT)
    res = BurstRun(size, workload, tool, in_effect, expected=size * len(actions), stalled=stall)
    res.load1 = round(os.getloadavg()[0], 2)
    if after != in_effect:
        res.queue_note = f"sysctl was {after:,} when watching"
    cpu0 = cpu_seconds(run.ps)
    tail = OutputTail(run.output, tool, actions)
    tail.poll()
    base = tail.count
    if stall:
        run.proc.send_signal(signal.SIGSTOP)
    gen = ctx.cleanup.spawn(
        [PYTHON, os.path.abspath(__file__), "_generate", workload, ctx.files_root, str(size)],
        stdout=subprocess.PIPE,
    )
    if stall:  # the tool sleeps through the whole burst, then catches up
        gen.wait()
        time.sleep(STALL_EXTRA_SECONDS)
        run.proc.send_signal(signal.SIGCONT)
    launched = time.monotonic()
    deadline = launched + 60 + size / 500
    last_arrival: float | None = None
    # "Quiet" means no new output and no CPU use: exfilwatch writes a batch's lines only when
    # the whole batch is done, which can take seconds on a busy machine.
    last_activity = launched
    cpu_prev, next_cpu = cpu0, launched + CPU_SAMPLE_SECONDS
    gen_info: dict[str, Any] | None = None
    done = "timeout"
    while True:
        now = time.monotonic()
        if tail.poll():
            last_arrival = last_activity = now
        if now >= next_cpu:
            with contextlib.suppress(psutil.Error):
                cpu_now = cpu_seconds(run.ps)
                if cpu_now - cpu_prev >= BUSY_CPU_SECONDS:
                    last_activity = now
                cpu_prev, next_cpu = cpu_now, now + CPU_SAMPLE_SECONDS
        if gen_info is None and gen.poll() is not None:
            gen_info = _generator_result(gen)
        if tail.count - base >= res.expected:
            done = "complete"
            break
        if gen_info is not None and now - max(last_activity, gen_info["end"]) >= (
            ctx.quiet_seconds
        ):
            done = "quiet"
            break
        if run.proc.poll() is not None:
            done = "tool_exited"
            break
        if now > deadline:
            break
        time.sleep(POLL_SECONDS)
    res.done = done
    res.captured_at_done = tail.count - base
    if run.proc.poll() is None:
        res.cpu_s = round(cpu_seconds(run.ps) - cpu0, 3)
        res.peak_rss_mb = round((peak_rss_bytes(run.proc.pid) or 0) / MB, 1)
    tail.close()
    if gen_info is None:
        gen.wait()
        gen_info = _generator_result(gen)
    ctx.cleanup.forget(gen)
    stop_s, res.exit_code = ctx.cleanup.stop(run.proc, STOP_TIMEOUT)
    res.stop_s = round(stop_s, 2)

    expected = set(workload_paths(ctx.files_root, size))
    if tool == "exfilwatch":
        counted = count_exfilwatch(run.output, expected, actions)
        res.loss_reported = bool(counted.loss_records)
        res.loss_detail = "; ".join(
            f"{r.get('reason')}"
            + (f" dropped={r['dropped']}" if "dropped" in r else "")
            + (f" max_queued_events={r['max_queued_events']}" if "max_queued_events" in r else "")
            for r in counted.loss_records
        )
        stopped = counted.health.get("agent_stopped", {})
        res.agent = {
            k: stopped.get(k)
            for k in ("drained", "unwritten", "queue_high_water", "dropped_total", "processed")
        }
        res.agent["watches"] = counted.health.get("source_ready", {}).get("watches")
        if counted.last_timestamp:
            res.read_s = round(epoch(counted.last_timestamp) - gen_info["start_wall"], 3)
        if "rescan_completed" in counted.health:
            res.agent["rescan"] = counted.health["rescan_completed"]
    else:
        counted = count_inotifywait(run.output, expected, actions)
        stderr_after = tail_text(run.errpath).lower()
        res.loss_reported = counted.overflow_lines > 0 or "overflow" in stderr_after
        if res.loss_reported:
            res.loss_detail = f"Q_OVERFLOW lines={counted.overflow_lines}"
    res.captured = counted.captured
    res.extra = counted.extra
    res.loss = res.expected - res.captured
    res.burst_s = round(gen_info["end"] - gen_info["start"], 3)
    if res.burst_s > 0:
        res.generator_files_per_s = round(size / res.burst_s)
    if last_arrival is not None:
        elapsed = last_arrival - gen_info["start"]
        res.elapsed_s = round(elapsed, 3)
        res.drain_s = round(last_arrival - gen_info["end"], 3)
        arrived = min(res.captured, res.captured_at_done)
        res.events_per_s = round(arrived / elapsed) if elapsed > 0 else 0.0
    if not ctx.keep_output:
        remove_files(run.output, run.errpath)
    return res


def _generator_result(gen: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert gen.stdout is not None
    data = gen.stdout.read()
    gen.stdout.close()
    if gen.returncode != 0 or not data.strip():
        raise BenchError(f"generator failed ({gen.returncode}): {data!r}")
    info: dict[str, Any] = json.loads(data)
    return info


def run_bursts(
    ctx: Context, sizes: Sequence[int], workloads: Sequence[str], repeat: int, default_q: bool
) -> list[BurstRun]:
    plan: list[tuple[str, int, bool]] = [
        ("exfilwatch", RAISED_QUEUE, False),
        ("inotifywait", RAISED_QUEUE, False),
    ]
    if default_q:
        plan += [("inotifywait", DEFAULT_QUEUE, False), ("exfilwatch", DEFAULT_QUEUE, False)]
    stalls = [("inotifywait", DEFAULT_QUEUE, True), ("exfilwatch", DEFAULT_QUEUE, True)]
    out: list[BurstRun] = []
    for size in sizes:
        for workload in workloads:
            for rep in range(repeat):
                # The stalled runs are about who reports loss, not speed: once is enough.
                for tool, queue, stall in plan + (stalls if default_q and rep == 0 else []):
                    progress(
                        f"burst {workload} {size:,} files: {tool}, max_queued_events {queue:,}"
                        + (", stalled (SIGSTOP) during the burst" if stall else "")
                    )
                    r = run_burst(ctx, tool, size, workload, queue, stall=stall)
                    progress(
                        f"  captured {r.captured:,}/{r.expected:,} (loss {r.loss:,}, "
                        f"reported {'yes' if r.loss_reported else 'no'}), "
                        f"elapsed {r.elapsed_s} s, burst {r.burst_s} s, "
                        f"{r.events_per_s:,.0f} ev/s, CPU {r.cpu_s} s, {r.done}"
                        + (f", repeat {rep + 1}" if repeat > 1 else "")
                    )
                    out.append(r)
    return out


def _pick(
    runs: Sequence[BurstRun],
    size: int,
    workload: str,
    tool: str,
    *,
    raised: bool,
    stalled: bool = False,
) -> list[BurstRun]:
    return [
        r
        for r in runs
        if r.size == size
        and r.workload == workload
        and r.tool == tool
        and (r.queue >= RAISED_QUEUE) == raised
        and r.stalled == stalled
    ]


def compare(runs: Sequence[BurstRun]) -> list[dict[str, Any]]:
    """Per size and workload: exfilwatch / inotifywait on the raised queue (medians)."""
    out: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r.size, r.workload) for r in runs))
    for size, workload in keys:
        ew = _pick(runs, size, workload, "exfilwatch", raised=True)
        iw = _pick(runs, size, workload, "inotifywait", raised=True)
        iw_def = _pick(runs, size, workload, "inotifywait", raised=False)
        ew_def = _pick(runs, size, workload, "exfilwatch", raised=False)
        iw_stall = _pick(runs, size, workload, "inotifywait", raised=False, stalled=True)
        ew_stall = _pick(runs, size, workload, "exfilwatch", raised=False, stalled=True)
        row: dict[str, Any] = {"size": size, "workload": workload}
        if ew and iw:
            ew_rate = statistics.median(r.events_per_s for r in ew)
            iw_rate = statistics.median(r.events_per_s for r in iw)
            ew_cpu = statistics.median(r.cpu_s for r in ew)
            iw_cpu = statistics.median(r.cpu_s for r in iw)
            row["rate_ratio"] = round(ew_rate / iw_rate, 3) if iw_rate else None
            row["cpu_ratio"] = round(ew_cpu / iw_cpu, 2) if iw_cpu else None
            row["exfilwatch_captured_pct"] = round(
                100 * min(r.captured for r in ew) / ew[0].expected, 3
            )
            row["inotifywait_captured_pct"] = round(
                100 * min(r.captured for r in iw) / iw[0].expected, 3
            )
            row["goal_capture_100"] = all(r.loss == 0 for r in ew)
            row["goal_rate_ratio_0_8"] = (row["rate_ratio"] or 0) >= 0.8
        if iw_def:
            row["inotifywait_default_loss"] = max(r.loss for r in iw_def)
            row["inotifywait_default_reported"] = any(r.loss_reported for r in iw_def)
        if ew_def:
            row["exfilwatch_default_loss"] = max(r.loss for r in ew_def)
            row["exfilwatch_default_reported"] = any(r.loss_reported for r in ew_def)
            row["goal_loss_reported"] = all(r.loss == 0 or r.loss_reported for r in ew_def)
        if iw_stall:
            row["inotifywait_stalled_loss"] = max(r.loss for r in iw_stall)
            row["inotifywait_stalled_reported"] = any(r.loss_reported for r in iw_stall)
        if ew_stall:
            row["exfilwatch_stalled_loss"] = max(r.loss for r in ew_stall)
            row["exfilwatch_stalled_reported"] = any(r.loss_reported for r in ew_stall)
        out.append(row)
    return out


def run_startup(ctx: Context, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"exfilwatch": [], "inotifywait": []}
    for rep in range(repeats):
        for tool in ("exfilwatch", "inotifywait"):
            run = launch(
                ctx,
                tool,
                f"startup-{tool}",
                [ctx.dirs_root],
                apply_sysctl=True,
                heartbeat="1h",
            )
            entry: dict[str, Any] = {
                "seconds": round(run.ready - run.spawned, 3),
                "cpu_s": round(cpu_seconds(run.ps), 3),
                "rss_mb": round(run.ps.memory_info().rss / MB, 1),
                "watches": inotify_watches(run.proc.pid),
            }
            if tool == "exfilwatch":
                ready = source_ready(run.output)
                entry["agent_seconds"] = ready.get("seconds")
                entry["agent_watches"] = ready.get("watches")
            ctx.cleanup.stop(run.proc, STOP_TIMEOUT)
            if not ctx.keep_output:
                remove_files(run.output, run.errpath)
            progress(f"start-up {tool} ({rep + 1}/{repeats}): {entry}")
            runs[tool].append(entry)
    result: dict[str, Any] = {"tree": ctx.dirs_root, "directories": DIR_COUNT, "runs": runs}
    for tool, entries in runs.items():
        result[tool] = {
            "median_s": round(statistics.median(e["seconds"] for e in entries), 3),
            "min_s": min(e["seconds"] for e in entries),
            "max_s": max(e["seconds"] for e in entries),
            "cpu_s": round(statistics.median(e["cpu_s"] for e in entries), 3),
            "rss_mb": round(statistics.median(e["rss_mb"] for e in entries), 1),
            "watches": entries[-1]["watches"],
        }
        if tool == "exfilwatch":
            result[tool]["agent_seconds"] = statistics.median(
                e["agent_seconds"] for e in entries if e["agent_seconds"] is not None
            )
    iw = result["inotifywait"]["median_s"]
    result["ratio"] = round(result["exfilwatch"]["median_s"] / iw, 2) if iw else None
    return result


def run_idle(ctx: Context, seconds: float) -> dict[str, Any]:
    roots = [ctx.files_root, ctx.dirs_root]
    ctx.sysctl.set("max_queued_events", RAISED_QUEUE)
    ew = launch(ctx, "exfilwatch", "idle-exfilwatch", roots, apply_sysctl=True, heartbeat=None)
    iw = launch(ctx, "inotifywait", "idle-inotifywait", roots)
    time.sleep(IDLE_SETTLE_SECONDS)
    procs = {"exfilwatch": ew, "inotifywait": iw}
    rss: dict[str, list[int]] = {name: [] for name in procs}
    out_size0 = os.path.getsize(ew.output)
    cpu0 = {name: cpu_seconds(r.ps) for name, r in procs.items()}
    t0 = time.monotonic()
    end = t0 + seconds
    progress(f"idle: watching for {seconds:.0f} s")
    while True:
        for name, r in procs.items():
            rss[name].append(r.ps.memory_info().rss)
        now = time.monotonic()
        if now >= end:
            break
        time.sleep(min(IDLE_SAMPLE_SECONDS, end - now))
    wall = time.monotonic() - t0
    cpu1 = {name: cpu_seconds(r.ps) for name, r in procs.items()}
    result: dict[str, Any] = {"seconds": round(wall, 1), "roots": roots}
    for name, r in procs.items():
        cpu = cpu1[name] - cpu0[name]
        result[name] = {
            "cpu_s": round(cpu, 3),
            "pct_of_one_core": round(100 * cpu / wall, 3),
            "rss_start_mb": round(rss[name][0] / MB, 1),
            "rss_max_mb": round(max(rss[name]) / MB, 1),
            "rss_end_mb": round(rss[name][-1] / MB, 1),
            "peak_rss_mb": round((peak_rss_bytes(r.proc.pid) or 0) / MB, 1),
            "watches": inotify_watches(r.proc.pid),
            "threads": r.ps.num_threads(),
        }
    result["exfilwatch"]["output_bytes_while_idle"] = os.path.getsize(ew.output) - out_size0
    result["goal_idle_0_5_pct"] = result["exfilwatch"]["pct_of_one_core"] <= 0.5
    for r in procs.values():
        ctx.cleanup.stop(r.proc, STOP_TIMEOUT)
        if not ctx.keep_output:
            remove_files(r.output, r.errpath)
    return result


# report --------------------------------------------------------------------------------


def _queue(q: int) -> str:
    return "1M" if q >= RAISED_QUEUE else f"{q:,}"


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print_header("capture", m, m["exfilwatch"], m["inotifywait"])
    code = m.get("code") or {}
    if code:
        dirty = ", ".join(code["uncommitted"]) or "none"
        print(
            f"checkout: commit {code['commit']}, uncommitted: {dirty}, "
            f"agent/ diff sha1 {code['agent_diff_sha1']}"
        )
        if m["exfilwatch"] != exfilwatch_command():
            print("(the checkout is not what --exfilwatch runs; its state is for reference)")
        elif results.get("code_at_end") != code:
            print("WARNING: agent/ changed while the bench ran; results mix two versions")
    bursts: list[dict[str, Any]] = results.get("bursts", [])
    if bursts:
        print("\nBursts (each tool alone; queue = fs.inotify.max_queued_events)\n")
        rows = [
            [
                b["size"],
                b["workload"],
                b["tool"] + (" stalled" if b["stalled"] else ""),
                _queue(b["queue"]),
                b["expected"],
                b["captured"],
                b["loss"],
                b["loss_reported"],
                b["burst_s"],
                b["elapsed_s"],
                b["drain_s"],
                b["read_s"],
                b["events_per_s"],
                b["cpu_s"],
                b["peak_rss_mb"],
                b["load1"],
                b["done"] + (" *" if b["queue_note"] else ""),
            ]
            for b in bursts
        ]
        print(
            table(
                [
                    "files",
                    "load",
                    "tool",
                    "queue",
                    "expected",
                    "captured",
                    "loss",
                    "reported",
                    "burst s",
                    "elapsed s",
                    "drain s",
                    "read s",
                    "events/s",
                    "CPU s",
                    "peak RSS MB",
                    "load1",
                    "end",
                ],
                rows,
            )
        )
        notes = [
            f"  {b['tool']} {b['workload']} {b['size']:,} q={_queue(b['queue'])}"
            f"{' stalled' if b['stalled'] else ''}: "
            f"{b['loss_detail'] or '-'}; agent {b['agent']}"
            for b in bursts
            if b["tool"] == "exfilwatch"
        ]
        print("\nexfilwatch loss records and pipeline stats (agent_stopped):")
        print("\n".join(notes))
        for b in bursts:
            if b["queue_note"]:
                print(f"* {b['tool']} {b['workload']} {b['size']:,}: {b['queue_note']}")
        print("\nComparison (exfilwatch / inotifywait, both at queue 1M; medians)\n")
        crow = [
            [
                c["size"],
                c["workload"],
                c.get("rate_ratio"),
                c.get("cpu_ratio"),
                c.get("exfilwatch_captured_pct"),
                c.get("inotifywait_captured_pct"),
                c.get("goal_capture_100"),
                c.get("goal_rate_ratio_0_8"),
                _loss(c, "inotifywait"),
                _loss(c, "exfilwatch"),
                _loss(c, "inotifywait", "stalled"),
                _loss(c, "exfilwatch", "stalled"),
            ]
            for c in results["comparison"]
        ]
        print(
            table(
                [
                    "files",
                    "load",
                    "events/s ratio",
                    "CPU ratio",
                    "ew captured %",
                    "iw captured %",
                    "100% goal",
                    ">=0.8 goal",
                    "iw loss @16384 (reported)",
                    "ew loss @16384 (reported)",
                    "iw stalled",
                    "ew stalled",
                ],
                crow,
            )
        )
    st = results.get("startup")
    if st:
        print(f"\nStart-up: time to watch {st['directories']:,} directories ({st['tree']})\n")
        srows = [
            [
                tool,
                st[tool]["median_s"],
                st[tool]["min_s"],
                st[tool]["max_s"],
                st[tool].get("agent_seconds"),
                st[tool]["watches"],
                st[tool]["cpu_s"],
                st[tool]["rss_mb"],
            ]
            for tool in ("exfilwatch", "inotifywait")
        ]
        print(
            table(
                [
                    "tool",
                    "median s",
                    "min s",
                    "max s",
                    "agent 'seconds'",
                    "watches",
                    "CPU s to ready",
                    "RSS MB at ready",
                ],
                srows,
            )
        )
        print(f"ratio exfilwatch / inotifywait (median): {cell(st['ratio'])}")
    idle = results.get("idle")
    if idle:
        print(f"\nIdle: {idle['seconds']:.0f} s watching {', '.join(idle['roots'])}\n")
        irows = [
            [
                tool,
                idle[tool]["cpu_s"],
                idle[tool]["pct_of_one_core"],
                idle[tool]["rss_start_mb"],
                idle[tool]["rss_max_mb"],
                idle[tool]["rss_end_mb"],
                idle[tool]["watches"],
                idle[tool]["threads"],
            ]
            for tool in ("exfilwatch", "inotifywait")
        ]
        print(
            table(
                [
                    "tool",
                    "CPU s",
                    "% of one core",
                    "RSS MB start",
                    "RSS MB max",
                    "RSS MB end",
                    "watches",
                    "threads",
                ],
                irows,
            )
        )
        print(f"goal exfilwatch <= 0.5% of one core: {cell(idle['goal_idle_0_5_pct'])}")


def _loss(c: dict[str, Any], tool: str, case: str = "default") -> str:
    loss = c.get(f"{tool}_{case}_loss")
    if loss is None:
        return "-"
    return f"{loss:,} ({'yes' if c.get(f'{tool}_{case}_reported') else 'no'})"


# main ----------------------------------------------------------------------------------


EPILOG = """\
choices:
  each tool runs alone, started and "watching" before the burst; the burst is a separate
  process rewriting files in place without truncating (OPEN, MODIFY, CLOSE_WRITE) or
  reading them (OPEN, CLOSE_NOWRITE); inotifywait's directory (ISDIR) events are not
  counted, exfilwatch does not report listings; captured = distinct (path, action) pairs;
  elapsed = generator start to the last event line's arrival (10 ms polls); CPU = the
  tool's user+system seconds from "watching" to "done"; the ratios are exfilwatch /
  inotifywait with max_queued_events 1,048,576; runs at the kernel default 16,384
  (exfilwatch with inotify.apply_sysctl: false) show which tool reports its loss;
  trees under --dir are built once and kept; kernel settings are restored at exit.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, and the epilog kept as written."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/capture.py",
        description=(
            "Capture benchmark: events captured, loss, events/s and CPU of exfilwatch against "
            "inotifywait -m -r on bursts of file writes and reads; time to start watching "
            "10,000 directories; CPU and RSS while idle. Run as root. Trees are built once "
            "under --dir and reused. Progress on stderr, tables (or --json) on stdout. "
            "See the module docstring for what each number means."
        ),
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--dir", default=DEFAULT_DIR, help="bench directory (trees are kept)")
    p.add_argument("--sizes", default="20000,100000", help="burst sizes in files (<= 100000)")
    p.add_argument("--workloads", default="write,read", help="write, read or both")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool, size and workload")
    p.add_argument(
        "--skip-default-queue",
        action="store_true",
        help="no runs at the kernel default max_queued_events (16384)",
    )
    p.add_argument("--quiet-seconds", type=float, default=3.0, help="end of a burst run")
    p.add_argument("--startup-repeats", type=int, default=3, help="start-up runs per tool")
    p.add_argument("--idle-seconds", type=float, default=300.0, help="idle measurement length")
    p.add_argument("--skip-bursts", action="store_true", help="no burst runs")
    p.add_argument("--skip-startup", action="store_true", help="no start-up measurement")
    p.add_argument("--skip-idle", action="store_true", help="no idle measurement")
    p.add_argument("--quick", action="store_true", help="sizes 20000 only, idle 20 s")
    p.add_argument("--keep-output", action="store_true", help="keep tool output in DIR/runs")
    p.add_argument(
        "--defaults",
        action="store_true",
        help="run the agent on the shipped defaults but for `watch` (destinations, lineage, "
        "processes on), as a new user would; with --dir under /tmp the tagged tree lies "
        "inside a staging place",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="results as JSON: on stdout instead of the tables, or (with FILE) also to FILE",
    )
    p.add_argument(
        "--exfilwatch",
        default=exfilwatch_command(),
        help="exfilwatch command",
    )
    p.add_argument("--inotifywait", default="inotifywait", help="inotifywait command")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["_generate"]:
        if len(args_list) != 4:
            print("usage: capture.py _generate write|read TREE N", file=sys.stderr)
            return 2
        return generate(args_list[1], args_list[2], int(args_list[3]))
    args = _parser().parse_args(args_list)
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    idle_seconds = 20.0 if args.quick else args.idle_seconds
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOAD_ACTIONS]
    if bad or any(not 0 < s <= MAX_FILES for s in sizes):
        print(f"workloads are write,read; sizes 1..{MAX_FILES}", file=sys.stderr)
        return 2
    exfilwatch = shutil.which(args.exfilwatch)
    inotifywait = shutil.which(args.inotifywait)
    if exfilwatch is None or inotifywait is None:
        print("exfilwatch and inotifywait must be installed", file=sys.stderr)
        return 2
    sysctl = Sysctl()
    if not sysctl.writable:
        progress("not root: kernel settings stay as they are; default-queue runs are skipped")
    base = os.path.abspath(args.dir)
    ctx = Context(
        base=base,
        files_root=os.path.join(base, "files"),
        dirs_root=os.path.join(base, "dirs"),
        configs=os.path.join(base, "configs"),
        runs=os.path.join(base, "runs"),
        exfilwatch=exfilwatch,
        inotifywait=inotifywait,
        sysctl=sysctl,
        quiet_seconds=args.quiet_seconds,
        keep_output=args.keep_output,
        cleanup=Cleanup(),
        defaults=args.defaults,
    )
    results: dict[str, Any] = {"machine": _machine(inotifywait), "settings": vars(args)}
    results["machine"]["exfilwatch"] = exfilwatch
    with interruptible():
        try:
            for d in (ctx.configs, ctx.runs):
                os.makedirs(d, exist_ok=True)
            if sysctl.read("max_user_watches") < MIN_WATCHES:
                sysctl.set("max_user_watches", MIN_WATCHES)
            results["kernel_at_start"] = {
                n: sysctl.read(n) for n in ("max_queued_events", "max_user_watches")
            }
            progress(f"trees under {base} (built once, reused)")
            results["trees"] = {
                "files": ensure_file_tree(ctx.files_root),
                "dirs": ensure_dir_tree(ctx.dirs_root),
            }
            progress(f"trees: {results['trees']}")
            if not args.skip_bursts:
                progress(f"warm-up read of {MAX_FILES:,} files: {warm_up(ctx.files_root):.1f} s")
                default_q = not args.skip_default_queue and sysctl.writable
                runs = run_bursts(ctx, sizes, workloads, args.repeat, default_q)
                results["bursts"] = [asdict(r) for r in runs]
                results["comparison"] = compare(runs)
            if not args.skip_startup:
                results["startup"] = run_startup(ctx, args.startup_repeats)
            if not args.skip_idle:
                results["idle"] = run_idle(ctx, idle_seconds)
        except BenchError as exc:
            progress(f"error: {exc}")
            return 1
        finally:
            ctx.cleanup.close()
            sysctl.restore()
    results["code_at_end"] = code_version()
    if exfilwatch == exfilwatch_command() and results["code_at_end"] != results["machine"]["code"]:
        progress("warning: agent/ changed while the bench ran; results mix two versions")
    if args.json == "-":
        print(json.dumps(results, indent=2))
        return 0
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    print_report(results)
    return 0


def _machine(inotifywait: str) -> dict[str, Any]:
    version = subprocess.run(
        [inotifywait, "--help"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        **machine(),
        "inotifywait": version[0] if version else "inotifywait",
        "code": code_version(),
    }


if __name__ == "__main__":
    sys.exit(main())
