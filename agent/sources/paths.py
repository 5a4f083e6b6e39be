"""Exclude globs for watched trees, matched component by component (no regex backtracking)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase


@dataclass(frozen=True, slots=True)
class Excludes:
    """Compiled exclude globs for one watch entry.

    A pattern without '/' matches any single path component (`node_modules`, `*.o`), so
    excluding a directory excludes its subtree. A pattern with '/' is anchored at the watch
    root; `**` stands for any number of components (`build/**`, `docs/*/drafts`).
    """

    names: tuple[str, ...] = ()
    anchored: tuple[tuple[str, ...], ...] = ()
    problems: tuple[str, ...] = field(default=(), compare=False)

    def __bool__(self) -> bool:
        return bool(self.names or self.anchored)

    def name_excluded(self, name: str) -> bool:
        """True when this one component is excluded wherever it appears."""
        return any(fnmatchcase(name, pat) for pat in self.names)

    def excluded(self, rel: str) -> bool:
        """True when the root-relative path, or one of its ancestors, is excluded."""
        if not rel or rel == ".":
            return False
        parts = rel.split("/")
        if self.names and any(self.name_excluded(part) for part in parts):
            return True
        return any(_prefix_matches(segs, parts) for segs in self.anchored)

    def leaf_excluded(self, rel: str, name: str) -> bool:
        """Fast path for an event in a directory already known to be included."""
        if self.names and self.name_excluded(name):
            return True
        return bool(self.anchored) and any(
            _prefix_matches(s, rel.split("/")) for s in self.anchored
        )


def _prefix_matches(segs: tuple[str, ...], parts: list[str]) -> bool:
    """Does the segment pattern match `parts` or a leading part of it? (an NFA walk)."""
    end = len(segs)

    def closure(states: set[int]) -> set[int]:
        out = set(states)
        stack = list(states)
        while stack:
            s = stack.pop()
            if s < end and segs[s] == "**" and s + 1 not in out:
                out.add(s + 1)
                stack.append(s + 1)
        return out

    states = closure({0})
    for part in parts:
        nxt: set[int] = set()
        for s in states:
            if s >= end:
                continue
            if segs[s] == "**":
                nxt.add(s)
                nxt.add(s + 1)
            elif fnmatchcase(part, segs[s]):
                nxt.add(s + 1)
        states = closure(nxt)
        if end in states:
            return True
        if not states:
            return False
    return False


def compile_excludes(patterns: tuple[str, ...] | list[str]) -> Excludes:
    names: list[str] = []
    anchored: list[tuple[str, ...]] = []
    problems: list[str] = []
    for pat in patterns:
        stripped = pat.strip("/")
        if not stripped:
            problems.append(f"pattern {pat!r} matches nothing")
            continue
        segs = tuple(stripped.split("/"))
        if any(s in ("", ".", "..") for s in segs):
            problems.append(f"pattern {pat!r} has an empty, '.' or '..' component")
            continue
        if "/" in pat:
            anchored.append(segs)
        else:
            names.append(stripped)
    return Excludes(tuple(names), tuple(anchored), tuple(problems))
