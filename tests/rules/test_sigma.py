"""Sigma rules as security teams have them: SigmaHQ's Linux rules load unmodified, their log
source selects the events they see, taxonomy field names map to the agent's fields, and a log
source the agent has no events for makes a rule inactive (with the reason), never an error."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.events import event_from_fields
from agent.rules.compiler import load_rules, load_text
from agent.rules.engine import Engine

SIGMAHQ = Path(__file__).resolve().parents[3] / "shared" / "sigma" / "rules" / "linux"
NOW = int(time.time() * 1_000_000)

BASE64_DECODE = """\
title: Decode Base64 Encoded Text
id: e2072cab-8c9a-459b-b63c-40ae79e27031
status: test
tags: [attack.stealth, attack.t1027, attack.privilege-escalation]
logsource: {category: process_creation, product: linux}
detection:
  selection:
    Image|endswith: '/base64'
    CommandLine|contains: '-d'
  condition: selection
level: low
custom_team_field: kept out of the way
"""


def engine(text: str) -> Engine:
    ruleset, problems = load_text(text, NOW)
    assert ruleset is not None, [str(p) for p in problems]
    return Engine(ruleset)


def process(**fields: object) -> object:
    return event_from_fields(
        {"event.action": "process_started", "event.category": "process", **fields}, NOW
    )


@pytest.mark.skipif(not SIGMAHQ.is_dir(), reason="the SigmaHQ rules are not in ../shared")
def test_every_sigmahq_linux_rule_loads_active_or_inactive_with_a_reason() -> None:
    ruleset, problems = load_rules([str(SIGMAHQ)], NOW)
    errors = [str(p) for p in problems if p.severity == "error"]
    assert errors == []
    assert ruleset is not None
    assert len(ruleset.files) == 210
    assert len(ruleset.rules) + len(ruleset.inactive) == 210
    # Every process_creation and file_event rule runs; auditd, services, network do not.
    assert len(ruleset.rules) == 130
    reasons = {why.split("}: ", 1)[1] for _, why in ruleset.inactive.values()}
    assert "the agent reads no auditd logs" in reasons
    assert "the agent has no network_connection events" in reasons
    inactive = [p for p in problems if p.code == "RULE_INACTIVE"]
    assert len(inactive) == len(ruleset.inactive)


def test_taxonomy_fields_map_and_the_log_source_selects_the_events() -> None:
    e = engine(BASE64_DECODE)
    hit = process(
        **{"process.executable": "/usr/bin/base64", "process.command_line": "base64 -d x"}
    )
    (alert,) = e.process(hit)  # type: ignore[arg-type]
    assert alert["threat"]["technique"]["id"] == ["T1027"]
    assert alert["threat"]["tactic"]["name"] == ["stealth", "privilege_escalation"]
    # The same fields on a file event: not the rule's log source.
    file_event = event_from_fields(
        {
            "event.action": "closed_write",
            "file.path": "/tmp/x",
            "process.executable": "/usr/bin/base64",
            "process.command_line": "base64 -d x",
        },
        NOW,
    )
    assert e.process(file_event) == []
    assert e.process(process(**{"process.executable": "/usr/bin/base64"})) == []  # type: ignore[arg-type]


def test_a_log_source_the_agent_has_no_events_for_is_inactive_and_never_matches() -> None:
    text = BASE64_DECODE.replace("product: linux", "product: windows")
    ruleset, problems = load_text(text, NOW)
    assert ruleset is not None and not ruleset.rules
    (why,) = [p for p in problems if p.code == "RULE_INACTIVE"]
    assert why.severity == "warning" and "no windows events" in why.message
    hit = process(**{"process.executable": "/usr/bin/base64", "process.command_line": "-d"})
    assert Engine(ruleset).process(hit) == []  # type: ignore[arg-type]


def test_a_field_without_an_equivalent_makes_the_rule_inactive_with_the_field_named() -> None:
    text = BASE64_DECODE.replace("CommandLine|contains", "ProcessGuid|contains")
    ruleset, problems = load_text(text, NOW)
    assert ruleset is not None and not ruleset.rules
    (why,) = [p for p in problems if p.code == "RULE_INACTIVE"]
    assert "ProcessGuid" in why.message


def test_keyword_lists_match_the_command_line_or_the_path_and_all_of_them_with_all() -> None:
    e = engine(
        BASE64_DECODE.replace(
            """  selection:
    Image|endswith: '/base64'
    CommandLine|contains: '-d'
  condition: selection""",
            """  any_kw: ['history -c', 'unset HISTFILE']
  all_kw:
    '|all': ['curl', ' -T ']
  condition: any_kw or all_kw""",
        )
    )
    assert e.process(process(**{"process.command_line": "bash -c history -c"}))  # type: ignore[arg-type]
    assert e.process(process(**{"process.command_line": "curl -T /tmp/x https://h"}))  # type: ignore[arg-type]
    assert not e.process(process(**{"process.command_line": "curl https://h"}))  # type: ignore[arg-type]
    assert not e.process(process(**{"process.command_line": "ls -la"}))  # type: ignore[arg-type]


def test_sigma_scope_is_not_the_watchlist_and_the_native_spelling_moved_to_watchlist() -> None:
    sigma = engine(BASE64_DECODE + "scope: [server]\n")
    hit = process(**{"process.executable": "/usr/bin/base64", "process.command_line": "-d"})
    assert sigma.process(hit)  # type: ignore[arg-type]  # everyone, not a watchlist "server"
    native = """\
id: n
title: t
level: low
scope: [departing]
detection: {s: {event.action: process_started}, condition: s}
"""
    ruleset, problems = load_text(native, NOW)
    assert ruleset is not None
    (warning,) = [p for p in problems if p.code == "RULE_DEPRECATED_KEY"]
    assert warning.severity == "warning" and "watchlist" in warning.hint
    assert not Engine(ruleset).process(hit)  # type: ignore[arg-type]
    listed = event_from_fields(
        {"event.action": "process_started", "exfilwatch.watchlist.status": "departing"}, NOW
    )
    assert Engine(ruleset).process(listed)


def test_a_condition_given_as_a_list_matches_when_any_of_them_does() -> None:
    e = engine(
        BASE64_DECODE.replace(
            "  condition: selection",
            "  other:\n    Image|endswith: '/xxd'\n  condition:\n    - selection\n    - other",
        )
    )
    assert e.process(process(**{"process.executable": "/usr/bin/xxd"}))  # type: ignore[arg-type]
    hit = process(**{"process.executable": "/usr/bin/base64", "process.command_line": "-d"})
    assert e.process(hit)  # type: ignore[arg-type]
    assert not e.process(process(**{"process.executable": "/usr/bin/ls"}))  # type: ignore[arg-type]


def test_neq_and_the_long_regex_flag_names() -> None:
    e = engine(
        BASE64_DECODE.replace(
            """    Image|endswith: '/base64'
    CommandLine|contains: '-d'""",
            """    Image|endswith|neq: ['/bash', '/sh']
    CommandLine|re|ignorecase: 'CURL .*-T'""",
        )
    )
    assert e.process(
        process(
            **{
                "process.executable": "/usr/bin/curl",  # type: ignore[arg-type]
                "process.command_line": "curl -v -T x",
            }
        )
    )
    assert not e.process(
        process(
            **{
                "process.executable": "/bin/sh",  # type: ignore[arg-type]
                "process.command_line": "curl -T x",
            }
        )
    )
