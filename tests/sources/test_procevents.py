"""The proc connector reader on the real kernel: every process seen, no thread, no forgery."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sources.procevents import (
    CN_IDX_PROC,
    CN_VAL_PROC,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    PROC_EVENT_COMM,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_NONE,
    PROC_EVENT_UID,
    ProcEvent,
    ProcEventsReader,
    _walk,
    parse,
)

needs_kernel = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="needs Linux and root: subscribing to the proc connector takes CAP_NET_ADMIN before "
    "kernel 6.6, and the tests forge datagrams and change uids",
)

GID_EVENT = 0x40
FAKE_PID = 4_194_000  # above the default pid_max: no real process has it


def msg(
    what: int,
    *data: int,
    seq: int = 0,
    cpu: int = 0,
    ts: int = 1_000,
    mtype: int = NLMSG_DONE,
    idx: int = CN_IDX_PROC,
    val: int = CN_VAL_PROC,
    comm: bytes | None = None,
) -> bytes:
    """One proc connector message laid out as the kernel sends it (76 bytes)."""
    union = struct.pack("=6I", *(list(data) + [0] * (6 - len(data))))
    if comm is not None:
        union = union[:8] + comm.ljust(16, b"\0")[:16]
    body = struct.pack("=IIIIHH", idx, val, seq, 0, 40, 0) + struct.pack("=IIQ", what, cpu, ts)
    body += union
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, seq, 0) + body


# -- the parser, on crafted bytes ----------------------------------------------------------------


def test_a_fork_is_a_process_and_a_new_thread_is_not() -> None:
    process = msg(PROC_EVENT_FORK, 10, 10, 20, 20, ts=5)
    thread = msg(PROC_EVENT_FORK, 10, 10, 21, 20)
    assert parse(process) == [ProcEvent("fork", 20, 10, 5)]
    assert parse(thread) == []


def test_exec_exit_uid_and_comm_name_the_thread_group() -> None:
    assert parse(msg(PROC_EVENT_EXEC, 30, 30)) == [ProcEvent("exec", 30, 0, 1_000)]
    (exited,) = parse(msg(PROC_EVENT_EXIT, 30, 30, 3 << 8, 17, 1, 1))
    assert (exited.kind, exited.pid, exited.exit_code) == ("exit", 30, 3)
    (uid,) = parse(msg(PROC_EVENT_UID, 30, 30, 1000, 0))
    assert (uid.kind, uid.ruid, uid.euid) == ("uid", 1000, 0)
    (named,) = parse(msg(PROC_EVENT_COMM, 30, 30, comm=b"exfil\xff\0junk"))
    assert (named.kind, named.pid, named.comm) == ("comm", 30, "exfil\ufffd")


def test_exit_uid_and_comm_of_a_thread_other_than_the_leader_are_dropped() -> None:
    for what in (PROC_EVENT_EXIT, PROC_EVENT_UID, PROC_EVENT_COMM):
        assert parse(msg(what, 31, 30)) == []


def test_an_exit_code_reads_as_subprocess_reports_it() -> None:
    killed = parse(msg(PROC_EVENT_EXIT, 5, 5, 9, 17))
    dumped = parse(msg(PROC_EVENT_EXIT, 5, 5, 0x80 | 11, 17))
    assert [e.exit_code for e in killed + dumped] == [-9, -11]


def test_acks_other_event_kinds_and_other_message_types_are_skipped() -> None:
    assert parse(msg(PROC_EVENT_NONE, 0)) == []
    assert parse(msg(GID_EVENT, 30, 30, 0, 0)) == []
    assert parse(msg(PROC_EVENT_EXEC, 30, 30, mtype=NLMSG_NOOP)) == []
    assert parse(msg(PROC_EVENT_EXEC, 30, 30, mtype=NLMSG_ERROR)) == []
    assert parse(msg(PROC_EVENT_EXEC, 30, 30, idx=CN_IDX_PROC + 1)) == []
    assert parse(msg(PROC_EVENT_EXEC, 30, 30, val=CN_VAL_PROC + 1)) == []


def test_every_message_in_a_datagram_is_read_and_a_broken_tail_is_not_a_crash() -> None:
    two = msg(PROC_EVENT_EXEC, 1, 1) + msg(PROC_EVENT_EXEC, 2, 2)
    assert [e.pid for e in parse(two)] == [1, 2]
    assert [e.pid for e in parse(two[:-10])] == [1]
    bogus_length = struct.pack("=I", 10_000) + two[4:]
    assert parse(bogus_length) == []


def test_a_gap_in_a_cpus_sequence_numbers_counts_the_events_the_kernel_dropped() -> None:
    seqs: dict[int, int] = {}
    out: list[ProcEvent] = []
    datagrams = [
        msg(PROC_EVENT_EXEC, 1, 1, seq=5, cpu=0),
        msg(PROC_EVENT_EXEC, 2, 2, seq=100, cpu=1),
        msg(PROC_EVENT_EXEC, 3, 3, seq=9, cpu=0),  # 6, 7, 8 lost
        msg(PROC_EVENT_EXEC, 4, 4, seq=101, cpu=1),
    ]
    lost = sum(_walk(d, out, seqs)[0] for d in datagrams)
    assert lost == 3
    assert len(out) == 4


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert all(isinstance(e, ProcEvent) for e in parse(data))


# -- the reader, on the real kernel --------------------------------------------------------------


class Seen:
    """What the reader handed over (events, batches), and a deadline-bound wait on it."""

    def __init__(self) -> None:
        self.events: list[ProcEvent] = []
        self.batches = 0
        self.cond = threading.Condition()

    def __call__(self, batch: list[ProcEvent]) -> None:
        with self.cond:
            self.events.extend(batch)
            self.batches += 1
            self.cond.notify_all()

    def wait_until(
        self, predicate: Callable[[list[ProcEvent]], bool], what: str, timeout: float = 20.0
    ) -> list[ProcEvent]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self.cond.wait(left)
            return list(self.events)

    def of(self, pid: int) -> list[ProcEvent]:
        with self.cond:
            return sorted((e for e in self.events if e.pid == pid), key=lambda e: e.timestamp_ns)


class Records(Seen):
    """Health records, kept with the monotonic time each arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[float, dict[str, Any]]] = []

    def report(self, rec: dict[str, Any]) -> None:
        with self.cond:
            self.records.append((time.monotonic(), rec))
            self.cond.notify_all()

    def of(self, action: str) -> list[dict[str, Any]]:  # type: ignore[override]
        with self.cond:
            return [r for _, r in self.records if r["event"]["action"] == action]


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def records() -> Records:
    return Records()


@pytest.fixture
def reader(seen: Seen, records: Records) -> Iterator[Callable[..., ProcEventsReader]]:
    """Starts readers (skipping the test where the kernel offers no proc connector); always
    stops them."""
    started: list[ProcEventsReader] = []

    def start(**kw: Any) -> ProcEventsReader:
        on_events = kw.pop("on_events", seen)
        r = ProcEventsReader(on_events, records.report, **kw)
        try:
            r.start()
        except OSError as exc:
            pytest.skip(f"proc connector unavailable here: {exc}")
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def settle(seen: Seen, timeout: float = 20.0) -> int:
    """Runs /bin/true and waits for its exit: the kernel queues each event in the socket
    during the syscall that caused it, and the socket is read in order, so everything that
    happened before has been handed over too. Returns the marker's pid."""
    child = subprocess.Popen(["/bin/true"])
    child.wait()
    seen.wait_until(
        lambda events: any(e.kind == "exit" and e.pid == child.pid for e in events),
        f"the exit of marker {child.pid}",
        timeout,
    )
    return child.pid


def shell_loop(count: int) -> int:
    """A shell that runs /bin/true `count` times; returns the shell's pid once it is done."""
    script = f"i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done"
    shell = subprocess.Popen(["sh", "-c", script])
    assert shell.wait() == 0
    return shell.pid


@needs_kernel
def test_every_short_lived_process_is_seen_from_fork_to_exit(
    reader: Callable[..., ProcEventsReader], seen: Seen
) -> None:
    reader()
    pids = []
    for _ in range(20):
        child = subprocess.Popen(["/bin/true"])
        child.wait()
        pids.append(child.pid)
    wanted = set(pids)
    seen.wait_until(
        lambda events: wanted <= {e.pid for e in events if e.kind == "exit"},
        "the exit of 20 /bin/true",
    )
    execs = [e for e in seen.events if e.kind == "exec" and e.pid in wanted]
    assert sorted(e.pid for e in execs) == sorted(pids)
    for pid in pids:
        kinds = [(e.kind, e.ppid, e.exit_code) for e in seen.of(pid)]
        assert kinds == [("fork", os.getpid(), None), ("exec", 0, None), ("exit", 0, 0)]


@needs_kernel
def test_an_exec_without_fork_is_a_second_exec_of_the_same_pid(
    reader: Callable[..., ProcEventsReader], seen: Seen
) -> None:
    reader()
    child = subprocess.Popen(["sh", "-c", "exec /bin/sleep 0.05"])
    child.wait()
    seen.wait_until(
        lambda events: any(e.kind == "exit" and e.pid == child.pid for e in events),
        "the exit of sleep",
    )
    assert [e.kind for e in seen.of(child.pid)] == ["fork", "exec", "exec", "exit"]


@needs_kernel
def test_an_exec_by_a_thread_reads_as_exit_then_exec_of_the_same_pid(
    reader: Callable[..., ProcEventsReader], seen: Seen
) -> None:
    # The kernel's own behaviour, pinned for consumers: the old leader's exit is reported
    # beside the exec that takes over its pid, so an exit is not always the end. The exec
    # runs on the thread's CPU, the exit on the leader's: their order across CPUs is not
    # fixed (seen both ways under load), so the kinds are compared as a multiset.
    reader()
    body = "import os, threading, time\n"
    body += "threading.Thread(target=os.execv, args=('/bin/true', ['true'])).start()\n"
    body += "time.sleep(20)\n"
    child = subprocess.Popen([sys.executable, "-c", body])
    assert child.wait(20) == 0
    settle(seen)
    kinds = [e.kind for e in seen.of(child.pid)]
    assert kinds[:2] == ["fork", "exec"] and kinds[-1] == "exit"
    assert sorted(kinds) == sorted(["fork", "exec", "exit", "exec", "exit"])


@needs_kernel
def test_a_thread_is_not_a_process(reader: Callable[..., ProcEventsReader], seen: Seen) -> None:
    reader()
    ids: list[int] = []
    thread = threading.Thread(target=lambda: ids.append(threading.get_native_id()))
    thread.start()
    thread.join()
    settle(seen)
    (tid,) = ids
    assert tid != os.getpid()
    assert seen.of(tid) == []


@needs_kernel
def test_uid_and_name_changes_are_seen(reader: Callable[..., ProcEventsReader], seen: Seen) -> None:
    reader()
    setuid = subprocess.Popen([sys.executable, "-c", "import os; os.setuid(65534)"])
    rename = subprocess.Popen(["sh", "-c", "printf exfil-renamed > /proc/self/comm; exit 3"])
    killed = subprocess.Popen(["sh", "-c", "kill -9 $$"])
    for child in (setuid, rename, killed):
        child.wait()
    settle(seen)
    uid = [e for e in seen.of(setuid.pid) if e.kind == "uid"]
    assert [(e.ruid, e.euid) for e in uid] == [(65534, 65534)]
    names = [e.comm for e in seen.of(rename.pid) if e.kind == "comm"]
    assert names == ["exfil-renamed"]
    assert [e.exit_code for e in seen.of(rename.pid) if e.kind == "exit"] == [3]
    assert [e.exit_code for e in seen.of(killed.pid) if e.kind == "exit"] == [-9]


@needs_kernel
def test_a_burst_of_500_processes_loses_nothing_and_arrives_in_batches(
    reader: Callable[..., ProcEventsReader], seen: Seen, records: Records
) -> None:
    r = reader()
    shell = shell_loop(500)
    seen.wait_until(
        lambda events: sum(1 for e in events if e.kind == "fork" and e.ppid == shell) == 500,
        "500 forks of the shell",
    )
    settle(seen)
    children = {e.pid for e in seen.events if e.kind == "fork" and e.ppid == shell}
    assert len(children) == 500
    for kind in ("exec", "exit"):
        assert sum(1 for e in seen.events if e.kind == kind and e.pid in children) == 500
    stats = r.stats()
    # The default buffer (4 MiB asked, 8 MiB granted, ~10,000 events) holds this burst whole.
    assert stats["rcvbuf"] >= 8 << 20
    assert (stats["overruns"], stats["lost_estimate"]) == (0, 0)
    assert records.of("event_loss") == []
    # One on_events call per read burst, not per event.
    assert seen.batches < stats["datagrams"] / 3


@needs_kernel
def test_a_datagram_sent_from_userspace_is_dropped(
    reader: Callable[..., ProcEventsReader], seen: Seen
) -> None:
    r = reader()
    # Well-formed, and claiming the kernel's port id in its header: only the sender address
    # the kernel fills in tells it apart.
    forged = msg(PROC_EVENT_FORK, 1, 1, FAKE_PID, FAKE_PID)
    assert parse(forged) == [ProcEvent("fork", FAKE_PID, 1, 1_000)]
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11) as forger:
        forger.bind((0, 0))
        # Unicast to the reader's port: root may (CAP_NET_ADMIN); anyone else gets EPERM.
        forger.sendto(forged, (r.stats()["portid"], 0))
    settle(seen)
    assert seen.of(FAKE_PID) == []
    assert r.stats()["forged_dropped"] == 1


@needs_kernel
def test_a_kernel_overrun_is_an_event_loss_record_with_the_count_of_lost_events(
    reader: Callable[..., ProcEventsReader], seen: Seen, records: Records
) -> None:
    release = threading.Event()

    def stuck_then_seen(batch: list[ProcEvent]) -> None:
        # The reader is held in its first batch, so the tiny buffer fills behind it: a real
        # overrun, the kernel dropping events and setting ENOBUFS on the socket.
        release.wait(20)
        seen(batch)

    # 64 KiB (128 KiB granted) holds ~150 events: a marker's three, not a burst's 900.
    r = reader(on_events=stuck_then_seen, rcvbuf=64 << 10)
    try:
        subprocess.run(["/bin/true"], check=True)
        shell_loop(300)
    finally:
        release.set()
    # Gaps are counted when each CPU sends its next event: keep starting processes until the
    # loss is both seen (ENOBUFS) and sized (sequence gaps), then until one is seen whole,
    # which shows the reader reads on after an overrun.
    deadline = time.monotonic() + 30
    while True:
        stats = r.stats()
        if stats["overruns"] and stats["lost_estimate"]:
            with contextlib.suppress(AssertionError):
                settle(seen, timeout=2.0)
                break
        else:
            subprocess.run(["/bin/true"], check=True)
        assert time.monotonic() < deadline, f"no overrun or no gap seen: {stats}"
    records.wait_until(lambda _: bool(records.of("event_loss")), "an event_loss record")
    first = records.of("event_loss")[0]
    assert first["event"]["reason"] == "proc_connector_overrun"
    assert first["exfilwatch"]["health"]["overruns"] >= 1
    r.stop()
    with records.cond:
        losses = [(t, rec) for t, rec in records.records if rec["event"]["action"] == "event_loss"]
    # At most one record a second; the last may be the rest, said at stop.
    times = [t for t, _ in losses[:-1]]
    assert all(b - a >= 0.99 for a, b in itertools.pairwise(times))
    # Every overrun and every lost event counted is in a record.
    health = [rec["exfilwatch"]["health"] for _, rec in losses]
    assert sum(h["overruns"] for h in health) == r.stats()["overruns"]
    assert sum(h["lost_estimate"] for h in health) == r.stats()["lost_estimate"]


@needs_kernel
def test_a_failing_callback_is_a_source_error_and_reading_goes_on(
    reader: Callable[..., ProcEventsReader], seen: Seen, records: Records
) -> None:
    failed = threading.Event()

    def fails_once(batch: list[ProcEvent]) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("consumer bug")
        seen(batch)

    r = reader(on_events=fails_once)
    subprocess.run(["/bin/true"], check=True)
    assert failed.wait(20)
    pid = settle(seen)
    assert [e.kind for e in seen.of(pid)] == ["fork", "exec", "exit"]
    (error,) = records.of("source_error")
    assert error["event"]["reason"] == "RuntimeError"
    assert error["exfilwatch"]["health"]["stage"] == "on_events"
    assert r.stats()["errors"] == 1


@needs_kernel
def test_stop_is_prompt_when_idle_and_leaves_no_thread_or_fd(
    reader: Callable[..., ProcEventsReader],
) -> None:
    ProcEventsReader(lambda _: None, lambda _: None).stop()  # never started: a no-op
    fds = set(os.listdir("/proc/self/fd"))
    r = reader()
    assert r.stats()["running"] is True
    started = time.monotonic()
    r.stop()
    assert time.monotonic() - started < 1.0
    assert r.stats()["running"] is False
    assert not [t for t in threading.enumerate() if t.name == "procevents-reader"]
    assert set(os.listdir("/proc/self/fd")) == fds
    r.stop()  # twice: a no-op


@needs_kernel
def test_on_linger_is_called_once_a_burst_has_been_handed_over(
    reader: Callable[..., ProcEventsReader], seen: Seen
) -> None:
    # The exec reader's child writes what it gathered to the agent when the reader calls
    # on_linger: after the first batch since the last call, `linger` seconds on, whether or
    # not more events came meanwhile.
    calls: list[tuple[float, int]] = []

    def on_linger() -> None:
        calls.append((time.monotonic(), len(seen.events)))

    reader(on_linger=on_linger, linger=0.05)
    settle(seen)
    deadline = time.monotonic() + 20
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls, "on_linger was not called after a batch"
    handed = calls[-1][1]
    assert handed >= 3  # the marker's fork, exec and exit were handed over before it
    # A steady stream still gets called (not only at quiet moments): 0.2 s of execs.
    before = len(calls)
    end = time.monotonic() + 0.2
    while time.monotonic() < end:
        subprocess.run(["/bin/true"], check=True)
    deadline = time.monotonic() + 20
    while len(calls) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) >= before + 2
