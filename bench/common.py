"""Helpers shared by the benchmarks in bench/ (each run as ``python bench/NAME.py``).

Run that way, Python puts bench/ first on ``sys.path``, so ``from common import ...`` works
from any working directory; the ``agent`` package comes from the environment the interpreter
belongs to (``pip install -e .`` in the checkout's venv). Nothing here imports ``agent``, so a
bench that runs the agent as a command still runs while the package is half-edited.

Standard library and psutil only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import pwd
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES_DIR = os.path.join(REPO, "rules")
# The interpreter running the bench: children (generators, helpers, memory probes) run on it,
# so a bench measures the checkout installed in the environment it was started from.
PYTHON = sys.executable
MB = 1024 * 1024


class BenchError(Exception):
    """The benchmark cannot go on (a tool did not start, a tree cannot be built)."""


def progress(message: str) -> None:
    """A progress line on stderr (results go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def exfilwatch_command() -> str:
    """The ``exfilwatch`` command installed next to the running interpreter."""
    return os.path.join(os.path.dirname(sys.executable), "exfilwatch")


# numbers ---------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def pct(n: float, d: float) -> float:
    return 100.0 * n / d if d else float("nan")


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default), so
    p99 of a handful of samples is close to their maximum, not an extrapolation. None when
    there are no samples."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    """a / b rounded, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


# tables ----------------------------------------------------------------------------------


def cell(v: Any) -> str:
    """One table cell: None '-', bools yes/no, thousands separators, floats trimmed."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, first_left: bool = True) -> str:
    """A plain-text table: headers, a rule, then the rows (cells formatted by `cell`). With
    `first_left` the first column (row labels) is left-aligned and the others right-aligned,
    headers included; without it every data cell is right-aligned under left-aligned headers."""
    cells = [[str(h) for h in headers], *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if (i == 0 if first_left else n == 0) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_header(bench: str, machine: dict[str, Any], exfilwatch: str, tail: str = "") -> None:
    """The first lines of every report: which bench, on what machine, running what."""
    print(
        f"exfilwatch {bench} bench  {machine['date']}  {machine['cpus']} CPUs  "
        f"Linux {machine['kernel']}  Python {machine['python']}  {tail}".rstrip()
    )
    print(f"exfilwatch command: {exfilwatch}")


def indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def emit(result: dict[str, Any], json_arg: str | None, report: Callable[[], None]) -> None:
    """The ``--json [FILE]`` convention: "-" prints JSON on stdout instead of the report;
    a FILE gets the JSON and the report is printed; no option prints the report only."""
    if json_arg == "-":
        print(json.dumps(result, indent=2, default=str))
        return
    if json_arg:
        with open(json_arg, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    report()


# processes -------------------------------------------------------------------------------


class Stoppable(Protocol):
    def stop(self) -> Any: ...


class Cleanup:
    """Every child process, process group, in-process component and temporary tree a run
    makes, undone at exit (call `close()` in a finally block): components stopped (newest
    first), process groups killed, children killed and reaped, trees removed, then the
    callbacks run (newest first)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.groups: list[subprocess.Popen[bytes]] = []  # leaders of process groups we made
        self.trees: list[str] = []
        self.stoppables: list[Stoppable] = []  # in-process agents, watchers
        self.callbacks: list[tuple[str, Callable[[], object]]] = []
        self._lock = threading.Lock()

    def spawn(
        self, argv: Sequence[str], *, group: bool = False, **kw: Any
    ) -> subprocess.Popen[bytes]:
        """Popen with stdin/stdout/stderr on /dev/null unless given; `group`: the child leads
        a new session (and process group), killed as a whole by `kill_group`/`stop_group`."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p: subprocess.Popen[bytes] = subprocess.Popen(list(argv), start_new_session=group, **kw)
        with self._lock:
            (self.groups if group else self.procs).append(p)
        return p

    def forget(self, p: subprocess.Popen[bytes]) -> None:
        """A child that was reaped: nothing left to clean."""
        with self._lock:
            for bucket in (self.procs, self.groups):
                with contextlib.suppress(ValueError):
                    bucket.remove(p)

    def mkdtemp(self, prefix: str, parent: str = "/tmp") -> str:
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        self.trees.append(path)
        return path

    def tree(self, path: str) -> str:
        """Remove `path` (a directory tree) at close."""
        self.trees.append(path)
        return path

    def at_close(self, what: str, fn: Callable[[], object]) -> None:
        """Run `fn` at close (newest first); `what` names it when it fails."""
        self.callbacks.append((what, fn))

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 2.0) -> tuple[float, int | None]:
        """SIGTERM, wait `timeout`, then SIGKILL. Returns (seconds to exit, exit code)."""
        began = time.monotonic()
        if p.poll() is None:
            p.terminate()  # runuser passes SIGTERM on to the user's process
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                progress(f"pid {p.pid} did not stop within {timeout:g} s: killed")
                p.kill()
                p.wait()
        self.forget(p)
        return time.monotonic() - began, p.returncode

    def kill_group(self, p: subprocess.Popen[bytes]) -> None:
        # The leader is not reaped before this, so its pid (the group id) cannot be reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        self.forget(p)

    def stop_group(self, p: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
        """SIGTERM to the whole group, wait for the leader, then SIGKILL what is left."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
        self.kill_group(p)
        return p.returncode

    def close(self) -> None:
        for thing in reversed(self.stoppables):
            with contextlib.suppress(Exception):
                thing.stop()
        self.stoppables.clear()
        for p in list(self.groups):
            self.kill_group(p)
        for p in list(self.procs):
            if p.poll() is None:
                p.kill()
        for p in list(self.procs):
            p.wait()
        self.procs.clear()
        for tree in self.trees:
            shutil.rmtree(tree, ignore_errors=True)
        self.trees.clear()
        while self.callbacks:
            what, fn = self.callbacks.pop()
            try:
                fn()
            except Exception as exc:
                progress(f"clean-up: {what} failed: {exc}")


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C does: through the finally blocks."""
    old = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """A short command, its output captured as text; raises BenchError when it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


# measuring a process ---------------------------------------------------------------------


def cpu_seconds(proc: psutil.Process, children: bool = True) -> float:
    """User + system seconds of `proc` (and of its reaped children, when `children`)."""
    t = proc.cpu_times()
    total = t.user + t.system
    if children:
        total += t.children_user + t.children_system
    return float(total)


def rss_bytes(pid: int | None = None) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """VmHWM: the peak resident set size of the process so far (its own address space; for
    this process, ru_maxrss when /proc is missing). ru_maxrss alone would not do: on Linux it
    carries the parent's peak across fork and exec."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return None


class Sampler:
    """Samples a process's RSS (and CPU seconds) every `interval` in a thread: the peak RSS
    seen, the CPU at start and at the last sample. Stops by itself when the process goes."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.ps = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.samples = 0
        self.started = time.monotonic()
        self.cpu_start = cpu_seconds(self.ps, children=False)
        self.cpu_last = self.cpu_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.peak_rss = max(self.peak_rss, int(self.ps.memory_info().rss))
                self.cpu_last = cpu_seconds(self.ps, children=False)
            except psutil.Error:
                return
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# users -----------------------------------------------------------------------------------


def ensure_user(name: str) -> dict[str, Any]:
    """A system user without a home or login shell (created when missing; root only)."""
    created = False
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
        pw = pwd.getpwnam(name)
        created = True
    return {"name": name, "uid": pw.pw_uid, "gid": pw.pw_gid, "created": created}


def remove_user(name: str) -> None:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        run(["userdel", name])


# files -----------------------------------------------------------------------------------


def remove_files(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def file_has(path: str, needle: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return needle in fh.read()
    except FileNotFoundError:
        return False


def tail_text(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def wait_for_text(
    proc: subprocess.Popen[bytes],
    path: str,
    needle: bytes,
    what: str,
    errpath: str,
    timeout: float = 180.0,
    poll: float = 0.005,
) -> float:
    """Polls `path` until it holds `needle`; returns the monotonic time it was seen. Raises
    BenchError (with the tail of `errpath`) when `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if file_has(path, needle):
            return time.monotonic()
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}) first: {tail_text(errpath)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: no {needle.decode()!r} after {timeout:g} s")
        time.sleep(poll)


def write_private(path: str, text: str) -> str:
    """A file only its owner can read or write (the agent refuses a config others can
    write when it runs as root)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    return path


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a line that does not parse is skipped."""
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def epoch(stamp: str) -> float:
    """Seconds since the epoch of an exfilwatch timestamp (ISO 8601 UTC, microseconds)."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    dt = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return dt.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


# the agent as a command ------------------------------------------------------------------


class AgentProcess:
    """``exfilwatch run|record --config FILE`` as a child process whose records go to a JSON
    lines file (the config's file sink, or ``record --output``); stderr to `errpath`."""

    def __init__(
        self,
        cleanup: Cleanup,
        config: str,
        output: str,
        errpath: str,
        *,
        command: str = "run",
        exfilwatch: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.cleanup = cleanup
        self.output = output
        self.errpath = errpath
        argv = [exfilwatch or exfilwatch_command(), command, "--config", config, *extra]
        if command == "record":
            argv += ["--output", output]
        self.argv = argv
        with open(errpath, "wb") as errfh:
            self.spawned = time.monotonic()
            self.spawned_wall = time.time()
            self.proc = cleanup.spawn(argv, stderr=errfh)
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, needle: bytes, timeout: float = 180.0) -> float:
        """Until `needle` is in the output (e.g. ``b'"action":"source_ready"'``)."""
        return wait_for_text(self.proc, self.output, needle, "exfilwatch", self.errpath, timeout)

    def stop(self, timeout: float = 15.0) -> tuple[float, int | None]:
        return self.cleanup.stop(self.proc, timeout)

    def records(self) -> Iterator[dict[str, Any]]:
        return read_jsonl(self.output)


# the machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "interpreter": sys.executable,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def code_version() -> dict[str, Any]:
    """The checkout measured: commit and uncommitted files (read-only git, no index refresh)."""
    git = shutil.which("git")
    if git is None:
        return {}
    head = subprocess.run(
        [git, "-C", REPO, "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    status = subprocess.run(
        [git, "--no-optional-locks", "-C", REPO, "status", "--porcelain"],
        capture_output=True,
        check=False,
        text=True,
    )
    diff = subprocess.run(
        [git, "--no-optional-locks", "-C", REPO, "diff", "HEAD", "--", "agent"],
        capture_output=True,
        check=False,
    )
    return {
        "commit": head.stdout.strip(),
        "uncommitted": [line[3:] for line in status.stdout.splitlines()],
        "agent_diff_sha1": hashlib.sha1(diff.stdout).hexdigest()[:12],  # noqa: S324 - an id
    }
