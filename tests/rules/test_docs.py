"""Every YAML example in docs/rules.md loads with the shipped packs and passes its tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.rules.compiler import load_rules
from agent.rules.testing import TEST_EPOCH_US, run_all

REPO = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "rules.md").read_text(), re.S)


def test_the_guide_has_examples() -> None:
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_documented_example_is_valid_and_its_tests_pass(index: int, tmp_path: Path) -> None:
    example = tmp_path / f"example{index}.yaml"
    example.write_text(BLOCKS[index])
    ruleset, problems = load_rules([str(REPO / "rules"), str(example)], TEST_EPOCH_US)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert ruleset is not None and not errors, errors
    ours = [r for r in run_all(ruleset) if r.file == str(example)]
    failed = [str(r) for r in ours if not r.passed]
    assert not failed, failed
