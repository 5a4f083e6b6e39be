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

SIGMA = Path(__file__).resolve().parents[3] / "shared" / "sigma"
SIGMAHQ = SIGMA / "rules" / "linux"
SPEC_EXAMPLES = SIGMA / "specification" / "tests" / "schema"
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


@pytest.mark.skipif(
    not SPEC_EXAMPLES.is_dir(), reason="the Sigma specification is not in ../shared"
)
def test_every_example_of_the_specification_loads_or_is_inactive_with_a_reason() -> None:
    ruleset, problems = load_rules([str(SPEC_EXAMPLES)], NOW)
    assert [str(p) for p in problems if p.severity == "error"] == []
    assert ruleset is not None
    inactive = [p for p in problems if p.code == "RULE_INACTIVE"]
    assert len(inactive) == 12  # windows, dns, value_avg, rules not in the set, ...
    assert all("is loaded inactive: " in p.message for p in inactive)


CORRELATED = """\
title: Archive tool
name: archiver
logsource: {category: process_creation, product: linux}
detection:
  s: {Image|endswith: [/tar, /zip]}
  condition: s
---
title: Upload tool
name: uploader
logsource: {category: process_creation, product: linux}
detection:
  s: {Image|endswith: /curl}
  condition: s
---
title: Pack and send, in any order
correlation:
  type: temporal
  rules: [archiver, uploader]
  group-by: [User]
  timespan: 5m
---
title: Not for the backup account
logsource: {category: process_creation, product: linux}
filter:
  rules: [uploader]
  selection: {User: backup}
  condition: selection
"""


def test_temporal_correlations_names_filters_and_the_defaults_of_a_sigma_document() -> None:
    ruleset, problems = load_text(CORRELATED, NOW)
    assert ruleset is not None, [str(p) for p in problems]
    assert set(ruleset.rules) == {"archiver", "uploader"}  # ids from their names
    (corr,) = ruleset.correlations.values()
    assert corr.rule.level == "medium" and corr.rule.correlation is not None
    assert corr.rule.correlation.group_by == ("user.name",)
    e = Engine(ruleset)

    def run(user: str, exe: str, at: int) -> list[dict[str, object]]:
        event = process(**{"process.executable": exe, "user.name": user, "@timestamp": NOW + at})
        return e.process(event)  # type: ignore[arg-type]

    assert run("al", "/usr/bin/curl", 0) == []  # the upload first: any order counts
    (alert,) = run("al", "/usr/bin/tar", 1_000_000)
    assert alert["rule"]["name"] == "Pack and send, in any order"
    # The filter silences the uploader for the backup account, so no correlation either.
    assert run("backup", "/usr/bin/tar", 2_000_000) == []
    assert run("backup", "/usr/bin/curl", 3_000_000) == []


def test_generate_in_a_sigma_correlation_makes_its_rules_alert_by_themselves() -> None:
    text = CORRELATED.replace("  timespan: 5m\n", "  timespan: 5m\n  generate: true\n", 1)
    ruleset, problems = load_text(text, NOW)
    assert ruleset is not None, [str(p) for p in problems]
    e = Engine(ruleset)
    event = process(**{"process.executable": "/usr/bin/tar", "user.name": "al"})
    assert [a["rule"]["id"] for a in e.process(event)] == ["archiver"]  # type: ignore[arg-type]
    ruleset, _ = load_text(CORRELATED, NOW)
    assert ruleset is not None
    assert Engine(ruleset).process(event) == []  # type: ignore[arg-type]


def test_a_native_rule_without_level_is_read_as_sigma_and_the_author_is_told() -> None:
    text = "id: n\ntitle: t\nsuppres: {by: [user.name], for: 1m}\n"
    text += "detection: {s: {event.action: deleted}, condition: s}\n"
    ruleset, problems = load_text(text, NOW)
    assert ruleset is not None and ruleset.rules["n"].rule.level == "medium"
    (told,) = [p for p in problems if p.code == "RULE_READ_AS_SIGMA"]
    assert told.severity == "warning" and "level" in told.hint


READ_AND_STICK = """\
title: Tagged file read
name: tagged_read
logsource: {product: linux, category: file_access}
detection:
  selection: {TargetFilename|startswith: /srv/rnd/}
  condition: selection
---
title: Written to a stick
name: stick_write
logsource: {product: linux, category: file_event}
detection:
  selection: {TargetFilename|startswith: /media/}
  condition: selection
---
"""

ALIASED = (
    READ_AND_STICK
    + """\
title: Read, then written to a stick, by one person whatever account wrote it
name: read_then_stick
correlation:
  type: temporal
  rules: [tagged_read, stick_write]
  group-by: [person]
  timespan: 10m
  aliases:
    person:
      tagged_read: User
      stick_write: exfilwatch.attribution.login_user
level: high
"""
)


def test_correlation_aliases_group_each_rule_by_its_own_field() -> None:
    ruleset, problems = load_text(ALIASED, NOW)
    assert ruleset is not None, [str(p) for p in problems]
    assert not ruleset.inactive, ruleset.inactive
    e = Engine(ruleset)

    def ev(action: str, path: str, at: int, **fields: object) -> list[dict[str, object]]:
        values = {"event.action": action, "file.path": path, "@timestamp": NOW + at, **fields}
        return e.process(event_from_fields(values, NOW))  # type: ignore[arg-type]

    assert ev("opened", "/srv/rnd/top.v", 0, **{"user.name": "al"}) == []
    # Written by root (sudo cp), logged in as al: the alias joins them.
    attrs = {"user.name": "root", "exfilwatch.attribution.login_user": "al"}
    (alert,) = ev("closed_write", "/media/stick/top.v", 1_000_000, **attrs)
    assert alert["exfilwatch"]["correlation"]["group"] == {"person": "al"}
    # Another person's stick write does not complete al's read.
    assert ev("opened", "/srv/rnd/b.v", 2_000_000, **{"user.name": "al"}) == []
    other = {"user.name": "root", "exfilwatch.attribution.login_user": "bo"}
    assert ev("closed_write", "/media/stick/b.v", 3_000_000, **other) == []


def test_an_alias_that_leaves_out_a_correlated_rule_is_inactive_with_the_reason() -> None:
    text = ALIASED.replace("      stick_write: exfilwatch.attribution.login_user\n", "")
    ruleset, problems = load_text(text, NOW)
    assert ruleset is not None, [str(p) for p in problems]
    (reason,) = [why for _, why in ruleset.inactive.values()]
    assert reason == "alias person names no field of rule stick_write"


CHAINED = (
    READ_AND_STICK
    + """\
title: Many tagged reads
name: many_reads
correlation:
  type: event_count
  rules: [tagged_read]
  group-by: [User]
  timespan: 10m
  condition: {gte: 3}
level: medium
---
title: Many reads, then a stick
name: hoard_then_stick
correlation:
  type: temporal_ordered
  rules: [many_reads, stick_write]
  group-by: [User]
  timespan: 30m
level: high
"""
)


def test_a_chained_correlation_counts_what_the_correlation_under_it_found() -> None:
    ruleset, problems = load_text(CHAINED, NOW)
    assert ruleset is not None, [str(p) for p in problems]
    assert not ruleset.inactive, ruleset.inactive
    e = Engine(ruleset)

    def ev(action: str, path: str, at: int, user: str = "al") -> list[str]:
        values = {"event.action": action, "file.path": path, "@timestamp": NOW + at}
        alerts = e.process(event_from_fields({**values, "user.name": user}, NOW))
        return [a["rule"]["name"] for a in alerts]  # type: ignore[index]

    assert ev("closed_write", "/media/s/early.v", 0) == []  # before the hoarding: no order
    for i in range(3):
        # The third read completes many_reads: it feeds the chain and, used by it, does not
        # alert by itself (Sigma's generate: false).
        assert ev("opened", f"/srv/rnd/{i}.v", (i + 1) * 1_000_000) == []
    assert ev("closed_write", "/media/s/top.v", 5_000_000, user="bo") == []
    assert ev("closed_write", "/media/s/top.v", 6_000_000) == ["Many reads, then a stick"]


def test_a_loop_of_correlations_is_inactive() -> None:
    looped = CHAINED.replace("rules: [tagged_read]", "rules: [tagged_read, hoard_then_stick]")
    ruleset, problems = load_text(looped, NOW)
    assert ruleset is not None, [str(p) for p in problems]
    reasons = {rid: why for rid, (_, why) in ruleset.inactive.items()}
    assert reasons["many_reads"] == "its chain of correlations loops back to it"
    assert reasons["hoard_then_stick"] == "its chain of correlations loops back to it"
    assert "tagged_read" in ruleset.rules  # the rules themselves still run
