"""Attribution benchmark: what process polling and attribution cost, which short-lived processes
the default poll catches, and how often file events are attributed to the right process/user;
with the kernel's process events (processes.source kernel) against polling, which commands'
execs are seen and what they cost.

Usage (as root: the accuracy and execs parts create a system user and run commands with
runuser, fanotify needs CAP_SYS_ADMIN and the process connector CAP_NET_ADMIN), with the
interpreter of the environment exfilwatch is installed in (``.venv/bin/python`` in a
checkout)::

    python bench/attribution.py --quick           # about 7 minutes
    python bench/attribution.py                   # about 20 minutes
    python bench/attribution.py --json            # JSON on stdout, no tables
    python bench/attribution.py --json r.json     # tables, and JSON in r.json
    python bench/attribution.py --parts cost,catch   # a subset of the parts
    python bench/attribution.py --parts execs --quick  # about 1.5 minutes

Progress goes to stderr; the result tables (or ``--json``) go to stdout.

Goals (from the issue): with 500 processes on the machine, process polling plus attribution at
the defaults costs <= 1% of one core (CPU seconds over wall seconds); a burst of 10,000 file
events is attributed without stalling the pipeline; the shortest-lived process the default
interval catches is measured; an accuracy benchmark reports the fraction of file events
attributed exactly, inferred, and wrongly. Issue "every process the moment it starts, and who
did each file operation" (part execs): >= 99% of the commands' processes reported as
process_started with their full argv, file events with the right user 100%, with the right
process >= 95%, wrong 0%; the agent idle <= 1% of one core.

Machine set-up (parts cost and catch)
    ``sleep 600`` children are started until ``psutil.pids()`` counts ``--procs`` (500)
    processes; churn is a separate child process (its own process group, so its CPU is not
    ours) that starts ``sleep U(0.02, 2.0)`` at ``--churn`` (4) per second, Poisson arrivals.

cost
    pids()              ``psutil.pids()`` alone, median microseconds
    fresh poll          ``ProcessTable(tools=<the service's list>).poll()`` on an empty table
                        reads every process: wall/CPU per process read
    poll loop           ``ProcessTable.poll()`` plus ``process_event`` for each new process
                        every 0.5 s for ``--duration`` seconds in this process (a plain timer
                        thread instead of APScheduler): CPU seconds / wall seconds, and per-poll
                        cost for polls that found no new process and per new process read
    agent idle          the real ``Agent`` (inotify source on an empty tree, no rules,
                        lineage/locations off, heartbeat off) for ``--duration`` seconds with
                        processes disabled, enabled with fanotify off, and enabled with
                        fanotify auto: this process's CPU over wall; the difference from
                        "disabled" is what polling (and fanotify) cost at the defaults
    fanotify load       a child opens and closes files under /usr (same mount as /tmp, so on
                        the marked mount, outside the watched tree) at ``--fan-rate`` per
                        second: this process's CPU per kernel record read and filtered away

burst
    10,000 files (half in 10 directories named by long-lived ``sh -c 'sleep 600; :' sh DIR``
    processes, half in 10 directories nobody names) written by a child process while a
    FanotifyWatcher (window raised to 300 s so cached accesses cannot expire mid-bench)
    watches the tree. 10,000 Events (created/closed_write/modified/opened/closed_nowrite, uid
    from lstat) go through ``Attributor`` (best of 3):
        inferred            exact=None (fanotify off): cmdline/cwd, else owner/console/none
        exact hit           exact=watcher.lookup, the writer known to the table
        exact miss          exact=lookup of a watcher with an empty cache
        exact, pid gone     exact hit, but the writer exited before any poll saw it (a short
                            cp): ``table.get`` tries to read the dead pid for every event
    and through ``Pipeline._process`` (RawEvent batches of 256, lstat, tags, JSON line; no
    rules) bare, with a hook that only sets fixed process fields (what the wider JSON line
    costs), with the inferred Attributor and with the exact one.

catch
    ``sleep L`` for L in 1..1000 ms, ``--catch-n`` (50) of each, shuffled, started at random
    times (so at random phases of the poll), while a thread polls a ProcessTable every 0.5 s
    (and, in a second round, every 0.1 s). A process counts as caught when a poll returned its
    pid, and "as sleep" when the record has the ``sleep`` command line (a pid read between
    fork and exec records python's). Lifetime is measured from before Popen to the reap.
    The expectation for a process of lifetime T is about min(1, T / interval).

accuracy
    A system user ``exfilwatch-bench`` (created when missing and then removed at the end of the
    run; one that existed before is left alone) runs a mix of
    commands in a tree under /tmp (0777; five levels down, out of reach of the default /tmp
    staging watch of any other agent running on the machine, whose lineage hashing would read
    our files), two at a time, in random order, with cwd = the tree
    (a user working in the project), each as
    ``runuser -u exfilwatch-bench -- sh -c 'echo $$; exec "$@"' sh CMD...`` so the pid of
    the user's process is known (runuser is its root parent, whose pid Popen gives):
        cp, cp_r, tar       cp / cp -r / tar cf of the command's own source files
        sh_echo             sh -c 'echo data > dst/...'
        py_script, sh_script  a python / sh script given the path: sleeps 0.8 s, then writes
        mv, rm, cat         rename / remove a file root made at set-up; read two files
        rm_fresh            root writes a file (``sh -c 'echo > f'``), 0-1 s later the user
                            removes it; root's write events are the row root_prewrite
        cp_scanned          cp while a root "scanner" (cwd /, path from the environment, as an
                            antivirus or indexer) re-reads the destination every ms; reads of
                            that file (inotify cannot say whose) are left out as ambiguous
    A root background ``sh`` loop writes and reads files under other/ (given as an argument)
    ten times a second, starting ``sleep 0.1`` each time; its cwd is the tree in one pair of
    rounds (a root job in the project: its children are the newest processes whose cwd is
    the tree) and / in the other. The real agent runs in-process (inotify source, processes
    enabled at the default 0.5 s, locations/lineage off, no rules), with fanotify off and
    auto. Each file event is mapped to the command that made it by its path (every command
    has its own files) and judged:
        right   the process named is the command's (runuser or the user's process) or a
                child of it; or only a user is named (owner/console) and it is the right one
        wrong   another process, or another user
        none    attribution "none"
    The table gives, per command and overall, % of events: exact-right, exact-wrong,
    inferred-right, inferred-wrong, none; "seen" = the share of commands whose user process
    appeared in a process_started event; "fan late" = events not attributed by fanotify
    although the watcher had a matching record when the sink looked again (as the line was
    written, and one second later): the fanotify reader was behind the inotify reader and
    the pipeline; "exact no-user" = exact attributions with no user or name (the fanotify
    reader's /proc snapshot of the pid came after the process was gone). Rows "user
    commands" (all but root's) and "overall".

execs
    The bench user runs ``--exec-runs`` (20) of each of cp, cp -r, tar cf, zip -r, gzip -c,
    rm -f, rm -rf, mv, cat, shred -u, dd, base64, curl -T (to the closed port
    http://127.0.0.1:9/: it fails at once, exit 7 is its success), rsync -a (to a path in the
    tree) and ``sh -c 'exec tar cf ...'``, a command missing from the machine skipped with a
    note, in random order, two at a time, cwd = the tree (src/opN: three files root owns;
    dst/: the outputs, and the files and directories rm, rm -rf, mv and shred work on, owned
    by the user), stdout to /dev/null, started as a user's shell starts them: by one of two
    long-lived python3 "shells" (cwd the tree) that drop to the user's uid and gid (no other
    groups) and then fork and exec each command they are sent (subprocess.Popen: its pid is
    the command's), so the parent is the user's, as in a terminal (runuser would add a PAM
    session, a root parent naming nothing, and a wrapper shell's exec; a fork of this root
    process would be known as a root python until its exec is read). The shells' own
    command lines name no file of the tree. The real agent runs in-process (as in accuracy:
    inotify, no rules, lineage/locations off) in one round per setting: processes.source
    kernel, poll (the baseline), and kernel with fanotify auto when fanotify works. A round
    starts when the event of a file written in the tree reaches the sink, and ends when the
    event of a file written after the last command does (the tagged lane is in order: all
    before it is out).
        exec table      per command, % of runs whose process appears in a process_started
                        event at its pid with process.args equal to the argv it ran (for
                        sh -c 'exec tar ...': tar's argv, at the pid sh had); in brackets %
                        whose pid appears with any argv (sh -c 'exec tar': only the sh, tar
                        was gone before it was read)
        file events     per command and per operation (open = opened/closed_nowrite, write =
                        modified/closed_write, delete = deleted/moved_out, rename = moved,
                        create = created/moved_in, attrib = attributes_changed), % of the
                        events of the command's files: user ok (user.name is the bench user),
                        proc ok (process.pid is the command's pid or a child of it), WRONG
                        (another process, or another user), none (attribution none), and the
                        attribution methods used; "table": execs the kernel source read, and
                        those gone before /proc could be read
    Cost: a fresh agent (empty tree) per source, settled (a half second under 2% of a core),
    then ``--duration`` seconds idle, then ``--duration`` seconds of a child (its own process
    group, not counted) spawning /bin/true at ``--exec-rate`` (500) per second, measured
    until the agent has read as many execs as were made (kernel) or polled once more (poll):
        agent CPU s     this process (the agent's threads; the bench's only waits)
        child CPU s     the procsnap child (stats()["pid"] of the component), user + system
        % core          (agent + child) CPU over wall; "median 1 s" (idle): the median of
                        one-second windows, what it costs while the machine's other processes
                        are quiet
        us CPU/exec     (agent + child) CPU over the execs made; "net of idle" subtracts the
                        idle phase's rate over the same wall time
        proc events     process_started events written; "execs read/new": execs the kernel
                        source read (poll: new processes the polls found); "gone before
                        read": execs whose process had exited before /proc could be read
    The idle phase of the kernel source also pays for every exec elsewhere on the machine.

Standard library and psutil only (and the agent itself).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import json
import os
import queue
import random
import re
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
from common import (
    PYTHON,
    BenchError,
    Cleanup,
    emit,
    ensure_user,
    interruptible,
    mean,
    median,
    pct,
    progress,
    remove_user,
    table,
)
from msgspec.structs import replace as evolve

from agent.config import (
    Config,
    InotifySettings,
    LineageSettings,
    LocationSettings,
    ProcessSettings,
    SinkSpec,
    WatchSpec,
)
from agent.enrich.attribution import (
    KNOWN_TOOLS,
    Attributor,
    Proc,
    ProcessTable,
    kernel_lookup,
    proc_fields,
    process_event,
)
from agent.enrich.tags import TagResolver
from agent.events import Event, from_dict
from agent.health import CapReporter
from agent.pipeline import Pipeline
from agent.service import Agent
from agent.sinks import Router
from agent.sinks.logsetup import configure
from agent.sources.base import RawEvent
from agent.sources.fanotify import FanotifyWatcher, available

TOOLS = KNOWN_TOOLS  # what the agent gives ProcessTable (renamed-copy detection)
BENCH_USER = "exfilwatch-bench"
# The system's python3 for the bench user: the venv's interpreter may live where that user
# cannot reach it (under /root).
USER_PYTHON = shutil.which("python3", path=os.defpath) or PYTHON
LIFETIMES_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000)
OP_KINDS = (
    "cp",
    "cp_r",
    "tar",
    "sh_echo",
    "py_script",
    "sh_script",
    "mv",
    "rm",
    "cat",
    "rm_fresh",
    "cp_scanned",
)
BG = "root_bg"
PRE = "root_prewrite"  # root's write of the file an rm_fresh command then removes

CHURN = r"""
import random, subprocess, sys, time
rate, rng, live = float(sys.argv[1]), random.Random(int(sys.argv[2])), []
while True:
    time.sleep(rng.expovariate(rate))
    live.append(subprocess.Popen(["sleep", f"{rng.uniform(0.02, 2.0):.3f}"]))
    live = [p for p in live if p.poll() is None]
"""

FILE_LOAD = r"""
import os, sys, time
rate = float(sys.argv[1])
files = []
for d in ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share/doc"):
    try:
        files += [os.path.join(d, n) for n in sorted(os.listdir(d))]
    except OSError:
        pass
files = [f for f in files if os.path.isfile(f)][:2000]
step, i, t = 0.01, 0, time.monotonic()
per = max(1, round(rate * step))
while True:
    for _ in range(per):
        try:
            os.close(os.open(files[i % len(files)], os.O_RDONLY))
        except OSError:
            pass
        i += 1
    t += step
    time.sleep(max(0.0, t - time.monotonic()))
"""

WRITER = r"""
import os, sys
root, n = os.environ["BENCH_ROOT"], int(sys.argv[1])
for i in range(n):
    d = os.path.join(root, "named" if i % 2 == 0 else "anon", f"d{(i // 2) % 10}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.txt"), "w") as fh:
        fh.write("x" * 100)
print("done", flush=True)
sys.stdin.read()
"""

PY_SCRIPT = "import sys, time\ntime.sleep(0.8)\nopen(sys.argv[1], 'w').write('written\\n')\n"
SH_SCRIPT = 'sleep 0.8; echo written > "$1"'
# A root reader of fresh files (an antivirus or indexer): the path comes in the environment and
# the cwd is /, so only fanotify can name it.
SCANNER = r"""
import os, time
path = os.environ["SCAN_PATH"]
while True:
    try:
        with open(path, "rb") as fh:
            fh.read()
    except OSError:
        pass
    time.sleep(0.001)
"""
BG_SCRIPT = """i=0
while :; do
  i=$((i + 1))
  echo "$i" > "$1/bg-$((i % 20)).log"
  read line < "$1/bg-$(((i + 7) % 20)).log"
  sleep 0.1
done"""


# Health records the measured components report (kept for a look in a debugger, not printed).
HEALTH: list[dict[str, Any]] = []


def isolated(cleanup: Cleanup, prefix: str) -> str:
    """A fresh directory five levels under a new /tmp tree: deeper than the default /tmp
    staging watch (STAGING_MAX_DEPTH 4) of any other agent running on this machine, whose
    lineage hashing would open our files and own their accesses."""
    base = cleanup.mkdtemp(prefix)
    os.chmod(base, 0o755)  # noqa: S103 - mkdtemp's 0700 keeps the test user out
    path = os.path.join(base, "isolated", "from", "staging", "watches", "tree")
    os.makedirs(path)
    return path


_READS = frozenset({"opened", "closed_nowrite"})  # as agent/enrich/attribution.py kernel_lookup
_WRITES = frozenset({"closed_write", "modified", "opened"})
_FAN_ACTIONS = frozenset({"created", "opened", "modified", "closed_write", "closed_nowrite"})
PROBE_DELAYS = (0.005, 0.02, 0.05, 0.2, 1.0)  # seconds after an event's line is written


class LineSink:
    """A sink that keeps (or just counts) the JSON lines it is given.

    After `probe(watcher)`, each file event that did not get a fanotify attribution is looked
    up in the watcher again: when its line is written (right after the pipeline made it) and
    one second later. A hit means the kernel's record reached the cache only after the event
    was attributed (the fanotify reader lagged behind the inotify reader and the pipeline)."""

    name = "bench"

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.lines: list[str] = []
        self.count = 0
        self.watcher: FanotifyWatcher | None = None
        self.late_now: dict[int, int] = {}  # event sequence -> pid fanotify had at write time
        # event sequence -> (pid, the first delay after the write at which the watcher had it)
        self.late: dict[int, tuple[int, float]] = {}
        self._pending: list[tuple[float, int, int, str, frozenset[str]]] = []  # a heap
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def probe(self, watcher: FanotifyWatcher | None) -> None:
        if watcher is None:
            return
        self.watcher = watcher
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)
        self._thread.start()

    def stop_probe(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._check(float("inf"))

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self._check(time.monotonic())

    def _check(self, now: float) -> None:
        watcher = self.watcher
        while watcher is not None:
            with self._lock:
                if not self._pending or self._pending[0][0] > now:
                    return
                due, stage, seq, path, kinds = heapq.heappop(self._pending)
            acc = watcher.lookup(path, actions=kinds)
            if acc is not None:
                self.late[seq] = (acc.pid, PROBE_DELAYS[stage])
            elif stage + 1 < len(PROBE_DELAYS):
                nxt = due + PROBE_DELAYS[stage + 1] - PROBE_DELAYS[stage]
                with self._lock:
                    heapq.heappush(self._pending, (nxt, stage + 1, seq, path, kinds))

    def write(self, lines: Sequence[str]) -> None:
        watcher = self.watcher
        if watcher is not None:
            due = time.monotonic() + PROBE_DELAYS[0]
            for line in lines:
                rec = json.loads(line)
                if rec.get("event", {}).get("kind") != "event":
                    continue
                e = from_dict(rec)
                if e.attribution_method == "fanotify" or e.action not in _FAN_ACTIONS:
                    continue
                kinds = _READS if e.action in _READS else _WRITES
                acc = watcher.lookup(e.path, actions=kinds)
                if acc is not None:
                    self.late_now[e.sequence] = acc.pid
                    self.late[e.sequence] = (acc.pid, 0.0)
                    continue
                with self._lock:
                    heapq.heappush(self._pending, (due, 0, e.sequence, e.path, kinds))
        with self._lock:
            self.count += len(lines)
            if self.keep:
                self.lines.extend(lines)

    def close(self) -> None:
        pass

    def since(self, index: int) -> list[str]:
        """The lines kept after the first `index`."""
        with self._lock:
            return self.lines[index:]

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(line) for line in self.lines]


def agent_config(root: str, state: str, processes: ProcessSettings) -> Config:
    return Config(
        source_file=os.path.join(state, "agent.yaml"),
        watch=(WatchSpec(root, ("bench",)),),
        sinks=(SinkSpec("stdout", None, frozenset({"event"})),),
        state_dir=state,
        heartbeat_interval=3600.0,
        inotify=InotifySettings(apply_sysctl=False),  # leave the machine's sysctls alone
        locations=LocationSettings(enabled=False),
        lineage=LineageSettings(enabled=False),  # its hashing reads would be events too
        processes=processes,
    )


def fanotify_check(cleanup: Cleanup) -> dict[str, Any]:
    """available() and whether lookup() names a child's pid for a file it wrote."""
    ok, why = available()
    out: dict[str, Any] = {"available": ok, "why": why, "lookup_works": False}
    if not ok:
        return out
    tree = isolated(cleanup, "exfilwatch-bench-fan-")
    watcher = FanotifyWatcher([tree], report=HEALTH.append)
    try:
        watcher.start()
    except OSError as exc:
        out["why"] = f"start: {exc}"
        return out
    cleanup.stoppables.append(watcher)
    target = os.path.join(tree, "probe.txt")
    child = cleanup.spawn(["sh", "-c", 'echo x > "$1"; sleep 0.5', "sh", target], group=True)
    deadline = time.monotonic() + 3
    pid = None
    while time.monotonic() < deadline:
        acc = watcher.lookup(target, actions={"closed_write"})
        if acc is not None:
            pid = acc.pid
            break
        time.sleep(0.02)
    cleanup.kill_group(child)
    watcher.stop()
    cleanup.stoppables.remove(watcher)
    out["lookup_works"] = pid == child.pid
    if pid != child.pid:
        out["why"] = f"lookup gave pid {pid}, the writer was {child.pid}"
    return out


# machine population ----------------------------------------------------------------------


def populate(target: int, cleanup: Cleanup) -> list[subprocess.Popen[bytes]]:
    """Idle `sleep 600` children until the machine has `target` processes."""
    idle: list[subprocess.Popen[bytes]] = []
    for _ in range(max(0, target - len(psutil.pids()))):
        idle.append(cleanup.spawn(["sleep", "600"]))
    return idle


def start_churn(rate: float, seed: int, cleanup: Cleanup) -> subprocess.Popen[bytes] | None:
    if rate <= 0:
        return None
    return cleanup.spawn([PYTHON, "-c", CHURN, str(rate), str(seed)], group=True)


# part 1: cost ----------------------------------------------------------------------------


def time_pids(n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        psutil.pids()
        samples.append((time.perf_counter() - t0) * 1e6)
    return median(samples)


def fresh_poll(reps: int) -> dict[str, Any]:
    rows = []
    for _ in range(reps):
        table = ProcessTable(report=HEALTH.append, tools=TOOLS)
        w0, c0 = time.perf_counter(), time.thread_time()
        new = table.poll()
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        rows.append((len(new), wall, cpu))
        gc.collect()
    n = median([r[0] for r in rows])
    return {
        "processes_read": int(n),
        "wall_ms": median([r[1] for r in rows]) * 1e3,
        "cpu_ms": median([r[2] for r in rows]) * 1e3,
        "us_per_process_wall": median([r[1] / max(1, r[0]) for r in rows]) * 1e6,
        "us_per_process_cpu": median([r[2] / max(1, r[0]) for r in rows]) * 1e6,
    }


def poll_loop(interval: float, duration: float, tagged_root: str) -> dict[str, Any]:
    """ProcessTable.poll() + process_event() on a fixed 0.5 s schedule, as check_processes."""
    table = ProcessTable(report=HEALTH.append, tools=TOOLS)
    table.poll()  # what runs already is known, as at agent start
    prefix = tagged_root.rstrip("/") + "/"

    def tagged(path: str) -> bool:
        return (path + "/").startswith(prefix)

    samples: list[tuple[int, float, float]] = []
    built = 0
    gc.collect()
    w_start, c_start = time.perf_counter(), time.process_time()
    next_t = w_start
    end = w_start + duration
    while True:
        next_t += interval
        if next_t > end:
            time.sleep(max(0.0, end - time.perf_counter()))
            break
        time.sleep(max(0.0, next_t - time.perf_counter()))
        w0, c0 = time.perf_counter(), time.thread_time()
        new = table.poll()
        ts = time.time_ns() // 1000
        built += len([process_event(p, ts, tagged) for p in new])
        samples.append(
            (len(new), (time.perf_counter() - w0) * 1e6, (time.thread_time() - c0) * 1e6)
        )
    wall = time.perf_counter() - w_start
    cpu = time.process_time() - c_start
    idle = [s for s in samples if s[0] == 0]
    busy = [s for s in samples if s[0] > 0]
    base_cpu = median([s[2] for s in idle]) if idle else 0.0
    base_wall = median([s[1] for s in idle]) if idle else 0.0
    per_new_cpu = [(s[2] - base_cpu) / s[0] for s in busy]
    per_new_wall = [(s[1] - base_wall) / s[0] for s in busy]
    return {
        "interval_s": interval,
        "wall_s": wall,
        "cpu_s": cpu,
        "core_pct": pct(cpu, wall),
        "polls": len(samples),
        "new_processes": sum(s[0] for s in samples),
        "process_events": built,
        "table_size_end": len(table),
        "idle_polls": len(idle),
        "idle_poll_us_wall": base_wall,
        "idle_poll_us_cpu": base_cpu,
        "idle_poll_us_cpu_p90": (
            statistics.quantiles([s[2] for s in idle], n=10)[-1] if len(idle) >= 10 else None
        ),
        "per_new_process_us_cpu": median(per_new_cpu),
        "per_new_process_us_wall": median(per_new_wall),
        "mean_poll_us_cpu": mean([s[2] for s in samples]),
    }


def agent_idle(
    mode: str | None, duration: float, cleanup: Cleanup, settle: float = 1.5
) -> dict[str, Any]:
    """This process's CPU over wall while an idle agent runs (mode None: processes off)."""
    base = cleanup.mkdtemp("exfilwatch-bench-cost-")
    root = os.path.join(base, "tree")
    state = os.path.join(base, "state")
    os.makedirs(root)
    os.makedirs(state)
    settings = (
        ProcessSettings(enabled=False)
        if mode is None
        else ProcessSettings(enabled=True, interval=0.5, fanotify=mode)
    )
    sink = LineSink(keep=False)
    agent = Agent(
        agent_config(root, state, settings), router=Router([(sink, frozenset({"event"}))])
    )
    cleanup.stoppables.append(agent)
    agent.start()
    time.sleep(settle)  # the start-up poll of every process and the first source work are done
    fan0 = agent.fanotify.stats() if agent.fanotify is not None else None
    polls0 = agent.processes.polls if agent.processes is not None else 0
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    time.sleep(duration)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    out: dict[str, Any] = {
        "mode": "processes disabled" if mode is None else f"processes, fanotify {mode}",
        "wall_s": wall,
        "cpu_s": cpu,
        "core_pct": pct(cpu, wall),
        "polls": (agent.processes.polls - polls0) if agent.processes is not None else 0,
        "process_events": sink.count,
        "fanotify": agent.fanotify is not None,
    }
    if agent.fanotify is not None and fan0 is not None:
        fan1 = agent.fanotify.stats()
        out["fanotify_records"] = fan1["events_read"] - fan0["events_read"]
        out["fanotify_outside"] = fan1["outside_skipped"] - fan0["outside_skipped"]
        out["fanotify_records_per_s"] = out["fanotify_records"] / wall
    agent.stop()
    cleanup.stoppables.remove(agent)
    return out


def fanotify_load(rate: float, duration: float, cleanup: Cleanup) -> dict[str, Any]:
    """CPU per fanotify record for file activity elsewhere on the marked mount."""
    tree = cleanup.mkdtemp("exfilwatch-bench-fanload-")
    load = cleanup.spawn([PYTHON, "-c", FILE_LOAD, str(rate)], group=True)
    time.sleep(1.0)
    w0, c0 = time.perf_counter(), time.process_time()
    time.sleep(duration)
    base_cpu, base_wall = time.process_time() - c0, time.perf_counter() - w0
    watcher = FanotifyWatcher([tree], report=HEALTH.append)
    watcher.start()
    cleanup.stoppables.append(watcher)
    time.sleep(0.5)
    s0 = watcher.stats()
    w0, c0 = time.perf_counter(), time.process_time()
    time.sleep(duration)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    s1 = watcher.stats()
    watcher.stop()
    cleanup.stoppables.remove(watcher)
    cleanup.kill_group(load)
    records = s1["events_read"] - s0["events_read"]
    return {
        "opens_per_s": rate,
        "wall_s": wall,
        "records": records,
        "records_per_s": records / wall,
        "outside_skipped": s1["outside_skipped"] - s0["outside_skipped"],
        "cpu_s": cpu,
        "baseline_cpu_s": base_cpu * wall / base_wall,
        "core_pct": pct(cpu, wall),
        "us_per_record": (cpu - base_cpu * wall / base_wall) / max(1, records) * 1e6,
        "errors": s1["errors"],
    }


def part_cost(args: argparse.Namespace, cleanup: Cleanup, fan_ok: bool) -> dict[str, Any]:
    churn = start_churn(args.churn, args.seed, cleanup)
    time.sleep(1.0)
    out: dict[str, Any] = {"processes": len(psutil.pids()), "churn_per_s": args.churn}
    progress(f"cost: {out['processes']} processes, churn {args.churn}/s")
    out["pids_us"] = time_pids(200)
    out["fresh_poll"] = fresh_poll(3)
    progress(f"cost: poll loop, {args.duration:.0f} s")
    tree = cleanup.mkdtemp("exfilwatch-bench-loop-")
    out["poll_loop"] = poll_loop(0.5, args.duration, tree)
    out["processes_end"] = len(psutil.pids())
    runs = []
    modes: list[str | None] = [None, "off"] + (["auto"] if fan_ok else [])
    for mode in modes:
        progress(f"cost: idle agent, {mode or 'processes disabled'}, {args.duration:.0f} s")
        runs.append(agent_idle(mode, args.duration, cleanup))
    out["agent"] = runs
    if churn is not None:
        cleanup.kill_group(churn)
    if fan_ok:
        progress(f"cost: fanotify under {args.fan_rate:.0f} opens/s outside the tree")
        out["fanotify_load"] = fanotify_load(args.fan_rate, min(args.duration, 15.0), cleanup)
    return out


# part 1b: burst --------------------------------------------------------------------------


@dataclass(slots=True)
class Timed:
    wall: float
    cpu: float
    counters: dict[str, int]


def attribute_all(attr: Attributor, events: Sequence[Event]) -> tuple[float, float]:
    gc.collect()
    w0, c0 = time.perf_counter(), time.thread_time()
    for e in events:
        attr(e)
    return time.perf_counter() - w0, time.thread_time() - c0


def best_of(
    make: Callable[[], Attributor], events: Sequence[Event], reps: int = 3
) -> dict[str, Any]:
    runs: list[Timed] = []
    for _ in range(reps):
        attr = make()
        wall, cpu = attribute_all(attr, events)
        runs.append(Timed(wall, cpu, dict(attr.counters)))
    best = min(runs, key=lambda r: r.wall)
    n = len(events)
    return {
        "wall_ms": best.wall * 1e3,
        "cpu_ms": best.cpu * 1e3,
        "us_per_event": best.wall / n * 1e6,
        "events_per_s": n / best.wall,
        "counters": best.counters,
    }


def pipeline_pass(pipeline: Pipeline, batches: list[list[RawEvent]]) -> float:
    gc.collect()
    w0 = time.perf_counter()
    for batch in batches:
        pipeline._process("tagged", batch)
    return time.perf_counter() - w0


def part_burst(args: argparse.Namespace, cleanup: Cleanup, fan_ok: bool) -> dict[str, Any]:
    n = args.events
    base = isolated(cleanup, "exfilwatch-bench-burst-")
    for group in ("named", "anon"):
        for k in range(10):
            os.makedirs(os.path.join(base, group, f"d{k}"))
    namers = [
        cleanup.spawn(
            ["sh", "-c", "sleep 600; :", "sh", os.path.join(base, "named", f"d{k}")], group=True
        )
        for k in range(10)
    ]
    time.sleep(0.2)
    before = ProcessTable(report=HEALTH.append, tools=TOOLS)
    before.poll()  # knows the namers, not the writer: as when a short cp is never polled
    watcher: FanotifyWatcher | None = None
    if fan_ok:
        watcher = FanotifyWatcher([base], report=HEALTH.append, window_s=300.0)
        watcher.start()
        cleanup.stoppables.append(watcher)
    # The root comes in the environment: an argument naming the tree would make the writer
    # the cmdline match of every file, the anon half included.
    writer = cleanup.spawn(
        [PYTHON, "-c", WRITER, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "BENCH_ROOT": base},
    )
    assert writer.stdout is not None and writer.stdin is not None
    writer.stdout.readline()
    time.sleep(0.3)  # the fanotify reader drains the writer's records
    table = ProcessTable(report=HEALTH.append, tools=TOOLS)
    table.poll()  # knows the namers and the (live) writer
    rng = random.Random(args.seed)
    actions = ("created", "closed_write", "modified", "opened", "closed_nowrite")
    weights = (2, 2, 2, 2, 2)
    paths = [
        os.path.join(base, "named" if i % 2 == 0 else "anon", f"d{(i // 2) % 10}", f"f{i:05d}.txt")
        for i in range(n)
    ]
    rng.shuffle(paths)
    ts = time.time_ns() // 1000
    events = []
    raws = []
    for p in paths:
        action = rng.choices(actions, weights)[0]
        events.append(Event(ts, action, p, file_type="file", uid=str(os.lstat(p).st_uid)))
        raws.append(RawEvent(ts, action, p, None, False, "inotify"))
    out: dict[str, Any] = {"events": n, "processes": len(psutil.pids()), "fanotify": fan_ok}
    variants: dict[str, dict[str, Any]] = {}
    progress("burst: Attributor variants")
    variants["inferred (fanotify off)"] = best_of(lambda: Attributor(table), events)
    if watcher is not None:
        # as agent/service.py _start_fanotify wires it
        exact = kernel_lookup(watcher, table)
        miss = kernel_lookup(
            FanotifyWatcher([base], report=HEALTH.append), table
        )  # never started: an empty cache
        variants["exact hit"] = best_of(lambda: Attributor(table, exact=exact), events)
        variants["exact miss"] = best_of(lambda: Attributor(table, exact=miss), events)
    # pipeline: bare, inferred, exact
    records: list[dict[str, Any]] = []
    resolver = TagResolver(
        [WatchSpec(base, ("bench",))],
        ".exfilwatch.yaml",
        records.append,
        CapReporter(records.append),
    )
    sink = LineSink(keep=False)
    pipeline = Pipeline(Router([(sink, frozenset({"event"}))]), resolver, queue_size=1_000_000)
    batches = [raws[i : i + 256] for i in range(0, len(raws), 256)]
    pipeline_pass(pipeline, batches)  # warm the resolver's cache
    pipe: dict[str, list[float]] = {"bare": [], "fields only": [], "inferred": [], "exact": []}
    writer_proc = table.get(writer.pid)
    assert writer_proc is not None
    fixed = proc_fields(writer_proc)

    class FieldsOnly:  # no lookup: what the extra fields cost downstream
        name = "fields_only"

        def __call__(self, e: Event, /) -> Event:
            return evolve(e, **fixed, attribution="exact", attribution_method="fanotify")

    fields_only = FieldsOnly()

    progress("burst: pipeline passes")
    for _ in range(3):
        pipeline.stages = ()
        pipe["bare"].append(pipeline_pass(pipeline, batches))
        pipeline.stages = (fields_only,)
        pipe["fields only"].append(pipeline_pass(pipeline, batches))
        pipeline.stages = (Attributor(table),)
        pipe["inferred"].append(pipeline_pass(pipeline, batches))
        if watcher is not None:
            pipeline.stages = (Attributor(table, exact=exact),)
            pipe["exact"].append(pipeline_pass(pipeline, batches))
    out["pipeline"] = {
        k: {"ms": min(v) * 1e3, "events_per_s": n / min(v), "us_per_event": min(v) / n * 1e6}
        for k, v in pipe.items()
        if v
    }
    # the writer exits; a table that never saw it is asked for its pid on every event
    writer.stdin.close()
    writer.wait()
    cleanup.forget(writer)
    if watcher is not None:
        gone = kernel_lookup(watcher, before)
        variants["exact, pid gone and never polled"] = best_of(
            lambda: Attributor(before, exact=gone), events
        )
        out["fanotify_stats"] = {
            k: v for k, v in watcher.stats().items() if k in ("events_read", "cache_size", "errors")
        }
        watcher.stop()
        cleanup.stoppables.remove(watcher)
    out["variants"] = variants
    for namer in namers:
        cleanup.kill_group(namer)
    return out


# part 2: catch ---------------------------------------------------------------------------


@dataclass(slots=True)
class Spawned:
    lifetime_ms: int
    pid: int
    arg: str
    t0: float
    t_end: float = 0.0


def catch_round(interval: float, n: int, rng: random.Random, cleanup: Cleanup) -> dict[str, Any]:
    table = ProcessTable(report=HEALTH.append, tools=TOOLS)
    table.poll()
    seen: dict[int, Proc] = {}
    stop = threading.Event()
    poll_us: list[float] = []

    def poller() -> None:
        nxt = time.perf_counter()
        while not stop.is_set():
            nxt += interval
            time.sleep(max(0.0, nxt - time.perf_counter()))
            t0 = time.perf_counter()
            for p in table.poll():
                seen.setdefault(p.pid, p)
            poll_us.append((time.perf_counter() - t0) * 1e6)

    thread = threading.Thread(target=poller, name="bench-poller", daemon=True)
    thread.start()
    plan = [ms for ms in LIFETIMES_MS for _ in range(n)]
    rng.shuffle(plan)
    spawned: list[Spawned] = []
    waiters: list[threading.Thread] = []
    mean_gap = 0.04
    for ms in plan:
        time.sleep(rng.uniform(0.0, 2 * mean_gap))  # uniform gaps: a random phase each time
        arg = f"{ms / 1000:.3f}"
        t0 = time.perf_counter()
        p = cleanup.spawn(["sleep", arg])
        rec = Spawned(ms, p.pid, arg, t0)
        spawned.append(rec)

        def wait(p: subprocess.Popen[bytes] = p, rec: Spawned = rec) -> None:
            p.wait()
            rec.t_end = time.perf_counter()
            cleanup.forget(p)

        th = threading.Thread(target=wait, daemon=True)
        th.start()
        waiters.append(th)
    for th in waiters:
        th.join()
    time.sleep(interval * 2)
    stop.set()
    thread.join()
    rows = []
    for ms in LIFETIMES_MS:
        recs = [r for r in spawned if r.lifetime_ms == ms]
        caught = [r for r in recs if r.pid in seen]
        as_sleep = [r for r in caught if seen[r.pid].cmdline == ("sleep", r.arg)]
        life = median([(r.t_end - r.t0) * 1e3 for r in recs])
        rows.append(
            {
                "lifetime_ms": ms,
                "n": len(recs),
                "measured_lifetime_ms": life,
                "caught": len(caught) / len(recs),
                "caught_as_sleep": len(as_sleep) / len(recs),
                "caught_other": [
                    {"name": seen[r.pid].name, "cmdline": list(seen[r.pid].cmdline)[:3]}
                    for r in caught
                    if r not in as_sleep
                ][:3],
                "expected": min(1.0, life / 1e3 / interval),
            }
        )
    return {"interval_s": interval, "rows": rows, "poll_us_median": median(poll_us)}


def part_catch(args: argparse.Namespace, cleanup: Cleanup) -> dict[str, Any]:
    rng = random.Random(args.seed + 2)
    out: dict[str, Any] = {"processes": len(psutil.pids()), "n": args.catch_n, "rounds": []}
    for interval in (0.5, 0.1):
        progress(f"catch: {args.catch_n} x {len(LIFETIMES_MS)} processes, poll {interval} s")
        out["rounds"].append(catch_round(interval, args.catch_n, rng, cleanup))
    return out


# part 3: accuracy ------------------------------------------------------------------------


@dataclass(slots=True)
class Op:
    index: int
    kind: str
    argv: list[str]
    runuser_pid: int = 0
    child_pid: int = 0
    t0: float = 0.0
    t1: float = 0.0
    rc: int | None = None
    err: str = ""
    pre_pid: int = 0  # rm_fresh: the root process that wrote the file just before


def op_argv(kind: str, i: int) -> list[str]:
    src = f"src/op{i:04d}"
    dst = f"dst/op{i:04d}"
    return {
        "cp": ["cp", f"{src}/f0.txt", f"{dst}-cp.txt"],
        "cp_r": ["cp", "-r", src, f"{dst}-tree"],
        "tar": ["tar", "cf", f"{dst}.tar", src],
        "sh_echo": ["sh", "-c", f"echo data > {dst}-echo.txt"],
        "py_script": [USER_PYTHON, "-c", PY_SCRIPT, f"{dst}-py.txt"],
        "sh_script": ["sh", "-c", SH_SCRIPT, "sh", f"{dst}-sh.txt"],
        "mv": ["mv", f"{dst}-mv-a.txt", f"{dst}-mv-b.txt"],
        "rm": ["rm", "-f", f"{dst}-rm.txt"],
        "cat": ["cat", f"{src}/f0.txt", f"{src}/f1.txt"],
        "rm_fresh": ["rm", "-f", f"{dst}-fresh.txt"],
        "cp_scanned": ["cp", f"{src}/f0.txt", f"{dst}-scan.txt"],
    }[kind]


def setup_tree(root: str, ops: Sequence[Op]) -> None:
    os.makedirs(os.path.join(root, "src"))
    os.makedirs(os.path.join(root, "dst"))
    os.makedirs(os.path.join(root, "other"))
    os.chmod(root, 0o777)  # noqa: S103 - the test user writes here
    os.chmod(os.path.join(root, "dst"), 0o777)  # noqa: S103
    for op in ops:
        if op.kind in ("cp", "cp_r", "tar", "cat", "cp_scanned"):
            d = os.path.join(root, "src", f"op{op.index:04d}")
            os.makedirs(d)
            for k in range(3):
                with open(os.path.join(d, f"f{k}.txt"), "w") as fh:
                    fh.write(f"op {op.index} file {k}\n" * 200)
        elif op.kind in ("mv", "rm"):
            name = "mv-a" if op.kind == "mv" else "rm"
            with open(os.path.join(root, "dst", f"op{op.index:04d}-{name}.txt"), "w") as fh:
                fh.write("to be moved or removed\n")


def run_op(op: Op, root: str, cleanup: Cleanup, rng: random.Random) -> None:
    if op.kind == "rm_fresh":
        # root writes the file a moment before the user removes it (fanotify's window is 5 s)
        pre = cleanup.spawn(
            ["sh", "-c", 'echo fresh > "$1"', "sh", f"dst/op{op.index:04d}-fresh.txt"], cwd=root
        )
        op.pre_pid = pre.pid
        pre.wait()
        cleanup.forget(pre)
        time.sleep(rng.uniform(0.0, 1.0))
    scanner = None
    if op.kind == "cp_scanned":
        scanner = cleanup.spawn(
            [USER_PYTHON, "-c", SCANNER],
            cwd="/",
            group=True,
            env={**os.environ, "SCAN_PATH": os.path.join(root, f"dst/op{op.index:04d}-scan.txt")},
        )
        op.pre_pid = scanner.pid
        time.sleep(0.2)
    argv = ["runuser", "-u", BENCH_USER, "--", "sh", "-c", 'echo $$; exec "$@" >/dev/null', "sh"]
    op.t0 = time.time()
    p = cleanup.spawn([*argv, *op.argv], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    op.runuser_pid = p.pid
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        cleanup.stop(p)
        out, err = b"", b"timeout"
    cleanup.forget(p)
    if scanner is not None:
        time.sleep(0.3)
        cleanup.kill_group(scanner)
    op.t1 = time.time()
    op.rc = p.returncode
    op.err = err.decode(errors="replace").strip()[:200]
    first = out.decode(errors="replace").split("\n", 1)[0].strip()
    op.child_pid = int(first) if first.isdigit() else 0


_PATH_OP = re.compile(r"^(?:src|dst)/op(\d{4})")
_OP_NUMBER = re.compile(r"(?<=op)\d{4}")


def classify(e: Event, truth: set[int], user: str) -> tuple[str, str]:
    """(exact_right | exact_wrong | inferred_right | inferred_wrong | none, detail)."""
    if e.attribution not in ("exact", "inferred"):
        return "none", ""
    if e.process_pid is not None:
        ok = e.process_pid in truth or e.process_parent_pid in truth
        if ok:
            detail = "" if e.user_name == user else "right process, user " + str(e.user_name)
        else:
            detail = "same user, other process" if e.user_name == user else "other user"
    else:
        ok = e.user_name == user
        detail = "" if ok else "other user"
    return f"{e.attribution}_{'right' if ok else 'wrong'}", detail


def accuracy_round(
    mode: str, bg_in_tree: bool, n_per_kind: int, seed: int, cleanup: Cleanup
) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = [k for k in OP_KINDS for _ in range(n_per_kind)]
    rng.shuffle(kinds)
    ops = [Op(i, k, op_argv(k, i)) for i, k in enumerate(kinds)]
    base = isolated(cleanup, "exfilwatch-bench-acc-")
    root = os.path.join(base, "project")
    state = os.path.join(base, "state")
    os.makedirs(state)
    setup_tree(root, ops)
    bg = cleanup.spawn(
        ["sh", "-c", BG_SCRIPT, "exfilwatch-bench-bg", os.path.join(root, "other")],
        cwd=root if bg_in_tree else "/",
        group=True,
    )
    time.sleep(0.3)
    sink = LineSink(keep=True)
    settings = ProcessSettings(enabled=True, interval=0.5, fanotify=mode)
    agent = Agent(
        agent_config(root, state, settings), router=Router([(sink, frozenset({"event"}))])
    )
    cleanup.stoppables.append(agent)
    agent.start()
    fan_active = agent.fanotify is not None
    sink.probe(agent.fanotify)
    time.sleep(1.0)
    work: queue.Queue[Op] = queue.Queue()
    for op in ops:
        work.put(op)

    def worker(wrng: random.Random) -> None:
        while True:
            try:
                op = work.get_nowait()
            except queue.Empty:
                return
            time.sleep(wrng.uniform(0.0, 0.3))
            run_op(op, root, cleanup, wrng)

    threads = [
        threading.Thread(target=worker, args=(random.Random(seed * 10 + k),), daemon=True)
        for k in range(2)
    ]
    t_ops = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops_s = time.monotonic() - t_ops
    time.sleep(2.0)  # the pipeline writes what is queued
    fan_stats = agent.fanotify.stats() if agent.fanotify is not None else None
    cleanup.kill_group(bg)
    time.sleep(PROBE_DELAYS[-1] + 0.2)  # the probe's last checks
    sink.stop_probe()
    agent.stop()
    cleanup.stoppables.remove(agent)
    records = sink.records()
    events = [from_dict(r) for r in records]
    by_index = {op.index: op for op in ops}
    bench_user = BENCH_USER
    started_pids = {e.process_pid for e in events if e.action == "process_started"}
    stats: dict[str, Counter[str]] = {k: Counter() for k in (*OP_KINDS, BG, PRE)}
    details: Counter[tuple[str, str, str, str, str]] = Counter()
    methods: dict[str, Counter[str]] = {}
    by_action: dict[str, Counter[str]] = {}
    unmapped = ambiguous = 0
    for e in events:
        if e.category != "file":
            continue
        rel = os.path.relpath(e.path, root)
        m = _PATH_OP.match(rel)
        if m is not None:
            op = by_index[int(m.group(1))]
            kind = op.kind
            truth = {op.runuser_pid, op.child_pid} - {0}
            user = bench_user
            if kind == "rm_fresh" and e.action != "deleted":
                kind, truth, user = PRE, {op.pre_pid}, "root"
            elif kind == "cp_scanned" and rel.endswith("-scan.txt") and e.action in _READS:
                ambiguous += 1  # the user's cp or the root scanner opened it: inotify can't say
                continue
        elif rel.startswith("other/"):
            kind = BG
            truth = {bg.pid}
            user = "root"
        else:
            unmapped += 1
            continue
        verdict, detail = classify(e, truth, user)
        stats[kind][verdict] += 1
        stats[kind]["events"] += 1
        if e.attribution == "exact" and e.user_name is None:
            stats[kind]["exact_no_user"] += 1
        late = sink.late.get(e.sequence)
        if late is not None:
            stats[kind]["fanotify_late"] += 1
            stats[kind]["fanotify_late_right"] += late[0] in truth
            stats[kind][f"fanotify_late_within_{late[1]:g}s"] += 1
        if detail:
            stats[kind][detail] += 1
        method = e.attribution_method or "none"
        methods.setdefault(method, Counter())[verdict.split("_")[-1]] += 1
        by_action.setdefault(e.action, Counter())[verdict] += 1
        if verdict.endswith("wrong") or detail:
            details[(kind, e.action, method, str(e.process_name), detail)] += 1
    failed = [
        {"kind": op.kind, "rc": op.rc, "err": op.err}
        for op in ops
        if op.rc != 0 or not op.child_pid
    ]
    seen = Counter(op.kind for op in ops if op.child_pid in started_pids)
    seen_runuser = Counter(op.kind for op in ops if op.runuser_pid in started_pids)
    return {
        "mode": mode,
        "bg_in_tree": bg_in_tree,
        "fanotify_active": fan_active,
        "ops": len(ops),
        "ops_seconds": ops_s,
        "failed_ops": failed[:10],
        "failed_count": len(failed),
        "unmapped_events": unmapped,
        "ambiguous_events": ambiguous,
        "per_kind": {k: dict(v) for k, v in stats.items()},
        "ops_per_kind": dict(Counter(op.kind for op in ops)),
        "seen_per_kind": dict(seen),
        "runuser_seen_per_kind": dict(seen_runuser),
        "methods": {k: dict(v) for k, v in methods.items()},
        "by_action": {k: dict(v) for k, v in by_action.items()},
        "wrong_patterns": [
            {
                "kind": k[0],
                "action": k[1],
                "method": k[2],
                "process": k[3],
                "detail": k[4],
                "events": c,
            }
            for k, c in details.most_common()
        ],
        "fanotify_stats": (
            {k: v for k, v in fan_stats.items() if k != "mark_errors"} if fan_stats else None
        ),
    }


def part_accuracy(
    args: argparse.Namespace, cleanup: Cleanup, fan_ok: bool, user: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {"user": user, "rounds": []}
    for bg_in_tree in (True, False):
        for mode in ["off"] + (["auto"] if fan_ok else []):
            progress(
                f"accuracy: fanotify {mode}, root job cwd {'in' if bg_in_tree else 'outside'} "
                f"the tree, {args.ops_per_kind} of each of {len(OP_KINDS)} commands"
            )
            out["rounds"].append(
                accuracy_round(mode, bg_in_tree, args.ops_per_kind, args.seed + 3, cleanup)
            )
    return out


# part 4: execs ---------------------------------------------------------------------------

# (kind, the program it needs): each run by the bench user on files of its own in the tree.
EXEC_KINDS: tuple[tuple[str, str], ...] = (
    ("cp", "cp"),
    ("cp_r", "cp"),
    ("tar", "tar"),
    ("zip", "zip"),
    ("gzip_c", "gzip"),
    ("rm", "rm"),
    ("rm_rf", "rm"),
    ("mv", "mv"),
    ("cat", "cat"),
    ("shred_u", "shred"),
    ("dd", "dd"),
    ("base64", "base64"),
    ("curl_T", "curl"),
    ("rsync", "rsync"),
    ("sh_exec_tar", "tar"),
)
# Exit codes a command ends with by design: curl uploads to a closed port (7: no connection).
EXEC_OK_RC: dict[str, frozenset[int]] = {"curl_T": frozenset({7})}
CLOSED_URL = "http://127.0.0.1:9/"
USER_SHELL = r"""
import json, os, subprocess, sys
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[1]))
for line in sys.stdin:
    p = subprocess.Popen(
        json.loads(line),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    print(json.dumps([p.pid, p.returncode, err.decode(errors="replace")[-200:]]), flush=True)
"""
# inotify actions grouped as the issue counts them.
OPERATIONS = {
    "opened": "open",
    "closed_nowrite": "open",
    "modified": "write",
    "closed_write": "write",
    "deleted": "delete",
    "moved_out": "delete",
    "moved": "rename",
    "created": "create",
    "moved_in": "create",
    "attributes_changed": "attrib",
}
OPERATION_NAMES = ("open", "write", "delete", "rename", "create", "attrib", "other")

# /bin/true at a fixed rate (posix_spawn, no shell), for `duration` seconds: the exec load.
SPAWNER = r"""
import os, sys, time
rate, duration = float(sys.argv[1]), float(sys.argv[2])
env = {"PATH": "/usr/bin:/bin"}
print("go", flush=True)
n, t0 = 0, time.monotonic()
while True:
    now = time.monotonic() - t0
    if now >= duration:
        break
    if n > now * rate:
        time.sleep(min(n / rate - now, duration - now))
        continue
    os.waitpid(os.posix_spawn("/bin/true", ["true"], env), 0)
    n += 1
print("done", n, time.monotonic() - t0, flush=True)
"""


def bench_user(cleanup: Cleanup) -> dict[str, Any]:
    """The unprivileged user commands run as: created when missing (and then removed at the
    end of the run), left alone when it was there before."""
    user = ensure_user(BENCH_USER)
    if user["created"]:
        cleanup.at_close(f"remove user {BENCH_USER}", lambda: remove_user(BENCH_USER))
    return user


@dataclass(slots=True)
class ExecOp:
    index: int
    kind: str
    argv: list[str]
    expect: tuple[str, ...]  # the argv the process at `pid` ends up running
    pid: int = 0
    rc: int | None = None
    err: str = ""

    @property
    def failed(self) -> bool:
        return self.rc not in EXEC_OK_RC.get(self.kind, frozenset({0}))


def exec_op(kind: str, i: int) -> ExecOp:
    src, dst = f"src/op{i:04d}", f"dst/op{i:04d}"
    tar = ["tar", "cf", f"{dst}-sh.tar", src]
    argv = {
        "cp": ["cp", f"{src}/f0.txt", f"{dst}-cp.txt"],
        "cp_r": ["cp", "-r", src, f"{dst}-tree"],
        "tar": ["tar", "cf", f"{dst}.tar", src],
        # zip and rsync write temporary files next to their output: a directory of the op's
        "zip": ["zip", "-q", "-r", f"{dst}-zip/out.zip", src],
        "gzip_c": ["gzip", "-c", f"{src}/f0.txt"],
        "rm": ["rm", "-f", f"{dst}-rm.txt"],
        "rm_rf": ["rm", "-rf", f"{dst}-rmrf"],
        "mv": ["mv", f"{dst}-mv-a.txt", f"{dst}-mv-b.txt"],
        "cat": ["cat", f"{src}/f0.txt", f"{src}/f1.txt"],
        # shred renames the file to 0, 00, ... in its directory before removing it
        "shred_u": ["shred", "-u", f"{dst}-shred/f.txt"],
        "dd": ["dd", f"if={src}/f0.txt", f"of={dst}-dd.bin", "bs=4096", "status=none"],
        "base64": ["base64", f"{src}/f0.txt"],
        "curl_T": ["curl", "-sS", "--max-time", "5", "-T", f"{src}/f0.txt", CLOSED_URL],
        "rsync": ["rsync", "-a", f"{src}/", f"{dst}-rsync/"],
        "sh_exec_tar": ["sh", "-c", shlex.join(["exec", *tar])],
    }[kind]
    return ExecOp(i, kind, argv, tuple(tar if kind == "sh_exec_tar" else argv))


def setup_exec_tree(root: str, ops: Sequence[ExecOp], uid: int, gid: int) -> None:
    """src/opN (three files root owns, readable) for every command; in dst/ the files and
    directories the user's commands remove, rename or write into, owned by the user."""
    src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
    os.makedirs(src)
    os.makedirs(dst)
    os.chmod(dst, 0o777)  # noqa: S103 - the test user writes here

    def mine(rel: str, text: str | None) -> None:
        """dst/REL (a file with `text`, else a directory) and its parents below dst/, the
        user's (rm -rf and shred need to write the directories too)."""
        path = os.path.join(dst, rel)
        if text is None:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text)
        while path != dst:
            os.chown(path, uid, gid)
            path = os.path.dirname(path)

    for op in ops:
        n = f"op{op.index:04d}"
        os.makedirs(os.path.join(src, n))
        for k in range(3):
            with open(os.path.join(src, n, f"f{k}.txt"), "w") as fh:
                fh.write(f"op {op.index} file {k}\n" * 200)
        for rel in {
            "rm": [f"{n}-rm.txt"],
            "mv": [f"{n}-mv-a.txt"],
            "rm_rf": [f"{n}-rmrf/a.txt", f"{n}-rmrf/sub/b.txt"],
            "shred_u": [f"{n}-shred/f.txt"],
        }.get(op.kind, []):
            mine(rel, "the user's own file\n" * 50)
        if op.kind == "zip":
            mine(f"{n}-zip", None)


class UserShell:
    """The bench user's shell: a python3 that drops to the user's uid and gid (no other
    groups) and then starts each command it is sent as a shell does (one fork, one exec, cwd
    the tree), reporting its pid, exit code and stderr. Commands have a parent of the user's,
    as in a terminal; forked from this root process, a command whose exec the agent could not
    read would be known as a root python (its parent's copy)."""

    def __init__(self, root: str, user: dict[str, Any], cleanup: Cleanup) -> None:
        self.cleanup = cleanup
        self.proc = cleanup.spawn(
            [USER_PYTHON, "-c", USER_SHELL, str(user["uid"]), str(user["gid"])],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            group=True,
        )

    def run(self, op: ExecOp) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(op.argv).encode() + b"\n")
        self.proc.stdin.flush()
        op.pid, op.rc, op.err = json.loads(readline_by(self.proc, time.monotonic() + 60.0))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        self.cleanup.kill_group(self.proc)


def wait_for_line(sink: LineSink, path: str, timeout: float, rewrite: bool) -> float:
    """Write `path` (a file in the watched tree) and wait until a line naming it reaches the
    sink: the agent's file source is up (`rewrite`: written again every 0.5 s until then,
    watches may still be being added), or everything queued before it was written out (one
    tagged lane, in order). Returns the seconds it took; raises BenchError at the deadline."""
    t0 = time.monotonic()
    deadline, next_write, seen = t0 + timeout, t0, 0
    while True:
        now = time.monotonic()
        if now >= next_write:
            with open(path, "w") as fh:
                fh.write("mark\n")
            next_write = now + 0.5 if rewrite else float("inf")
        new = sink.since(seen)
        seen += len(new)
        if any(path in line for line in new):
            return time.monotonic() - t0
        if now > deadline:
            raise BenchError(f"no event for {path} within {timeout:g} s")
        time.sleep(0.01)


def procsnap_pid(agent: Agent) -> int | None:
    """The pid of the agent's `python -m agent.sources.procsnap` child (None: polling)."""
    parts = agent.parts
    if parts is None or parts.proc_events is None:
        return None
    pid = parts.proc_events.stats().get("pid")
    if isinstance(pid, int):
        return pid
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "agent.sources.procsnap" in child.cmdline():
                return child.pid
    return None


def judge(
    e: Event, truth: set[int], user: str, parents: dict[int, int] | None = None
) -> tuple[str, bool, bool, bool]:
    """classify()'s verdict, and whether the event names the right user, the right process
    (the command's, or a child of it; with `parents`, pid -> parent pid as the events told,
    any descendant: rsync writes from a grandchild, its receiver), and anyone wrong (another
    process, or another user, the right process with another user included)."""
    if parents and e.process_pid is not None and e.process_pid not in truth:
        pid: int | None = e.process_parent_pid
        for _ in range(4):
            if pid is None or pid in truth:
                break
            pid = parents.get(pid)
        if pid is not None and pid in truth:
            truth = truth | {e.process_pid}
    verdict, _ = classify(e, truth, user)
    user_ok = e.user_name == user
    proc_ok = e.process_pid is not None and (
        e.process_pid in truth or e.process_parent_pid in truth
    )
    wrong = verdict.endswith("_wrong") or (
        verdict != "none" and e.user_name is not None and e.user_name != user
    )
    return verdict, user_ok, proc_ok, wrong


def execs_round(
    source: str,
    fan_mode: str,
    kinds: Sequence[str],
    runs: int,
    seed: int,
    user: dict[str, Any],
    cleanup: Cleanup,
) -> dict[str, Any]:
    rng = random.Random(seed)
    plan = [k for k in kinds for _ in range(runs)]
    rng.shuffle(plan)
    ops = [exec_op(k, i) for i, k in enumerate(plan)]
    base = isolated(cleanup, "exfilwatch-bench-execs-")
    root = os.path.join(base, "project")
    state = os.path.join(base, "state")
    os.makedirs(state)
    setup_exec_tree(root, ops, user["uid"], user["gid"])
    sink = LineSink(keep=True)
    settings = ProcessSettings(enabled=True, interval=0.5, fanotify=fan_mode, source=source)
    agent = Agent(
        agent_config(root, state, settings), router=Router([(sink, frozenset({"event"}))])
    )
    cleanup.stoppables.append(agent)
    agent.start()
    kernel_active = procsnap_pid(agent) is not None
    fan_active = agent.fanotify is not None
    ready_s = wait_for_line(sink, os.path.join(root, "ready.txt"), 15.0, rewrite=True)
    work: queue.Queue[ExecOp] = queue.Queue()
    for op in ops:
        work.put(op)

    shells = [UserShell(root, user, cleanup) for _ in range(2)]

    def worker(wrng: random.Random, shell: UserShell) -> None:
        while True:
            try:
                op = work.get_nowait()
            except queue.Empty:
                return
            time.sleep(wrng.uniform(0.0, 0.1))
            shell.run(op)

    threads = [
        threading.Thread(target=worker, args=(random.Random(seed * 10 + k), shell), daemon=True)
        for k, shell in enumerate(shells)
    ]
    t_ops = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops_s = time.monotonic() - t_ops
    for shell in shells:
        shell.close()
    drain_s = wait_for_line(sink, os.path.join(root, "done.txt"), 60.0, rewrite=False)
    table_stats = agent.processes.stats() if agent.processes is not None else {}
    agent.stop()
    cleanup.stoppables.remove(agent)
    events = [from_dict(r) for r in sink.records()]
    by_index = {op.index: op for op in ops}
    started: dict[int, list[tuple[str, ...]]] = {}
    for e in events:
        if e.action == "process_started" and e.process_pid is not None:
            started.setdefault(e.process_pid, []).append(tuple(e.process_args))
    execs: dict[str, Counter[str]] = {k: Counter() for k in kinds}
    other_argv: list[dict[str, Any]] = []
    for op in ops:
        if not op.pid:
            continue
        c = execs[op.kind]
        c["runs"] += 1
        seen = started.get(op.pid, [])
        c["pid_seen"] += bool(seen)
        c["full_argv"] += op.expect in seen
        if seen and op.expect not in seen and len(other_argv) < 10:
            other_argv.append({"kind": op.kind, "expected": op.expect, "seen": seen[:3]})
    files: dict[str, Counter[str]] = {k: Counter() for k in (*kinds, *OPERATION_NAMES)}
    parents = {
        e.process_pid: e.process_parent_pid
        for e in events
        if e.process_pid is not None and e.process_parent_pid is not None
    }
    methods: dict[str, Counter[str]] = {}
    wrong: Counter[tuple[str, str, str, str, str]] = Counter()
    unattributed: Counter[tuple[str, str, str, str]] = Counter()
    unmapped = 0
    for e in events:
        if e.category != "file":
            continue
        m = _PATH_OP.match(os.path.relpath(e.path, root))
        if m is None:
            unmapped += 1  # the ready/done marks, the tree's own directories
            continue
        op = by_index[int(m.group(1))]
        verdict, user_ok, proc_ok, is_wrong = judge(e, {op.pid} - {0}, BENCH_USER, parents)
        method = e.attribution_method or "none"
        for key in (op.kind, OPERATIONS.get(e.action, "other")):
            c = files[key]
            c["events"] += 1
            c["user_ok"] += user_ok
            c["process_ok"] += proc_ok
            c["wrong"] += is_wrong
            c["none"] += verdict == "none"
            c[f"method:{method}"] += 1
        methods.setdefault(method, Counter())["wrong" if is_wrong else "ok"] += 1
        if is_wrong:
            wrong[(op.kind, e.action, method, str(e.process_name), str(e.user_name))] += 1
        elif not user_ok:
            # Which files of which command go without their user: the name with the
            # operation's number taken out, so the same miss in 20 runs is one row.
            name = _OP_NUMBER.sub("N", os.path.relpath(e.path, root))
            unattributed[(op.kind, e.action, method, name)] += 1
    failed = [op for op in ops if op.failed]
    return {
        "source": source,
        "fanotify": fan_mode,
        "kernel_active": kernel_active,
        "fanotify_active": fan_active,
        "ops": len(ops),
        "ops_seconds": ops_s,
        "ready_seconds": ready_s,
        "drain_seconds": drain_s,
        "failed_count": len(failed),
        "failed_ops": [{"kind": op.kind, "rc": op.rc, "err": op.err} for op in failed[:10]],
        "execs": {k: dict(v) for k, v in execs.items()},
        "other_argv": other_argv,
        "files": {k: dict(v) for k, v in files.items()},
        "methods": {k: dict(v) for k, v in methods.items()},
        "unmapped_events": unmapped,
        "wrong_patterns": [
            {"kind": k[0], "action": k[1], "method": k[2], "process": k[3], "user": k[4], "n": n}
            for k, n in wrong.most_common(10)
        ],
        "no_user_patterns": [
            {"kind": k[0], "action": k[1], "method": k[2], "path": k[3], "n": n}
            for k, n in unattributed.most_common(10)
        ],
        "process_table": {
            k: table_stats.get(k) for k in ("polls", "new", "exec_read", "exec_unread")
        },
    }


class AgentCPU:
    """CPU seconds of the in-process agent and of its procsnap child, exact (the scheduler's
    nanosecond clocks, not 10 ms ticks). The agent's is this process's less the calling
    thread's (the bench's own, which wakes every second to sample: on a VM where waking an
    idle CPU costs milliseconds, counting it made an idle agent look like 1-2% of a core)."""

    def __init__(self, agent: Agent) -> None:
        pid = procsnap_pid(agent)
        self.child = psutil.Process(pid) if pid is not None else None
        self._tasks = f"/proc/{pid}/task" if pid is not None else None

    def _child_seconds(self) -> float:
        if self._tasks is None:
            return 0.0
        total = 0
        try:
            for tid in os.listdir(self._tasks):
                with contextlib.suppress(OSError), open(f"{self._tasks}/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[0])
        except OSError:
            pass
        return total / 1e9

    def read(self) -> tuple[float, float]:
        return time.process_time() - time.thread_time(), self._child_seconds()

    def total(self) -> float:
        return sum(self.read())


def readline_by(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """A line of `proc`'s stdout, or BenchError when none came by `deadline` (monotonic)."""
    assert proc.stdout is not None
    while not select.select([proc.stdout], [], [], 0.1)[0]:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise BenchError(f"pid {proc.pid}: no output by the deadline")
    return proc.stdout.readline().decode(errors="replace").strip()


def exec_cost(source: str, duration: float, rate: float, cleanup: Cleanup) -> dict[str, Any]:
    """The agent's CPU (and its child's) idle, then under `rate` execs/s, for `duration` s."""
    base = cleanup.mkdtemp("exfilwatch-bench-execcost-")
    root = os.path.join(base, "tree")
    state = os.path.join(base, "state")
    os.makedirs(root)
    os.makedirs(state)
    sink = LineSink(keep=False)
    settings = ProcessSettings(enabled=True, interval=0.5, source=source)
    agent = Agent(
        agent_config(root, state, settings), router=Router([(sink, frozenset({"event"}))])
    )
    cleanup.stoppables.append(agent)
    agent.start()
    table = agent.processes
    assert table is not None
    cpu = AgentCPU(agent)
    # Settled: start-up work (imports, the first read of every process) is over when a half
    # second costs under 2% of a core.
    settle_deadline = time.monotonic() + 15.0
    settled = False
    while not settled and time.monotonic() < settle_deadline:
        c0, w0 = cpu.total(), time.perf_counter()
        time.sleep(0.5)
        settled = (cpu.total() - c0) / (time.perf_counter() - w0) < 0.02

    def counters() -> tuple[float, float, float, int, int, int, int, int]:
        a, c = cpu.read()
        s = table.stats()
        return (
            time.perf_counter(),
            a,
            c,
            sink.count,
            s["exec_read"],
            s["exec_unread"],
            s["new"],
            s["polls"],
        )

    def phase(
        name: str,
        before: tuple[Any, ...],
        execs: int | None = None,
        spawner_s: float = 0.0,
        windows: Sequence[float] = (),
    ) -> dict[str, Any]:
        after = counters()
        wall, agent_s, child_s = (after[i] - before[i] for i in range(3))
        read, unread, new, polls = (after[i] - before[i] for i in range(4, 8))
        out: dict[str, Any] = {
            "source": source,
            "kernel_active": cpu.child is not None,
            "phase": name,
            "wall_s": wall,
            "agent_cpu_s": agent_s,
            "child_cpu_s": child_s,
            "core_pct": pct(agent_s + child_s, wall),
            "core_pct_median_1s": median(windows) if windows else None,
            "process_events": after[3] - before[3],
            "kernel_execs_read": read,
            "kernel_execs_unread": unread,
            "polls": polls,
            "new_processes": new,
        }
        if execs is not None:
            idle = out_phases[0]
            idle_rate = (idle["agent_cpu_s"] + idle["child_cpu_s"]) / idle["wall_s"]
            out["execs"] = execs
            out["execs_per_s"] = execs / spawner_s if spawner_s else float("nan")
            out["us_cpu_per_exec"] = (agent_s + child_s) / max(1, execs) * 1e6
            out["us_cpu_per_exec_net"] = (
                (agent_s + child_s - idle_rate * wall) / max(1, execs) * 1e6
            )
        return out

    out_phases: list[dict[str, Any]] = []
    out: dict[str, Any] = {"source": source, "settled": settled, "phases": out_phases}
    gc.collect()
    before = counters()
    # One-second windows too: their median is what the agent costs when the machine's other
    # processes are quiet (their starts are work for both sources).
    windows: list[float] = []
    end = time.monotonic() + duration
    last_cpu, last_wall = cpu.total(), time.perf_counter()
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))  # the measurement window itself
        now_cpu, now_wall = cpu.total(), time.perf_counter()
        windows.append(pct(now_cpu - last_cpu, now_wall - last_wall))
        last_cpu, last_wall = now_cpu, now_wall
    out_phases.append(phase("idle", before, windows=windows))
    spawner = cleanup.spawn(
        [PYTHON, "-c", SPAWNER, str(rate), str(duration)],
        stdout=subprocess.PIPE,
        cwd="/",
        group=True,
    )
    readline_by(spawner, time.monotonic() + 15.0)  # "go"
    before = counters()
    done = readline_by(spawner, time.monotonic() + duration + 30.0).split()
    execs, spawner_s = (int(done[1]), float(done[2])) if len(done) == 3 else (0, 0.0)
    cleanup.kill_group(spawner)
    # Caught up: the kernel source has read as many execs as were made (others on the machine
    # count too), or the poll after the load ran.
    polls_done = table.polls
    catch_deadline = time.monotonic() + 10.0
    while time.monotonic() < catch_deadline:
        s = table.stats()
        if cpu.child is not None:
            if s["exec_read"] + s["exec_unread"] - before[4] - before[5] >= execs:
                break
        elif s["polls"] > polls_done:
            break
        time.sleep(0.01)
    out_phases.append(phase(f"{rate:.0f} execs/s", before, execs, spawner_s))
    agent.stop()
    cleanup.stoppables.remove(agent)
    return out


def part_execs(
    args: argparse.Namespace, cleanup: Cleanup, fan_ok: bool, user: dict[str, Any]
) -> dict[str, Any]:
    kinds = [k for k, tool in EXEC_KINDS if shutil.which(tool)]
    skipped = {k: f"{tool} not installed" for k, tool in EXEC_KINDS if not shutil.which(tool)}
    out: dict[str, Any] = {
        "user": user,
        "runs": args.exec_runs,
        "kinds": kinds,
        "skipped": skipped,
        "rounds": [],
        "cost": [],
    }
    rounds = [("kernel", "off"), ("poll", "off")] + ([("kernel", "auto")] if fan_ok else [])
    for source, fan_mode in rounds:
        progress(
            f"execs: source {source}, fanotify {fan_mode}: {args.exec_runs} runs of each of "
            f"{len(kinds)} commands"
        )
        out["rounds"].append(
            execs_round(source, fan_mode, kinds, args.exec_runs, args.seed + 4, user, cleanup)
        )
    for source in ("kernel", "poll"):
        progress(
            f"execs: cost, source {source}: idle and {args.exec_rate:.0f} execs/s, "
            f"{args.duration:.0f} s each"
        )
        out["cost"].append(exec_cost(source, args.duration, args.exec_rate, cleanup))
    return out


# report ----------------------------------------------------------------------------------


def f1(x: float) -> str:
    return f"{x:.1f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def report_cost(c: dict[str, Any]) -> list[str]:
    out = ["", f"Cost ({c['processes']} processes at start, churn {c['churn_per_s']}/s)"]
    fp = c["fresh_poll"]
    loop = c["poll_loop"]
    out.append(
        f"  psutil.pids(): {c['pids_us']:.0f} us; fresh poll of {fp['processes_read']} "
        f"processes: {fp['wall_ms']:.1f} ms wall, {fp['us_per_process_cpu']:.0f} us CPU per "
        "process read"
    )
    out.append(
        f"  poll loop (poll + process_event every {loop['interval_s']} s, "
        f"{loop['wall_s']:.0f} s): {loop['core_pct']:.3f}% of one core; {loop['polls']} polls, "
        f"{loop['new_processes']} new processes"
    )
    p90 = loop["idle_poll_us_cpu_p90"]
    out.append(
        f"    poll with no new process: {loop['idle_poll_us_cpu']:.0f} us CPU "
        f"({loop['idle_poll_us_wall']:.0f} us wall, p90 CPU "
        f"{p90:.0f} us); per new process read: {loop['per_new_process_us_cpu']:.0f} us CPU "
        f"({loop['per_new_process_us_wall']:.0f} us wall)"
        if p90 is not None
        else f"    poll with no new process: {loop['idle_poll_us_cpu']:.0f} us CPU"
    )
    rows = []
    base = c["agent"][0]["core_pct"] if c["agent"] else 0.0
    for r in c["agent"]:
        rows.append(
            [
                r["mode"],
                f1(r["wall_s"]),
                f"{r['cpu_s']:.3f}",
                f"{r['core_pct']:.3f}",
                f"{r['core_pct'] - base:+.3f}",
                r["polls"],
                r["process_events"],
                f"{r.get('fanotify_records_per_s', 0.0):.0f}" if r["fanotify"] else "-",
            ]
        )
    out.append("")
    out.append("  Idle agent, this process's CPU (goal: polling + attribution <= 1% of a core)")
    out.append(
        "\n".join(
            "  " + line
            for line in table(
                [
                    "agent",
                    "wall s",
                    "CPU s",
                    "% core",
                    "vs disabled",
                    "polls",
                    "proc events",
                    "fan rec/s",
                ],
                rows,
            ).splitlines()
        )
    )
    fl = c.get("fanotify_load")
    if fl:
        out.append(
            f"  fanotify, {fl['opens_per_s']:.0f} opens/s elsewhere on the marked mount: "
            f"{fl['records_per_s']:.0f} records/s read, {fl['core_pct']:.2f}% of a core, "
            f"{fl['us_per_record']:.1f} us CPU per record (all filtered out: "
            f"{fl['outside_skipped']} of {fl['records']})"
        )
    return out


def report_burst(b: dict[str, Any]) -> list[str]:
    out = ["", f"Burst of {b['events']:,} file events ({b['processes']} processes on the machine)"]
    rows = []
    for name, v in b["variants"].items():
        counters = ", ".join(f"{k} {n}" for k, n in v["counters"].items() if n)
        rows.append(
            [name, f1(v["wall_ms"]), f2(v["us_per_event"]), f"{v['events_per_s']:,.0f}", counters]
        )
    out.append(
        "\n".join(
            "  " + line
            for line in table(
                ["Attributor", "ms", "us/event", "events/s", "methods"], rows
            ).splitlines()
        )
    )
    rows = []
    bare = b["pipeline"].get("bare")
    for name, v in b["pipeline"].items():
        rows.append(
            [
                name,
                f1(v["ms"]),
                f2(v["us_per_event"]),
                f"{v['events_per_s']:,.0f}",
                f2(bare["ms"] / v["ms"]) if bare else "-",
            ]
        )
    out.append("")
    out.append(
        "\n".join(
            "  " + line
            for line in table(
                ["Pipeline._process", "ms", "us/event", "events/s", "vs bare"], rows
            ).splitlines()
        )
    )
    return out


def report_catch(c: dict[str, Any]) -> list[str]:
    out = ["", f"Shortest-lived process caught ({c['processes']} processes, n={c['n']} each)"]
    rounds = c["rounds"]
    headers = ["sleep ms", "lifetime ms"]
    for r in rounds:
        iv = r["interval_s"]
        headers += [f"caught@{iv}s", f"as sleep@{iv}s", f"expect@{iv}s"]
    rows = []
    for i, ms in enumerate(LIFETIMES_MS):
        row: list[Any] = [ms, f1(rounds[0]["rows"][i]["measured_lifetime_ms"])]
        for r in rounds:
            x = r["rows"][i]
            row += [
                f"{100 * x['caught']:.0f}%",
                f"{100 * x['caught_as_sleep']:.0f}%",
                f"{100 * x['expected']:.0f}%",
            ]
        rows.append(row)
    out.append("\n".join("  " + line for line in table(headers, rows).splitlines()))
    out.append(
        "  median poll: "
        + ", ".join(f"{r['poll_us_median'] / 1e3:.1f} ms @ {r['interval_s']} s" for r in rounds)
    )
    for r in rounds:
        for x in r["rows"]:
            if x["caught_other"]:
                out.append(
                    f"  @{r['interval_s']} s, sleep {x['lifetime_ms']} ms caught as something "
                    f"else: {x['caught_other']}"
                )
    return out


def report_accuracy(a: dict[str, Any]) -> list[str]:
    u = a["user"]
    out = [
        "",
        f"Accuracy (user {u['name']} uid {u['uid']}, {'created' if u['created'] else 'existed'})",
    ]
    cols = ("exact_right", "exact_wrong", "inferred_right", "inferred_wrong", "none")
    for r in a["rounds"]:
        out.append("")
        out.append(
            f"  fanotify {r['mode']} (active: {r['fanotify_active']}), root job's cwd "
            f"{'= the tree' if r['bg_in_tree'] else '= /'}: {r['ops']} commands in "
            f"{r['ops_seconds']:.0f} s, {r['failed_count']} failed, "
            f"{r['unmapped_events']} unmapped events, {r['ambiguous_events']} ambiguous (reads of "
            "cp_scanned targets, left out)"
        )
        rows = []
        fan = r["fanotify_active"]
        total: Counter[str] = Counter()
        users: Counter[str] = Counter()
        for kind in (*OP_KINDS, BG, PRE):
            s = Counter(r["per_kind"].get(kind, {}))
            total.update(s)
            if kind in OP_KINDS:
                users.update(s)
            n = s["events"]
            ops_n = r["ops_per_kind"].get(kind, 0)
            seen = f"{pct(r['seen_per_kind'].get(kind, 0), ops_n):.0f}%" if ops_n else "-"
            late = f1(pct(s["fanotify_late"], n)) if fan else "-"
            nouser = f1(pct(s["exact_no_user"], n)) if fan else "-"
            rows.append([kind, n, *(f1(pct(s[c], n)) for c in cols), seen, late, nouser])
        for name, counts in (("user commands", users), ("overall", total)):
            n = counts["events"]
            late = f1(pct(counts["fanotify_late"], n)) if fan else "-"
            nouser = f1(pct(counts["exact_no_user"], n)) if fan else "-"
            seen = (
                f"{pct(sum(r['seen_per_kind'].values()), r['ops']):.0f}%"
                if name == "user commands"
                else ""
            )
            rows.append([name, n, *(f1(pct(counts[c], n)) for c in cols), seen, late, nouser])
        out.append(
            "\n".join(
                "    " + line
                for line in table(
                    [
                        "command",
                        "events",
                        "exact ok%",
                        "exact WRONG%",
                        "infer ok%",
                        "infer WRONG%",
                        "none%",
                        "seen",
                        "fan late%",
                        "exact no-user%",
                    ],
                    rows,
                ).splitlines()
            )
        )
        if fan and users["events"]:
            n = users["events"]
            steps = ", ".join(
                f"{f1(pct(users[f'fanotify_late_within_{d:g}s'], n))}% within {d * 1e3:.0f} ms"
                for d in (0.0, *PROBE_DELAYS)
            )
            out.append(
                f"    user-command events fanotify had only after they were attributed: {steps} "
                f"(0 ms: at write); the late record named the right process for "
                f"{f1(pct(users['fanotify_late_right'], users['fanotify_late']))}% of them"
            )
        mrows = [
            [
                m,
                v.get("right", 0) + v.get("wrong", 0) + v.get("none", 0),
                v.get("right", 0),
                v.get("wrong", 0),
            ]
            for m, v in sorted(r["methods"].items())
        ]
        out.append("    by method:")
        out.append(
            "\n".join(
                "      " + line
                for line in table(["method", "events", "right", "wrong"], mrows).splitlines()
            )
        )
        if r["wrong_patterns"]:
            out.append("    most common wrong (or right-process-wrong-user) attributions:")
            prow = [
                [p["kind"], p["action"], p["method"], p["process"], p["detail"], p["events"]]
                for p in r["wrong_patterns"][:10]
            ]
            out.append(
                "\n".join(
                    "      " + line
                    for line in table(
                        ["command", "action", "method", "named", "detail", "events"], prow
                    ).splitlines()
                )
            )
        if r["failed_ops"]:
            out.append(f"    failed commands (first): {r['failed_ops'][:3]}")
    return out


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _pcts(c: dict[str, int], keys: Sequence[str]) -> list[str]:
    n = c.get("events", 0)
    return [f1(pct(c.get(k, 0), n)) if n else "-" for k in keys]


def report_execs(x: dict[str, Any]) -> list[str]:
    u = x["user"]
    out = [
        "",
        f"Exec events and file attribution (user {u['name']} uid {u['uid']}, "
        f"{'created' if u['created'] else 'existed'}; {x['runs']} runs of each command)",
    ]
    if x["skipped"]:
        out.append(
            "  skipped: " + ", ".join(f"{k} ({why})" for k, why in sorted(x["skipped"].items()))
        )
    rounds = x["rounds"]

    def label(r: dict[str, Any]) -> str:
        name = r["source"] if r["source"] == "poll" or r["kernel_active"] else "kernel(POLL!)"
        return name + (f"+fan {r['fanotify']}" if r["fanotify"] != "off" else "")

    out.append("")
    out.append(
        "  process_started with the command's full argv at its pid (goal >= 99%); "
        "in brackets: its pid seen with any argv"
    )
    rows = []
    for kind in [*x["kinds"], "all"]:
        row: list[Any] = [kind]
        for r in rounds:
            e = r["execs"]
            c = (
                Counter(e.get(kind, {}))
                if kind != "all"
                else sum((Counter(v) for v in e.values()), Counter())
            )
            runs = c["runs"]
            row.append(
                f"{pct(c['full_argv'], runs):.0f}% ({pct(c['pid_seen'], runs):.0f}%) of {runs}"
                if runs
                else "-"
            )
        rows.append(row)
    out.append(_indent(table(["command", *(label(r) for r in rounds)], rows), 4))
    for r in rounds:
        if r["other_argv"]:
            out.append(f"    {label(r)}, seen with another argv (first): {r['other_argv'][:2]}")
    cols = ("user_ok", "process_ok", "wrong", "none")
    for r in rounds:
        out.append("")
        pt = r["process_table"]
        out.append(
            f"  File events, source {label(r)} (goal: user 100%, process >= 95%, wrong 0%): "
            f"{r['ops']} commands in {r['ops_seconds']:.0f} s, {r['failed_count']} failed, "
            f"{r['unmapped_events']} unmapped events; table: {pt['exec_read']} execs read, "
            f"{pt['exec_unread']} gone before read, {pt['polls']} polls"
        )
        rows = []
        total: Counter[str] = Counter()
        for key in [*x["kinds"], "all commands", *OPERATION_NAMES]:
            counts: dict[str, int] = dict(total) if key == "all commands" else r["files"][key]
            if key in x["kinds"]:
                total.update(counts)
            elif key != "all commands" and not counts.get("events"):
                continue
            top = Counter(
                {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("method:")}
            ).most_common(3)
            methods = ", ".join(f"{m} {f1(pct(v, counts.get('events', 0)))}" for m, v in top)
            op_row = key in OPERATION_NAMES
            rows.append(
                [
                    ("op " if op_row else "") + key,
                    counts.get("events", 0),
                    *_pcts(counts, cols),
                    methods,
                ]
            )
        out.append(
            _indent(
                table(
                    [
                        "command / op",
                        "events",
                        "user ok%",
                        "proc ok%",
                        "WRONG%",
                        "none%",
                        "methods",
                    ],
                    rows,
                ),
                4,
            )
        )
        if r["wrong_patterns"]:
            prow = [
                [p["kind"], p["action"], p["method"], p["process"], p["user"], p["n"]]
                for p in r["wrong_patterns"][:6]
            ]
            out.append("    wrong (most common):")
            out.append(
                _indent(
                    table(["command", "action", "method", "process", "user", "events"], prow), 6
                )
            )
        if r["no_user_patterns"]:
            prow = [
                [p["kind"], p["action"], p["method"], p["path"], p["n"]]
                for p in r["no_user_patterns"][:6]
            ]
            out.append("    without the right user (most common; N: the run's number):")
            out.append(_indent(table(["command", "action", "method", "path", "events"], prow), 6))
        if r["failed_ops"]:
            out.append(f"    failed commands (first): {r['failed_ops'][:3]}")
    out.append("")
    out.append(
        "  Cost: the agent's process + its procsnap child, CPU over wall (goal idle <= 1% of a "
        "core); the load's spawner not counted"
    )
    rows = []
    for c in x["cost"]:
        for ph in c["phases"]:
            kernel = ph["kernel_active"]
            rows.append(
                [
                    c["source"] if c["source"] == "poll" or kernel else "kernel(POLL!)",
                    ph["phase"],
                    f1(ph["wall_s"]),
                    f"{ph['agent_cpu_s']:.3f}",
                    f"{ph['child_cpu_s']:.3f}" if kernel else "-",
                    f"{ph['core_pct']:.2f}",
                    f"{ph['core_pct_median_1s']:.2f}" if ph["core_pct_median_1s"] else "-",
                    f"{ph['execs_per_s']:.0f}" if "execs" in ph else "-",
                    f"{ph['us_cpu_per_exec']:.0f}" if "execs" in ph else "-",
                    f"{ph['us_cpu_per_exec_net']:.0f}" if "execs" in ph else "-",
                    ph["process_events"],
                    ph["kernel_execs_read"] if kernel else ph["new_processes"],
                    ph["kernel_execs_unread"] if kernel else "-",
                ]
            )
    out.append(
        _indent(
            table(
                [
                    "source",
                    "phase",
                    "wall s",
                    "agent CPU s",
                    "child CPU s",
                    "% core",
                    "median 1 s",
                    "execs/s",
                    "us CPU/exec",
                    "net of idle",
                    "proc events",
                    "execs read/new",
                    "gone before read",
                ],
                rows,
            ),
            4,
        )
    )
    return out


def report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    fan = meta["fanotify"]
    out = [
        f"exfilwatch attribution benchmark: {meta['cpus']} CPUs, load1 {meta['load1']:.2f}, "
        f"Python {meta['python']}, fanotify "
        + (
            "available and lookup works"
            if fan["available"] and fan["lookup_works"]
            else f"unavailable ({fan['why']})"
        )
    ]
    if "cost" in result:
        out += report_cost(result["cost"])
    if "burst" in result:
        out += report_burst(result["burst"])
    if "catch" in result:
        out += report_catch(result["catch"])
    if "accuracy" in result:
        out += report_accuracy(result["accuracy"])
    if "execs" in result:
        out += report_execs(result["execs"])
    return "\n".join(out)


# main ------------------------------------------------------------------------------------

PARTS = ("cost", "burst", "catch", "accuracy", "execs")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer samples, shorter runs")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="JSON to stdout, or to FILE")
    ap.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS)
    )
    ap.add_argument("--procs", type=int, default=500, help="processes on the machine")
    ap.add_argument("--churn", type=float, default=4.0, help="short processes started per second")
    ap.add_argument("--duration", type=float, default=None, help="seconds per cost run (60)")
    ap.add_argument("--events", type=int, default=10_000, help="burst size")
    ap.add_argument("--catch-n", type=int, default=None, help="processes per lifetime (50)")
    ap.add_argument("--ops-per-kind", type=int, default=None, help="commands of each kind (20)")
    ap.add_argument("--exec-runs", type=int, default=20, help="runs of each command (execs)")
    ap.add_argument("--exec-rate", type=float, default=500.0, help="execs/s of the exec load")
    ap.add_argument("--fan-rate", type=float, default=1000.0, help="opens/s outside the tree")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 12.0 if args.quick else 60.0
    if args.catch_n is None:
        args.catch_n = 10 if args.quick else 50
    if args.ops_per_kind is None:
        args.ops_per_kind = 5 if args.quick else 20
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {sorted(unknown)}")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("run as root (runuser, useradd, fanotify)", file=sys.stderr)
        return 2
    configure("warning")  # the agent's operational logs on stderr, info records silenced
    cleanup = Cleanup()
    result: dict[str, Any] = {}
    with interruptible():
        try:
            fan = fanotify_check(cleanup)
            fan_ok = bool(fan["available"] and fan["lookup_works"])
            result["meta"] = {
                "cpus": os.cpu_count(),
                "load1": os.getloadavg()[0],
                "python": sys.version.split()[0],
                "fanotify": fan,
                "quick": args.quick,
                "args": {k: v for k, v in vars(args).items() if k != "json"},
            }
            progress(f"fanotify: {fan}")
            parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                ("cost", lambda: part_cost(args, cleanup, fan_ok)),
                ("burst", lambda: part_burst(args, cleanup, fan_ok)),
                ("catch", lambda: part_catch(args, cleanup)),
            ]
            idle = 0
            for name, run in parts:
                if name not in args.parts:
                    continue
                # Topped up before each part: other work on the machine comes and goes.
                idle += len(populate(args.procs, cleanup))
                time.sleep(0.5)
                progress(f"{idle} idle sleep children, {len(psutil.pids())} processes")
                result[name] = run()
            for p in list(cleanup.procs):  # the idle population goes before the accuracy part
                cleanup.stop(p)
            user = bench_user(cleanup) if {"accuracy", "execs"} & set(args.parts) else None
            if "accuracy" in args.parts and user is not None:
                result["accuracy"] = part_accuracy(args, cleanup, fan_ok, user)
            if "execs" in args.parts and user is not None:
                result["execs"] = part_execs(args, cleanup, fan_ok, user)
            result["meta"]["load1_end"] = os.getloadavg()[0]
        finally:
            cleanup.close()
    emit(result, args.json, lambda: print(report(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
