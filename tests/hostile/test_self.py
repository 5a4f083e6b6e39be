"""The agent never reports itself: its own reads of tagged files are nobody's activity."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from agent.config import LocationSettings, SinkSpec, WatchSpec
from agent.service import Agent
from tests.conftest import Collector, make_config

REPO = Path(__file__).resolve().parents[2]


def test_a_file_dropped_in_staging_with_the_size_of_600_tagged_files_raises_nothing(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    rnd = tmp_path / "rnd"
    rnd.mkdir()
    for i in range(600):
        (rnd / f"block{i:03}.v").write_bytes(os.urandom(1000))
    stage = tmp_path / "stage"
    stage.mkdir()
    config = make_config(
        [WatchSpec(str(rnd), ("rnd",), "high")],
        tmp_path,
        rules=(str(REPO / "rules"),),
        sinks=(SinkSpec("stdout", None, frozenset({"event", "health", "alert"})),),
        locations=LocationSettings(
            enabled=True, home_roots=(str(tmp_path / "home"),), staging_dirs=(str(stage),)
        ),
    )
    agent = run_agent(config, kinds=frozenset({"event", "health", "alert"}))
    assert collector.wait_for(lambda c: bool(c.health("lineage_index_built")), timeout=20)
    # The bait: same size as every tagged file, content of none of them.
    (stage / "bait.bin").write_bytes(os.urandom(1000))
    collector.wait_event("closed_write", stage / "bait.bin", timeout=20)
    # A real read after it: once it is reported, everything queued before it in the tagged
    # lane (the agent's own opens of candidates included) has been processed.
    (rnd / "block000.v").read_bytes()
    collector.wait_event("closed_nowrite", rnd / "block000.v", timeout=20)
    reads = [e for e in collector.events() if e.action in ("opened", "closed_nowrite")]
    assert [(e.action, e.path) for e in reads] == [
        ("opened", str(rnd / "block000.v")),
        ("closed_nowrite", str(rnd / "block000.v")),
    ]
    assert not [r for r in collector.records() if r["event"]["kind"] == "alert"]
    # Hashing stopped at the per-file cap, and said so.
    capped = [
        r for r in collector.health("cap_reached") if r["event"]["reason"] == "lineage_candidates"
    ]
    assert capped
    assert agent.pipeline is not None
    assert agent.pipeline.stats()["own_reads_dropped"] == 2 * 16
