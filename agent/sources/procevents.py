"""Linux process events (the netlink proc connector): every fork, exec, exit, uid and comm change.

The kernel multicasts one datagram per event the moment it happens, so a process that lives for
a millisecond (cp, tar, rm) is seen, and so is an exec without a fork (same pid, new image).

Why a small reader on the stdlib `socket` module and not pyroute2 (0.9.7, which does have
`pyroute2.netlink.connector.cn_proc.ProcEventSocket`), measured on Linux 6.18, 2 vCPUs,
Python 3.11, a shell running 5,000 /bin/true (15,000 events):

- import: `pyroute2.netlink.connector.cn_proc` costs ~125 ms and 379 modules (asyncio, and an
  event loop per socket); socket, struct and select are loaded by the agent anyway.
- cost per event: pyroute2 decodes each datagram into a dict-like message through its generic
  marshal: 13.7 us for the parse alone, ~90 us of reader-thread CPU per event through
  `get()`. `parse()` here is one `struct.unpack_from` and one NamedTuple: 1.3 us, and 6-7 us
  of reader-thread CPU per event in all (recv syscall, parse, batching, the callback call).
- overrun: when the kernel drops events it sets ENOBUFS on the socket. pyroute2's asyncio
  transport turns that into a socket-wide error: the next `get()` raises `struct.error` (its
  marshal parses the synthetic error message it queued as a proc event), and every `get()`
  after that raises ENOBUFS again, forever: the socket has to be rebuilt and resubscribed,
  losing more. Here ENOBUFS is one failed recv: counted, reported, and the next recv reads on.
- trust: pyroute2's datagram protocol drops the sender address, and `nlmsg_pid` in the header
  is a field the sender writes, so a datagram forged by a local root process cannot be told
  from the kernel's. Here the source port id from recvfrom (set by the kernel) must be 0.

Each datagram carries a per-CPU sequence number (`cn_msg.seq`, with `proc_event.cpu`), so a
gap in it counts events the kernel could not deliver: the size of a loss, not only its fact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from agent.health import Reporter, record

# Kernel ABI: <linux/netlink.h>, <linux/connector.h>, <linux/cn_proc.h>.
NETLINK_CONNECTOR: Final = 11
CN_IDX_PROC: Final = 1
CN_VAL_PROC: Final = 1
PROC_CN_MCAST_LISTEN: Final = 1
PROC_CN_MCAST_IGNORE: Final = 2
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
PROC_EVENT_NONE: Final = 0x0
PROC_EVENT_FORK: Final = 0x1
PROC_EVENT_EXEC: Final = 0x2
PROC_EVENT_UID: Final = 0x4
PROC_EVENT_COMM: Final = 0x200
PROC_EVENT_EXIT: Final = 0x80000000
# asm-generic value (x86, arm, arm64, riscv, powerpc, s390, mips); Python does not export it.
# alpha, parisc and sparc use another number: there the call fails and SO_RCVBUF is used.
SO_RCVBUFFORCE: Final = 33

# struct nlmsghdr (len, type, flags, seq, pid) + struct cn_msg (idx, val, seq, ack, len, flags)
# + struct proc_event's head (what, cpu, timestamp_ns) + its 24-byte union as six u32. The
# kernel sends exactly this, 76 bytes, one event per datagram: one unpack reads all of it.
_NLMSGHDR: Final = struct.Struct("=IHHII")
_HEAD: Final = struct.Struct("=IH")
_MSG: Final = struct.Struct("=IHHIIIIIIHHIIQ6I")
_CN_OFFSET: Final = _NLMSGHDR.size  # where struct cn_msg starts
_EVENT_OFFSET: Final = _CN_OFFSET + 20  # where struct proc_event starts
_EVENT_SIZE: Final = 40  # sizeof(struct proc_event): 16 bytes of head, a 24-byte union
_COMM_OFFSET: Final = _EVENT_OFFSET + 16 + 8  # comm_proc_event.comm, after pid and tgid
_CONTROL: Final = struct.Struct("=IHHIIIIIIHHI")  # nlmsghdr + cn_msg + enum proc_cn_mcast_op

# Larger than any real gap (8 MiB of receive buffer holds ~10k events): a jump that size is a
# counter that went backwards (CPU hotplug, a reordering), not a loss to count.
_MAX_GAP: Final = 1 << 20
_MAX_CPUS: Final = 8192
# One on_events call gets at most this many datagrams: bounded memory per batch, and a burst
# is handed over in pieces instead of after it ends.
_MAX_BATCH: Final = 2048
# A kernel datagram is 76 bytes; a larger one is not the kernel's (and is cut short).
_RECV_SIZE: Final = 256
# Quiet, each datagram is read the moment it arrives: the consumer may still find a short-lived
# process in /proc. Busy (more than _BUSY_DATAGRAMS in _BUSY_WINDOW_S, ~100 processes a second),
# the reader waits _COALESCE_MS after each read so that a burst is read in batches: measured,
# a wake-up per event costs ~20 us of CPU per event, a read per 5 ms ~6 us. 5 ms of events is
# a small part of the buffer (8 MiB: ~10,000 events).
_BUSY_WINDOW_S: Final = 0.1
_BUSY_DATAGRAMS: Final = 32
_COALESCE_MS: Final = 5
_ACK_WAIT_S: Final = 1.0
_STOP_WAIT_S: Final = 1.0
_LOSS_INTERVAL_S: Final = 1.0
# Gaps found this long after an overrun are its tail (each CPU's gap shows at that CPU's next
# event), not a new kind of loss.
_OVERRUN_TAIL_S: Final = 10.0
_ERROR_INTERVAL_S: Final = 60.0

KINDS: Final = ("fork", "exec", "exit", "uid", "comm")


class ProcEvent(NamedTuple):
    """One process event as the kernel sent it. Pids are thread group ids (what ps calls a
    pid) in the initial pid namespace; events of threads other than the leader are dropped."""

    kind: str  # "fork" | "exec" | "exit" | "uid" | "comm"
    pid: int  # fork: the child; else the process the event is about
    ppid: int  # fork: the parent process; else 0
    timestamp_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns()) when the kernel made the event
    ruid: int | None = None  # uid: the real and effective uid after the change
    euid: int | None = None
    # exit: as subprocess reports it: the exit status, or minus the signal that killed it.
    exit_code: int | None = None
    comm: str | None = None  # comm: the new name (at most 15 bytes, undecodable bytes replaced)


def _exit_code(status: int) -> int:
    # task->exit_code is a wait(2) status: signal in the low 7 bits, exit status above.
    signal = status & 0x7F
    return -signal if signal else (status >> 8) & 0xFF


def _walk(data: bytes, out: list[ProcEvent], seqs: dict[int, int]) -> tuple[int, int]:
    """Appends the events in one datagram to `out`; returns (events lost by sequence gaps,
    messages that are not well-formed proc events). `seqs` holds the last sequence number
    seen per CPU across calls."""
    append = out.append
    lost = 0
    bad = 0
    offset = 0
    end = len(data)
    while end - offset >= _NLMSGHDR.size:
        length, mtype = _HEAD.unpack_from(data, offset)
        if length < _NLMSGHDR.size or length > end - offset:
            bad += 1  # the rest of the datagram cannot be walked
            break
        start = offset
        offset += (length + 3) & ~3
        if mtype != NLMSG_DONE:
            # NLMSG_NOOP, NLMSG_ERROR, NLMSG_OVERRUN: the connector sends events as NLMSG_DONE.
            continue
        if length < _MSG.size:
            bad += 1
            continue
        (_, _, _, _, _, idx, val, seq, _, cn_len, _, what, cpu, ts, a, b, c, d, _, _) = (
            _MSG.unpack_from(data, start)
        )
        if (
            idx != CN_IDX_PROC
            or val != CN_VAL_PROC
            or cn_len < _EVENT_SIZE
            or _EVENT_OFFSET + cn_len > length
        ):
            bad += 1
            continue
        last = seqs.get(cpu)
        if last is not None:
            gap = (seq - last - 1) & 0xFFFFFFFF
            if 0 < gap < _MAX_GAP:
                lost += gap
        elif len(seqs) >= _MAX_CPUS:
            seqs.clear()
        seqs[cpu] = seq
        # Union fields: fork (parent_pid, parent_tgid, child_pid, child_tgid); exec, uid,
        # comm and exit start with (process_pid, process_tgid).
        if what == PROC_EVENT_FORK:
            if c == d:  # child_pid != child_tgid: a thread was created, not a process
                append(ProcEvent("fork", d, b, ts))
        elif what == PROC_EVENT_EXEC:
            # An exec by any thread makes it the leader (de_thread), so the tgid is the process.
            append(ProcEvent("exec", b, 0, ts))
        elif a != b:
            # A thread other than the leader: its exit is not the process's (that goes on),
            # its name is its own, and glibc's setuid() changes every thread, one event each.
            continue
        elif what == PROC_EVENT_EXIT:
            append(ProcEvent("exit", b, 0, ts, exit_code=_exit_code(c)))
        elif what == PROC_EVENT_UID:
            append(ProcEvent("uid", b, 0, ts, ruid=c, euid=d))
        elif what == PROC_EVENT_COMM:
            raw = data[start + _COMM_OFFSET : start + _COMM_OFFSET + 16]
            name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            append(ProcEvent("comm", b, 0, ts, comm=name))
        # PROC_EVENT_NONE (acks of anyone's subscription), gid, sid, ptrace, coredump: ignored.
    return lost, bad


def parse(data: bytes) -> list[ProcEvent]:
    """The process events in one netlink datagram from the proc connector (pure: no I/O).

    Messages that are not proc connector events (other netlink types, other connector ids,
    short or truncated ones) are skipped, never raised on. It does not know who sent the
    datagram: the reader only passes it datagrams whose sender is the kernel."""
    out: list[ProcEvent] = []
    _walk(data, out, {})
    return out


def _ack_error(data: bytes, ack: int) -> int | None:
    """The error code of the kernel's acknowledgement of our request `ack` in this datagram
    (0 when accepted), or None when the datagram holds no such acknowledgement."""
    offset = 0
    while len(data) - offset >= _MSG.size:
        fields = _MSG.unpack_from(data, offset)
        length, mtype, cn_ack, what, err = fields[0], fields[1], fields[8], fields[11], fields[14]
        if length < _NLMSGHDR.size:
            return None
        if mtype == NLMSG_DONE and what == PROC_EVENT_NONE and cn_ack == (ack + 1) & 0xFFFFFFFF:
            return int(err)
        offset += (length + 3) & ~3
    return None


def _control(op: int, ack: int, portid: int) -> bytes:
    # cn_msg.seq is overwritten by the kernel's per-CPU counter in its reply; cn_msg.ack comes
    # back as ack + 1, so that is where we put the nonce that finds our acknowledgement.
    return _CONTROL.pack(
        _CONTROL.size, NLMSG_DONE, 0, 0, portid, CN_IDX_PROC, CN_VAL_PROC, 0, ack, 4, 0, op
    )


class ProcEventsReader:
    """Reads the kernel's process events and hands them to `on_events` in batches.

    One daemon thread reads every datagram that is ready and makes one `on_events` call per
    read burst (at most 2048 datagrams), on that thread: the callback must be quick (a bounded
    queue.put_nowait, a dict update), since while it runs the kernel buffer fills, and when it
    is full the kernel drops events. Quiet, events are handed over as they come (~0.1 ms after
    the kernel made them); busy (over ~300 events a second), one batch per 5 ms. With no
    events the thread sleeps in poll() with no timeout: no wake-ups at all.

    Batches are in the order the kernel queued the events, which is causal for one process
    (its fork before its exec, its exit before its pid can be reused); timestamp_ns may run
    backwards across CPUs by a few microseconds, so order by arrival, not by timestamp.
    An exit is not always the end: when a thread other than the leader execs, the kernel
    reports the old leader's exit (pid == tgid, code 0) just before the exec of the same pid.

    Only datagrams sent by the kernel are read (sender port id 0, connector id of the proc
    connector): a local process cannot inject events. Every loss is reported: a receive
    buffer overrun (ENOBUFS) as `event_loss` reason proc_connector_overrun, sequence gaps with
    no overrun as `event_loss` reason proc_connector_gap, at most one record per second with
    the counts since the last one (and the rest at stop). A callback or socket error is a
    `source_error`, the same one at most once a minute; a receive buffer smaller than asked
    (no CAP_NET_ADMIN and net.core.rmem_max lower) is `kernel_settings_low`.
    """

    name = "procevents"

    def __init__(
        self,
        on_events: Callable[[list[ProcEvent]], None],
        report: Reporter,
        *,
        rcvbuf: int = 4 << 20,
        coalesce: bool = True,
        on_linger: Callable[[], None] | None = None,
        linger: float = 0.005,
    ) -> None:
        if not 0 < rcvbuf <= 1 << 30:
            raise ValueError("rcvbuf must be between 1 byte and 1 GiB")
        self._on_events = on_events
        self._report = report
        self._rcvbuf = rcvbuf
        # False: every datagram is handed over as soon as it is read, busy or not (the exec
        # reader in a process of its own: each exec must be read before the process ends).
        self._coalesce = coalesce
        # on_linger() is called on the reader's thread `linger` seconds after the first
        # batch handed over since the last call (the exec reader writes out what it gathered
        # then: one write per burst, with no second thread to take the interpreter lock).
        self._on_linger = on_linger
        self._linger = linger
        self._linger_due: float | None = None
        self._sock: socket.socket | None = None
        self._stop_r = -1
        self._stop_w = -1
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pending: list[ProcEvent] = []  # read while start() waited for the ack
        self._seqs: dict[int, int] = {}
        self._portid = 0
        self._rcvbuf_got = 0
        self._loss_lock = threading.Lock()
        self._overruns_unreported = 0
        self._lost_unreported = 0
        self._loss_reported_at: float | None = None
        self._last_overrun_at: float | None = None
        self._errors_seen: dict[tuple[str, str], float] = {}
        self._errors_held: dict[tuple[str, str], int] = {}
        # Written by the reader thread only; stats() may read them a batch stale.
        self._kinds = dict.fromkeys(KINDS, 0)
        self._datagrams = 0
        self._batches = 0
        self._overruns = 0
        self._lost = 0
        self._forged = 0
        self._malformed = 0
        self._errors = 0
        self._last_error = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the socket and subscribe, then start the reader thread.

        Raises OSError when process events cannot be had: no connector in the kernel
        (EPROTONOSUPPORT), not permitted (EPERM: kernels before 6.6 need CAP_NET_ADMIN), or no
        acknowledgement from the kernel (ETIMEDOUT: it silently ignores subscriptions from
        outside the initial user and pid namespaces, i.e. from most containers)."""
        if self._thread is not None:
            raise RuntimeError("ProcEventsReader already started")
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        subscribed = False
        try:
            self._rcvbuf_got = self._set_rcvbuf(sock)
            sock.bind((0, CN_IDX_PROC))  # port id 0: the kernel picks ours
            self._portid = sock.getsockname()[0]
            self._seqs = {}
            self._pending = self._subscribe(sock)
            subscribed = True
            sock.setblocking(False)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._sock = sock
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="procevents-reader", daemon=True)
            self._thread.start()
        except BaseException:
            self._sock = None
            if subscribed:
                self._unsubscribe(sock)
            self._close(sock)
            raise
        if self._rcvbuf_got < min(2 * self._rcvbuf, 2**31 - 1):
            self._emit(
                record(
                    "kernel_settings_low",
                    "proc_connector_rcvbuf",
                    source=self.name,
                    rcvbuf_asked=self._rcvbuf,
                    rcvbuf_effective=self._rcvbuf_got,
                    hint="without CAP_NET_ADMIN the receive buffer is capped by "
                    "net.core.rmem_max: raise it, or bursts of process starts overrun it",
                )
            )

    def _set_rcvbuf(self, sock: socket.socket) -> int:
        try:
            # FORCE ignores net.core.rmem_max (often 208 KiB: ~500 events); needs CAP_NET_ADMIN.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self._rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
        # The kernel doubles the value asked for (its bookkeeping overhead) and reports that.
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def _subscribe(self, sock: socket.socket) -> list[ProcEvent]:
        """Sends PROC_CN_MCAST_LISTEN and waits for its acknowledgement; returns the events
        that arrived before it (the socket is in the group from bind on)."""
        nonce = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        sock.sendto(_control(PROC_CN_MCAST_LISTEN, nonce, self._portid), (0, 0))
        # The kernel handles the request inside our sendto and queues the acknowledgement
        # before it returns, behind at most what arrived since bind: the wait is normally 0.
        events: list[ProcEvent] = []
        deadline = time.monotonic() + _ACK_WAIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or len(events) > 64 * _MAX_BATCH:
                raise OSError(
                    errno.ETIMEDOUT,
                    "the proc connector did not acknowledge the subscription: the kernel "
                    "ignores subscribers outside the initial user and pid namespaces (and "
                    "before 6.6 refuses those without CAP_NET_ADMIN)",
                )
            sock.settimeout(left)
            try:
                data, (sender, _) = sock.recvfrom(_RECV_SIZE)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._overrun()
                continue
            if sender != 0:
                self._forged += 1
                continue
            # Acks go through the kernel's per-CPU sequence too: counted, so none is a gap.
            self._count(data, events)
            err = _ack_error(data, nonce)
            if err:
                raise OSError(err, f"the proc connector refused to subscribe: {os.strerror(err)}")
            if err == 0:
                return events

    def stop(self) -> None:
        """Unsubscribe, close, and end the reader thread (within a second); safe to call twice
        and before start()."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            if thread is not threading.current_thread():  # stop() called from on_events
                thread.join(_STOP_WAIT_S)
            self._thread = None
        sock, self._sock = self._sock, None
        if sock is not None:
            self._unsubscribe(sock)
            self._close(sock)
        # Losses still held back by the rate limit are said now, not lost with the reader.
        self._report_loss(force=True)

    def _unsubscribe(self, sock: socket.socket) -> None:
        # Closing alone leaves the kernel counting a listener on kernels that keep a count
        # (it then formats an event for nobody on every fork, exec and exit).
        with contextlib.suppress(OSError):
            sock.sendto(_control(PROC_CN_MCAST_IGNORE, 0, self._portid), (0, 0))

    def _close(self, sock: socket.socket) -> None:
        sock.close()
        for name in ("_stop_r", "_stop_w"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    # -- reader thread -----------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._sock
        if sock is None:
            return
        fd = sock.fileno()
        poller = select.poll()
        # POLLERR on a netlink socket is the overrun itself (sk_err = ENOBUFS): recv says so.
        poller.register(fd, select.POLLIN | select.POLLERR)
        poller.register(self._stop_r, select.POLLIN)
        stop_only = select.poll()
        stop_only.register(self._stop_r, select.POLLIN)
        if self._pending:
            batch, self._pending = self._pending, []
            self._deliver(batch)
        window_start, window_count, was_busy = time.monotonic(), 0, False
        while not self._stopping:
            try:
                # No timeout when idle; awake when held-back losses are due to be reported.
                ready = poller.poll(self._timeout_ms())
                for ready_fd, flags in ready:
                    if ready_fd == self._stop_r:
                        return
                    if flags & select.POLLNVAL:
                        self._note_error("reader", "POLLNVAL", "socket closed under the reader")
                        return
                if self._linger_due is not None and time.monotonic() >= self._linger_due:
                    self._linger_due = None
                    self._call_linger()
                if ready:
                    got = self._drain(sock)
                    self._report_loss(force=False)
                    now = time.monotonic()
                    if now - window_start > _BUSY_WINDOW_S:
                        # Busy stays busy from one window to the next: no run of single reads
                        # at the start of each window while a build runs.
                        was_busy = (
                            window_count > _BUSY_DATAGRAMS
                            and now - window_start < 2 * _BUSY_WINDOW_S
                        )
                        window_start, window_count = now, 0
                    window_count += got
                    # Busy: let the next burst gather before reading it (see _BUSY_DATAGRAMS).
                    busy = self._coalesce and (was_busy or window_count > _BUSY_DATAGRAMS)
                    if busy and stop_only.poll(_COALESCE_MS):
                        return
                else:
                    self._report_loss(force=False)
            except Exception as exc:  # the reader must never die of one bad batch
                if self._stopping:  # stop() from on_events closed the socket under the read
                    return
                self._note_error("reader", exc, repr(exc))
                time.sleep(0.01)  # no hot loop if the error repeats

    def _drain(self, sock: socket.socket) -> int:
        """Reads every datagram that is ready; returns how many."""
        recvfrom = sock.recvfrom
        seqs = self._seqs
        total = 0
        while not self._stopping:
            batch: list[ProcEvent] = []
            got = 0
            while got < _MAX_BATCH:
                try:
                    data, (sender, _) = recvfrom(_RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self._overrun()
                    continue
                got += 1
                if sender != 0:  # not the kernel: a local process forging events
                    self._forged += 1
                    continue
                lost, bad = _walk(data, batch, seqs)
                if lost or bad:
                    self._lost_or_bad(lost, bad)
            self._datagrams += got
            total += got
            if batch:
                self._deliver(batch)
            if got < _MAX_BATCH:
                break
        return total

    def _count(self, data: bytes, batch: list[ProcEvent]) -> None:
        lost, bad = _walk(data, batch, self._seqs)
        if lost or bad:
            self._lost_or_bad(lost, bad)

    def _lost_or_bad(self, lost: int, bad: int) -> None:
        if lost:
            self._lost += lost
            with self._loss_lock:
                self._lost_unreported += lost
        if bad:
            self._malformed += bad
            self._note_error(
                "parse", "malformed_message", f"{bad} message(s) not a proc event", lost=bad
            )

    def _deliver(self, batch: list[ProcEvent]) -> None:
        kinds = self._kinds
        for event in batch:
            kinds[event.kind] += 1
        self._batches += 1
        if self._on_linger is not None and self._linger_due is None:
            self._linger_due = time.monotonic() + self._linger
        try:
            self._on_events(batch)
        except Exception as exc:
            self._note_error("on_events", exc, f"on_events: {exc!r}", lost=len(batch))

    def _call_linger(self) -> None:
        assert self._on_linger is not None
        try:
            self._on_linger()
        except Exception as exc:
            self._note_error("on_linger", exc, f"on_linger: {exc!r}")

    def _timeout_ms(self) -> int | None:
        """How long poll() may sleep: until held-back losses or the linger call are due."""
        loss = self._loss_due_ms()
        if self._linger_due is None:
            return loss
        due = max(0, int((self._linger_due - time.monotonic()) * 1000) + 1)
        return due if loss is None else min(loss, due)

    # -- health ------------------------------------------------------------------------------

    def _overrun(self) -> None:
        self._overruns += 1
        with self._loss_lock:
            self._overruns_unreported += 1
            self._last_overrun_at = time.monotonic()

    def _loss_due_ms(self) -> int | None:
        with self._loss_lock:
            if not (self._overruns_unreported or self._lost_unreported):
                return None
            last = self._loss_reported_at
        if last is None:
            return 0
        return max(0, int((last + _LOSS_INTERVAL_S - time.monotonic()) * 1000) + 1)

    def _report_loss(self, *, force: bool) -> None:
        now = time.monotonic()
        with self._loss_lock:
            overruns = self._overruns_unreported
            lost = self._lost_unreported
            last = self._loss_reported_at
            if not (overruns or lost) or (
                not force and last is not None and now - last < _LOSS_INTERVAL_S
            ):
                return
            recent = self._last_overrun_at
            self._overruns_unreported = 0
            self._lost_unreported = 0
            self._loss_reported_at = now
        overrun = overruns > 0 or (recent is not None and now - recent < _OVERRUN_TAIL_S)
        self._emit(
            record(
                "event_loss",
                "proc_connector_overrun" if overrun else "proc_connector_gap",
                source=self.name,
                overruns=overruns,
                overruns_total=self._overruns,
                # Counted from sequence gaps, so known only when each CPU sends again: a loss
                # is first reported with what is known then, and the rest follows.
                lost_estimate=lost,
                lost_estimate_total=self._lost,
                rcvbuf=self._rcvbuf_got,
                hint="the kernel dropped process events: processes started or ended then "
                "were not seen; fall back to /proc for them",
            )
        )

    def _note_error(
        self, stage: str, cause: BaseException | str, message: str, **data: Any
    ) -> None:
        self._errors += 1
        self._last_error = message
        if isinstance(cause, str):
            reason = cause
        elif isinstance(cause, OSError) and cause.errno is not None:
            reason = errno.errorcode.get(cause.errno, type(cause).__name__)
        else:
            reason = type(cause).__name__
        key = (stage, reason)
        now = time.monotonic()
        last = self._errors_seen.get(key)
        if last is not None and now - last < _ERROR_INTERVAL_S:
            self._errors_held[key] = self._errors_held.get(key, 0) + 1
            return
        if len(self._errors_seen) > 256:  # bounded: exception types are many
            self._errors_seen.clear()
            self._errors_held.clear()
        self._errors_seen[key] = now
        self._emit(
            record(
                "source_error",
                reason,
                source=self.name,
                stage=stage,
                message=message,
                repeats_not_reported=self._errors_held.pop(key, 0),
                **data,
            )
        )

    def _emit(self, rec: dict[str, Any]) -> None:
        # Called on the reader thread: a failing reporter must not stop the reader.
        try:
            self._report(rec)
        except Exception as exc:
            self._errors += 1
            self._last_error = f"report: {exc!r}"

    def stats(self) -> dict[str, Any]:
        return {
            "running": self._thread is not None and self._thread.is_alive(),
            "portid": self._portid,
            "rcvbuf": self._rcvbuf_got,
            "events": dict(self._kinds),
            "datagrams": self._datagrams,
            "batches": self._batches,
            "overruns": self._overruns,
            "lost_estimate": self._lost,
            "forged_dropped": self._forged,
            "malformed": self._malformed,
            "errors": self._errors,
            "last_error": self._last_error,
        }
