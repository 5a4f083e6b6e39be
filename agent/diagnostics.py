"""Located problems (`file:line:col CODE message`) and a YAML reader that keeps marks."""

from __future__ import annotations

import difflib
import json
import os
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
    except yaml.MarkedYAMLError as exc:
        return None, [_marked(file, code, exc)]
    except yaml.YAMLError as exc:
        return None, [Problem(file, 0, 0, code, str(exc))]
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
    if st.st_uid not in (0, os.geteuid()):
        problems.append(
            Problem(
                path,
                0,
                0,
                f"{code_prefix}_UNSAFE_OWNER",
                f"file is owned by uid {st.st_uid}, not root",
                f"chown root {path}",
            )
        )
    return problems
