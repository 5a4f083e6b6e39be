"""The `condition` of a detection rule: parse, expand patterns, compile to a predicate, index."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeVar, assert_never

from agent.diagnostics import nearest

T = TypeVar("T")
B = TypeVar("B")

SYNTAX = "RULE_CONDITION_SYNTAX"
UNKNOWN_SELECTION = "RULE_UNKNOWN_SELECTION"
PATTERN_MATCHES_NOTHING = "RULE_PATTERN_MATCHES_NOTHING"

MAX_LENGTH = 4096
# Levels of '(' and 'not' together: the parser and every tree walk recurse once per level.
MAX_DEPTH = 64
# Reserved in any case: a selection with one of these names cannot be referenced.
KEYWORDS = frozenset({"and", "or", "not", "of", "all", "any", "them"})
THEM = "them"

_WHITESPACE = " \t\r\n\f\v"
_WORD = re.compile(r"[A-Za-z0-9_.*-]+")
_NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_HINT_NAMES = 10


class ConditionError(Exception):
    """A condition that does not parse, or that does not fit the rule's selections."""

    def __init__(self, message: str, offset: int, code: str, hint: str = "") -> None:
        # All fields in args, so the error survives pickling (process pools, multiprocessing).
        super().__init__(message, offset, code, hint)
        self.message = message
        self.offset = offset
        self.code = code
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.code} at offset {self.offset}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


@dataclass(frozen=True, slots=True)
class Ref:
    """A selection, by name; offset is where it appears in the condition text."""

    name: str
    offset: int


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]

    def __post_init__(self) -> None:
        if not self.operands:
            raise ValueError("And needs at least one operand")


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]

    def __post_init__(self) -> None:
        if not self.operands:
            raise ValueError("Or needs at least one operand")


@dataclass(frozen=True, slots=True)
class OneOf:
    """`1 of PATTERN` (or `any of`); offset is where the pattern appears."""

    pattern: str  # "them" or a glob with '*'
    offset: int


@dataclass(frozen=True, slots=True)
class AllOf:
    """`all of PATTERN`; offset is where the pattern appears."""

    pattern: str
    offset: int


Node: TypeAlias = Ref | Not | And | Or | OneOf | AllOf


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word", "(", ")", "|", "bad", "end"
    text: str
    offset: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char in _WHITESPACE:
            pos += 1
        elif char in "()":
            tokens.append(_Token(char, char, pos))
            pos += 1
        elif word := _WORD.match(text, pos):
            tokens.append(_Token("word", word.group(), pos))
            pos = word.end()
        else:
            # The stream stops here; the parser reports it only when it gets this far, so an
            # earlier syntax error is still the one reported.
            tokens.append(_Token("|" if char == "|" else "bad", char, pos))
            return tokens
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _keyword(token: _Token) -> str | None:
    if token.kind != "word":
        return None
    lowered = token.text.lower()
    return lowered if lowered in KEYWORDS else None


def _show(token: _Token) -> str:
    return "the end of the condition" if token.kind == "end" else f"'{token.text}'"


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0

    def peek(self) -> _Token:
        token = self.tokens[self.pos]
        if token.kind == "|":
            raise ConditionError(
                "aggregations ('| count() > N' and the like) are not supported",
                token.offset,
                SYNTAX,
                "count or group events with a 'correlation:' section instead",
            )
        if token.kind == "bad":
            raise ConditionError(f"unexpected character {token.text!r}", token.offset, SYNTAX)
        return token

    def advance(self) -> _Token:
        token = self.peek()
        self.pos += 1
        return token

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConditionError(
                f"nesting too deep (more than {MAX_DEPTH} levels of '(' and 'not')",
                token.offset,
                SYNTAX,
                "simplify the condition",
            )

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise ConditionError(
                "condition is empty", 0, SYNTAX, "name a selection, e.g. 'selection'"
            )
        node = self.disjunction(None)
        token = self.peek()
        if token.kind == ")":
            raise ConditionError("unmatched ')'", token.offset, SYNTAX)
        if token.kind != "end":
            raise ConditionError(
                f"unexpected {_show(token)} after a complete condition",
                token.offset,
                SYNTAX,
                "join the parts with 'and' or 'or'",
            )
        return node

    def disjunction(self, after: _Token | None) -> Node:
        operands = [self.conjunction(after)]
        while _keyword(self.peek()) == "or":
            operands.append(self.conjunction(self.advance()))
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def conjunction(self, after: _Token | None) -> Node:
        operands = [self.negation(after)]
        while _keyword(self.peek()) == "and":
            operands.append(self.negation(self.advance()))
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def negation(self, after: _Token | None) -> Node:
        # A loop, not recursion: a run of 'not's costs no stack.
        count = 0
        while _keyword(self.peek()) == "not":
            after = self.advance()
            self.enter(after)
            count += 1
        node = self.primary(after)
        for _ in range(count):
            node = Not(node)
        self.depth -= count
        return node

    def primary(self, after: _Token | None) -> Node:
        token = self.peek()
        if token.kind == "(":
            self.advance()
            self.enter(token)
            node = self.disjunction(token)
            closing = self.peek()
            if closing.kind == "end":
                raise ConditionError("unclosed '('", token.offset, SYNTAX, "add the missing ')'")
            if closing.kind != ")":
                raise ConditionError(
                    f"expected 'and', 'or' or ')', found {_show(closing)}", closing.offset, SYNTAX
                )
            self.advance()
            self.depth -= 1
            return node
        keyword = _keyword(token)
        if token.text == "1" or keyword in ("all", "any"):
            return self.quantifier()
        where = f"after '{after.text}'" if after is not None else "at the start"
        expected = f"expected a selection, 'not', '(', '1 of' or 'all of' {where}"
        if token.kind != "word":
            raise ConditionError(f"{expected}, found {_show(token)}", token.offset, SYNTAX)
        if keyword == THEM:
            raise ConditionError(
                "'them' stands only after '1 of' or 'all of'",
                token.offset,
                SYNTAX,
                "write '1 of them' or 'all of them'",
            )
        if keyword is not None:
            raise ConditionError(f"{expected}, found {_show(token)}", token.offset, SYNTAX)
        if token.text.isdigit() and _keyword(self.tokens[self.pos + 1]) == "of":
            raise ConditionError(
                f"'{token.text} of' is not supported",
                token.offset,
                SYNTAX,
                "use '1 of' or 'all of'",
            )
        if "*" in token.text:
            raise ConditionError(
                f"a wildcard name ('{token.text}') stands only after '1 of' or 'all of'",
                token.offset,
                SYNTAX,
                f"write '1 of {token.text}' or 'all of {token.text}'",
            )
        if token.text[0] not in _NAME_START:
            raise ConditionError(
                f"'{token.text}' is not a selection name: names start with a letter or '_'",
                token.offset,
                SYNTAX,
            )
        self.advance()
        return Ref(token.text, token.offset)

    def quantifier(self) -> Node:
        quantity = self.advance()
        of = self.peek()
        if _keyword(of) != "of":
            raise ConditionError(
                f"expected 'of' after '{quantity.text}', found {_show(of)}", of.offset, SYNTAX
            )
        self.advance()
        target = self.peek()
        keyword = _keyword(target)
        if target.kind != "word" or keyword not in (None, THEM):
            raise ConditionError(
                f"expected a selection pattern or 'them' after 'of', found {_show(target)}",
                target.offset,
                SYNTAX,
                "e.g. '1 of selection_*' or 'all of them'",
            )
        if target.text[0] not in _NAME_START and target.text[0] != "*":
            raise ConditionError(
                f"'{target.text}' is not a selection pattern: patterns start with a letter, "
                "'_' or '*'",
                target.offset,
                SYNTAX,
            )
        self.advance()
        pattern = THEM if keyword == THEM else target.text
        if quantity.text.lower() == "all":
            return AllOf(pattern, target.offset)
        return OneOf(pattern, target.offset)


def parse_condition(text: str) -> Node:
    """The tree of a condition; raises ConditionError at the first syntax error."""
    if not isinstance(text, str):
        raise ConditionError(
            f"a condition is text, not {type(text).__name__}", 0, SYNTAX, "quote the condition"
        )
    if len(text) > MAX_LENGTH:
        raise ConditionError(
            f"condition is too long ({len(text)} characters, at most {MAX_LENGTH})",
            MAX_LENGTH,
            SYNTAX,
            "split the rule",
        )
    return _Parser(text).parse()


def _known(names: Sequence[str]) -> str:
    if not names:
        return "the rule defines no selections"
    shown = ", ".join(names[:_HINT_NAMES])
    more = f" and {len(names) - _HINT_NAMES} more" if len(names) > _HINT_NAMES else ""
    return f"selections defined: {shown}{more}"


def _matching(pattern: str, offset: int, names: Sequence[str]) -> tuple[Ref, ...]:
    if pattern == THEM:
        found = [name for name in names if not name.startswith("_")]
        hint = "'them' leaves out selections whose name starts with '_'" if names else _known(names)
    else:
        glob = re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)
        found = [name for name in names if glob.fullmatch(name)]
        hint = _known(names)
    if not found:
        raise ConditionError(
            f"'{pattern}' matches no selection", offset, PATTERN_MATCHES_NOTHING, hint
        )
    return tuple(Ref(name, offset) for name in found)


def expand(node: Node, names: Sequence[str]) -> Node:
    """Replace `1 of`/`all of` by or/and of the matching selections, in `names` order."""
    ordered = list(dict.fromkeys(names))
    known = frozenset(ordered)

    def walk(node: Node) -> Node:
        match node:
            case Ref(name=name, offset=offset):
                if name not in known:
                    hint = nearest(name, ordered) or _known(ordered)
                    raise ConditionError(
                        f"unknown selection '{name}'", offset, UNKNOWN_SELECTION, hint
                    )
                return node
            case Not(operand=operand):
                return Not(walk(operand))
            case And(operands=operands):
                return And(tuple(walk(operand) for operand in operands))
            case Or(operands=operands):
                return Or(tuple(walk(operand) for operand in operands))
            case OneOf(pattern=pattern, offset=offset):
                refs = _matching(pattern, offset, ordered)
                return refs[0] if len(refs) == 1 else Or(refs)
            case AllOf(pattern=pattern, offset=offset):
                refs = _matching(pattern, offset, ordered)
                return refs[0] if len(refs) == 1 else And(refs)
            case _:
                assert_never(node)

    return walk(node)


def _unexpanded(node: OneOf | AllOf) -> ValueError:
    return ValueError(f"'{describe(node)}' is not expanded: call expand() first")


def referenced(node: Node) -> set[str]:
    """The selection names an expanded condition refers to."""
    names: set[str] = set()
    pending = [node]
    while pending:
        match pending.pop():
            case Ref(name=name):
                names.add(name)
            case Not(operand=operand):
                pending.append(operand)
            case And(operands=operands) | Or(operands=operands):
                pending.extend(operands)
            case OneOf() | AllOf() as pattern:
                raise _unexpanded(pattern)
    return names


def _simplify(node: Node) -> Node:
    match node:
        case Ref():
            return node
        case Not(operand=Not(operand=inner)):
            return _simplify(inner)
        case Not(operand=operand):
            return Not(_simplify(operand))
        case And(operands=operands):
            flat: list[Node] = []
            for operand in operands:
                part = _simplify(operand)
                flat.extend(part.operands if isinstance(part, And) else (part,))
            return flat[0] if len(flat) == 1 else And(tuple(flat))
        case Or(operands=operands):
            flat = []
            for operand in operands:
                part = _simplify(operand)
                flat.extend(part.operands if isinstance(part, Or) else (part,))
            return flat[0] if len(flat) == 1 else Or(tuple(flat))
        case OneOf() | AllOf():
            raise _unexpanded(node)
        case _:
            assert_never(node)


def every_of(parts: tuple[Callable[[T], bool], ...]) -> Callable[[T], bool]:
    if len(parts) == 2:
        first, second = parts

        def both(event: T) -> bool:
            return first(event) and second(event)

        return both

    # A plain loop: all() over a generator costs a frame per event on the hot path.
    def every(event: T) -> bool:
        for part in parts:  # noqa: SIM110
            if not part(event):
                return False
        return True

    return every


def some_of(parts: tuple[Callable[[T], bool], ...]) -> Callable[[T], bool]:
    if len(parts) == 2:
        first, second = parts

        def either(event: T) -> bool:
            return first(event) or second(event)

        return either

    def some(event: T) -> bool:
        for part in parts:  # noqa: SIM110 (see _every)
            if part(event):
                return True
        return False

    return some


def _build(node: Node, predicates: Mapping[str, Callable[[T], bool]]) -> Callable[[T], bool]:
    match node:
        case Ref(name=name, offset=offset):
            predicate = predicates.get(name)
            if predicate is None:
                raise ConditionError(f"unknown selection '{name}'", offset, UNKNOWN_SELECTION)
            return predicate
        case Not(operand=operand):
            inner = _build(operand, predicates)

            def negated(event: T) -> bool:
                return not inner(event)

            return negated
        case And(operands=operands):
            return every_of(tuple(_build(operand, predicates) for operand in operands))
        case Or(operands=operands):
            return some_of(tuple(_build(operand, predicates) for operand in operands))
        case OneOf() | AllOf():
            raise _unexpanded(node)
        case _:
            assert_never(node)


def compile_condition(
    node: Node, predicates: Mapping[str, Callable[[T], bool]]
) -> Callable[[T], bool]:
    """A short-circuiting predicate for an expanded condition, from one predicate per selection."""
    return _build(_simplify(node), predicates)


def _bound(
    node: Node,
    leaves: Mapping[str, B | None],
    both: Callable[[B, B], B],
    either: Callable[[B, B], B],
) -> B | None:
    match node:
        case Ref(name=name):
            return leaves.get(name)
        case Not():
            return None
        case And(operands=operands):
            # A match satisfies every operand, so any bounded operand bounds the whole.
            bound: B | None = None
            for operand in operands:
                found = _bound(operand, leaves, both, either)
                if found is not None:
                    bound = found if bound is None else both(bound, found)
            return bound
        case Or(operands=operands):
            union: B | None = None
            for operand in operands:
                found = _bound(operand, leaves, both, either)
                if found is None:
                    return None
                union = found if union is None else either(union, found)
            return union
        case OneOf() | AllOf():
            raise _unexpanded(node)
        case _:
            assert_never(node)


def bound(
    node: Node,
    leaves: Mapping[str, B | None],
    both: Callable[[B, B], B],
    either: Callable[[B, B], B],
) -> B | None:
    """What every event matching an expanded condition satisfies, from what each selection's
    matches satisfy (`leaves`; None or absent: nothing known): an AND combines its operands'
    bounds with `both`, an OR with `either` (unbounded if any operand is), a NOT is unbounded.
    """
    return _bound(_simplify(node), leaves, both, either)


def required_values(
    node: Node, constraints: Mapping[str, frozenset[str] | None]
) -> frozenset[str] | None:
    """The values of the indexed field an event needs to match (None: any value may match).

    `constraints` gives that set per selection (None or absent: unconstrained). The result
    may be larger than needed but never smaller; an empty set means the condition never matches.
    """
    return bound(node, constraints, frozenset.__and__, frozenset.__or__)


def _wrap(node: Node, grouped: tuple[type[And] | type[Or], ...]) -> str:
    text = describe(node)
    return f"({text})" if isinstance(node, grouped) else text


def describe(node: Node) -> str:
    """Canonical text of a condition; parsing it gives back the same tree (offsets aside)."""
    match node:
        case Ref(name=name):
            return name
        case OneOf(pattern=pattern):
            return f"1 of {pattern}"
        case AllOf(pattern=pattern):
            return f"all of {pattern}"
        case Not(operand=operand):
            return f"not {_wrap(operand, (And, Or))}"
        case And(operands=operands):
            # Nested ands keep their parentheses so that the text parses back to the same tree.
            return " and ".join(_wrap(operand, (And, Or)) for operand in operands)
        case Or(operands=operands):
            return " or ".join(_wrap(operand, (Or,)) for operand in operands)
        case _:
            assert_never(node)
