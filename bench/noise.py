"""Noise benchmark: does the agent still count, and alert on, a tagged exfiltration while
another user floods /tmp?

Usage, as root (a storm user, a loop-mounted "USB stick" under /media, a home under /home),
with the interpreter of the environment exfilwatch is installed in (``.venv/bin/python`` in a
checkout; the ``exfilwatch`` command next to it is the one measured)::

    python bench/noise.py --quick              # 20,000 storm files, 30 archives: ~1 minute
    python bench/noise.py                      # 100,000 files, 150 archives: ~2 minutes
    python bench/noise.py --json r.json        # tables, and the results as JSON in r.json
    python bench/noise.py --storm-only         # only the storm, until Ctrl-C / SIGTERM
    python bench/noise.py --storm-only --seconds 600   # e.g. beside a test run

Progress goes to stderr, the tables to stdout. Not root: the storm runs as yourself, there is
no removable medium (no copy action), and the trees go under your home; each is said.

Scenario (run twice: "quiet", then "storm"; each with a fresh tree, agent, medium and home)
    A tagged tree (``--dir``/rnd, tags [rnd], sensitivity high, 550 files of 1-8 KiB with
    unique content: usbset/ 100, archset/ 50, delset/ 300, misc/ 100). The agent runs as
    ``exfilwatch run --config FILE`` with the shipped rules (``rules: [<checkout>/rules]``),
    ``locations`` and ``processes`` enabled, heartbeat 5 s, and one file sink taking alert,
    health and event records, written under ``--dir``/out (not watched: /var/tmp would be).
    A home /home/noisebench-user with a hidden ~/.stash exists before the agent starts. Once
    the agent is ready (``source_ready`` and ``lineage_index_built``), a 64 MiB ext4 image is
    loop-mounted at /media/noisebench/USB (the agent finds it in the mount table: the time
    to its ``media_mounted`` record is reported), and ``inotifywait -m -r`` watches the mount
    as the baseline. In the storm run the storm starts ``--lead`` (10) seconds before the
    actions and is still running during them. The actions, as root, 2 s apart, each timed:
        copy      cp -r rnd/usbset /media/noisebench/USB/grab-RUN   (a new directory of 100
                  files: the agent has to watch it before cp writes into it; the hardest case)
        archive   tar czf /home/noisebench-user/.stash/pack-RUN.tgz -C rnd archset   (50 files)
        delete    rm -f of the 300 files of rnd/delset
    Then it waits (``--deadline`` seconds after the last action) for the alerts that prove
    each action was seen: exfil-removable-bulk-copy, exfil-archive-of-tagged,
    destroy-mass-delete (rules/exfiltration.yaml, rules/destruction.yaml).

Storm (another user, ``exfilwatch-noise``, created when root and removed at the end; each
part a separate process that drops to that user and paces its work over ``--storm-seconds``,
then stops by itself; 25 s with ``--quick``, 40 s otherwise), in its own directory
/tmp/exfilwatch-noise-*:
    files     ``--files`` (100,000) small files written and deleted, 500 at a time, over 8
              directories (each: created, opened, modified, closed_write, deleted)
    archives  ``--archives`` (150) copies of a tar.gz of one 1 GiB zero-filled file (1 MB
              compressed; built once into ``--cache``): archives landing in /tmp are what the
              agent lists, each up to a 1 GiB decompression
    build     ``--units`` (20,000) compile units: ``.o.tmp`` written and renamed to ``.o``,
              a ``.d`` written, a ``.tmp`` written and deleted; older units deleted
``--storm-only`` runs the three parts in a loop until ``--seconds`` or a signal, then cleans
up (its files, its directory, the user).

Numbers (one row per run, and a storm / quiet ratio row)
    copies     ``alert``: the largest exfilwatch.correlation.count (distinct files) of the
               exfil-removable-bulk-copy alerts (the rule fires at 20 and is then suppressed
               for 15 minutes, so 20 is its ceiling); ``lineage``: distinct files under the
               copy's directory with an event carrying exfilwatch.lineage.origin_path (goal
               100/100); ``seen``: those with any event at all; ``iw``: distinct CLOSE_WRITE
               paths inotifywait reported (the baseline, same race)
    latency    per alert: its arrival in the output file (a thread tails the file and stamps
               lines as they appear, every 20 ms) minus the start of the action it belongs
               to (and minus its end); p50 / p99 over the alerts the actions are expected to
               raise (goal p99 <= 2 s); other alerts are listed, not timed. ``read``: the
               alert's @timestamp (when the agent's reader read the triggering event) minus
               the action's start; ``created``: the
               same with event.created, when alerts carry it
    copy lag   the arrival of the last copy event line (agent) and of the last CLOSE_WRITE
               line (inotifywait), from the start of cp; ``lag ratio`` = agent / inotifywait
    tagged lost  measured: of the 450 tagged events the actions must cause (300 deleted, 150
               closed_nowrite by cp and tar), those missing from the output; reported: the
               sum of ``event_loss`` records for the tagged lane
    shed       ``event_loss`` records for the staging (and egress) lanes, summed; every
               event_loss record is listed by reason, lane, location class and count, and
               records with reasons this bench does not know are printed as they are.
               ``enrich skipped``: events that went on without content checks
               (``enrichment_skipped`` records, not counting those at shutdown)
    CPU        the agent's user+system seconds (psutil, before SIGTERM), and % of one core
               over its whole run and over the action window (first action to end of wait)
    RSS        peak resident set: sampled every 0.25 s, and VmHWM at the end
    baselines  ``cp s`` the time cp took; ``spin ms`` a fixed Python loop timed just before
               the actions (how contended the CPU was); ``load1`` at the actions

The machine is noisy: compare the storm run with the quiet run of the same invocation, and
the agent with inotifywait in the same run, rather than absolute numbers.

Standard library and psutil only (and mkfs.ext4, losetup, mount, tar, cp, inotifywait).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import psutil
from common import (
    MB,
    PYTHON,
    RULES_DIR,
    AgentProcess,
    BenchError,
    Cleanup,
    Sampler,
    code_version,
    cpu_seconds,
    emit,
    ensure_user,
    epoch,
    exfilwatch_command,
    indent,
    interruptible,
    machine,
    peak_rss_bytes,
    percentile,
    print_header,
    progress,
    ratio,
    remove_user,
    run,
    table,
    tail_text,
    wait_for_text,
    write_private,
)

from agent.sources.base import LANE_OF

IS_ROOT = os.geteuid() == 0
STORM_USER = "exfilwatch-noise"
ROOT_DIR = "/srv/noise-bench"
ROOT_CACHE = "/var/cache/exfilwatch-bench-noise"
HOME = "/home/noisebench-user"
MEDIA_PARENT = "/media/noisebench"
MEDIA = f"{MEDIA_PARENT}/USB"
IMAGE_MB = 64
GIB = 1 << 30
ARCHIVE_NAME = "gib-zeros.tar.gz"
TREE_SETS = (("usbset", 100), ("archset", 50), ("delset", 300), ("misc", 100))
EXTENSIONS = ("v", "sv", "c", "h", "py", "md")
COPY_FILES = 100
DELETE_FILES = 300
ACTION_GAP_S = 2.0
GRACE_S = 2.0
TAIL_POLL_S = 0.02
READY_TIMEOUT_S = 120.0
INDEX_TIMEOUT_S = 60.0
MOUNT_TIMEOUT_S = 10.0
GOAL_P99_S = 2.0

# Which action each rule's alert is evidence of; the first rule of each is the one waited for.
ACTION_RULES: dict[str, tuple[str, ...]] = {
    "copy": (
        "exfil-removable-bulk-copy",
        "exfil-removable-tagged-copy",
        "exfil-removable-crown-jewel",
        "exfil-egress-copy",
        "exfil-read-then-egress",
    ),
    "archive": (
        "exfil-archive-of-tagged",
        "exfil-staging-tagged-copy",
        "exfil-packing-tool-on-tagged",
    ),
    "delete": ("destroy-mass-delete", "destroy-tagged-delete"),
}
RULE_ACTION = {rule: action for action, rules in ACTION_RULES.items() for rule in rules}
# event_loss reasons this bench knows; anything else is printed as it came.
KNOWN_LOSS = frozenset(
    {
        "queue_full",
        "inotify_overflow",
        "fanotify_overflow",
        "stopped_with_backlog",
        "vanished_before_watch",
        "sink_backlog_full",
    }
)
COUNT_KEYS = ("count", "dropped", "lost", "shed", "events", "unwritten", "overflows")
# Health records that are the agent's routine, not a finding.
ROUTINE = frozenset(
    {
        "agent_started",
        "agent_stopped",
        "heartbeat",
        "source_selected",
        "source_ready",
        "rules_loaded",
        "lineage_index_built",
        "destinations_watched",
        "kernel_settings_applied",
        "marker_loaded",
    }
)


# the storm (worker side: a separate process per part) ------------------------------------

_STOP = threading.Event()
_DEADLINE = [0.0]  # wall time at which the worker stops (0: none)


def _on_stop(signum: int, frame: FrameType | None) -> None:
    _STOP.set()


def _pace(t0: float, k: int, total: int, seconds: float) -> None:
    """Waits until step `k` of `total` is due, spreading the steps over `seconds`; sets the
    stop flag when the deadline has passed."""
    delay = t0 + seconds * k / max(1, total) - time.monotonic()
    if _DEADLINE[0]:
        left = _DEADLINE[0] - time.time()
        if left <= 0:
            _STOP.set()
            return
        delay = min(delay, left)
    if delay > 0:
        _STOP.wait(delay)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _unlink(paths: Sequence[str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def storm_files(base: str, count: int, seconds: float, rnd: random.Random) -> dict[str, int]:
    dirs = [os.path.join(base, "files", f"d{i}") for i in range(8)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    payload = rnd.randbytes(1024)
    batch = 500
    batches = -(-count // batch)
    t0 = time.monotonic()
    done = 0
    for b in range(batches):
        _pace(t0, b, batches, seconds)
        if _STOP.is_set():
            break
        made = []
        try:
            for j in range(min(batch, count - done)):
                p = f"{dirs[j % len(dirs)]}/n{b:04d}_{j:03d}.dat"
                _write(p, payload[: 32 + (j * 37) % 900])
                made.append(p)
        finally:
            _unlink(made)
        done += len(made)
    return {"files": done}


def storm_archives(
    base: str, count: int, seconds: float, cache: str, rnd_round: int
) -> dict[str, int]:
    dl = os.path.join(base, "downloads")
    os.makedirs(dl, exist_ok=True)
    t0 = time.monotonic()
    kept: list[str] = []
    try:
        for i in range(count):
            _pace(t0, i, count, seconds)
            if _STOP.is_set():
                break
            dst = f"{dl}/bundle-{rnd_round:03d}-{i:03d}.tar.gz"
            shutil.copyfile(cache, dst)
            kept.append(dst)
    finally:
        _unlink(kept)  # the round's archives go at its end: /tmp stays bounded across rounds
    return {"archives": len(kept)}


def storm_build(base: str, units: int, seconds: float, rnd: random.Random) -> dict[str, int]:
    objdirs = [os.path.join(base, "build", "obj", f"m{k}") for k in range(4)]
    for d in objdirs:
        os.makedirs(d, exist_ok=True)
    obj = rnd.randbytes(16 * 1024)
    step = 50
    steps = -(-units // step)
    live: deque[str] = deque()
    t0 = time.monotonic()
    done = 0
    try:
        for s in range(steps):
            _pace(t0, s, steps, seconds)
            if _STOP.is_set():
                break
            for i in range(s * step, min(units, (s + 1) * step)):
                stem = f"{objdirs[i % len(objdirs)]}/unit{i:05d}"
                _write(stem + ".o.tmp", obj[: 4096 + (i * 131) % 12000])
                os.rename(stem + ".o.tmp", stem + ".o")
                _write(stem + ".d", f"{stem}.o: {stem}.c common.h\n".encode())
                _write(stem + ".tmp", b"cc1 scratch\n")
                os.unlink(stem + ".tmp")
                live.append(stem)
                while len(live) > 200:  # a rebuild replaces old objects
                    old = live.popleft()
                    _unlink([old + ".o", old + ".d"])
                done += 1
    finally:
        _unlink([f"{stem}{ext}" for stem in live for ext in (".o", ".d")])
    return {"units": done, "files_written": done * 3}


def storm_worker(argv: Sequence[str]) -> int:
    """``noise.py _storm PART ...``: one part of the storm, as the storm user when started as
    root (it drops privileges before touching anything), until done, a deadline or SIGTERM."""
    ap = argparse.ArgumentParser(prog="noise.py _storm")
    ap.add_argument("part", choices=("files", "archives", "build"))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--cache", default="")
    ap.add_argument("--uid", type=int, default=-1)
    ap.add_argument("--gid", type=int, default=-1)
    ap.add_argument("--until", type=float, default=0.0, help="loop until this wall time; 0: once")
    ap.add_argument("--loop", action="store_true", help="repeat rounds until --until or a signal")
    a = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_stop)
    if a.uid >= 0 and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(a.gid)
        os.setuid(a.uid)
    os.umask(0o022)
    _DEADLINE[0] = a.until
    rnd = random.Random(a.part)
    began = time.monotonic()
    totals: Counter[str] = Counter()
    rounds = 0
    while not _STOP.is_set():
        if a.part == "files":
            got = storm_files(a.dir, a.count, a.seconds, rnd)
        elif a.part == "archives":
            got = storm_archives(a.dir, a.count, a.seconds, a.cache, rounds)
        else:
            got = storm_build(a.dir, a.count, a.seconds, rnd)
        totals.update(got)
        rounds += 1
        if not a.loop:
            break
    summary = {"part": a.part, "rounds": rounds, "seconds": round(time.monotonic() - began, 1)}
    print(json.dumps({**summary, **totals}), flush=True)
    return 0


# the storm (bench side) ------------------------------------------------------------------


def ensure_archive(cache_dir: str) -> str:
    """The tar.gz of one 1 GiB zero-filled file (about 1 MB), built once and kept."""
    path = os.path.join(cache_dir, ARCHIVE_NAME)
    if os.path.isfile(path) and os.path.getsize(path) > 100_000:
        return path
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    progress(f"building {path} (a 1 GiB zero file, gzip: once, then reused)")
    work = os.path.join(cache_dir, f"build-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    try:
        src = os.path.join(work, "disk.img")
        with open(src, "wb") as fh:
            fh.truncate(GIB)  # sparse: nothing is written, reading it gives zeros
        tmp = os.path.join(work, ARCHIVE_NAME)
        with tarfile.open(tmp, "w:gz", compresslevel=9) as tf:
            tf.add(src, arcname="disk.img")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.chmod(cache_dir, 0o755)  # noqa: S103 - the storm user reads the archive
    return path


@dataclass
class StormPlan:
    files: int
    archives: int
    units: int
    seconds: float


class Storm:
    """The three storm parts as separate process groups, in a directory of their own under
    /tmp that the storm user owns. `stop()` is safe to call twice."""

    def __init__(
        self,
        cleanup: Cleanup,
        user: dict[str, Any] | None,
        archive: str,
        plan: StormPlan,
        logdir: str,
    ) -> None:
        self.cleanup = cleanup
        self.user = user
        self.archive = archive
        self.plan = plan
        self.logdir = logdir
        self.dir = ""
        self.workers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.started = 0.0
        self.summary: dict[str, Any] = {}

    def start(self, *, until: float | None = None) -> None:
        """One paced round of each part; with `until` (wall time, or 0 for "until stopped")
        rounds repeat until then."""
        self.dir = self.cleanup.mkdtemp("exfilwatch-noise-")
        if self.user is not None:
            os.chown(self.dir, self.user["uid"], self.user["gid"])
        os.chmod(self.dir, 0o755)  # noqa: S103 - the storm user writes here, anyone may look
        p = self.plan
        parts = (("files", p.files), ("archives", p.archives), ("build", p.units))
        self.started = time.monotonic()
        for part, count in parts:
            argv = [
                PYTHON,
                os.path.abspath(__file__),
                "_storm",
                part,
                "--dir",
                self.dir,
                "--count",
                str(count),
                "--seconds",
                str(p.seconds),
                "--cache",
                self.archive,
            ]
            if self.user is not None:
                argv += ["--uid", str(self.user["uid"]), "--gid", str(self.user["gid"])]
            if until is not None:
                argv += ["--loop", "--until", str(until)]
            with open(os.path.join(self.logdir, f"storm-{part}.err"), "wb") as err:
                proc = self.cleanup.spawn(argv, group=True, stdout=subprocess.PIPE, stderr=err)
            self.workers.append((part, proc))
        self.cleanup.stoppables.append(self)

    def running(self) -> bool:
        return any(proc.poll() is None for _, proc in self.workers)

    def wait(self, timeout: float | None = None) -> bool:
        """True when every part has finished within `timeout`."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(0.2)
        return True

    def stop(self) -> dict[str, Any]:
        if not self.workers:
            return self.summary
        stopped_early = self.running()
        parts: dict[str, Any] = {}
        for part, proc in self.workers:
            rc = self.cleanup.stop_group(proc, timeout=15.0)
            out = proc.stdout.read() if proc.stdout is not None else b""
            if proc.stdout is not None:
                proc.stdout.close()
            log = os.path.join(self.logdir, f"storm-{part}.err")
            try:
                parts[part] = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                err = tail_text(log, 600)
                parts[part] = {"error": f"exit {rc}: {err.strip() or 'no summary'}"}
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log)
        self.workers.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            self.cleanup.stoppables.remove(self)
        self.summary = {
            "dir": self.dir,
            "user": self.user["name"] if self.user else pwd.getpwuid(os.geteuid()).pw_name,
            "seconds": round(time.monotonic() - self.started, 1),
            "stopped_early": stopped_early,
            "parts": parts,
        }
        return self.summary


def storm_line(s: dict[str, Any]) -> str:
    parts = s.get("parts", {})
    bits = []
    for part, key in (("files", "files"), ("archives", "archives"), ("build", "units")):
        got = parts.get(part, {})
        if "error" in got:
            bits.append(f"{part}: FAILED {got['error']}")
        else:
            bits.append(f"{got.get(key, 0):,} {key} ({got.get('rounds', 0)} rounds)")
    how = "stopped by the bench" if s.get("stopped_early") else "finished by itself"
    return f"storm as {s.get('user')}: {', '.join(bits)}; {s.get('seconds')} s, {how}"


# following the agent's output ------------------------------------------------------------


class Tail:
    """Follows a growing file in a thread and keeps the lines `keep` accepts, each stamped
    with its arrival (time.time() when this thread read it)."""

    def __init__(self, path: str, keep: Callable[[bytes], bool]) -> None:
        self.path = path
        self.keep = keep
        self.lines: list[tuple[float, bytes]] = []
        self.total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fh = None
        rest = b""
        try:
            while True:
                if fh is None:
                    with contextlib.suppress(FileNotFoundError):
                        fh = open(self.path, "rb")  # noqa: SIM115 - closed in finally
                data = fh.read(1 << 20) if fh is not None else b""
                if data:
                    now = time.time()
                    buf = rest + data
                    cut = buf.rfind(b"\n") + 1
                    rest = buf[cut:]
                    got = [(now, ln) for ln in buf[:cut].split(b"\n") if ln and self.keep(ln)]
                    with self._lock:
                        self.total += buf.count(b"\n", 0, cut)
                        self.lines.extend(got)
                    continue  # more may be waiting: read again before sleeping
                if self._stop.is_set():
                    return
                self._stop.wait(TAIL_POLL_S)
        finally:
            if fh is not None:
                fh.close()

    def snapshot(self) -> list[tuple[float, bytes]]:
        with self._lock:
            return list(self.lines)

    def records(self, needle: bytes = b"") -> list[tuple[float, dict[str, Any]]]:
        out = []
        for t, ln in self.snapshot():
            if needle in ln:
                with contextlib.suppress(ValueError):
                    out.append((t, json.loads(ln)))
        return out

    def wait_for(self, pred: Callable[[float, bytes], bool], timeout: float) -> float | None:
        """The arrival of the first kept line `pred` accepts, waiting up to `timeout`."""
        end = time.monotonic() + timeout
        seen = 0
        while True:
            lines = self.snapshot()
            for t, ln in lines[seen:]:
                if pred(t, ln):
                    return t
            seen = len(lines)
            if time.monotonic() >= end:
                return None
            time.sleep(TAIL_POLL_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _action(rec: dict[str, Any]) -> str:
    return str(rec.get("event", {}).get("action", ""))


def _kind(rec: dict[str, Any]) -> str:
    return str(rec.get("event", {}).get("kind", ""))


# the tagged tree, the medium, the home ------------------------------------------------------


def build_tree(root: str, seed: int) -> dict[str, list[str]]:
    rnd = random.Random(seed)
    sets: dict[str, list[str]] = {}
    for name, n in TREE_SETS:
        d = os.path.join(root, name)
        os.makedirs(d)
        paths = []
        for i in range(n):
            path = f"{d}/{name}_{i:03d}.{EXTENSIONS[i % len(EXTENSIONS)]}"
            size = rnd.randint(1024, 8192)
            head = f"// {path} {seed}\n".encode()
            with open(path, "wb") as fh:
                fh.write(head + rnd.randbytes(size - len(head)))
            paths.append(path)
        sets[name] = paths
    return sets


class Medium:
    """A small ext4 image on a loop device, mounted where the agent looks for removable
    media; `remove()` unmounts it, detaches the loop device and removes what it made."""

    def __init__(self, image: str, mountpoint: str) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.loop = ""
        self.mounted = False
        self.made: list[str] = []

    def mount(self) -> None:
        if os.path.ismount(self.mountpoint):
            raise BenchError(
                f"{self.mountpoint} is already mounted (left by an earlier run?): "
                f"umount it (and losetup -d its loop device) first"
            )
        with open(self.image, "wb") as fh:
            fh.truncate(IMAGE_MB * MB)
        run(["mkfs.ext4", "-q", "-F", "-L", "NOISEBENCH", self.image])
        for d in (os.path.dirname(self.mountpoint), self.mountpoint):
            if not os.path.isdir(d):
                os.mkdir(d)
                self.made.append(d)
        self.loop = run(["losetup", "--find", "--show", self.image]).stdout.strip()
        run(["mount", "-t", "ext4", self.loop, self.mountpoint])
        self.mounted = True

    def remove(self) -> None:
        if self.mounted:
            for attempt in range(5):
                done = subprocess.run(
                    ["umount", self.mountpoint], capture_output=True, text=True, check=False
                )
                if done.returncode == 0:
                    break
                if attempt == 4:
                    progress(f"umount {self.mountpoint}: {done.stderr.strip()}; lazy unmount")
                    subprocess.run(["umount", "-l", self.mountpoint], check=False)
                time.sleep(0.5)
            self.mounted = False
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True, check=False)
            self.loop = ""
        for d in reversed(self.made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self.made.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image)


# one run ---------------------------------------------------------------------------------


@dataclass
class Settings:
    base: str
    home: str
    stash: str
    exfilwatch: str
    inotifywait: str | None
    removable: bool
    lead: float
    deadline: float
    keep_output: bool
    seed: int


@dataclass
class Action:
    name: str
    argv: list[str]
    start: float = 0.0
    end: float = 0.0
    rc: int | None = None
    err: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": " ".join(self.argv[:4]) + (" ..." if len(self.argv) > 4 else ""),
            "seconds": round(self.end - self.start, 3),
            "rc": self.rc,
            "err": self.err,
        }


@dataclass
class RunResult:
    label: str
    storm: bool
    error: str = ""
    agent: dict[str, Any] = field(default_factory=dict)
    medium: dict[str, Any] = field(default_factory=dict)
    actions: list[dict[str, Any]] = field(default_factory=list)
    copies: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    expected: dict[str, float | None] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    unexpected_alerts: dict[str, int] = field(default_factory=dict)
    tagged: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    events_by_class: dict[str, int] = field(default_factory=dict)
    storm_summary: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)


def spin_ms() -> float:
    """A fixed CPU-bound loop, timed: how much CPU this process gets right now."""
    t = time.perf_counter()
    total = 0
    for i in range(400_000):
        total += i * i
    return round((time.perf_counter() - t) * 1000, 1)


def write_config(s: Settings, rnd: str, out: str, state: str, path: str) -> str:
    text = f"""# generated by bench/noise.py
watch:
  - path: {rnd}
    tags: [rnd]
    sensitivity: high
rules: [{RULES_DIR}]
sinks:
  - type: file
    path: {out}
    records: [alert, health, event]
state_dir: {state}
heartbeat_interval: 5s
locations: {{enabled: true}}
processes: {{enabled: true}}
"""
    return write_private(path, text)


def run_scenario(
    s: Settings,
    label: str,
    storm_plan: StormPlan | None,
    user: dict[str, Any] | None,
    archive: str,
) -> RunResult:
    res = RunResult(label, storm_plan is not None)
    cleanup = Cleanup()
    run_dir = os.path.join(s.base, label)
    out_dir = os.path.join(s.base, "out")
    os.makedirs(out_dir, exist_ok=True)
    output = os.path.join(out_dir, f"{label}.jsonl")
    errpath = os.path.join(out_dir, f"{label}.err")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(output)
    if not s.keep_output:
        cleanup.at_close("remove output", lambda: _rm(output, errpath))
    try:
        rnd_root = os.path.join(run_dir, "rnd")
        state = os.path.join(run_dir, "state")
        cleanup.tree(run_dir)
        os.makedirs(state)
        sets = build_tree(rnd_root, s.seed)
        home_made = not os.path.isdir(s.home)
        os.makedirs(s.stash, exist_ok=True)
        cleanup.at_close(
            "remove the home", lambda: shutil.rmtree(s.home if home_made else s.stash, True)
        )
        config = write_config(s, rnd_root, output, state, os.path.join(run_dir, "agent.yaml"))
        progress(f"[{label}] starting the agent ({sum(map(len, sets.values()))} tagged files)")
        agent = AgentProcess(cleanup, config, output, errpath, exfilwatch=s.exfilwatch)
        cleanup.stoppables.append(agent)
        sampler = Sampler(agent.pid, 0.25)
        cleanup.stoppables.append(sampler)
        tail = Tail(output, _agent_keeps(MEDIA))
        cleanup.stoppables.append(tail)
        agent_ok = _wait_agent(agent, tail, res)
        medium = Medium(os.path.join(run_dir, "usb.img"), MEDIA) if s.removable else None
        iw_tail: Tail | None = None
        if medium is not None:
            cleanup.at_close("unmount the medium", medium.remove)
            t_mount = time.time()
            medium.mount()
            seen = tail.wait_for(
                lambda t, ln: b'"media_mounted"' in ln and MEDIA.encode() in ln,
                MOUNT_TIMEOUT_S if agent_ok else 0.0,
            )
            res.medium = {
                "mounted": True,
                "media_mounted_s": round(seen - t_mount, 3) if seen else None,
            }
            progress(f"[{label}] {MEDIA} mounted; media_mounted record after {_s(seen, t_mount)}")
            if s.inotifywait:
                iw_tail = _start_inotifywait(cleanup, s.inotifywait, out_dir, label)
                cleanup.stoppables.append(iw_tail)
        storm: Storm | None = None
        if storm_plan is not None:
            storm = Storm(cleanup, user, archive, storm_plan, out_dir)
            storm.start()
            progress(f"[{label}] storm started in {storm.dir}; actions in {s.lead:g} s")
            time.sleep(s.lead)
        res.baseline["spin_ms"] = spin_ms()
        res.baseline["load1"] = round(os.getloadavg()[0], 2)
        cpu_actions0 = None
        if agent_ok:
            with contextlib.suppress(psutil.Error):
                cpu_actions0 = cpu_seconds(agent.ps, children=False)
        actions = _actions(s, label, sets, rnd_root, medium is not None)
        for i, act in enumerate(actions):
            if i:
                time.sleep(ACTION_GAP_S)
            _do(act)
            progress(f"[{label}] {act.name}: {act.end - act.start:.3f} s (exit {act.rc})")
        res.actions = [a.as_dict() for a in actions]
        if storm is not None:
            res.baseline["storm_running_after_actions"] = storm.running()
        t_actions = actions[0].start
        waited = [ACTION_RULES[a.name][0] for a in actions]
        if agent_ok and agent.proc.poll() is None:
            _wait_alerts(tail, waited, actions[-1].end + s.deadline)
        if cpu_actions0 is not None and agent.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                spent = cpu_seconds(agent.ps, children=False) - cpu_actions0
                res.agent["cpu_actions_pct"] = round(100 * spent / (time.time() - t_actions), 2)
        if storm is not None:
            res.storm_summary = storm.stop()
            progress(f"[{label}] {storm_line(res.storm_summary)}")
        _finish_agent(agent, sampler, res)
        tail.stop()
        if iw_tail is not None:
            iw_tail.stop()
        _account(res, tail, iw_tail, actions, sets, output, rnd_root)
    except BenchError as exc:
        res.error = str(exc)
        progress(f"[{label}] error: {exc}")
    finally:
        cleanup.close()
    return res


def _rmdir(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _rm(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _s(t: float | None, t0: float) -> str:
    return f"{t - t0:.2f} s" if t is not None else "(not seen)"


def _agent_keeps(media: str) -> Callable[[bytes], bool]:
    """Which output lines the tail keeps (stamped): alerts, health and host records, and
    events on the removable medium (the copy's arrival)."""
    media_b = media.encode()

    def keep(line: bytes) -> bool:
        return (
            b'"kind":"alert"' in line
            or b'"dataset":"exfilwatch.health"' in line
            or b'"dataset":"exfilwatch.host"' in line
            or media_b in line
        )

    return keep


def _wait_agent(agent: AgentProcess, tail: Tail, res: RunResult) -> bool:
    """Until the agent watches (source_ready) and has indexed the tagged tree. False (and the
    error in `res`) when it does not start: the run goes on without it."""
    try:
        ready = agent.wait_for(b'"action":"source_ready"', READY_TIMEOUT_S)
    except BenchError as exc:
        res.error = f"agent did not start: {exc}"
        progress(f"[{res.label}] {res.error}")
        return False
    res.agent["ready_s"] = round(ready - agent.spawned, 2)
    built = tail.wait_for(lambda t, ln: b'"lineage_index_built"' in ln, INDEX_TIMEOUT_S)
    res.agent["index_built_s"] = round(built - agent.spawned_wall, 2) if built else None
    if built is None:
        progress(f"[{res.label}] no lineage_index_built record in {INDEX_TIMEOUT_S:g} s: going on")
    return True


def _start_inotifywait(cleanup: Cleanup, inotifywait: str, out_dir: str, label: str) -> Tail:
    out = os.path.join(out_dir, f"{label}-inotifywait.out")
    err = os.path.join(out_dir, f"{label}-inotifywait.err")
    argv = [inotifywait, "-m", "-r", "-e", "close_write,moved_to", "--format", "%e %w%f"]
    argv += ["-o", out, MEDIA]
    with open(out, "wb"), open(err, "wb") as errfh:
        proc = cleanup.spawn(argv, stderr=errfh)
    cleanup.at_close("remove inotifywait output", lambda: _rm(out, err))
    wait_for_text(proc, err, b"Watches established.", "inotifywait", err, 30.0)
    return Tail(out, lambda line: True)


def _actions(
    s: Settings, label: str, sets: dict[str, list[str]], rnd_root: str, removable: bool
) -> list[Action]:
    acts = []
    if removable:
        acts.append(Action("copy", ["cp", "-r", f"{rnd_root}/usbset", f"{MEDIA}/grab-{label}"]))
    acts.append(
        Action("archive", ["tar", "czf", f"{s.stash}/pack-{label}.tgz", "-C", rnd_root, "archset"])
    )
    acts.append(Action("delete", ["rm", "-f", *sets["delset"]]))
    return acts


def _do(act: Action) -> None:
    act.start = time.time()
    done = subprocess.run(act.argv, capture_output=True, text=True, check=False)
    act.end = time.time()
    act.rc = done.returncode
    act.err = done.stderr.strip()[:200]


def _wait_alerts(tail: Tail, rules: Sequence[str], until: float) -> None:
    """Until an alert of each rule in `rules` has arrived (then GRACE_S more, for the alerts
    that come with them), or the wall time `until`."""
    want = {f'"id":"{r}"'.encode() for r in rules}
    while time.time() < until:
        got = {n for n in want for _, ln in tail.snapshot() if b'"kind":"alert"' in ln and n in ln}
        if got == want:
            time.sleep(GRACE_S)
            return
        time.sleep(0.1)


def _finish_agent(agent: AgentProcess, sampler: Sampler, res: RunResult) -> None:
    a = res.agent
    if agent.proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            a["cpu_s"] = round(cpu_seconds(agent.ps, children=False), 3)
            wall = time.monotonic() - agent.spawned
            a["wall_s"] = round(wall, 1)
            a["cpu_pct_run"] = round(100 * a["cpu_s"] / wall, 2)
            a["vmhwm_mb"] = round((peak_rss_bytes(agent.pid) or 0) / MB, 1)
    sampler.stop()
    a["peak_rss_mb"] = round(sampler.peak_rss / MB, 1) if sampler.peak_rss else None
    a["rss_samples"] = sampler.samples
    stop_s, rc = agent.stop(15.0)
    a["stop_s"] = round(stop_s, 2)
    a["exit_code"] = rc
    err = tail_text(agent.errpath, 200_000)
    errors = Counter(re.findall(r'"event": "([a-z_]*error[a-z_]*)"', err))
    a["stderr_errors"] = dict(errors)
    if errors:
        first = next((ln for ln in err.splitlines() if '"level": "error"' in ln), "")
        a["first_error"] = first[:600]
    if rc not in (0, None) or not a.get("ready_s"):
        a["stderr_tail"] = err[-1500:]


def _account(
    res: RunResult,
    tail: Tail,
    iw_tail: Tail | None,
    actions: Sequence[Action],
    sets: dict[str, list[str]],
    output: str,
    rnd_root: str,
) -> None:
    by_name = {a.name: a for a in actions}
    # alerts and their latency
    lat_start: list[float] = []
    lat_end: list[float] = []
    unexpected: Counter[str] = Counter()
    first_start = actions[0].start if actions else float("inf")
    for arrival, rec in tail.records(b'"kind":"alert"'):
        if _kind(rec) != "alert":
            continue
        rule = str(rec.get("rule", {}).get("id"))
        name = RULE_ACTION.get(rule)
        act = by_name.get(name) if name else None
        if act is None and arrival >= first_start:
            # an alert no action explains, after the actions began: the latest action before it
            act = max((a for a in actions if a.start <= arrival), key=lambda a: a.start)
            unexpected[rule] += 1
        elif act is None:
            unexpected[rule] += 1
            continue
        stamp = rec.get("@timestamp")
        created = rec.get("event", {}).get("created")
        corr = rec.get("exfilwatch", {}).get("correlation") or {}
        entry = {
            "rule": rule,
            "action": act.name,
            "from_start_s": round(arrival - act.start, 3),
            "from_end_s": round(arrival - act.end, 3),
            "read_s": round(epoch(stamp) - act.start, 3) if stamp else None,
            "created_s": round(epoch(created) - act.start, 3) if created else None,
            "count": corr.get("count"),
            "distinct_files": corr.get("distinct_files"),
            "suppressed": rec.get("exfilwatch", {}).get("suppressed_count"),
        }
        res.alerts.append(entry)
        if name is not None:
            # Latency is the expected alerts' (an alert on the storm's own archives, say,
            # is listed, not timed against an action it has nothing to do with).
            lat_start.append(entry["from_start_s"])
            lat_end.append(entry["from_end_s"])
    for act in actions:
        rule = ACTION_RULES[act.name][0]
        hits = [a["from_start_s"] for a in res.alerts if a["rule"] == rule]
        res.expected[rule] = min(hits) if hits else None
    res.unexpected_alerts = dict(unexpected)
    p99 = percentile(lat_start, 99)
    res.latency = {
        "alerts": len(lat_start),
        "p50_s": _r(percentile(lat_start, 50)),
        "p99_s": _r(p99),
        "p50_from_end_s": _r(percentile(lat_end, 50)),
        "p99_from_end_s": _r(percentile(lat_end, 99)),
        "goal_p99_2s": p99 is not None and p99 <= GOAL_P99_S and all(res.expected.values()),
    }
    # copies
    copy = by_name.get("copy")
    if copy is not None:
        grab = copy.argv[-1] + "/"
        bulk = [a for a in res.alerts if a["rule"] == "exfil-removable-bulk-copy" and a["count"]]
        res.copies = {
            "expected": COPY_FILES,
            "alert_count": max((a["count"] for a in bulk), default=None),
            "alert_distinct": max((a["distinct_files"] or 0 for a in bulk), default=None),
        }
        lineage: set[str] = set()
        seen_usb: set[str] = set()
        kinds: Counter[str] = Counter()
        last_event: float | None = None
        for arrival, rec in tail.records(grab.encode()):
            path = str(rec.get("file", {}).get("path", ""))
            if _kind(rec) != "event" or not path.startswith(grab):
                continue
            last_event = max(last_event or 0.0, arrival)
            seen_usb.add(path)
            x = rec.get("exfilwatch", {})
            skipped = (x.get("enrichment") or {}).get("skipped")
            kinds[
                f"{_action(rec)}/{x.get('source')}" + (f" skipped:{skipped}" if skipped else "")
            ] += 1
            if rec.get("exfilwatch", {}).get("lineage", {}).get("origin_path"):
                lineage.add(path)
        res.copies["lineage"] = len(lineage)
        res.copies["seen"] = len(seen_usb)
        res.copies["events"] = dict(kinds.most_common())
        want = [grab + os.path.basename(p) for p in sets["usbset"]]
        res.copies["missing_sample"] = [os.path.basename(p) for p in want if p not in seen_usb][:12]
        res.copies["no_lineage_sample"] = [
            os.path.basename(p) for p in want if p in seen_usb and p not in lineage
        ][:12]
        res.copies["goal_100"] = len(lineage) >= COPY_FILES
        res.copies["agent_last_event_s"] = _r(last_event - copy.start if last_event else None)
        res.baseline["cp_s"] = round(copy.end - copy.start, 3)
        if iw_tail is not None:
            iw_paths = set()
            iw_last: float | None = None
            for arrival, line in iw_tail.snapshot():
                flags, _, path = line.decode("utf-8", "replace").partition(" ")
                if path.startswith(grab) and "CLOSE_WRITE" in flags:
                    iw_paths.add(path)
                    iw_last = max(iw_last or 0.0, arrival)
            res.copies["iw"] = len(iw_paths)
            res.copies["iw_last_event_s"] = _r(iw_last - copy.start if iw_last else None)
            res.copies["lag_ratio"] = ratio(
                res.copies["agent_last_event_s"], res.copies["iw_last_event_s"]
            )
    # loss records, lanes, and the tagged events the actions caused (one pass over the file)
    _loss(res, tail)
    expected_tagged = {(p, "deleted") for p in sets["delset"]}
    reads = [*sets["usbset"]] if copy is not None else []
    reads += sets["archset"]
    expected_tagged |= {(p, "closed_nowrite") for p in reads}
    seen, by_class = _scan_output(output, rnd_root)
    got = expected_tagged & seen
    res.tagged["missing_sample"] = sorted(
        f"{os.path.basename(p)} {a}" for p, a in expected_tagged - seen
    )[:8]
    res.tagged["expected"] = len(expected_tagged)
    res.tagged["seen"] = len(got)
    res.tagged["lost_measured"] = len(expected_tagged) - len(got)
    res.events_by_class = dict(by_class.most_common())


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _loss(res: RunResult, tail: Tail) -> None:
    records = []
    tagged = staging = egress = 0
    other: list[dict[str, Any]] = []
    overflow = 0
    lanes: dict[str, Any] = {}
    findings: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for _, rec in tail.records(b'"dataset":"exfilwatch.health"'):
        action = _action(rec)
        health = rec.get("exfilwatch", {}).get("health", {}) or {}
        reason = rec.get("event", {}).get("reason") or health.get("reason")
        if action not in ROUTINE:
            findings[f"{action}({reason})" if reason else action] += 1
        nested = health.get("pipeline")
        pipe: dict[str, Any] = nested if isinstance(nested, dict) else health
        if action in ("heartbeat", "agent_stopped") and isinstance(pipe.get("lanes"), dict):
            lanes = pipe["lanes"]
        if action == "enrichment_skipped" and isinstance(health.get("skipped"), dict):
            skipped.update({k: v for k, v in health["skipped"].items() if isinstance(v, int)})
        if action != "event_loss":
            continue
        lane = health.get("lane")
        loc = health.get("location") or health.get("location_class") or health.get("class")
        n = next((health[k] for k in COUNT_KEYS if isinstance(health.get(k), int)), None)
        entry = {"reason": reason, "lane": lane, "location": loc, "count": n}
        records.append(entry)
        if reason == "inotify_overflow":
            overflow += 1
        if reason not in KNOWN_LOSS:
            other.append(rec)
        where = lane or LANE_OF.get(str(loc))
        if where == "tagged":
            tagged += n or 0
        elif where == "staging":
            staging += n or 0
        elif where == "egress":
            egress += n or 0
    res.loss = {
        "records": records,
        "tagged_lost_reported": tagged,
        "staging_shed_reported": staging,
        "egress_shed_reported": egress,
        "inotify_overflows": overflow,
        "unrecognised": other,
        "lanes_at_end": lanes,
        # events that went on without content checks, by reason ("stopping": at shutdown)
        "enrichment_skipped": dict(skipped),
        "health_findings": dict(findings),
    }


_CLASS = re.compile(rb'"location":\{[^{}]*?"class":"([a-z_]+)"')


def _scan_output(output: str, tagged_root: str) -> tuple[set[tuple[str, str]], Counter[str]]:
    """One pass over the agent's output: (path, action) of the events under the tagged root,
    and event lines per location class (cheap: regular expressions on the lines)."""
    seen: set[tuple[str, str]] = set()
    by_class: Counter[str] = Counter()
    root = tagged_root.encode() + b"/"
    try:
        fh = open(output, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return seen, by_class
    with fh:
        for line in fh:
            if b'"kind":"event"' not in line:
                continue
            m = _CLASS.search(line)
            by_class[m.group(1).decode() if m else "none"] += 1
            if root in line:  # few lines: parse them properly
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    path = str(rec.get("file", {}).get("path", ""))
                    if path.startswith(tagged_root + "/"):
                        seen.add((path, _action(rec)))
    return seen, by_class


# report ----------------------------------------------------------------------------------


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print_header("noise", m, result["exfilwatch"], f"load {m['load_avg'][0]}")
    code = result.get("code") or {}
    if code:
        dirty = ", ".join(code["uncommitted"][:8]) + (
            " ..." if len(code["uncommitted"]) > 8 else ""
        )
        print(f"checkout: commit {code['commit']}, uncommitted: {dirty or 'none'}")
    for note in result.get("notes", []):
        print(f"note: {note}")
    runs: list[dict[str, Any]] = result.get("runs", [])
    if not runs:
        return
    print(f"\nStorm plan: {result['storm_plan']}")
    print("\nDetection (copies goal 100/100, alert p99 <= 2 s from the action, 0 tagged lost)\n")
    rows = []
    for r in runs:
        c, lat, loss, t = r["copies"], r["latency"], r["loss"], r["tagged"]
        rows.append(
            [
                r["label"],
                c.get("alert_count"),
                _of(c.get("lineage"), c.get("expected")),
                c.get("seen"),
                c.get("iw"),
                lat.get("alerts"),
                lat.get("p50_s"),
                lat.get("p99_s"),
                lat.get("goal_p99_2s"),
                _of(t.get("lost_measured"), t.get("expected")),
                loss.get("tagged_lost_reported"),
                loss.get("staging_shed_reported"),
                loss.get("egress_shed_reported"),
                sum(v for k, v in loss.get("enrichment_skipped", {}).items() if k != "stopping"),
                loss.get("inotify_overflows"),
                sum(r["unexpected_alerts"].values()) if r["unexpected_alerts"] else 0,
            ]
        )
    rows += _ratio_rows(runs, rows)
    print(
        table(
            [
                "run",
                "copies alert",
                "copies lineage",
                "seen",
                "iw",
                "alerts",
                "p50 s",
                "p99 s",
                "p99 goal",
                "tagged lost",
                "tagged lost rep.",
                "staging shed",
                "egress shed",
                "enrich skipped",
                "overflows",
                "other alerts",
            ],
            rows,
        )
    )
    print("\nCost and baselines\n")
    rows = []
    for r in runs:
        a, b, c = r["agent"], r["baseline"], r["copies"]
        rows.append(
            [
                r["label"],
                a.get("cpu_s"),
                a.get("cpu_pct_run"),
                a.get("cpu_actions_pct"),
                a.get("peak_rss_mb"),
                a.get("vmhwm_mb"),
                sum(r["events_by_class"].values()),
                b.get("cp_s"),
                c.get("agent_last_event_s"),
                c.get("iw_last_event_s"),
                c.get("lag_ratio"),
                r["medium"].get("media_mounted_s"),
                b.get("spin_ms"),
                b.get("load1"),
                a.get("stop_s"),
            ]
        )
    rows += _ratio_rows(runs, rows)
    print(
        table(
            [
                "run",
                "agent CPU s",
                "% core run",
                "% core actions",
                "peak RSS MB",
                "VmHWM MB",
                "event lines",
                "cp s",
                "copy lag s",
                "iw lag s",
                "lag ratio",
                "mount rec s",
                "spin ms",
                "load1",
                "stop s",
            ],
            rows,
        )
    )
    print("\nAlerts (latency from the action's start / end; read = @timestamp - start)\n")
    arows = [
        [
            r["label"],
            a["action"],
            a["rule"],
            a["from_start_s"],
            a["from_end_s"],
            a["read_s"],
            a["created_s"],
            a["count"],
            a["suppressed"],
        ]
        for r in runs
        for a in r["alerts"]
    ]
    if arows:
        print(
            table(
                [
                    "run",
                    "action",
                    "rule",
                    "start s",
                    "end s",
                    "read s",
                    "created s",
                    "count",
                    "supp.",
                ],
                arows,
            )
        )
    for r in runs:
        missing = [rule for rule, t in r["expected"].items() if t is None]
        if missing:
            print(f"{r['label']}: NO alert within the deadline for {', '.join(missing)}")
        if r["unexpected_alerts"]:
            print(f"{r['label']}: alerts no action explains: {r['unexpected_alerts']}")
    print()
    for r in runs:
        lines = [f"{r['label']}:"]
        if r["error"]:
            lines.append(f"error: {r['error']}")
        acts = ", ".join(f"{x['name']} {x['seconds']} s (exit {x['rc']})" for x in r["actions"])
        lines.append(f"actions: {acts or '-'}")
        c = r["copies"]
        if c.get("missing_sample"):
            lines.append(
                f"copies the agent never reported (first): {', '.join(c['missing_sample'])}"
            )
        if c.get("events"):
            lines.append(f"copy events (action/source): {c['events']}")
        if r["tagged"].get("missing_sample"):
            lines.append(
                f"tagged events missing (first): {', '.join(r['tagged']['missing_sample'])}"
            )
        if c.get("no_lineage_sample"):
            lines.append(f"copies without lineage (first): {', '.join(c['no_lineage_sample'])}")
        failed = [x for x in r["actions"] if x["rc"] != 0]
        for x in failed:
            lines.append(f"  {x['name']} failed: {x['err']}")
        by_class = ", ".join(f"{k} {v:,}" for k, v in r["events_by_class"].items())
        lines.append(f"event lines by location class: {by_class or '-'}")
        recs = Counter(
            (x["reason"], x["lane"], x["location"]) for x in r["loss"].get("records", [])
        )
        if recs:
            sums: Counter[tuple[Any, Any, Any]] = Counter()
            for x in r["loss"]["records"]:
                sums[(x["reason"], x["lane"], x["location"])] += x["count"] or 0
            lines.append(
                "event_loss records: "
                + "; ".join(
                    f"{k[0]} lane={k[1]} location={k[2]}: {n} records, count {sums[k]:,}"
                    for k, n in recs.items()
                )
            )
        else:
            lines.append("event_loss records: none")
        for rec in r["loss"].get("unrecognised", [])[:5]:
            lines.append(f"  unrecognised event_loss record: {json.dumps(rec)[:400]}")
        if r["loss"].get("health_findings"):
            lines.append(f"health records (not routine): {r['loss']['health_findings']}")
        if r["loss"].get("enrichment_skipped"):
            lines.append(f"events without content checks: {r['loss']['enrichment_skipped']}")
        lanes = r["loss"].get("lanes_at_end")
        if lanes:
            lines.append(
                "lanes (last heartbeat/stop): "
                + "; ".join(
                    f"{k} " + ", ".join(f"{kk} {vv}" for kk, vv in v.items())
                    if isinstance(v, dict)
                    else f"{k} {v}"
                    for k, v in lanes.items()
                )
            )
        a = r["agent"]
        lines.append(
            f"agent: ready {a.get('ready_s')} s, index {a.get('index_built_s')} s, "
            f"stopped in {a.get('stop_s')} s (exit {a.get('exit_code')}), "
            f"{a.get('rss_samples', 0)} RSS samples"
        )
        if a.get("stderr_errors"):
            lines.append(f"agent errors on stderr: {a['stderr_errors']}")
            lines.append(f"  first: {a.get('first_error', '')[:300]}")
        if a.get("stderr_tail") and (r["error"] or a.get("exit_code") not in (0, None)):
            lines.append("agent stderr (tail):")
            lines.append(indent(a["stderr_tail"][-800:], "  | "))
        if r["storm_summary"]:
            running = r["baseline"].get("storm_running_after_actions")
            lines.append(
                storm_line(r["storm_summary"])
                + f"; still running when the actions ended: {'yes' if running else 'NO'}"
            )
        print("\n".join(lines[:1] + [indent(x) for x in lines[1:]]))


def _of(n: int | None, d: int | None) -> str | None:
    return None if n is None else f"{n}/{d}"


def _ratio_rows(runs: Sequence[dict[str, Any]], rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """storm / quiet for each numeric column (others blank)."""
    if len(rows) < 2:
        return []
    q, s = rows[0], rows[1]
    out: list[Any] = [f"{runs[1]['label']}/{runs[0]['label']}"]
    for i in range(1, len(q)):
        a, b = s[i], q[i]
        if isinstance(a, bool | str) or isinstance(b, bool | str):
            out.append(None)
        elif isinstance(a, int | float) and isinstance(b, int | float) and b:
            out.append(round(a / b, 2))
        else:
            out.append(None)
    return [out]


# main ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/noise.py",
        description=(
            "Noise benchmark: exfilwatch with the shipped rules, a tagged tree and a removable "
            "medium, while another user's storm floods /tmp. Copies counted, alert latency, "
            "tagged events lost, staging events shed, agent CPU and RSS; quiet run beside a "
            "storm run. Run as root. See the module docstring for every number."
        ),
    )
    p.add_argument("--quick", action="store_true", help="20,000 files, 30 archives, 4,000 units")
    p.add_argument("--storm-only", action="store_true", help="only the storm, in a loop")
    p.add_argument("--seconds", type=float, default=None, help="--storm-only: stop after N s")
    p.add_argument("--files", type=int, default=None, help="storm files (100,000)")
    p.add_argument("--archives", type=int, default=None, help="storm archives (150)")
    p.add_argument("--units", type=int, default=None, help="storm compile units (20,000)")
    p.add_argument("--storm-seconds", type=float, default=None, help="storm round length (40)")
    p.add_argument("--lead", type=float, default=10.0, help="storm seconds before the actions (10)")
    p.add_argument("--deadline", type=float, default=None, help="alert wait after actions (30)")
    p.add_argument("--dir", default=None, help=f"bench directory (root: {ROOT_DIR})")
    p.add_argument("--cache", default=None, help=f"archive cache (root: {ROOT_CACHE})")
    p.add_argument("--user", default=STORM_USER, help="the storm's user (root only)")
    p.add_argument("--seed", type=int, default=1, help="tagged tree content (1)")
    p.add_argument("--keep-output", action="store_true", help="keep the agent's output files")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    p.add_argument("--exfilwatch", default=exfilwatch_command(), help="exfilwatch command")
    p.add_argument("--inotifywait", default="inotifywait", help="inotifywait command")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["_storm"]:
        return storm_worker(args_list[1:])
    args = _parser().parse_args(args_list)
    quick = args.quick
    plan = StormPlan(
        files=args.files or (20_000 if quick else 100_000),
        archives=args.archives or (30 if quick else 150),
        units=args.units or (4_000 if quick else 20_000),
        seconds=args.storm_seconds or (25.0 if quick else 40.0),
    )
    home_dir = os.path.expanduser("~")
    base = os.path.abspath(
        args.dir or (ROOT_DIR if IS_ROOT else os.path.join(home_dir, "exfilwatch-noise-bench"))
    )
    cache = args.cache or (
        ROOT_CACHE if IS_ROOT else os.path.join(home_dir, ".cache", "exfilwatch-bench-noise")
    )
    # Ctrl-C stops the bench even when it was started with SIGINT ignored (a background job
    # of a non-interactive shell): it must never leave the storm or the mount behind.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    notes: list[str] = []
    exfilwatch = shutil.which(args.exfilwatch)
    cleanup = Cleanup()
    result: dict[str, Any] = {
        "machine": machine(),
        "code": code_version(),
        "exfilwatch": args.exfilwatch,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "storm_plan": vars(plan),
        "notes": notes,
    }
    with interruptible():
        try:
            base_made = not os.path.exists(base)
            os.makedirs(base, exist_ok=True)
            if args.keep_output:
                notes.append(f"output kept in {base}/out")
            elif base_made:
                cleanup.at_close("remove the bench directory", lambda: shutil.rmtree(base, True))
            else:
                out_dir = os.path.join(base, "out")
                cleanup.at_close("remove the output directory", lambda: _rmdir(out_dir))
            user = None
            if IS_ROOT:
                user = ensure_user(args.user)
                if user["created"]:
                    cleanup.at_close(f"remove user {args.user}", lambda: remove_user(args.user))
                else:
                    notes.append(f"user {args.user} existed before this run: left in place")
                result["storm_user"] = user
            else:
                notes.append("not root: the storm runs as yourself, not as another user")
            archive = ensure_archive(cache)
            if args.storm_only:
                return storm_only(cleanup, user, archive, plan, base, args.seconds)
            inotifywait = shutil.which(args.inotifywait)
            if inotifywait is None:
                notes.append("inotifywait not found: no baseline of the copy events")
            if not IS_ROOT:
                notes.append(
                    "not root: no removable medium (loop mount needs root): no copy action"
                )
            if exfilwatch is None:
                progress(f"{args.exfilwatch}: not found")
                return 2
            settings = Settings(
                base=base,
                home=HOME if IS_ROOT else home_dir,
                stash=os.path.join(HOME, ".stash")
                if IS_ROOT
                else os.path.join(home_dir, ".noisebench-stash"),
                exfilwatch=exfilwatch,
                inotifywait=inotifywait,
                removable=IS_ROOT,
                lead=args.lead,
                deadline=args.deadline or (20.0 if quick else 30.0),
                keep_output=args.keep_output,
                seed=args.seed,
            )
            runs = []
            for label, storm in (("quiet", None), ("storm", plan)):
                r = run_scenario(settings, label, storm, user, archive)
                runs.append(r.__dict__)
            result["runs"] = runs
        except KeyboardInterrupt:
            progress("interrupted: cleaning up")
            return 130
        except BenchError as exc:
            progress(f"error: {exc}")
            return 1
        finally:
            cleanup.close()
    result["code_at_end"] = code_version()
    if result["code_at_end"] != result["code"]:
        notes.append("agent/ or bench/ changed while the bench ran: results may mix versions")
    emit(result, args.json, lambda: report(result))
    return 0


def storm_only(
    cleanup: Cleanup,
    user: dict[str, Any] | None,
    archive: str,
    plan: StormPlan,
    base: str,
    seconds: float | None,
) -> int:
    until = time.time() + seconds if seconds else 0.0
    storm = Storm(cleanup, user, archive, plan, base)
    storm.start(until=until)
    who = user["name"] if user else "yourself (not root)"
    progress(
        f"storm running as {who} in {storm.dir}: {plan.files:,} files, {plan.archives} "
        f"archives, {plan.units:,} units per {plan.seconds:g} s round; "
        + (f"stops after {seconds:g} s" if seconds else "Ctrl-C or SIGTERM stops it")
    )
    try:
        while storm.running():
            if seconds and time.time() >= until + plan.seconds + 30:
                break  # a round overran the deadline by far: stop it
            time.sleep(0.5)
    finally:
        summary = storm.stop()
        progress(storm_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
