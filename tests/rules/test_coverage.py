"""docs/rules.md's ATT&CK coverage table is exactly what `rules coverage` prints for the
shipped packs, and every enabled shipped rule names a technique or feeds one that does."""

from __future__ import annotations

import re
import time
from pathlib import Path

from agent.rules.compiler import RuleSet, load_rules
from agent.rules.coverage import TECHNIQUE_NAMES, markdown

REPO = Path(__file__).resolve().parents[2]


def _shipped() -> RuleSet:
    ruleset, problems = load_rules([str(REPO / "rules")], int(time.time() * 1e6))
    assert ruleset is not None, problems
    return ruleset


def test_the_table_in_the_docs_is_the_generated_one() -> None:
    doc = (REPO / "docs" / "rules.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- coverage:begin -->\n(.*?)<!-- coverage:end -->", doc, re.S)
    assert found is not None
    assert found.group(1) == markdown(_shipped()), "run: exfilwatch rules coverage rules/"


def test_every_shipped_rule_is_labelled_with_a_named_technique() -> None:
    ruleset = _shipped()
    for compiled in [*ruleset.rules.values(), *ruleset.correlations.values()]:
        rule = compiled.rule
        if rule.id == "exfil-egress-copy":  # a feeder for egress correlations of any kind
            continue
        assert rule.techniques, f"{rule.id} names no ATT&CK technique"
        for technique in rule.techniques:
            assert technique in TECHNIQUE_NAMES, f"{rule.id}: {technique} has no name"
