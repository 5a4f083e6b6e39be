"""The kernel is asked only for the actions the loaded rules and sinks use."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import InotifySettings, WatchSpec
from agent.enrich.ownreads import OwnReads
from agent.service import Agent
from agent.sources.base import CORE_ACTIONS, needed_actions
from agent.sources.inotify import InotifySource
from tests.conftest import Collector, make_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")

IN_MODIFY, IN_ATTRIB, IN_OPEN, IN_CLOSE_NOWRITE = 0x2, 0x4, 0x20, 0x10

READ_RULE = """\
id: t-tagged-read
title: Tagged file read
description: test
level: low
detection:
  selection:
    event.action: closed_nowrite
  condition: selection
"""

OPEN_RULE = """\
id: t-tagged-open
title: Tagged file opened
description: test
level: low
detection:
  selection:
    event.action: opened
  condition: selection
"""


def kernel_masks(source: InotifySource) -> dict[int, int]:
    """wd -> mask, as the kernel holds them (/proc/self/fdinfo of the inotify descriptor)."""
    assert source._ino is not None
    masks: dict[int, int] = {}
    with open(f"/proc/self/fdinfo/{source._ino.fileno()}") as fh:
        for line in fh:
            if line.startswith("inotify "):
                fields = dict(part.split(":", 1) for part in line.split()[1:])
                masks[int(fields["wd"])] = int(fields["mask"], 16)
    return masks


def test_needed_actions_follow_rules_and_event_sinks() -> None:
    assert needed_actions([frozenset({"closed_nowrite"})], events_written=True) is None
    assert needed_actions([frozenset({"closed_nowrite"}), None], events_written=False) is None
    got = needed_actions([frozenset({"closed_nowrite"})], events_written=False)
    assert got == CORE_ACTIONS | {"closed_nowrite"}
    assert needed_actions([], events_written=False) == CORE_ACTIONS


def test_ledger_waits_only_for_the_events_the_source_reports() -> None:
    ledger = OwnReads()
    ledger.set_delivered(CORE_ACTIONS | {"closed_nowrite"})
    ledger.expect("/t/a")
    assert not ledger.take("/t/a", "opened")
    assert ledger.take("/t/a", "closed_nowrite")
    assert not ledger  # nothing left waiting for an open that is never reported
    ledger.set_delivered(CORE_ACTIONS)
    ledger.expect("/t/b")
    assert not ledger


def test_opens_and_writes_no_rule_uses_are_never_asked_of_the_kernel(
    run_agent: Callable[..., Agent], collector: Collector, tmp_path: Path
) -> None:
    root = tmp_path / "rnd"
    (root / "sub").mkdir(parents=True)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "read.yaml").write_text(READ_RULE)
    config = make_config(
        [WatchSpec(str(root), ("chip",))],
        tmp_path,
        source="inotify",
        inotify=InotifySettings(apply_sysctl=False),
        rules=(str(rules),),
    )
    # Alerts and health only: no sink writes events, so the rules alone decide.
    agent = run_agent(config, kinds=frozenset({"health", "alert"}))
    source = agent.source
    assert isinstance(source, InotifySource)
    assert collector.wait_for(lambda c: bool(c.health("source_actions")))
    said = collector.health("source_actions")
    left_out = said[-1]["exfilwatch"]["health"]["left_out"] if said else None
    assert left_out == ["attributes_changed", "modified", "opened"]
    (root / "sub" / "old.v").write_text("x\n")
    # Handed on (so handled: a link-count watch would have been added by now).
    assert collector.wait_for(lambda c: source.counters["emitted"] >= 2)
    masks = kernel_masks(source)
    assert len(masks) == 2  # the root and sub/: no link-count watch on files either
    for mask in masks.values():
        assert not mask & (IN_OPEN | IN_MODIFY | IN_ATTRIB) and mask & IN_CLOSE_NOWRITE

    # The action the rule uses still works.
    f = root / "sub" / "spec.v"
    f.write_text("module x; endmodule\n")
    f.read_text()
    assert collector.wait_for(
        lambda c: any(r["rule"]["id"] == "t-tagged-read" for r in c.records() if "rule" in r)
    )

    # A rule that needs opens, loaded live: the kernel's masks follow, nothing restarted.
    (rules / "open.yaml").write_text(OPEN_RULE)
    agent.check_rules(force=True)
    assert collector.wait_for(lambda c: len(c.health("source_actions")) == 2)
    assert collector.health("source_actions")[-1]["exfilwatch"]["health"]["left_out"] == [
        "attributes_changed",
        "modified",
    ]
    assert collector.wait_for(lambda c: all(m & IN_OPEN for m in kernel_masks(source).values()))
    g = root / "sub" / "other.v"
    g.write_text("x\n")
    fd = os.open(g, os.O_RDONLY)
    os.close(fd)
    assert collector.wait_for(
        lambda c: any(
            r["rule"]["id"] == "t-tagged-open" and r["file"]["path"] == str(g)
            for r in c.records()
            if "rule" in r
        )
    )
