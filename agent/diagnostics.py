"""Located problems (`file:line:col CODE message`) and a YAML reader that keeps marks."""

from __future__ import annotations

import difflib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import yaml

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


def compose_yaml(text: str, file: str, code_prefix: str) -> tuple[yaml.Node | None, list[Problem]]:
    """Parse YAML to a node tree with marks (safe loader only; no tags, no objects)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        msg = exc.problem or "invalid YAML"
        if exc.context:
            msg = f"{exc.context}: {msg}"
        return None, [Problem(file, line, col, f"{code_prefix}_YAML_PARSE", msg)]
    except yaml.YAMLError as exc:
        return None, [Problem(file, 0, 0, f"{code_prefix}_YAML_PARSE", str(exc))]
    return node, []


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
