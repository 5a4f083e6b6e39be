"""Process starts from the kernel's process events: every exec, at once, with its arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import InotifySettings, ProcessSettings, WatchSpec
from agent.events import Event
from agent.service import Agent
from tests.conftest import REPO, Collector, make_config

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process connector is Linux"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the process connector needs root"),
]


def start(
    run_agent: Callable[..., Agent], tmp_path: Path, root: Path, rules: tuple[str, ...] = ()
) -> Agent:
    config = make_config(
        [WatchSpec(str(root), ("chip",))],
        tmp_path,
        source="inotify",
        inotify=InotifySettings(apply_sysctl=False),
        processes=ProcessSettings(enabled=True, source="kernel"),
        rules=rules,
    )
    return run_agent(config)


def started(collector: Collector, pid: int) -> list[Event]:
    return [e for e in collector.events() if e.action == "process_started" and e.process_pid == pid]


def test_a_short_copy_is_a_process_start_with_its_arguments_and_parent(
    run_agent: Callable[..., Agent], collector: Collector, tmp_path: Path
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    (root / "top.v").write_text("module top; endmodule\n")
    start(run_agent, tmp_path, root)
    # Health records reach the sinks through the consumer: waited for, not read at once.
    assert collector.wait_for(
        lambda c: any(
            h["event"]["reason"] == "proc_connector"
            and h["exfilwatch"]["health"]["source"] == "processes"
            # As root the exec reader runs at real-time priority (procsnap.ReaderPriority).
            and h["exfilwatch"]["health"]["reader_priority"] == "realtime"
            for h in c.health("source_selected")
        ),
        timeout=10,
    ), collector.health("source_selected")
    # Each cp copies the tagged file into a FIFO: it stays alive until the test reads it, so
    # what is checked here is what the event carries, not the race with a cp that ends in a
    # millisecond (bench/attribution.py measures that; a process gone before it is read is
    # an event_loss record).
    pids = []
    for i in range(3):
        fifo = tmp_path / f"out{i}"
        os.mkfifo(fifo)
        cp = subprocess.Popen(["cp", str(root / "top.v"), str(fifo)])
        pids.append(cp.pid)
        try:
            assert collector.wait_for(lambda c, pid=cp.pid: bool(started(c, pid)), timeout=10)
        finally:
            with open(fifo, "rb") as fh:
                assert fh.read() == b"module top; endmodule\n"
            assert cp.wait(timeout=10) == 0
    for pid in pids:
        e = started(collector, pid)[-1]
        assert e.source == "proc_connector" and e.process_name == "cp"
        assert e.path == str(root / "top.v")  # the tagged file it names
        assert e.process_args[:2] == ("cp", str(root / "top.v"))
        assert e.process_executable is not None and e.process_executable.endswith("/cp")
        assert e.process_parent_executable == os.path.realpath(sys.executable)
        assert e.process_parent_command_line and "pytest" in e.process_parent_command_line
        assert e.tags == ("chip",) and e.user_id == str(os.geteuid())


def test_an_exec_without_a_fork_is_its_own_process_start(
    run_agent: Callable[..., Agent], collector: Collector, tmp_path: Path
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    (root / "top.v").write_text("x\n")
    start(run_agent, tmp_path, root)
    out = tmp_path / "x.tar"
    # sh replaces itself with tar: same pid, a new program, no fork in between. The tar reads
    # the names to pack from stdin until the test closes it, so it is alive when read.
    proc = subprocess.Popen(
        ["sh", "-c", 'exec tar -cf "$1" -C "$2" -T -', "sh", str(out), str(root)],
        stdin=subprocess.PIPE,
    )
    try:
        assert collector.wait_for(
            lambda c: any(e.process_name == "tar" for e in started(c, proc.pid)), timeout=10
        )
    finally:
        assert proc.stdin is not None
        proc.stdin.write(b"top.v\n")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    # The pid the test forked runs tar (sh, exec'd a moment before, may be gone too soon to
    # be read: that is counted as a loss, never reported as tar).
    tar = started(collector, proc.pid)[-1]
    assert tar.process_name == "tar" and tar.source == "proc_connector"
    assert tar.path == str(root)  # the tagged directory it works on (-C)
    assert tar.process_args[:3] == ("tar", "-cf", str(out))


def test_a_process_gone_before_it_is_read_is_a_reported_loss() -> None:
    from agent.enrich.attribution import ProcessTable
    from agent.sources.procevents import ProcEvent

    records: list[dict[str, object]] = []
    table = ProcessTable(report=records.append)
    table.start()
    done = subprocess.run(["true"], check=True)
    assert done.returncode == 0
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: nothing is left in /proc to read
    assert table.on_kernel_events([ProcEvent("exec", gone.pid, 0, 0)]) == []
    assert table.exec_unread == 1
    loss = [r for r in records if r["event"]["action"] == "event_loss"]  # type: ignore[index]
    assert loss and loss[0]["event"]["reason"] == "process_exited_before_read"  # type: ignore[index]
    assert loss[0]["exfilwatch"]["health"]["dropped"] == 1  # type: ignore[index]


def test_a_child_gone_before_it_is_read_answers_for_its_parents_arguments(
    tmp_path: Path,
) -> None:
    # runuser -u NAME -- sh -c 'echo x > "$1"' sh PATH: the shell (NAME's) can exit before its
    # exec is read; what it wrote must not be blamed on runuser (root), whose arguments name
    # PATH too. The kernel's fork and uid events still tell who the child was.
    from agent.enrich.attribution import ProcessTable
    from agent.sources.procevents import ProcEvent

    target = tmp_path / "written.v"
    parent = subprocess.Popen(["sh", "-c", "read x", "sh", str(target)], stdin=subprocess.PIPE)
    try:
        table = ProcessTable(report=lambda r: None)
        table.start()
        before = table.by_path(str(target))
        assert before is not None and before[0].pid == parent.pid
        gone = subprocess.Popen(["true"])
        gone.wait()  # a pid with nothing left in /proc to read
        events = [
            ProcEvent("fork", gone.pid, parent.pid, 1),
            ProcEvent("uid", gone.pid, 0, 2, ruid=4242, euid=4242),
            ProcEvent("exec", gone.pid, 0, 3),
        ]
        assert table.on_kernel_events(events) == []
        assert table.exec_unread == 1
        found = table.by_path(str(target))
        assert found is not None
        assert (found[0].pid, found[0].uid) == (gone.pid, 4242)
        # Its exit keeps it answering for EXITED_TTL, like any process.
        table.on_kernel_events([ProcEvent("exit", gone.pid, 0, 4, exit_code=0)])
        found = table.by_path(str(target))
        assert found is not None and found[0].uid == 4242
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait(timeout=10)


def test_the_reconcile_poll_and_the_kernels_exit_of_the_same_process_do_not_clash() -> None:
    # The table is read every 30 s while the kernel's events keep coming on another thread:
    # an exit applied between the poll's snapshot and its update was a KeyError that stopped
    # the poll (a source_error record, seen at 500 execs/s).
    from agent.enrich.attribution import Proc, ProcessTable
    from agent.sources.procevents import ProcEvent

    class ExitDuringRead(ProcessTable):
        victim: int | None = None

        def read(self, pid: int) -> Proc | None:
            if self.victim is not None:
                victim, self.victim = self.victim, None
                self.on_kernel_events([ProcEvent("exit", victim, 0, 1, exit_code=0)])
            return super().read(pid)

    def polled(table: ProcessTable, pid: int, timeout: float = 10.0) -> bool:
        """Polls until `pid` is among the new processes. Popen returns mid-exec (its pipe
        closes as the new image goes in, before its arguments are set): a process read then
        is reported by the next poll, which a busy machine makes likely."""
        deadline = time.monotonic() + timeout
        while True:
            if any(p.pid == pid for p in table.poll()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    records: list[dict[str, Any]] = []
    table = ExitDuringRead(report=records.append)
    table.start()
    first = subprocess.Popen(["sleep", "30"])
    try:
        assert polled(table, first.pid)
    finally:
        first.kill()
        first.wait()
    second = subprocess.Popen(["sleep", "30"])
    try:
        table.victim = first.pid
        assert polled(table, second.pid)
        assert table.victim is None  # the exit came in the middle of a poll's reads
    finally:
        second.kill()
        second.wait()
    assert not [r for r in records if r["event"]["action"] == "source_error"], records
    assert table.errors == 0
    assert table.get(first.pid) is not None  # kept after its exit, for late file events


def test_every_short_process_is_a_start_or_a_counted_loss(
    run_agent: Callable[..., Agent], collector: Collector, tmp_path: Path
) -> None:
    # 20 copies that live about a millisecond each: each is a process_started event with its
    # arguments, or (if it ended before it could be read) counted in an event_loss record.
    root = tmp_path / "rnd"
    root.mkdir()
    (root / "top.v").write_text("x\n")
    agent = start(run_agent, tmp_path, root)
    pids = []
    for i in range(20):
        cp = subprocess.Popen(["cp", str(root / "top.v"), str(tmp_path / f"o{i}")])
        assert cp.wait(timeout=10) == 0
        pids.append(cp.pid)
    table = agent.processes
    assert table is not None

    def accounted(c: Collector) -> bool:
        seen = {e.process_pid for e in c.events() if e.action == "process_started"}
        return len(set(pids) & seen) + table.exec_unread >= len(pids)

    assert collector.wait_for(accounted, timeout=10)
    agent.stop()  # reports what was not read yet
    lost = sum(
        h["exfilwatch"]["health"]["dropped"]
        for h in collector.health("event_loss")
        if h["event"]["reason"] == "process_exited_before_read"
    )
    assert lost == table.exec_unread
    child = agent.parts.proc_events if agent.parts is not None else None
    assert child is not None and child.stats()["running"] is False


def test_a_renamed_archiver_and_a_fake_kernel_thread_are_alerts(
    run_agent: Callable[..., Agent], collector: Collector, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "rnd"
    root.mkdir()
    (root / "top.v").write_text("x\n")
    hidden = tmp_path / ".x"
    hidden.mkdir()
    crond = hidden / "crond"
    shutil.copy2(shutil.which("tar") or "/usr/bin/tar", crond)
    start(run_agent, tmp_path, root, rules=(str(REPO / "rules"),))
    runs = [
        [str(crond), "-cf", str(tmp_path / "a.tar"), "-C", str(root), "-T", "-"],
        ["bash", "-c", f'exec -a "[kworker/0:1]" tar -cf {tmp_path / "b.tar"} -C {root} -T -'],
    ]
    for argv in runs:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
        try:
            assert collector.wait_for(
                lambda c, pid=proc.pid: any(e.masquerade for e in started(c, pid)), timeout=10
            )
        finally:
            assert proc.stdin is not None
            proc.stdin.write(b"top.v\n")
            proc.stdin.close()
            assert proc.wait(timeout=10) == 0
    flags = sorted(
        e.masquerade or ""
        for e in collector.events()
        if e.action == "process_started" and e.masquerade
    )
    assert "kernel_thread_name" in flags and "renamed_binary:tar" in flags
    assert collector.wait_for(
        lambda c: (
            sum(
                1
                for r in c.records()
                if r.get("rule", {}).get("id")
                in ("exfil-masquerading-process", "exfil-kernel-thread-name")
            )
            >= 2
        )
    )


def test_who_deleted_and_who_renamed_a_tagged_file_is_exact(
    run_agent: Callable[..., Agent], collector: Collector, tmp_path: Path
) -> None:
    from agent.sources.fandirs import available

    ok, why = available()
    if not ok:
        pytest.skip(f"fanotify directory-entry events unavailable: {why}")
    root = tmp_path / "rnd"
    root.mkdir()
    (root / "a.v").write_text("a\n")
    (root / "b.v").write_text("b\n")
    agent = start(run_agent, tmp_path, root)
    assert agent.parts is not None and agent.parts.fanotify_dirs is not None
    # One process per operation, so each has its own pid (inotify alone knows no pid).
    mv = subprocess.Popen(["mv", str(root / "a.v"), str(root / "c.v")])
    assert mv.wait(timeout=10) == 0
    rm = subprocess.Popen(["rm", str(root / "b.v")])
    assert rm.wait(timeout=10) == 0

    def attributed(action: str, path: Path, pid: int) -> Callable[[Collector], bool]:
        return lambda c: any(
            e.action == action
            and e.path == str(path)
            and e.process_pid == pid
            and e.attribution == "exact"
            for e in c.events()
        )

    assert collector.wait_for(attributed("moved", root / "c.v", mv.pid), timeout=10)
    assert collector.wait_for(attributed("deleted", root / "b.v", rm.pid), timeout=10)
    deleted = next(
        e
        for e in collector.events()
        if e.action == "deleted" and e.path == str(root / "b.v") and e.process_pid == rm.pid
    )
    # The user is right whatever the timing. The program name is rm once the exec event has
    # been applied; under load a deletion can be attributed before that, by its pid, to the
    # copy of the parent made at fork (a known limit, see the issue notes): pid and user hold.
    assert deleted.user_id == str(os.geteuid()) and deleted.process_name in ("rm", "pytest")
    others = [
        (e.action, e.path, e.process_name, e.attribution_method)
        for e in collector.events()
        if e.action in ("deleted", "moved") and e.process_pid not in (mv.pid, rm.pid)
    ]
    assert not others, others


def test_two_exec_events_showing_one_image_make_one_process_started() -> None:
    # bash -c "sleep 5" execs sleep in its own pid: when bash's exec is read late, both exec
    # events show sleep. One start is reported, never sleep twice (and never bash's arguments
    # with sleep's program).
    from agent.enrich.attribution import ProcessTable
    from agent.sources.procevents import ProcEvent

    table = ProcessTable(report=lambda record: None)
    table.start()
    proc = subprocess.Popen(["bash", "-c", "sleep 5"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
                if fh.read().startswith(b"sleep"):
                    break
            time.sleep(0.005)
        events = [ProcEvent("exec", proc.pid, 0, 1), ProcEvent("exec", proc.pid, 0, 2)]
        started = table.on_kernel_events(events)
        assert [p.name for p in started] == ["sleep"]
        assert table.exec_repeats == 1
    finally:
        proc.kill()
        proc.wait()


def test_lost_process_events_make_the_process_table_be_read_at_once(
    run_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    # The table is read on a long safety interval with kernel events; a loss the reader
    # reports (on_loss: an overrun, a gap) makes the agent read it now, on the scheduler.
    import threading

    from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent

    root = tmp_path / "tree"
    root.mkdir()
    agent = start(run_agent, tmp_path, root)
    assert agent.scheduler is not None and agent.parts is not None
    proc_events = agent.parts.proc_events
    assert proc_events is not None and proc_events.on_loss is not None
    job = agent.scheduler.get_job("processes")
    assert job is not None and job.trigger.interval.total_seconds() >= 300
    ran = threading.Event()

    def executed(event: JobExecutionEvent) -> None:
        if event.job_id == "processes":
            ran.set()

    agent.scheduler.add_listener(executed, EVENT_JOB_EXECUTED)
    proc_events.on_loss()
    assert ran.wait(20), "the process table was not read after the loss"


def test_the_open_that_follows_a_creation_is_the_creators_and_only_that_one(
    run_agent: Callable[..., Agent], collector: Collector, tmp_path: Path
) -> None:
    """zip and rsync write a temporary file no argument names: its creation is exact (the
    directory-entry events), and the open that comes with it (one open(O_CREAT) makes both)
    is the creator's. A later open by another process is not."""
    from agent.sources.fandirs import available

    ok, why = available()
    if not ok:
        pytest.skip(f"fanotify directory-entry events unavailable: {why}")
    root = tmp_path / "rnd"
    root.mkdir()
    agent = start(run_agent, tmp_path, root)
    assert agent.parts is not None and agent.parts.fanotify_dirs is not None
    # Relative names: no argument of either process names the file or its directory.
    maker = subprocess.Popen([sys.executable, "-c", "open('ziTMP01', 'w').write('x')"], cwd=root)
    assert maker.wait(timeout=10) == 0
    path = str(root / "ziTMP01")
    assert collector.wait_for(
        lambda c: any(e.action == "closed_write" and e.path == path for e in c.events()),
        timeout=10,
    )
    reader = subprocess.Popen(["cat", "ziTMP01"], cwd=root, stdout=subprocess.DEVNULL)
    assert reader.wait(timeout=10) == 0
    assert collector.wait_for(
        lambda c: sum(e.action == "opened" and e.path == path for e in c.events()) >= 2,
        timeout=10,
    )
    opens = [e for e in collector.events() if e.action == "opened" and e.path == path]
    first, second = opens[0], opens[1]
    assert (first.process_pid, first.attribution_method) == (maker.pid, "creator")
    assert first.attribution == "inferred"
    assert second.process_pid != maker.pid and second.attribution_method != "creator"
