"""The exec snapshot never mixes two images of one process (a shell exec'ing its last command)."""

from __future__ import annotations

import os
import subprocess

import pytest

from agent.sources.procsnap import read_snapshot


def test_a_snapshot_describes_one_image_of_a_process_that_keeps_exec_ing() -> None:
    # env execs nice execs env ... execs sleep, all as one pid, read over and over meanwhile:
    # a snapshot's arguments, name and program are of the same image. Reading the program
    # before and after the rest catches an exec in between, not two (env, nice, env again)
    # while the reader was preempted: on a loaded machine one such read can slip through in
    # a chain. Without the check, 60 to 85 reads of each chain mixed two images (measured).
    p = subprocess.Popen(["env", "nice", "-n", "0"] * 150 + ["sleep", "5"])
    seen = 0
    mixed: list[tuple[bytes, bytes, bytes]] = []
    try:
        while True:
            snap = read_snapshot(p.pid)
            if snap is None:  # mid-exec (no memory mapped yet)
                continue
            seen += 1
            argv0 = os.path.basename(snap.cmdline.split(b"\0")[0])
            exe = os.path.basename(snap.exe or b"")
            assert snap.stat is not None
            comm = snap.stat.split(b"(", 1)[1].split(b")", 1)[0]
            if not argv0 == comm == exe:
                mixed.append((argv0, comm, exe))
            if argv0 == b"sleep":
                break
    finally:
        p.kill()
        p.wait()
    assert seen > 1
    assert len(mixed) <= 2, mixed


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the kernel's process events)")
def test_the_exec_reader_runs_ahead_of_the_agent_and_hands_over_what_it_read() -> None:
    # The child that reads each exec runs at READER_NICE (ahead of the agent on a busy core)
    # and writes its events in frames: a process started here arrives with its arguments.
    import threading

    from agent.sources.procevents import ProcEvent
    from agent.sources.procsnap import READER_NICE, ProcEventsProcess, Snapshot

    got: list[tuple[ProcEvent, Snapshot | None]] = []
    arrived = threading.Event()
    marker = f"exfilwatch-reader-{os.getpid()}"

    def on_events(events: list[ProcEvent], snaps: dict[int, Snapshot]) -> None:
        for ev in events:
            snap = snaps.get(ev.pid) if ev.kind == "exec" else None
            got.append((ev, snap))
            if snap is not None and marker.encode() in snap.cmdline:
                arrived.set()

    child = ProcEventsProcess(on_events, lambda r: None)
    try:
        child.start()
    except OSError as exc:
        pytest.skip(f"proc connector unavailable here: {exc}")
    try:
        pid = child.stats()["pid"]
        with open(f"/proc/{pid}/stat", "rb") as fh:
            nice = int(fh.read().rsplit(b")", 1)[1].split()[16])
        assert nice == READER_NICE
        # A process that waits a moment (so the read cannot miss it) with a marker argument.
        # Under a storm of other processes the kernel may drop events (reported as
        # event_loss by the child): a few tries.
        pids = []
        for _ in range(5):
            # sh waits for its sleep with the marker among its arguments (sleep itself would
            # refuse a second argument that is not a time and end at once).
            proc = subprocess.Popen(["sh", "-c", "sleep 0.3", "sh", marker])
            proc.wait()
            pids.append(proc.pid)
            if arrived.wait(5):
                break
        assert arrived.is_set(), ("the exec never arrived", child.stats())
        ev, snap = next((e, s) for e, s in got if s is not None and marker.encode() in s.cmdline)
        assert ev.pid in pids and snap.cmdline.split(b"\0")[:3] == [b"sh", b"-c", b"sleep 0.3"]
    finally:
        child.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the kernel's process events)")
def test_sync_applies_what_the_child_wrote_before_it_returns() -> None:
    # The pipe thread held up (as on a loaded machine, where it waits for a core): a sync()
    # by the attributor applies the frames already in the pipe before it returns, so a pid
    # the kernel named for a file event is known when it is looked up.
    import threading
    import time

    from agent.sources.procevents import ProcEvent
    from agent.sources.procsnap import ProcEventsProcess, Snapshot, _pending

    marker = f"exfilwatch-sync-{os.getpid()}"
    applied: list[int] = []

    def on_events(events: list[ProcEvent], snaps: dict[int, Snapshot]) -> None:
        applied.extend(pid for pid, snap in snaps.items() if marker.encode() in snap.cmdline)

    reader = ProcEventsProcess(on_events, lambda rec: None)
    reader.start()
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        assert reader.sync(1.0)  # nothing pending: at once
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # the pipe thread cannot read while this holds the pipe
            with reader._lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        # Lives a while, so its exec is read with its arguments however loaded the machine.
        sleeper = subprocess.Popen(["sh", "-c", "sleep 2; true", marker])
        child = reader._child
        assert child is not None and child.stdout is not None
        deadline = time.monotonic() + 30
        while not _pending(child.stdout.fileno()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _pending(child.stdout.fileno()), "the child wrote no frame"
        assert not applied
        assert not reader.sync(0.05)  # the pipe is held: not synced, and it says so
        # Released, then synced at once: whichever thread takes the pipe first, sync()
        # returns only when the frames are applied.
        release.set()
        assert reader.sync(10.0)
        assert applied == [sleeper.pid]
        assert reader.stats()["synced"] >= 0
        holder.join()
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        reader.stop()


def test_a_loss_of_process_events_calls_on_loss_and_an_unread_exec_does_not() -> None:
    # The child's health frames pass through as records; a lost event the process table can
    # make up for (an overrun, a sequence gap) also calls on_loss, so the agent reads the
    # table at once; an exec gone before it was read cannot be made up for.
    import sys

    from agent.sources.procsnap import ProcEventsProcess

    writer = (
        "import struct, sys, msgspec\n"
        "from agent.health import record\n"
        "for reason in sys.argv[1:]:\n"
        "    body = msgspec.msgpack.encode({'health': record('event_loss', reason)})\n"
        "    sys.stdout.buffer.write(struct.pack('=I', len(body)) + body)\n"
    )
    reasons = ["process_exited_before_read", "proc_connector_overrun", "proc_connector_gap"]
    reports: list[dict[str, object]] = []
    lost: list[int] = []
    reader = ProcEventsProcess(lambda events, snaps: None, reports.append)
    reader.on_loss = lambda: lost.append(len(reports))
    child = subprocess.Popen([sys.executable, "-c", writer, *reasons], stdout=subprocess.PIPE)
    try:
        for _ in reasons:
            assert reader._one(child) is False
        assert reader._one(child) is True  # the end of its output
    finally:
        child.wait()
    losses = [r for r in reports if r["event"]["action"] == "event_loss"]  # type: ignore[index]
    assert [r["event"]["reason"] for r in losses] == reasons  # type: ignore[index]
    assert lost == [2, 3]  # after the overrun's and the gap's records, not the unread exec's
