"""Located problems (`file:line:col CODE message`) and a YAML reader that keeps marks."""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a file a person edits, pointing at where it is."""

    file: str
    line: int  # 1-based; 0 when the problem concerns the whole file
    col: int  # 1-based; 0 when unknown
    code: str  # stable, e.g. CFG_UNKNOWN_KEY
    message: str
    hint: str = ""
    severity: str = ERROR

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.col} {self.code} {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProblemsError(Exception):
    """Raised when a file could not be accepted; carries every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def errors_only(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == ERROR]


def format_problems(problems: Iterable[Problem], fmt: str = "text") -> str:
    items = list(problems)
    if fmt == "json":
        return json.dumps([p.to_dict() for p in items], indent=2)
    return "\n".join(str(p) for p in items)


def nearest(word: str, choices: Iterable[str]) -> str:
    """A 'did you mean' hint, or empty when nothing is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{found[0]}'?" if found else ""


def at(file: str, node: yaml.Node | None, code: str, message: str, hint: str = "") -> Problem:
    """A problem located at a YAML node (marks are 0-based, ours are 1-based)."""
    if node is None:
        return Problem(file, 0, 0, code, message, hint)
    mark = node.start_mark
    return Problem(file, mark.line + 1, mark.column + 1, code, message, hint)


def _marked(file: str, code: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
    msg = exc.problem or "invalid YAML"
    if exc.context:
        msg = f"{exc.context}: {msg}"
    return Problem(file, line, col, code, msg)


# Line breaks as PyYAML counts them for its marks (a lone \r, NEL, LS and PS are breaks too).
_YAML_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
_KEY_COLON = re.compile(r":(\s|$)")
_BLOCK_SCALAR = re.compile(r"[|>][-+0-9]*\s*(#.*)?$")
_QUOTE_LOST = ("found unexpected end of stream", "found unexpected document separator")


def decode_utf8(data: bytes, file: str, code_prefix: str) -> tuple[str | None, list[Problem]]:
    """The text of a file a person edits, or a problem at its first byte that is not UTF-8."""
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        bad = exc.start
    start = data.rfind(b"\n", 0, bad) + 1
    line = data.count(b"\n", 0, bad) + 1
    col = len(data[start:bad].decode("utf-8")) + 1  # in characters, as editors count
    hint = "save the file as UTF-8"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        hint = "the file is UTF-16 (it starts with a byte order mark); save it as UTF-8"
    message = f"not UTF-8: byte 0x{data[bad]:02x} is not a character"
    return None, [Problem(file, line, col, f"{code_prefix}_ENCODING", message, hint)]


def yaml_problem(file: str, code: str, exc: yaml.YAMLError, text: str) -> Problem:
    """A YAML syntax error located at the mistake, with a hint for the common ones.

    PyYAML stops where it noticed the error, often at the next token: a line late for a
    missing ':', at the end of the file for an unclosed quote or bracket. The context mark
    (where the key, quote or bracket began) is the mistake then."""
    if isinstance(exc, yaml.reader.ReaderError):
        # Raised before any mark exists; its position indexes the text.
        before = text[: max(exc.position, 0)]
        line = len(_YAML_BREAK.findall(before))
        col = len(before) - max((m.end() for m in _YAML_BREAK.finditer(before)), default=0)
        hint = f'remove it; inside double quotes, write it as "\\u{exc.character:04x}"'
        message = f"character U+{exc.character:04X} is not allowed in YAML"
        return Problem(file, line + 1, col + 1, code, message, hint)
    if not isinstance(exc, yaml.MarkedYAMLError):
        return Problem(file, 0, 0, code, str(exc))
    message = exc.problem or "invalid YAML"
    if exc.context:
        message = f"{exc.context}: {message}"
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return Problem(file, 0, 0, code, message)
    lines = _YAML_BREAK.split(text)
    where, hint = _mistake(exc, mark, lines, text)
    return Problem(file, where[0] + 1, where[1] + 1, code, message, hint)


def _mistake(
    exc: yaml.MarkedYAMLError, mark: yaml.Mark, lines: list[str], text: str
) -> tuple[tuple[int, int], str]:
    """(0-based line and column of the mistake, a hint) for a syntax error PyYAML reported
    at `mark` (its problem mark, or its context mark when it has none)."""
    problem = exc.problem or ""
    context = exc.context or ""
    here = (mark.line, mark.column)
    start = exc.context_mark
    if start is not None and context == "while scanning a simple key":
        return _missing_colon(start, lines)
    if start is not None and "quoted scalar" in context and problem in _QUOTE_LOST:
        quote = _char(text, start.index)
        hint = f"unclosed quote started at line {start.line + 1}; close it with {quote}"
        return (start.line, start.column), hint
    flow = context.startswith("while parsing a flow")
    if start is not None and flow and problem.startswith("expected ','"):
        return _unclosed_flow(exc, start, mark, lines, text)
    if problem == "mapping values are not allowed here":
        return _colon_in_value(mark, lines)
    if problem.startswith("found character '\\t'"):
        return here, "indent with spaces: YAML does not allow tabs"
    if problem.startswith("found character") and "cannot start any token" in problem:
        return here, f"{_char(text, mark.index)} cannot start a value; quote the value"
    if problem.startswith("found undefined alias") or context.startswith("while scanning an a"):
        return here, "'*' and '&' start an alias or an anchor; quote the value"
    if problem.startswith("expected <block end>"):
        return _block_end(exc, mark, text)
    if context.startswith("expected a single document"):
        return here, "this file holds one document: remove the '---' line"
    if problem == "sequence entries are not allowed here":
        return here, "start the list on the next line, or write it as [a, b]"
    if problem.endswith("but found ','"):
        return here, "a ',' where a value should be"
    return here, ""


def _char(text: str, index: int) -> str:
    return repr(text[index]) if 0 <= index < len(text) else "the character"


def _line(lines: list[str], line: int) -> str:
    return lines[line] if 0 <= line < len(lines) else ""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _content(line: str) -> str:
    """A line without indentation and list dashes; empty for a blank or comment line."""
    stripped = line.strip()
    while stripped.startswith("- ") or stripped == "-":
        stripped = stripped[1:].lstrip()
    return "" if stripped.startswith("#") else stripped


def _opens(line: str) -> bool:
    """Whether a line ends with a key whose value is on the lines below."""
    content = _content(line).split(" #", 1)[0].rstrip()
    return content.endswith(":")


def _before(lines: list[str], line: int) -> int:
    """The nearest line above `line` with content, or -1."""
    k = line - 1
    while k >= 0 and not _content(lines[k]):
        k -= 1
    return k


def _missing_colon(start: yaml.Mark, lines: list[str]) -> tuple[tuple[int, int], str]:
    """A key with no ':' (PyYAML notices at the line after it)."""
    above = _before(lines, start.line)
    if above >= 0 and _BLOCK_SCALAR.search(lines[above].rstrip()):
        hint = "the text of a '|' or '>' block must be indented more than its key"
        return (start.line, start.column), hint
    word = _line(lines, start.line)[start.column :].split(maxsplit=1)
    if not word:
        return (start.line, start.column), "did you forget a ':'?"
    key = word[0]
    if ":" in key.strip(":"):
        return (start.line, start.column + key.index(":", 1)), "put a space after the ':'"
    return (start.line, start.column + len(key)), f"did you forget a ':' after {key[:40]!r}?"


def _unclosed_flow(
    exc: yaml.MarkedYAMLError, start: yaml.Mark, mark: yaml.Mark, lines: list[str], text: str
) -> tuple[tuple[int, int], str]:
    """A '[' or '{' not closed (PyYAML notices at a later line, or at the end of the file),
    or a ',' missing between two items."""
    opened = _char(text, start.index)
    closer = {"'['": "']'", "'{'": "'}'"}.get(opened, "its closing bracket")
    stream_end = "<stream end>" in (exc.problem or "")
    dedented = mark.line > start.line and _indent(_line(lines, mark.line)) <= _indent(
        _line(lines, start.line)
    )
    if stream_end or dedented:
        return (start.line, start.column), f"unclosed {opened} started here; close it with {closer}"
    return (mark.line, mark.column), "did you forget a ',' between two items?"


def _colon_in_value(mark: yaml.Mark, lines: list[str]) -> tuple[tuple[int, int], str]:
    """': ' where no key may start: in a value, or in a line read as the rest of the line
    above (a key without its ':', a line indented too deep)."""
    here = (mark.line, mark.column)
    text = _line(lines, mark.line)
    if _KEY_COLON.search(text[: mark.column]):
        return here, "a value that holds ': ' must be quoted"
    above = _before(lines, mark.line)
    if above < 0:
        return here, "a value that holds ': ' must be quoted"
    prev = lines[above]
    prev_content = _content(prev)
    if not _KEY_COLON.search(prev_content):
        owner = _before(lines, above)
        if owner >= 0 and _indent(prev) > _indent(lines[owner]) and not _opens(lines[owner]):
            hint = (
                f"this line is read as the rest of the value on line {owner + 1}; "
                "quote that value, or fix the indentation"
            )
            return here, hint
        # The line above is a key alone: its ':' is missing, or has no space after it.
        column = len(prev) - len(prev.lstrip()) + len(prev.strip()) - len(prev_content)
        if ":" in prev_content:
            return (above, column + prev_content.index(":")), "put a space after the ':'"
        key = prev_content.split(maxsplit=1)[0]
        return (above, column + len(key)), f"did you forget a ':' after {key[:40]!r}?"
    if _indent(text) > _indent(prev) and prev.rstrip()[-1:] != ":":
        hint = "this line is indented deeper than the key above it; line up the keys of a mapping"
        return (mark.line, _indent(text)), hint
    return here, "a value that holds ': ' must be quoted"


def _block_end(
    exc: yaml.MarkedYAMLError, mark: yaml.Mark, text: str
) -> tuple[tuple[int, int], str]:
    """Something after a complete value: text after a closing quote (or a quote closed only
    lines later), a stray bracket, or a line indented to no level above."""
    here = (mark.line, mark.column)
    found = (exc.problem or "").rsplit("found ", 1)[-1]
    if found in ("']'", "'}'"):
        return here, f"a {found} that closes nothing"
    if found == "'<scalar>'" and text[: mark.index].rstrip(" ")[-1:] in ("'", '"'):
        quoted = _last_quoted(text, mark.index)
        if quoted is not None and quoted.line < mark.line:
            hint = f"the quote started here is closed only on line {mark.line + 1}"
            return (quoted.line, quoted.column), hint
        return here, "text after a closing quote; quote the whole value"
    return here, "check the indentation: this line lines up with no key or item above it"


def _last_quoted(text: str, index: int) -> yaml.Mark | None:
    """Where the last quoted value before `index` starts (the scanner read that far)."""
    found = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if token.start_mark.index >= index:
                break
            if isinstance(token, yaml.ScalarToken) and token.style in ("'", '"'):
                found = token.start_mark
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        pass
    return found


def compose_yaml(text: str, file: str, code_prefix: str) -> tuple[yaml.Node | None, list[Problem]]:
    """Parse YAML to a node tree with marks (safe loader only; no tags, no objects). A tree
    whose values cannot all be constructed (see `unreadable`) is a problem too."""
    code = f"{code_prefix}_YAML_PARSE"
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = _guarded(loader, loader.get_single_node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        return None, [yaml_problem(file, code, exc, text)]
    problems = unreadable(node, file, code_prefix) if node is not None else []
    return (None, problems) if problems else (node, [])


def compose_all(text: str) -> Iterator[yaml.Node]:
    """`yaml.compose_all` with the safe loader, raising only YAMLError (see `_guarded`)."""
    loader = yaml.SafeLoader(text)
    try:
        while _guarded(loader, loader.check_node):
            node = _guarded(loader, loader.get_node)
            if node is not None:
                yield node
    finally:
        loader.dispose()


def _guarded(loader: yaml.SafeLoader, step: Callable[[], T]) -> T:
    """One step of PyYAML's composer. What it lets slip becomes a located ScannerError: a
    ValueError or OverflowError (chr() of a \\U escape past U+10FFFF, int() of a %YAML
    version too long to convert) or a RecursionError (the composer recurses once per level
    of nesting)."""
    try:
        return step()
    except (ValueError, OverflowError) as exc:
        problem = f"cannot read this: {exc}"
    except RecursionError:
        problem = "nesting too deep"
    raise yaml.scanner.ScannerError(problem=problem, problem_mark=loader.get_mark())


# Levels of nested lists and maps a document may have; every walk over values recurses once
# per level (PyYAML's constructor several frames), and real files use fewer than ten.
MAX_YAML_DEPTH = 64
# Keys `<<` and `=` are consumed by the mapping that holds them, never constructed alone.
_MERGE = "tag:yaml.org,2002:merge"
_MAPPING_KEY_TAGS = frozenset({_MERGE, "tag:yaml.org,2002:value"})


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def unreadable(root: yaml.Node, file: str, code_prefix: str) -> list[Problem]:
    """Why the values of a composed document cannot be constructed, located; [] if they can.

    Composing checks syntax only. A node may still contain itself through an alias, nest
    deeper than a walk over it can recurse, or hold a value YAML resolves but cannot
    construct (`2024-13-45`, `!!int x`, an unknown `!tag`, a bad `<<` merge, a list as a
    mapping key). Check a document with this before reading values from it (`node_value`)."""
    code = f"{code_prefix}_YAML_PARSE"
    heights: dict[yaml.Node, int] = {}  # done: levels from the node down (aliases share)
    path = {root}  # being walked: meeting one of these again is a cycle
    stack = [(root, iter(_children(root)))]
    scalars: list[yaml.ScalarNode] = []
    mappings: list[yaml.MappingNode] = []
    merged: list[yaml.Node] = []  # values of `<<`: merging reads them but never constructs them
    while stack:
        node, pending = stack[-1]
        child = next(pending, None)
        if child is None:
            stack.pop()
            path.discard(node)
            heights[node] = 1 + max((heights[c] for c in _children(node)), default=0)
            if isinstance(node, yaml.ScalarNode):
                scalars.append(node)
            elif isinstance(node, yaml.MappingNode):
                mappings.append(node)
                merged.extend(v for k, v in node.value if k.tag == _MERGE)
            continue
        if child in path:
            return [at(file, child, code, "a value contains itself (a recursive alias)")]
        if len(stack) + heights.get(child, 1) > MAX_YAML_DEPTH:
            return [
                at(
                    file,
                    child,
                    code,
                    f"nesting deeper than {MAX_YAML_DEPTH} levels of lists and maps",
                    "flatten the structure",
                )
            ]
        if child not in heights:
            path.add(child)
            stack.append((child, iter(_children(child))))
    loader = yaml.SafeLoader("")
    try:
        # Scalars one by one first: their errors are plain ValueErrors without a mark.
        for scalar in scalars:
            if scalar.tag in _MAPPING_KEY_TAGS:
                continue
            try:
                value = loader.construct_object(scalar, deep=True)
                if isinstance(value, int):
                    str(value)  # ValueError past Python's digit limit (a 0x... may get there)
            except Exception as exc:  # the constructor's own errors, whatever their type
                shown = scalar.value if len(scalar.value) <= 40 else scalar.value[:37] + "..."
                reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else str(exc)
                return [
                    at(
                        file,
                        scalar,
                        code,
                        f"cannot read {shown!r} as {scalar.tag.rsplit(':', 1)[-1]}: {reason}",
                        "quote it to keep it as text",
                    )
                ]
        # Then the whole document (tags on lists and maps, merges, keys), and what `<<`
        # merges (readers that do not merge construct it). Merging rewrites mappings in
        # place; they are put back, readers see the document as it was written.
        saved = [(m, list(m.value)) for m in mappings]
        try:
            for node in (root, *merged):
                loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            return [_marked(file, code, exc)]
        except Exception as exc:
            return [at(file, root, code, f"cannot read this document: {exc}")]
        finally:
            for m, value in saved:
                m.value = value
    finally:
        loader.dispose()
    return []


def node_value(node: yaml.Node) -> Any:
    """Construct the plain Python value of a node (safe constructor)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


SERVICE_USER = "exfilwatch"  # the package's system user (packaging/debian/postinst)


def _trusted_owners() -> set[int]:
    """Who may own what steers the agent: root, the agent's own user, the service user."""
    owners = {0, os.geteuid()}
    try:
        import pwd

        owners.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    except (KeyError, ImportError):
        pass
    return owners


def check_permissions(path: str, code_prefix: str) -> list[Problem]:
    """Refuse a file others could edit when we run as root (it would steer a root process)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return [Problem(path, 0, 0, f"{code_prefix}_UNREADABLE", exc.strerror or str(exc))]
    if os.geteuid() != 0:
        return []
    problems = []
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(
            Problem(
                path,
                0,
                0,
                f"{code_prefix}_UNSAFE_PERMISSIONS",
                f"file is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                f"chmod go-w {path}",
            )
        )
    owners = _trusted_owners()
    if st.st_uid not in owners:
        problems.append(
            Problem(
                path,
                0,
                0,
                f"{code_prefix}_UNSAFE_OWNER",
                f"file is owned by uid {st.st_uid}, not root or the service user",
                f"chown root {path}",
            )
        )
    # As sshd's StrictModes: a directory on the way that others may change lets them swap or
    # delete the file (a sticky one, /tmp, lets them remove only their own files).
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            dst = os.stat(folder)
        except OSError:
            break
        open_to_others = dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if (open_to_others and not dst.st_mode & stat.S_ISVTX) or dst.st_uid not in owners:
            problems.append(
                Problem(
                    path,
                    0,
                    0,
                    f"{code_prefix}_UNSAFE_DIRECTORY",
                    f"directory {folder} can be changed by others (mode "
                    f"{stat.S_IMODE(dst.st_mode):04o}, owner uid {dst.st_uid}): they could "
                    "replace or delete this file",
                    f"chmod go-w {folder}" if open_to_others else f"chown root {folder}",
                )
            )
            break
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return problems
