"""Definitions -> a compiled, indexed rule set (closures, no eval), with located problems."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from agent.diagnostics import ERROR, WARNING, Problem, at, errors_only, nearest, node_value
from agent.events import FIELDS, Event
from agent.rules.condition import (
    AllOf,
    And,
    ConditionError,
    Node,
    Not,
    OneOf,
    Or,
    Ref,
    compile_condition,
    describe,
    every_of,
    expand,
    parse_condition,
    referenced,
    required_values,
    some_of,
)
from agent.rules.loader import read_paths, read_text
from agent.rules.matchers import MatcherError, compile_field
from agent.rules.model import Definitions, Override, Rule, RuleException

Predicate = Callable[[Event], bool]


# The engine indexes rules by the values of these fields a rule requires (event.action, and
# the location class: a rule about removable media is never tried on a tagged-tree write).
ACTION = "event.action"
LOCATION = "exfilwatch.location.class"


@dataclass(frozen=True)
class Selection:
    match: Predicate
    actions: frozenset[str] | None  # event.action values it can match (None: any)
    locations: frozenset[str] | None = None  # location classes it can match (None: any)


@dataclass
class CompiledRule:
    rule: Rule
    match: Predicate
    actions: frozenset[str] | None
    exceptions: tuple[tuple[Predicate, int | None, RuleException], ...]
    scope: frozenset[str]
    generate: bool
    fingerprint: str
    condition_text: str = ""
    locations: frozenset[str] | None = None  # location classes it can match (None: any)
    id: str = field(init=False)  # the rule's id, an attribute: read for every match

    def __post_init__(self) -> None:
        self.id = self.rule.id


@dataclass
class RuleSet:
    """The compiled rules. `single` evaluate one event; `correlations` aggregate base rules."""

    rules: dict[str, CompiledRule] = field(default_factory=dict)
    correlations: dict[str, CompiledRule] = field(default_factory=dict)
    consumers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    disabled: dict[str, Rule] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.rules) + len(self.correlations)


class _Compiler:
    def __init__(self, defs: Definitions, problems: list[Problem], now_us: int) -> None:
        self.defs = defs
        self.problems = problems
        self.now_us = now_us
        self.macros: dict[str, Selection] = {}

    def add(
        self,
        file: str,
        node: yaml.Node | None,
        code: str,
        msg: str,
        hint: str = "",
        *,
        severity: str = ERROR,
    ) -> None:
        p = at(file, node, code, msg, hint)
        if severity != ERROR:
            p = Problem(p.file, p.line, p.col, p.code, p.message, p.hint, severity)
        self.problems.append(p)

    def selection(self, file: str, node: yaml.Node) -> Selection | None:
        """A map is AND of its fields; a list of maps is OR of them."""
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                self.add(file, node, "RULE_EMPTY_SELECTION", "an empty list matches nothing")
                return None
            if not all(isinstance(item, yaml.MappingNode) for item in node.value):
                self.add(
                    file,
                    node,
                    "RULE_KEYWORDS_UNSUPPORTED",
                    "keyword lists (free text over all fields) are not supported",
                    "name the field: file.path|contains: ...",
                )
                return None
            parts = [self.selection(file, item) for item in node.value]
            found = [p for p in parts if p is not None]
            if len(found) != len(parts):
                return None
            preds = tuple(p.match for p in found)
            union: frozenset[str] | None = frozenset()
            places: frozenset[str] | None = frozenset()
            for p in found:
                union = None if union is None or p.actions is None else union | p.actions
                places = None if places is None or p.locations is None else places | p.locations
            return Selection(preds[0] if len(preds) == 1 else some_of(preds), union, places)
        if not isinstance(node, yaml.MappingNode):
            self.add(
                file,
                node,
                "RULE_KEYWORDS_UNSUPPORTED",
                "a selection is a map of fields (or a list of such maps)",
                "name the field: file.path|contains: ...",
            )
            return None
        if not node.value:
            self.add(file, node, "RULE_EMPTY_SELECTION", "an empty selection matches everything")
            return None
        matchers = []
        actions: frozenset[str] | None = None
        locations: frozenset[str] | None = None
        ok = True
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.add(file, key_node, "RULE_TYPE", "selection keys must be field names")
                ok = False
                continue
            try:
                m = compile_field(key, node_value(value_node), lists=self.defs.lists)
            except MatcherError as exc:
                self.add(file, key_node, exc.code, exc.message, exc.hint)
                ok = False
                continue
            matchers.append(m)
            if m.field == ACTION and m.equals is not None:
                actions = m.equals if actions is None else actions & m.equals
            elif m.field == LOCATION and m.equals is not None:
                locations = m.equals if locations is None else locations & m.equals
        if not ok:
            return None
        if len(matchers) == 1:
            return Selection(matchers[0], actions, locations)
        # The index already chose the rule by action and location: those tests pass for
        # nearly every event tried, so the fields that can fail are tried first.
        ms = tuple(sorted(matchers, key=lambda m: m.field in (ACTION, LOCATION)))
        return Selection(every_of(ms), actions, locations)

    def compile_macros(self) -> None:
        for name, (node, where) in self.defs.macros.items():
            sel = self.selection(where.file, node)
            if sel is not None:
                self.macros[name] = sel

    def condition(
        self, rule: Rule, selections: dict[str, Selection]
    ) -> tuple[Predicate, frozenset[str] | None, frozenset[str] | None, str] | None:
        file = rule.where.file
        assert rule.detection is not None and rule.condition is not None
        cond_node = rule.condition_node
        try:
            tree = parse_condition(rule.condition)
            tree = _expand_patterns(tree, list(rule.detection))
            tree = expand(tree, [*rule.detection, *self.macros])
        except ConditionError as exc:
            p = at(file, cond_node, exc.code, exc.message, exc.hint)
            if isinstance(cond_node, yaml.ScalarNode) and cond_node.style in (None, "'", '"'):
                # Point at the offending token (exact for plain and simply quoted scalars).
                p = replace(p, col=p.col + exc.offset + (1 if cond_node.style else 0))
            self.problems.append(p)
            return None
        used = referenced(tree)
        for name, node in rule.detection.items():
            if name not in used:
                self.add(
                    file,
                    node,
                    "RULE_UNUSED_SELECTION",
                    f"selection '{name}' is not used by the condition",
                    "use it in the condition or remove it",
                )
        preds: dict[str, Predicate] = {}
        constraints: dict[str, frozenset[str] | None] = {}
        places: dict[str, frozenset[str] | None] = {}
        for name in used:
            sel = selections.get(name) or self.macros.get(name)
            if sel is None:
                return None  # its own problem was reported already
            preds[name] = sel.match
            constraints[name] = sel.actions
            places[name] = sel.locations
        return (
            compile_condition(_locals_first(tree, frozenset(rule.detection)), preds),
            required_values(tree, constraints),
            required_values(tree, places),
            describe(tree),
        )

    def rule(self, rule: Rule, generate: bool) -> CompiledRule | None:
        file = rule.where.file
        match: Predicate
        actions: frozenset[str] | None = None
        locations: frozenset[str] | None = None
        text = ""
        if rule.detection is not None:
            selections: dict[str, Selection] = {}
            ok = True
            for name, node in rule.detection.items():
                if name in self.macros:
                    self.add(
                        file,
                        node,
                        "RULE_NAME_SHADOWS_MACRO",
                        f"selection '{name}' has the name of a macro",
                        "rename the selection",
                    )
                    ok = False
                    continue
                sel = self.selection(file, node)
                if sel is None:
                    ok = False
                else:
                    selections[name] = sel
            compiled = self.condition(rule, selections)
            if compiled is None or not ok:
                return None
            match, actions, locations, text = compiled
        else:
            match = _never
        exceptions = []
        for exc in rule.exceptions:
            sel = self.selection(exc.where.file, exc.match)
            if sel is None:
                return None
            if exc.expires_us is not None and exc.expires_us <= self.now_us:
                self.add(
                    exc.where.file,
                    None,
                    "RULE_EXCEPTION_EXPIRED",
                    f"exception for rule '{rule.id}' (owner {exc.owner}) has expired and no "
                    "longer applies",
                    "renew 'expires' or remove the entry",
                    severity=WARNING,
                )
                self.problems[-1] = replace(
                    self.problems[-1], line=exc.where.line, col=exc.where.col
                )
            exceptions.append((sel.match, exc.expires_us, exc))
        if rule.suppress is not None:
            for f in rule.suppress.by:
                if f not in FIELDS:
                    self.add(
                        file,
                        None,
                        "RULE_UNKNOWN_FIELD",
                        f"suppress.by: unknown field '{f}'",
                        nearest(f, FIELDS),
                    )
                    self.problems[-1] = replace(self.problems[-1], line=rule.where.line)
                    return None
        return CompiledRule(
            rule,
            match,
            actions,
            tuple(exceptions),
            frozenset(rule.scope),
            generate,
            fingerprint(rule),
            text,
            locations,
        )


def _locals_first(node: Node, local: frozenset[str]) -> Node:
    """The same condition, with the rule's own selections tried before macros in each `and`
    (a macro such as file_landed or tagged_content holds for most events a rule is tried on;
    the rule's own selection is what usually fails). Predicates are pure: order is free."""
    match node:
        case And(operands=operands):
            parts = tuple(_locals_first(o, local) for o in operands)
            return And(
                tuple(sorted(parts, key=lambda o: not (isinstance(o, Ref) and o.name in local)))
            )
        case Or(operands=operands):
            return Or(tuple(_locals_first(o, local) for o in operands))
        case Not(operand=operand):
            return Not(_locals_first(operand, local))
        case _:
            return node


def _never(event: Event) -> bool:
    return False


def _expand_patterns(node: Node, local: Sequence[str]) -> Node:
    """`1 of x*` / `all of them` range over the rule's own selections, never macros."""
    if isinstance(node, OneOf | AllOf):
        return expand(node, local)
    if isinstance(node, Not):
        return Not(_expand_patterns(node.operand, local))
    if isinstance(node, And):
        return And(tuple(_expand_patterns(n, local) for n in node.operands))
    if isinstance(node, Or):
        return Or(tuple(_expand_patterns(n, local) for n in node.operands))
    return node


def fingerprint(rule: Rule) -> str:
    """Stable hash of what a rule does (state survives a reload when it is unchanged)."""

    def plain(value: Any) -> Any:
        if isinstance(value, yaml.Node):
            return node_value(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if hasattr(value, "__dataclass_fields__"):
            return {k: plain(getattr(value, k)) for k in value.__dataclass_fields__ if k != "where"}
        return value

    body = {
        "detection": plain(rule.detection),
        "condition": rule.condition,
        "correlation": plain(rule.correlation),
        "scope": list(rule.scope),
        "match_trusted": rule.match_trusted,
    }
    data = json.dumps(body, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def apply_overrides(defs: Definitions, problems: list[Problem]) -> None:
    """Local tuning, independent of file order: exceptions add up, a disable wins, and two
    files that set the same value differently are a conflict, not a race."""
    by_rule: dict[str, list[Override]] = {}
    for ov in defs.overrides:
        if ov.target.startswith("tag:"):
            tag = ov.target[4:]
            targets = [r.id for r in defs.rules.values() if tag in r.tags]
        else:
            targets = [ov.target] if ov.target in defs.rules else []
        if not targets:
            problems.append(
                Problem(
                    ov.where.file,
                    ov.where.line,
                    ov.where.col,
                    "RULE_OVERRIDE_UNMATCHED",
                    f"override '{ov.target}' matches no rule",
                    nearest(ov.target, defs.rules) or "check the id or tag after an upgrade",
                    WARNING,
                )
            )
        for rid in targets:
            by_rule.setdefault(rid, []).append(ov)
    for rid, overrides in by_rule.items():
        rule = defs.rules[rid]
        changes: dict[str, Any] = {}
        for attr in ("level", "timespan", "gte", "suppress"):
            values = {getattr(o, attr) for o in overrides if getattr(o, attr) is not None}
            if len(values) > 1:
                where = sorted((o.where.file, o.where.line) for o in overrides)
                problems.append(
                    Problem(
                        where[-1][0],
                        where[-1][1],
                        1,
                        "RULE_OVERRIDE_CONFLICT",
                        f"overrides of '{rid}' set {attr} to different values",
                        "keep one override per setting",
                    )
                )
                continue
            if values:
                changes[attr] = values.pop()
        enabled = [o.enabled for o in overrides if o.enabled is not None]
        exceptions = sorted(
            (e for o in overrides for e in o.exceptions), key=lambda e: (e.where.file, e.where.line)
        )
        kw: dict[str, Any] = {}
        if enabled:
            kw["enabled"] = all(enabled)
        if "level" in changes:
            kw["level"] = changes["level"]
        if "suppress" in changes:
            kw["suppress"] = changes["suppress"]
        if exceptions:
            kw["exceptions"] = rule.exceptions + tuple(exceptions)
        if ("timespan" in changes or "gte" in changes) and rule.correlation is None:
            problems.append(
                Problem(
                    overrides[0].where.file,
                    overrides[0].where.line,
                    1,
                    "RULE_VALUE",
                    f"'{rid}' is not a correlation: there is no threshold to override",
                )
            )
        elif rule.correlation is not None:
            corr = rule.correlation
            if "timespan" in changes:
                corr = replace(corr, timespan=changes["timespan"])
            if "gte" in changes:
                corr = replace(corr, gte=changes["gte"])
            kw["correlation"] = corr
        sources = sorted({f"{o.where.file}:{o.where.line}" for o in overrides})
        defs.rules[rid] = replace(rule, overridden_by=tuple(sources), **kw)


def compile_definitions(defs: Definitions, problems: list[Problem], now_us: int) -> RuleSet | None:
    apply_overrides(defs, problems)
    c = _Compiler(defs, problems, now_us)
    c.compile_macros()
    referenced_by: dict[str, list[str]] = {}
    for rule in defs.rules.values():
        if rule.correlation is None:
            continue
        for base in rule.correlation.rules:
            if base not in defs.rules:
                problems.append(
                    Problem(
                        rule.where.file,
                        rule.where.line,
                        rule.where.col,
                        "RULE_UNKNOWN_RULE",
                        f"correlation '{rule.id}' refers to unknown rule '{base}'",
                        nearest(base, defs.rules),
                    )
                )
            elif defs.rules[base].correlation is not None:
                problems.append(
                    Problem(
                        rule.where.file,
                        rule.where.line,
                        rule.where.col,
                        "RULE_VALUE",
                        f"correlation '{rule.id}' refers to another correlation '{base}'",
                    )
                )
            else:
                referenced_by.setdefault(base, []).append(rule.id)
        for f in (*rule.correlation.group_by, *(x for x in [rule.correlation.field] if x)):
            if f not in FIELDS:
                problems.append(
                    Problem(
                        rule.where.file,
                        rule.where.line,
                        rule.where.col,
                        "RULE_UNKNOWN_FIELD",
                        f"correlation '{rule.id}': unknown field '{f}'",
                        nearest(f, FIELDS),
                    )
                )
    ruleset = RuleSet(files=tuple(defs.files))
    for rule in defs.rules.values():
        if not rule.enabled or rule.status == "deprecated":
            ruleset.disabled[rule.id] = rule
            continue
        generate = rule.generate if rule.generate is not None else rule.id not in referenced_by
        compiled = c.rule(rule, generate)
        if compiled is None:
            continue
        if rule.correlation is not None:
            ruleset.correlations[rule.id] = compiled
        else:
            ruleset.rules[rule.id] = compiled
    for broken in defs.check_only:
        c.rule(broken, False)
    consumers: dict[str, list[str]] = {}
    for cid, corr in ruleset.correlations.items():
        assert corr.rule.correlation is not None
        for base in corr.rule.correlation.rules:
            if base in ruleset.rules:
                consumers.setdefault(base, []).append(cid)
    ruleset.consumers = {k: tuple(v) for k, v in consumers.items()}
    if errors_only(problems):
        return None
    digest = hashlib.sha256()
    for f in defs.files:
        digest.update(f.encode())
        try:
            with open(f, "rb") as fh:
                digest.update(fh.read())
        except OSError:
            continue
    ruleset.sha256 = digest.hexdigest()
    return ruleset


def load_rules(paths: Sequence[str], now_us: int) -> tuple[RuleSet | None, list[Problem]]:
    """Read, validate and compile a whole rule set; None when any error was found."""
    defs, problems = read_paths(paths)
    if errors_only(problems):
        # Still compile what was read, so one pass reports every problem.
        compile_definitions(defs, problems, now_us)
        return None, _sorted(problems)
    ruleset = compile_definitions(defs, problems, now_us)
    return ruleset, _sorted(problems)


def load_text(
    text: str, now_us: int, file: str = "<rules>"
) -> tuple[RuleSet | None, list[Problem]]:
    defs, problems = read_text(text, file)
    ruleset = compile_definitions(defs, problems, now_us)
    if errors_only(problems):
        return None, _sorted(problems)
    return ruleset, _sorted(problems)


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line, p.col))
