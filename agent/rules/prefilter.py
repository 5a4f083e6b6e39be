"""One pass over an event's fields decides which gated rules are worth trying.

The engine indexes rules by event.action and location class. Within one such place, a rule
with gates (agent/rules/matchers.py `Gate`: RE2 patterns of which one holds whenever the
rule matches, e.g. `TargetFilename|startswith: /etc/cron.d/`) is tried only when one of its
gates passes. All gates on one field of one place are one RE2 set, matched once per event:
a hundred Sigma process rules cost one scan of the command line and one of the executable,
not a hundred matcher calls. A gate may pass where its rule then fails (it is a necessary
condition, never a sufficient one), so the rule's own matcher always decides.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import re2  # type: ignore[import-untyped]

from agent.events import FIELDS, Event
from agent.rules.matchers import _RE2_OPTIONS, Gate, _is_decimal, _is_number, _lit, _utf8

if TYPE_CHECKING:
    from agent.rules.compiler import CompiledRule

# Gates on these fields of an ASCII path are all one RE2 set over the path (see `_on_path`).
_PATH_FAMILY = frozenset({"file.path", "file.name", "file.extension"})
# Distinct combinations of gate hits remembered per place, each with its rules (cleared when
# full): most events of a place hit one of a few combinations.
_MERGED_CAP = 4096

# Past these, a field's literal gates of one kind go into its RE2 set instead: a dict
# lookup per distinct length (or an `in` per substring) is cheaper than a set match (~0.35 us
# from Python) only while there are few of them.
_MAX_LENGTHS = 3
_MAX_SUBSTRINGS = 2

_Owners = tuple[int, ...]
_Sets = dict[tuple[str, ...], Callable[[bytes], Any] | None]
_Table = dict[str, _Owners]


class _FieldGates(NamedTuple):
    """All gates on one field (as given, or lower-cased) of one place's rules."""

    getter: Callable[[Event], Any]
    folded: bool
    exact: _Table
    prefixes: tuple[tuple[int, _Table], ...]  # (length, prefix of that length -> rules)
    suffixes: tuple[tuple[int, _Table], ...]
    substrings: tuple[tuple[str, _Owners], ...]
    match: Callable[[bytes], Any] | None  # the RE2 set of the other patterns
    owners: tuple[_Owners, ...]  # set index -> rules


class Candidates:
    """The rules of one place (action, location class), in load order, and their gates.

    `for_event(e)` returns the rules to try on `e`: every ungated rule, and the gated ones
    one of whose gates passes; in load order, so alerts come in the same order either way.
    Literal gates are dict lookups (whole text, prefix or suffix of each length) or `in`
    tests; the rest of a field's gates are one RE2 set."""

    __slots__ = (
        "_family",
        "_forced",
        "_merged",
        "_sets",
        "_ungated_pos",
        "affixes",
        "equal",
        "gated",
        "gates",
        "lookups",
        "numbers",
        "path",
        "path_gates",
        "path_match",
        "path_owners",
        "path_rest",
        "rules",
        "ungated",
    )

    def __init__(
        self,
        rules: Sequence[CompiledRule],
        sets: _Sets | None = None,
        peers: Sequence[CompiledRule] | None = None,
    ) -> None:
        """`sets`: RE2 sets already compiled for other places (by their patterns), shared.
        `peers`: rules of other places too (of the same action: they have most of their
        gates in common) whose gates on the path the one set over the path covers, so that
        those places share it (and RE2's cache of what it has seen)."""
        sets = {} if sets is None else sets
        self.rules = tuple(rules)
        by_field: dict[tuple[str, bool], dict[Gate, list[int]]] = {}
        by_bound: dict[tuple[str, str], dict[float, list[int]]] = {}
        by_number: dict[str, dict[float, list[int]]] = {}
        for pos, r in enumerate(self.rules):
            for g in r.gates or ():
                if g.kind == "eq":
                    by_number.setdefault(g.field, {}).setdefault(g.bound, []).append(pos)
                elif g.kind in _COMPARISONS:
                    by_bound.setdefault((g.field, g.kind), {}).setdefault(g.bound, []).append(pos)
                else:
                    by_field.setdefault((g.field, g.folded), {}).setdefault(g, []).append(pos)
        self.numbers = tuple(_comparison(name, op, b) for (name, op), b in by_bound.items())
        self.equal = tuple(
            (FIELDS[name], {n: tuple(owners) for n, owners in table.items()})
            for name, table in by_number.items()
        )
        # The gates on the path, its name and its extension: on an ASCII path (nearly every
        # one) one RE2 set over the path as given decides most of them (`_on_path`), and
        # `path_rest` the others; any other path takes the fields one by one (`path_gates`,
        # built at the first such path).
        family = {key: owners for key, owners in by_field.items() if key[0] in _PATH_FAMILY}
        self.path = bool(family)
        self.path_match: Callable[[bytes], Any] | None = None
        self.path_owners: tuple[_Owners, ...] = ()
        self.path_rest: tuple[_FieldGates, ...] = ()
        self.path_gates: tuple[_FieldGates, ...] | None = None
        self._family = family
        self._sets = sets
        self._forced: _Owners = ()  # rules tried on any path not ASCII (see _path_gates)
        fast = _fast_path(family, peers, sets) if family else None
        if fast is not None:
            self.path_match, self.path_owners, self.path_rest = fast
        fields: dict[tuple[str, bool], _FieldGates | None] = {
            key: _field_gates(key[0], key[1], owners, sets)
            for key, owners in by_field.items()
            if fast is None or key not in family
        }
        # A rule is gated when each field it is gated on could be (a set RE2 refused leaves
        # its rules ungated: correct, only slower).
        refused = {key for key, built in fields.items() if built is None}
        ungated = {
            pos
            for pos, r in enumerate(self.rules)
            if not r.gates
            or any(g.kind not in _NUMERIC and (g.field, g.folded) in refused for g in r.gates)
        }
        # (An ungated rule may still own a gate: the union below counts it once.)
        built = [f for key, f in fields.items() if f is not None and key[0] not in _PATH_FAMILY]
        # Whole-text gates alone on a field (most of them: `field: value`) take a short path.
        self.lookups = tuple((f.getter, f.folded, f.exact) for f in built if _exact_only(f))
        # Prefix and suffix tables (and whole texts) alone: a short path too (host.hostname
        # endswith).
        self.affixes = tuple(
            (f.getter, f.folded, f.exact, f.prefixes, f.suffixes, (f,))
            for f in built
            if _affix_only(f)
        )
        self.gates = tuple(f for f in built if not _exact_only(f) and not _affix_only(f))
        if fast is None and family:
            self.path_gates = tuple(
                f for key, f in fields.items() if f is not None and key in family
            )
            self.path_rest = self.path_gates
        self._ungated_pos = frozenset(ungated)
        self.ungated = tuple(self.rules[p] for p in sorted(ungated))
        self._merged: dict[tuple[int, ...], tuple[CompiledRule, ...]] = {}
        # False: for_event would give every rule
        self.gated = bool(
            self.lookups or self.affixes or self.gates or self.numbers or self.equal or self.path
        )

    def for_event(self, e: Event) -> tuple[CompiledRule, ...]:
        hits: list[int] = []
        for getter, left, bounds, passed in self.numbers:
            v = getter(e)
            if v is None:
                continue
            for number in (v,) if type(v) is int or type(v) is float else _numbers(v):
                k = (bisect_left if left else bisect_right)(bounds, number)
                if passed[k]:
                    hits.extend(passed[k])
        for getter, table in self.equal:
            v = getter(e)
            if v is None:
                continue
            for number in (v,) if type(v) is int else _numbers_of(v):
                found = table.get(number)
                if found:
                    hits.extend(found)
        for getter, folded, exact in self.lookups:
            v = getter(e)
            if type(v) is str:
                found = exact.get(v.lower() if folded else v)
                if found:
                    hits.extend(found)
            elif v is not None and v != ():  # an empty tuple has no text
                for given in _texts(v):
                    found = exact.get(given.lower() if folded else given)
                    if found:
                        hits.extend(found)
        for getter, folded, exact, prefixes, suffixes, entry in self.affixes:
            v = getter(e)
            if type(v) is str:
                text = v.lower() if folded else v
                if exact:
                    found = exact.get(text)
                    if found:
                        hits.extend(found)
                for n, starts in prefixes:
                    found = starts.get(text[:n])
                    if found:
                        hits.extend(found)
                for n, ends in suffixes:
                    found = ends.get(text[-n:])
                    if found:
                        hits.extend(found)
            elif v is not None:
                _scan(entry, e, hits)  # a tuple or a number: its texts
        if self.gates:
            _scan(self.gates, e, hits)
        if self.path:
            path = e.path
            if type(path) is str and path.isascii():
                match = self.path_match
                if match is not None:
                    indexes = match(path.encode())
                    if indexes:
                        owners = self.path_owners
                        for i in indexes:
                            hits.extend(owners[i])
                if self.path_rest:
                    _scan(self.path_rest, e, hits)
            else:
                gates = self.path_gates
                if gates is None:
                    gates = self._path_gates()
                _scan(gates, e, hits)
                if self._forced:
                    hits.extend(self._forced)
        if not hits:
            return self.ungated
        key = tuple(hits)
        merged = self._merged.get(key)
        if merged is None:
            if len(self._merged) >= _MERGED_CAP:
                self._merged.clear()
            rules = self.rules
            merged = tuple(rules[p] for p in sorted(self._ungated_pos.union(hits)))
            self._merged[key] = merged
        return merged

    def _path_gates(self) -> tuple[_FieldGates, ...]:
        """The gates on the path family field by field (for a path that is not ASCII). The
        rules on a field whose set RE2 refuses are tried on every such path."""
        built = {k: _field_gates(k[0], k[1], g, self._sets) for k, g in self._family.items()}
        forced = {
            p for k, f in built.items() if f is None for ps in self._family[k].values() for p in ps
        }
        self._forced = tuple(sorted(forced))
        self.path_gates = tuple(f for f in built.values() if f is not None)
        return self.path_gates


def _fast_path(
    family: dict[tuple[str, bool], dict[Gate, list[int]]],
    peers: Sequence[CompiledRule] | None,
    sets: _Sets,
) -> tuple[Callable[[bytes], Any] | None, tuple[_Owners, ...], tuple[_FieldGates, ...]] | None:
    """(the set over the path, its owners, the gates of the family it does not cover), or
    None when RE2 refuses a set."""
    on_path: dict[str, list[int]] = {}
    rest: dict[tuple[str, bool], dict[Gate, list[int]]] = {}
    for key, gates in family.items():
        for g, positions in gates.items():
            pattern = _on_path(g)
            if pattern is None:
                rest.setdefault(key, {})[g] = positions
            else:
                on_path.setdefault(pattern, []).extend(positions)
    patterns = list(on_path)
    match = None
    if on_path and peers is not None:
        shared = list(dict.fromkeys(_on_path_patterns(peers)))
        if on_path.keys() <= set(shared):
            patterns = shared
            match = _compile(patterns, sets)
    if match is None and on_path:
        patterns = list(on_path)
        match = _compile(patterns, sets)
    if match is None and on_path:
        return None
    rest_built = [_field_gates(k[0], k[1], owners, sets) for k, owners in rest.items()]
    if any(f is None for f in rest_built):
        return None
    owned = {p: tuple(positions) for p, positions in on_path.items()}
    return (
        match,
        (*(owned.get(p, ()) for p in patterns), ()),  # () for the probe (_compile_set)
        tuple(f for f in rest_built if f is not None),
    )


def _scan(gates: tuple[_FieldGates, ...], e: Event, hits: list[int]) -> None:
    """Add to `hits` the rules of the gates of `gates` that pass on `e`."""
    for getter, folded, exact, prefixes, suffixes, substrings, match, owners in gates:
        v = getter(e)
        if v is None:
            continue
        for given in (v,) if type(v) is str else _texts(v):
            text = given.lower() if folded else given
            if exact:
                found = exact.get(text)
                if found:
                    hits.extend(found)
            for n, table in prefixes:
                found = table.get(text[:n])
                if found:
                    hits.extend(found)
            for n, table in suffixes:
                found = table.get(text[-n:])
                if found:
                    hits.extend(found)
            for needle, found in substrings:
                if needle in text:
                    hits.extend(found)
            if match is not None:
                indexes = match(_utf8(text))
                if indexes:
                    for i in indexes:
                        hits.extend(owners[i])


_COMPARISONS = frozenset({"gt", "gte", "lt", "lte"})
_NUMERIC = _COMPARISONS | {"eq"}


def _on_path_patterns(rules: Sequence[CompiledRule]) -> Iterator[str]:
    """The patterns over the path of `rules`' gates, in order."""
    for r in rules:
        for g in sorted(r.gates or (), key=_gate_order):
            if g.field in _PATH_FAMILY and g.kind not in _NUMERIC:
                pattern = _on_path(g)
                if pattern is not None:
                    yield pattern


def _gate_order(g: Gate) -> tuple[str, bool, str, str]:
    return (g.field, g.folded, g.kind, g.pattern)


def _on_path(g: Gate) -> str | None:
    """An RE2 pattern that, searched in an ASCII path as it is, passes wherever `g` passes on
    that path's field (file.path, file.name or file.extension as `Event` gives them), or
    None when there is no such pattern here (the gate then runs on its own field).

    On ASCII text lower-casing changes only A-Z, so a folded gate (a pattern searched in the
    lower-cased text) passes only where the same pattern with RE2's (?i) passes in the text
    as it is: (?i) may pass more often (where the pattern itself holds capitals), never less,
    which a necessary condition allows. The name is the text after the last slash, and the
    extension is the name's text after its last dot, lower-cased (the dot not first or
    last), so a literal without a slash (or a dot) pins down where it must sit in the path."""
    fold = "(?i)" if g.folded else ""
    if g.field == "file.path":
        return fold + g.pattern
    text = g.literal
    if g.kind not in ("exact", "prefix", "suffix", "contains") or "/" in text:
        return None
    lit = _lit(text)
    if g.field == "file.name":
        if g.kind == "exact":
            return fold + "(?:\\A|/)" + lit + "\\z"
        if g.kind == "prefix":
            return fold + "(?:\\A|/)" + lit + "[^/]*\\z"
        if g.kind == "suffix":
            return fold + lit + "\\z"
        return fold + lit + "[^/]*\\z"
    if g.field != "file.extension" or not text or "." in text:
        return None
    # The extension is lower-cased whether or not the gate is: (?i) either way.
    if g.kind == "exact":
        return "(?i)[^/]\\." + lit + "\\z"
    if g.kind == "prefix":
        return "(?i)[^/]\\." + lit + "[^./]*\\z"
    if g.kind == "suffix":
        return "(?i)[^/]\\.[^./]*" + lit + "\\z"
    return "(?i)[^/]\\.[^./]*" + lit + "[^./]*\\z"


def _exact_only(f: _FieldGates) -> bool:
    return not (f.prefixes or f.suffixes or f.substrings or f.match)


def _affix_only(f: _FieldGates) -> bool:
    return bool(f.prefixes or f.suffixes) and not (f.substrings or f.match)


class _Comparison(NamedTuple):
    """All `field|gt: N` (or gte, lt, lte) gates on one field of one place's rules: the
    bounds in order, and for each cut k (bisect of the event's number) the rules whose
    comparison holds there."""

    getter: Callable[[Event], Any]
    left: bool  # bisect_left (gt: bound < v; lte: bound >= v), else bisect_right
    bounds: tuple[float, ...]
    passed: tuple[_Owners, ...]  # len(bounds) + 1 cuts


def _comparison(name: str, op: str, by_bound: dict[float, list[int]]) -> _Comparison:
    bounds = tuple(sorted(by_bound))
    owners = [tuple(by_bound[b]) for b in bounds]
    if op in ("gt", "gte"):
        # v > b (gt) for the bounds before bisect_left(v); v >= b (gte) before bisect_right.
        passed = [tuple(p for o in owners[:k] for p in o) for k in range(len(bounds) + 1)]
        return _Comparison(FIELDS[name], op == "gt", bounds, tuple(passed))
    # v < b (lt) for the bounds from bisect_right(v) on; v <= b (lte) from bisect_left.
    passed = [tuple(p for o in owners[k:] for p in o) for k in range(len(bounds) + 1)]
    return _Comparison(FIELDS[name], op == "lte", bounds, tuple(passed))


def _numbers(v: Any) -> tuple[float, ...]:
    """The numbers a comparison tests of a field's value: a number, a decimal string's
    value, each of a tuple's (as agent/rules/matchers.py `_numeric` does)."""
    out: list[float] = []
    for x in v if type(v) is tuple else (v,):
        if type(x) is int or type(x) is float:
            out.append(x)
        elif type(x) is str and _is_decimal(x):
            out.append(int(x))
    return tuple(out)


def _numbers_of(v: Any) -> tuple[float, ...]:
    """The numbers an "eq" gate looks up of a field's value: as a plain equality's matcher
    takes them (agent/rules/matchers.py `_strings`: any number but a boolean), and a decimal
    string's value (the only strings equal to an integer's text); each of a tuple's."""
    out: list[float] = []
    for x in v if type(v) is tuple else (v,):
        if isinstance(x, int | float) and not isinstance(x, bool):
            out.append(x)
        elif type(x) is str and _is_decimal(x):
            out.append(int(x))
    return tuple(out)


def _field_gates(
    name: str, folded: bool, gates: dict[Gate, list[int]], sets: _Sets
) -> _FieldGates | None:
    exact: dict[str, list[int]] = {}
    starts: dict[str, list[int]] = {}
    ends: dict[str, list[int]] = {}
    inside: dict[str, list[int]] = {}
    patterns: dict[str, list[int]] = {}
    for g, positions in gates.items():
        table = {"exact": exact, "prefix": starts, "suffix": ends, "contains": inside}.get(
            g.kind, patterns
        )
        key = g.pattern if table is patterns else g.literal
        table.setdefault(key, []).extend(positions)

    def by_length(table: dict[str, list[int]]) -> tuple[tuple[int, _Table], ...] | None:
        lengths: dict[int, _Table] = {}
        for text, positions in table.items():
            lengths.setdefault(len(text), {})[text] = tuple(positions)
        if len(lengths) > _MAX_LENGTHS:
            return None
        return tuple(sorted(lengths.items()))

    prefixes = by_length(starts)
    if prefixes is None:
        for text, positions in starts.items():
            patterns.setdefault("\\A" + _lit(text), []).extend(positions)
        prefixes = ()
    suffixes = by_length(ends)
    if suffixes is None:
        for text, positions in ends.items():
            patterns.setdefault(_lit(text) + "\\z", []).extend(positions)
        suffixes = ()
    if len(inside) > _MAX_SUBSTRINGS:
        for text, positions in inside.items():
            patterns.setdefault(_lit(text), []).extend(positions)
        inside = {}
    match = None
    owners: tuple[_Owners, ...] = ()
    if patterns:
        match = _compile(list(patterns), sets)
        if match is None:
            return None
        owners = (*(tuple(positions) for positions in patterns.values()), ())  # and the probe
    return _FieldGates(
        FIELDS[name],
        folded,
        {text: tuple(positions) for text, positions in exact.items()},
        prefixes,
        suffixes,
        tuple((text, tuple(positions)) for text, positions in inside.items()),
        match,
        owners,
    )


def _texts(v: Any) -> tuple[str, ...]:
    """The texts a matcher tests of a field's value: a number's decimal text, a tuple's
    strings and numbers (as `_lift_any` and `_on_text` do)."""
    if type(v) is tuple:
        return tuple(x if type(x) is str else str(x) for x in v if type(x) is str or _is_number(x))
    if _is_number(v):
        return (str(v),)
    return ()


def _compile(patterns: list[str], sets: _Sets) -> Callable[[bytes], Any] | None:
    """One RE2 set searching for all `patterns` at once: its match gives the indexes (in the
    order given) of those found. None when RE2 refuses the set (e.g. over its memory budget).
    Compiled once for the same patterns in `sets`."""
    key = tuple(patterns)
    if key in sets:
        return sets[key]
    match = sets[key] = _compile_set(patterns)
    return match


# The last pattern of every set: it matches only this text, which no event field holds (a
# path, argument or name never contains NUL). A set whose DFA cannot start (RE2 leaves it too
# little of its memory budget) would answer "no match" to every text, silently: gates would
# then drop rules that match. The probe finds that when the set is built.
_PROBE = b"\x00exfilwatch-set-probe\x00"
_PROBE_PATTERN = "\\x00exfilwatch-set-probe\\x00"


def _compile_set(patterns: list[str], options: Any = _RE2_OPTIONS) -> Callable[[bytes], Any] | None:
    """The set's match function, or None when RE2 refuses the set or its DFA cannot run.
    Its indexes are those of `patterns`, plus len(patterns) for the probe (owners of a set
    end with an empty entry for it)."""
    rs = re2.Set.SearchSet(options)
    try:
        for p in patterns:
            rs.Add(_utf8(p))
        rs.Add(_PROBE_PATTERN.encode())
        rs.Compile()
    except re2.error:
        return None
    # The binding's own set when it is there: its Python wrapper costs more than the match
    # (both give the indexes found; the raw one an empty list, the wrapper None, for none).
    match: Callable[[bytes], Any] = getattr(rs, "_set", rs).Match
    if len(patterns) not in (match(_PROBE) or ()):
        return None
    return match
