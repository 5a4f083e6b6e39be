"""Tags and sensitivity of a path, from the config and from marker files in the tree."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from agent.config import SENSITIVITY_LEVELS, WatchSpec
from agent.diagnostics import Problem, at, compose_yaml, nearest, node_value
from agent.health import CapReporter, Reporter, record

MAX_MARKER_BYTES = 64 * 1024
_MARKER_KEYS = ("tags", "sensitivity", "owner", "description")
_RANK = {level: i for i, level in enumerate(SENSITIVITY_LEVELS)}


@dataclass(frozen=True, slots=True)
class Marker:
    """A marker file's content: tags added to its directory's subtree, and a sensitivity."""

    tags: tuple[str, ...] = ()
    sensitivity: str | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Resolved:
    tags: tuple[str, ...]
    sensitivity: str | None
    root: str | None
    location: str = "other"
    provider: str | None = None


def higher(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if _RANK[a] >= _RANK[b] else b


def parse_marker(text: str, file: str) -> tuple[Marker | None, list[Problem]]:
    node, problems = compose_yaml(text, file, "MRK")
    if problems:
        return None, problems
    if node is None:
        return Marker(), []
    if not isinstance(node, yaml.MappingNode):
        return None, [at(file, node, "MRK_TYPE", "a marker file is a mapping (tags: [...])")]
    tags: list[str] = []
    sensitivity = owner = None
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str) or key not in _MARKER_KEYS:
            problems.append(
                at(
                    file,
                    key_node,
                    "MRK_UNKNOWN_KEY",
                    f"unknown key {key!r} in marker",
                    nearest(str(key), _MARKER_KEYS) or f"allowed: {', '.join(_MARKER_KEYS)}",
                )
            )
            continue
        if key in seen:
            problems.append(at(file, key_node, "MRK_DUPLICATE_KEY", f"'{key}' is given twice"))
            continue
        seen.add(key)
        value = node_value(value_node)
        if key == "tags":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
                problems.append(at(file, value_node, "MRK_TYPE", "tags must be a list of strings"))
            else:
                tags = value
        elif key == "sensitivity":
            if value not in SENSITIVITY_LEVELS:
                problems.append(
                    at(
                        file,
                        value_node,
                        "MRK_VALUE",
                        f"unknown sensitivity {value!r}",
                        nearest(str(value), SENSITIVITY_LEVELS)
                        or f"one of {', '.join(SENSITIVITY_LEVELS)}",
                    )
                )
            else:
                sensitivity = value
        elif key == "owner":
            if not isinstance(value, str):
                problems.append(at(file, value_node, "MRK_TYPE", "owner must be a string"))
            else:
                owner = value
    if problems:
        return None, problems
    return Marker(tuple(dict.fromkeys(tags)), sensitivity, owner), []


def read_marker(path: str) -> tuple[Marker | None, list[Problem]]:
    """Read a marker without following symlinks or blocking on a FIFO (we often run as root)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        return None, [Problem(path, 0, 0, "MRK_UNREADABLE", exc.strerror or str(exc))]
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, [Problem(path, 0, 0, "MRK_NOT_FILE", "marker is not a regular file")]
        data = os.read(fd, MAX_MARKER_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_MARKER_BYTES:
        return None, [Problem(path, 0, 0, "MRK_TOO_LARGE", "marker is larger than 64 KiB")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, [Problem(path, 0, 0, "MRK_ENCODING", "marker is not UTF-8")]
    return parse_marker(text, path)


class TagResolver:
    """Resolves (tags, sensitivity, root) for paths; caches per directory, bounded.

    Tags are the union of every watch entry containing the path and of every marker between
    the entry's root and the path. Sensitivity is the highest found on that way. Markers only
    ever add: a marker dropped into a tree can never untag it (that would be an evasion)."""

    def __init__(
        self,
        specs: Sequence[WatchSpec],
        marker_name: str,
        report: Reporter,
        caps: CapReporter,
        cache_cap: int = 65_536,
    ) -> None:
        self.marker_name = marker_name
        self._report = report
        self._caps = caps
        self._cap = cache_cap
        self._lock = threading.Lock()
        self._markers: dict[str, Marker | None] = {}
        self._resolved: dict[str, Resolved] = {}
        self.set_specs(specs)

    def set_specs(self, specs: Sequence[WatchSpec]) -> None:
        with self._lock:
            self._specs = sorted(specs, key=lambda s: len(s.path))
            self._resolved.clear()

    def resolve_dir(self, directory: str) -> Resolved:
        hit = self._resolved.get(directory)
        if hit is not None:
            return hit
        with self._lock:
            resolved = self._compute(directory)
            if len(self._resolved) >= self._cap:
                self._caps.hit("tag_cache", self._cap)
                self._resolved.clear()
            self._resolved[directory] = resolved
        return resolved

    def _compute(self, directory: str) -> Resolved:
        tags: dict[str, None] = {}
        sensitivity: str | None = None
        deepest = None
        tagged_top: str | None = None
        for spec in self._specs:  # shortest first: the deepest entry is the root
            p = spec.path
            if directory == p or directory.startswith(p.rstrip("/") + "/"):
                tags.update(dict.fromkeys(spec.tags))
                sensitivity = higher(sensitivity, spec.sensitivity)
                deepest = spec
                if spec.location == "tagged" and tagged_top is None:
                    tagged_top = p
        if deepest is None:
            return Resolved((), None, None)
        if tagged_top is not None:
            # Markers tag tagged trees only: one carried onto a USB stick does not make the
            # stick a tagged tree (lineage says where its files came from).
            for d in _dirs_from(tagged_top, directory):
                marker = self._marker(d)
                if marker is not None:
                    tags.update(dict.fromkeys(marker.tags))
                    sensitivity = higher(sensitivity, marker.sensitivity)
        location = deepest.location
        if location == "home":
            # A hidden directory anywhere in a home (up to the watched depth) is a staging
            # place: ~/.stash, ~/work/.old/x alike.
            rel = directory[len(deepest.path) :].strip("/")
            hidden = any(part.startswith(".") for part in rel.split("/")) if rel else False
            location = "staging" if hidden else "other"
        return Resolved(tuple(tags), sensitivity, deepest.path, location, deepest.provider)

    def _marker(self, directory: str) -> Marker | None:
        if directory in self._markers:
            return self._markers[directory]
        marker = self._load(directory, previous=None)
        if len(self._markers) >= self._cap:
            self._caps.hit("marker_cache", self._cap)
            self._markers.clear()
        self._markers[directory] = marker
        return marker

    def _load(self, directory: str, previous: Marker | None) -> Marker | None:
        path = os.path.join(directory, self.marker_name)
        marker, problems = read_marker(path)
        if problems:
            # A bad edit keeps the last good marker of this directory, if there was one.
            self._report(
                record(
                    "marker_rejected",
                    problems[0].code,
                    marker=path,
                    kept_previous=previous is not None,
                    problems=[str(p) for p in problems],
                )
            )
            return previous
        return marker

    def marker_changed(self, directory: str) -> None:
        """A marker file in `directory` was created, changed, moved or removed."""
        with self._lock:
            previous = self._markers.get(directory)
            marker = self._load(directory, previous)
            self._markers[directory] = marker
            self._invalidate(directory)
        path = os.path.join(directory, self.marker_name)
        if marker is None and previous is not None:
            self._report(record("marker_removed", None, marker=path))
        elif marker is not None:  # reported even when unchanged: a lazy lookup may have read it
            self._report(
                record(
                    "marker_loaded",
                    None,
                    marker=path,
                    tags=list(marker.tags),
                    sensitivity=marker.sensitivity,
                )
            )

    def tree_changed(self, directory: str) -> None:
        """A directory was moved or deleted: cached answers under it may be stale. Everything
        is dropped (a prefix scan per event would cost more than re-resolving on demand)."""
        with self._lock:
            if self._markers or self._resolved:
                self._markers.clear()
                self._resolved.clear()

    def _invalidate(self, directory: str) -> None:
        prefix = directory.rstrip("/") + "/"
        stale = [k for k in self._resolved if k == directory or k.startswith(prefix)]
        for k in stale:
            del self._resolved[k]


def _dirs_from(top: str, directory: str) -> list[str]:
    """`top`, then each directory down to `directory` (inclusive)."""
    out = [top]
    rest = directory[len(top) :].strip("/")
    if rest:
        cur = top.rstrip("/")
        for part in rest.split("/"):
            cur = f"{cur}/{part}"
            out.append(cur)
    return out
