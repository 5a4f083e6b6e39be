"""Bad input, fuzzed: random text, random YAML and random rule-shaped documents never make the
loaders raise; every problem they report is located and carries a stable code.

CI runs a few dozen examples per property. Hunt for bugs locally with many more:

    FUZZ_EXAMPLES=5000 pytest -q --timeout=0 tests/rules/test_fuzz.py
"""

from __future__ import annotations

import os
import re
import string
import tempfile
from collections.abc import Callable
from datetime import UTC
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.config import check_text
from agent.diagnostics import ERROR, Problem
from agent.enrich.tags import parse_marker
from agent.events import FIELDS, FILE_ACTIONS, SETTABLE, Event, event_from_fields
from agent.rules.compiler import RuleSet, load_rules, load_text
from agent.rules.engine import Engine
from agent.rules.loader import (
    _CORRELATION_KEYS,
    _EXCEPTION_KEYS,
    _LIST_KEYS,
    _MACRO_KEYS,
    _OVERRIDE_KEYS,
    _RULE_KEYS,
    _SUPPRESS_KEYS,
    _TEST_KEYS,
)
from agent.rules.matchers import MODIFIERS, UNSUPPORTED
from agent.rules.model import CORRELATION_TYPES, LEVELS, STATUSES
from agent.rules.testing import run_all

NOW = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
FILE = "fuzz/rules.yaml"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz(ci_examples: int) -> Callable[[Any], Any]:
    """Few examples in CI (seconds), as many as FUZZ_EXAMPLES asks for when hunting."""
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- the properties --------------------------------------------------------------------------

_CODE = {"rule": r"^RULE_[A-Z_]+$", "cfg": r"^CFG_[A-Z_]+$", "mrk": r"^MRK_[A-Z_]+$"}
# Where YAML counts a new line (marks are what problems are located by).
_YAML_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


def _line_count(text: str) -> int:
    return max(len(text.splitlines()), len(_YAML_BREAK.findall(text)) + 1)


def check_problems(problems: list[Problem], text: str, file: str, kind: str) -> None:
    last = _line_count(text) + 1
    for p in problems:
        assert isinstance(p, Problem), p
        assert re.fullmatch(_CODE[kind], p.code), p
        assert p.file == file, p
        assert isinstance(p.line, int) and 0 <= p.line <= last, (p, last)
        assert isinstance(p.col, int) and p.col >= 0, p
        assert p.message and isinstance(p.message, str), p
        assert isinstance(p.hint, str), p
        assert p.severity in (ERROR, "warning"), p
        str(p)  # formats
        p.to_dict()


def check_result(result: object, problems: list[Problem]) -> None:
    if result is None:
        assert any(p.severity == ERROR for p in problems), problems
    else:
        assert not any(p.severity == ERROR for p in problems), problems


def check_rules_text(text: str, events: list[Event] | None = None) -> RuleSet | None:
    ruleset, problems = load_text(text, NOW, FILE)
    check_problems(problems, text, FILE, "rule")
    check_result(ruleset, problems)
    if ruleset is not None:
        run_engine(ruleset, events or [])
    return ruleset


def run_engine(ruleset: RuleSet, events: list[Event]) -> None:
    engine = Engine(ruleset)
    for e in [*events, *_STOCK_EVENTS]:
        for alert in engine.process(e):
            assert isinstance(alert, dict)
    engine.expire(NOW + 10**12)
    engine.stats()
    # The rules' own `tests:` run through fresh engines too (`exfilwatch rules test`).
    for result in run_all(ruleset):
        assert isinstance(result.passed, bool)


def check_config_text(text: str) -> None:
    config, problems = check_text(text, "fuzz/agent.yaml")
    check_problems(problems, text, "fuzz/agent.yaml", "cfg")
    check_result(config, problems)


def check_marker_text(text: str) -> None:
    marker, problems = parse_marker(text, "fuzz/.exfilwatch.yaml")
    check_problems(problems, text, "fuzz/.exfilwatch.yaml", "mrk")
    if marker is None:
        assert problems
    else:
        assert not problems


# --- strategies: values that appear in rules ---------------------------------------------------

FIELD_NAMES = sorted(FIELDS)
MOD_NAMES = [*MODIFIERS, *UNSUPPORTED, "Contains", "", "bogus", "re|i", "all|all"]
DATES = ["2024-13-45", "2027-01-31", "2020-02-30", "2001-01-01T00:00:00Z", "9999-12-31"]

unicode_text = st.text(max_size=30)
word = st.text(alphabet=string.ascii_letters + string.digits + "_.-*", min_size=1, max_size=12)
long_text = st.integers(1000, 20_000).map(lambda n: "x" * n)
junk_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "%",
        "%%",
        "%tools%",
        "%nope%",
        "*",
        "**",
        "?",
        "\\",
        "[",
        "[]",
        "[!]",
        "[z-a]",
        "a[]b]",
        "\\*",
        "(unclosed",
        "a{1001}",
        "(?P<n>x)",
        "\\1",
        "(?=x)",
        "\\Q.*",
        "\\E",
        "\ud800",
        "\U0001f600",
        "/",
        "//",
        "/rnd/",
        "rel/path",
        "**/x/**",
        "9" * 5000,
        "-1",
        "0",
        "1e400",
        "nan",
        "yes",
        "~",
        "null",
        "<<",
        "=",
        *DATES,
    ]
)
text_value = st.one_of(unicode_text, word, junk_text, long_text)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.dates(),
    st.datetimes(timezones=st.just(UTC) | st.none()),
    text_value,
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.one_of(text_value, st.integers(), st.none(), st.booleans())
    return st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5)


yaml_value = st.recursive(scalar, _containers, max_leaves=25)


def _deep(n: int, leaf: object) -> object:
    value = leaf
    for _ in range(n):
        value = [value]
    return value


deep_list = st.builds(_deep, st.integers(10, 300), scalar)


@st.composite
def junk(draw: st.DrawFn) -> object:
    """A wrong-typed value where the grammar expects something else."""
    return draw(st.one_of(scalar, yaml_value, deep_list))


def sometimes(draw: st.DrawFn, good: st.SearchStrategy[Any], odds: int) -> Any:
    """A value from `good`; with odds N, one time in N junk in its place (0: never)."""
    if odds and draw(st.integers(0, odds - 1)) == 0:
        return draw(junk())
    return draw(good)


# How much damage a generated rule file takes: none (valid files, to exercise the compiled
# rules), a little, or a lot. One in N values is junk.
CHAOS = st.sampled_from([0, 0, 40, 8])

good_durations = st.sampled_from(["5m", "10s", "250ms", "1.5h", "2d", "1w", 30, 0.5, "90"])
bad_durations = st.one_of(
    st.sampled_from(["0", "0s", "5 minutes", "-1s", "1e9", "", "m", "0.0000001ms"]),
    st.sampled_from(["9" * 400 + "s", "9" * 400, ".inf", "99999999999999999999d"]),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(True),
)
durations = good_durations | bad_durations


def one_or_list(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return values | st.lists(values, min_size=1, max_size=4)


wild_text = word | st.sampled_from(
    ["rclone", "*.docx", "/rnd/*", "top.v", "a?c", "\\*", "*", "CURL", "pre*suf", "%", "/a\nb"]
)
regexes = st.sampled_from(
    [
        r"^/rnd/",
        r"\.(docx|pdf)$",
        r"(?i)secret",
        r"a{2,5}",
        r"\d+",
        r"[[:alpha:]]",
        r"\Qa.b\E",
        r"x|y",
        r"(a)(b)",
        "",
    ]
)
bad_regexes = st.sampled_from(
    [
        "(unclosed",
        "a{1001}",
        "(?P<n>x)(?P=n)",
        r"\1",
        "(?=x)",
        "[z-a]",
        "\\",
        "*",
        "(?i",
        "\\Q(",
        "x{2,1}",
        "((((((((((((((((((((((((((((((x))))))))))))))))))))))))))))))" * 3,
    ]
)
abs_paths = st.sampled_from(["/rnd", "/rnd/", "/", "/media", "/tmp/a b", "/x/\u00e9", "/media/usb"])
globs = st.sampled_from(
    [
        "/rnd/**",
        "**/*.docx",
        "/media/*/[a-z]*",
        "**",
        "[!.]*",
        "/a/[z-a]",
        "/a/[",
        "[]]",
        "\\*",
        "a/**b",
        "/x/[^a]?",
        "**/**",
    ]
)
numbers = st.integers(-5, 2**40) | st.floats(allow_nan=False, allow_infinity=False)

# kind -> (modifiers, values that fit them)
MODIFIED: dict[str, tuple[list[str], st.SearchStrategy[Any]]] = {
    "plain": ([], one_or_list(wild_text | st.sampled_from(FILE_ACTIONS) | numbers | st.none())),
    "contains": (["contains"], one_or_list(wild_text | st.integers(0, 99))),
    "startswith": (["startswith"], one_or_list(wild_text)),
    "endswith": (["endswith"], one_or_list(wild_text)),
    "cased": (["endswith", "cased"], one_or_list(wild_text)),
    "plain_cased": (["cased"], one_or_list(wild_text)),
    "all": (["contains", "all"], st.lists(wild_text, min_size=1, max_size=3)),
    "re": (["re"], one_or_list(regexes)),
    "re_flags": (["re", "i", "s"], one_or_list(regexes)),
    "re_all": (["re", "all"], st.lists(regexes, min_size=1, max_size=3)),
    "path": (["path"], one_or_list(abs_paths)),
    "glob": (["glob"], one_or_list(globs)),
    "exists": (["exists"], st.booleans()),
    "gt": (["gt"], numbers),
    "gte": (["gte"], numbers),
    "lt": (["lt"], numbers),
    "lte": (["lte"], numbers),
    "expand": (["expand"], st.sampled_from(["%tools%", "%exts%", "*.%exts%", "%tools%-%exts%"])),
    "expand_contains": (["contains", "expand"], st.sampled_from(["%tools%", "x%exts%y"])),
}


@st.composite
def field_condition(draw: st.DrawFn, odds: int) -> tuple[str, Any]:
    """One `field|modifier...: value`, the value fit to the modifiers (mostly)."""
    name = draw(st.sampled_from(FIELD_NAMES))
    mods, values = MODIFIED[draw(st.sampled_from(sorted(MODIFIED)))]
    value = draw(values)
    if odds and draw(st.integers(0, odds - 1)) == 0:
        damage = draw(st.integers(0, 3))
        if damage == 0:
            mods = draw(st.lists(st.sampled_from(MOD_NAMES) | word, max_size=3))
        elif damage == 1:
            name = draw(word | st.sampled_from(["file.pth", "", "file.path ", "FILE.PATH"]))
        elif damage == 2:
            value = draw(bad_regexes | globs | st.lists(st.nothing(), max_size=0))
        else:
            value = draw(junk())
    return "|".join([name, *mods]), value


@st.composite
def selection(draw: st.DrawFn, odds: int = 8) -> object:
    """A selection: a map of field conditions (AND), now and then a list of maps (OR)."""

    def one_map() -> dict[str, Any]:
        pairs = [draw(field_condition(odds)) for _ in range(draw(st.integers(1, 3)))]
        return dict(pairs)

    if odds and draw(st.integers(0, odds - 1)) == 0:
        return draw(st.sampled_from([{}, [], [{}], ["keyword"], "text", None, 5]) | junk())
    if draw(st.integers(0, 9)) == 0:
        return [one_map() for _ in range(draw(st.integers(1, 3)))]
    return one_map()


PATTERNS = {
    "1 of sel_*": "sel_",
    "all of sel_*": "sel_",
    "1 of them": "",
    "all of them": "",
    "any of s*": "s",
}


@st.composite
def condition(draw: st.DrawFn, names: list[str], macros: list[str], odds: int) -> object:
    """A condition that uses every selection once (an unused one is an error), joined by
    and/or/not and parentheses, plus macros and `1 of` patterns that match something."""
    leaves = list(names)
    for _ in range(draw(st.integers(0, 2))):
        usable = [
            p
            for p, prefix in PATTERNS.items()
            if any(n.startswith(prefix) and not n.startswith("_") for n in names)
        ]
        extra = draw(st.sampled_from(usable or ["s1"]) | st.sampled_from(macros or ["s1"]))
        if extra != "s1" or "s1" in names:
            leaves.insert(draw(st.integers(0, len(leaves))), extra)
    leaves = leaves or ["s1"]

    def tree(part: list[str]) -> str:
        if len(part) == 1:
            return f"not {part[0]}" if draw(st.integers(0, 4)) == 0 else part[0]
        cut = draw(st.integers(1, len(part) - 1))
        op = draw(st.sampled_from(["and", "or", "and not", "or not", "AND", "Or"]))
        text = f"{tree(part[:cut])} {op} {tree(part[cut:])}"
        return f"({text})" if draw(st.booleans()) else text

    if odds and draw(st.integers(0, odds - 1)) == 0:
        choice = draw(st.integers(0, 6))
        if choice == 0:
            return draw(junk())
        if choice == 1:
            return draw(st.text(alphabet="()not and or 1ofall*|sel_ \t\n", max_size=40))
        if choice == 2:
            return "(" * draw(st.integers(60, 300)) + "s1" + ")" * draw(st.integers(0, 300))
        if choice == 3:
            return "not " * draw(st.integers(60, 300)) + "s1"
        if choice == 4:
            return tree(leaves) + draw(
                st.sampled_from(
                    [" | count() > 5", " and", ")", " s2", "(", " or 2 of s*", " and them", " && x"]
                )
            )
        if choice == 5:
            return tree([*leaves, draw(word)])
        return "x" * 5000
    return tree(draw(st.permutations(leaves)))


SEL_NAMES = ["s1", "s2", "sel_a", "sel_b", "_hidden", "filter", "sel_c"]
BAD_SEL_NAMES = ["1bad", "and", "them", "with space", "m1", "x*"]


@st.composite
def detection(draw: st.DrawFn, macros: list[str], lists: list[str], odds: int) -> object:
    names = draw(st.lists(st.sampled_from(SEL_NAMES), min_size=1, max_size=4, unique=True))
    if odds and draw(st.integers(0, odds - 1)) == 0:
        names.append(draw(st.sampled_from(BAD_SEL_NAMES) | word))
    det: dict[str, Any] = {n: draw(selection(odds)) for n in names}
    if not odds or draw(st.integers(0, odds - 1)):
        det["condition"] = draw(condition([n for n in names if n in SEL_NAMES], macros, odds))
    return det


@st.composite
def exception_entry(draw: st.DrawFn, odds: int) -> object:
    entry: dict[str, Any] = {
        "match": draw(selection(odds)),
        "reason": sometimes(draw, word, odds),
        "owner": sometimes(draw, word, odds),
    }
    if draw(st.booleans()):
        entry["expires"] = sometimes(
            draw, st.dates() | st.datetimes(timezones=st.just(UTC) | st.none()), odds
        )
    if odds and draw(st.integers(0, odds - 1)) == 0:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    return entry


@st.composite
def suppress(draw: st.DrawFn, odds: int) -> object:
    sup: dict[str, Any] = {"for": draw(good_durations) if not odds else draw(durations)}
    if draw(st.booleans()):
        sup["by"] = sometimes(draw, st.lists(st.sampled_from(FIELD_NAMES), max_size=3), odds)
    return sup


@st.composite
def correlation(draw: st.DrawFn, bases: list[str], odds: int) -> object:
    kind = draw(st.sampled_from(CORRELATION_TYPES))
    count = 2 if kind == "temporal_ordered" else 1
    rules = draw(st.lists(st.sampled_from(bases or ["nope"]), min_size=count, max_size=3))
    corr: dict[str, Any] = {
        "type": kind,
        "rules": rules,
        "group-by": draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=3, unique=True)),
        "timespan": draw(good_durations),
    }
    if kind != "temporal_ordered":
        cond: dict[str, Any] = {"gte": draw(st.integers(1, 5) | st.floats(0.5, 1e6))}
        if kind != "event_count":
            cond["field"] = draw(st.sampled_from(["file.path", "file.size", "user.name"]))
        corr["condition"] = cond
    if odds:
        for key in list(corr):
            if draw(st.integers(0, odds - 1)) == 0:
                corr[key] = draw(
                    st.sampled_from(
                        {
                            "type": ["value_cnt", "", None],
                            "rules": [[], ["nope"], "one", [1]],
                            "group-by": [["nope"], "user.name", [None]],
                            "timespan": ["0s", -1, ".inf", "9" * 400, "5 minutes"],
                            "condition": [
                                {"gte": 0},
                                {"gte": -1},
                                {"gte": float("nan")},
                                {"gte": float("inf")},
                                {"gte": 10**400},
                                {"field": "x"},
                                {},
                                "gte 5",
                                {"gte": True},
                            ],
                        }[key]
                    )
                    | junk()
                )
    return corr


def _settable_values(name: str) -> st.SearchStrategy[Any]:
    annotation = Event.__annotations__[SETTABLE[name]]
    kind = str(getattr(annotation, "__forward_arg__", annotation))
    if kind.startswith("tuple"):
        return st.lists(wild_text, max_size=3) | wild_text
    if "bool" in kind:
        return st.booleans()
    if "int" in kind:
        return st.integers(0, 2**40)
    if "float" in kind:
        return st.floats(0, 1e6) | st.integers(0, 100)
    if name == "event.action":
        return st.sampled_from(FILE_ACTIONS)
    if name in ("file.uid", "file.gid", "user.id"):
        return st.integers(0, 70000) | st.sampled_from(["0", "1000"])
    return wild_text | abs_paths


@st.composite
def flat_event(draw: st.DrawFn, odds: int) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(SETTABLE)), max_size=5, unique=True))
    event = {k: draw(_settable_values(k)) for k in keys}
    if odds and draw(st.integers(0, odds - 1)) == 0:
        event[draw(st.sampled_from(FIELD_NAMES) | word)] = draw(junk())
    return event


@st.composite
def rule_test(draw: st.DrawFn, odds: int) -> object:
    test: dict[str, Any] = {"name": sometimes(draw, word, odds)}
    if draw(st.booleans()):
        test["event"] = draw(flat_event(odds))
    else:
        steps = []
        for _ in range(draw(st.integers(1, 3))):
            step: dict[str, Any] = {"event": draw(flat_event(odds))}
            if draw(st.booleans()):
                step["at"] = draw(st.sampled_from([0, "0s", "5s", "1m"]) | durations)
            if draw(st.booleans()):
                step["repeat"] = sometimes(draw, st.integers(1, 20), odds)
                step["every"] = draw(st.sampled_from(["1s", 0, "0s"]) | durations)
            steps.append(step)
        test["events"] = steps
    test["expect"] = sometimes(
        draw,
        st.sampled_from(["match", "no_match"])
        | st.fixed_dictionaries(
            {"alerts": st.integers(0, 3)},
            optional={
                "alert": st.dictionaries(
                    st.sampled_from(["rule.id", "user.name"]), word, max_size=2
                )
            },
        )
        | st.fixed_dictionaries({"match": st.booleans()}),
        odds,
    )
    return test


ATTACK_TAGS = ["attack.exfiltration", "attack.t1052.001", "attack.g0001", "custom", "team.x"]
BAD_ATTACK_TAGS = ["attack.t105", "attack.exfiltraton", "attack.", "attack.T1052"]


@st.composite
def rule_doc(
    draw: st.DrawFn, rid: str, bases: list[str], macros: list[str], lists: list[str], odds: int
) -> dict[str, Any]:
    """A rule (detection, or a correlation over `bases`), each part damaged one time in odds."""
    doc: dict[str, Any] = {
        "id": sometimes(draw, st.just(rid), odds),
        "title": sometimes(draw, word, odds),
        "level": sometimes(draw, st.sampled_from(LEVELS), odds),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "description": unicode_text,
        "status": st.sampled_from(STATUSES),
        "enabled": st.booleans(),
        "generate": st.booleans(),
        "author": word,
        "references": st.lists(word, max_size=2),
        "tags": st.lists(st.sampled_from(ATTACK_TAGS), max_size=3),
        "scope": st.lists(st.sampled_from(["departing", "x"]), max_size=2),
        "exceptions": st.lists(exception_entry(odds), max_size=2),
        "suppress": suppress(odds),
        "tests": st.lists(rule_test(odds), max_size=2),
        "date": st.dates(),
        "falsepositives": st.lists(unicode_text, max_size=2),
        "logsource": st.just({"product": "linux"}),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=5, unique=True)):
        doc[key] = sometimes(draw, optional[key], odds)
    if odds and draw(st.integers(0, odds - 1)) == 0:
        doc["tags"] = draw(st.lists(st.sampled_from(BAD_ATTACK_TAGS + ATTACK_TAGS), max_size=3))
    if bases and rid not in bases:
        doc["correlation"] = draw(correlation(bases, odds))
    else:
        doc["detection"] = draw(detection(macros, lists, odds))
    return doc


@st.composite
def list_doc(draw: st.DrawFn, name: str, odds: int) -> dict[str, Any]:
    doc = {
        "list": sometimes(draw, st.just(name), odds),
        "items": sometimes(draw, st.lists(word, min_size=1, max_size=5), odds),
    }
    if draw(st.booleans()):
        doc["description"] = sometimes(draw, unicode_text, odds)
    return doc


@st.composite
def macro_doc(draw: st.DrawFn, name: str, odds: int) -> dict[str, Any]:
    return {
        "macro": sometimes(draw, st.just(name), odds),
        "detection": draw(selection(odds)),
    }


@st.composite
def override_doc(
    draw: st.DrawFn, targets: list[str], correlations: list[str], odds: int
) -> dict[str, Any]:
    target = draw(st.sampled_from([*targets, "tag:attack.exfiltration", "tag:custom"]))
    doc: dict[str, Any] = {"override": sometimes(draw, st.just(target), odds)}
    optional: dict[str, st.SearchStrategy[Any]] = {
        "enabled": st.booleans(),
        "level": st.sampled_from(LEVELS),
        "exceptions": st.lists(exception_entry(odds), min_size=1, max_size=2),
        "suppress": suppress(odds),
    }
    if target in correlations or odds:
        optional["correlation"] = st.fixed_dictionaries(
            {}, optional={"timespan": good_durations, "condition": st.just({"gte": 3})}
        )
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
        doc[key] = sometimes(draw, optional[key], odds)
    return doc


ALL_KEYS = sorted(
    {
        *_RULE_KEYS,
        *_CORRELATION_KEYS,
        *_EXCEPTION_KEYS,
        *_SUPPRESS_KEYS,
        *_TEST_KEYS,
        *_OVERRIDE_KEYS,
        *_LIST_KEYS,
        *_MACRO_KEYS,
    }
)


@st.composite
def mutated(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """Random damage: drop keys, add unknown or misplaced keys, swap values for wrong types."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            roll = draw(st.integers(0, 29))
            if roll == 0:
                continue  # missing key
            if roll == 1:
                out[k] = draw(junk())  # wrong type
                continue
            out[k] = draw(mutated(v, depth + 1)) if depth < 6 else v
        if draw(st.integers(0, 9)) == 0:
            out[draw(st.sampled_from(ALL_KEYS) | word)] = draw(junk())  # unknown / misplaced
        return out
    if isinstance(value, list):
        return [draw(mutated(v, depth + 1)) if depth < 6 else v for v in value]
    return value


IDS = ["r1", "r2", "base.a", "base-b", "corr", "x"]
LIST_NAMES = ["tools", "exts"]
MACRO_NAMES = ["m1", "tagged", "egress"]


@st.composite
def rule_stream(draw: st.DrawFn) -> str:
    """A multi-document rule file: rules, correlations over them, lists and macros they use,
    overrides of them. Mostly valid at chaos 0; at higher chaos documents are damaged,
    duplicated, shuffled, and the YAML text itself corrupted."""
    odds = draw(CHAOS)
    ids = draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=5, unique=True))
    n_bases = draw(st.integers(1, len(ids)))
    bases, corrs = ids[:n_bases], ids[n_bases:]
    lists = draw(st.lists(st.sampled_from(LIST_NAMES), max_size=2, unique=True))
    macros = draw(st.lists(st.sampled_from(MACRO_NAMES), max_size=2, unique=True))
    if not odds:
        lists = LIST_NAMES  # %tools% and %exts% must resolve in a valid file
    docs: list[Any] = [draw(list_doc(name, odds)) for name in lists]
    docs += [draw(macro_doc(name, odds)) for name in macros]
    docs += [draw(rule_doc(rid, [], macros, lists, odds)) for rid in bases]
    docs += [draw(rule_doc(rid, bases, macros, lists, odds)) for rid in corrs]
    docs += [draw(override_doc(ids, corrs, odds)) for _ in range(draw(st.integers(0, 2)))]
    if odds:
        docs = [draw(mutated(d)) if draw(st.integers(0, 2)) == 0 else d for d in docs]
        if draw(st.integers(0, 4)) == 0 and docs:
            docs.append(draw(st.sampled_from(docs)))  # a duplicate id, list or macro
        docs = draw(st.permutations(docs))
        if draw(st.integers(0, 9)) == 0:
            docs.insert(draw(st.integers(0, len(docs))), draw(junk()))
    text = dump_all(docs, draw(st.booleans()))
    return draw(corrupted(text)) if odds else text


def dump_all(docs: list[Any], unicode: bool) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=unicode, width=80)


@st.composite
def corrupted(draw: st.DrawFn, text: str) -> str:
    """Usually the text as it is; sometimes truncated, a character swapped, or junk spliced in."""
    kind = draw(st.integers(0, 9))
    if kind < 6 or not text:
        return text
    i = draw(st.integers(0, len(text) - 1))
    if kind == 6:
        return text[:i]
    if kind == 7:
        j = draw(st.integers(0, len(text) - 1))
        chars = list(text)
        chars[i], chars[j] = chars[j], chars[i]
        return "".join(chars)
    if kind == 8:
        return text[:i] + draw(st.sampled_from(YAML_SNIPPETS) | st.text(max_size=5)) + text[i:]
    return text[:i] + text[i + 1 :]


# YAML features a dumper never writes but a person (or an attacker) can: anchors, aliases,
# recursion, merge keys, explicit tags, complex keys, odd scalars.
YAML_SNIPPETS = [
    "&a ",
    "*a",
    "*nope",
    "<<: *a\n",
    "<<: 1\n",
    "!!binary ",
    "!!timestamp ",
    "!!omap ",
    "!!set ",
    "!!python/object:os.system ",
    "!custom ",
    "? [a, b]\n: c\n",
    "\n---\n",
    "\n...\n",
    "%YAML 1.1\n---\n",
    "\t",
    "\r",
    "\x85",
    "\u2028",
    "'",
    '"',
    "{",
    "]",
    "- ",
    ": ",
    "#",
]

RULE_TEMPLATES = [
    # a recursive alias inside a selection value
    "id: r1\ntitle: t\nlevel: low\ndetection: {s1: &a {file.path: [*a]}, condition: s1}\n",
    # values YAML resolves as timestamps or ints but cannot construct
    "id: r1\ntitle: t\nlevel: low\ndetection: {s1: {file.path: {V}}, condition: s1}\n",
    "id: r1\ntitle: t\nlevel: low\ndetection: {s1: {file.size|gt: {V}}, condition: s1}\n",
    "id: r1\ntitle: t\nlevel: low\ndetection: {s1: {file.path: x}, condition: s1}\n"
    "exceptions: [{match: {file.path: {V}}, reason: r, owner: o, expires: {V}}]\n",
    "id: r1\ntitle: {V}\nlevel: low\ndetection: {s1: {file.path: x}, condition: s1}\n",
    "list: tools\nitems: [{V}]\n---\n"
    "id: r1\ntitle: t\nlevel: low\ndetection: {s1: {process.name|expand: '%tools%'}, "
    "condition: s1}\n",
    "macro: m1\ndetection: {file.path: {V}}\n---\n"
    "id: r1\ntitle: t\nlevel: low\ndetection: {s1: {file.path: x}, condition: s1 and m1}\n",
    "id: b\ntitle: t\nlevel: low\ndetection: {s1: {file.path: /x}, condition: s1}\n---\n"
    "id: r1\ntitle: t\nlevel: low\ncorrelation: {type: event_count, rules: [b], timespan: {V}, "
    "condition: {gte: 1}}\nsuppress: {for: {V}}\n",
    "id: r1\ntitle: t\nlevel: low\ndetection: {s1: {file.path: x}, condition: s1}\n"
    "tests: [{name: n, events: [{at: {V}, event: {file.path: {V}}}], expect: {V}}]\n",
    "base: &b {file.path: /x}\n---\nid: r1\ntitle: t\nlevel: low\n"
    "detection: {s1: {<<: {V}}, condition: s1}\n",
    "id: b\ntitle: t\nlevel: low\ndetection: {s1: {file.path: /x}, condition: s1}\n---\n"
    "id: r1\ntitle: t\nlevel: low\ncorrelation: {type: value_sum, rules: [b], timespan: 5m, "
    "condition: {gte: {V}, field: file.size}}\n---\n"
    "override: r1\ncorrelation: {timespan: {V}, condition: {gte: {V}}}\n",
]
TEMPLATE_VALUES = [
    "2024-13-45",
    "2020-02-30",
    "2001-01-01T25:00:00Z",
    "9" * 5000,
    "0x" + "f" * 5000,
    "0o" + "7" * 5000,
    "1_" * 3000 + "1",
    "!!binary '====='",
    "!!timestamp 2024-13-45",
    "!!omap [a]",
    "!!set [a]",
    "!!pairs {a: b}",
    "!!int abc",
    "!!float abc",
    "!!bool maybe",
    "!!null x",
    "!!str [a]",
    "!!map [a]",
    "!!seq {a: b}",
    "!custom x",
    "!!python/name:os.system x",
    "{? [a]: b}",
    "{? {a: 1}: b}",
    "{<<: 1}",
    "{<<: [1]}",
    "*nope",
    ".inf",
    ".nan",
    "-.inf",
    "1e400",
    "9" * 400,
    "[" * 400 + "]" * 400,
    "[" * 120 + "]" * 120,
    "[" * 300 + "]" * 300,
    "{a: " * 120 + "1" + "}" * 120,
    "!!timestamp 2024-13-45/x",
    "{<<: !!pairs {a: b}}",
    '"\\U00110000"',
    '"\\Ud00174B6"',
    "'\\U00110000'",
]


@st.composite
def templated(draw: st.DrawFn) -> str:
    template = draw(st.sampled_from(RULE_TEMPLATES))
    return template.replace("{V}", draw(st.sampled_from(TEMPLATE_VALUES)))


# --- strategies: events ----------------------------------------------------------------------

paths = st.one_of(
    st.sampled_from(["/", "/rnd/project/top.v", "/media/usb/x.docx", "/tmp/a.zip", "/x"]),
    st.text(max_size=20).map(lambda s: "/" + s),
    st.sampled_from(["/rnd/\udcff\udcfe.bin", "/a\nb", ""]),
)
opt_text = st.none() | st.text(max_size=10) | st.sampled_from(["rclone", "scp", "removable"])
opt_int = st.none() | st.integers(-(2**63), 2**63)
# Times an alert can format (datetime's years 1..9999); agent.events formats no other.
MIN_US, MAX_US = -62_135_596_800_000_000, 253_402_300_799_999_999
str_tuple = st.lists(st.text(max_size=8) | st.sampled_from(["chip", "rtl"]), max_size=3).map(tuple)

events = st.builds(
    Event,
    timestamp_us=st.integers(0, MAX_US),
    action=st.sampled_from(FILE_ACTIONS) | st.text(max_size=8),
    path=paths,
    category=st.just("file") | st.text(max_size=5),
    file_type=opt_text,
    size=opt_int,
    uid=st.none() | st.sampled_from(["0", "1000", "-1", "x"]),
    gid=st.none() | st.sampled_from(["0", "1000"]),
    inode=st.none() | st.sampled_from(["12", "99999999999999999999"]),
    mode=st.none() | st.sampled_from(["0644", "4755"]),
    mtime_us=st.none() | st.integers(MIN_US, MAX_US),
    src_path=st.none() | paths,
    tags=str_tuple,
    sensitivity=st.none() | st.sampled_from(["low", "high", "critical"]),
    root=st.none() | paths,
    source=st.sampled_from(["inotify", "test", "scan"]),
    sequence=st.integers(0, 2**40),
    hostname=opt_text,
    user_name=opt_text,
    user_id=st.none() | st.sampled_from(["0", "1000"]),
    process_pid=opt_int,
    process_name=opt_text,
    process_executable=opt_text,
    process_command_line=opt_text,
    process_parent_name=opt_text,
    location=st.none() | st.sampled_from(["removable", "cloud_sync", "local"]),
    location_provider=opt_text,
    watchlist=st.none() | st.sampled_from(["departing", "x"]),
    lineage_origin=st.none() | paths,
    lineage_tags=str_tuple,
    archive_tagged=opt_int,
    disguise=str_tuple,
)

_STOCK_EVENTS = [
    event_from_fields({"event.action": a, "file.path": p, "file.size": 4096}, NOW + i)
    for i, (a, p) in enumerate(
        [(a, p) for a in FILE_ACTIONS for p in ("/rnd/project/top.v", "/media/usb/x.docx")]
    )
] + [
    event_from_fields(
        {
            "event.action": "closed_write",
            "file.path": "/x",
            "exfilwatch.tags": ["chip"],
            "user.name": "alice",
            "process.name": "rclone",
            "file.uid": 1000,
        },
        NOW,
    ),
    Event(0, "", ""),
    Event(MAX_US, "deleted", "/", size=-1, mtime_us=MIN_US, tags=("",)),
]


# --- regressions: inputs that raised before the fix ----------------------------------------

RULE = "id: r1\ntitle: t\nlevel: low\n"
BASE = "id: b\ntitle: t\nlevel: low\ndetection: {s1: {file.path: /x}, condition: s1}\n---\n"


def sel(value: str, key: str = "file.path") -> str:
    return RULE + f"detection: {{s1: {{{key}: {value}}}, condition: s1}}\n"


# (rule file text, the code and line of the first error it must give now)
FIXED_RULE_CRASHES = [
    # ConstructorError (recursive node) from node_value in the compiler's selection()
    (RULE + "detection: {s1: &a {file.path: [*a]}, condition: s1}\n", "RULE_YAML_PARSE", 4),
    # ValueError from PyYAML's timestamp constructor: a plain scalar resolved as a date
    (sel("2024-13-45"), "RULE_YAML_PARSE", 4),
    (sel("2001-01-01T25:00:00Z"), "RULE_YAML_PARSE", 4),
    (
        "id: r1\ntitle: 2024-13-45\nlevel: low\ndetection: {s1: {file.path: x}, condition: s1}\n",
        "RULE_YAML_PARSE",
        2,
    ),
    # explicit tags whose constructor fails: ValueError, KeyError, AttributeError,
    # ConstructorError, all raised from node_value in the compiler
    (sel("!!int abc"), "RULE_YAML_PARSE", 4),
    (sel("!!float abc"), "RULE_YAML_PARSE", 4),
    (sel("!!bool maybe"), "RULE_YAML_PARSE", 4),
    (sel("!!timestamp 2024-13-45/x"), "RULE_YAML_PARSE", 4),
    (sel("!custom x"), "RULE_YAML_PARSE", 4),
    (sel("!!str [a]"), "RULE_YAML_PARSE", 4),
    (sel("!!seq {a: b}"), "RULE_YAML_PARSE", 4),
    (sel("!!set [a]"), "RULE_YAML_PARSE", 4),
    (sel("!!omap [a]"), "RULE_YAML_PARSE", 4),
    (sel("!!pairs {a: b}"), "RULE_YAML_PARSE", 4),
    # unhashable keys and bad merges: ConstructorError from node_value in the compiler
    (sel("{? [a]: b}"), "RULE_YAML_PARSE", 4),
    (sel("{<<: 1}"), "RULE_YAML_PARSE", 4),
    (sel("{<<: [1]}"), "RULE_YAML_PARSE", 4),
    # what `<<` merges is read by the compiler, never by PyYAML's merge
    (
        "base: &b {file.path: /x}\n---\n" + RULE + "detection: {s1: {<<: !!pairs {a: b}}, "
        "condition: s1}\n",
        "RULE_YAML_PARSE",
        6,
    ),
    # ints past Python's int/str digit limit: ValueError constructing one, or str() of one
    # (a hexadecimal int constructs, then fails in the matcher's str(v))
    (sel("9" * 5000), "RULE_YAML_PARSE", 4),
    (sel("0x" + "f" * 5000), "RULE_YAML_PARSE", 4),
    # nesting deep enough for a RecursionError in node_value (the compiler's selection())
    (sel("[" * 300 + "]" * 300), "RULE_YAML_PARSE", 0),
    # OverflowError: math.isfinite(int too large for a float) in the matcher
    # (such numbers are fine: the rule is accepted)
    (sel("9" * 400, "file.size|gt"), "", 0),
    (sel("9" * 400), "", 0),
    # OverflowError: float(int) in parse_duration, from the loader's duration()
    (
        BASE
        + RULE
        + "correlation: {type: event_count, rules: [b], timespan: "
        + "9" * 400
        + ", condition: {gte: 1}}\n",
        "RULE_DURATION",
        9,
    ),
    # non-finite durations were accepted; the engine then raised in int(timespan * 1e6)
    (
        BASE + RULE + "correlation: {type: event_count, rules: [b], timespan: .inf, "
        "condition: {gte: 1}}\n",
        "RULE_DURATION",
        9,
    ),
    (
        BASE + RULE + "correlation: {type: event_count, rules: [b], timespan: .nan, "
        "condition: {gte: 1}}\n",
        "RULE_DURATION",
        9,
    ),
    (
        BASE
        + RULE
        + "correlation: {type: event_count, rules: [b], timespan: '9"
        + "9" * 400
        + "s', condition: {gte: 1}}\n",
        "RULE_DURATION",
        9,
    ),
    (sel("/x") + "suppress: {for: .inf}\n", "RULE_DURATION", 5),
    # OverflowError: float(gte) of an int too large; NaN / inf thresholds were accepted
    (
        BASE + RULE + "correlation: {type: event_count, rules: [b], timespan: 5m, "
        "condition: {gte: " + "9" * 400 + "}}\n",
        "RULE_TYPE",
        9,
    ),
    (
        BASE + RULE + "correlation: {type: event_count, rules: [b], timespan: 5m, "
        "condition: {gte: .nan}}\n",
        "RULE_TYPE",
        9,
    ),
    # a test step's time past year 9999: OverflowError formatting the alert's @timestamp
    # when the rule's tests ran (`exfilwatch rules test`, run_all)
    (
        RULE + "detection: {s1: {file.path: /x}, condition: s1}\n"
        "tests: [{name: n, events: [{at: 99999999999999999999s, event: {file.path: /x}}], "
        "expect: match}]\n",
        "RULE_TEST",
        5,
    ),
    # ValueError from PyYAML's scanner (chr() of a \U escape past U+10FFFF), uncaught by
    # every loader; OverflowError when the escape is past a C int
    ('title: "\\U00110000"\n', "RULE_YAML_PARSE", 1),
    ('title: "\\Ud00174B6"\n', "RULE_YAML_PARSE", 1),
    # ValueError from PyYAML's scanner: int() of a %YAML version past the digit limit
    ("%YAML 1." + "1" * 5000 + "\n---\na: 1\n", "RULE_YAML_PARSE", 1),
]


@fuzz(30)
@given(text=templated(), extra=st.lists(events, max_size=2))
@example(text=FIXED_RULE_CRASHES[0][0], extra=[])
def test_yaml_features_in_rules_never_raise(text: str, extra: list[Event]) -> None:
    check_rules_text(text, extra)


def test_crashes_found_by_fuzzing_are_located_problems_now() -> None:
    for text, code, line in FIXED_RULE_CRASHES:
        ruleset, problems = load_text(text, NOW, FILE)
        check_problems(problems, text, FILE, "rule")
        errors = [p for p in problems if p.severity == ERROR]
        if not code:
            assert ruleset is not None and not errors, (text[:80], problems)
            continue
        assert ruleset is None, text[:80]
        assert any(p.code == code and p.line == (line or p.line) for p in errors), (
            text[:80],
            problems,
        )


# --- the properties, fuzzed ------------------------------------------------------------------

lenient_text = st.one_of(
    st.text(),
    st.binary().map(lambda b: b.decode("utf-8", "replace")),
    st.binary().map(lambda b: b.decode("latin-1")),
    st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")),
)


@fuzz(60)
@given(text=lenient_text)
# ValueError out of PyYAML's scanner, through all three loaders
@example(text='a: "\\U00110000"\n')
@example(text='a: "\\Ud00174B6"\n')
@example(text="%YAML 1." + "1" * 5000 + "\n---\na: 1\n")
# RecursionError composing (config and marker loaders did not catch it)
@example(text="[" * 500 + "]" * 500)
# ValueError constructing a value (raised from parse_marker)
@example(text="tags: 2024-13-45\nsensitivity: high\n")
def test_arbitrary_text_never_raises(text: str) -> None:
    check_rules_text(text)
    check_config_text(text)
    check_marker_text(text)


@st.composite
def random_yaml(draw: st.DrawFn) -> str:
    docs = draw(st.lists(yaml_value | deep_list, min_size=1, max_size=3))
    return draw(corrupted(dump_all(docs, draw(st.booleans()))))


@fuzz(25)
@given(text=random_yaml())
def test_random_yaml_never_raises(text: str) -> None:
    check_rules_text(text)
    check_config_text(text)
    check_marker_text(text)


@fuzz(40)
@given(
    text=rule_stream(), extra=st.lists(events | flat_event(0).map(event_from_fields), max_size=4)
)
@example(
    # found by rule_stream(): a \U escape past U+10FFFF in a damaged title
    text='id: r2\ntitle: "\\xC2\\U00C2265B"\nlevel: low\ndetection: {s1: {file.path: /x}, '
    "condition: s1}\n",
    extra=[],
)
@example(
    # found by FUZZ_EXAMPLES=5000: OverflowError from PyYAML's scanner, chr() of \Ud00174B6
    text='list: tools\nitems: [a]\ndescription: "\\x8E\\Ud00174B6C\\t1"\n',
    extra=[],
)
def test_rule_shaped_documents_never_raise(text: str, extra: list[Event]) -> None:
    check_rules_text(text, extra)


@st.composite
def config_doc(draw: st.DrawFn) -> str:
    watch = st.fixed_dictionaries(
        {"path": text_value | st.sampled_from(["/", "/tmp", "rnd", "~/x", "/var/lib/exfilwatch"])},
        optional={
            "tags": st.lists(text_value, max_size=3),
            "sensitivity": st.sampled_from(["low", "high", "secret"]),
            "recursive": st.booleans(),
            "exclude": st.lists(
                st.sampled_from(["*.tmp", "/", "a//b", "../x", "build/"]), max_size=3
            ),
        },
    )
    sink = st.fixed_dictionaries(
        {"type": st.sampled_from(["stdout", "file", "syslog"])},
        optional={
            "path": st.sampled_from(["/tmp/out.jsonl", "out", "/tmp/rnd/x"]),
            "records": st.lists(st.sampled_from(["alert", "health", "event", "x"]), max_size=3),
        },
    )
    doc = draw(
        st.fixed_dictionaries(
            {"watch": st.lists(watch, max_size=3)},
            optional={
                "rules": st.lists(text_value, max_size=2),
                "sinks": st.lists(sink, max_size=2),
                "state_dir": text_value,
                "source": st.sampled_from(["auto", "inotify", "kqueue"]),
                "queue_size": st.integers(-10, 10**7),
                "marker_name": st.sampled_from([".exfilwatch.yaml", "a/b", "..", ""]),
                "heartbeat_interval": durations,
                "rescan_max_entries": st.integers(-1, 10**6),
                "root_check_interval": durations,
                "rules_check_interval": durations,
                "inotify": st.fixed_dictionaries(
                    {},
                    optional={
                        "max_queued_events": st.integers(0, 2**40),
                        "max_user_watches": st.integers(0, 2**40),
                        "apply_sysctl": st.booleans(),
                    },
                ),
            },
        )
    )
    doc = draw(mutated(doc))
    text = dump_all([doc], draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        text = text.replace(
            draw(st.sampled_from(["/tmp", "true", "5m", "1000"])),
            draw(st.sampled_from(TEMPLATE_VALUES)),
            1,
        )
    return draw(corrupted(text))


@fuzz(40)
@given(text=config_doc())
# OverflowError: float(int) in parse_duration, from the config's duration()
@example(text="watch: [{path: /tmp}]\nheartbeat_interval: " + "9" * 400 + "\n")
# ValueError / AttributeError / ConstructorError from node_value in the config's scalar()
@example(text="watch:\n- path: 2024-13-45\n")
@example(text="watch:\n- path: !!float abc\n")
@example(text="watch: [{path: /tmp}]\nsinks: [{type: file, path: !!timestamp 2024-13-45/o}]\n")
@example(text="watch:\n- path: /\n  recursive: !custom x\n")
def test_config_shaped_documents_never_raise(text: str) -> None:
    check_config_text(text)


@st.composite
def marker_doc(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 3)) == 0:
        return "tags: " + draw(st.sampled_from(TEMPLATE_VALUES)) + "\nsensitivity: high\n"
    doc = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "tags": st.lists(text_value, max_size=3) | text_value,
                "sensitivity": st.sampled_from(["low", "high", "secret"]) | junk(),
                "owner": text_value | junk(),
                "description": text_value,
            },
        )
    )
    return draw(corrupted(dump_all([draw(mutated(doc))], draw(st.booleans()))))


@fuzz(40)
@given(text=marker_doc())
# found by this test: ValueError from node_value in parse_marker
@example(text="tags: 2024-13-45\nsensitivity: high\n")
# the same for other values a tag or the resolver cannot construct
@example(text="tags: !!int abc\n")
@example(text="tags: !!bool maybe\n")
@example(text="tags: {? [a]: b}\n")
@example(text="tags: {<<: 1}\n")
@example(text="tags: !!omap [a]\n")
@example(text="tags: &a [*a]\n")
@example(text="owner: " + "[" * 300 + "]" * 300 + "\n")
# ValueError from repr() of an int past the digit limit, in the MRK_VALUE message
@example(text="sensitivity: 0x" + "f" * 5000 + "\n")
def test_marker_shaped_documents_never_raise(text: str) -> None:
    check_marker_text(text)


@fuzz(10)
@given(data=st.binary(max_size=2000) | rule_stream().map(str.encode))
def test_rule_files_on_disk_never_raise(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz.yaml")
        with open(path, "wb") as fh:
            fh.write(data)
        ruleset, problems = load_rules([path], NOW)
        text = data.decode("utf-8", "replace")
        check_problems(problems, text, path, "rule")
        check_result(ruleset, problems)
        if ruleset is not None:
            run_engine(ruleset, [])


def test_the_shipped_rules_survive_the_engine_checks() -> None:
    """The properties hold for real rules too (the grammar above is a caricature of them)."""
    here = os.path.dirname(os.path.abspath(__file__))
    rules_dir = os.path.join(here, "..", "..", "rules")
    ruleset, problems = load_rules([rules_dir], NOW)
    assert ruleset is not None, [str(p) for p in problems]
    assert len(ruleset) > 0
    run_engine(ruleset, [])


def test_the_checks_notice_a_bad_problem() -> None:
    """A fuzz test whose checks check nothing passes forever."""
    bad = [
        Problem("other.yaml", 1, 1, "RULE_TYPE", "m"),
        Problem(FILE, 9, 1, "RULE_TYPE", "m"),
        Problem(FILE, 1, -1, "RULE_TYPE", "m"),
        Problem(FILE, 1, 1, "rule_type", "m"),
        Problem(FILE, 1, 1, "CFG_TYPE", "m"),
    ]
    for p in bad:
        try:
            check_problems([p], "a: 1\n", FILE, "rule")
        except AssertionError:
            continue
        raise AssertionError(f"not caught: {p}")
    assert _line_count("a\r\nb\rc\x85d\u2028e") == 5
