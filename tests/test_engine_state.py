"""Correlation windows and suppression survive a restart: half a threshold before and half
after is one alert; a rule that changed meanwhile starts over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.events import Event
from agent.rules.compiler import load_rules
from agent.rules.engine import Engine
from tests.conftest import Run
from tests.hostile.test_downtime import restart

RULES = """\
id: dat-created
title: a .dat file was created
level: low
generate: false
detection: {s: {event.action: created, file.extension: dat}, condition: s}
---
id: ten-dat-files
title: ten .dat files created
level: high
correlation:
  type: event_count
  rules: [dat-created]
  group-by: [host.hostname]
  timespan: 1h
  condition: {gte: 10}
"""


def with_rules(run: Run, rules: str) -> None:
    d = run.tmp / "rules"
    d.mkdir(exist_ok=True)
    (d / "r.yaml").write_text(rules)
    text = run.config.read_text() + f"rules: [{d}]\n"
    run.write_config(text)


def alerts(run: Run, rule: str) -> list[dict[str, object]]:
    return [
        r
        for r in run.records()
        if r["event"]["kind"] == "alert" and r["rule"]["id"] == rule  # type: ignore[index]
    ]


def stop(run: Run) -> None:
    assert run.stop() == 0


def test_half_a_threshold_before_a_restart_and_half_after_is_one_alert(agent_run: Run) -> None:
    stop(agent_run)
    with_rules(agent_run, RULES)
    restart(agent_run)
    agent_run.wait(lambda: len(agent_run.health("source_ready")) == 2, "the agent with rules")
    for i in range(5):
        (agent_run.root / f"before{i}.dat").write_text("x")
    agent_run.wait(
        lambda: sum(e.path.endswith(".dat") for e in agent_run.events()) >= 5, "five events"
    )
    stop(agent_run)
    saved = json.loads((agent_run.tmp / "state" / "engine.state.json").read_text())
    assert saved["windows"]["ten-dat-files"]["groups"], "the open window is on disk"

    restart(agent_run)
    # The state is restored before the tree is watched: wait for the watch, or the files
    # below would be made before it and come back as `rescanned`, not `created`.
    agent_run.wait(lambda: len(agent_run.health("source_ready")) == 3, "the third start")
    restored = agent_run.health("engine_state_restored")[-1]["exfilwatch"]["health"]
    assert (restored["groups"], restored["matches"]) == (1, 5)
    assert not alerts(agent_run, "ten-dat-files")
    for i in range(5):
        (agent_run.root / f"after{i}.dat").write_text("x")
    agent_run.wait(lambda: alerts(agent_run, "ten-dat-files"), "one alert across the restart")
    (alert,) = alerts(agent_run, "ten-dat-files")
    assert alert["exfilwatch"]["correlation"]["count"] == 10  # type: ignore[index]


def test_a_rule_that_changed_meanwhile_starts_over(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    (tmp_path / "r.yaml").write_text(RULES)
    ruleset, _ = load_rules([str(tmp_path / "r.yaml")], 0)
    assert ruleset is not None
    first = Engine(ruleset)
    for i in range(5):
        first.process(Event(1_000_000 + i, "created", f"/r/f{i}.dat", hostname="h", sequence=i))
    state = json.loads(json.dumps(first.export_state()))
    same = Engine(ruleset)
    assert same.import_state(state, 2_000_000)["matches"] == 5
    (tmp_path / "r.yaml").write_text(RULES.replace("gte: 10", "gte: 12"))
    changed_set, _ = load_rules([str(tmp_path / "r.yaml")], 0)
    assert changed_set is not None
    changed = Engine(changed_set)
    got = changed.import_state(state, 2_000_000)
    assert got["groups"] == 0 and got["skipped_rules"] == 1
    late = Engine(ruleset)
    assert late.import_state(state, 1_000_000 + 3_600_000_000 + 10)["groups"] == 0, "expired"
    assert Engine(ruleset).import_state({"version": 99}, 0)["bad"] == 1
    assert Engine(ruleset).import_state({"version": 1, "windows": {"ten-dat-files": {
        "fingerprint": ruleset.correlations["ten-dat-files"].fingerprint,
        "groups": [["not", "a", "row"], [[1], "win", [["x"]]]]}}}, 0)["bad"] == 2  # fmt: skip


def test_unchanged_state_is_not_rewritten_and_a_deleted_file_is(
    run_agent: Any, tmp_path: Path
) -> None:
    # An idle agent's checkpoints would otherwise replace (write, fsync, rename) the same bytes
    # every 30 s: a wake-up of the disk and of every watcher of the state directory.
    from agent.config import WatchSpec
    from agent.service import ENGINE_STATE_FILE
    from tests.conftest import make_config

    root = tmp_path / "rnd"
    root.mkdir()
    agent = run_agent(make_config([WatchSpec(str(root), ("chip",))], tmp_path))
    path = Path(agent.config.state_dir) / ENGINE_STATE_FILE
    state = {"windows": {}, "suppression": {"r": 1}}
    agent.save_engine_state(state)
    first = path.stat()
    agent.save_engine_state(dict(state))  # the same content: left as it is
    assert path.stat().st_ino == first.st_ino
    agent.save_engine_state({**state, "suppression": {"r": 2}})  # replaced atomically
    second = path.stat()
    assert second.st_ino != first.st_ino
    assert json.loads(path.read_text())["suppression"] == {"r": 2}
    path.unlink()
    agent.save_engine_state({**state, "suppression": {"r": 2}})  # gone: written again
    assert json.loads(path.read_text())["suppression"] == {"r": 2}
