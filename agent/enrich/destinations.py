"""Where a written file came from and what it looks like: lineage, archives, disguise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from msgspec.structs import replace as evolve

from agent.enrich.archives import HashLimits, MemberDigest, archive_kind, inspect_archive
from agent.enrich.disguise import (
    encoding,
    extension_changed,
    read_head,
    strip_wrapper_extension,
    type_mismatch,
)
from agent.enrich.lineage import LineageIndex
from agent.events import Event

_LANDED = frozenset({"closed_write", "moved_in", "moved", "rescanned"})
_GONE = frozenset({"deleted", "moved_out"})
ARCHIVE_SAMPLE = 10


@dataclass(frozen=True)
class DestinationSettings:
    archives: bool = True
    archive_max_members: int = 10_000
    archive_max_seconds: float = 0.5
    disguise: bool = True


class Destinations:
    """Fills lineage, archive and disguise fields, in two parts.

    The cheap part (`__call__`, on the pipeline's consumer) keeps the lineage index current
    from the tagged trees' own events and traces moves out of them: dictionary lookups only.
    The content part (`content`, in the enrichment worker under its budget) reads what landed
    outside the tagged trees: a head read to sniff type and encoding, hashing for lineage by
    content, archive listing under a member and time limit."""

    name = "destinations"

    def __init__(self, lineage: LineageIndex | None, settings: DestinationSettings) -> None:
        self.lineage = lineage
        self.settings = settings
        self.counters = {"copies": 0, "archives": 0, "disguised": 0}

    def __call__(self, e: Event) -> Event:
        if e.category != "file":
            return e
        if e.location == "tagged":
            return self._tagged(e)
        if e.file_type != "file" or not _landed(e):
            return e
        lineage = self.lineage
        if lineage is None:
            return e
        origin = None
        if e.action == "moved" and e.src_path is not None:
            origin = lineage.lookup(e.src_path)
            if origin is not None:  # moved out of a tagged tree: it is the tagged file
                lineage.remove(e.src_path)
        elif e.action == "moved_in" and e.size:
            # Moved in from a tagged tree watched in another lane: the source path is unknown
            # here, the departed file is known by name and size.
            origin = lineage.moved_away(e.name, e.size)
        if origin is None:
            return e
        changes: dict[str, Any] = {"lineage_origin": origin.path}
        if origin.tags:
            changes["lineage_tags"] = origin.tags
        if (
            self.settings.disguise
            and e.action == "moved"
            and e.src_path is not None
            and extension_changed(e.src_path, e.path)
        ):
            changes["disguise"] = ("extension_changed",)
        self.counters["copies"] += 1
        return evolve(e, **changes)

    def wants(self, e: Event) -> bool:
        """Does this event need its content read (a regular file landing outside the trees)?"""
        return (
            e.category == "file"
            and e.location != "tagged"
            and e.file_type == "file"
            and bool(e.size)
            and _landed(e)
            and (self.lineage is not None or self.settings.disguise or self.settings.archives)
        )

    def content(self, e: Event) -> tuple[Event, int]:
        """Lineage by content, disguise and archive members; (event, bytes read)."""
        changes: dict[str, Any] = {}
        lineage = self.lineage
        read = 0
        origin_path = e.lineage_origin
        origin_tags: tuple[str, ...] = e.lineage_tags
        if lineage is not None and origin_path is None and e.size:
            before = lineage.stats["hashed_bytes"]
            origin = lineage.find_copy(e.path, e.size)
            read += lineage.stats["hashed_bytes"] - before
            if origin is not None:
                origin_path, origin_tags = origin.path, origin.tags
                self.counters["copies"] += 1
        head = read_head(e.path) if (self.settings.disguise or self.settings.archives) else None
        signals: list[str] = list(e.disguise)
        if head is not None:
            read += len(head)
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
        if head is not None and self.settings.archives and lineage is not None:
            kind = archive_kind(e.path, head)
            if kind is not None:
                tagged = 0
                tags: dict[str, None] = {}

                def member(name: str, size: int, digest: MemberDigest) -> None:
                    # By name and size first (no reading); else by content, for a member
                    # of a tagged file's size: renamed members count too.
                    nonlocal tagged
                    entry = lineage.match_member(name, size) or lineage.match_member_content(
                        size, digest
                    )
                    if entry is not None:
                        tagged += 1
                        tags.update(dict.fromkeys(entry.tags))

                before = lineage.stats["hashed_bytes"]
                info = inspect_archive(
                    e.path,
                    max_members=self.settings.archive_max_members,
                    max_seconds=self.settings.archive_max_seconds,
                    on_member=member,
                    hashing=HashLimits(hash_max_bytes=lineage.hash_max_bytes),
                )
                # About the file once (listing, and hashing members read their own bytes;
                # only a zip whose entries overlap reads some twice, within the hashing
                # budget), plus the tagged files hashed to compare with.
                read += (e.size or 0) + lineage.stats["hashed_bytes"] - before
                if info is not None:
                    self.counters["archives"] += 1
                    changes["archive_tagged"] = tagged
                    # Cut short (a limit, members left unhashed, a listing that failed): what
                    # it holds past that is unknown, which the rules treat as suspicious. Set
                    # only when true: rules test it with `|exists` (they match no booleans).
                    if info.cut_short:
                        changes["archive_truncated"] = True
                    if tagged and not origin_tags:
                        origin_tags = tuple(tags)
                    if info.encrypted and "encrypted" not in signals:
                        signals.append("encrypted")
        if origin_path is not None and origin_path != e.lineage_origin:
            changes["lineage_origin"] = origin_path
        if origin_tags and origin_tags != e.lineage_tags:
            changes["lineage_tags"] = origin_tags
        if len(signals) > len(e.disguise):
            self.counters["disguised"] += 1
            changes["disguise"] = tuple(dict.fromkeys(signals))
        return (evolve(e, **changes) if changes else e), read

    def _tagged(self, e: Event) -> Event:
        """Keep the index current from the tagged trees' own events; flag renames that
        change a tagged file's extension."""
        lineage = self.lineage
        if lineage is not None:
            if e.action in _GONE:
                if e.file_type == "dir" or e.file_type is None:
                    lineage.remove_tree(e.path)
                if e.action == "moved_out":
                    lineage.depart(e.path)
                else:
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
            return evolve(e, disguise=("extension_changed",))
        return e


def _landed(e: Event) -> bool:
    """Content that arrived: closed after write, moved or renamed in, or found by the scan of
    a new directory (a `cp -r` writes files before their directory can be watched)."""
    if e.action in _LANDED:
        return True
    if e.action == "created":
        return e.source in ("scan", "rescan", "watchdog", "polling")
    return e.action == "modified" and e.source in ("watchdog", "polling")
