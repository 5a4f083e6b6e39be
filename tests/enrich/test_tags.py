"""Tags from the config and from marker files: merging, live changes, and bad markers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import WatchSpec
from agent.enrich.tags import TagResolver, parse_marker, read_marker
from agent.health import CapReporter
from agent.service import Agent
from tests.conftest import Collector, make_config


def resolver(specs: list[WatchSpec], reports: list[dict[str, Any]]) -> TagResolver:
    return TagResolver(specs, ".exfilwatch.yaml", reports.append, CapReporter(reports.append))


def test_markers_add_tags_down_the_tree_and_sensitivity_is_the_highest(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    (root / "chip" / "rtl").mkdir(parents=True)
    (root / "chip" / ".exfilwatch.yaml").write_text("tags: [chip-design]\nsensitivity: high\n")
    (root / "chip" / "rtl" / ".exfilwatch.yaml").write_text("tags: [rtl]\nsensitivity: low\n")
    r = resolver([WatchSpec(str(root), ("rnd",), "medium")], [])
    assert r.resolve_dir(str(root)).tags == ("rnd",)
    deep = r.resolve_dir(str(root / "chip" / "rtl"))
    assert deep.tags == ("rnd", "chip-design", "rtl")
    assert deep.sensitivity == "high"  # a lower marker can never lower it
    assert deep.root == str(root)


def test_nested_watch_entries_merge_and_the_deepest_is_the_root(tmp_path: Path) -> None:
    outer = tmp_path / "rnd"
    inner = outer / "models"
    inner.mkdir(parents=True)
    r = resolver(
        [WatchSpec(str(inner), ("weights",), "critical"), WatchSpec(str(outer), ("rnd",))], []
    )
    got = r.resolve_dir(str(inner / "v2"))
    assert got.tags == ("rnd", "weights")
    assert got.sensitivity == "critical"
    assert got.root == str(inner)
    assert r.resolve_dir(str(tmp_path / "elsewhere")).tags == ()


def test_a_bad_marker_edit_keeps_the_last_good_one_and_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    marker = root / ".exfilwatch.yaml"
    marker.write_text("tags: [secret]\n")
    reports: list[dict[str, Any]] = []
    r = resolver([WatchSpec(str(root))], reports)
    assert r.resolve_dir(str(root)).tags == ("secret",)
    marker.write_text("tags: [secret\nsensitivity: hgih\n")
    r.marker_changed(str(root))
    assert r.resolve_dir(str(root)).tags == ("secret",)
    rejected = [x for x in reports if x["event"]["action"] == "marker_rejected"]
    assert rejected and rejected[0]["exfilwatch"]["health"]["kept_previous"] is True
    problem = rejected[0]["exfilwatch"]["health"]["problems"][0]
    assert problem.startswith(f"{marker}:") and "MRK_YAML_PARSE" in problem


def test_marker_problems_are_located_with_a_hint() -> None:
    marker, problems = parse_marker("tags: [a]\nsensitivty: high\n", "m.yaml")
    assert marker is None
    assert str(problems[0]) == (
        "m.yaml:2:1 MRK_UNKNOWN_KEY unknown key 'sensitivty' in marker "
        "(hint: did you mean 'sensitivity'?)"
    )


def test_marker_symlinks_and_fifos_are_refused_without_blocking(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:x:0:0\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(secret)
    marker, problems = read_marker(str(link))
    assert marker is None and problems[0].code == "MRK_UNREADABLE"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    marker, problems = read_marker(str(fifo))
    assert marker is None and problems[0].code == "MRK_NOT_FILE"


def test_adding_editing_and_removing_a_marker_takes_effect_live(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    (root / "proj").mkdir(parents=True)
    run_agent(make_config([WatchSpec(str(root), ("rnd",))], tmp_path))
    marker = root / "proj" / ".exfilwatch.yaml"
    marker.write_text("tags: [crown-jewels]\nsensitivity: critical\n")
    assert collector.wait_for(lambda c: bool(c.health("marker_loaded")))
    (root / "proj" / "a.txt").write_text("x")
    collector.wait_event("closed_write", root / "proj" / "a.txt", tags=("rnd", "crown-jewels"))
    # An atomic replace (write elsewhere, rename into place), as editors and config tools do.
    tmp = root / "proj" / ".marker.new"
    tmp.write_text("tags: [export-controlled]\n")
    tmp.rename(marker)
    (root / "proj" / "b.txt").write_text("x")
    collector.wait_event("closed_write", root / "proj" / "b.txt", tags=("rnd", "export-controlled"))
    marker.unlink()
    assert collector.wait_for(lambda c: bool(c.health("marker_removed")))
    (root / "proj" / "c.txt").write_text("x")
    collector.wait_event("closed_write", root / "proj" / "c.txt", tags=("rnd",))
