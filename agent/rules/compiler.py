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
    bound,
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
from agent.rules.matchers import FieldMatcher, Gate, MatcherError, compile_field
from agent.rules.model import Definitions, Override, Rule, RuleException
from agent.rules.sigma import LogSource, map_field, resolve

Predicate = Callable[[Event], bool]


# The engine indexes rules by the values of these fields a rule requires (event.action, and
# the location class: a rule about removable media is never tried on a tagged-tree write).
ACTION = "event.action"
LOCATION = "exfilwatch.location.class"

Gates = frozenset[Gate]


def _weakest(gates: Gates) -> int:
    return min((g.weight for g in gates), default=0)


def _stronger(a: Gates, b: Gates) -> Gates:
    """Of two necessary conditions (both hold on a match), the more selective one."""
    return a if _weakest(a) >= _weakest(b) else b


def _any_gates(parts: Sequence[Gates | None]) -> Gates | None:
    """An OR's gates: the union of its parts', if every part has some."""
    if any(p is None for p in parts):
        return None
    return frozenset().union(*(p for p in parts if p is not None))


def _all_gates(parts: Sequence[Gates | None]) -> Gates | None:
    """An AND's gates: the most selective of its parts'."""
    found = [p for p in parts if p]
    return max(found, key=_weakest) if found else None


def _every_field(ms: Sequence[FieldMatcher]) -> Predicate:
    """All of the field conditions `ms` hold (in that order): each one's test of its field,
    called straight (a FieldMatcher's own __call__ is a frame more per field)."""
    pairs = tuple((m.test, m.getter) for m in ms)
    if len(pairs) == 1:
        ((test, get),) = pairs

        def one(e: Event) -> bool:
            return test(get(e))

        return one
    if len(pairs) == 2:
        (test1, get1), (test2, get2) = pairs

        def two(e: Event) -> bool:
            return test1(get1(e)) and test2(get2(e))

        return two
    if len(pairs) == 3:
        (test1, get1), (test2, get2), (test3, get3) = pairs

        def three(e: Event) -> bool:
            return test1(get1(e)) and test2(get2(e)) and test3(get3(e))

        return three

    def every(e: Event) -> bool:
        for test, get in pairs:  # noqa: SIM110 (a generator costs a frame)
            if not test(get(e)):
                return False
        return True

    return every


@dataclass(frozen=True)
class Selection:
    match: Predicate
    actions: frozenset[str] | None  # event.action values it can match (None: any)
    locations: frozenset[str] | None = None  # location classes it can match (None: any)
    gates: Gates | None = None  # one of these holds on every match (None: nothing known)


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
    # One of these holds on every match: the engine's prefilter (None: try on every event).
    gates: Gates | None = None
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
    # Sigma rules whose log source (or a field) the agent has no events for: id -> reason.
    inactive: dict[str, tuple[Rule, str]] = field(default_factory=dict)
    # Left out for their errors (the agent's load keeps going): rule id or file -> problems.
    rejected: dict[str, list[Problem]] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.rules) + len(self.correlations)

    def link(self) -> None:
        """Recompute which correlations each rule feeds (after rules were added or left out)."""
        consumers: dict[str, list[str]] = {}
        for cid, corr in self.correlations.items():
            assert corr.rule.correlation is not None
            for base in corr.rule.correlation.rules:
                if base in self.rules or base in self.correlations:  # chains: a correlation
                    consumers.setdefault(base, []).append(cid)
        self.consumers = {k: tuple(v) for k, v in consumers.items()}


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

    def selection(
        self, file: str, node: yaml.Node, source: LogSource | None = None
    ) -> Selection | None:
        """A map is AND of its fields; a list of maps is OR of them. A Sigma rule's taxonomy
        field names are mapped through its log source's table."""
        keywords = _keywords(node)
        if keywords is not None:
            return self.keyword_selection(file, node, *keywords)
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                self.add(file, node, "RULE_EMPTY_SELECTION", "an empty list matches nothing")
                return None
            if not all(isinstance(item, yaml.MappingNode) for item in node.value):
                self.add(
                    file,
                    node,
                    "RULE_KEYWORDS_UNSUPPORTED",
                    "a list in a selection holds only field maps or only keywords",
                    "name the field: file.path|contains: ...",
                )
                return None
            parts = [self.selection(file, item, source) for item in node.value]
            found = [p for p in parts if p is not None]
            if len(found) != len(parts):
                return None
            preds = tuple(p.match for p in found)
            union: frozenset[str] | None = frozenset()
            places: frozenset[str] | None = frozenset()
            for p in found:
                union = None if union is None or p.actions is None else union | p.actions
                places = None if places is None or p.locations is None else places | p.locations
            gates = _any_gates([p.gates for p in found])
            return Selection(preds[0] if len(preds) == 1 else some_of(preds), union, places, gates)
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
            if source is not None:
                key = map_field(source, key)
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
        # The index chooses by action and location already: gate on the other fields.
        gates = _all_gates([m.gates for m in matchers if m.field not in (ACTION, LOCATION)])
        # The index already chose the rule by action and location: those tests pass for
        # nearly every event tried, so the fields that can fail are tried first.
        ms = tuple(sorted(matchers, key=lambda m: m.field in (ACTION, LOCATION)))
        return Selection(_every_field(ms), actions, locations, gates)

    def keyword_selection(
        self, file: str, node: yaml.Node, values: list[object], every: bool
    ) -> Selection | None:
        """Sigma keywords (free text over the whole event): each keyword is looked for, as
        `contains` would (wildcards too), in the event's command line and in its path; OR of
        the keywords, AND with `|all`."""
        per_keyword: list[Predicate] = []
        keyword_gates: list[Gates | None] = []
        for value in values:
            try:
                in_fields = tuple(
                    compile_field(f"{field}|contains", value) for field in KEYWORD_FIELDS
                )
            except MatcherError as exc:
                self.add(file, node, exc.code, exc.message, exc.hint)
                return None
            per_keyword.append(some_of(tuple(_every_field((m,)) for m in in_fields)))
            keyword_gates.append(_any_gates([m.gates for m in in_fields]))
        if not per_keyword:
            self.add(file, node, "RULE_EMPTY_SELECTION", "an empty keyword list matches nothing")
            return None
        gates = _all_gates(keyword_gates) if every else _any_gates(keyword_gates)
        if len(per_keyword) == 1:
            return Selection(per_keyword[0], None, None, gates)
        return Selection(
            every_of(tuple(per_keyword)) if every else some_of(tuple(per_keyword)),
            None,
            None,
            gates,
        )

    def compile_macros(self) -> None:
        for name, (node, where) in self.defs.macros.items():
            sel = self.selection(where.file, node)
            if sel is not None:
                self.macros[name] = sel

    def condition(
        self, rule: Rule, selections: dict[str, Selection]
    ) -> tuple[Predicate, frozenset[str] | None, frozenset[str] | None, Gates | None, str] | None:
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
        gates: dict[str, Gates | None] = {}
        for name in used:
            sel = selections.get(name) or self.macros.get(name)
            if sel is None:
                return None  # its own problem was reported already
            preds[name] = sel.match
            constraints[name] = sel.actions
            places[name] = sel.locations
            gates[name] = sel.gates
        return (
            compile_condition(_locals_first(tree, frozenset(rule.detection)), preds),
            required_values(tree, constraints),
            required_values(tree, places),
            bound(tree, gates, _stronger, frozenset.__or__),
            describe(tree),
        )

    def rule(
        self, rule: Rule, generate: bool, source: LogSource | None = None
    ) -> CompiledRule | None:
        file = rule.where.file
        match: Predicate
        actions: frozenset[str] | None = None
        locations: frozenset[str] | None = None
        gates: Gates | None = None
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
                sel = self.selection(file, node, source)
                if sel is None:
                    ok = False
                else:
                    selections[name] = sel
            compiled = self.condition(rule, selections)
            if compiled is None or not ok:
                return None
            match, actions, locations, gates, text = compiled
            if source is not None:
                # Only the events of the rule's log source: the index tries it on no others.
                actions = source.actions if actions is None else actions & source.actions
                match = _of_actions(source.actions, match)
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
            gates,
        )


# Where a Sigma keyword is looked for: the text of the event a rule sees.
KEYWORD_FIELDS = ("process.command_line", "file.path")


def _keywords(node: yaml.Node) -> tuple[list[object], bool] | None:
    """(keywords, all of them) when a selection is a keyword list: a list of plain values, a
    single string, or `'|all': [...]`; None for a field map or a list of maps."""
    if isinstance(node, yaml.ScalarNode):
        value = node_value(node)
        return ([value], False) if isinstance(value, str) else None
    if isinstance(node, yaml.SequenceNode):
        if node.value and all(isinstance(item, yaml.ScalarNode) for item in node.value):
            return [node_value(item) for item in node.value], False
        return None
    if (
        isinstance(node, yaml.MappingNode)
        and len(node.value) == 1
        and isinstance(node.value[0][0], yaml.ScalarNode)
        and node.value[0][0].value == "|all"
    ):
        inner = node.value[0][1]
        if isinstance(inner, yaml.SequenceNode) and all(
            isinstance(item, yaml.ScalarNode) for item in inner.value
        ):
            return [node_value(item) for item in inner.value], True
    return None


# Sigma's generic field names in a correlation's group-by, as the agent's fields.
_GROUP_FIELDS = {
    "ComputerName": "host.hostname",
    "Computer": "host.hostname",
    "Hostname": "host.hostname",
    "User": "user.name",
    "UserName": "user.name",
    "Image": "process.executable",
    "CommandLine": "process.command_line",
    "TargetFilename": "file.path",
}


def _at_rule(rule: Rule, code: str, message: str, hint: str = "", severity: str = ERROR) -> Problem:
    """A problem located at the rule's document."""
    w = rule.where
    return Problem(w.file, w.line, w.col, code, message, hint, severity)


def _sigma_references(defs: Definitions) -> dict[str, str]:
    """Resolve Sigma correlations in place (rules referenced by `name`, group-by fields by
    their taxonomy names); returns the Sigma rules that cannot run, with the reason: an
    unsupported type or condition, a rule not loaded, a field without an equivalent."""
    names = {r.name: r.id for r in defs.rules.values() if r.name}
    inactive: dict[str, str] = {}
    for rid, rule in list(defs.rules.items()):
        if rule.inactive is not None:
            inactive[rid] = rule.inactive
        corr = rule.correlation
        if corr is None or not rule.sigma:
            continue
        if corr.unsupported is not None:
            inactive[rid] = corr.unsupported
            continue

        def ref(r: str) -> str:
            return r if r in defs.rules else names.get(r, r)

        refs = tuple(ref(r) for r in corr.rules)
        missing = [r for r in refs if r not in defs.rules]
        aliases = tuple(
            (name, tuple((ref(r), _GROUP_FIELDS.get(f, f)) for r, f in per_rule))
            for name, per_rule in corr.aliases
        )
        alias_names = {name for name, _ in aliases}
        group = tuple(f if f in alias_names else _GROUP_FIELDS.get(f, f) for f in corr.group_by)
        field_ = _GROUP_FIELDS.get(corr.field, corr.field) if corr.field else None
        named = [f for f in (*group, *([field_] if field_ else [])) if f not in alias_names]
        named += [f for _, per_rule in aliases for _, f in per_rule]
        unknown = [f for f in named if f not in FIELDS]
        uncovered = [
            (name, r) for name, per_rule in aliases for r in refs if r not in dict(per_rule)
        ]
        if missing:
            inactive[rid] = f"it correlates rule {missing[0]}, which is not loaded"
        elif unknown:
            inactive[rid] = f"field {unknown[0]} has no equivalent in the agent's events"
        elif uncovered:
            name, r = uncovered[0]
            inactive[rid] = f"alias {name} names no field of rule {r}"
        defs.rules[rid] = replace(
            rule,
            correlation=replace(corr, rules=refs, group_by=group, field=field_, aliases=aliases),
        )
    # Chains (a correlation over a correlation) run; a loop of them never could.
    for rid in _looping(defs):
        inactive.setdefault(rid, "its chain of correlations loops back to it")
    return inactive


def _looping(defs: Definitions) -> list[str]:
    """The Sigma correlations that reach themselves through the correlations they use."""
    uses = {
        rid: [b for b in r.correlation.rules if b in defs.rules and defs.rules[b].correlation]
        for rid, r in defs.rules.items()
        if r.correlation is not None and r.sigma
    }
    looping = []
    for start, used in uses.items():
        seen: set[str] = set()
        todo = list(used)
        while todo:
            cur = todo.pop()
            if cur == start:
                looping.append(start)
                break
            if cur not in seen:
                seen.add(cur)
                todo.extend(uses.get(cur, ()))
    return looping


def _apply_filters(
    c: _Compiler, defs: Definitions, ruleset: RuleSet, problems: list[Problem]
) -> None:
    """Sigma filter documents: each one's detection, compiled like a rule of its log source,
    silences the rules it lists (by id or name) on the events it matches."""
    names = {r.name: r.id for r in defs.rules.values() if r.name}
    for rule, targets in defs.filters:
        source = None
        why = rule.inactive
        if why is None and rule.logsource:
            source, why = resolve(dict(rule.logsource))
        if why is not None:
            problems.append(
                _at_rule(
                    rule,
                    "RULE_INACTIVE",
                    f"filter '{rule.title}' is loaded inactive: {why}",
                    "it never applies",
                    WARNING,
                )
            )
            continue
        compiled = c.rule(rule, False, source)
        if compiled is None:
            continue
        silence = compiled.match
        found = 0
        for target in targets:
            rid = target if target in defs.rules else names.get(target, target)
            victim = ruleset.rules.get(rid) or ruleset.correlations.get(rid)
            if victim is None:
                continue
            found += 1
            victim.match = _unless(victim.match, silence)
        if not found:
            problems.append(
                _at_rule(
                    rule,
                    "RULE_FILTER_UNUSED",
                    f"filter '{rule.title}' names no loaded rule",
                    "rules: lists ids or names of the rules it silences",
                    WARNING,
                )
            )


def _unless(match: Predicate, silence: Predicate) -> Predicate:
    def filtered(e: Event) -> bool:
        return match(e) and not silence(e)

    return filtered


def _inactive(ruleset: RuleSet, problems: list[Problem], rule: Rule, why: str) -> None:
    ruleset.inactive[rule.id] = (rule, why)
    problems.append(
        _at_rule(
            rule,
            "RULE_INACTIVE",
            f"rule '{rule.id}' is loaded inactive: {why}",
            "it never runs; see docs/sigma.md for what the agent has",
            WARNING,
        )
    )


def _of_actions(actions: frozenset[str], match: Predicate) -> Predicate:
    def of_source(e: Event) -> bool:
        return e.action in actions and match(e)

    return of_source


def _unmapped_fields(rule: Rule, source: LogSource) -> list[str]:
    """Field names in a Sigma rule's selections that neither its log source's table nor the
    agent's events know (a keyword list names none)."""
    found: list[str] = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)
        elif isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if isinstance(key, str) and key and not key.startswith("|"):
                    name = map_field(source, key).partition("|")[0]
                    if name not in FIELDS and name not in found:
                        found.append(name)

    for node in (rule.detection or {}).values():
        walk(node)
    return found


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


def compile_definitions(
    defs: Definitions, problems: list[Problem], now_us: int, *, keep_going: bool = False
) -> RuleSet | None:
    apply_overrides(defs, problems)
    c = _Compiler(defs, problems, now_us)
    c.compile_macros()
    inactive = _sigma_references(defs)
    referenced_by: dict[str, list[str]] = {}
    for rule in defs.rules.values():
        if rule.correlation is None or rule.id in inactive:
            continue
        if rule.correlation.unsupported is not None:  # a native rule: say it cannot run
            problems.append(
                _at_rule(
                    rule,
                    "RULE_VALUE",
                    f"correlation '{rule.id}': {rule.correlation.unsupported}",
                    "use gte: N (or gt: N)",
                )
            )
            continue
        for base in rule.correlation.rules:
            if base not in defs.rules:
                problems.append(
                    _at_rule(
                        rule,
                        "RULE_UNKNOWN_RULE",
                        f"correlation '{rule.id}' refers to unknown rule '{base}'",
                        nearest(base, defs.rules),
                    )
                )
            elif defs.rules[base].correlation is not None and rule.sigma:
                referenced_by.setdefault(base, []).append(rule.id)  # a chain (Sigma)
            elif defs.rules[base].correlation is not None:
                problems.append(
                    _at_rule(
                        rule,
                        "RULE_VALUE",
                        f"correlation '{rule.id}' refers to another correlation '{base}'",
                    )
                )
            else:
                referenced_by.setdefault(base, []).append(rule.id)
        alias_names = {name for name, _ in rule.correlation.aliases}
        for f in (*rule.correlation.group_by, *(x for x in [rule.correlation.field] if x)):
            if f not in FIELDS and f not in alias_names:
                problems.append(
                    _at_rule(
                        rule,
                        "RULE_UNKNOWN_FIELD",
                        f"correlation '{rule.id}': unknown field '{f}'",
                        nearest(f, FIELDS),
                    )
                )
    generating = {
        base
        for r in defs.rules.values()
        if r.correlation is not None and r.correlation.generate
        for base in r.correlation.rules
    }
    ruleset = RuleSet(files=tuple(defs.files))
    for rule in defs.rules.values():
        if not rule.enabled or rule.status == "deprecated":
            ruleset.disabled[rule.id] = rule
            continue
        source = None
        why: str | None = inactive.get(rule.id)
        if why is not None:
            _inactive(ruleset, problems, rule, why)
            continue
        if rule.logsource and rule.detection is not None:
            source, why = resolve(dict(rule.logsource))
            if source is not None:
                unmapped = _unmapped_fields(rule, source)
                if unmapped:
                    why = (
                        f"field {', '.join(unmapped)} has no equivalent in the agent's "
                        f"{dict(rule.logsource).get('category')} events"
                    )
                    source = None
            if source is None:
                assert why is not None
                _inactive(ruleset, problems, rule, why)
                continue
        # By default a base rule of a correlation does not alert by itself, unless a Sigma
        # correlation over it says `generate: true`.
        generate = (
            rule.generate
            if rule.generate is not None
            else rule.id not in referenced_by or rule.id in generating
        )
        compiled = c.rule(rule, generate, source)
        if compiled is None:
            continue
        if rule.correlation is not None:
            ruleset.correlations[rule.id] = compiled
        else:
            ruleset.rules[rule.id] = compiled
    for broken in defs.check_only:
        c.rule(broken, False)
    _apply_filters(c, defs, ruleset, problems)
    # A Sigma correlation over a rule that cannot run cannot run either (nor one over it).
    changed = True
    while changed:
        changed = False
        for cid, corr in list(ruleset.correlations.items()):
            assert corr.rule.correlation is not None
            idle = [b for b in corr.rule.correlation.rules if b in ruleset.inactive]
            if corr.rule.sigma and idle:
                del ruleset.correlations[cid]
                _inactive(ruleset, problems, corr.rule, f"it correlates inactive rule {idle[0]}")
                changed = True
    ruleset.link()
    if errors_only(problems) and not keep_going:
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


def quarantine(defs: Definitions, problems: list[Problem], now_us: int) -> RuleSet:
    """Compile what is good and leave out what is not: every rule with an error located in
    its document (and every correlation over a rule left out) is put in `ruleset.rejected`;
    the others run. For the agent, where one bad rule must not stop the rest."""
    ruleset = compile_definitions(defs, problems, now_us, keep_going=True)
    assert ruleset is not None
    starts: dict[str, list[tuple[int, str]]] = {}
    for rule in [*defs.rules.values(), *defs.check_only]:
        starts.setdefault(rule.where.file, []).append((rule.where.line, rule.id))
    for _node, where in defs.macros.values():
        starts.setdefault(where.file, []).append((where.line, ""))
    for docs in starts.values():
        docs.sort()
    for p in errors_only(problems):
        owner = ""
        for line, rid in starts.get(p.file, []):
            if line > p.line:
                break
            owner = rid
        key = owner or f"{p.file}"  # a file that did not parse, or a broken macro or list
        ruleset.rejected.setdefault(key, []).append(p)
    gone = set(ruleset.rejected)
    for rid in list(ruleset.rules):
        if rid in gone:
            del ruleset.rules[rid]
    for cid, corr in list(ruleset.correlations.items()):
        assert corr.rule.correlation is not None
        missing = [b for b in corr.rule.correlation.rules if b not in ruleset.rules]
        if cid in gone or missing:
            del ruleset.correlations[cid]
            if cid not in gone:
                ruleset.rejected[cid] = [
                    Problem(
                        corr.rule.where.file,
                        corr.rule.where.line,
                        corr.rule.where.col,
                        "RULE_UNKNOWN_RULE",
                        f"correlation '{cid}' is left out with its rule {missing[0]!r}",
                    )
                ]
    ruleset.link()
    return ruleset


def load_rules(
    paths: Sequence[str], now_us: int, *, keep_going: bool = False
) -> tuple[RuleSet | None, list[Problem]]:
    """Read, validate and compile a whole rule set; None when any error was found, unless
    `keep_going`: then the rules with errors are left out (`ruleset.rejected`) and the rest
    is returned (see `quarantine`)."""
    defs, problems = read_paths(paths)
    if keep_going:
        return quarantine(defs, problems, now_us), _sorted(problems)
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
