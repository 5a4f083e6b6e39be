"""The watched user against marker files: every way to untag a tree they can write leaves its
tags in force and is reported (marker_tampered), naming them when attribution finds them."""

from __future__ import annotations

import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import ProcessSettings, WatchSpec
from agent.enrich.marker_state import STORE_NAME
from agent.service import Agent
from tests.conftest import Collector, Gate, as_user, config_from_yaml, make_config, needs_root

pytestmark = needs_root

MARKER = ".exfilwatch.yaml"
KEPT = ("rnd", "crown-jewels")


@dataclass
class Tree:
    base: Path  # 0755, outside the tree: the gate and the store live here
    root: Path  # the watched tree, writable by the test user
    proj: Path  # a directory the user can write, with a marker root wrote

    @property
    def marker(self) -> Path:
        return self.proj / MARKER

    @property
    def state(self) -> Path:
        return self.base / "state"


@pytest.fixture
def tree() -> Iterator[Tree]:
    """pytest's own tmp is private to root; this tree is the test user's to write."""
    base = Path(tempfile.mkdtemp(prefix="exfilwatch-markers-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "rnd"
    proj = root / "proj"
    proj.mkdir(parents=True)
    root.chmod(0o777)
    proj.chmod(0o777)
    (proj / MARKER).write_text("tags: [crown-jewels]\nsensitivity: critical\n")
    try:
        yield Tree(base, root, proj)
    finally:
        shutil.rmtree(base)


def start(run_agent: Callable[..., Agent], collector: Collector, t: Tree, **kw: Any) -> Agent:
    """An agent with attribution on, once the store has learnt the marker."""
    config = make_config(
        [WatchSpec(str(t.root), ("rnd",))],
        t.base,
        state_dir=str(t.state),
        processes=ProcessSettings(enabled=True),
        **kw,
    )
    agent = run_agent(config)
    seed = t.proj / f"seed-{time.monotonic_ns()}"
    seed.write_text("x")
    collector.wait_event("closed_write", seed, tags=KEPT, sensitivity="critical", timeout=20)
    return agent


def tampered(c: Collector, attempt: str) -> list[dict[str, Any]]:
    return [
        r for r in c.health("marker_tampered") if attempt in r["exfilwatch"]["health"]["attempted"]
    ]


def wait_tampered(c: Collector, attempt: str) -> dict[str, Any]:
    if not c.wait_for(lambda c: bool(tampered(c, attempt)), timeout=20):
        seen = [r["exfilwatch"]["health"] for r in c.health("marker_tampered")]
        raise AssertionError(f"no marker_tampered ({attempt}); saw {seen}")
    return tampered(c, attempt)[0]


def still_tagged(c: Collector, user: str, directory: Path) -> None:
    """A file the user writes afterwards still carries the marker's tags and sensitivity."""
    path = directory / f"after-{time.monotonic_ns()}.txt"
    as_user(user, 'echo x > "$1"', str(path))
    c.wait_event("closed_write", path, tags=KEPT, sensitivity="critical", timeout=20)


def as_user_seen(c: Collector, t: Tree, user: str, script: str, *args: str) -> None:
    """Run `script` as `user` once the agent's process table has it (its process_started
    event is out), as a real insider's shell or tool would be known to it."""
    gate = Gate(t.base / f"gate-{time.monotonic_ns()}")
    wrapped = f'read go < "$1"; shift; {script}'
    child = subprocess.Popen(
        ["runuser", "-u", user, "--", "sh", "-c", wrapped, "sh", str(gate.path), *args]
    )
    try:
        seen = c.wait_for(
            lambda c: any(
                e.action == "process_started"
                and e.process_command_line is not None
                and str(gate.path) in e.process_command_line
                for e in c.events()
            ),
            timeout=20,
        )
        assert seen, "the agent never saw the user's shell start"
        gate.open()
        assert child.wait(20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(20)


def names(rec: dict[str, Any], user: str) -> None:
    assert rec["user"] == {"name": user, "id": str(pwd.getpwnam(user).pw_uid)}, rec
    assert rec["event"]["kind"] == "alert" and rec["log"]["level"] == "error"
    assert "crown-jewels" in rec["exfilwatch"]["health"]["kept_tags"]
    assert rec["exfilwatch"]["health"]["kept_sensitivity"] == "critical"


def test_the_user_deletes_the_marker_and_the_tree_stays_tagged(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree)
    as_user_seen(collector, tree, test_user, 'rm -f "$1"', str(tree.marker))
    rec = wait_tampered(collector, "deleted")
    names(rec, test_user)
    assert rec["exfilwatch"]["health"]["noticed"] == "change"
    assert rec["file"]["path"] == str(tree.marker)
    still_tagged(collector, test_user, tree.proj)
    assert not collector.health("marker_removed")


def test_the_user_weakens_the_marker_and_what_it_gave_stays(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree)
    script = 'printf "tags: [public]\\nsensitivity: low\\n" > "$2"; mv -f "$2" "$1"'
    as_user_seen(collector, tree, test_user, script, str(tree.marker), str(tree.proj / "new"))
    rec = wait_tampered(collector, "tags_removed")
    assert not collector.health("marker_rejected")  # a valid marker, only a weaker one
    names(rec, test_user)
    assert rec["exfilwatch"]["health"]["attempted"] == ["tags_removed", "sensitivity_lowered"]
    path = tree.proj / "later.txt"
    as_user(test_user, 'echo x > "$1"', str(path))
    collector.wait_event(
        "closed_write", path, tags=(*KEPT, "public"), sensitivity="critical", timeout=20
    )


def test_an_invalid_marker_then_mkdir_and_rmdir_does_not_untag(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree)
    # The cache of markers is cleared when a directory goes: it used to take the tags along.
    script = 'printf "tags: [\\n" > "$2"; mv -f "$2" "$1"; mkdir "$3"; rmdir "$3"'
    as_user(test_user, script, str(tree.marker), str(tree.proj / "new"), str(tree.proj / "x"))
    wait_tampered(collector, "invalid")
    collector.wait_event("deleted", tree.proj / "x", timeout=20)
    still_tagged(collector, test_user, tree.proj)
    still_tagged(collector, test_user, tree.root / "proj")


def test_a_symlink_in_place_of_the_marker_is_not_followed_and_does_not_untag(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree)
    as_user(test_user, 'ln -sf /etc/shadow "$1"', str(tree.marker))
    rec = wait_tampered(collector, "not_a_regular_file")
    assert "MRK_NOT_FILE" in rec["exfilwatch"]["health"]["problems"][0]
    still_tagged(collector, test_user, tree.proj)


def test_a_fifo_in_place_of_the_marker_neither_blocks_nor_untags(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree)
    as_user(test_user, 'rm -f "$1"; mkfifo -m 666 "$1"', str(tree.marker))
    wait_tampered(collector, "not_a_regular_file")
    still_tagged(collector, test_user, tree.proj)  # the consumer did not hang on the FIFO


def test_moving_the_tree_then_deleting_its_marker_does_not_untag(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree)
    moved = tree.root / "renamed"
    as_user(test_user, 'mv "$1" "$2" && rm -f "$2/$3"', str(tree.proj), str(moved), MARKER)
    rec = wait_tampered(collector, "deleted")
    assert rec["exfilwatch"]["health"]["directory"] == str(moved)
    # Only the marker deleted under its new path: the tree moved away from the old path is
    # not a marker deleted there.
    dirs = [r["exfilwatch"]["health"]["directory"] for r in collector.health("marker_tampered")]
    assert str(tree.proj) not in dirs
    still_tagged(collector, test_user, moved)


def test_deleting_the_marker_while_the_agent_is_stopped_does_not_untag(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree).stop()
    as_user(test_user, 'rm -f "$1"', str(tree.marker))
    run_agent(
        make_config(
            [WatchSpec(str(tree.root), ("rnd",))],
            tree.base,
            state_dir=str(tree.state),
        )
    )
    still_tagged(collector, test_user, tree.proj)
    rec = wait_tampered(collector, "deleted")
    assert rec["exfilwatch"]["health"]["noticed"] == "lookup"


def test_a_marker_of_thousands_of_tags_is_refused_and_events_stay_small(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree)
    big = tree.proj / "big"
    text = "tags: [" + ",".join(f"t{i}" for i in range(9_500)) + "]\n"  # under 64 KiB
    wrote = as_user(
        test_user, 'mkdir "$1" && cat > "$2"', str(big), str(big / MARKER), input=text, check=False
    )
    assert wrote.returncode == 0, wrote.stderr
    assert collector.wait_for(
        lambda c: any(
            r["event"].get("reason") == "MRK_TOO_MANY_TAGS" for r in c.health("marker_rejected")
        ),
        timeout=20,
    )
    path = big / "file.txt"
    as_user(test_user, 'echo x > "$1"', str(path))
    collector.wait_event("closed_write", path, tags=KEPT, timeout=20)
    longest = max(len(line) for line in collector.lines)
    assert longest < 8_192, longest


def test_the_user_can_neither_read_nor_write_the_store(
    tree: Tree, run_agent: Callable[..., Agent], collector: Collector, test_user: str
) -> None:
    start(run_agent, collector, tree)
    assert stat.S_IMODE(tree.state.stat().st_mode) == 0o700
    store = tree.state / STORE_NAME
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    for script in ('cat "$1"', 'echo "{}" > "$1"', 'rm -f "$1"', 'ln -s /dev/null "$1.x"'):
        assert as_user(test_user, script, str(store), check=False).returncode != 0, script
    assert str(tree.proj) in store.read_text()


def exfilwatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=False
    )


def test_only_an_admin_forgets_stored_tags_with_the_command_and_a_reload(
    tree: Tree, tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    config = config_from_yaml(
        f"watch:\n  - path: {tree.root}\n    tags: [rnd]\n"
        f"state_dir: {tree.state}\n"
        "sinks:\n  - type: stdout\n    records: [health]\n"
        "locations:\n  enabled: false\nprocesses:\n  enabled: false\n",
        tmp_path,
    )
    agent = run_agent(config)
    seed = tree.proj / "seed.txt"
    seed.write_text("x")
    collector.wait_event("closed_write", seed, tags=KEPT, timeout=20)
    tree.marker.unlink()  # the admin first removes the marker (or it is learnt again)
    wait_tampered(collector, "deleted")
    cfg = str(tmp_path / "agent.yaml")
    listed = exfilwatch("markers", "list", "--config", cfg)
    assert listed.returncode == 0, listed.stderr
    assert f"{tree.proj}  tags=crown-jewels  sensitivity=critical" in listed.stdout
    assert "tampered=deleted" in listed.stdout
    forgot = exfilwatch("markers", "forget", str(tree.proj), "--config", cfg)
    assert forgot.returncode == 0 and f"forgot {tree.proj}" in forgot.stdout
    assert "reload" in forgot.stdout
    assert exfilwatch("markers", "forget", str(tree.proj), "--config", cfg).returncode == 1
    agent.reload()  # what SIGHUP does
    assert collector.wait_for(lambda c: bool(c.health("marker_forgotten")), timeout=20)
    path = tree.proj / "after.txt"
    path.write_text("x")
    collector.wait_event("closed_write", path, tags=("rnd",), timeout=20)
