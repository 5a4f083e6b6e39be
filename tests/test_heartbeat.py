"""The heartbeat says what an operator needs at a glance, the metrics file says the same to
Prometheus, and `run --format pretty` prints one readable line per alert."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.config import WatchSpec
from agent.service import Agent
from tests.conftest import Collector, make_config


def test_the_heartbeat_has_lanes_rates_watches_outbox_sinks_ruleset_and_version(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(
        "id: r\ntitle: t\nlevel: low\ndetection: {s: {event.action: created}, condition: s}\n"
    )
    prom = tmp_path / "metrics" / "exfilwatch.prom"
    prom.parent.mkdir()
    config = make_config(
        [WatchSpec(str(root), ("rnd",))],
        tmp_path,
        rules=(str(rules),),
        metrics_textfile=str(prom),
    )
    agent = run_agent(config)
    (root / "a.txt").write_text("x")
    assert collector.wait_for(
        lambda c: any(r["event"].get("kind") == "alert" for r in c.records()), timeout=20
    )
    agent.heartbeat()
    # The record travels the pipeline's queue to the sinks: waited for, not assumed there.
    assert collector.wait_for(lambda c: bool(c.health("heartbeat")), timeout=20)
    (beat,) = collector.health("heartbeat")
    data = beat["exfilwatch"]["health"]
    assert set(data["pipeline"]["lanes"]) == {"tagged", "egress", "staging"}
    assert {"queued", "dropped_total", "processed"} <= set(data["pipeline"]["lanes"]["tagged"])
    assert data["events_per_s"] >= 0 and data["alerts_per_s"] >= 0
    assert data["alerts"] >= 1
    assert data["inotify"]["watches"] >= 1 and data["max_user_watches"] >= 8192
    assert {"backlog", "oldest_age_s", "bytes", "dropped_total"} <= set(data["outbox"])
    assert data["ruleset"]["rules"] == 1 and len(data["ruleset"]["sha256"]) == 64
    assert data["version"]
    (sink,) = data["sinks"].values()
    assert sink["up"] is True and sink["delivered"] >= 2

    families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
    assert families["exfilwatch_up"].samples[0].value == 1
    assert families["exfilwatch_alerts"].samples[0].value >= 1
    assert any(s.labels.get("lane") == "tagged" for s in families["exfilwatch_lane_queued"].samples)


def test_run_format_pretty_prints_one_readable_line_per_alert(tmp_path: Path) -> None:
    root, rules = tmp_path / "rnd", tmp_path / "rules"
    root.mkdir()
    rules.mkdir()
    (rules / "r.yaml").write_text(
        "id: every-create\ntitle: Every created file\nlevel: high\n"
        "detection: {s: {event.action: created}, condition: s}\n"
    )
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"watch: [{{path: {root}, tags: [rnd]}}]\nrules: [{rules}]\n"
        f"sinks: [{{type: stdout}}]\nstate_dir: {tmp_path / 'state'}\n"
        "locations: {enabled: false}\nprocesses: {enabled: false}\n"
    )
    exe = shutil.which("exfilwatch", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "agent"]
    out = tmp_path / "stdout.txt"
    with out.open("w") as fh:
        proc = subprocess.Popen(
            [*cmd, "run", "--config", str(config), "--format", "pretty"],
            stdout=fh,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NO_COLOR": "1"},
        )
        try:
            deadline = time.monotonic() + 20
            name = root / "evil\nname\x1b[2J.txt"
            while "source_ready" not in out.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            name.write_text("x")
            while "Every created file" not in out.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(10)
    lines = out.read_text().splitlines()
    (alert,) = [x for x in lines if "Every created file" in x]
    assert "HIGH" in alert
    assert "evil\\nname\\x1b[2J.txt" in alert, "the name shown escaped, on one line"
    assert "\x1b" not in out.read_text(), "no raw escape reaches the terminal"
    assert not any(x.startswith("{") for x in lines), "no JSON lines in pretty mode"
