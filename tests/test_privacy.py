"""Pseudonymized user names: no real name or uid in any record, the same pseudonym for the same
user, and the key holder reveals it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import ProcessSettings, SinkSpec, WatchSpec
from agent.privacy import Pseudonyms, load_or_make_key
from agent.service import Agent
from tests.conftest import Collector, as_user, make_config, needs_root
from tests.enrich.test_attribution import tree

__all__ = ["tree"]  # the fixture, used by name


def test_pseudonyms_are_stable_keyed_and_reversible_only_with_the_key(tmp_path: Path) -> None:
    key = load_or_make_key(str(tmp_path / "pseudonym.key"))
    assert stat.S_IMODE((tmp_path / "pseudonym.key").stat().st_mode) == 0o600
    assert load_or_make_key(str(tmp_path / "pseudonym.key")) == key, "made once, then kept"
    names = Pseudonyms(key)
    alice = names("alice")
    assert alice == names("alice") and alice.startswith("u-") and len(alice) == 18
    assert alice != Pseudonyms(os.urandom(32))("alice"), "another key, another pseudonym"
    assert names.reveal(alice, ["bob", "alice", "carol"]) == ["alice"]
    (tmp_path / "loose.key").write_text(os.urandom(32).hex())
    (tmp_path / "loose.key").chmod(0o644)
    with pytest.raises(PermissionError):
        load_or_make_key(str(tmp_path / "loose.key"))


@needs_root
def test_no_real_user_name_or_uid_reaches_a_sink_and_reveal_names_the_user(
    tree: Path,
    tmp_path: Path,
    run_agent: Callable[..., Agent],
    collector: Collector,
    test_user: str,
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(
        "id: r\ntitle: t\nlevel: low\ndetection: {s: {event.action: closed_write}, condition: s}\n"
    )
    config = make_config(
        [WatchSpec(str(tree), ("rnd",))],
        tmp_path,
        rules=(str(rules),),
        sinks=(SinkSpec("stdout", None, frozenset({"event", "health", "alert"})),),
        processes=ProcessSettings(enabled=True, interval=0.05, fanotify="off"),
        pseudonymize=True,
    )
    run_agent(config)
    target = tree / "chip" / "by-user.v"
    as_user(test_user, 'echo x > "$1"', str(target))

    def alert_for_target(c: Collector) -> bool:
        return any(
            r["event"]["kind"] == "alert" and r["file"]["path"] == str(target) for r in c.records()
        )

    assert collector.wait_for(alert_for_target, timeout=20)

    def written(c: Collector) -> bool:
        return any(
            e.path == str(target) and e.action == "closed_write" and e.user_name for e in c.events()
        )

    assert collector.wait_for(written, timeout=20)
    import pwd

    uid = str(pwd.getpwnam(test_user).pw_uid)
    for r in collector.records():
        user = r.get("user", {})
        attribution = r.get("exfilwatch", {}).get("attribution", {})
        health = r.get("exfilwatch", {}).get("health", {})
        seen = [user.get("name"), user.get("id"), health.get("user")]
        seen += [attribution.get("login_user"), attribution.get("login_uid")]
        assert test_user not in seen and uid not in seen, r
    # Command lines are data rules need (docs/privacy.md): `runuser -u NAME` keeps its name.
    event = next(
        e
        for e in collector.events()
        if e.path == str(target) and e.action == "closed_write" and e.user_name
    )
    assert event.user_name is not None and event.user_name.startswith("u-")
    alert = next(
        r
        for r in collector.records()
        if r["event"]["kind"] == "alert" and r["file"]["path"] == str(target)
    )
    assert alert["user"]["name"] == event.user_name, "the same pseudonym in events and alerts"

    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"watch: []\nstate_dir: {tmp_path / 'state'}\n")
    cfg.chmod(0o600)
    exe = shutil.which("exfilwatch", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "agent"]
    done = subprocess.run(
        [*cmd, "pseudonym", "reveal", event.user_name, "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [event.user_name, test_user]
