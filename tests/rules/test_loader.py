"""Rule loading: every problem in one pass, located and coded; overrides that ignore order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.rules.compiler import load_rules, load_text
from agent.rules.testing import TEST_EPOCH_US, coverage, run_all

REPO = Path(__file__).resolve().parents[2]
NOW = TEST_EPOCH_US

BAD = """\
id: r1
title: dup
level: hgih
tags: [attack.exfiltraton, attack.t105]
detection:
  selection:
    event.acton: closed_write
    file.path|startswth: /media
    file.name|re: '(unclosed'
  condition: selection and tagged_contnt
suppress: {by: [user.name], for: 5 minutes}
---
id: c2
title: corr
level: low
correlation:
  type: value_cnt
  rules: [nope]
  timespan: 10m
---
id: r3
title: unused
level: low
detection:
  selection: {event.action: deleted}
  extra: {file.size|gt: 5}
  condition: selection
"""


def test_every_problem_in_a_file_is_reported_in_one_pass() -> None:
    ruleset, problems = load_text(BAD, NOW, "bad.yaml")
    assert ruleset is None
    got = [(p.line, p.col, p.code) for p in problems]
    assert got == [
        (3, 8, "RULE_LEVEL"),
        (4, 8, "RULE_ATTACK_TAG"),
        (4, 28, "RULE_ATTACK_TAG"),
        (7, 5, "RULE_UNKNOWN_FIELD"),
        (8, 5, "RULE_UNKNOWN_MODIFIER"),
        (9, 5, "RULE_BAD_REGEX"),
        (10, 28, "RULE_UNKNOWN_SELECTION"),
        (11, 34, "RULE_DURATION"),
        (17, 9, "RULE_CORRELATION_TYPE"),
        (26, 10, "RULE_UNUSED_SELECTION"),
    ]
    by_code = {p.code: p for p in reversed(problems)}  # the first of each code
    assert by_code["RULE_LEVEL"].hint == "did you mean 'high'?"
    assert by_code["RULE_UNKNOWN_FIELD"].hint == "did you mean 'event.action'?"
    assert by_code["RULE_ATTACK_TAG"].hint == "did you mean 'attack.exfiltration'?"
    assert str(by_code["RULE_LEVEL"]).startswith("bad.yaml:3:8 RULE_LEVEL unknown level 'hgih'")


def test_yaml_syntax_errors_are_located_at_the_mistake() -> None:
    ruleset, problems = load_text("id: x\ntitle: [unclosed\n", NOW, "y.yaml")
    assert ruleset is None
    p = problems[0]
    assert (p.code, p.line, p.col, p.hint) == (
        "RULE_YAML_PARSE",
        2,
        8,
        "unclosed '[' started here; close it with ']'",
    )


RULE_HEAD = "id: r1\ntitle: t\nlevel: low\n"

# (rule file, line:col of the mistake, hint). PyYAML stops a line or more after most of these.
BROKEN_RULES = [
    (
        RULE_HEAD + "tags [attack.exfiltration]\nstatus: stable\n",
        "4:5",
        "did you forget a ':' after 'tags'?",
    ),
    (
        RULE_HEAD + "detection:\n  selection\n    file.path: /x\n  condition: selection\n",
        "5:12",
        "did you forget a ':' after 'selection'?",
    ),
    (
        'id: r1\ntitle: "Copy to USB\nlevel: low\n',
        "2:8",
        "unclosed quote started at line 2; close it with '\"'",
    ),
    (
        'id: r1\ntitle: "Copy\nlevel: low\ndescription: "d"\n',
        "2:8",
        "the quote started here is closed only on line 4",
    ),
    (
        RULE_HEAD + "tags: [attack.exfiltration,\nstatus: stable\n",
        "4:7",
        "unclosed '[' started here; close it with ']'",
    ),
    (
        RULE_HEAD + "detection: {s: {file.path: /x} condition: s}\n",
        "4:32",
        "did you forget a ',' between two items?",
    ),
    (
        RULE_HEAD + "detection:\n\ts: {file.path: /x}\n",
        "5:1",
        "indent with spaces: YAML does not allow tabs",
    ),
    (
        "id: r1\ntitle: t\n  level: low\n",
        "3:3",
        "this line is indented deeper than the key above it; line up the keys of a mapping",
    ),
    ("id: r1\ntitle: copy: usb\n", "2:12", "a value that holds ': ' must be quoted"),
    ("id: r1\ntitle:t\nlevel: low\n", "2:6", "put a space after the ':'"),
    ("id: r1\ntitle: @home\n", "2:8", "'@' cannot start a value; quote the value"),
    (
        "id: r1\ntitle: a\x07b\n",
        "2:9",
        'remove it; inside double quotes, write it as "\\u0007"',
    ),
    # In the second document of a file: lines count from the top of the file.
    (
        RULE_HEAD + "detection: {s: {file.path: /x}, condition: s}\n---\nid: r2\ntitle t\n",
        "7:6",
        "did you forget a ':' after 'title'?",
    ),
]


@pytest.mark.parametrize(("text", "where", "hint"), BROKEN_RULES)
def test_yaml_syntax_errors_point_at_the_mistake_with_a_hint(
    tmp_path: Path, text: str, where: str, hint: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    ruleset, problems = load_rules([str(path)], NOW)
    assert ruleset is None
    assert [(p.code, f"{p.line}:{p.col}", p.hint) for p in problems] == [
        ("RULE_YAML_PARSE", where, hint)
    ]
    assert str(problems[0]).startswith(f"{path}:{where} RULE_YAML_PARSE ")


def test_a_rule_file_that_is_not_utf8_is_located_at_its_first_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"id: r1\ntitle: caf\xc3\xa9 caf\xe9\nlevel: low\n")
    ruleset, problems = load_rules([str(path)], NOW)
    assert ruleset is None
    assert [str(p) for p in problems] == [
        f"{path}:2:16 RULE_ENCODING not UTF-8: byte 0xe9 is not a character "
        "(hint: save the file as UTF-8)"
    ]


def test_a_utf16_rule_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "utf16.yaml"
    path.write_bytes("id: r1\n".encode("utf-16"))
    _, problems = load_rules([str(path)], NOW)
    assert [(p.code, p.line, p.col) for p in problems] == [("RULE_ENCODING", 1, 1)]
    assert "UTF-16" in problems[0].hint


def test_duplicate_ids_and_unknown_references_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "id: same\ntitle: a\nlevel: low\ndetection: {s: {event.action: deleted}, condition: s}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "id: same\ntitle: b\nlevel: low\ndetection: {s: {event.action: created}, condition: s}\n"
        "---\nid: corr\ntitle: c\nlevel: low\n"
        "correlation: {type: event_count, rules: [smae], timespan: 1m, condition: {gte: 2}}\n"
    )
    ruleset, problems = load_rules([str(tmp_path)], NOW)
    assert ruleset is None
    codes = {(Path(p.file).name, p.code) for p in problems}
    assert ("b.yaml", "RULE_DUPLICATE_ID") in codes
    unknown = next(p for p in problems if p.code == "RULE_UNKNOWN_RULE")
    assert unknown.hint == "did you mean 'same'?"


SHIPPED_LIKE = """\
id: usb-copy
title: Copy to USB
level: medium
tags: [attack.exfiltration, attack.t1052.001]
detection:
  selection: {event.action: closed_write, exfilwatch.location.class: removable}
  condition: selection
"""


def _effective(tmp_path: Path, order: list[str]) -> dict[str, object]:
    ruleset, problems = load_rules([str(tmp_path / name) for name in order], NOW)
    assert ruleset is not None, [str(p) for p in problems]
    rule = ruleset.rules.get("usb-copy") or ruleset.correlations.get("usb-copy")
    if rule is None:
        return {"disabled": "usb-copy" in ruleset.disabled}
    return {
        "level": rule.rule.level,
        "exceptions": sorted(e.reason for e in rule.rule.exceptions),
        "enabled": rule.rule.enabled,
    }


def test_local_overrides_give_the_same_result_in_any_file_order(tmp_path: Path) -> None:
    (tmp_path / "shipped.yaml").write_text(SHIPPED_LIKE)
    (tmp_path / "local-a.yaml").write_text(
        "override: usb-copy\nlevel: critical\nexceptions:\n"
        "  - {match: {user.name: lab-bot}, reason: lab imaging, owner: it@example.com}\n"
    )
    (tmp_path / "local-b.yaml").write_text(
        "override: tag:attack.t1052.001\nexceptions:\n"
        "  - {match: {host.hostname: kiosk-1}, reason: kiosk, owner: it@example.com}\n"
    )
    one = _effective(tmp_path, ["shipped.yaml", "local-a.yaml", "local-b.yaml"])
    two = _effective(tmp_path, ["local-b.yaml", "local-a.yaml", "shipped.yaml"])
    assert (
        one
        == two
        == {
            "level": "critical",
            "exceptions": ["kiosk", "lab imaging"],
            "enabled": True,
        }
    )


def test_conflicting_overrides_are_an_error_not_a_race(tmp_path: Path) -> None:
    (tmp_path / "shipped.yaml").write_text(SHIPPED_LIKE)
    (tmp_path / "a.yaml").write_text("override: usb-copy\nlevel: low\n")
    (tmp_path / "b.yaml").write_text("override: usb-copy\nlevel: high\n")
    ruleset, problems = load_rules([str(tmp_path)], NOW)
    assert ruleset is None
    assert [p.code for p in problems] == ["RULE_OVERRIDE_CONFLICT"]


def test_an_override_can_disable_a_shipped_rule(tmp_path: Path) -> None:
    (tmp_path / "shipped.yaml").write_text(SHIPPED_LIKE)
    (tmp_path / "local.yaml").write_text("override: usb-copy\nenabled: false\n")
    assert _effective(tmp_path, ["shipped.yaml", "local.yaml"]) == {"disabled": True}


def test_an_expired_exception_is_reported_at_load_time() -> None:
    text = SHIPPED_LIKE + (
        "exceptions:\n"
        "  - {match: {user.name: bob}, reason: migration, owner: it@example.com, "
        "expires: 2025-06-30}\n"
    )
    ruleset, problems = load_text(text, NOW, "r.yaml")
    assert ruleset is not None
    assert [(p.code, p.severity, p.line) for p in problems] == [
        ("RULE_EXCEPTION_EXPIRED", "warning", 9)
    ]


def test_the_shipped_packs_are_valid_and_every_rule_has_both_kinds_of_test() -> None:
    ruleset, problems = load_rules([str(REPO / "rules")], NOW)
    assert ruleset is not None, [str(p) for p in problems]
    assert not problems, [str(p) for p in problems]
    assert coverage(ruleset) == []
    results = run_all(ruleset)
    assert results and all(r.passed for r in results), [str(r) for r in results if not r.passed]
    for rule in [*ruleset.rules.values(), *ruleset.correlations.values()]:
        assert rule.rule.description or rule.rule.level == "informational", rule.id
        assert any(t.startswith("attack.") for t in rule.rule.tags), rule.id


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=False
    )


def test_rules_validate_command_exits_nonzero_with_json_for_ci(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    res = _cli("rules", "validate", str(tmp_path), "--format", "json")
    assert res.returncode == 1
    problems = json.loads(res.stdout)
    assert problems[0]["code"] == "RULE_LEVEL" and problems[0]["line"] == 3
    res = _cli("rules", "validate", str(REPO / "rules"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_rules_validate_shows_the_effective_rule(tmp_path: Path) -> None:
    (tmp_path / "shipped.yaml").write_text(SHIPPED_LIKE)
    (tmp_path / "local.yaml").write_text("override: usb-copy\nlevel: high\n")
    res = _cli("rules", "validate", str(tmp_path), "--show", "usb-copy")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["level"] == "high"
    assert shown["overridden_by"] == [f"{tmp_path / 'local.yaml'}:1"]
    assert shown["condition_expanded"] == "selection"
    # With --format json too, stdout is that one document (problems, if any, on stderr).
    res = _cli("rules", "validate", str(tmp_path), "--show", "usb-copy", "--format", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["id"] == "usb-copy"


def test_rules_test_command_shows_a_readable_diff_and_fails(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        SHIPPED_LIKE + "tests:\n"
        "  - name: a copy to usb fires\n"
        "    event: {event.action: closed_write, file.path: /media/u/a, "
        "exfilwatch.location.class: removable}\n"
        "    expect: {alerts: 1, alert: {exfilwatch.level: high}}\n"
        "  - name: a copy elsewhere is quiet\n"
        "    event: {event.action: closed_write, file.path: /home/u/a}\n"
        "    expect: match\n"
    )
    res = _cli("rules", "test", str(tmp_path))
    assert res.returncode == 1
    assert "FAIL usb-copy: a copy to usb fires" in res.stdout
    assert "exfilwatch.level: expected 'high', got 'medium'" in res.stdout
    assert "FAIL usb-copy: a copy elsewhere is quiet" in res.stdout
    assert "expected 1 alert(s), got 0" in res.stdout
    assert "condition: selection" in res.stdout
    assert res.stdout.strip().endswith("0 passed, 2 failed")
