"""Who did it: the process table, masquerade flags, process-started events, attribution."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.components import Component
from agent.config import ProcessSettings, SinkSpec, WatchSpec
from agent.enrich.attribution import ProcessTable, masquerade_of
from agent.service import Agent
from tests.conftest import Collector, Gate, make_config

REPO = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as a test user")


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def finish(child: subprocess.Popen[Any], gate: Gate) -> None:
    """Open the gate if the child is still there to pass it, then reap the child."""
    if child.poll() is None:
        try:
            gate.open(timeout=5)
        except OSError:
            child.kill()
    child.wait(20)


def no_report(rec: dict[str, Any]) -> None:
    """The reporter of a table that must have nothing to report."""
    raise AssertionError(f"unexpected health record: {rec}")


def cat() -> subprocess.Popen[bytes]:
    """A real process that lives until its stdin is closed, returned once its exec is done.
    Popen returns as the new image goes in, before its arguments are set: a table read then
    sees no arguments and reports the process at its next poll (a busy machine makes that
    window wide enough to hit), which would change how many polls a test needs."""
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)

    def execed() -> bool:
        try:
            return psutil.Process(child.pid).cmdline() == ["cat"]
        except psutil.Error:
            return False

    assert wait_for(execed, timeout=10), "cat did not start"
    return child


def end(*children: subprocess.Popen[bytes]) -> None:
    for child in children:
        child.kill()
        child.communicate()


def test_masquerade_signals_are_told_apart() -> None:
    assert masquerade_of("kworker", "/tmp/x", ("[kworker/0:1]",)) == "kernel_thread_name"
    assert masquerade_of("crond", "/usr/bin/tar", ("crond",)) == "name_mismatch"
    assert masquerade_of("tar", "/usr/bin/tar", ("sshd", "-D")) == "argv0_mismatch"
    assert masquerade_of("tar", "/usr/bin/tar", ("tar", "cf", "x")) is None
    assert masquerade_of("bash", "/usr/bin/bash", ("-bash",)) is None
    assert masquerade_of("myscript.py", "/usr/bin/python3.11", ("python3", "myscript.py")) is None
    assert masquerade_of("kthreadd", None, ()) is None  # a real kernel thread


def test_a_process_started_under_another_name_is_flagged() -> None:
    # cat waits on its stdin, so the process lives until the test is done with it.
    child = subprocess.Popen(["bash", "-c", "exec -a crond cat"], stdin=subprocess.PIPE)
    try:
        table = ProcessTable(report=no_report)

        def argv0() -> tuple[str, ...]:
            proc = table.read(child.pid)
            return proc.cmdline[:1] if proc is not None else ()

        assert wait_for(lambda: argv0() == ("crond",), timeout=20)  # bash has exec'd cat
        proc = table.read(child.pid)
        assert proc is not None and proc.masquerade == "argv0_mismatch"
    finally:
        end(child)


def test_a_renamed_copy_of_a_known_tool_is_recognised(tmp_path: Path) -> None:
    fake = tmp_path / "crond"
    shutil.copy(shutil.which("cat") or "/bin/cat", fake)
    # Popen returns once the child has exec'd; cat then waits on its stdin.
    child = subprocess.Popen([str(fake)], stdin=subprocess.PIPE)
    try:
        table = ProcessTable(report=no_report, tools=("cat",))
        proc = table.read(child.pid)
        assert proc is not None and proc.masquerade == "renamed_binary:cat"
    finally:
        end(child)


def test_the_process_table_keeps_the_component_contract() -> None:
    table = ProcessTable(report=no_report)
    assert isinstance(table, Component) and table.name == "processes"
    table.stop()  # before start: harmless
    table.start()
    assert table.stats()["running"] is True and table.stats()["tracked"] == len(table) > 0
    table.stop()
    table.stop()
    assert table.stats()["running"] is False


def test_what_runs_at_start_is_known_and_only_later_processes_are_new() -> None:
    before = cat()
    try:
        table = ProcessTable(report=no_report)
        table.start()
        known = table.get(before.pid)
        assert known is not None and known.name == "cat"
        after = cat()
        try:
            new = {p.pid for p in table.poll()}
            assert after.pid in new and before.pid not in new
            stats = table.stats()
            assert (stats["polls"], stats["new"], stats["over_cap"]) == (2, len(new), 0)
        finally:
            end(after)
    finally:
        end(before)


def test_start_after_a_poll_keeps_what_the_poll_found_new_for_the_next_poll() -> None:
    table = ProcessTable(report=no_report)
    table.poll()
    child = cat()
    try:
        table.start()  # the table knows what ran already: start() reads nothing
        assert child.pid in {p.pid for p in table.poll()}
    finally:
        end(child)


def test_a_process_read_before_its_exec_is_reported_again_as_the_program_it_became(
    tmp_path: Path,
) -> None:
    # A shell's child is the shell until it execs (sh, then tar): a poll between fork and exec
    # sees the shell. Here the child is held as sh at a gate, read, then let exec cat.
    gate = Gate(tmp_path / "go")
    child = subprocess.Popen(
        ["sh", "-c", 'read go < "$1"; exec cat', "sh", str(gate.path)], stdin=subprocess.PIPE
    )
    try:
        table = ProcessTable(report=no_report)
        table.start()
        first = table.get(child.pid)
        assert first is not None and first.name == "sh"
        gate.open()
        assert wait_for(lambda: psutil.Process(child.pid).name() == "cat", timeout=20)
        again = [p for p in table.poll() if p.pid == child.pid]
        assert [p.name for p in again] == ["cat"]
        now = table.get(child.pid)
        assert now is not None and now.name == "cat"
        assert now.exe == os.path.realpath(shutil.which("cat") or "/bin/cat")
        assert child.pid not in {p.pid for p in table.poll()}  # once, not on every poll
    finally:
        end(child)


def test_a_process_that_exited_is_still_found_by_the_path_it_named_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.enrich import attribution

    target = tmp_path / "design.v"
    gate = Gate(tmp_path / "go")
    # Held at the gate until the table has read it, then gone, as a short cp is by the time
    # its file events are attributed.
    child = subprocess.Popen(["sh", "-c", 'read go < "$1"', "sh", str(gate.path), str(target)])
    table = ProcessTable(report=no_report)
    try:
        table.start()
    finally:
        finish(child, gate)
    table.poll()
    found = table.by_path(str(target))
    assert found is not None and found[0].pid == child.pid
    # A file below a directory: the nearest ancestor some process names, cached per
    # directory. A process naming a nearer one appears: the cached answer is dropped.
    below = str(tmp_path / "sub" / "x.v")
    before = table.by_path(below)
    gate2 = Gate(tmp_path / "go2")
    other = subprocess.Popen(["sh", "-c", 'read go < "$1"', "sh", str(gate2.path), str(tmp_path)])
    try:
        deadline = time.monotonic() + 10
        near = table.by_path(below)
        while (near is None or near[0].pid != other.pid) and time.monotonic() < deadline:
            table.poll()  # a stale cached answer would hold past the deadline
            near = table.by_path(below)
    finally:
        finish(other, gate2)
    table.poll()  # both processes have exited now
    assert before is None or before[0].pid != other.pid
    assert near is not None and near[0].pid == other.pid
    # Long gone, it takes no blame for a later write to the file.
    monkeypatch.setattr(attribution, "EXITED_TTL", 0.0)
    assert table.by_path(str(target)) is None


def test_a_process_read_mid_exec_without_arguments_is_read_again(tmp_path: Path) -> None:
    # Popen returns once the child's new image is in place, a moment before the kernel says
    # where its arguments are: a poll then reads no arguments. That read is not final (it
    # held the process without its paths for good, and a test failed on CI once).
    child = subprocess.Popen(["sh", "-c", "sleep 30", "sh", str(tmp_path / "named.v")])
    try:
        table = ProcessTable(report=no_report)
        # The first read may itself fall in that moment (it did under four CPU hogs): the
        # complete image is what the rest of the test starts from.
        deadline = time.monotonic() + 10
        proc = table.read(child.pid)
        while (proc is None or not proc.cmdline) and time.monotonic() < deadline:
            time.sleep(0.01)
            proc = table.read(child.pid)
        assert proc is not None and proc.cmdline
        blank = replace(proc, cmdline=())
        again = table._reread(blank)
        assert again is not None and again.cmdline == proc.cmdline
        assert table._reread(proc) is None  # a complete read of the same image stands
    finally:
        child.kill()
        child.wait()


def test_dd_names_its_files_as_if_and_of(tmp_path: Path) -> None:
    # dd if=src of=dst: the paths are values of key=value arguments (relative ones against
    # the working directory); the whole argument stays a candidate (a file may be named so).
    src, dst = tmp_path / "src.bin", tmp_path / "out" / "dst.bin"
    src.write_bytes(b"x" * 4096)
    dst.parent.mkdir()
    # dd reads its input from a FIFO that the gate holds: it is alive while the table reads.
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        ["dd", f"if=./{fifo.name}", "of=out/dst.bin", "status=none"],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
    )
    table = ProcessTable(report=no_report)
    try:
        table.start()
        found = table.by_path(str(dst))
        assert found is not None and found[0].pid == child.pid
        found = table.by_path(str(fifo))
        assert found is not None and found[0].pid == child.pid
        assert str(tmp_path / "of=out" / "dst.bin") in found[0].paths()
    finally:
        with open(fifo, "wb") as fh:
            fh.write(src.read_bytes())
        child.wait(timeout=10)


def test_a_full_process_table_tracks_no_more_and_reports_its_cap() -> None:
    records: list[dict[str, Any]] = []
    running = [cat() for _ in range(3)]
    try:
        table = ProcessTable(report=records.append, max_procs=1)
        table.start()
        (cap,) = records
        assert (cap["event"]["action"], cap["event"]["reason"]) == ("cap_reached", "process_table")
        data = cap["exfilwatch"]["health"]
        assert data["cap"] == 1 and data["untracked"] >= len(running)
        later = [cat() for _ in range(3)]
        running += later
        assert table.poll() == []
        assert len(table) == 1
        stats = table.stats()
        assert (stats["tracked"], stats["over_cap"]) == (1, 2)
        # The same cap again within the minute is counted, not reported again.
        assert len(records) == 1
    finally:
        end(*running)


def test_a_poll_that_cannot_list_processes_is_a_source_error_and_the_next_one_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records: list[dict[str, Any]] = []
    table = ProcessTable(report=records.append)
    table.start()
    # psutil's own knob for where /proc is: pointed at nothing, listing pids fails for real.
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path / "no-proc"))
    for _ in range(5):
        assert table.poll() == []
    (error,) = records
    assert (error["event"]["action"], error["event"]["reason"]) == ("source_error", "ENOENT")
    data = error["exfilwatch"]["health"]
    assert data["stage"] == "processes" and "FileNotFoundError" in data["message"]
    assert table.stats()["last_error"] == "ENOENT"
    monkeypatch.undo()
    child = cat()
    try:
        assert child.pid in {p.pid for p in table.poll()}
    finally:
        end(child)
    stats = table.stats()
    assert (stats["errors"], stats["last_error"]) == (5, None)
    assert len(records) == 1


def test_when_start_cannot_read_the_table_the_first_good_poll_is_the_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records: list[dict[str, Any]] = []
    table = ProcessTable(report=records.append)
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path / "no-proc"))
    table.start()
    assert [r["event"]["reason"] for r in records] == ["ENOENT"]
    monkeypatch.undo()
    # What already ran is not reported as started, even though start() could not read it.
    assert table.poll() == [] and len(table) > 0
    child = cat()
    try:
        assert child.pid in {p.pid for p in table.poll()}
    finally:
        end(child)


@pytest.fixture
def tree() -> Iterator[Path]:
    """A tagged tree the test user can write to (pytest's own tmp is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="exfilwatch-attr-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "rnd"
    (root / "chip").mkdir(parents=True)
    for i in range(5):
        (root / "chip" / f"m{i}.v").write_text(f"module m{i}; endmodule\n")
    root.chmod(0o777)
    (root / "chip").chmod(0o777)
    try:
        yield root
    finally:
        shutil.rmtree(base)


def start(run_agent: Callable[..., Agent], tmp_path: Path, root: Path, dirs: str = "auto") -> Agent:
    config = make_config(
        [WatchSpec(str(root), ("rnd",))],
        tmp_path,
        rules=(str(REPO / "rules"),),
        sinks=(SinkSpec("stdout", None, frozenset({"event", "health", "alert"})),),
        processes=ProcessSettings(enabled=True, interval=0.05, fanotify="off", fanotify_dirs=dirs),
    )
    return run_agent(config, kinds=frozenset({"event", "health", "alert"}))


@needs_root
def test_a_file_written_by_a_test_users_process_is_attributed_to_it(
    tree: Path,
    tmp_path: Path,
    run_agent: Callable[..., Agent],
    collector: Collector,
    test_user: str,
) -> None:
    start(run_agent, tmp_path, tree, dirs="off")  # the kernel would name the writer exactly
    target = tree / "chip" / "written-by-test-user.v"
    gate = Gate(tree.parent / "go")
    # The target is an argument, as for cp, rsync or a script: the agent reads the process
    # table and finds the process that names the file. The shell writes only once the agent
    # has it in its table (its process_started event is out); it may be gone by the time the
    # write is attributed, as a real cp would be.
    script = 'read go < "$2"; echo x > "$1"'
    child = subprocess.Popen(
        ["runuser", "-u", test_user, "--", "sh", "-c", script, "sh", str(target), str(gate.path)]
    )
    try:
        assert collector.wait_for(
            lambda c: any(
                e.action == "process_started" and e.process_name == "sh" and e.path == str(target)
                for e in c.events()
            ),
            timeout=20,
        )
        gate.open()
        collector.wait_event("closed_write", target, timeout=20)
    finally:
        finish(child, gate)
    event = next(
        e for e in collector.events() if e.path == str(target) and e.action == "closed_write"
    )
    assert (
        event.user_name,
        event.user_id,
        event.process_name,
        event.process_parent_name,
        event.attribution,
        event.attribution_method,
    ) == (test_user, str(pwd.getpwnam(test_user).pw_uid), "sh", "runuser", "inferred", "cmdline")
    assert event.process_command_line is not None and str(target) in event.process_command_line


@needs_root
def test_a_short_lived_writer_is_attributed_by_file_owner(
    tree: Path,
    tmp_path: Path,
    run_agent: Callable[..., Agent],
    collector: Collector,
    test_user: str,
) -> None:
    start(run_agent, tmp_path, tree)
    target = tree / "chip" / "quick.v"
    subprocess.run(
        ["runuser", "-u", test_user, "--", "sh", "-c", f"echo x > '{target}'"], check=True
    )
    collector.wait_event("created", target)
    event = next(e for e in collector.events() if e.path == str(target) and e.action == "created")
    assert event.user_name == test_user
    assert event.attribution in ("inferred", "exact")


@needs_root
def test_a_packing_tool_on_a_tagged_tree_is_a_process_started_event_that_alerts(
    tree: Path,
    tmp_path: Path,
    run_agent: Callable[..., Agent],
    collector: Collector,
    test_user: str,
) -> None:
    start(run_agent, tmp_path, tree)
    (tree / "chip" / "big.bin").write_bytes(b"\0" * (1 << 20))
    gate = Gate(tree.parent / "go")
    # tar blocks on the full pipe (1 MiB into 64 KiB) until the reader starts, and the reader
    # starts only once the agent has reported tar: tar is alive whenever the poll comes.
    pack = f"tar cf - '{tree / 'chip'}' 2>/dev/null | (read go < '{gate.path}'; cat > /dev/null)"
    child = subprocess.Popen(["runuser", "-u", test_user, "--", "sh", "-c", pack])
    try:
        assert collector.wait_for(
            lambda c: any(
                e.action == "process_started" and e.process_name == "tar" for e in c.events()
            ),
            timeout=20,
        )
    finally:
        finish(child, gate)
    assert child.returncode == 0
    started = next(
        e for e in collector.events() if e.action == "process_started" and e.process_name == "tar"
    )
    assert started.category == "process"
    assert started.path == str(tree / "chip")
    assert started.tags == ("rnd",)
    assert started.user_name == test_user
    assert started.attribution == "exact"
    assert collector.wait_for(
        lambda c: any(
            r["event"]["kind"] == "alert" and r["rule"]["id"] == "exfil-packing-tool-on-tagged"
            for r in c.records()
        ),
        timeout=20,
    )


def test_process_settings_disable_everything(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    config = make_config([WatchSpec(str(root))], tmp_path)
    agent = run_agent(replace(config, processes=ProcessSettings(enabled=False)))
    assert agent.processes is None and agent.parts is not None
    assert agent.parts.attributor is None


def _fanotify_ok() -> bool:
    from agent.sources.fanotify import available

    return available()[0]


@needs_root
def test_with_fanotify_a_short_lived_writer_is_attributed_exactly(
    tree: Path,
    tmp_path: Path,
    run_agent: Callable[..., Agent],
    collector: Collector,
    test_user: str,
) -> None:
    if not _fanotify_ok():
        pytest.skip("fanotify is not available on this kernel or in this sandbox")
    config = make_config(
        [WatchSpec(str(tree), ("rnd",))],
        tmp_path,
        processes=ProcessSettings(enabled=True, interval=0.5, fanotify="on"),
    )
    agent = run_agent(config)
    watcher = agent.fanotify
    assert watcher is not None
    target = tree / "chip" / "fast.v"
    gate = Gate(tree.parent / "go")
    # No argument names the file: only the kernel can say who wrote it. The close is
    # attributed as soon as the inotify reader sees it, and the fanotify reader can lag that
    # one: the shell closes the file only once the kernel's record of the write is in.
    script = 'cd "$(dirname "$1")" && exec 3>fast.v && echo x >&3 && read go < "$2"'
    child = subprocess.Popen(
        ["runuser", "-u", test_user, "--", "sh", "-c", script, "sh", str(target), str(gate.path)]
    )
    try:
        assert wait_for(
            lambda: watcher.lookup(str(target), actions={"modified"}) is not None, timeout=20
        )
    finally:
        finish(child, gate)
    collector.wait_event("closed_write", target, timeout=20)
    event = next(
        e for e in collector.events() if e.path == str(target) and e.action == "closed_write"
    )
    assert event.attribution == "exact"
    assert event.attribution_method == "fanotify"
    assert event.user_name == test_user
    assert event.process_name == "sh"


def test_a_kernel_named_worker_gone_before_its_user_was_read_has_its_forkers_user(
    tmp_path: Path,
) -> None:
    """rsync's receiver writes a temporary file no argument names and is gone before its
    /proc could be read: the kernel named its pid and the name came with the event, not its
    user. The rsync whose arguments name the directory forked it, and a fork keeps its user.
    A process of another program naming the directory lends nothing."""
    from agent.enrich.attribution import Attributor, Proc
    from agent.events import Event

    gate = Gate(tmp_path / "go")
    # The long-lived process of the same program, naming the destination directory.
    named = subprocess.Popen(["sh", "-c", 'read go < "$1"', "sh", str(gate.path), str(tmp_path)])
    table = ProcessTable(report=no_report)
    try:
        table.start()
        table.poll()
        found = table.by_path(str(tmp_path / ".f0.txt.XyZ"))
        assert found is not None and found[0].pid == named.pid
        worker = Proc(named.pid + 100_000, named.pid, "sh", None, (), None, None, None, None,
                      None, 0.0, "sh", None)  # fmt: skip
        stranger = replace(worker, name="cp")
        given: list[Proc] = [worker]
        attr = Attributor(table, exact=lambda path, action, since=None: given[0])
        event = Event(1, "created", str(tmp_path / ".f0.txt.XyZ"))
        got = attr(event)
        assert got.process_pid == worker.pid
        assert got.user_id == str(os.geteuid()) and got.attribution == "exact"
        given[0] = stranger
        other = attr(event)
        assert other.process_pid == stranger.pid and other.user_id is None
    finally:
        finish(named, gate)


def test_remembered_creations_are_capped_and_a_live_one_dropped_is_a_cap_hit() -> None:
    from agent.enrich.attribution import CREATORS_CAP, Attributor, Proc
    from agent.events import Event

    maker = Proc(4242, 1, "mknod", None, (), 0, "root", None, None, None, 0.0, None, None)
    hits: list[tuple[str, int]] = []
    attr = Attributor(
        ProcessTable(report=no_report),
        exact=lambda path, action, since=None: maker if action == "created" else None,
        console=lambda: None,
        on_cap=lambda name, cap: hits.append((name, cap)),
    )
    attr(Event(1, "created", "/t/d", file_type="dir"))  # a directory: never remembered
    assert attr(Event(2, "opened", "/t/d")).attribution_method != "creator"
    for i in range(CREATORS_CAP + 1):
        attr(Event(10, "created", f"/t/f{i}"))
    assert hits == [("attribution_creators", CREATORS_CAP)]
    assert attr(Event(20, "opened", "/t/f0")).attribution_method != "creator"  # dropped
    assert attr(Event(20, "opened", f"/t/f{CREATORS_CAP}")).attribution_method == "creator"
