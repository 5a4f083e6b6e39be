"""`exfilwatch status`: the running agent's status file, judged (exit 0, 1 or 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.status import EXIT_DEGRADED, EXIT_HEALTHY, EXIT_NOT_RUNNING, assess, write_status


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=False
    )


def wait_for(predicate: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_status_follows_a_running_agent_from_start_to_stop(tmp_path: Path) -> None:
    tree = tmp_path / "rnd"
    tree.mkdir()
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(
        "id: r\ntitle: t\nlevel: low\ndetection: {s: {event.action: deleted}, condition: s}\n"
    )
    state = tmp_path / "state"
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"watch: [{{path: {tree}, tags: [rnd]}}]\nrules: [{rules}]\n"
        f"sinks: [{{type: file, path: {tmp_path / 'out.jsonl'}}}]\nstate_dir: {state}\n"
        "heartbeat_interval: 1h\n"
    )
    config.chmod(0o600)
    before = cli("status", "--config", str(config))
    assert before.returncode == EXIT_NOT_RUNNING and "no status file" in before.stdout
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for((state / "status.json").exists, "the status file")
        done = cli("status", "--config", str(config), "--format", "json")
        assert done.returncode == EXIT_HEALTHY, done.stdout
        verdict = json.loads(done.stdout)
        assert verdict["state"] == "running" and verdict["problems"] == []
        assert verdict["status"]["pid"] == agent.pid
        assert verdict["status"]["rules"]["active"] == 1
        assert (state / "status.json").stat().st_mode & 0o777 == 0o600
        table = cli("status", "--config", str(config))
        assert table.returncode == EXIT_HEALTHY
        assert "state" in table.stdout and "running" in table.stdout
        # A rule edit that does not compile: quarantined (the last good version runs on),
        # and status says the agent is degraded.
        (rules / "r.yaml").write_text("id: r\ntitle: t\nlevel: nope\n")
        agent.send_signal(signal.SIGHUP)

        def judged(check: Any) -> Any:
            def look() -> dict[str, Any] | None:
                out = cli("status", "--state-dir", str(state), "--format", "json").stdout
                got: dict[str, Any] = json.loads(out)
                return got if check(got) else None

            return look

        verdict = wait_for(
            judged(lambda v: (v["status"].get("rules") or {}).get("rejected")),
            "the rejected rule in the status",
        )
        assert verdict["exit"] == EXIT_DEGRADED
        assert any("rules rejected" in p for p in verdict["problems"])
        # A config edit that does not parse: the reload is refused, the running config kept.
        text = config.read_text()
        config.write_text(text + "queue_size: [\n")
        agent.send_signal(signal.SIGHUP)
        verdict = wait_for(
            judged(lambda v: (v["status"].get("last_reload") or {}).get("ok") is False),
            "the refused config reload in the status",
        )
        assert verdict["status"]["last_reload"]["what"] == "config"
        assert any("last reload rejected" in p for p in verdict["problems"])
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
    stopped = cli("status", "--state-dir", str(state), "--format", "json")
    assert stopped.returncode == EXIT_NOT_RUNNING
    assert json.loads(stopped.stdout)["state"] == "stopped"


def test_a_status_left_by_an_agent_that_died_is_down(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_status(str(tmp_path), {"state": "running", "pid": gone.pid, "updated": time.time()})
    from agent.status import read_status

    verdict = assess(*read_status(str(tmp_path)))
    assert verdict["state"] == "down" and verdict["exit"] == EXIT_NOT_RUNNING


def test_degraded_when_stale_losing_or_rejecting() -> None:
    now = time.time()
    base: dict[str, Any] = {
        "state": "running",
        "pid": os.getpid(),
        "updated": now,
        "heartbeat_interval_s": 60,
        "stats": {"pipeline": {"dropped_total": 0}, "sinks": {"file:x": {"up": True}}},
        "rules": {"active": 3, "inactive": 0, "rejected": 0},
    }
    assert assess(base, None, now)["exit"] == EXIT_HEALTHY
    stale = assess({**base, "updated": now - 400}, None, now)
    assert stale["exit"] == EXIT_DEGRADED and "no status for 400 s" in stale["problems"][0]
    losing = {**base, "stats": {"pipeline": {"dropped_total": 7}}}
    assert assess(losing, None, now)["problems"] == ["7 events dropped since start"]
    down_sink = {**base, "stats": {"sinks": {"http:siem": {"up": False, "pending": 12}}}}
    assert "sink http:siem is down (12 records waiting)" in assess(down_sink, None, now)["problems"]
    rejected = {**base, "rules": {"active": 3, "inactive": 0, "rejected": 2}}
    assert assess(rejected, None, now)["exit"] == EXIT_DEGRADED


def test_an_edit_of_the_running_agents_config_is_a_health_record(tmp_path: Path) -> None:
    # Who can change the agent's config can blind it: the SIEM sees every change on disk,
    # with what changed (never the content), while the running config stays until a reload.
    tree = tmp_path / "rnd"
    tree.mkdir()
    out = tmp_path / "out.jsonl"
    config = tmp_path / "etc" / "agent.yaml"
    config.parent.mkdir()
    config.write_text(
        f"watch: [{{path: {tree}, tags: [rnd]}}]\n"
        f"sinks: [{{type: file, path: {out}, records: [health]}}]\n"
        f"state_dir: {tmp_path / 'state'}\nheartbeat_interval: 1h\n"
    )
    config.chmod(0o600)
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def health(action: str) -> list[dict[str, Any]]:
        if not out.exists():
            return []
        lines = [json.loads(x) for x in out.read_text().splitlines() if x.endswith("}")]
        return [r for r in lines if r["event"]["action"] == action]

    try:
        wait_for(lambda: health("source_ready"), "the agent to start")
        text = config.read_text()
        config.write_text(text.replace("heartbeat_interval: 1h", "heartbeat_interval: 2h"))
        (changed,) = wait_for(lambda: health("config_changed"), "a config_changed record")
        assert changed["event"]["reason"] == "modified"
        details = changed["exfilwatch"]["health"]
        assert details["config"] == str(config)
        assert "mtime_ns" in details["changed"] and "heartbeat" not in json.dumps(details)
        assert not health("config_reloaded")  # kept until a reload asks for the new one
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)


def test_a_change_to_the_agents_own_installed_code_is_a_health_record(
    tmp_path: Path, run_agent: Any, collector: Any
) -> None:
    # An upgrade, or a watched user with write access editing the agent to blind it: the SIEM
    # sees which files changed. The running agent compares with the code it loaded; a
    # stand-in for a changed file here (the checkout's own files are not edited by a test).
    from agent.service import Agent
    from tests.conftest import WatchSpec, make_config

    (tmp_path / "rnd").mkdir()
    agent: Agent = run_agent(make_config([WatchSpec(str(tmp_path / "rnd"), ("rnd",))], tmp_path))
    agent.check_code_files()
    assert not collector.health("agent_files_changed")  # nothing changed since start
    some = next(iter(agent._code_identity))
    ino, size, mtime = agent._code_identity[some]
    agent._code_identity[some] = (ino, size + 1, mtime)  # as it was when loaded (stand-in)
    agent.check_code_files()
    assert collector.wait_for(lambda c: c.health("agent_files_changed"), timeout=10)
    (rec,) = collector.health("agent_files_changed")
    assert rec["exfilwatch"]["health"]["changed"] == [some]
    assert rec["exfilwatch"]["health"]["count"] == 1


def test_the_file_checks_wake_for_the_files_that_matter_not_the_agents_own_writes(
    tmp_path: Path,
) -> None:
    """The state dir is written by the agent (status, checkpoints): only the watchlist there
    wakes the rule/config/code checks; in a rule directory any file does."""
    from agent.service import _DirWatcher

    state, rules = tmp_path / "state", tmp_path / "rules"
    state.mkdir()
    rules.mkdir()
    watcher = _DirWatcher({str(state): frozenset({"watchlist.yaml"}), str(rules): None})
    r, w = os.pipe()

    def woken(seconds: float) -> bool:
        """Whether a wait within `seconds` said "changed" (a read may hold only part of what
        was done; the agent's loop waits again, as this does)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if watcher.wait(left, r):
                return True
        return False

    try:
        assert watcher.ok
        (state / "status.json").write_text("{}")
        (state / ".status.json.tmp").write_text("{}")
        assert not woken(0.3)
        (state / "watchlist.yaml.tmp").write_text("entries: []\n")
        os.replace(state / "watchlist.yaml.tmp", state / "watchlist.yaml")
        assert woken(5.0)
        (rules / "local.yaml").write_text("x: 1\n")
        assert woken(5.0)
        assert not woken(0.2)  # nothing since
    finally:
        watcher.close()
        os.close(r)
        os.close(w)
