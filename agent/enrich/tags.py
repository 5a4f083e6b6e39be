"""Tags and sensitivity of a path, from the config and from marker files in the tree."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import yaml

from agent.config import SENSITIVITY_LEVELS, WatchSpec
from agent.diagnostics import Problem, at, compose_yaml, nearest, node_value
from agent.enrich.marker_state import (
    MAX_DIRECTORIES,
    MAX_STORED_TAGS,
    MAX_TAGS,
    MarkerStore,
    StoredMarker,
    now_text,
    tag_problem,
)
from agent.events import Event
from agent.health import CapReporter, Reporter, record

MAX_MARKER_BYTES = 64 * 1024
# Tags one directory may carry from all its markers together (a marker has at most MAX_TAGS,
# but markers nest): an event stays a few KB however deep a user nests markers.
MAX_RESOLVED_TAGS = 256
# Tag problems listed per marker; a marker of 9,500 bad tags is one record, not 9,500 lines.
MAX_TAG_PROBLEMS = 10
_MARKER_KEYS = ("tags", "sensitivity", "owner", "description")
_RANK = {level: i for i, level in enumerate(SENSITIVITY_LEVELS)}

# What a change that would take tags away was, in a marker_tampered record.
DELETED = "deleted"
INVALID = "invalid"
NOT_A_REGULAR_FILE = "not_a_regular_file"
TAGS_REMOVED = "tags_removed"
SENSITIVITY_LOWERED = "sensitivity_lowered"


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
                items = (
                    list(value_node.value)
                    if isinstance(value_node, yaml.SequenceNode)
                    else [value_node]
                )
                bad_tags = _tag_problems(file, items, value)
                problems.extend(bad_tags)
                if not bad_tags:
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


def _tag_problems(file: str, nodes: list[yaml.Node], tags: list[str]) -> list[Problem]:
    """Caps and charset of a marker's tags, each problem located at its tag."""
    problems: list[Problem] = []
    if len(tags) > MAX_TAGS:
        problems.append(
            at(
                file,
                nodes[MAX_TAGS] if len(nodes) > MAX_TAGS else None,
                "MRK_TOO_MANY_TAGS",
                f"a marker has at most {MAX_TAGS} tags ({len(tags)} given)",
                "tag the tree in the config, or split it",
            )
        )
    listed = 0
    unlisted: Problem | None = None
    more = 0
    for node, tag in zip(nodes, tags, strict=False):
        bad = tag_problem(tag)
        if bad is None:
            continue
        if listed < MAX_TAG_PROBLEMS:
            problems.append(at(file, node, bad[0], f"{bad[1]}: {tag[:80]!r}"))
            listed += 1
        else:
            unlisted = unlisted or at(file, node, bad[0], "")
            more += 1
    if unlisted is not None:
        problems.append(
            replace(unlisted, message=f"{more} more tags with problems, from here on (not listed)")
        )
    return problems


def read_marker(path: str) -> tuple[Marker | None, list[Problem]]:
    """Read a marker without following symlinks or blocking on a FIFO (we often run as root)."""
    marker, problems, _ = _read(path)
    return marker, problems


def _read(path: str) -> tuple[Marker | None, list[Problem], str]:
    """read_marker, plus a fingerprint of what was found (to tell one attempt from another)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        # Not a directory: a file path resolved as one (a process started on a file) has
        # no marker, and that is no problem of a marker's.
        return None, [], "absent"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            msg = "marker is a symbolic link (never followed)"
            return None, [Problem(path, 0, 0, "MRK_NOT_FILE", msg)], "symlink"
        return None, [Problem(path, 0, 0, "MRK_UNREADABLE", exc.strerror or str(exc))], "error"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            msg = "marker is not a regular file"
            return None, [Problem(path, 0, 0, "MRK_NOT_FILE", msg)], f"mode:{st.st_mode:o}"
        data = os.read(fd, MAX_MARKER_BYTES + 1)
    finally:
        os.close(fd)
    fingerprint = hashlib.sha256(data).hexdigest()[:32]
    if len(data) > MAX_MARKER_BYTES:
        msg = "marker is larger than 64 KiB"
        return None, [Problem(path, 0, 0, "MRK_TOO_LARGE", msg)], fingerprint
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, [Problem(path, 0, 0, "MRK_ENCODING", "marker is not UTF-8")], fingerprint
    marker, problems = parse_marker(text, path)
    return marker, problems, fingerprint


@dataclass(frozen=True, slots=True)
class _Found:
    """A marker as read: its content (None when absent or bad), problems, and a fingerprint
    that tells one attempt from the next."""

    path: str
    marker: Marker | None
    problems: tuple[Problem, ...]
    fingerprint: str


@dataclass(frozen=True, slots=True)
class _InForce:
    """What one directory's marker gives its subtree: the stored tags and the marker's own."""

    tags: tuple[str, ...]
    sensitivity: str | None
    since: str  # when the store first saw this directory's marker; "~" (sorts last) if never


class TagResolver:
    """Resolves (tags, sensitivity, root) for paths; caches per directory, bounded.

    Tags are the union of every watch entry containing the path and of every marker between
    the entry's root and the path. Sensitivity is the highest found on that way.

    Markers only ever add, and what they add is sticky: every marker seen good is kept in a
    store (under `state_dir`, see marker_state), and a directory's marker tags are the stored
    ones plus the current marker's. Deleting the marker, breaking it, swapping it for a
    symlink or a FIFO or for one with fewer tags changes nothing but a `marker_tampered`
    record; only an admin removes stored tags (`exfilwatch markers forget`, then a reload,
    which calls set_specs). The caches only speed the store up: clearing them drops nothing."""

    def __init__(
        self,
        specs: Sequence[WatchSpec],
        marker_name: str,
        report: Reporter,
        caps: CapReporter,
        cache_cap: int = 65_536,
        *,
        state_dir: str | None = None,
        store_cap: int = MAX_DIRECTORIES,
    ) -> None:
        self.marker_name = marker_name
        self._report = report
        self._caps = caps
        self._cap = cache_cap
        self._lock = threading.Lock()
        self._markers: dict[str, _InForce | None] = {}
        self._resolved: dict[str, Resolved] = {}
        self.store = MarkerStore(state_dir, report, caps, store_cap)
        # directory -> (attempts, fingerprint) when its marker was last looked at: one record
        # per attempt, not one per look (a cache clear makes every directory be looked at
        # again). Bounded by the store: only stored directories are in it.
        self._seen: dict[str, tuple[tuple[str, ...], str]] = {}
        # directory -> fingerprint of the bad marker last reported: a cache clear (any rmdir)
        # makes a lookup read it again, and that is not a new marker_rejected. Bounded.
        self._rejected: dict[str, str] = {}
        # Records made under the lock, sent once it is released.
        self._pending: list[dict[str, Any]] = []
        self.set_specs(specs)

    def set_specs(self, specs: Sequence[WatchSpec]) -> None:
        """New watch entries (config reload, media): also re-reads the marker store, which is
        how the running agent learns of an admin's `exfilwatch markers forget`."""
        with self._lock:
            self._specs = sorted(specs, key=lambda s: len(s.path))
            for directory, entry in self.store.load():
                self._seen.pop(directory, None)
                self._pending.append(
                    record(
                        "marker_forgotten",
                        None,
                        directory=directory,
                        tags=list(entry.tags),
                        sensitivity=entry.sensitivity,
                    )
                )
            self._markers.clear()
            self._resolved.clear()
            pending = self._take_pending()
        self._send(pending)

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
            pending = self._take_pending()
        self._send(pending)
        return resolved

    def _tagged_top(self, directory: str) -> str | None:
        for spec in self._specs:  # shortest first
            p = spec.path
            if spec.location == "tagged" and (
                directory == p or directory.startswith(p.rstrip("/") + "/")
            ):
                return p
        return None

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
            found = [m for d in _dirs_from(tagged_top, directory) if (m := self._marker(d))]
            if len(tags) + sum(len(m.tags) for m in found) > MAX_RESOLVED_TAGS:
                # Over the cap, the markers the store has known longest go first: markers a
                # user drops above a tree cannot push the tree's own tags out.
                found.sort(key=lambda m: m.since)
            for m in found:
                tags.update(dict.fromkeys(m.tags))
                sensitivity = higher(sensitivity, m.sensitivity)
            if len(tags) > MAX_RESOLVED_TAGS:
                self._caps.hit("resolved_tags", MAX_RESOLVED_TAGS, directory=directory)
                tags = dict.fromkeys(list(tags)[:MAX_RESOLVED_TAGS])
        location = deepest.location
        if location == "home":
            # A hidden directory anywhere in a home (up to the watched depth) is a staging
            # place: ~/.stash, ~/work/.old/x alike.
            rel = directory[len(deepest.path) :].strip("/")
            hidden = any(part.startswith(".") for part in rel.split("/")) if rel else False
            location = "staging" if hidden else "other"
        return Resolved(tuple(tags), sensitivity, deepest.path, location, deepest.provider)

    def _marker(self, directory: str) -> _InForce | None:
        if directory in self._markers:
            return self._markers[directory]
        in_force = self._look(directory, changed=False, by=None)[0]
        if len(self._markers) >= self._cap:
            self._caps.hit("marker_cache", self._cap)
            self._markers.clear()
        self._markers[directory] = in_force
        return in_force

    def _look(
        self, directory: str, changed: bool, by: Event | None
    ) -> tuple[_InForce | None, Marker | None, StoredMarker | None]:
        """Read `directory`'s marker; learn it into the store, or notice what it no longer
        gives. Returns what is in force, the marker read (None: absent or bad) and the store's
        entry. Called with the lock held; records go to self._pending."""
        path = os.path.join(directory, self.marker_name)
        marker, problems, fingerprint = _read(path)
        found = _Found(path, marker, tuple(problems), fingerprint)
        tagged = self._tagged_top(directory) is not None
        stored = self._stored(directory) if tagged else None
        if not problems:
            self._rejected.pop(directory, None)
        elif changed or self._rejected.get(directory) != fingerprint:
            if len(self._rejected) >= self._cap:
                self._rejected.clear()
            self._rejected[directory] = fingerprint
            self._pending.append(
                record(
                    "marker_rejected",
                    problems[0].code,
                    marker=path,
                    kept_previous=stored is not None,
                    kept_tags=list(stored.tags) if stored is not None else [],
                    problems=[str(p) for p in problems],
                )
            )
        if tagged and marker is not None and (marker.tags or marker.sensitivity):
            stored = self._learn(directory, stored, marker)
        if stored is not None:
            self._check(directory, stored, found, changed=changed, by=by)
        return _in_force(stored, marker), marker, stored

    def _stored(self, directory: str) -> StoredMarker | None:
        """The store's entry for `directory`; for a directory the store does not know by
        this path, the entry of the same directory (device and inode) under its old path:
        `mv tapeout t2 && rm t2/.exfilwatch.yaml` keeps the tags on t2."""
        entry = self.store.get(directory)
        if entry is not None or not len(self.store):
            return entry
        try:
            st = os.lstat(directory)
        except OSError:
            return None
        origin = self.store.by_inode(st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
        old = self.store.get(origin) if origin is not None and origin != directory else None
        if origin is None or old is None:
            return None
        try:
            ost = os.lstat(origin)
            if (ost.st_dev, ost.st_ino) == (st.st_dev, st.st_ino):
                return None  # the same directory by two paths (a bind mount), not a move
        except OSError:
            pass
        entry = replace(old, updated=now_text(), moved_from=origin)
        if not self.store.put(directory, entry):
            return None
        self._pending.append(
            record(
                "marker_loaded",
                "directory_moved",
                marker=os.path.join(directory, self.marker_name),
                moved_from=origin,
                tags=list(entry.tags),
                sensitivity=entry.sensitivity,
            )
        )
        return entry

    def _learn(
        self, directory: str, stored: StoredMarker | None, marker: Marker
    ) -> StoredMarker | None:
        """The store's entry grown by `marker` (a no-op without I/O when nothing is new)."""
        now = now_text()
        if stored is None:
            device: int | None = None
            inode: int | None = None
            try:
                st = os.lstat(directory)
                device, inode = st.st_dev, st.st_ino
            except OSError:
                pass  # gone already: stored by path only
            entry = StoredMarker(
                marker.tags[:MAX_STORED_TAGS], marker.sensitivity, now, now, device, inode
            )
            return entry if self.store.put(directory, entry) else None
        tags = tuple(dict.fromkeys((*stored.tags, *marker.tags)))
        if len(tags) > MAX_STORED_TAGS:
            self._caps.hit("marker_stored_tags", MAX_STORED_TAGS, directory=directory)
            tags = tags[:MAX_STORED_TAGS]
        sensitivity = higher(stored.sensitivity, marker.sensitivity)
        if tags == stored.tags and sensitivity == stored.sensitivity:
            return stored
        entry = replace(stored, tags=tags, sensitivity=sensitivity, updated=now)
        self.store.put(directory, entry)
        return entry

    def _check(
        self,
        directory: str,
        stored: StoredMarker,
        found: _Found,
        *,
        changed: bool,
        by: Event | None,
    ) -> None:
        """A marker_tampered record when the marker no longer gives what the store holds."""
        attempts = _attempts(stored, found.marker, found.problems)
        if attempts == (DELETED,) and not os.path.isdir(directory):
            # The directory itself is gone (moved away, or removed with its files), not its
            # marker: a late look at the old path of `mv proj renamed` said "deleted" before
            # the look at the new path, which finds the same entry by inode and tells.
            return
        if (
            attempts
            and by is not None
            and by.action == "created"
            and NOT_A_REGULAR_FILE not in attempts
        ):
            # A regular file just created may still be being written (an empty file parses
            # as a marker without tags): its closed_write says what it became.
            return
        last = self._seen.get(directory)
        if last is None:
            # First look since the agent started: a marker removed while it was down is an
            # attempt; one already reported before a restart is not reported again.
            report = bool(attempts) and (changed or attempts != stored.tampered)
        else:
            report = bool(attempts) and (attempts, found.fingerprint) != last
        self._seen[directory] = (attempts, found.fingerprint)
        if attempts != stored.tampered:
            self.store.put(directory, replace(stored, tampered=attempts))
        if report:
            self._pending.append(
                self._tamper_record(directory, stored, found, attempts, changed=changed, by=by)
            )

    def _tamper_record(
        self,
        directory: str,
        stored: StoredMarker,
        found: _Found,
        attempts: tuple[str, ...],
        *,
        changed: bool,
        by: Event | None,
    ) -> dict[str, Any]:
        marker = found.marker
        data: dict[str, Any] = {
            "directory": directory,
            "marker": found.path,
            "attempted": list(attempts),
            "kept_tags": list(stored.tags),
            "kept_sensitivity": stored.sensitivity,
            # change: seen as it happened; lookup: found on a later look (e.g. at start,
            # for a marker removed while the agent was not running).
            "noticed": "change" if changed else "lookup",
            "stored_since": stored.first_seen,
        }
        if marker is not None:
            data["removed_tags"] = [t for t in stored.tags if t not in marker.tags]
            data["marker_tags"] = list(marker.tags)
            data["marker_sensitivity"] = marker.sensitivity
        if found.problems:
            data["problems"] = [str(p) for p in found.problems[:3]]
        rec = record("marker_tampered", attempts[0], **data)
        event = rec["event"]
        event["category"] = ["file"]
        event["type"] = ["deletion"] if attempts == (DELETED,) else ["change"]
        event["severity"] = 73  # ECS / Elastic "high"
        rec["rule"] = {
            "id": "exfilwatch-marker-tampered",
            "name": "Marker file removed or weakened",
            "description": "A marker's tags or sensitivity were deleted, broken or lowered; "
            "the agent keeps them in force until an admin runs `exfilwatch markers forget`.",
        }
        rec["file"] = {"path": found.path, "directory": directory, "name": self.marker_name}
        rec["exfilwatch"]["level"] = "high"
        if by is not None:
            _add_actor(rec, by)
        return rec

    def marker_changed(self, directory: str, by: Event | None = None) -> None:
        """A marker file in `directory` was created, changed, moved or removed. `by` is the
        event that said so, attributed when attribution runs: it names who did it."""
        path = os.path.join(directory, self.marker_name)
        with self._lock:
            previous = self._markers.get(directory)
            in_force, marker, stored = self._look(directory, changed=True, by=by)
            self._markers[directory] = in_force
            self._invalidate(directory)
            if marker is None and stored is None and previous is not None:
                self._pending.append(record("marker_removed", None, marker=path))
            elif marker is not None:  # reported even when unchanged: a lazy look may have read it
                self._pending.append(
                    record(
                        "marker_loaded",
                        None,
                        marker=path,
                        tags=list(marker.tags),
                        sensitivity=marker.sensitivity,
                        tags_in_force=list(in_force.tags) if in_force else [],
                        sensitivity_in_force=in_force.sensitivity if in_force else None,
                    )
                )
            pending = self._take_pending()
        self._send(pending)

    def tree_changed(self, directory: str) -> None:
        """A directory was moved or deleted: cached answers under it may be stale. Everything
        is dropped (a prefix scan per event would cost more than re-resolving on demand); the
        store is not a cache and keeps every directory's tags."""
        with self._lock:
            if self._markers or self._resolved:
                self._markers.clear()
                self._resolved.clear()

    def _invalidate(self, directory: str) -> None:
        prefix = directory.rstrip("/") + "/"
        stale = [k for k in self._resolved if k == directory or k.startswith(prefix)]
        for k in stale:
            del self._resolved[k]

    def _take_pending(self) -> list[dict[str, Any]]:
        pending, self._pending = self._pending, []
        return pending

    def _send(self, pending: list[dict[str, Any]]) -> None:
        for rec in pending:
            self._report(rec)


def _attempts(
    stored: StoredMarker, marker: Marker | None, problems: Sequence[Problem]
) -> tuple[str, ...]:
    """What a marker found in this state tries to take away from what the store holds."""
    if problems:
        return (NOT_A_REGULAR_FILE,) if problems[0].code == "MRK_NOT_FILE" else (INVALID,)
    if marker is None:
        return (DELETED,)
    out: list[str] = []
    if any(t not in marker.tags for t in stored.tags):
        out.append(TAGS_REMOVED)
    if _RANK.get(stored.sensitivity or "", -1) > _RANK.get(marker.sensitivity or "", -1):
        out.append(SENSITIVITY_LOWERED)
    return tuple(out)


def _in_force(stored: StoredMarker | None, marker: Marker | None) -> _InForce | None:
    if stored is None:
        if marker is None or not (marker.tags or marker.sensitivity):
            return None
        return _InForce(marker.tags, marker.sensitivity, "~")
    if marker is None:
        return _InForce(stored.tags, stored.sensitivity, stored.first_seen)
    return _InForce(
        tuple(dict.fromkeys((*stored.tags, *marker.tags))),
        higher(stored.sensitivity, marker.sensitivity),
        stored.first_seen,
    )


def _add_actor(rec: dict[str, Any], by: Event) -> None:
    """Who changed the marker, as far as attribution knew: ECS user.* and process.*."""
    user = {k: v for k, v in (("name", by.user_name), ("id", by.user_id)) if v is not None}
    if user:
        rec["user"] = user
    process: dict[str, Any] = {
        k: v
        for k, v in (
            ("pid", by.process_pid),
            ("name", by.process_name),
            ("executable", by.process_executable),
            ("command_line", by.process_command_line),
        )
        if v is not None
    }
    if by.process_parent_pid is not None or by.process_parent_name is not None:
        process["parent"] = {
            k: v
            for k, v in (("pid", by.process_parent_pid), ("name", by.process_parent_name))
            if v is not None
        }
    if process:
        rec["process"] = process
    attribution = {
        k: v
        for k, v in (("confidence", by.attribution), ("method", by.attribution_method))
        if v is not None
    }
    if attribution:
        rec["exfilwatch"]["attribution"] = attribution


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
