"""Compile one Sigma field condition (`field|modifier: value`) to a fast linear-time predicate."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Final, Literal

# google-re2 ships no type stubs. It is the only regex engine used for rule-authored text:
# RE2 runs in time linear in the input, so no rule can stall the agent (no ReDoS).
import re2  # type: ignore[import-untyped]

from agent.events import FIELDS, Event

Test = Callable[[Any], bool]
_StrTest = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Gate:
    """A necessary condition of a matcher, for the engine's one-pass prefilter.

    The matcher can only be true when some text of `field` (the string, each string of a
    tuple, the decimal text of a number) is matched by the RE2 `pattern` (searched), on the
    text lower-cased when `folded`, else as it is. A matcher's gates are alternatives (a
    list of values is OR); `weight` is about how many characters the pattern pins down,
    for picking the most selective gate of an AND."""

    field: str
    folded: bool
    pattern: str
    weight: int
    # When the pattern is a plain literal: how it must occur in the text ("exact": the whole
    # text, "prefix", "suffix", "contains"), so that a dict or `in` can decide it. For a
    # number comparison (gt, gte, lt, lte) there is no pattern: the field's number compared
    # with `bound` (the text of a decimal string counts as its number); "eq": equal to the
    # integer `bound` (a plain `field: 0`).
    kind: Literal[
        "exact", "prefix", "suffix", "contains", "pattern", "gt", "gte", "lt", "lte", "eq"
    ] = "pattern"
    literal: str = ""
    bound: float = 0.0


# (test, `equals` for the action/location index, the gates: see Gate)
_Built = tuple[Test, frozenset[str] | None, frozenset[Gate] | None]


class MatcherError(Exception):
    """A field condition that does not compile. `code` is stable for tooling; `hint` says
    how to fix the rule."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(code, message, hint)
        self.code = code
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" + (f" (hint: {self.hint})" if self.hint else "")


@dataclass(frozen=True, slots=True)
class FieldMatcher:
    """A compiled field condition; call it with an Event.

    `equals` is set only for a plain case-insensitive equality on strings: it then holds the
    lower-cased values, and `test(v)` is exactly "v (or any element of a tuple v, or the
    decimal string of an int v), lower-cased, is in `equals`", so an engine may index on it."""

    field: str
    modifiers: tuple[str, ...]
    test: Test
    equals: frozenset[str] | None
    # The field's getter, looked up once at compile time rather than per event.
    getter: Callable[[Event], Any] = dataclasses.field(repr=False, compare=False)
    # Alternatives one of which holds whenever the matcher does (None: no such bound).
    gates: frozenset[Gate] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __call__(self, event: Event) -> bool:
        return self.test(self.getter(event))


# ---------------------------------------------------------------------------------------------
# RE2 plumbing

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors come back as MatcherError, not as lines on stderr
_RE2_OPTIONS.never_capture = True  # we only ask "does it match": no submatch bookkeeping

# Paths may hold lone surrogates (undecodable bytes kept by surrogateescape); RE2 takes UTF-8,
# so each one becomes U+FFFD: still one character for `?` and `.`, never a false literal.
_SURROGATES: Final = dict.fromkeys(range(0xD800, 0xE000), 0xFFFD)


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.translate(_SURROGATES).encode()


def _re2_compile(pattern: str, key: str) -> Any:
    try:
        return re2.compile(_utf8(pattern), _RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        text = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
        raise MatcherError(
            "RULE_BAD_REGEX",
            f"{key}: {text}",
            "rules use RE2 syntax (github.com/google/re2/wiki/Syntax): "
            "no backreferences or lookaround",
        ) from None


def _regex_test(rx: Any) -> _StrTest:
    search = rx.search  # bound once: the per-event cost is the RE2 call only
    return lambda s: search(_utf8(s)) is not None


def _lit(text: str) -> str:
    """`text` as an RE2 literal: ASCII letters and digits as they are, anything else as \\x{..}
    (cannot be misread as syntax, whatever the character)."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else _hex(c) for c in text)


def _hex(c: str) -> str:
    """One character as an RE2 \\x{..} escape; a lone surrogate as U+FFFD, as `_utf8` does."""
    code = ord(c)
    return f"\\x{{{0xFFFD if 0xD800 <= code < 0xE000 else code:x}}}"


# ---------------------------------------------------------------------------------------------
# Sigma wildcard strings: `*`, `?`, escapes `\*` `\?` `\\` (any other backslash is literal)


class _W(Enum):
    STAR = "*"
    ONE = "?"


_Token = str | _W


def _sigma_tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "*?\\":
            buf.append(text[i + 1])
            i += 2
            continue
        if c in "*?":
            if buf:
                out.append("".join(buf))
                buf = []
            out.append(_W.STAR if c == "*" else _W.ONE)
        else:
            buf.append(c)
        i += 1
    if buf:
        out.append("".join(buf))
    return out


def _normalize(tokens: list[_Token], cased: bool) -> list[_Token]:
    """Adjacent stars collapse (same language, simpler pattern); literals lower-cased unless
    `cased`, because case-insensitive means comparing `str.lower()` of both sides."""
    out: list[_Token] = []
    for tok in tokens:
        if tok is _W.STAR and out and out[-1] is _W.STAR:
            continue
        out.append(tok if isinstance(tok, _W) or cased else tok.lower())
    return out


@dataclass(frozen=True, slots=True)
class _Wild:
    """One value as a wildcard pattern, classified for the cheapest test that decides it."""

    kind: Literal["exact", "prefix", "suffix", "contains", "any", "general"]
    text: str  # the literal for exact/prefix/suffix/contains; the RE2 body for general


def _classify(tokens: list[_Token]) -> _Wild:
    if not tokens:
        return _Wild("exact", "")
    if all(isinstance(t, str) for t in tokens):
        return _Wild("exact", "".join(t for t in tokens if isinstance(t, str)))
    if tokens == [_W.STAR]:
        return _Wild("any", "")
    star = _W.STAR
    if len(tokens) == 2 and tokens[0] is star and isinstance(tokens[1], str):
        return _Wild("suffix", tokens[1])
    if len(tokens) == 2 and isinstance(tokens[0], str) and tokens[1] is star:
        return _Wild("prefix", tokens[0])
    if len(tokens) == 3 and tokens[0] is star and tokens[2] is star and isinstance(tokens[1], str):
        return _Wild("contains", tokens[1])
    body = "".join(".*" if t is _W.STAR else "." if t is _W.ONE else _lit(t) for t in tokens)
    return _Wild("general", body)


def _text_any(wilds: Sequence[_Wild], key: str) -> _StrTest:
    """One test on an already case-folded string: true if any of `wilds` matches. Each kind is
    batched into one C-level call (set lookup, startswith/endswith on a tuple, one RE2
    alternation), so a long list costs about what one value does."""
    exact = frozenset(w.text for w in wilds if w.kind == "exact")
    prefixes = tuple(w.text for w in wilds if w.kind == "prefix")
    suffixes = tuple(w.text for w in wilds if w.kind == "suffix")
    needles = tuple(w.text for w in wilds if w.kind == "contains")
    general = [w.text for w in wilds if w.kind == "general"]
    if any(w.kind == "any" for w in wilds):
        return lambda s: True
    checks: list[_StrTest] = []
    if exact:
        checks.append(exact.__contains__)
    if prefixes:
        checks.append(lambda s: s.startswith(prefixes))
    if suffixes:
        checks.append(lambda s: s.endswith(suffixes))
    if len(needles) == 1:
        needle = needles[0]
        checks.append(lambda s: needle in s)
    elif needles:
        checks.append(lambda s: any(n in s for n in needles))
    if general:
        # (?s): `*` and `?` match newlines too (file names and command lines can hold them).
        pattern = "(?s)\\A(?:" + "|".join(general) + ")\\z"
        checks.append(_regex_test(_re2_compile(pattern, key)))
    if not checks:
        return lambda s: False
    if len(checks) == 1:
        return checks[0]
    return lambda s: any(check(s) for check in checks)


# ---------------------------------------------------------------------------------------------
# Lifting a scalar test to every value shape a field can hold


def _lift_any(scalar: Test) -> Test:
    """Tuple fields match if any element does; an empty tuple is an absent field (None)."""

    def test(v: Any) -> bool:
        if type(v) is tuple:
            return any(scalar(x) for x in v) if v else scalar(None)
        return scalar(v)

    return test


def _lift_all(scalars: Sequence[Test]) -> Test:
    """`all`: every value must match (some element of a tuple field). An empty value list
    never matches: a vacuous truth would fire on every event."""
    if not scalars:
        return _never

    def test(v: Any) -> bool:
        elements = (v if v else (None,)) if type(v) is tuple else (v,)
        return all(any(s(x) for x in elements) for s in scalars)

    return test


def _never(v: Any) -> bool:
    return False


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Parsed key


@dataclass(frozen=True, slots=True)
class _Spec:
    key: str
    field: str
    modifiers: tuple[str, ...]
    match: str | None  # the one match modifier, None for plain equality
    cased: bool
    all: bool
    flags: str  # regex sub-modifiers, e.g. "is"


def _bad_value(spec: _Spec, message: str, hint: str) -> MatcherError:
    return MatcherError("RULE_BAD_VALUE", f"{spec.key}: {message}", hint)


# ---------------------------------------------------------------------------------------------
# Builders, one per match modifier (None = plain equality)

_Builder = Callable[[list[object], _Spec], _Built]


def _strings(left: bool, right: bool) -> _Builder:
    """Plain equality (no stars added), contains (both), startswith (right), endswith (left)."""

    def build(values: list[object], spec: _Spec) -> _Built:
        plain = spec.match is None
        nulls = False
        numbers: set[int | float] = set()
        wilds: list[_Wild] = []
        for v in values:
            if v is None:
                if not plain:
                    raise _bad_value(
                        spec, f"{spec.match} needs a string, not null", "null alone means absent"
                    )
                nulls = True
                continue
            if isinstance(v, bool):
                raise _bad_value(
                    spec,
                    f"a boolean ({str(v).lower()}) is not a string",
                    f"quote it ('{str(v).lower()}'), or use {spec.field}|exists: true",
                )
            if _is_number(v):
                assert isinstance(v, int | float)
                _check_finite(v, spec)
                if plain:
                    numbers.add(v)  # equal to a number field numerically...
                tokens: list[_Token] = [str(v)]  # ...and to a string field by its text
            elif isinstance(v, str):
                tokens = _sigma_tokens(v)
            else:
                raise _bad_value(spec, f"{type(v).__name__} is not a string", "use a string")
            tokens = ([_W.STAR] if left else []) + tokens + ([_W.STAR] if right else [])
            wilds.append(_classify(_normalize(tokens, spec.cased)))

        matches = _text_any(wilds, spec.key)
        text = matches if spec.cased else lambda s: matches(s.lower())
        frozen_numbers = frozenset(numbers)

        def scalar(v: Any) -> bool:
            if type(v) is str:
                return text(v)
            if v is None:
                return nulls
            if _is_number(v):
                return v in frozen_numbers or text(str(v))
            return False

        slow = _lift_any(scalar)
        gates = None if nulls or numbers else _wild_gates(wilds, spec)
        if plain and numbers and not nulls and all(type(v) is int for v in values):
            # Only integers: a match is a number equal to one (str(n) is decimal text, so a
            # string that matches it as text is a decimal string of that number too).
            gates = frozenset(
                Gate(spec.field, False, "", len(str(n)) + 1, "eq", bound=n) for n in numbers
            )
        if not (plain and not spec.cased and not nulls and not numbers):
            return slow, None, gates
        if not all(w.kind == "exact" for w in wilds):
            return slow, None, gates
        equals = frozenset(w.text for w in wilds)

        def test(v: Any) -> bool:
            # The hot path of most rules: one lower() and one set lookup.
            if type(v) is str:
                return v.lower() in equals
            return slow(v)

        return test, equals, gates

    return build


def _wild_gates(wilds: Sequence[_Wild], spec: _Spec) -> frozenset[Gate] | None:
    """The gates of a text matcher: one RE2 pattern per value, saying what `_text_any` tests
    (exact: the whole text, prefix, suffix, contains, general: the wildcard pattern). A lone
    surrogate is U+FFFD on both sides (`_hex`, `_utf8`): a gate may pass more, never less."""
    gates = set()
    for w in wilds:
        if w.kind == "any" or (w.kind != "exact" and not w.text):
            return None  # matches any text
        if w.kind == "general":
            pattern = "(?s)\\A(?:" + w.text + ")\\z"
            gates.add(Gate(spec.field, not spec.cased, pattern, _pinned(w.text)))
            continue
        start = "\\A" if w.kind in ("exact", "prefix") else ""
        end = "\\z" if w.kind in ("exact", "suffix") else ""
        pattern, weight = start + _lit(w.text) + end, len(w.text) + (w.kind == "exact")
        kind: Literal["exact", "prefix", "suffix", "contains"] = w.kind
        gates.add(Gate(spec.field, not spec.cased, pattern, weight, kind, w.text))
    return frozenset(gates)


def _pinned(body: str) -> int:
    """About how many characters an RE2 body of `_lit` literals and wildcards pins down."""
    return len(_ESCAPE.sub("x", body).replace(".*", "").replace(".", ""))


_ESCAPE: Final = re2.compile(r"\\x\{[0-9a-f]+\}")


_plain = _strings(False, False)


def _check_finite(v: float, spec: _Spec) -> None:
    # An int is always finite (and math.isfinite overflows on one too large for a float).
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad_value(spec, f"{v} is not a finite number", "use a finite number")


def _regex(values: list[object], spec: _Spec) -> _Built:
    patterns: list[str] = []
    for v in values:
        if not isinstance(v, str):
            raise _bad_value(
                spec, f"re takes a pattern string, not {type(v).__name__}", "quote the pattern"
            )
        patterns.append(v)
    flags = f"(?{spec.flags})" if spec.flags else ""
    compiled = [_re2_compile(flags + p, spec.key) for p in patterns]  # each checked on its own
    if len(compiled) > 1 and not any("\\Q" in p for p in patterns):
        # One alternation is one RE2 pass. Each pattern compiled alone above, so it is a whole
        # expression and a group around it keeps it one; \Q...\E quoting could swallow the
        # group's parenthesis, so such lists stay separate.
        try:
            combined = re2.compile(
                _utf8(flags + "|".join(f"(?:{p})" for p in patterns)), _RE2_OPTIONS
            )
        except re2.error:
            pass  # e.g. over RE2's memory budget together: test them one by one
        else:
            compiled = [combined]
    tests = [_regex_test(rx) for rx in compiled]
    gates = frozenset(Gate(spec.field, False, flags + p, 0) for p in patterns)
    if len(tests) == 1:
        return _lift_any(_on_text(tests[0])), None, gates
    return _lift_any(_on_text(lambda s: any(t(s) for t in tests))), None, gates


def _on_text(text: _StrTest) -> Test:
    """A scalar test for text matchers: strings as they are, numbers by their decimal text."""

    def scalar(v: Any) -> bool:
        if type(v) is str:
            return text(v)
        if _is_number(v):
            return text(str(v))
        return False

    return scalar


def _path(values: list[object], spec: _Spec) -> _Built:
    exact: set[str] = set()
    prefixes: list[str] = []
    for v in values:
        if not isinstance(v, str) or not v.startswith("/"):
            raise _bad_value(
                spec,
                f"path takes an absolute path, not {v!r}",
                "path compares absolute paths component by component; "
                "for a relative pattern use glob, e.g. '**/rnd/**'",
            )
        base = v.rstrip("/")  # "/rnd/" means "/rnd"; "/" becomes "" and "/" matches all
        exact.add(base)
        prefixes.append(base + "/")
    exact_set = frozenset(exact)
    prefix_tuple = tuple(prefixes)
    # Component-wise: "/rnd" or anything under "/rnd/", never "/rnd_old". Case-sensitive.
    # "/rnd" or under "/rnd/" starts with "/rnd" (a path of "/" gates nothing).
    gates = frozenset(
        Gate(spec.field, False, "\\A" + _lit(base), len(base), "prefix", base) for base in exact
    )
    test = _lift_any(_on_text(lambda s: s in exact_set or s.startswith(prefix_tuple)))
    return test, None, gates if "" not in exact else None


def _glob_regex(glob: str, spec: _Spec) -> str:
    """Shell glob -> RE2 body: `*` and `?` stay inside one component, `**` as a whole
    component is zero or more components, `[...]` / `[!...]` classes, `\\x` escapes x."""
    glob = glob.rstrip("/") or glob  # a trailing slash is ignored, as for `path`
    parts: list[str] = []
    for part in glob.split("/"):
        if part == "**" and parts and parts[-1] == "**":
            continue  # **/** is **
        parts.append(part)
    out: list[str] = []
    n = len(parts)
    for i, part in enumerate(parts):
        if part == "**":
            if n == 1:
                out.append(".*")
            elif i == 0:
                out.append("(?:.*/)?")  # absorbs the slash after it
            elif i == n - 1:
                out.append("(?:/.*)?")  # the directory itself, or anything beneath
            else:
                out.append("/(?:.*/)?")
            continue
        if i > 0 and parts[i - 1] != "**":
            out.append("/")
        out.append(_glob_component(part, spec))
    return "".join(out)


def _glob_component(part: str, spec: _Spec) -> str:
    out: list[str] = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        if c == "\\" and i + 1 < n:
            out.append(_lit(part[i + 1]))
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            cls, i = _glob_class(part, i, spec)
            out.append(cls)
        else:
            out.append(_lit(c))
            i += 1
    return "".join(out)


def _glob_class(part: str, start: int, spec: _Spec) -> tuple[str, int]:
    i = start + 1
    negate = i < len(part) and part[i] in "!^"
    if negate:
        i += 1
    members: list[str] = []
    first = True
    while i < len(part) and (first or part[i] != "]"):
        lo = part[i]
        if i + 2 < len(part) and part[i + 1] == "-" and part[i + 2] != "]":
            hi = part[i + 2]
            if hi < lo:
                raise _bad_value(
                    spec, f"glob range {lo}-{hi} is reversed", f"write it as {hi}-{lo}"
                )
            members.append(f"{_hex(lo)}-{_hex(hi)}")
            i += 3
        else:
            members.append(_hex(lo))
            i += 1
        first = False
    if i >= len(part):
        raise _bad_value(
            spec,
            f"unclosed [ in glob component {part!r}",
            "close the class, or write [[] for a literal [",
        )
    # A class never matches "/": glob classes stay inside one component.
    body = "".join(members)
    return (f"[^/{body}]" if negate else f"[{body}]"), i + 1


def _glob(values: list[object], spec: _Spec) -> _Built:
    bodies: list[str] = []
    for v in values:
        if not isinstance(v, str) or not v:
            raise _bad_value(spec, f"glob takes a non-empty pattern, not {v!r}", "e.g. /rnd/**")
        bodies.append(_glob_regex(v, spec))
    # (?s): file names may contain newlines; globs are case-sensitive, like paths.
    pattern = "(?s)\\A(?:" + "|".join(bodies) + ")\\z"
    rx = _re2_compile(pattern, spec.key)
    gate = Gate(spec.field, False, pattern, min(_pinned(b) for b in bodies))
    return _lift_any(_on_text(_regex_test(rx))), None, frozenset({gate})


def _exists(values: list[object], spec: _Spec) -> _Built:
    want = values[0] if len(values) == 1 else None
    if not isinstance(want, bool):
        raise _bad_value(spec, "exists takes true or false", f"{spec.field}|exists: true")

    def test(v: Any) -> bool:
        # Absent: None, or an empty tuple (a list field with no elements).
        return (v is not None and v != ()) is want

    return test, None, None


def _numeric(op: Callable[[Any, Any], bool]) -> _Builder:
    def build(values: list[object], spec: _Spec) -> _Built:
        bound = values[0] if len(values) == 1 else None
        if not _is_number(bound):
            raise _bad_value(
                spec,
                f"{spec.match} takes one number, not {bound!r}",
                f"e.g. {spec.field}|{spec.match}: 1048576 (unquoted)",
            )
        assert isinstance(bound, int | float)
        _check_finite(bound, spec)

        def scalar(v: Any) -> bool:
            if type(v) is int or type(v) is float:
                return op(v, bound)
            # uid/gid/inode are decimal strings on the event; compare them as numbers.
            if type(v) is str and _is_decimal(v):
                return op(int(v), bound)
            return False  # None, booleans, text: never

        kind: Literal["gt", "gte", "lt", "lte"] = spec.match  # type: ignore[assignment]
        gate = Gate(spec.field, False, "", 3, kind, bound=bound)
        return _lift_any(scalar), None, frozenset({gate})

    return build


def _is_decimal(s: str) -> bool:
    digits = s[1:] if s.startswith("-") else s
    return digits.isascii() and digits.isdigit()


# ---------------------------------------------------------------------------------------------
# The modifier registry


@dataclass(frozen=True, slots=True)
class Modifier:
    """A supported modifier. Role "match" picks how values compare (at most one per key),
    "option" adjusts it, "flag" is a regex sub-modifier (`re|i`)."""

    name: str
    role: Literal["match", "option", "flag"]
    summary: str
    build: _Builder | None = dataclasses.field(default=None, repr=False)


MODIFIERS: dict[str, Modifier] = {
    m.name: m
    for m in (
        Modifier("contains", "match", "substring; wildcards apply", _strings(True, True)),
        Modifier("startswith", "match", "prefix; wildcards apply", _strings(False, True)),
        Modifier("endswith", "match", "suffix; wildcards apply", _strings(True, False)),
        Modifier("re", "match", "RE2 regex, searched, case-sensitive unless re|i", _regex),
        Modifier("path", "match", "absolute path or anything beneath (by component)", _path),
        Modifier("glob", "match", "shell glob over a path: * ? [..] and **", _glob),
        Modifier("exists", "match", "true: field present; false: absent", _exists),
        Modifier("gt", "match", "number greater than", _numeric(operator.gt)),
        Modifier("gte", "match", "number greater than or equal", _numeric(operator.ge)),
        Modifier("lt", "match", "number less than", _numeric(operator.lt)),
        Modifier("lte", "match", "number less than or equal", _numeric(operator.le)),
        Modifier("cased", "option", "case-sensitive equality/contains/startswith/endswith"),
        Modifier("all", "option", "a list matches only if all its values do"),
        Modifier("expand", "option", "%name% placeholders take the values of a named list"),
        Modifier("i", "flag", "re|i: case-insensitive regex"),
        Modifier("m", "flag", "re|m: ^ and $ match at line breaks"),
        Modifier("s", "flag", "re|s: . matches a line break"),
        # pySigma's long names of the same flags.
        Modifier("ignorecase", "flag", "re|ignorecase: re|i"),
        Modifier("multiline", "flag", "re|multiline: re|m"),
        Modifier("dotall", "flag", "re|dotall: re|s"),
        Modifier("neq", "option", "the field has a value and it is none of the given ones"),
    )
}
_FLAG_LETTERS = {"i": "i", "m": "m", "s": "s", "ignorecase": "i", "multiline": "m", "dotall": "s"}

# Sigma modifiers we deliberately do not support, with the reason a rule author gets.
UNSUPPORTED: dict[str, str] = {
    "windash": "write the dash variants as a list, e.g. ['-x', '/x']",
    "base64": "event values are decoded text; match the text itself",
    "base64offset": "event values are decoded text; match the text itself",
    "utf16": "event values are decoded text, not Windows UTF-16 logs",
    "utf16le": "event values are decoded text, not Windows UTF-16 logs",
    "utf16be": "event values are decoded text, not Windows UTF-16 logs",
    "wide": "event values are decoded text, not Windows UTF-16 logs",
    "cidr": "file events carry no IP address fields",
    "fieldref": "comparing one field with another is not supported",
    "minute": "time-part modifiers are not supported; compare @timestamp with gt/lt",
    "hour": "time-part modifiers are not supported; compare @timestamp with gt/lt",
    "day": "time-part modifiers are not supported; compare @timestamp with gt/lt",
    "week": "time-part modifiers are not supported; compare @timestamp with gt/lt",
    "month": "time-part modifiers are not supported; compare @timestamp with gt/lt",
    "year": "time-part modifiers are not supported; compare @timestamp with gt/lt",
}

_TEXT_MATCHES: Final = frozenset({None, "contains", "startswith", "endswith"})
_LIST_MATCHES: Final = _TEXT_MATCHES | {"re", "path", "glob"}


def modifier(name: str) -> Modifier:
    """The registered modifier `name`; MatcherError RULE_UNKNOWN_MODIFIER (with a hint)."""
    found = MODIFIERS.get(name)
    if found is not None:
        return found
    if name.lower() in MODIFIERS:
        hint = f"modifiers are lower case: {name.lower()!r}"
    elif name.lower() in UNSUPPORTED:
        hint = f"Sigma's {name.lower()!r} is not supported: {UNSUPPORTED[name.lower()]}"
    else:
        close = difflib.get_close_matches(name, list(MODIFIERS), n=1)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else "supported modifiers: " + ", ".join(MODIFIERS)
        )
    raise MatcherError("RULE_UNKNOWN_MODIFIER", f"unknown modifier {name!r}", hint)


# ---------------------------------------------------------------------------------------------
# Key parsing, values, expansion


def _parse_key(key: object, known_fields: Mapping[str, object]) -> _Spec:
    if not isinstance(key, str):
        raise MatcherError(
            "RULE_UNKNOWN_FIELD", f"field key {key!r} is not a string", "e.g. file.path"
        )
    name, *mods = key.split("|")
    if name not in known_fields:
        close = difflib.get_close_matches(name, list(known_fields), n=1)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else "known fields: " + ", ".join(sorted(known_fields))
        )
        raise MatcherError("RULE_UNKNOWN_FIELD", f"{key}: unknown field {name!r}", hint)
    try:
        specs = [modifier(m) for m in mods]
    except MatcherError as exc:
        raise MatcherError(exc.code, f"{key}: {exc.message}", exc.hint) from None
    if len(set(mods)) != len(mods):
        raise _conflict(key, "a modifier is repeated", "give each modifier once")
    matches = [m.name for m in specs if m.role == "match"]
    if len(matches) > 1:
        hint = (
            "for a prefix and a suffix write one wildcard value, e.g. 'pre*suf'"
            if set(matches) == {"startswith", "endswith"}
            else "use one; combine separate selections with 'and' in the condition"
        )
        raise _conflict(key, f"{' and '.join(matches)} cannot be combined", hint)
    match = matches[0] if matches else None
    names = set(mods)
    if "cased" in names and match not in _TEXT_MATCHES:
        raise _conflict(
            key,
            f"cased does not apply to {match}",
            "re is case-sensitive unless re|i; path and glob are always case-sensitive"
            if match in {"re", "path", "glob"}
            else "cased applies to plain values, contains, startswith and endswith",
        )
    for option in ("all", "expand"):
        if option in names and match not in _LIST_MATCHES:
            raise _conflict(
                key, f"{option} does not apply to {match}", f"{match} takes a single value"
            )
    flags = "".join(sorted({_FLAG_LETTERS[m.name] for m in specs if m.role == "flag"}))
    if "neq" in names and match == "exists":
        raise _conflict(key, "neq does not apply to exists", "write exists: false instead")
    if flags and match != "re":
        raise _conflict(
            key, f"regex flag(s) {flags} without re", f"write {name}|re|{'|'.join(flags)}"
        )
    return _Spec(key, name, tuple(mods), match, "cased" in names, "all" in names, flags)


def _conflict(key: str, message: str, hint: str) -> MatcherError:
    return MatcherError("RULE_MODIFIER_CONFLICT", f"{key}: {message}", hint)


_SCALARS: Final = (str, int, float, bool, type(None))
_MAX_EXPANDED: Final = 10_000


def _values(value: object, spec: _Spec, lists: Mapping[str, Sequence[str]]) -> list[object]:
    if isinstance(value, list | tuple):
        items: list[object] = list(value)
        if not items:
            raise _bad_value(spec, "an empty list matches nothing", "give at least one value")
        if spec.match in {"exists", "gt", "gte", "lt", "lte"}:
            raise _bad_value(spec, f"{spec.match} takes one value, not a list", "give one value")
    else:
        items = [value]
    for item in items:
        if not isinstance(item, _SCALARS):
            raise _bad_value(
                spec,
                f"a value must be a string, number, boolean or null, not {type(item).__name__}",
                "a list of values is OR (AND with |all); nest no further",
            )
    if "expand" in spec.modifiers:
        items = _expand(items, spec, lists)
    return items


def _placeholders(text: str) -> list[tuple[bool, str]]:
    """`text` as (is_placeholder, text) pieces; %name% with name of letters, digits and _.
    A % that does not open a placeholder is literal."""
    pieces: list[tuple[bool, str]] = []
    literal_start = i = 0
    while True:
        j = text.find("%", i)
        k = text.find("%", j + 1) if j >= 0 else -1
        if k < 0:
            break
        name = text[j + 1 : k]
        if name and all(c.isalnum() or c == "_" for c in name):
            if j > literal_start:
                pieces.append((False, text[literal_start:j]))
            pieces.append((True, name))
            literal_start = i = k + 1
        else:
            i = j + 1
    if literal_start < len(text):
        pieces.append((False, text[literal_start:]))
    return pieces


def _expand(items: list[object], spec: _Spec, lists: Mapping[str, Sequence[str]]) -> list[object]:
    out: list[object] = []
    found = False
    for item in items:
        if not isinstance(item, str):
            out.append(item)
            continue
        choices: list[Sequence[str]] = []
        for is_name, text in _placeholders(item):
            if not is_name:
                choices.append((text,))
                continue
            found = True
            choices.append(_named_list(text, spec, lists))
        for combo in itertools.product(*choices):
            out.append("".join(combo))
            if len(out) > _MAX_EXPANDED:
                raise _bad_value(
                    spec,
                    f"expands to more than {_MAX_EXPANDED} values",
                    "use fewer placeholders per value, or shorter lists",
                )
    if not found:
        raise _bad_value(spec, "expand needs a %name% placeholder", "e.g. '%upload_tools%'")
    return out


def _named_list(name: str, spec: _Spec, lists: Mapping[str, Sequence[str]]) -> Sequence[str]:
    if name not in lists:
        close = difflib.get_close_matches(name, list(lists), n=1)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif lists:
            hint = "defined lists: " + ", ".join(sorted(lists))
        else:
            hint = "no lists are defined; define it in the configuration's lists"
        raise MatcherError("RULE_UNKNOWN_LIST", f"{spec.key}: no list named {name!r}", hint)
    values = lists[name]
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise _bad_value(spec, f"list {name!r} must hold strings", "check the list definition")
    return values


# ---------------------------------------------------------------------------------------------

_NO_LISTS: Final[Mapping[str, Sequence[str]]] = MappingProxyType({})


def compile_field(
    key: str,
    value: object,
    *,
    known_fields: Mapping[str, Callable[[Event], Any]] = FIELDS,
    lists: Mapping[str, Sequence[str]] = _NO_LISTS,
) -> FieldMatcher:
    """Compile `field|modifier...: value` from a Sigma selection (MatcherError if invalid).

    Everything is decided here; the returned matcher does one getter call and a precomputed
    test per event. A list value is OR (AND with `all`); tuple fields match on any element;
    int fields compare with string values by their decimal text, with numbers numerically."""
    spec = _parse_key(key, known_fields)
    values = _values(value, spec, lists)
    build = modifier(spec.match).build if spec.match else _plain
    assert build is not None
    gates: frozenset[Gate] | None
    if spec.all:
        # Each value compiled alone, exactly as a one-value list would be; then all of them.
        one = dataclasses.replace(spec, all=False)
        built = [build([v], one) for v in values]
        test, equals = _lift_all([b[0] for b in built]), None
        # Every value must match: the gates of any one of them are necessary.
        gates = max((b[2] for b in built if b[2]), key=_weakest, default=None)
    else:
        test, equals, gates = build(values, spec)
    if "neq" in spec.modifiers:
        test, equals, gates = _differs(test), None, None
    getter = known_fields[spec.field]
    return FieldMatcher(spec.field, spec.modifiers, test, equals, getter, gates)


def _weakest(gates: frozenset[Gate]) -> int:
    """How selective a set of alternative gates is: as much as its least selective one."""
    return min(g.weight for g in gates)


def _differs(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """Sigma's neq: the field is present and matches none of the values (an absent field is
    not "different", as in the backends' `field != value`)."""

    def differs(v: Any) -> bool:
        return v is not None and v != () and not test(v)

    return differs
