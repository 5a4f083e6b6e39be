"""Embedded rule tests: run each rule's `tests:` through a fresh engine, explain failures."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from agent.events import event_from_fields
from agent.rules.compiler import CompiledRule, RuleSet
from agent.rules.engine import Engine
from agent.rules.model import RuleTest

# Tests run at a fixed instant so results never depend on the day they run.
TEST_EPOCH_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class TestResult:
    rule_id: str
    name: str
    passed: bool
    file: str
    line: int
    detail: str = ""

    def __str__(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        text = f"{mark} {self.rule_id}: {self.name} ({self.file}:{self.line})"
        return text if self.passed else f"{text}\n{self.detail}"


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def run_test(ruleset: RuleSet, rule: CompiledRule, test: RuleTest) -> TestResult:
    if rule.rule.correlation is None and not rule.generate:
        # A base rule of a correlation does not alert by itself; its tests are about matching.
        rule = replace(rule, generate=True)
        ruleset = replace(ruleset, rules={**ruleset.rules, rule.id: rule})
    engine = Engine(ruleset)
    alerts: list[dict[str, Any]] = []
    for i, (offset, fields) in enumerate(test.events):
        values = {"host.hostname": "test-host", "event.sequence": i + 1, **fields}
        try:
            event = event_from_fields(values, TEST_EPOCH_US + int(offset * 1_000_000))
        except ValueError as exc:
            return _fail(rule, test, f"  event {i + 1}: {exc}")
        alerts.extend(a for a in engine.process(event) if a["rule"]["id"] == rule.id)
    if len(alerts) != test.expect_alerts:
        lines = [
            f"  expected {test.expect_alerts} alert(s), got {len(alerts)}",
            f"  condition: {rule.condition_text or _corr(rule)}",
        ]
        for i, (offset, fields) in enumerate(test.events[:5]):
            lines.append(f"  event {i + 1} at +{offset:g}s: {json.dumps(fields, default=str)}")
        if len(test.events) > 5:
            lines.append(f"  ... {len(test.events) - 5} more events")
        return _fail(rule, test, "\n".join(lines))
    if test.expect_fields and alerts:
        got = flatten(alerts[0])
        diffs = []
        for key, want in test.expect_fields.items():
            have = got.get(key, "<absent>")
            if have != want and not (isinstance(have, list) and want in have):
                diffs.append(f"  {key}: expected {want!r}, got {have!r}")
        if diffs:
            return _fail(rule, test, "\n".join(["  alert fields differ:", *diffs]))
    return TestResult(rule.id, test.name, True, test.where.file, test.where.line)


def _corr(rule: CompiledRule) -> str:
    c = rule.rule.correlation
    if c is None:
        return "?"
    return f"{c.type} of {', '.join(c.rules)} by {', '.join(c.group_by)} within {c.timespan:g}s"


def _fail(rule: CompiledRule, test: RuleTest, detail: str) -> TestResult:
    return TestResult(rule.id, test.name, False, test.where.file, test.where.line, detail)


def run_all(ruleset: RuleSet) -> list[TestResult]:
    results = []
    for rule in [*ruleset.rules.values(), *ruleset.correlations.values()]:
        for test in rule.rule.tests:
            results.append(run_test(ruleset, rule, test))
    return results


def coverage(ruleset: RuleSet) -> list[str]:
    """Rules lacking a positive or a negative test (every shipped rule needs both)."""
    missing = []
    for rule in [*ruleset.rules.values(), *ruleset.correlations.values()]:
        tests = rule.rule.tests
        if not any(t.expect_alerts > 0 for t in tests):
            missing.append(f"{rule.id}: no test that expects an alert")
        if not any(t.expect_alerts == 0 for t in tests):
            missing.append(f"{rule.id}: no test that expects silence (the nearest benign case)")
    return missing
