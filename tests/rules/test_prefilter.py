"""The engine's prefilter (agent/rules/prefilter.py): a gated rule is skipped only when it
cannot match. Gates are necessary conditions derived from the rule's own matchers, so the
property checked here is the one that matters: every rule that matches an event is among the
rules tried on it, for any values, modifiers and conditions."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.events import Event, event_from_fields
from agent.rules import prefilter
from agent.rules.compiler import RuleSet, load_text
from agent.rules.engine import Engine
from agent.rules.testing import TEST_EPOCH_US

T0 = TEST_EPOCH_US


def ruleset(text: str) -> RuleSet:
    rs, problems = load_text(text, T0, "t.yaml")
    assert rs is not None, [str(p) for p in problems]
    return rs


def ev(**fields: Any) -> Event:
    values = {"host.hostname": "ws1", "event.action": "closed_write", **fields}
    return event_from_fields(values, T0)


def ungated(rs: RuleSet) -> RuleSet:
    out = dataclasses.replace(rs)
    out.rules = {rid: dataclasses.replace(r, gates=None) for rid, r in rs.rules.items()}
    return out


def alerts(rs: RuleSet, events: list[Event]) -> list[tuple[str, str | None]]:
    engine = Engine(rs)
    return [(a["rule"]["id"], e.path) for e in events for a in engine.process(e)]


# --- the property ------------------------------------------------------------------------

# Letters whose case folding is unusual (dotted I, final sigma, sharp s), path syntax and the
# characters that are wildcards or regex syntax.
ALPHABET = "aAbzZ09/._-*?İıΣσςßé "
ASCII = "aAbzZ09/._-*? "
TEXT_FIELDS = (
    "file.path",
    "file.name",
    "file.extension",
    "process.name",
    "process.args",
    "exfilwatch.tags",
)
MODIFIERS = (
    "",
    "|contains",
    "|startswith",
    "|endswith",
    "|cased",
    "|contains|cased",
    "|endswith|cased",
    "|contains|all",
    "|startswith|all",
    "|neq",
    "|re",
    "|re|i",
    "|glob",
    "|path",
)

texts = st.text(ALPHABET, min_size=0, max_size=6)


def _plain(value: str) -> str:
    """A value's literal characters (what an event must hold for it to match)."""
    return value.replace("*", "").replace("?", "").replace("\\", "")


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, list[Event]]:
    selections: dict[str, dict[str, Any]] = {}
    literals: list[str] = []
    for n in range(draw(st.integers(1, 3))):
        sel: dict[str, Any] = {}
        for _ in range(draw(st.integers(1, 2))):
            field = draw(st.sampled_from(TEXT_FIELDS))
            mod = draw(st.sampled_from(MODIFIERS))
            values = draw(st.lists(texts, min_size=1, max_size=3))
            if mod == "|path":
                values = ["/" + v for v in values]
            if mod == "|glob":
                values = [v or "*" for v in values]
            sel[field + mod] = values if len(values) > 1 else values[0]
            literals += [_plain(v) for v in values]
        if draw(st.booleans()):
            op = draw(st.sampled_from(["", "|gt", "|gte", "|lt", "|lte"]))
            sel["file.size" + op] = draw(st.integers(0, 20))
            if not op and draw(st.booleans()):  # equal to one of some numbers
                sel["file.size"] = draw(st.lists(st.integers(-3, 20), min_size=1, max_size=3))
        if draw(st.booleans()):  # a decimal string field compared as a number
            op = draw(st.sampled_from(["", "|gt", "|lte"]))
            sel["user.id" + op] = draw(st.integers(-3, 20))
        selections[f"sel{n}"] = sel
    names = list(selections)
    condition = draw(
        st.sampled_from(
            [
                " or ".join(names),
                " and ".join(names),
                f"{names[0]} and not {names[-1]}" if len(names) > 1 else f"not {names[0]}",
                "1 of sel*",
                "all of sel*",
            ]
        )
    )
    doc = {
        "id": "r",
        "title": "t",
        "level": "low",
        "detection": {**selections, "condition": condition},
    }
    events = []
    for _ in range(draw(st.integers(1, 4))):
        # An ASCII path takes another way through the prefilter than any other path.
        ascii_only = draw(st.booleans())

        def value(ascii_only: bool = ascii_only) -> str:
            core = draw(st.sampled_from(literals))
            if draw(st.booleans()):
                core = core.upper() if draw(st.booleans()) else core.swapcase()
            if ascii_only:
                core = core.encode("ascii", "ignore").decode()
                before = draw(st.text(ASCII, max_size=6))
                before += draw(st.sampled_from(["", ".", "/", "/.", "x."]))  # name, extension
                return before + core + draw(st.sampled_from(["", ".", "x", "/", ".Ab"]))
            return draw(texts) + core + draw(st.sampled_from(["", "\udc80", "x", "/"]))

        fields: dict[str, Any] = {
            "file.path": "/" + value(),
            "process.name": value(),
            "process.args": [value() for _ in range(draw(st.integers(0, 2)))],
            "exfilwatch.tags": [value() for _ in range(draw(st.integers(0, 2)))],
        }
        if draw(st.booleans()):
            fields["file.size"] = draw(st.integers(0, 20))
        if draw(st.booleans()):
            fields["user.id"] = draw(
                st.sampled_from(["0", "-0", "00", "-3", "7", "07", " 7", "7.0", "x"])
                | st.integers(-3, 20).map(str)
            )
        events.append(ev(**fields))
    return yaml.safe_dump(doc, allow_unicode=True), events


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_rule_that_matches_an_event_is_tried_on_it(case: tuple[str, list[Event]]) -> None:
    text, events = case
    rs, _ = load_text(text, T0, "t.yaml")
    assume(rs is not None and "r" in rs.rules)  # some drawn values are not valid regexes
    assert rs is not None
    rule = rs.rules["r"]
    engine = Engine(rs)
    for e in events:
        if rule.match(e):
            assert rule in engine.candidates(e), (text, e)


# The path, its name and its extension: on an ASCII path their gates are one RE2 set over
# the path, so the property gets its own draw, dense in slashes, dots and case changes.
PATH_FIELDS = ("file.path", "file.name", "file.extension")
PATH_MODIFIERS = ("", "|contains", "|startswith", "|endswith", "|cased", "|endswith|cased")
path_texts = st.text("aAbB0._/*", min_size=0, max_size=4)


@st.composite
def path_cases(draw: st.DrawFn) -> tuple[str, list[Event]]:
    sel: dict[str, Any] = {}
    literals: list[str] = []
    for _ in range(draw(st.integers(1, 2))):
        field = draw(st.sampled_from(PATH_FIELDS))
        values = draw(st.lists(path_texts, min_size=1, max_size=3))
        sel[field + draw(st.sampled_from(PATH_MODIFIERS))] = values
        literals += [_plain(v) for v in values]
    doc = {
        "id": "r",
        "title": "t",
        "level": "low",
        "detection": {"sel": sel, "condition": "sel"},
    }
    events = []
    for _ in range(draw(st.integers(1, 6))):
        parts = []
        for _ in range(draw(st.integers(1, 4))):
            core = draw(st.sampled_from(literals))
            part = draw(st.sampled_from(["", "/", ".", "x.", "/x."])) + core
            part += draw(st.sampled_from(["", "", "/", ".", "a", "é"]))
            parts.append(draw(st.sampled_from([part, part.upper(), part.swapcase()])))
        events.append(ev(**{"file.path": "".join(parts)}))
    return yaml.safe_dump(doc, allow_unicode=True), events


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path_cases())
def test_every_rule_on_the_path_that_matches_is_tried(case: tuple[str, list[Event]]) -> None:
    text, events = case
    rs, _ = load_text(text, T0, "t.yaml")
    assume(rs is not None and "r" in rs.rules)
    assert rs is not None
    rule = rs.rules["r"]
    engine = Engine(rs)
    for e in events:
        if rule.match(e):
            assert rule in engine.candidates(e), (text, e.path)


# --- what it does --------------------------------------------------------------------------

CRON = """\
title: cron file written
logsource: {product: linux, category: file_event}
detection:
  selection:
    TargetFilename|startswith: ['/etc/cron.d/', '/var/spool/cron/crontabs/']
  condition: selection
level: medium
---
title: history file touched
logsource: {product: linux, category: file_event}
detection:
  selection:
    TargetFilename|endswith: ['/.bash_history', '/.zsh_history']
  condition: selection
level: medium
---
id: any-write
title: any write
level: low
detection:
  selection: {event.action: closed_write}
  condition: selection
"""


def test_a_gated_rule_is_tried_only_where_its_gate_passes() -> None:
    rs = ruleset(CRON)
    engine = Engine(rs)
    ordinary = ev(**{"file.path": "/srv/rnd/chip/top.v"})
    assert [r.id for r in engine.candidates(ordinary)] == ["any-write"]
    cron = ev(**{"file.path": "/ETC/cron.d/backdoor"})  # Sigma values ignore case
    tried = [r.id for r in engine.candidates(cron)]
    assert len(tried) == 2 and tried[-1] == "any-write"  # load order kept
    assert [a["rule"]["id"] for a in engine.process(cron)] == tried
    history = ev(**{"file.path": "/home/u/.zsh_history"})
    assert len(engine.candidates(history)) == 2


def test_gates_on_the_name_and_extension_pass_where_their_field_does() -> None:
    rs = ruleset(
        """\
id: key
title: key file
level: low
detection:
  selection: {file.extension: [pem, p12]}
  condition: selection
---
id: secret
title: secret name
level: low
detection:
  selection: {file.name|startswith: secret}
  condition: selection
---
id: history
title: history file
level: low
detection:
  selection: {file.name: .bash_history}
  condition: selection
---
id: backup
title: backup name
level: low
detection:
  selection: {file.name|contains: bak}
  condition: selection
"""
    )
    engine = Engine(rs)
    expect = {
        "/home/u/a.pem": ["key"],
        "/home/u/A.PEM": ["key"],
        "/home/u/.pem": [],
        "/home/u/a.pem/x": [],
        "/home/u/a.pem.gz": [],
        "/home/u/a.p12": ["key"],
        "/home/u/Secret-notes.txt": ["secret"],
        "/home/secret/notes.txt": [],
        "secret.pem": ["key", "secret"],
        "/home/u/.BASH_HISTORY": ["history"],
        "/home/u/x.bash_history": [],
        "/home/u/.bash_history/x": [],
        "/home/u/my.BAK.pem": ["key", "backup"],
        "/home/bak/x": [],
        "/home/u/sécret.pem": ["key"],  # not ASCII: each field on its own
        "/home/u/Secret.pem\udc80": ["secret"],
    }
    for path, ids in expect.items():
        e = ev(**{"file.path": path})
        assert [r.id for r in engine.candidates(e)] == ids, path
        assert [r.id for r in rs.rules.values() if r.match(e)] == ids, path


def test_the_places_of_an_action_share_one_set_over_the_path() -> None:
    rs = ruleset(
        """\
id: usb-key
title: key file to removable media
level: low
detection:
  selection:
    exfilwatch.location.class: removable
    file.path|re: '\\.(pem|key)$'
  condition: selection
---
id: any-archive
title: archive written
level: low
detection:
  selection: {file.extension: [zip, 7z]}
  condition: selection
"""
    )
    engine = Engine(rs)
    usb = {"exfilwatch.location.class": "removable"}
    cases = [
        ({"file.path": "/media/u/a.pem", **usb}, ["usb-key"]),
        ({"file.path": "/media/u/a.ZIP", **usb}, ["any-archive"]),
        ({"file.path": "/home/u/a.pem"}, []),  # the rule is not of this place
        ({"file.path": "/home/u/a.zip"}, ["any-archive"]),
        ({"file.path": "/home/u/a.zip", "exfilwatch.location.class": "staging"}, ["any-archive"]),
    ]
    for fields, ids in cases:
        assert [r.id for r in engine.candidates(ev(**fields))] == ids, fields
    places = [c for c in engine._by_place.values() if c.path_match is not None]
    assert len(places) == 3 and len({id(c.path_match) for c in places}) == 1


def test_a_set_re2_refuses_leaves_its_rules_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    rs = ruleset(
        """\
id: tail
title: ends in x
level: low
detection:
  selection: {file.path|re: 'x$'}
  condition: selection
---
id: key
title: key file
level: low
detection:
  selection: {file.extension: pem}
  condition: selection
"""
    )
    compile_set = prefilter._compile_set

    def refusing(patterns: list[str], options: Any = None) -> Any:
        return None if patterns == ["x$"] else compile_set(patterns)

    # The set over an ASCII path compiles; the field's own (for other paths) is refused.
    monkeypatch.setattr(prefilter, "_compile_set", refusing)
    engine = Engine(rs)
    assert [r.id for r in engine.candidates(ev(**{"file.path": "/a/bx"}))] == ["tail"]
    assert [r.id for r in engine.candidates(ev(**{"file.path": "/a/b.pem"}))] == ["key"]
    assert [r.id for r in engine.candidates(ev(**{"file.path": "/é/b.pem"}))] == ["tail", "key"]
    assert [r.id for r in engine.candidates(ev(**{"file.path": "/é/bx"}))] == ["tail"]
    # Every set refused: the field by field way, the regex rule tried on every event.
    monkeypatch.setattr(prefilter, "_compile_set", lambda patterns, options=None: None)
    engine = Engine(rs)
    assert [r.id for r in engine.candidates(ev(**{"file.path": "/a/b"}))] == ["tail"]
    assert [r.id for r in engine.candidates(ev(**{"file.path": "/a/B.PEM"}))] == ["tail", "key"]


def test_alerts_are_the_same_with_and_without_gates() -> None:
    rs = ruleset(CRON)
    paths = [
        "/etc/cron.d/x",
        "/etc/cron.daily/x",
        "/var/spool/cron/crontabs/root",
        "/home/u/.bash_history",
        "/home/u/bash_history",
        "/srv/rnd/a.v",
    ]
    events = [ev(**{"file.path": p}) for p in paths]
    assert alerts(rs, events) == alerts(ungated(rs), events)
    assert len(alerts(rs, events)) == len(paths) + 3


def test_what_cannot_be_gated_is_tried_on_every_event_of_its_place() -> None:
    rs = ruleset(
        """\
id: negated
title: not a build output
level: low
detection:
  selection: {file.path|endswith: .o}
  condition: not selection
---
id: everything
title: any value
level: low
detection:
  selection: {file.path|contains: '*'}
  condition: selection
---
id: present
title: has a path
level: low
detection:
  selection: {file.path|exists: true}
  condition: selection
"""
    )
    assert all(r.gates is None for r in rs.rules.values())
    engine = Engine(rs)
    assert len(engine.candidates(ev(**{"file.path": "/a.o"}))) == 3


def test_a_number_equality_is_gated_by_its_numbers() -> None:
    rs = ruleset(
        """\
id: empty
title: emptied
level: low
detection:
  selection: {file.size: 0}
  condition: selection
---
id: owner
title: owned by root or bin
level: low
detection:
  selection: {file.uid: [0, 2]}
  condition: selection
"""
    )
    assert all(g.kind == "eq" for r in rs.rules.values() for g in r.gates or ())
    engine = Engine(rs)
    cases = [
        ({"file.size": 0}, ["empty"]),
        ({"file.size": 10}, []),
        ({"file.uid": "0"}, ["owner"]),
        ({"file.uid": "2", "file.size": 0}, ["empty", "owner"]),
        ({"file.uid": "1000"}, []),
        ({"file.path": "/no/size"}, []),
    ]
    for fields, ids in cases:
        e = ev(**fields)
        assert [r.id for r in engine.candidates(e)] == ids, fields
        assert [r.id for r in rs.rules.values() if r.match(e)] == ids, fields


def test_number_comparisons_are_gated_by_bound() -> None:
    rs = ruleset(
        """\
id: big
title: big
level: low
detection:
  selection: {file.size|gt: 1000000}
  condition: selection
---
id: small
title: small
level: low
detection:
  selection: {file.size|lte: 10}
  condition: selection
"""
    )
    engine = Engine(rs)
    assert [r.id for r in engine.candidates(ev(**{"file.size": 1_000_000}))] == []
    assert [r.id for r in engine.candidates(ev(**{"file.size": 1_000_001}))] == ["big"]
    assert [r.id for r in engine.candidates(ev(**{"file.size": 10}))] == ["small"]
    assert [r.id for r in engine.candidates(ev(**{"file.path": "/no/size"}))] == []


@pytest.mark.parametrize("op", ["gt", "gte", "lt", "lte"])
def test_a_comparison_gate_passes_exactly_where_the_comparison_holds(op: str) -> None:
    rs = ruleset(
        f"id: r\ntitle: t\nlevel: low\ndetection: {{s: {{file.size|{op}: 10}}, condition: s}}\n"
    )
    engine = Engine(rs)
    rule = rs.rules["r"]
    for size in (-1, 9, 10, 11, 10**20):
        e = ev(**{"file.size": size})
        assert (rule in engine.candidates(e)) == rule.match(e), (op, size)


def test_keywords_are_gated_on_both_fields_they_are_looked_for_in() -> None:
    rs = ruleset(
        """\
title: keyword
logsource: {product: linux, category: process_creation}
detection:
  keywords: ['base64 -d']
  condition: keywords
level: low
"""
    )
    (rule,) = rs.rules.values()
    assert rule.gates is not None
    assert {g.field for g in rule.gates} == {"process.command_line", "file.path"}


def test_the_set_probe_is_checked_when_built_and_never_tries_a_rule() -> None:
    """Every set ends with a probe pattern (its DFA must answer it when the set is built);
    a hand-written event holding the probe's text (NUL is in no real path) tries no rule for
    it, and does not break the engine."""
    match = prefilter._compile_set(["abc", "x[0-9]+y"])
    assert match is not None
    assert match(prefilter._PROBE) == [2]
    assert match(b"zzabc") == [0] and match(b"nothing") == []
    engine = Engine(ruleset(CRON))
    probe = prefilter._PROBE.decode()
    for path in (f"/srv/{probe}", f"/srv/\u00e9{probe}"):  # the ASCII set and the field's own
        assert [r.id for r in engine.candidates(ev(**{"file.path": path}))] == ["any-write"]
        engine.process(ev(**{"file.path": path}))
