"""Rules in the running agent: live alerts equal replayed ones, hot reload keeps state."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
watch:
  - path: {root}
    tags: [rnd]
rules: [{shipped}, {local}]
sinks:
  - type: file
    path: {out}
    records: [alert, health, event]
heartbeat_interval: 1h
state_dir: {state}
locations: {{enabled: false}}
processes: {{enabled: false}}
rules_check_interval: 0.2s
rule_errors: {errors}
"""


class Agent:
    def __init__(self, tmp: Path, errors: str = "fatal", broken: str | None = None) -> None:
        self.root = tmp / "rnd"
        self.root.mkdir()
        self.shipped = tmp / "shipped"
        shutil.copytree(REPO / "rules", self.shipped)
        self.local = tmp / "rules.d"
        self.local.mkdir()
        if broken is not None:
            (self.local / "broken.yaml").write_text(broken)
        self.out = tmp / "log" / "records.jsonl"
        cfg = tmp / "agent.yaml"
        cfg.write_text(
            CONFIG.format(
                root=self.root,
                shipped=self.shipped,
                local=self.local,
                out=self.out,
                state=tmp / "state",
                errors=errors,
            )
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait(lambda: self.health("source_ready"), "source_ready")

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        with self.out.open() as fh:
            # A line the agent is still writing has no newline yet: not a record.
            return [json.loads(line) for line in fh if line.strip() and line.endswith("\n")]

    def health(self, action: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["event"]["kind"] in ("state", "metric") and r["event"]["action"] == action
        ]

    def alerts(self, rule_id: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["event"]["kind"] == "alert" and (rule_id is None or r["rule"]["id"] == rule_id)
        ]

    def wait(
        self,
        predicate: Callable[[], Any],
        what: str,
        timeout: float = 30,
        why: Callable[[], str] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            assert self.proc.poll() is None, "agent exited"
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}" + (f": {why()}" if why else ""))

    def churn(self, name: str, n: int) -> None:
        d = self.root / name
        d.mkdir()
        # Files made and deleted in a directory before its watch exists are never seen (the
        # kernel reports them to no one): wait until the agent has reported the directory.
        self.wait(
            lambda: any(
                r["event"].get("action") == "created" and r["file"]["path"] == str(d)
                for r in self.records()
                if r["event"]["kind"] == "event"
            ),
            f"the new directory {name}",
        )
        for i in range(n):
            (d / f"f{i}").write_text("x")
        for i in range(n):
            (d / f"f{i}").unlink()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=5) == 0


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    yield a
    if a.proc.poll() is None:
        a.proc.kill()
        a.proc.wait()


def test_replaying_the_recorded_events_gives_exactly_the_live_alerts(agent: Agent) -> None:
    agent.wait(lambda: agent.health("rules_loaded"), "rules_loaded")
    agent.churn("a", 250)
    agent.wait(lambda: agent.alerts("destroy-mass-delete"), "mass delete alert")
    agent.stop()
    # event.created is when each alert was made (live, then at replay): all else is equal.
    live = [json.dumps(_uncreated(a), sort_keys=True) for a in agent.alerts()]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "replay",
            str(agent.out),
            "--rules",
            str(agent.shipped),
            str(agent.local),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    replayed = [
        json.dumps(_uncreated(json.loads(line)), sort_keys=True) for line in res.stdout.splitlines()
    ]
    assert live and replayed == live


def _uncreated(alert: dict[str, Any]) -> dict[str, Any]:
    assert alert["event"].pop("created") >= alert["@timestamp"]
    return alert


LOCAL_RULE = """\
id: local-secret-file
title: A file named secret was written
level: medium
tags: [attack.collection]
detection:
  selection: {event.action: closed_write, file.name|contains: secret}
  condition: selection
"""


def test_rules_reload_live_and_a_bad_change_keeps_the_old_set(agent: Agent) -> None:
    agent.wait(lambda: agent.health("rules_loaded"), "rules_loaded")
    # Half a mass delete before the reload; the rest after it must still complete it.
    agent.churn("a", 120)
    # Renamed into place, as config management tools write files.
    staged = agent.local / ".local.yaml.tmp"
    staged.write_text(LOCAL_RULE)
    staged.rename(agent.local / "local.yaml")
    agent.wait(lambda: agent.health("rules_reloaded"), "rules_reloaded")
    (agent.root / "secret-plan.txt").write_text("x")
    agent.wait(lambda: agent.alerts("local-secret-file"), "alert from the new rule")
    agent.churn("b", 100)

    def deletes() -> str:
        records = agent.records()
        seen = sum(1 for r in records if r["event"].get("action") == "deleted")
        health = [r["event"]["action"] for r in records if r["event"]["kind"] != "event"]
        return f"{seen} deletions recorded; health and alerts: {health}"

    agent.wait(
        lambda: agent.alerts("destroy-mass-delete"), "mass delete across the reload", why=deletes
    )
    assert agent.alerts("destroy-mass-delete")[0]["exfilwatch"]["correlation"]["count"] == 200

    (agent.local / "broken.yaml").write_text(
        "id: broken\ntitle: b\nlevel: hgih\ndetection: {s: {event.action: x}, condition: s}\n"
    )
    agent.wait(lambda: agent.health("rules_reload_rejected"), "reload rejected")
    rejected = agent.health("rules_reload_rejected")[0]
    assert rejected["event"]["reason"] == "RULE_LEVEL"
    assert rejected["exfilwatch"]["health"]["problems"][0].startswith(
        f"{agent.local / 'broken.yaml'}:3:8 RULE_LEVEL"
    )
    (agent.root / "secret-2.txt").write_text("x")
    agent.wait(lambda: len(agent.alerts("local-secret-file")) == 2, "the old set still runs")

    before = len(agent.health("rules_reloaded"))
    (agent.local / "broken.yaml").unlink()
    agent.wait(lambda: len(agent.health("rules_reloaded")) > before, "reloaded after the fix")
    reloads = len(agent.health("rules_reloaded"))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait(lambda: len(agent.health("rules_reloaded")) > reloads, "SIGHUP reload")
    agent.stop()


BROKEN = "id: broken\ntitle: b\nlevel: hgih\ndetection: {s: {event.action: x}, condition: s}\n"


def test_a_rule_with_errors_is_quarantined_and_the_rest_run(tmp_path: Path) -> None:
    agent = Agent(tmp_path, errors="quarantine", broken=LOCAL_RULE + "---\n" + BROKEN)
    try:
        agent.wait(lambda: agent.health("rules_loaded"), "rules_loaded")
        (rejected,) = agent.health("rules_rejected")
        assert rejected["event"]["reason"] == "RULE_LEVEL"
        assert rejected["exfilwatch"]["health"]["rejected"] == ["broken"]
        assert rejected["exfilwatch"]["health"]["problems"][0].startswith(
            f"{agent.local / 'broken.yaml'}:"
        )
        (agent.root / "secret-plan.txt").write_text("x")
        agent.wait(lambda: agent.alerts("local-secret-file"), "an alert from the good rule")
        # A bad edit of a running rule keeps its last good version.
        (agent.local / "broken.yaml").write_text(
            LOCAL_RULE.replace("level: medium", "level: mediun") + "---\n" + BROKEN
        )
        agent.wait(lambda: len(agent.health("rules_rejected")) == 2, "the second rejection")
        second = agent.health("rules_rejected")[1]
        assert second["exfilwatch"]["health"]["kept_previous"] == ["local-secret-file"]
        (agent.root / "secret-2.txt").write_text("x")
        agent.wait(lambda: len(agent.alerts("local-secret-file")) == 2, "the kept version runs")
    finally:
        agent.stop()
