"""Rule files -> validated definitions, every problem located (`file:line:col CODE`)."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from agent.diagnostics import (
    ERROR,
    WARNING,
    Problem,
    at,
    check_permissions,
    compose_all,
    decode_utf8,
    nearest,
    node_value,
    unreadable,
    yaml_problem,
)
from agent.rules.model import (
    ATTACK_TACTICS,
    CORRELATION_TYPES,
    LEVELS,
    STATUSES,
    UNSUPPORTED_CORRELATION_TYPES,
    Correlation,
    Definitions,
    Override,
    Rule,
    RuleException,
    RuleTest,
    Suppress,
    Where,
    tactic_of,
)
from agent.units import parse_duration

MAX_RULE_FILE_BYTES = 2 << 20
RULE_SUFFIXES = (".yaml", ".yml")

_RULE_KEYS = (
    "id",
    "title",
    "description",
    "level",
    "status",
    "enabled",
    "author",
    "references",
    "tags",
    "detection",
    "correlation",
    "generate",
    "match_trusted",
    "watchlist",
    "name",
    "taxonomy",
    "scope",
    "exceptions",
    "suppress",
    "tests",
    # Sigma metadata we accept and keep out of the way.
    "date",
    "modified",
    "falsepositives",
    "logsource",
    "license",
    "related",
    "fields",
)
_CORRELATION_KEYS = ("type", "rules", "group-by", "timespan", "condition")
# Sigma's further correlation keys (a Sigma document only): `generate` (its rules alert by
# themselves too) and `aliases` (a group-by name standing for a field of each rule).
_SIGMA_CORRELATION_EXTRA = ("aliases", "generate")
_EXCEPTION_KEYS = ("match", "reason", "owner", "expires")
_SUPPRESS_KEYS = ("by", "for")
_TEST_KEYS = ("name", "event", "events", "expect")
_EXPECT_KEYS = ("match", "alerts", "alert")
_STEP_KEYS = ("at", "event", "repeat", "every")
MAX_TEST_REPEAT = 10_000
# Test events are stamped from a fixed instant; a later one could not be written as a date.
MAX_TEST_SECONDS = 10 * 366 * 86400
_OVERRIDE_KEYS = ("override", "enabled", "level", "exceptions", "correlation", "suppress")
_LIST_KEYS = ("list", "items", "description")
_MACRO_KEYS = ("macro", "detection", "description")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
_ATTACK_TECHNIQUE = re.compile(r"^attack\.t\d{4}(\.\d{3})?$")
_ATTACK_GROUP = re.compile(r"^attack\.(g|s)\d{4}$")


def rule_files(paths: Iterable[str]) -> tuple[list[str], list[Problem]]:
    """Expand files and directories (recursively, *.yaml / *.yml, sorted) into rule files."""
    files: list[str] = []
    problems: list[Problem] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                str(f) for f in Path(p).rglob("*") if f.suffix in RULE_SUFFIXES and f.is_file()
            )
            files.extend(f for f in found if not _is_schema(f))
        elif os.path.isfile(p):
            files.append(p)
        else:
            problems.append(Problem(p, 0, 0, "RULE_PATH_MISSING", "no such rule file or directory"))
    return files, problems


def _number(fields: dict[str, Any], i: int) -> dict[str, Any]:
    return {k: v.replace("{i}", str(i)) if isinstance(v, str) else v for k, v in fields.items()}


def _positive(value: object) -> float | None:
    """A finite number above zero as a float (a YAML int may be too large for one), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _is_schema(path: str) -> bool:
    return os.path.basename(path).endswith(".schema.yaml")


class _Reader:
    """Reads documents of one file into `Definitions`, collecting problems."""

    def __init__(self, defs: Definitions, problems: list[Problem], file: str) -> None:
        self.defs = defs
        self.problems = problems
        self.file = file
        self._sigma = False  # whether the rule document being read is a Sigma one

    def add(
        self, node: yaml.Node | None, code: str, msg: str, hint: str = "", severity: str = ERROR
    ) -> None:
        p = at(self.file, node, code, msg, hint)
        if severity != ERROR:
            p = Problem(p.file, p.line, p.col, p.code, p.message, p.hint, severity)
        self.problems.append(p)

    def where(self, node: yaml.Node) -> Where:
        return Where(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def mapping(
        self, node: yaml.Node, allowed: tuple[str, ...] | None, what: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.add(node, "RULE_TYPE", f"{what} must be a mapping")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.add(k, "RULE_TYPE", f"keys in {what} must be strings")
                continue
            if key in out:
                self.add(k, "RULE_DUPLICATE_KEY", f"'{key}' is given twice in {what}")
                continue
            if allowed is not None and key not in allowed:
                self.add(
                    k,
                    "RULE_UNKNOWN_KEY",
                    f"unknown key '{key}' in {what}",
                    nearest(key, allowed) or f"allowed: {', '.join(allowed)}",
                )
                continue
            out[key] = (k, v)
        return out

    def text(self, node: yaml.Node, what: str, required: bool = True) -> str | None:
        value = node_value(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or (required and not value.strip()):
            self.add(node, "RULE_TYPE", f"{what} must be a non-empty string")
            return None
        return value

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...] | None:
        if isinstance(node, yaml.ScalarNode) and isinstance(node_value(node), str):
            return (node_value(node),)
        if not isinstance(node, yaml.SequenceNode):
            self.add(node, "RULE_TYPE", f"{what} must be a list of strings")
            return None
        out = []
        for item in node.value:
            value = node_value(item) if isinstance(item, yaml.ScalarNode) else None
            if not isinstance(value, str) or not value:
                self.add(item, "RULE_TYPE", f"each entry of {what} must be a non-empty string")
                continue
            out.append(value)
        return tuple(out)

    def boolean(self, node: yaml.Node, what: str) -> bool | None:
        value = node_value(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, bool):
            self.add(node, "RULE_TYPE", f"{what} must be true or false")
            return None
        return value

    def duration(self, node: yaml.Node, what: str) -> float | None:
        value = node_value(node) if isinstance(node, yaml.ScalarNode) else None
        try:
            seconds = parse_duration(value)
        except (ValueError, OverflowError) as exc:  # OverflowError: an int past float range
            self.add(node, "RULE_DURATION", f"{what}: {exc}")
            return None
        if not math.isfinite(seconds):
            self.add(node, "RULE_DURATION", f"{what} must be a finite duration")
            return None
        if seconds <= 0:
            self.add(node, "RULE_DURATION", f"{what} must be longer than zero")
            return None
        return seconds

    def choice(self, node: yaml.Node, what: str, allowed: tuple[str, ...], code: str) -> str | None:
        """One of `allowed`, or a located problem with the nearest one as the hint."""
        value = self.text(node, what)
        if value is not None and value not in allowed:
            self.add(
                node,
                code,
                f"unknown {what} '{value}'",
                nearest(value, allowed) or f"one of {', '.join(allowed)}",
            )
            return None
        return value

    def level(self, node: yaml.Node) -> str | None:
        return self.choice(node, "level", LEVELS, "RULE_LEVEL")

    # documents ---------------------------------------------------------------------------

    def document(self, node: yaml.Node) -> None:
        unconstructable = unreadable(node, self.file, "RULE")
        if unconstructable:
            self.problems.extend(unconstructable)
            return
        if not isinstance(node, yaml.MappingNode):
            self.add(node, "RULE_TYPE", "a rule document must be a mapping")
            return
        keys = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
        if "list" in keys:
            self.list_doc(node)
        elif "macro" in keys:
            self.macro_doc(node)
        elif "override" in keys:
            self.override_doc(node)
        elif "detection" in keys or "correlation" in keys:
            self.rule_doc(node)
        elif "filter" in keys:
            self.filter_doc(node)
        else:
            self.add(
                node,
                "RULE_UNKNOWN_DOCUMENT",
                "a document must be a rule (detection or correlation), a list, a macro or an "
                "override",
                "add 'detection:' with selections and a condition",
            )

    def filter_doc(self, node: yaml.Node) -> None:
        """A Sigma filter: `filter: {rules: [...], <selections>, condition}` and a logsource;
        when it matches an event, the listed rules do not (a global exception)."""
        m = self.mapping(node, None, "a filter")
        if m is None:
            return
        body = self.mapping(m["filter"][1], None, "filter")
        if body is None:
            return
        if "rules" not in body:
            self.add(m["filter"][1], "RULE_REQUIRED", "a filter needs rules: [ids or names]")
            return
        targets = self.strings(body["rules"][1], "filter.rules")
        det = self.detection(
            yaml.MappingNode(
                "tag:yaml.org,2002:map",
                [(k, v) for name, (k, v) in body.items() if name != "rules"],
                m["filter"][1].start_mark,
                m["filter"][1].end_mark,
            )
        )
        logsource = self.logsource(m["logsource"][1]) if "logsource" in m else ()
        title = self.text(m["title"][1], "title") if "title" in m else "filter"
        if targets is None or det is None or logsource is None or title is None:
            return
        where = self.where(node)
        taxonomy = node_value(m["taxonomy"][1]) if "taxonomy" in m else None
        rule = Rule(
            id=f"filter-{hashlib.sha256(f'{self.file}:{where.line}'.encode()).hexdigest()[:12]}",
            title=title,
            description="",
            level="informational",
            where=where,
            detection=det[0],
            condition=det[1],
            condition_node=det[2],
            logsource=logsource,
            sigma=True,
            inactive=None if taxonomy in (None, "sigma", "ecs") else f"taxonomy {taxonomy!r}",
        )
        self.defs.filters.append((rule, targets))

    def list_doc(self, node: yaml.Node) -> None:
        m = self.mapping(node, _LIST_KEYS, "a list")
        if m is None:
            return
        name = self.text(m["list"][1], "list") if "list" in m else None
        if name is not None and not _NAME.match(name):
            self.add(m["list"][1], "RULE_NAME", f"bad list name '{name}'", "letters, digits, _")
            name = None
        if "items" not in m:
            self.add(node, "RULE_REQUIRED", "a list needs 'items'")
            return
        items = self.strings(m["items"][1], "items")
        if name is None or items is None:
            return
        if name in self.defs.lists:
            self.add(m["list"][1], "RULE_DUPLICATE_LIST", f"list '{name}' is defined twice")
            return
        self.defs.lists[name] = items

    def macro_doc(self, node: yaml.Node) -> None:
        m = self.mapping(node, _MACRO_KEYS, "a macro")
        if m is None:
            return
        name = self.text(m["macro"][1], "macro")
        if name is not None and not _NAME.match(name):
            self.add(m["macro"][1], "RULE_NAME", f"bad macro name '{name}'", "letters, digits, _")
            return
        if "detection" not in m:
            self.add(node, "RULE_REQUIRED", "a macro needs 'detection' (one selection)")
            return
        if name is None:
            return
        if name in self.defs.macros:
            self.add(m["macro"][1], "RULE_DUPLICATE_MACRO", f"macro '{name}' is defined twice")
            return
        body = m["detection"][1]
        self.defs.macros[name] = (body, self.where(body))

    def exceptions(self, node: yaml.Node, what: str) -> tuple[RuleException, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.add(node, "RULE_TYPE", f"{what} must be a list of {{match, reason, owner}}")
            return None
        out = []
        for item in node.value:
            m = self.mapping(item, _EXCEPTION_KEYS, "an exception")
            if m is None:
                continue
            missing = [k for k in ("match", "reason", "owner") if k not in m]
            if missing:
                self.add(
                    item,
                    "RULE_EXCEPTION_INCOMPLETE",
                    f"an exception needs {', '.join(missing)}",
                    "every allow-list entry says what, why and who",
                )
                continue
            reason = self.text(m["reason"][1], "reason")
            owner = self.text(m["owner"][1], "owner")
            match_node = m["match"][1]
            if not isinstance(match_node, yaml.MappingNode):
                self.add(match_node, "RULE_TYPE", "exception 'match' must be a selection map")
                continue
            expires_us = None
            if "expires" in m:
                expires_us = self.expiry(m["expires"][1])
                if expires_us is None:
                    continue
            if reason is None or owner is None:
                continue
            out.append(RuleException(match_node, reason, owner, expires_us, self.where(item)))
        return tuple(out)

    def expiry(self, node: yaml.Node) -> int | None:
        value = node_value(node) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, datetime):
            dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        elif isinstance(value, date):
            dt = datetime(value.year, value.month, value.day, tzinfo=UTC)
        else:
            self.add(node, "RULE_EXPIRES", "expires must be a date (YYYY-MM-DD)", "2027-01-31")
            return None
        return int(dt.timestamp()) * 1_000_000

    def suppress(self, node: yaml.Node) -> Suppress | None:
        m = self.mapping(node, _SUPPRESS_KEYS, "suppress")
        if m is None:
            return None
        if "for" not in m:
            self.add(node, "RULE_REQUIRED", "suppress needs 'for' (a duration)")
            return None
        seconds = self.duration(m["for"][1], "suppress.for")
        by = self.strings(m["by"][1], "suppress.by") if "by" in m else ()
        if seconds is None or by is None:
            return None
        return Suppress(by, seconds)

    def correlation(self, node: yaml.Node) -> Correlation | None:
        m = self.mapping(
            node,
            (*_CORRELATION_KEYS, *_SIGMA_CORRELATION_EXTRA) if self._sigma else _CORRELATION_KEYS,
            "correlation",
        )
        if m is None:
            return None
        missing = [k for k in ("type", "rules", "timespan") if k not in m]
        if missing:
            self.add(node, "RULE_REQUIRED", f"correlation needs {', '.join(missing)}")
            return None
        raw_type = node_value(m["type"][1]) if isinstance(m["type"][1], yaml.ScalarNode) else None
        unsupported = None
        if raw_type in UNSUPPORTED_CORRELATION_TYPES:
            unsupported = f"correlation type {raw_type}: not evaluated by the agent"
            kind: str | None = raw_type
        else:
            kind = self.choice(
                m["type"][1], "correlation type", CORRELATION_TYPES, "RULE_CORRELATION_TYPE"
            )
        rules = self.strings(m["rules"][1], "correlation.rules")
        group_by = self.strings(m["group-by"][1], "group-by") if "group-by" in m else ()
        timespan = self.duration(m["timespan"][1], "correlation.timespan")
        gte: float | None = None
        fld: str | None = None
        strict = False
        if kind == "temporal" and rules is not None:
            gte = float(len(set(rules)))  # every listed rule, in any order
        if kind in ("event_count", "value_count", "value_sum") or (
            unsupported and "condition" in m
        ):
            if "condition" not in m:
                self.add(node, "RULE_REQUIRED", f"a {kind} correlation needs a condition")
                return None
            cond = self.mapping(
                m["condition"][1],
                ("gte", "gt", "lte", "lt", "eq", "neq", "field"),
                "correlation.condition",
            )
            if cond is None:
                return None
            bounds = [k for k in ("gte", "gt", "lte", "lt", "eq", "neq") if k in cond]
            if not bounds:
                self.add(m["condition"][1], "RULE_REQUIRED", "condition needs gte: N (or gt)")
                return None
            if set(bounds) - {"gte", "gt"} or len(bounds) > 1:
                # A correlation is checked as its events arrive: "at least" thresholds only.
                unsupported = unsupported or (
                    f"correlation condition {', '.join(bounds)}: the agent evaluates "
                    "correlations as events arrive, so only one gte or gt threshold"
                )
            bound_key = "gte" if "gte" in cond else bounds[0]
            gte = _positive(node_value(cond[bound_key][1]))
            strict = bound_key == "gt"
            if gte is None and bound_key == "gt" and node_value(cond["gt"][1]) == 0:
                gte = 0.0
            if gte is None and unsupported is None:
                self.add(cond[bound_key][1], "RULE_TYPE", f"{bound_key} must be a positive number")
                return None
            if kind != "event_count" and unsupported is None:
                if "field" not in cond:
                    self.add(m["condition"][1], "RULE_REQUIRED", f"a {kind} needs field:")
                    return None
                fld = self.text(cond["field"][1], "condition.field")
        elif kind in ("temporal", "temporal_ordered") and "condition" in m:
            self.add(m["condition"][1], "RULE_UNUSED_KEY", f"{kind} takes no condition")
        if kind in ("temporal", "temporal_ordered") and rules is not None and len(rules) < 2:
            self.add(m["rules"][1], "RULE_VALUE", f"{kind} needs at least two rules")
            return None
        aliases = self.aliases(m["aliases"][1]) if "aliases" in m else ()
        if kind is None or rules is None or group_by is None or timespan is None:
            return None
        if aliases is None:
            return None
        if unsupported is not None and not self._sigma:
            # A native rule is told, not loaded inactive: it was written for this agent.
            self.add(m["type"][1], "RULE_VALUE", unsupported, "use gte: N (or gt: N)")
            return None
        generate = False
        if "generate" in m:
            generate = self.boolean(m["generate"][1], "correlation.generate") or False
        return Correlation(
            kind, rules, group_by, timespan, gte, fld, strict, unsupported, generate, aliases
        )

    def aliases(
        self, node: yaml.Node
    ) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...] | None:
        """`aliases: {name: {rule: field, ...}, ...}` (a rule by id or name)."""
        m = self.mapping(node, None, "correlation.aliases")
        if m is None:
            return None
        out = []
        for name, (_, value) in m.items():
            per_rule = self.mapping(value, None, f"alias {name}")
            if per_rule is None:
                return None
            fields = []
            for rule, (_, field_node) in per_rule.items():
                field_ = self.text(field_node, f"alias {name}: field of {rule}")
                if field_ is None:
                    return None
                fields.append((rule, field_))
            out.append((name, tuple(fields)))
        return tuple(out)

    def tests(self, node: yaml.Node) -> tuple[RuleTest, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.add(node, "RULE_TYPE", "tests must be a list")
            return None
        out = []
        for item in node.value:
            m = self.mapping(item, _TEST_KEYS, "a test")
            if m is None:
                continue
            name = self.text(m["name"][1], "test name") if "name" in m else None
            if name is None:
                if "name" not in m:
                    self.add(item, "RULE_REQUIRED", "a test needs a name")
                continue
            steps: list[tuple[float, dict[str, Any]]] = []
            if "event" in m and "events" in m:
                self.add(item, "RULE_TEST", "a test has 'event' or 'events', not both")
                continue
            if "event" in m:
                ev = self.flat_event(m["event"][1])
                if ev is None:
                    continue
                steps.append((0.0, ev))
            elif "events" in m:
                seq = m["events"][1]
                if not isinstance(seq, yaml.SequenceNode) or not seq.value:
                    self.add(seq, "RULE_TYPE", "events must be a non-empty list of {at, event}")
                    continue
                ok = True
                for step in seq.value:
                    sm = self.mapping(step, _STEP_KEYS, "a test step")
                    if sm is None or "event" not in sm:
                        if sm is not None:
                            self.add(step, "RULE_REQUIRED", "a test step needs 'event'")
                        ok = False
                        continue
                    t = self.duration_or_zero(sm["at"][1]) if "at" in sm else 0.0
                    ev = self.flat_event(sm["event"][1])
                    repeat, every = 1, 0.0
                    if "repeat" in sm:
                        r = node_value(sm["repeat"][1])
                        if (
                            isinstance(r, bool)
                            or not isinstance(r, int)
                            or not 1 <= r <= MAX_TEST_REPEAT
                        ):
                            self.add(
                                sm["repeat"][1], "RULE_TYPE", f"repeat is 1..{MAX_TEST_REPEAT}"
                            )
                            ok = False
                            continue
                        repeat = r
                    if "every" in sm:
                        e = self.duration_or_zero(sm["every"][1])
                        if e is None:
                            ok = False
                            continue
                        every = e
                    if t is None or ev is None:
                        ok = False
                        continue
                    # `{i}` in a string value becomes the repetition's index (0, 1, ...).
                    for i in range(repeat):
                        steps.append((t + i * every, _number(ev, i) if repeat > 1 else ev))
                if not ok:
                    continue
            else:
                self.add(item, "RULE_REQUIRED", "a test needs 'event' or 'events'")
                continue
            if "expect" not in m:
                self.add(item, "RULE_REQUIRED", "a test needs 'expect' (match or no_match)")
                continue
            if steps and max(t for t, _ in steps) > MAX_TEST_SECONDS:
                self.add(item, "RULE_TEST", "a test's events span more than ten years")
                continue
            expect = self.expect(m["expect"][1])
            if expect is None:
                continue
            out.append(RuleTest(name, tuple(steps), expect[0], expect[1], self.where(item)))
        return tuple(out)

    def duration_or_zero(self, node: yaml.Node) -> float | None:
        value = node_value(node) if isinstance(node, yaml.ScalarNode) else None
        if value in (0, "0", "0s"):
            return 0.0
        return self.duration(node, "at")

    def flat_event(self, node: yaml.Node) -> dict[str, Any] | None:
        if not isinstance(node, yaml.MappingNode):
            self.add(node, "RULE_TYPE", "a test event is a map of dotted field names")
            return None
        value = node_value(node)
        from agent.events import FIELDS, SETTABLE

        ok = True
        for k, _v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            if name not in SETTABLE:
                derived = name in FIELDS
                self.add(
                    k,
                    "RULE_TEST_FIELD",
                    f"{name} is derived from file.path / event.action"
                    if derived
                    else f"unknown event field '{name}'",
                    "" if derived else nearest(str(name), SETTABLE),
                )
                ok = False
        return value if ok and isinstance(value, dict) else None

    def expect(self, node: yaml.Node) -> tuple[int, dict[str, Any]] | None:
        if isinstance(node, yaml.ScalarNode):
            value = node_value(node)
            if value in ("match", "no_match"):
                return (1 if value == "match" else 0), {}
            self.add(node, "RULE_TEST", "expect is match, no_match, or {alerts: N, alert: {...}}")
            return None
        m = self.mapping(node, _EXPECT_KEYS, "expect")
        if m is None:
            return None
        alerts = 1
        if "alerts" in m:
            v = node_value(m["alerts"][1])
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                self.add(m["alerts"][1], "RULE_TYPE", "alerts must be a count")
                return None
            alerts = v
        elif "match" in m:
            v = node_value(m["match"][1])
            if not isinstance(v, bool):
                self.add(m["match"][1], "RULE_TYPE", "match must be true or false")
                return None
            alerts = 1 if v else 0
        fields: dict[str, Any] = {}
        if "alert" in m:
            fv = node_value(m["alert"][1])
            if not isinstance(fv, dict):
                self.add(m["alert"][1], "RULE_TYPE", "alert is a map of dotted alert fields")
                return None
            fields = fv
        return alerts, fields

    def override_doc(self, node: yaml.Node) -> None:
        m = self.mapping(node, _OVERRIDE_KEYS, "an override")
        if m is None:
            return
        target = self.text(m["override"][1], "override")
        kw: dict[str, Any] = {}
        ok = target is not None
        if "enabled" in m:
            kw["enabled"] = self.boolean(m["enabled"][1], "enabled")
        if "level" in m:
            kw["level"] = self.level(m["level"][1])
        if "exceptions" in m:
            kw["exceptions"] = self.exceptions(m["exceptions"][1], "exceptions")
        if "suppress" in m:
            kw["suppress"] = self.suppress(m["suppress"][1])
        if "correlation" in m:
            cm = self.mapping(
                m["correlation"][1], ("timespan", "condition"), "override correlation"
            )
            if cm is None:
                ok = False
            else:
                if "timespan" in cm:
                    kw["timespan"] = self.duration(cm["timespan"][1], "timespan")
                if "condition" in cm:
                    cond = self.mapping(cm["condition"][1], ("gte",), "condition")
                    if cond is None or "gte" not in cond:
                        if cond is not None:
                            self.add(cm["condition"][1], "RULE_REQUIRED", "condition needs gte: N")
                        ok = False
                    else:
                        gte = _positive(node_value(cond["gte"][1]))
                        if gte is None:
                            self.add(cond["gte"][1], "RULE_TYPE", "gte must be a positive number")
                            ok = False
                        else:
                            kw["gte"] = gte
        if any(v is None for v in kw.values()) or not ok or target is None:
            return
        if len(m) == 1:
            self.add(node, "RULE_OVERRIDE_EMPTY", "this override changes nothing", severity=WARNING)
        self.defs.overrides.append(Override(target, self.where(node), **kw))

    def tags(self, node: yaml.Node) -> tuple[str, ...] | None:
        tags = self.strings(node, "tags")
        if tags is None:
            return None
        for item, tag in zip(
            node.value if isinstance(node, yaml.SequenceNode) else [node], tags, strict=False
        ):
            if not tag.startswith("attack."):
                continue
            name = tag[7:]
            if _ATTACK_TECHNIQUE.match(tag) or _ATTACK_GROUP.match(tag) or tactic_of(tag):
                continue
            hint = nearest(name.replace("-", "_"), ATTACK_TACTICS)
            self.add(
                item,
                "RULE_ATTACK_TAG",
                f"malformed ATT&CK tag '{tag}'",
                hint.replace("'", "'attack.", 1)
                if hint
                else "attack.t1052.001 or attack.exfiltration",
            )
        return tags

    def rule_doc(self, node: yaml.Node) -> None:
        sigma = self._sigma = _is_sigma(node)
        # A Sigma rule may carry the spec's optional keys and any custom ones: kept out of
        # the way. A native rule's unknown key is a typo until proven otherwise.
        m = self.mapping(node, None if sigma else _RULE_KEYS, "a rule")
        if m is None:
            return
        if sigma:
            # Sigma's `scope` is the kind of machine a rule is for (server, workstation):
            # kept out of the way like its other metadata, never a watchlist.
            m = {k: v for k, v in m.items() if k in _RULE_KEYS and k != "scope"}
            sigma_name = self.text(m["name"][1], "name") if "name" in m else None
            taxonomy = node_value(m["taxonomy"][1]) if "taxonomy" in m else None
            if "id" not in m and (sigma_name or "title" in m):
                derived = sigma_name or _derived_id(self.file, node, m)
                m["id"] = (node, yaml.ScalarNode("tag:yaml.org,2002:str", derived))
            if "level" not in m:
                m["level"] = (node, yaml.ScalarNode("tag:yaml.org,2002:str", "medium"))
                if not {"logsource", "taxonomy", "name"} & set(m):
                    # Only the missing level made it Sigma: a native rule that forgot it
                    # should hear that its unknown keys are now passed over.
                    self.add(
                        node,
                        "RULE_READ_AS_SIGMA",
                        "no level: read as a Sigma document (level medium, unknown keys ignored)",
                        "give level: (informational ... critical) to have it checked as a "
                        "native rule",
                        severity=WARNING,
                    )
        elif "scope" in m:
            key_node, value_node = m.pop("scope")
            if "watchlist" in m:
                self.add(key_node, "RULE_VALUE", "give watchlist or scope, not both")
            else:
                self.add(
                    key_node,
                    "RULE_DEPRECATED_KEY",
                    "'scope' (the watchlist statuses a rule is limited to) is now 'watchlist'",
                    "rename it: watchlist: [departing] (Sigma uses scope for machine kinds)",
                    severity=WARNING,
                )
                m["watchlist"] = (key_node, value_node)
        required = ["id", "title", "level"]
        m.pop("name", None)
        m.pop("taxonomy", None)
        missing = [k for k in required if k not in m]
        if "detection" in m and "correlation" in m:
            self.add(m["correlation"][0], "RULE_VALUE", "a rule has detection or correlation")
            return
        if missing:
            self.add(node, "RULE_REQUIRED", f"a rule needs {', '.join(missing)}")
        rid = self.text(m["id"][1], "id") if "id" in m else None
        if rid is not None and not _ID.match(rid):
            self.add(m["id"][1], "RULE_ID", f"bad rule id '{rid}'", "letters, digits, . _ -")
            rid = None
        title = self.text(m["title"][1], "title") if "title" in m else None
        level = self.level(m["level"][1]) if "level" in m else None
        kw: dict[str, Any] = {}
        ok = rid is not None and title is not None and level is not None
        if "description" in m:
            kw["description"] = self.text(m["description"][1], "description") or ""
        if "status" in m:
            status = self.choice(m["status"][1], "status", STATUSES, "RULE_STATUS")
            if status is None:
                ok = False
            else:
                kw["status"] = status
        for key, parse in (
            ("enabled", lambda n: self.boolean(n, "enabled")),
            ("generate", lambda n: self.boolean(n, "generate")),
            ("match_trusted", lambda n: self.boolean(n, "match_trusted")),
            ("logsource", self.logsource),
            ("author", lambda n: self.text(n, "author")),
            ("references", lambda n: self.strings(n, "references")),
            ("tags", self.tags),
            ("watchlist", lambda n: self.strings(n, "watchlist")),
            ("exceptions", lambda n: self.exceptions(n, "exceptions")),
            ("suppress", self.suppress),
            ("tests", self.tests),
            ("correlation", self.correlation),
        ):
            if key in m:
                value = parse(m[key][1])
                if value is None:
                    ok = False
                else:
                    kw["scope" if key == "watchlist" else key] = value
        if "detection" in m:
            det = self.detection(m["detection"][1])
            if det is None:
                ok = False
            else:
                kw["detection"], kw["condition"], kw["condition_node"] = det
        if not ok or rid is None or title is None or level is None:
            if "detection" in kw:
                self.defs.check_only.append(
                    Rule(
                        id=rid or "<invalid>",
                        title=title or "",
                        description="",
                        level=level or "low",
                        where=self.where(node),
                        detection=kw["detection"],
                        condition=kw["condition"],
                        condition_node=kw["condition_node"],
                    )
                )
            return
        if sigma and taxonomy not in (None, "sigma") and rid is not None:
            rid = f"{rid}@{taxonomy}"  # the same rule written for another taxonomy
        if rid in self.defs.rules:
            first = self.defs.rules[rid].where
            self.add(
                m["id"][1],
                "RULE_DUPLICATE_ID",
                f"rule id '{rid}' is already used at {first.file}:{first.line}",
                "ids are stable and unique; to change a shipped rule use an override",
            )
            return
        if sigma:
            kw["sigma"] = True
            kw["name"] = sigma_name
            if taxonomy not in (None, "sigma", "ecs"):  # ecs names are the agent's own
                kw["inactive"] = f"taxonomy {taxonomy!r}: the agent reads sigma and ecs names"
        self.defs.rules[rid] = Rule(
            id=rid,
            title=title,
            description=kw.pop("description", ""),
            level=level,
            where=self.where(node),
            **kw,
        )

    def logsource(self, node: yaml.Node) -> tuple[tuple[str, str], ...] | None:
        m = self.mapping(node, None, "logsource")
        if m is None:
            return None
        out = []
        for key, (_, value_node) in m.items():
            value = node_value(value_node) if isinstance(value_node, yaml.ScalarNode) else None
            if not isinstance(value, str) or not value:
                self.add(value_node, "RULE_TYPE", f"logsource.{key} must be a non-empty string")
                return None
            out.append((key, value))
        return tuple(out)

    def detection(self, node: yaml.Node) -> tuple[dict[str, Any], str, yaml.Node] | None:
        m = self.mapping(node, None, "detection")
        if m is None:
            return None
        if "condition" not in m:
            self.add(node, "RULE_REQUIRED", "detection needs a condition", "condition: selection")
            return None
        cond_node = m["condition"][1]
        cond: str | None
        if isinstance(cond_node, yaml.SequenceNode):
            # Sigma: a list of conditions, each a query of its own: any of them matches.
            parts = [self.text(item, "condition") for item in cond_node.value]
            if not parts or any(p is None for p in parts):
                if not parts:
                    self.add(cond_node, "RULE_TYPE", "condition must be a non-empty string")
                return None
            cond = " or ".join(f"({p})" for p in parts if p is not None)
        else:
            cond = self.text(cond_node, "condition")
        selections: dict[str, Any] = {}
        for name, (key_node, value_node) in m.items():
            if name == "condition":
                continue
            if not _NAME.match(name):
                self.add(key_node, "RULE_NAME", f"bad selection name '{name}'")
                continue
            selections[name] = value_node
        if cond is None:
            return None
        return selections, cond, m["condition"][1]


def _derived_id(file: str, node: yaml.Node, m: dict[str, tuple[yaml.Node, yaml.Node]]) -> str:
    """A stable id for a Sigma rule given none: its title and where it is defined."""
    title = node_value(m["title"][1]) if "title" in m else ""
    digest = hashlib.sha256(f"{file}:{node.start_mark.line}:{title}".encode()).hexdigest()
    return f"sigma-{digest[:16]}"


def _is_sigma(node: yaml.Node) -> bool:
    """A Sigma document: one with a key only Sigma has (`logsource`, `taxonomy`, `name`), or
    without `level`, which every native rule gives (Sigma makes it optional)."""
    if not isinstance(node, yaml.MappingNode):
        return False
    keys = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return bool(keys & {"logsource", "taxonomy", "name"}) or "level" not in keys


def read_file(path: str, defs: Definitions, problems: list[Problem]) -> None:
    perm = check_permissions(path, "RULE")
    problems.extend(perm)
    if any(p.code == "RULE_UNREADABLE" for p in perm):
        return
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_RULE_FILE_BYTES + 1)
    except OSError as exc:
        problems.append(Problem(path, 0, 0, "RULE_UNREADABLE", exc.strerror or str(exc)))
        return
    if len(data) > MAX_RULE_FILE_BYTES:
        problems.append(Problem(path, 0, 0, "RULE_TOO_LARGE", "rule file is larger than 2 MiB"))
        return
    text, bad = decode_utf8(data, path, "RULE")
    if text is None:
        problems.extend(bad)
        return
    defs.files.append(path)
    reader = _Reader(defs, problems, path)
    try:
        for doc in compose_all(text):
            if doc is None:
                continue
            reader.document(doc)
    except yaml.YAMLError as exc:
        problems.append(yaml_problem(path, "RULE_YAML_PARSE", exc, text))
    except RecursionError:
        problems.append(Problem(path, 0, 0, "RULE_YAML_PARSE", "nesting too deep"))


def read_paths(paths: Sequence[str]) -> tuple[Definitions, list[Problem]]:
    files, problems = rule_files(paths)
    defs = Definitions()
    for f in files:
        read_file(f, defs, problems)
    return defs, problems


def read_text(text: str, file: str = "<rules>") -> tuple[Definitions, list[Problem]]:
    """For tests and tools: rules from a string, as if read from `file`."""
    defs = Definitions()
    problems: list[Problem] = []
    reader = _Reader(defs, problems, file)
    try:
        for doc in compose_all(text):
            if doc is not None:
                reader.document(doc)
    except yaml.YAMLError as exc:
        problems.append(yaml_problem(file, "RULE_YAML_PARSE", exc, text))
    except RecursionError:
        problems.append(Problem(file, 0, 0, "RULE_YAML_PARSE", "nesting too deep"))
    defs.files.append(file)
    return defs, problems


__all__ = ["WARNING", "read_file", "read_paths", "read_text", "rule_files"]
