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

import pytest

from agent.config import ProcessSettings, SinkSpec, WatchSpec
from agent.enrich.attribution import ProcessTable, masquerade_of
from agent.service import Agent
from tests.conftest import Collector, make_config

REPO = Path(__file__).resolve().parents[2]
TEST_USER = "exfilwatch-test"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as a test user")


@pytest.fixture(scope="session")
def test_user() -> str:
    """A dedicated unprivileged user (created once, left for later runs)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a test user")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True,
        )
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    return TEST_USER


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_masquerade_signals_are_told_apart() -> None:
    assert masquerade_of("kworker", "/tmp/x", ("[kworker/0:1]",)) == "kernel_thread_name"
    assert masquerade_of("crond", "/usr/bin/tar", ("crond",)) == "name_mismatch"
    assert masquerade_of("tar", "/usr/bin/tar", ("sshd", "-D")) == "argv0_mismatch"
    assert masquerade_of("tar", "/usr/bin/tar", ("tar", "cf", "x")) is None
    assert masquerade_of("bash", "/usr/bin/bash", ("-bash",)) is None
    assert masquerade_of("myscript.py", "/usr/bin/python3.11", ("python3", "myscript.py")) is None
    assert masquerade_of("kthreadd", None, ()) is None  # a real kernel thread


def test_a_process_started_under_another_name_is_flagged() -> None:
    child = subprocess.Popen(["bash", "-c", "exec -a crond sleep 3"])
    try:
        table = ProcessTable()
        assert wait_for(
            lambda: (table.read(child.pid) or 0) and table.read(child.pid).cmdline[:1] == ("crond",)
        )  # type: ignore[union-attr]
        proc = table.read(child.pid)
        assert proc is not None and proc.masquerade == "argv0_mismatch"
    finally:
        child.kill()
        child.wait()


def test_a_renamed_copy_of_a_known_tool_is_recognised(tmp_path: Path) -> None:
    fake = tmp_path / "crond"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    child = subprocess.Popen([str(fake), "3"])
    try:
        table = ProcessTable(tools=("sleep",))
        assert wait_for(lambda: table.read(child.pid) is not None)
        proc = table.read(child.pid)
        assert proc is not None and proc.masquerade == "renamed_binary:sleep"
    finally:
        child.kill()
        child.wait()


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


def start(run_agent: Callable[..., Agent], tmp_path: Path, root: Path) -> Agent:
    config = make_config(
        [WatchSpec(str(root), ("rnd",))],
        tmp_path,
        rules=(str(REPO / "rules"),),
        sinks=(SinkSpec("stdout", None, frozenset({"event", "health", "alert"})),),
        processes=ProcessSettings(enabled=True, interval=0.05, fanotify="off"),
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
    start(run_agent, tmp_path, tree)
    target = tree / "chip" / "written-by-test-user.v"
    # The target is an argument, as for cp, rsync or a script: the agent reads the process
    # table and finds the process that names the file.
    script = 'sleep 0.5; echo x > "$1"; sleep 0.5'
    child = subprocess.Popen(
        ["runuser", "-u", test_user, "--", "sh", "-c", script, "sh", str(target)]
    )
    try:
        collector.wait_event("closed_write", target, timeout=10)
    finally:
        child.wait()
    event = next(
        e for e in collector.events() if e.path == str(target) and e.action == "closed_write"
    )
    assert event.user_name == test_user
    assert event.user_id == str(pwd.getpwnam(test_user).pw_uid)
    assert event.process_name == "sh"
    assert event.process_command_line is not None and str(target) in event.process_command_line
    assert event.attribution == "inferred" and event.attribution_method == "cmdline"
    assert event.process_parent_name == "runuser"


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
    # tar blocks on the full pipe for a second, long enough to be seen by the 50 ms poll.
    subprocess.run(
        [
            "runuser",
            "-u",
            test_user,
            "--",
            "sh",
            "-c",
            f"tar cf - '{tree / 'chip'}' 2>/dev/null | (sleep 1; cat > /dev/null)",
        ],
        check=True,
    )
    assert collector.wait_for(
        lambda c: any(
            e.action == "process_started" and e.process_name == "tar" for e in c.events()
        ),
        timeout=5,
    )
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
        timeout=5,
    )


def test_process_settings_disable_everything(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    config = make_config([WatchSpec(str(root))], tmp_path)
    agent = run_agent(replace(config, processes=ProcessSettings(enabled=False)))
    assert agent.processes is None and agent.pipeline is not None
    assert agent.pipeline.attributor is None


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
    run_agent(config)
    target = tree / "chip" / "fast.v"
    # No argument names the file: only the kernel can say who wrote it.
    # The write comes well before the close, so the kernel's record of it is in before the
    # close is attributed (the fanotify reader can lag the inotify one by a few ms).
    script = 'cd "$(dirname "$1")" && exec 3>fast.v && echo x >&3 && sleep 0.3'
    child = subprocess.Popen(
        ["runuser", "-u", test_user, "--", "sh", "-c", script, "sh", str(target)]
    )
    child.wait()
    collector.wait_event("closed_write", target, timeout=10)
    event = next(
        e for e in collector.events() if e.path == str(target) and e.action == "closed_write"
    )
    assert event.attribution == "exact"
    assert event.attribution_method == "fanotify"
    assert event.user_name == test_user
    assert event.process_name == "sh"
