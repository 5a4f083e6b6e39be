"""Where a written file came from and what it looks like: lineage, archives, disguise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.enrich.archives import archive_kind, inspect_archive
from agent.enrich.disguise import (
    encoding,
    extension_changed,
    read_head,
    strip_wrapper_extension,
    type_mismatch,
)
from agent.enrich.lineage import LineageIndex
from agent.events import Event

_LANDED = frozenset({"closed_write", "moved_in", "moved"})
_GONE = frozenset({"deleted", "moved_out"})
ARCHIVE_SAMPLE = 10


@dataclass(frozen=True)
class DestinationSettings:
    archives: bool = True
    archive_max_members: int = 10_000
    archive_max_seconds: float = 0.5
    disguise: bool = True


class Destinations:
    """Fills lineage, archive and disguise fields. Runs in the pipeline's consumer thread,
    so every step is bounded: an index lookup by size for most events, one 8 KiB head read
    for files landing outside the tagged trees, hashing under the lineage I/O budget, and
    archive listing under a member and time limit."""

    def __init__(self, lineage: LineageIndex | None, settings: DestinationSettings) -> None:
        self.lineage = lineage
        self.settings = settings
        self.counters = {"copies": 0, "archives": 0, "disguised": 0}

    def __call__(self, e: Event) -> Event:
        if e.category != "file":
            return e
        if e.location == "tagged":
            return self._tagged(e)
        if e.action not in _LANDED or e.file_type != "file":
            return e
        changes: dict[str, Any] = {}
        lineage = self.lineage
        origin_path: str | None = None
        origin_tags: tuple[str, ...] = ()
        if lineage is not None:
            if e.action == "moved" and e.src_path is not None:
                moved = lineage.lookup(e.src_path)
                if moved is not None:  # moved out of a tagged tree: it is the tagged file
                    origin_path, origin_tags = moved.path, moved.tags
                    lineage.remove(e.src_path)
            if origin_path is None and e.size:
                origin = lineage.find_copy(e.path, e.size)
                if origin is not None:
                    origin_path, origin_tags = origin.path, origin.tags
        head = read_head(e.path) if (self.settings.disguise or self.settings.archives) else None
        signals: list[str] = []
        if head is not None and self.settings.disguise:
            if type_mismatch(e.extension, head):
                signals.append("type_mismatch")
            enc = encoding(head)
            if enc is not None:
                signals.append(enc)
                if origin_path is None and lineage is not None:
                    inner = strip_wrapper_extension(e.name)
                    guess = lineage.find_by_name(inner) if inner else None
                    if guess is not None:
                        origin_path, origin_tags = guess.path, guess.tags
        if (
            e.action == "moved"
            and e.src_path is not None
            and origin_path is not None
            and extension_changed(e.src_path, e.path)
        ):
            signals.append("extension_changed")
        if head is not None and self.settings.archives and lineage is not None:
            kind = archive_kind(e.path, head)
            if kind is not None:
                info = inspect_archive(
                    e.path,
                    max_members=self.settings.archive_max_members,
                    max_seconds=self.settings.archive_max_seconds,
                )
                if info is not None:
                    self.counters["archives"] += 1
                    tagged = 0
                    tags: dict[str, None] = {}
                    for name, size in info.members:
                        entry = lineage.match_member(name, size)
                        if entry is not None:
                            tagged += 1
                            tags.update(dict.fromkeys(entry.tags))
                    changes["archive_tagged"] = tagged
                    if tagged and not origin_tags:
                        origin_tags = tuple(tags)
                    if info.encrypted and "encrypted" not in signals:
                        signals.append("encrypted")
        if origin_path is not None:
            self.counters["copies"] += 1
            changes["lineage_origin"] = origin_path
        if origin_tags:
            changes["lineage_tags"] = origin_tags
        if signals:
            self.counters["disguised"] += 1
            changes["disguise"] = tuple(dict.fromkeys(signals))
        return e._replace(**changes) if changes else e

    def _tagged(self, e: Event) -> Event:
        """Keep the index current from the tagged trees' own events; flag renames that
        change a tagged file's extension."""
        lineage = self.lineage
        if lineage is not None:
            if e.action in _GONE:
                if e.file_type == "dir" or e.file_type is None:
                    lineage.remove_tree(e.path)
                lineage.remove(e.path)
            elif (
                e.file_type == "file"
                and e.size is not None
                and e.action in ("closed_write", "moved_in", "moved", "created", "rescanned")
            ):
                lineage.add(e.path, e.size, (e.mtime_us or 0) * 1000, e.tags)
            if e.action == "moved" and e.src_path is not None:
                if e.file_type == "dir":
                    lineage.move_tree(e.src_path, e.path)
                else:
                    lineage.remove(e.src_path)
        if (
            self.settings.disguise
            and e.action == "moved"
            and e.src_path is not None
            and e.file_type == "file"
            and extension_changed(e.src_path, e.path)
        ):
            return e._replace(disguise=("extension_changed",))
        return e
