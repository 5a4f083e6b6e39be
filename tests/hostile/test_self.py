"""The agent never reports itself: its own reads of tagged files are nobody's activity."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

from agent.config import LocationSettings, SinkSpec, WatchSpec
from agent.service import Agent
from tests.conftest import Collector, make_config

REPO = Path(__file__).resolve().parents[2]


def start(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> tuple[Agent, Path, Path]:
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
    return agent, rnd, stage


def only_the_users_read(collector: Collector, rnd: Path) -> None:
    """A real read after the bait: once it is reported, everything queued before it in the
    tagged lane (the agent's own opens of candidates included) has been processed."""
    (rnd / "block000.v").read_bytes()
    collector.wait_event("closed_nowrite", rnd / "block000.v", timeout=20)
    reads = [e for e in collector.events() if e.action in ("opened", "closed_nowrite")]
    assert [(e.action, e.path) for e in reads] == [
        ("opened", str(rnd / "block000.v")),
        ("closed_nowrite", str(rnd / "block000.v")),
    ]
    assert not [r for r in collector.records() if r["event"]["kind"] == "alert"]


def test_a_file_dropped_in_staging_with_the_size_of_600_tagged_files_raises_nothing(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    agent, rnd, stage = start(tmp_path, run_agent, collector)
    # The bait: same size as every tagged file, content of none of them.
    (stage / "bait.bin").write_bytes(os.urandom(1000))
    collector.wait_event("closed_write", stage / "bait.bin", timeout=20)
    only_the_users_read(collector, rnd)
    # Hashing stopped at the per-file cap, and said so.
    capped = [
        r for r in collector.health("cap_reached") if r["event"]["reason"] == "lineage_candidates"
    ]
    assert capped
    assert agent.pipeline is not None
    assert agent.pipeline.stats()["own_reads_dropped"] == 2 * 16


def test_an_archive_of_600_members_with_tagged_sizes_raises_nothing(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    agent, rnd, stage = start(tmp_path, run_agent, collector)
    bait = tmp_path / "bait.zip"
    with zipfile.ZipFile(bait, "w") as zf:
        for i in range(600):
            zf.writestr(f"m{i}.bin", os.urandom(1000))
    bait.rename(stage / "bait.zip")
    collector.wait_event("moved_in", stage / "bait.zip", timeout=20)
    only_the_users_read(collector, rnd)
    # The agent did read tagged files to compare the members (and hid those reads).
    assert agent.pipeline is not None
    assert agent.pipeline.stats()["own_reads_dropped"] > 0
