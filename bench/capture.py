"""Capture benchmark: exfilwatch's Linux source against ``inotifywait -m -r``.

Run as root (it changes ``fs.inotify.max_queued_events`` between runs and restores it), with
the interpreter of the environment exfilwatch is installed in (``.venv/bin/python`` in a
checkout; the ``exfilwatch`` command next to it is the one measured)::

    python bench/capture.py --quick       # 20,000 files, 20 s idle
    python bench/capture.py               # 20,000 and 100,000 files, 300 s idle
    python bench/capture.py --dir /srv/capb,/tmp/capb   # the same bursts in two places
    python bench/capture.py --modes run   # exfilwatch with the shipped rules only
    python bench/capture.py --json        # JSON on stdout instead of tables
    python bench/capture.py --json r.json # tables, and JSON in r.json

Progress goes to stderr; the result tables (or ``--json``) go to stdout.

Places (``--dir``, comma-separated)
    Each directory is a place: its trees are built there (once, kept) and every burst runs in
    every place, with inotifywait baseline runs of its own; each burst row and comparison
    row says its place. Places take turns within each size, workload and repeat, so a drift
    in the machine's load hits them alike. The place comparison divides a place's events/s
    ratio by the reference place's: the first place not under /tmp (/srv/capb in
    ``--dir /srv/capb,/tmp/capb``), else the first. The start-up and idle measurements use
    the first place.

Modes (``--modes``, default both)
    record  ``exfilwatch record --config C --output OUT``: every event written as a JSON line
            (and health records); no rules.
    run     ``exfilwatch run --config C``, its stdout sink (``records: [alert, health]``) sent
            to OUT: the checkout's shipped rules (repo root / "rules") plus a bench rule file
            the bench writes into each place's configs/ (``bench-rules.yaml``: an alert on
            the closed_write of ``exfilwatch-bench-sentinel``, checked at start with
            ``exfilwatch rules validate`` and ``rules test``). No events are written, so the
            agent asks the kernel only for the actions the rules use (its ``source_actions``
            record; with the shipped rules ``opened`` and ``modified`` are left out).
    Every exfilwatch run (start-up and idle too) gets a fresh, empty ``state_dir`` of its
    own (``runs/TAG.state``): with a shared one, a run that starts after an inotifywait
    burst would rescan the files changed "while it was down" and report them.

Bursts
    A separate process (this script's hidden ``_generate`` mode, so the burst does not share
    a GIL or a core with the tool) touches N existing files of a pre-built tree, as fast as it
    can. ``write`` opens each file O_WRONLY, overwrites its bytes at offset 0 and closes it:
    OPEN, MODIFY, CLOSE_WRITE (exfilwatch: opened, modified, closed_write), 3 events a file.
    It does not truncate: a truncate and a write are two MODIFY events the kernel merges only
    when the reader has not read the queue in between, so the expected count would depend on
    timing. ``read`` opens, reads and closes each file: OPEN, CLOSE_NOWRITE (opened,
    closed_nowrite), 2 events a file. File k of a burst is ``files/d{k % 100}/f{k // 100}``,
    so every burst spreads over all 100 directories. In run mode only, the generator then
    writes ``files/exfilwatch-bench-sentinel`` (O_WRONLY|O_CREAT, a few bytes, close) as its
    last operation; the bench deletes it after the run, so the tree keeps 100,000 files.

    Each tool runs alone, one after the other: start it, wait until it is watching (exfilwatch:
    its ``source_ready`` health record is in the output file; inotifywait: "Watches
    established." on stderr), start the generator, then poll the tool's output file every
    10 ms until it is complete (record mode and inotifywait: the expected number of event
    lines has arrived; run mode: the sentinel's alert has arrived, and since the tagged lane
    is processed in order, every burst event was processed before it), or the tool has been
    quiet (no new output and under 8% of a core) for ``--quiet-seconds`` after the generator
    finished. Then it reads the tool's CPU time and peak RSS (VmHWM), stops it with SIGTERM
    and counts exactly in the flushed output.

    expected   the burst's inotify events: 3 per file for write, 2 for read (what
               inotifywait reports), in every mode; the sentinel is not in it
    captured   record mode and inotifywait: distinct (path, action) pairs of the expected
               kinds on the burst's paths (a duplicate is counted as "extra", not as
               captured). Run mode writes no events: captured = expected when the sentinel's
               alert arrived and no ``event_loss`` record was written, else unknown ("-";
               loss "?"); its pipeline ``processed`` and ``dropped_total`` (``agent_stopped``)
               are listed below the table
    loss       expected - captured
    reported   exfilwatch: an ``event_loss`` health record; inotifywait: a Q_OVERFLOW line
               in its output or anything about an overflow on stderr (it prints nothing)
    burst s    the generator's own time from its first to its last burst file operation
    elapsed s  from the generator's first operation to the last arrival of an event line
               in the tool's output (run mode: the arrival of the sentinel's alert; 10 ms
               polls), the time until the tool has said it all
    drain s    elapsed - burst: how long the tool lagged behind the burst
    read s     exfilwatch only: from the generator's first operation to the @timestamp of the
               last workload event (run mode: of the sentinel's alert, its event's time),
               which is when exfilwatch's reader read it (the rest of elapsed is its
               pipeline: stat, rules, JSON, write)
    events/s   events that had arrived by the last arrival / elapsed; run mode: expected /
               elapsed, so that its ratio to inotifywait means "kept pace with the kernel"
               whatever actions the agent asked for. Both tools are bounded by the
               generator's speed, so a ratio near 1 means "kept up"
    CPU s      user + system time of the tool's process (and children) during the burst,
               from "watching" to "done", so start-up is not in it
    peak RSS   VmHWM of the tool's process, start-up included
    load1      the machine's 1-minute load average when the run started (noise indicator)

    Runs per place, size and workload, in this order: exfilwatch in each mode with the
    raised kernel queue (max_queued_events 1,048,576, what the agent sets itself as root),
    inotifywait with the same (once: both modes are compared with this run), inotifywait
    with the kernel default 16,384, and exfilwatch in each mode with 16,384 and
    ``inotify.apply_sysctl: false``; then, once per place, size and workload, inotifywait and
    exfilwatch in each mode at 16,384 "stalled": stopped with SIGSTOP before the burst and
    resumed (SIGCONT) 0.2 s after it, a consumer that fell behind, so the kernel queue
    overflows (does exfilwatch say so where inotifywait drops silently?).
    ``--skip-default-queue`` leaves these out.

    Comparison, per place, size, workload and mode: events/s ratio and CPU ratio,
    exfilwatch / inotifywait of the same place on the raised setting (medians with
    ``--repeat``), captured %, and the goal: record mode ratio >= 0.8 and CPU ratio <= 3;
    run mode ratio >= 0.6. Then per other place, mode and workload: its ratio / the reference
    place's (goal >= 0.8, within 20%). The stats section shows each exfilwatch run's
    ``agent_stopped`` numbers (processed, dropped_total), whether an ``event_loss`` record
    appeared, the alerts by rule, and once per mode the ``source_actions`` record's
    ``actions`` and ``left_out``. The machine is noisy: read ratios, never absolute times.

Floor (``--floor``)
    bench/floor.py in every burst too, on the raised queue: the least a CPython process can
    do and still write exfilwatch's record line (same fields, same key order) for every
    event -- read the queue, one lstat per path per read, lines encoded in C by msgspec, one
    write per read; no rescans, moves, health or rules. Its table: the floor / inotifywait
    (what Python itself costs on this machine) and exfilwatch record / the floor (what
    exfilwatch adds).

Start-up
    Time from spawning the process to "watching" on a tree of 10,000 directories (exfilwatch:
    the ``source_ready`` line is in its output, so Python start-up and imports are in it, as
    the owner sees them; inotifywait: "Watches established."), median of
    ``--startup-repeats`` alternating runs, with the watch count read from the inotify fd's
    fdinfo, the CPU seconds spent to get there and the RSS at that point. exfilwatch in
    record mode, in the first place.

Idle
    exfilwatch (record mode) watching both trees of the first place (10,101 directories,
    100,000 files) with the default heartbeat (60 s) for ``--idle-seconds`` with no file
    activity: CPU seconds / wall seconds as % of one core, and RSS at start, max (sampled
    every 5 s) and end. inotifywait watches the same trees at the same time as a reference;
    running both at once is fair here since neither has anything to do.

Trees (in each ``--dir``, default /var/tmp/exfilwatch-bench), built once and reused, never
deleted: on ext4, creating files right after deleting a large tree is 10-30x slower for
minutes.
    files/    100 directories x 1,000 files of 17 bytes (100,000 files)
    dirs/     100 directories x (1 + 99 subdirectories) = 10,000 directories, no files
    configs/  generated exfilwatch configs and the bench rule file
    runs/     tool output, stderr and state dirs, deleted after counting unless
              ``--keep-output``
A tree is checked by counting its entries; missing entries are created, nothing is removed.
Before the first burst every file is read once, so no tool pays for a cold cache.

``--defaults`` runs the agent on its shipped defaults but for ``watch`` (destinations,
lineage and process polling on); without it the generated configs turn those off.

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
    RULES_DIR,
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
    write_private,
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
INOTIFYWAIT_READY = b"Watches established."  # bench/floor.py says it too
FLOOR_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.py")
MODES = ("record", "run")
# Per mode: (events/s ratio at least, CPU ratio at most or None), exfilwatch / inotifywait.
GOALS: dict[str, tuple[float, float | None]] = {"record": (0.8, 3.0), "run": (0.6, None)}
PLACE_GOAL = 0.8  # a place's events/s ratio / the reference place's: within 20%
SENTINEL_NAME = "exfilwatch-bench-sentinel"
SENTINEL_RULE = "bench-capture-sentinel"
SENTINEL_NEEDLE = f'"id":"{SENTINEL_RULE}"'.encode()
SENTINEL_CONTENT = b"end of burst\n"
BENCH_RULES_FILE = "bench-rules.yaml"
BENCH_RULES = f"""\
# generated by bench/capture.py: the end-of-burst marker of its `run` mode bursts
id: {SENTINEL_RULE}
title: Bench sentinel written
description: bench/capture.py wrote its sentinel file after a burst; the tagged lane is
  processed in order, so every burst event was processed before this alert.
level: informational
status: stable
author: bench/capture.py
detection:
  selection:
    event.action: closed_write
    file.name: {SENTINEL_NAME}
  condition: selection
tests:
  - name: the sentinel fires
    event: {{event.action: closed_write, file.path: /srv/bench/files/{SENTINEL_NAME}}}
    expect: match
  - name: a burst file does not
    event: {{event.action: closed_write, file.path: /srv/bench/files/d000/f0000}}
    expect: no_match
"""

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


def generate(workload: str, root: str, n: int, sentinel: str | None = None) -> int:
    """The burst, then (`run` mode) the sentinel written as the last operation. Prints its
    own start and end (CLOCK_MONOTONIC is system-wide); `end` is the burst's end, before the
    sentinel."""
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
    if sentinel is not None:
        fd = op_open(sentinel, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, SENTINEL_CONTENT)
        op_close(fd)
    info = {"start": began, "end": ended, "start_wall": wall, "files": n}
    if sentinel is not None:
        info["sentinel"] = time.monotonic()
    print(json.dumps(info), flush=True)
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
    """Follows a tool's output file and counts the lines of the workload's event kinds (in
    `run` mode: the sentinel's alert) with bytes.count (cheap: this runs beside the tool;
    exact counting is done after the run)."""

    def __init__(self, path: str, tool: str, actions: tuple[str, ...], mode: str = "") -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - kept open across polls, closed in close()
        self._rest = b""
        if tool == "exfilwatch" and mode == "run":
            self._needles = [SENTINEL_NEEDLE]
        elif tool in ("exfilwatch", "floor"):  # the floor writes exfilwatch's record lines
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
    alerts: dict[str, int] = field(default_factory=dict)  # by rule id, the sentinel's aside
    sentinel_timestamp: str = ""
    missing: list[str] = field(default_factory=list)  # "action path" of the first ten lost


def _missing(seen: dict[str, set[str]], expected: set[str]) -> list[str]:
    """The first (sorted) expected (action, path) pairs that never arrived, at most ten."""
    out: list[str] = []
    for action, got in seen.items():
        out.extend(f"{action} {p}" for p in sorted(expected - got)[: 10 - len(out)])
    return out[:10]


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
            if ev.get("kind") == "alert":
                rule = rec.get("rule", {}).get("id", "?")
                if rule == SENTINEL_RULE:
                    c.sentinel_timestamp = c.sentinel_timestamp or rec.get("@timestamp", "")
                else:
                    c.alerts[rule] = c.alerts.get(rule, 0) + 1
                continue
            action = ev.get("action")
            health = rec.get("exfilwatch", {}).get("health", {})
            if action == "event_loss":
                c.loss_records.append({"reason": ev.get("reason"), **health})
            elif action in ("source_ready", "agent_stopped", "rescan_completed", "source_actions"):
                c.health[action] = health
    c.captured = sum(len(s) for s in seen.values())
    c.missing = _missing(seen, expected)
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
    c.missing = _missing(seen, expected)
    return c


# runs ----------------------------------------------------------------------------------


@dataclass
class Place:
    """One bench directory of --dir: its trees, generated configs and tool output."""

    base: str
    files_root: str
    dirs_root: str
    configs: str
    runs: str

    @classmethod
    def at(cls, path: str) -> Place:
        base = os.path.abspath(path)
        return cls(
            base=base,
            files_root=os.path.join(base, "files"),
            dirs_root=os.path.join(base, "dirs"),
            configs=os.path.join(base, "configs"),
            runs=os.path.join(base, "runs"),
        )

    @property
    def sentinel(self) -> str:
        """The file a `run` mode generator writes last, in the tagged tree."""
        return os.path.join(self.files_root, SENTINEL_NAME)

    @property
    def rules_file(self) -> str:
        """The bench's own rule file (the sentinel rule), beside the generated configs."""
        return os.path.join(self.configs, BENCH_RULES_FILE)


@dataclass
class Context:
    places: list[Place]
    exfilwatch: str
    inotifywait: str
    sysctl: Sysctl
    quiet_seconds: float
    keep_output: bool
    cleanup: Cleanup
    defaults: bool = False  # the shipped defaults for all but `watch` (destinations and all)


def write_bench_rules(ctx: Context, place: Place) -> str:
    """The sentinel rule in `place`'s config dir, validated with the shipped rules (no id
    clash) and its embedded tests run."""
    path = write_private(place.rules_file, BENCH_RULES)
    common.run([ctx.exfilwatch, "rules", "validate", RULES_DIR, path])
    common.run([ctx.exfilwatch, "rules", "test", path])
    return path


def write_config(
    ctx: Context,
    place: Place,
    name: str,
    roots: Sequence[str],
    *,
    mode: str,
    state_dir: str,
    apply_sysctl: bool,
    heartbeat: str | None,
) -> str:
    lines = ["# generated by bench/capture.py", "watch:"]
    for root in roots:
        lines += [f"  - path: {json.dumps(root)}", "    tags: [bench]"]
    lines += ["sinks:", "  - type: stdout"]
    if mode == "run":
        # Alerts (the sentinel's among them) and health (source_ready, source_actions,
        # event_loss, agent_stopped); no events, so the agent asks the kernel only for the
        # actions the rules use.
        lines += ["    records: [alert, health]", "rules:"]
        lines += [f"  - {json.dumps(p)}" for p in (RULES_DIR, place.rules_file)]
    # A fresh, empty state dir per run: no "changed while down" rescan of the previous
    # run's bursts.
    lines.append(f"state_dir: {json.dumps(state_dir)}")
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
    path = os.path.join(place.configs, f"{name}.yaml")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def exfilwatch_argv(ctx: Context, mode: str, config: str, output: str) -> list[str]:
    if mode == "run":  # its stdout sink goes to `output`
        return [ctx.exfilwatch, "run", "--config", config]
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
    state_dir: str | None = None


def launch(
    ctx: Context,
    place: Place,
    tool: str,
    tag: str,
    roots: Sequence[str],
    mode: str = "record",
    **cfg: Any,
) -> Launched:
    """Starts `tool` on `roots` and waits until it watches every directory. This machine may
    be shared with test runs that briefly lower fs.inotify.max_user_watches: a start that
    fails or watches too few directories is retried after a pause."""
    want = sum(_count_dirs(place, r) for r in roots)
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        try:
            run = _launch_once(ctx, place, tool, tag, roots, mode, **cfg)
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


def _count_dirs(place: Place, root: str) -> int:
    """Directories to watch under `root`, itself included (our trees' layouts are known)."""
    if root == place.files_root:
        return 1 + FILE_DIRS
    if root == place.dirs_root:
        return 1 + DIR_COUNT
    return 1 + sum(len(dirs) for _, dirs, _ in os.walk(root))


def _launch_once(
    ctx: Context,
    place: Place,
    tool: str,
    tag: str,
    roots: Sequence[str],
    mode: str,
    **cfg: Any,
) -> Launched:
    output = os.path.join(place.runs, f"{tag}.out")
    errpath = os.path.join(place.runs, f"{tag}.err")
    remove_files(output, errpath)
    state_dir: str | None = None
    if tool == "exfilwatch":
        state_dir = os.path.join(place.runs, f"{tag}.state")
        shutil.rmtree(state_dir, ignore_errors=True)  # fresh and empty: the agent makes it
        config = write_config(ctx, place, tag, roots, mode=mode, state_dir=state_dir, **cfg)
        argv = exfilwatch_argv(ctx, mode, config, output)
        ready_file, needle = output, EXFILWATCH_READY
    elif tool == "floor":
        argv = [PYTHON, FLOOR_SCRIPT, output, *roots]
        ready_file, needle = errpath, INOTIFYWAIT_READY
    else:
        argv = inotifywait_argv(ctx, roots, output)
        ready_file, needle = errpath, INOTIFYWAIT_READY
    to_stdout = tool == "exfilwatch" and mode == "run"
    env = installed_env(place) if tool == "exfilwatch" else None
    with open(errpath, "wb") as errfh, open(output if to_stdout else os.devnull, "wb") as outfh:
        spawned = time.monotonic()
        proc = ctx.cleanup.spawn(argv, stderr=errfh, stdout=outfh, env=env)
    ready = wait_for_text(
        proc, ready_file, needle, tool, errpath, READY_TIMEOUT, READY_POLL_SECONDS
    )
    return Launched(proc, psutil.Process(proc.pid), output, errpath, spawned, ready, state_dir)


def installed_env(place: Place) -> dict[str, str]:
    """The agent's environment as installed: with its bytecode. pip and the package compile
    every module at install time; a checkout run with PYTHONDONTWRITEBYTECODE (as the test
    environment sets it) compiles ~25 of them from source at every start (~85 ms measured).
    The bytecode goes to a cache under the bench's runs directory, not into the tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(place.runs, "pycache")
    return env


def discard(ctx: Context, run: Launched) -> None:
    """A stopped run's output, stderr and state dir, unless --keep-output."""
    if ctx.keep_output:
        return
    remove_files(run.output, run.errpath)
    if run.state_dir is not None:
        shutil.rmtree(run.state_dir, ignore_errors=True)


def source_ready(path: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        for raw in fh:
            if EXFILWATCH_READY in raw:
                health: dict[str, Any] = json.loads(raw)["exfilwatch"]["health"]
                return health
    return {}


@dataclass
class BurstRun:
    place: str
    size: int
    workload: str
    tool: str
    mode: str  # exfilwatch: record or run; inotifywait: ""
    queue: int
    expected: int
    captured: int | None = 0  # run mode: `expected` when complete without loss, else None
    loss: int | None = 0
    extra: int = 0
    loss_reported: bool = False
    loss_detail: str = ""
    missing: list[str] = field(default_factory=list)  # the first lost "action path" pairs
    kept_output: str | None = None  # the output of a run that lost events
    source_counters: dict[str, int] = field(default_factory=dict)  # exfilwatch, at its stop
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
    sentinel: bool | None = None  # run mode: the sentinel's alert arrived
    agent: dict[str, Any] = field(default_factory=dict)


def tool_label(tool: str, mode: str) -> str:
    return f"{tool} {mode}" if mode else tool


def run_burst(
    ctx: Context,
    place: Place,
    tool: str,
    mode: str,
    size: int,
    workload: str,
    queue: int,
    *,
    stall: bool = False,
) -> BurstRun:
    actions = WORKLOAD_ACTIONS[workload]
    run_mode = tool == "exfilwatch" and mode == "run"
    os.sync()  # the previous write burst's dirty pages are not written back during this one
    for attempt in range(1, QUEUE_ATTEMPTS + 1):
        # The kernel fixes an instance's queue size when it is made. Another root process
        # (an agent under test) may raise the sysctl meanwhile: check it after "watching".
        in_effect = ctx.sysctl.set("max_queued_events", queue)
        tag = f"{tool_label(tool, mode).replace(' ', '-')}-{workload}-{size}-q{in_effect}" + (
            "-stalled" if stall else ""
        )
        run = launch(
            ctx,
            place,
            tool,
            tag,
            [place.files_root],
            mode,
            apply_sysctl=queue >= RAISED_QUEUE,
            heartbeat="1h",
        )
        after = ctx.sysctl.read("max_queued_events")
        if after == in_effect or queue >= RAISED_QUEUE or attempt == QUEUE_ATTEMPTS:
            break
        progress(f"  max_queued_events changed to {after:,} while {tool} started: again")
        ctx.cleanup.stop(run.proc, STOP_TIMEOUT)
    res = BurstRun(
        place.base,
        size,
        workload,
        tool,
        mode if tool == "exfilwatch" else "",
        in_effect,
        expected=size * len(actions),
        stalled=stall,
    )
    res.load1 = round(os.getloadavg()[0], 2)
    if after != in_effect:
        res.queue_note = f"sysctl was {after:,} when watching"
    cpu0 = cpu_seconds(run.ps)
    tail = OutputTail(run.output, tool, actions, res.mode)
    tail.poll()
    base = tail.count
    target = 1 if run_mode else res.expected  # run mode: the sentinel's alert
    if stall:
        run.proc.send_signal(signal.SIGSTOP)
    gen_argv = [PYTHON, os.path.abspath(__file__), "_generate", workload, place.files_root]
    gen_argv += [str(size), *([place.sentinel] if run_mode else [])]
    gen = ctx.cleanup.spawn(gen_argv, stdout=subprocess.PIPE)
    if stall:  # the tool sleeps through the whole burst, then catches up
        gen.wait()
        time.sleep(STALL_EXTRA_SECONDS)
        run.proc.send_signal(signal.SIGCONT)
    launched = time.monotonic()
    deadline = launched + 60 + size / 500
    last_arrival: float | None = None
    complete_at: float | None = None
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
        if tail.count - base >= target:
            done, complete_at = "complete", now
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
    if run_mode:  # the tree keeps its 100,000 files (the agent's file watch budget)
        remove_files(place.sentinel)

    expected = set(workload_paths(place.files_root, size))
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
            k: stopped.get(k) for k in ("drained", "unwritten", "dropped_total", "processed")
        }
        lanes = stopped.get("lanes") or {}
        res.agent["queue_high_water"] = stopped.get("queue_high_water") or max(
            (lane.get("high_water") or 0 for lane in lanes.values()), default=None
        )
        res.agent["event_loss"] = res.loss_reported
        res.agent["watches"] = counted.health.get("source_ready", {}).get("watches")
        acts = counted.health.get("source_actions", {})
        res.agent["source_actions"] = {k: acts.get(k) for k in ("actions", "left_out")}
        if counted.alerts:
            res.agent["alerts"] = counted.alerts
        if "rescan_completed" in counted.health:
            res.agent["rescan"] = counted.health["rescan_completed"]
        stamp = counted.sentinel_timestamp if run_mode else counted.last_timestamp
        if stamp:
            res.read_s = round(epoch(stamp) - gen_info["start_wall"], 3)
    elif tool == "floor":
        counted = count_exfilwatch(run.output, expected, actions)
    else:
        counted = count_inotifywait(run.output, expected, actions)
        stderr_after = tail_text(run.errpath).lower()
        res.loss_reported = counted.overflow_lines > 0 or "overflow" in stderr_after
        if res.loss_reported:
            res.loss_detail = f"Q_OVERFLOW lines={counted.overflow_lines}"
    res.burst_s = round(gen_info["end"] - gen_info["start"], 3)
    if res.burst_s > 0:
        res.generator_files_per_s = round(size / res.burst_s)
    if run_mode:
        # No event lines: complete = the sentinel's alert arrived (every burst event was
        # processed before it, in the tagged lane) and no event_loss record was written.
        res.sentinel = bool(counted.sentinel_timestamp)
        ok = res.sentinel and not res.loss_reported
        res.captured = res.expected if ok else None
        res.loss = 0 if ok else None
        if complete_at is not None:
            elapsed = complete_at - gen_info["start"]
            res.elapsed_s = round(elapsed, 3)
            res.drain_s = round(complete_at - gen_info["end"], 3)
            res.events_per_s = round(res.expected / elapsed) if elapsed > 0 else 0.0
    else:
        res.captured = counted.captured
        res.extra = counted.extra
        res.loss = res.expected - counted.captured
        if res.loss:
            # What was lost, and the tool's own output kept beside the runs (whatever
            # --keep-output says): a loss must be explainable afterwards.
            res.missing = counted.missing
            stopped_at = counted.health.get("agent_stopped", {})
            res.source_counters = stopped_at.get("source_counters") or {}
            kept = f"{run.output}.lost-{int(time.time())}"
            shutil.copyfile(run.output, kept)
            if os.path.exists(run.errpath):
                shutil.copyfile(run.errpath, kept + ".err")
            res.kept_output = kept
        if last_arrival is not None:
            elapsed = last_arrival - gen_info["start"]
            res.elapsed_s = round(elapsed, 3)
            res.drain_s = round(last_arrival - gen_info["end"], 3)
            arrived = min(counted.captured, res.captured_at_done)
            res.events_per_s = round(arrived / elapsed) if elapsed > 0 else 0.0
    discard(ctx, run)
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
    ctx: Context,
    modes: Sequence[str],
    sizes: Sequence[int],
    workloads: Sequence[str],
    repeat: int,
    default_q: bool,
    floor: bool = False,
) -> list[BurstRun]:
    """Per size, workload and repeat, each place in turn (so a drift in the machine's load
    hits every place alike): exfilwatch in each mode, inotifywait once (and the floor)."""
    ew = [("exfilwatch", m) for m in modes]
    iw = [("inotifywait", "")]
    plan = [(t, m, RAISED_QUEUE, False) for t, m in ew + iw]
    if floor:
        plan.append(("floor", "", RAISED_QUEUE, False))
    if default_q:
        plan += [(t, m, DEFAULT_QUEUE, False) for t, m in iw + ew]
    stalls = [(t, m, DEFAULT_QUEUE, True) for t, m in iw + ew]
    out: list[BurstRun] = []
    for size in sizes:
        for workload in workloads:
            for rep in range(repeat):
                for place in ctx.places:
                    # The stalled runs are about who reports loss, not speed: once is enough.
                    for tool, mode, queue, stall in plan + (
                        stalls if default_q and rep == 0 else []
                    ):
                        progress(
                            f"burst {workload} {size:,} files in {place.base}: "
                            f"{tool_label(tool, mode)}, max_queued_events {queue:,}"
                            + (", stalled (SIGSTOP) during the burst" if stall else "")
                        )
                        r = run_burst(ctx, place, tool, mode, size, workload, queue, stall=stall)
                        captured = "-" if r.captured is None else f"{r.captured:,}"
                        loss = "?" if r.loss is None else f"{r.loss:,}"
                        progress(
                            f"  captured {captured}/{r.expected:,} (loss {loss}, "
                            f"reported {'yes' if r.loss_reported else 'no'}"
                            + (
                                f", sentinel {'yes' if r.sentinel else 'no'}"
                                if r.mode == "run"
                                else ""
                            )
                            + f"), elapsed {r.elapsed_s} s, burst {r.burst_s} s, "
                            f"{r.events_per_s:,.0f} ev/s, CPU {r.cpu_s} s, {r.done}"
                            + (f", repeat {rep + 1}" if repeat > 1 else "")
                        )
                        if r.missing:
                            progress(
                                f"  LOST (first {len(r.missing)}): {'; '.join(r.missing)}; "
                                f"output kept in {r.kept_output}"
                                + (
                                    f"; source at stop: {r.source_counters}"
                                    if r.source_counters
                                    else ""
                                )
                            )
                        out.append(r)
    return out


def _pick(
    runs: Sequence[BurstRun],
    tool: str,
    mode: str,
    *,
    raised: bool,
    stalled: bool = False,
) -> list[BurstRun]:
    return [
        r
        for r in runs
        if r.tool == tool
        and r.mode == mode
        and (r.queue >= RAISED_QUEUE) == raised
        and r.stalled == stalled
    ]


def _captured_pct(runs: Sequence[BurstRun]) -> float | None:
    """The worst run's captured %; None when a run's count is unknown (run mode, no sentinel
    or a loss record)."""
    if any(r.captured is None for r in runs):
        return None
    return round(100 * min(r.captured or 0 for r in runs) / runs[0].expected, 3)


def _worst_loss(runs: Sequence[BurstRun]) -> int | None:
    losses = [r.loss for r in runs]
    return None if any(x is None for x in losses) else max(x or 0 for x in losses)


def _by_burst(
    runs: Sequence[BurstRun],
) -> list[tuple[tuple[str, int, str], list[BurstRun]]]:
    """The runs grouped by place, size and workload, in the order they ran."""
    keys = list(dict.fromkeys((r.place, r.size, r.workload) for r in runs))
    return [(k, [r for r in runs if (r.place, r.size, r.workload) == k]) for k in keys]


def compare(runs: Sequence[BurstRun], modes: Sequence[str]) -> list[dict[str, Any]]:
    """Per place, size, workload and mode: exfilwatch / inotifywait of the same place on the
    raised queue (medians)."""
    out: list[dict[str, Any]] = []
    for (place, size, workload), here in _by_burst(runs):
        iw = _pick(here, "inotifywait", "", raised=True)
        iw_def = _pick(here, "inotifywait", "", raised=False)
        iw_stall = _pick(here, "inotifywait", "", raised=False, stalled=True)
        for mode in modes:
            ew = _pick(here, "exfilwatch", mode, raised=True)
            ew_def = _pick(here, "exfilwatch", mode, raised=False)
            ew_stall = _pick(here, "exfilwatch", mode, raised=False, stalled=True)
            row: dict[str, Any] = {
                "place": place,
                "size": size,
                "workload": workload,
                "mode": mode,
            }
            if ew and iw:
                ew_rate = statistics.median(r.events_per_s for r in ew)
                iw_rate = statistics.median(r.events_per_s for r in iw)
                ew_cpu = statistics.median(r.cpu_s for r in ew)
                iw_cpu = statistics.median(r.cpu_s for r in iw)
                row["rate_ratio"] = round(ew_rate / iw_rate, 3) if iw_rate else None
                row["cpu_ratio"] = round(ew_cpu / iw_cpu, 2) if iw_cpu else None
                row["exfilwatch_captured_pct"] = _captured_pct(ew)
                row["inotifywait_captured_pct"] = _captured_pct(iw)
                row["goal_capture_100"] = all(r.loss == 0 for r in ew)
                min_rate, max_cpu = GOALS[mode]
                row["goal"] = f"ratio>={min_rate:g}" + (
                    f", CPU<={max_cpu:g}" if max_cpu is not None else ""
                )
                row["goal_met"] = (row["rate_ratio"] or 0) >= min_rate and (
                    max_cpu is None
                    or (row["cpu_ratio"] is not None and row["cpu_ratio"] <= max_cpu)
                )
            if iw_def:
                row["inotifywait_default_loss"] = _worst_loss(iw_def)
                row["inotifywait_default_reported"] = any(r.loss_reported for r in iw_def)
            if ew_def:
                row["exfilwatch_default_loss"] = _worst_loss(ew_def)
                row["exfilwatch_default_reported"] = any(r.loss_reported for r in ew_def)
                row["goal_loss_reported"] = all(r.loss == 0 or r.loss_reported for r in ew_def)
            if iw_stall:
                row["inotifywait_stalled_loss"] = _worst_loss(iw_stall)
                row["inotifywait_stalled_reported"] = any(r.loss_reported for r in iw_stall)
            if ew_stall:
                row["exfilwatch_stalled_loss"] = _worst_loss(ew_stall)
                row["exfilwatch_stalled_reported"] = any(r.loss_reported for r in ew_stall)
            out.append(row)
    return out


def compare_floor(runs: Sequence[BurstRun]) -> list[dict[str, Any]]:
    """Per place, size and workload: the floor / inotifywait, and exfilwatch record / the
    floor (medians, raised queue): how much is Python's, how much exfilwatch's own."""
    out: list[dict[str, Any]] = []
    for (place, size, workload), here in _by_burst(runs):
        fl = _pick(here, "floor", "", raised=True)
        iw = _pick(here, "inotifywait", "", raised=True)
        ew = _pick(here, "exfilwatch", "record", raised=True)
        if not fl:
            continue

        def rate(rs: Sequence[BurstRun]) -> float:
            return float(statistics.median(r.events_per_s for r in rs))

        def cpu(rs: Sequence[BurstRun]) -> float:
            return float(statistics.median(r.cpu_s or 0.0 for r in rs))

        row: dict[str, Any] = {
            "place": place,
            "size": size,
            "workload": workload,
            "floor_captured_pct": _captured_pct(fl),
        }
        if iw and rate(iw) and cpu(iw):
            row["floor_rate_ratio"] = round(rate(fl) / rate(iw), 3)
            row["floor_cpu_ratio"] = round(cpu(fl) / cpu(iw), 2)
        if ew and rate(fl) and cpu(fl):
            row["exfilwatch_vs_floor_rate"] = round(rate(ew) / rate(fl), 3)
            row["exfilwatch_vs_floor_cpu"] = round(cpu(ew) / cpu(fl), 2)
        out.append(row)
    return out


def reference_place(places: Sequence[str]) -> str:
    """The place the others are compared with: the first one not under /tmp (/srv in
    ``--dir /srv/capb,/tmp/capb``), else the first."""
    return next((p for p in places if not (p + "/").startswith("/tmp/")), places[0])


def compare_places(comparison: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per other place, mode, workload and size: its events/s ratio / the reference place's
    (goal >= 0.8: within 20%)."""
    places = list(dict.fromkeys(c["place"] for c in comparison))
    if len(places) < 2:
        return []
    ref = reference_place(places)
    at = {
        (c["place"], c["mode"], c["workload"], c["size"]): c.get("rate_ratio") for c in comparison
    }
    out: list[dict[str, Any]] = []
    for place in places:
        if place == ref:
            continue
        for (p, mode, workload, size), value in at.items():
            if p != place:
                continue
            base = at.get((ref, mode, workload, size))
            r = round(value / base, 3) if value is not None and base else None
            out.append(
                {
                    "place": place,
                    "reference": ref,
                    "mode": mode,
                    "workload": workload,
                    "size": size,
                    "ratio": r,
                    "goal_within_20pct": r is not None and r >= PLACE_GOAL,
                }
            )
    return out


def run_startup(ctx: Context, place: Place, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"exfilwatch": [], "inotifywait": []}
    # One start not measured: it writes the bytecode cache an installed agent has already.
    warm = launch(
        ctx,
        place,
        "exfilwatch",
        "startup-warmup",
        [place.dirs_root],
        apply_sysctl=True,
        heartbeat="1h",
    )
    ctx.cleanup.stop(warm.proc, STOP_TIMEOUT)
    discard(ctx, warm)
    for rep in range(repeats):
        for tool in ("exfilwatch", "inotifywait"):
            run = launch(
                ctx,
                place,
                tool,
                f"startup-{tool}",
                [place.dirs_root],
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
            discard(ctx, run)
            progress(f"start-up {tool} ({rep + 1}/{repeats}): {entry}")
            runs[tool].append(entry)
    result: dict[str, Any] = {"tree": place.dirs_root, "directories": DIR_COUNT, "runs": runs}
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


def run_idle(ctx: Context, place: Place, seconds: float) -> dict[str, Any]:
    roots = [place.files_root, place.dirs_root]
    ctx.sysctl.set("max_queued_events", RAISED_QUEUE)
    ew = launch(
        ctx, place, "exfilwatch", "idle-exfilwatch", roots, apply_sysctl=True, heartbeat=None
    )
    iw = launch(ctx, place, "inotifywait", "idle-inotifywait", roots)
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
    result["goal_idle_0_2_pct"] = result["exfilwatch"]["pct_of_one_core"] <= 0.2
    for r in procs.values():
        ctx.cleanup.stop(r.proc, STOP_TIMEOUT)
        discard(ctx, r)
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
        print(
            "\nBursts (each tool alone; queue = fs.inotify.max_queued_events; run mode: "
            "captured = expected when the sentinel's alert arrived with no event_loss)\n"
        )
        rows = [
            [
                b["place"],
                b["size"],
                b["workload"],
                tool_label(b["tool"], b["mode"]) + (" stalled" if b["stalled"] else ""),
                _queue(b["queue"]),
                b["expected"],
                b["captured"],
                "?" if b["loss"] is None else b["loss"],
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
                    "place",
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
        ew_runs = [b for b in bursts if b["tool"] == "exfilwatch"]
        print("\nexfilwatch source actions (the source_actions health record), per mode:")
        for mode in dict.fromkeys(b["mode"] for b in ew_runs):
            acts = next(
                b["agent"].get("source_actions") or {} for b in ew_runs if b["mode"] == mode
            )
            print(
                f"  {mode}: actions {_listed(acts.get('actions'))}; "
                f"left out {_listed(acts.get('left_out'))}"
            )
        print("\nexfilwatch loss records and pipeline stats (agent_stopped):")
        for b in ew_runs:
            a = b["agent"]
            line = (
                f"  {b['place']} {b['mode']} {b['workload']} {b['size']:,} "
                f"q={_queue(b['queue'])}{' stalled' if b['stalled'] else ''}: "
                f"processed {cell(a.get('processed'))}, dropped_total "
                f"{cell(a.get('dropped_total'))}, event_loss {cell(a.get('event_loss'))}"
            )
            if b["mode"] == "run":
                line += f", sentinel {cell(b['sentinel'])}"
            if a.get("alerts"):
                line += f", alerts {a['alerts']}"
            if b["loss_detail"]:
                line += f"; {b['loss_detail']}"
            others = {
                k: v
                for k, v in a.items()
                if k not in ("processed", "dropped_total", "event_loss", "alerts", "source_actions")
            }
            print(f"{line}; {others}")
        for b in bursts:
            if b["queue_note"]:
                print(
                    f"* {b['place']} {tool_label(b['tool'], b['mode'])} {b['workload']} "
                    f"{b['size']:,}: {b['queue_note']}"
                )
        print(
            "\nComparison (exfilwatch / inotifywait of the same place, both at queue 1M; medians)\n"
        )
        crow = [
            [
                c["place"],
                c["size"],
                c["workload"],
                c["mode"],
                c.get("rate_ratio"),
                c.get("cpu_ratio"),
                c.get("exfilwatch_captured_pct"),
                c.get("inotifywait_captured_pct"),
                c.get("goal_capture_100"),
                c.get("goal"),
                c.get("goal_met"),
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
                    "place",
                    "files",
                    "load",
                    "mode",
                    "events/s ratio",
                    "CPU ratio",
                    "ew captured %",
                    "iw captured %",
                    "100% goal",
                    "goal",
                    "met",
                    "iw loss @16384 (reported)",
                    "ew loss @16384 (reported)",
                    "iw stalled",
                    "ew stalled",
                ],
                crow,
            )
        )
        places = results.get("place_comparison") or []
        if places:
            print(
                f"\nPlaces: events/s ratio at a place / the same at {places[0]['reference']} "
                f"(goal >= {PLACE_GOAL:g}: within 20%)\n"
            )
            groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
            for p in places:
                groups.setdefault((p["place"], p["mode"], p["workload"]), []).append(p)
            for (place, mode, workload), ps in groups.items():
                print(
                    f"  {place} vs {ps[0]['reference']}, {mode} {workload}: "
                    + ", ".join(
                        f"{p['size']:,} files {cell(p['ratio'])} "
                        f"({'yes' if p['goal_within_20pct'] else 'no'})"
                        for p in ps
                    )
                )
    floor = results.get("floor")
    if floor:
        print(
            "\nFloor (bench/floor.py: read, one lstat per path, exfilwatch's record line per "
            "event encoded by msgspec, one write per read; medians at queue 1M)\n"
        )
        frows = [
            [
                f["place"],
                f["size"],
                f["workload"],
                f.get("floor_captured_pct"),
                f.get("floor_rate_ratio"),
                f.get("floor_cpu_ratio"),
                f.get("exfilwatch_vs_floor_rate"),
                f.get("exfilwatch_vs_floor_cpu"),
            ]
            for f in floor
        ]
        print(
            table(
                [
                    "place",
                    "files",
                    "load",
                    "floor captured %",
                    "floor/iw events/s",
                    "floor/iw CPU",
                    "ew record/floor events/s",
                    "ew record/floor CPU",
                ],
                frows,
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
        print(f"goal exfilwatch <= 0.2% of one core: {cell(idle['goal_idle_0_2_pct'])}")


def _loss(c: dict[str, Any], tool: str, case: str = "default") -> str:
    """Loss (reported?); "?" when the count is unknown (run mode: an event_loss record or
    no sentinel), "-" when there was no such run."""
    key = f"{tool}_{case}_loss"
    if key not in c:
        return "-"
    loss = c[key]
    shown = "?" if loss is None else f"{loss:,}"
    return f"{shown} ({'yes' if c.get(f'{tool}_{case}_reported') else 'no'})"


def _listed(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(str(x) for x in v) or "none"
    return cell(v)


# main ----------------------------------------------------------------------------------


EPILOG = """\
choices:
  each tool runs alone, started and "watching" before the burst; the burst is a separate
  process rewriting files in place without truncating (OPEN, MODIFY, CLOSE_WRITE) or
  reading them (OPEN, CLOSE_NOWRITE); inotifywait's directory (ISDIR) events are not
  counted, exfilwatch does not report listings; captured = distinct (path, action) pairs;
  elapsed = generator start to the last event line's arrival (10 ms polls); CPU = the
  tool's user+system seconds from "watching" to "done"; the ratios are exfilwatch /
  inotifywait of the same place with max_queued_events 1,048,576; runs at the kernel
  default 16,384 (exfilwatch with inotify.apply_sysctl: false) show which tool reports its
  loss; trees under each --dir are built once and kept; kernel settings are restored at
  exit.
modes:
  record = exfilwatch record (every event a JSON line); run = exfilwatch run with the shipped
  rules and a bench rule on a sentinel file the generator writes last: the run is complete
  when the sentinel's alert arrives, events/s = the burst's inotify events / elapsed, and
  captured % = 100 when the alert arrived with no event_loss record. Every exfilwatch run
  has a fresh state_dir (no downtime rescan). Goals: record ratio >= 0.8 and CPU ratio <= 3,
  run ratio >= 0.6; another place's ratio / the reference place's (the first not under
  /tmp) >= 0.8.
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
    p.add_argument(
        "--dir",
        default=DEFAULT_DIR,
        help="bench directories, comma-separated (e.g. /srv/capb,/tmp/capb): trees are built "
        "and kept in each, and every burst runs in each (a `place`)",
    )
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="exfilwatch modes: record (every event a JSON line), run (shipped rules, alerts "
        "and health only), or both",
    )
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
    p.add_argument(
        "--floor",
        action="store_true",
        help="also run bench/floor.py in every burst: the least CPython can do for a record "
        "line per event",
    )
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
        if len(args_list) not in (4, 5):
            print("usage: capture.py _generate write|read TREE N [SENTINEL]", file=sys.stderr)
            return 2
        sentinel = args_list[4] if len(args_list) == 5 else None
        return generate(args_list[1], args_list[2], int(args_list[3]), sentinel)
    args = _parser().parse_args(args_list)
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    idle_seconds = 20.0 if args.quick else args.idle_seconds
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    dirs = list(dict.fromkeys(os.path.abspath(d.strip()) for d in args.dir.split(",") if d.strip()))
    bad = [w for w in workloads if w not in WORKLOAD_ACTIONS] + [m for m in modes if m not in MODES]
    if bad or not modes or not dirs or any(not 0 < s <= MAX_FILES for s in sizes):
        print(
            f"workloads are write,read; modes record,run; sizes 1..{MAX_FILES}; "
            "--dir one or more directories",
            file=sys.stderr,
        )
        return 2
    exfilwatch = shutil.which(args.exfilwatch)
    inotifywait = shutil.which(args.inotifywait)
    if exfilwatch is None or inotifywait is None:
        print("exfilwatch and inotifywait must be installed", file=sys.stderr)
        return 2
    sysctl = Sysctl()
    if not sysctl.writable:
        progress("not root: kernel settings stay as they are; default-queue runs are skipped")
    ctx = Context(
        places=[Place.at(d) for d in dirs],
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
            for place in ctx.places:
                for d in (place.configs, place.runs):
                    os.makedirs(d, exist_ok=True)
            if sysctl.read("max_user_watches") < MIN_WATCHES:
                sysctl.set("max_user_watches", MIN_WATCHES)
            results["kernel_at_start"] = {
                n: sysctl.read(n) for n in ("max_queued_events", "max_user_watches")
            }
            results["trees"] = {}
            for place in ctx.places:
                progress(f"trees under {place.base} (built once, reused)")
                results["trees"][place.base] = {
                    "files": ensure_file_tree(place.files_root),
                    "dirs": ensure_dir_tree(place.dirs_root),
                }
                progress(f"trees: {results['trees'][place.base]}")
            if not args.skip_bursts:
                if "run" in modes:
                    for place in ctx.places:
                        progress(f"bench rule (sentinel): {write_bench_rules(ctx, place)} ok")
                for place in ctx.places:
                    remove_files(place.sentinel)  # left by an interrupted run
                    took = warm_up(place.files_root)
                    progress(f"warm-up read of {MAX_FILES:,} files in {place.base}: {took:.1f} s")
                default_q = not args.skip_default_queue and sysctl.writable
                runs = run_bursts(
                    ctx, modes, sizes, workloads, args.repeat, default_q, floor=args.floor
                )
                results["bursts"] = [asdict(r) for r in runs]
                results["comparison"] = compare(runs, modes)
                if args.floor:
                    results["floor"] = compare_floor(runs)
                results["place_comparison"] = compare_places(results["comparison"])
            # Start-up and idle: exfilwatch in record mode, in the first place.
            if not args.skip_startup:
                results["startup"] = run_startup(ctx, ctx.places[0], args.startup_repeats)
            if not args.skip_idle:
                results["idle"] = run_idle(ctx, ctx.places[0], idle_seconds)
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
