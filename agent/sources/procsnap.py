"""Kernel process events read in a process of their own, each exec read from /proc at once.

An exec event carries a pid only: the program and its arguments must be read from
/proc/<pid> before the process ends, and a `cp` ends in about a millisecond. Read on a thread
of the agent, the read waits for the interpreter lock while the agent works on the same burst
of file events; measured on a 2-core machine, 3 in 10 short `cp` were gone by then. This
module's `main()` runs as a child process of the agent (`python -m agent.sources.procsnap`)
that does nothing else: it reads the connector (agent/sources/procevents.py, batches handed
over as soon as read) and, for each exec, the facts the agent needs, raw, in the order they
vanish; the agent decodes them. Messages go over the child's stdout as length-prefixed
msgpack frames; a closed stdin (the agent stopped) or the agent's death ends the child.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from agent.health import CapReporter, Reporter, record
from agent.sources.procevents import ProcEvent, ProcEventsReader

_FRAME = struct.Struct("=I")
_FRAME_MAX = 64 << 20  # a frame larger than this is a broken child, not a batch
_CMDLINE_MAX = 64 * 1024  # bytes of arguments read (ARG_MAX can be far larger)
_START_TIMEOUT = 5.0
# Losses a read of the process table can make up for (not an exec gone before it was read).
LOST_PROCESS_EVENTS = frozenset({"proc_connector_overrun", "proc_connector_gap"})
_IMAGE_RETRIES = 3  # reads of the arguments while the process keeps exec'ing another image
SEND_DELAY = 0.005  # seconds the child gathers events before it writes them to the agent
SEND_EVENTS = 1024  # ... unless this many are waiting
READER_NICE = -10  # the child's scheduling priority without real-time (see ReaderPriority)
READER_RT_PRIORITY = 1  # SCHED_FIFO's lowest: ahead of every normal task, behind the kernel's
# CPU-seconds a second the reader may take at real-time priority; past it, it runs at
# READER_NICE until the next second (an exec storm cannot make it starve the machine).
READER_RT_SHARE = 0.25


class Snapshot(NamedTuple):
    """What /proc/<pid> said right after an exec, raw (bytes are decoded by the agent)."""

    cmdline: bytes  # NUL-separated arguments
    exe: bytes | None
    cwd: bytes | None
    stat: bytes | None  # /proc/<pid>/stat: comm, ppid, start time
    uid: int | None
    login_uid: int | None


def read_snapshot(pid: int) -> Snapshot | None:
    """/proc/<pid> read in the order things vanish when a process exits (its memory, so its
    arguments, first). None when the arguments are gone already (a zombie has none)."""
    base = f"/proc/{pid}/"
    link = base.encode() + b"exe"
    # The program before and after the arguments: a shell that execs its last command
    # (`bash -c "cp a b"`) replaces its image within microseconds, and arguments of one image
    # with the program of the next look like a masquerade. A change means read again.
    exe: bytes | None = _readlink(link)
    stat: bytes | None = None
    cmdline = b""
    for _ in range(_IMAGE_RETRIES):
        read = _read(base + "cmdline", _CMDLINE_MAX)
        if read is None:
            return None
        cmdline = read
        if not cmdline:  # a zombie, or mid-exec (no memory yet): a new image means read again
            after = _readlink(link)
            if after is None or after == exe:
                return None
            exe = after
            continue
        stat = _read(base + "stat")  # comm: the name, compared with the arguments' argv[0]
        after = _readlink(link)
        if after == exe or after is None:  # the same image, or gone (what was read stands)
            break
        exe = after
    if not cmdline:
        return None
    cwd = _readlink(base.encode() + b"cwd")
    uid = login = None
    with contextlib.suppress(ValueError, IndexError):
        status = _read(base + "status")
        if status is not None:
            at = status.find(b"\nUid:")
            if at >= 0:
                uid = int(status[at + 5 : status.find(b"\n", at + 5)].split()[0])
        raw = _read(base + "loginuid")
        if raw is not None:
            value = int(raw.strip())
            login = None if value == 4294967295 else value  # unset: no login session
    return Snapshot(cmdline, exe, cwd, stat, uid, login)


def _read(path: str, limit: int = 8192) -> bytes | None:
    """One read of a /proc file (what a Python file object costs twice over is avoided: the
    child does this for every exec on the machine). None when it cannot be opened or read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _readlink(path: bytes) -> bytes | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


# -- the child ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel sends SIGTERM when the agent dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)


class ReaderPriority:
    """The reader's place on the CPU: real-time (SCHED_FIFO, lowest priority) when permitted,
    within a share of a core a second; else nice READER_NICE; else as started.

    The arguments of an exec must be read before the process ends, and `cat`, `rm` or
    `base64` end within a millisecond. At nice -10 the reader still waited behind whatever
    ran on the core when the exec came (measured, bench/attribution.py execs, 2 vCPUs: 4% of
    short commands gone before read, 337 of 6,000 at 500 execs/s); at real-time priority it
    runs the moment the kernel's event comes (0 of 300, 2-5 of 6,000), for the same CPU.
    Real-time is bounded twice: the reader blocks between events (the kernel's RT throttling
    holds it to 95% of a core in any case), and once it has used READER_RT_SHARE CPU-seconds
    in a second it runs at nice READER_NICE until the second is over (reported once a minute
    as cap_reached `exec_reader_realtime_share`). The policy is per thread: made on the
    child's main thread before the reader's thread starts (which inherits it; not
    SCHED_RESET_ON_FORK, which would take it from the thread too), then dropped there
    (main_done); check() runs on the reader's thread. The child starts no process."""

    def __init__(self, report: Callable[[dict[str, Any]], None]) -> None:
        self._caps = CapReporter(report)
        self.mode = "normal"
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, READER_NICE)
            self.mode = "nice"
        self.realtime = self._set(realtime=True)
        if self.realtime:
            self.mode = "realtime"
        self._window = 0.0
        self._cpu: float | None = None  # the reader thread's CPU time when the second began
        self.throttled = 0

    @staticmethod
    def _set(*, realtime: bool) -> bool:
        try:
            if realtime:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(READER_RT_PRIORITY))
            else:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except (OSError, AttributeError):
            return False
        return True

    def main_done(self) -> None:
        """The main thread only waits for the agent to close stdin: normal priority."""
        if self.realtime:
            self._set(realtime=False)

    def check(self) -> None:
        """After each batch: keep the real-time share within READER_RT_SHARE a second."""
        if self.mode != "realtime":
            return
        now = time.monotonic()
        if self._cpu is None or now - self._window >= 1.0:
            self._window, self._cpu = now, time.thread_time()
            if not self.realtime:
                self.realtime = self._set(realtime=True)
            return
        if not self.realtime or time.thread_time() - self._cpu <= READER_RT_SHARE:
            return
        if self._set(realtime=False):
            self.realtime = False
            self.throttled += 1
            self._caps.hit(
                "exec_reader_realtime_share",
                int(READER_RT_SHARE * 1000),
                unit="ms_per_s",
                hint="more execs a second than the reader can follow at real-time priority: "
                "it runs at nice -10 for the rest of the second, and short processes may end "
                "before they are read",
            )


def main() -> int:
    _die_with_parent()
    out = sys.stdout.buffer
    encode = msgspec.msgpack.Encoder().encode
    lock = threading.Lock()

    def send(message: Any) -> None:
        data = encode(message)
        with lock:
            out.write(_FRAME.pack(len(data)) + data)
            out.flush()

    # Each exec is read the moment it is handed over (on the reader's thread) and sent at
    # once with what came before it; forks, exits and the rest wait up to SEND_DELAY for the
    # next exec (the reader calls flush), or SEND_EVENTS events: a shell running commands
    # one by one costs one pipe write (and one wake-up of the agent) per command, not three
    # (fork, exec, exit each come alone). All on one thread: nothing competes with the
    # reads for the GIL.
    pending: list[Any] = []

    def flush() -> None:
        if pending:
            batch = pending[:]
            pending.clear()
            send({"events": batch})

    def on_events(events: list[ProcEvent]) -> None:
        execs = False
        for ev in events:
            snap = None
            if ev.kind == "exec":
                snap = read_snapshot(ev.pid)
                execs = True
            pending.append((*ev, snap))
        # An exec goes at once: the agent attributes file events by the processes it knows,
        # and the file events of a `cp` come within a millisecond of its exec.
        if execs or len(pending) >= SEND_EVENTS:
            flush()
        priority.check()

    def report(rec: dict[str, Any]) -> None:
        send({"health": rec})

    # Ahead of the agent and the commands on the CPU (see ReaderPriority), set before the
    # reader's thread starts so that it inherits it.
    priority = ReaderPriority(report)
    reader = ProcEventsReader(on_events, report, coalesce=False, on_linger=flush, linger=SEND_DELAY)
    try:
        reader.start()
    except OSError as exc:
        send({"error": exc.errno or 0, "message": str(exc)})
        return 1
    priority.main_done()
    send({"ready": os.getpid(), "priority": priority.mode})
    try:
        while sys.stdin.buffer.read(4096):  # the agent closes it to stop us
            pass
    except (OSError, KeyboardInterrupt):
        pass
    finally:
        reader.stop()
        with contextlib.suppress(OSError, ValueError):
            flush()  # the reader has stopped: nothing else touches `pending`
            stats = reader.stats()
            stats.update(priority=priority.mode, realtime_throttled=priority.throttled)
            send({"stats": stats})
    return 0


# -- the agent's side ----------------------------------------------------------------------

OnEvents = Callable[[list[ProcEvent], dict[int, Snapshot]], None]


class ProcEventsProcess:
    """Runs `main()` as a child and hands its batches to `on_events(events, snapshots)` on a
    thread of the agent. start() raises OSError when the child cannot subscribe (the caller
    falls back to polling). Health records of the child's reader are reported as its own; a
    child that dies while the agent runs is a source_error and a loss until it is restarted."""

    name = "procevents"

    def __init__(self, on_events: OnEvents, report: Reporter) -> None:
        self._on_events = on_events
        self._report = report
        self._child: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ended = False
        # One reader of the pipe at a time: the pipe thread, or a caller of sync().
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        self.batches = 0
        self.events = 0
        self.snapshots = 0
        self.synced = 0
        self.priority = "normal"
        # Called (on the pipe's reader) when the kernel's process events were lost: the agent
        # then reads the process table at once instead of at its next safety poll.
        self.on_loss: Callable[[], None] | None = None

    def start(self) -> None:
        child = subprocess.Popen(
            [sys.executable, "-m", "agent.sources.procsnap"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            bufsize=0,  # unbuffered: what is not read yet is in the pipe, where FIONREAD sees it
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert child.stdout is not None
        first = _read_frame(child.stdout, _START_TIMEOUT, child)
        if not isinstance(first, dict) or "ready" not in first:
            with contextlib.suppress(OSError):
                child.kill()
            child.wait()
            err = first.get("error", 0) if isinstance(first, dict) else 0
            raise OSError(err or 0, f"process events unavailable: {first!r}")
        self._child = child
        # realtime | nice | normal: where the child's exec reads stand on the CPU.
        self.priority = str(first.get("priority", "normal"))
        self._thread = threading.Thread(target=self._run, name="procevents-pipe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        child, self._child = self._child, None
        if child is not None:
            with contextlib.suppress(OSError):
                assert child.stdin is not None
                child.stdin.close()
            try:
                child.wait(timeout=2)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def stats(self) -> dict[str, Any]:
        return {
            "running": self._child is not None,
            "pid": self._child.pid if self._child is not None else None,
            "priority": self.priority,
            "batches": self.batches,
            "events": self.events,
            "exec_snapshots": self.snapshots,
            "synced": self.synced,
            "reader": self._stats,
        }

    def sync(self, timeout: float) -> bool:
        """Apply what the child has written so far (at most `timeout` s) on the caller's
        thread: a pid the kernel named for a file event but the table does not know yet is
        often a short process whose fork or exec frame waits in the pipe while the pipe
        thread waits for a core. True when nothing written before the call is unapplied."""
        child = self._child
        if child is None or child.stdout is None or self._ended:
            return False
        fd = child.stdout.fileno()
        # Nothing in the pipe, then nobody reading it: all read so far is applied (in this
        # order: a frame read while the pipe was looked at is still being applied).
        if not _pending(fd) and not self._lock.locked():
            return True
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            deadline = time.monotonic() + timeout
            while _pending(fd) and not self._ended:
                self.synced += 1
                if self._one(child) or time.monotonic() >= deadline:
                    return False
            return not self._ended
        finally:
            self._lock.release()

    def _run(self) -> None:
        child = self._child
        if child is None or child.stdout is None:
            return
        fd = child.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            hangup = any(flags & (select.POLLHUP | select.POLLERR) for _, flags in ready)
            with self._lock:
                if not hangup and not _pending(fd):
                    continue  # a sync() on another thread read it first
                if self._one(child):
                    return

    def _one(self, child: subprocess.Popen[bytes]) -> bool:
        """Read and handle one message (the caller holds the lock); True when the pipe is
        done with (the child ended, or sent a broken frame)."""
        if self._ended:
            return True
        assert child.stdout is not None
        try:
            message = _read_frame(child.stdout, None, child)
        except Exception as exc:  # a broken frame: the child is not trusted further
            self._ended = True
            self._report(record("source_error", type(exc).__name__, stage="procevents"))
            return True
        if message is None:
            self._ended = True
            if not self._stopping:
                self._report(
                    record(
                        "source_error",
                        "child_exited",
                        stage="procevents",
                        code=child.poll(),
                        hint="process starts are seen by polling only from now on",
                    )
                )
            return True
        if not isinstance(message, dict):
            return False
        if "events" in message:
            self._batch(message["events"])
        elif "health" in message and isinstance(message["health"], dict):
            rec = message["health"]
            self._report(rec)
            event = rec.get("event")
            if (
                self.on_loss is not None
                and isinstance(event, dict)
                and event.get("action") == "event_loss"
                and event.get("reason") in LOST_PROCESS_EVENTS
            ):
                self.on_loss()
        elif "stats" in message and isinstance(message["stats"], dict):
            self._stats = message["stats"]
        return False

    def _batch(self, raw: list[Any]) -> None:
        events: list[ProcEvent] = []
        snaps: dict[int, Snapshot] = {}
        for item in raw:
            *fields, snap = item
            ev = ProcEvent(*fields)
            events.append(ev)
            if snap is not None:
                snaps[ev.pid] = Snapshot(*snap)
        self.batches += 1
        self.events += len(events)
        self.snapshots += len(snaps)
        try:
            self._on_events(events, snaps)
        except Exception as exc:
            self._report(record("source_error", type(exc).__name__, stage="procevents"))


def _pending(fd: int) -> int:
    """Bytes written to the pipe and not read yet."""
    avail = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, avail, True)
    except OSError:
        return 0
    return avail[0]


def _read_frame(stream: Any, timeout: float | None, child: subprocess.Popen[bytes]) -> Any:
    """One message from the child; None at its end (or, with `timeout`, when none came)."""
    if timeout is not None:
        import select

        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLIN)
        while not poller.poll(100):
            if child.poll() is not None or time.monotonic() > deadline:
                return None
    head = _read_exact(stream, _FRAME.size)
    if head is None:
        return None
    (size,) = _FRAME.unpack(head)
    if size > _FRAME_MAX:
        raise ValueError(f"frame of {size} bytes")
    body = _read_exact(stream, size)
    if body is None:
        return None
    return msgspec.msgpack.decode(body)


def _read_exact(stream: Any, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


if __name__ == "__main__":
    sys.exit(main())
