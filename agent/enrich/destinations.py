"""Where a written file came from and what it looks like: lineage, archives, disguise."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from msgspec.structs import replace as evolve

from agent.enrich.archives import HashLimits, MemberDigest, archive_kind, inspect_archive
from agent.enrich.disguise import (
    deceptive_directory,
    encoding,
    extension_changed,
    read_head,
    strip_wrapper_extension,
    type_mismatch,
)
from agent.enrich.lineage import LineageIndex, bytes_digest
from agent.enrich.repos import RepoIndex
from agent.enrich.tags import Resolved, higher
from agent.enrich.unwrap import (
    DEFAULT_DECODE_MAX_BYTES,
    ChunkSets,
    decode,
    looks_like_mail,
    read_bounded,
)
from agent.events import Event

_LANDED = frozenset({"closed_write", "moved_in", "moved", "rescanned"})
_GONE = frozenset({"deleted", "moved_out"})
ARCHIVE_SAMPLE = 10
DIR_DELETE_WINDOW_US = 600_000_000  # deletes in one directory counted together: 10 minutes
DIR_DELETE_DIRS = 10_000  # directories remembered for that
FRESH_FILES = 50_000  # files found by a scan while created, awaiting their closed_write


@dataclass(frozen=True)
class DestinationSettings:
    archives: bool = True
    archive_max_members: int = 10_000
    archive_max_seconds: float = 0.5
    disguise: bool = True
    # Encoded (base64, hex, uuencode), mailed (MIME) and split copies are decoded or joined
    # to find their tagged origin; at most this many bytes of a file (or a chunk set).
    decode_max_bytes: int = DEFAULT_DECODE_MAX_BYTES


class Destinations:
    """Fills lineage, archive and disguise fields, in two parts.

    The cheap part (`__call__`, on the pipeline's consumer) keeps the lineage index current
    from the tagged trees' own events and traces moves out of them: dictionary lookups only.
    The content part (`content`, in the enrichment worker under its budget) reads what landed
    outside the tagged trees: a head read to sniff type and encoding, hashing for lineage by
    content, archive listing under a member and time limit."""

    name = "destinations"

    def __init__(
        self,
        lineage: LineageIndex | None,
        settings: DestinationSettings,
        resolve_dir: Callable[[str], Resolved] | None = None,
        repos: RepoIndex | None = None,
        on_cap: Callable[..., Any] | None = None,
    ) -> None:
        self.lineage = lineage
        self.settings = settings
        # Tags and sensitivity in force for a tagged directory (asked only for a copy found).
        self.resolve_dir = resolve_dir
        self.repos = repos
        self.counters = {
            "copies": 0,
            "archives": 0,
            "disguised": 0,
            "unwrapped": 0,
            "repositories": 0,
            "encrypted_in_place": 0,
        }
        self.chunks = ChunkSets(on_cap)
        self._on_cap = on_cap  # CapReporter.hit: a cap_reached record
        # Tagged files found by a scan as they were created, until their closed_write.
        self._fresh: OrderedDict[str, int] = OrderedDict()
        # directory -> (files deleted in the window, when the window began), bounded
        self._dir_deletes: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def __call__(self, e: Event) -> Event:
        if e.category != "file":
            return e
        if e.location == "tagged":
            return self._tagged(e)
        if e.file_type != "file" or not _landed(e):
            return e
        deceptive = deceptive_directory(e.path) if self.settings.disguise else None
        if deceptive is not None and deceptive not in e.disguise:
            e = evolve(e, disguise=(*e.disguise, deceptive))
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
        sensitivity = self._sensitivity(origin.path)
        if sensitivity is not None:
            changes["lineage_sensitivity"] = sensitivity
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
        head = read_head(e.path) if (self.settings.disguise or self.settings.archives) else None
        if head is not None:
            read += len(head)
        repos, resolve = self.repos, self.resolve_dir
        if repos is not None and resolve is not None and origin_path is None:
            # A repository's refs or pack, first: they are also byte copies of single files
            # in the tagged .git, but what left is the whole history.
            repo = repos.origin(e.path, head)
            if repo is not None:
                origin_path, changes["lineage_via"] = repo
                origin_tags = resolve(origin_path).tags
                level = resolve(origin_path).sensitivity
                if level is not None:
                    changes["lineage_sensitivity"] = level
                self.counters["repositories"] += 1
        if lineage is not None and origin_path is None and e.size:
            before = lineage.stats["hashed_bytes"]
            origin = lineage.find_copy(e.path, e.size)
            read += lineage.stats["hashed_bytes"] - before
            if origin is not None:
                origin_path, origin_tags = origin.path, origin.tags
                self.counters["copies"] += 1
        signals: list[str] = list(e.disguise)
        enc = encoding(head) if head is not None else None  # once: unwrapping and disguise
        if lineage is not None and origin_path is None and e.size:
            found, via, cost = self._unwrapped(e, head, enc)
            read += cost
            if found is not None:
                origin_path, origin_tags = found.path, found.tags
                self.counters["unwrapped"] += 1
                changes["lineage_via"] = via
        if head is not None and self.settings.disguise:
            if type_mismatch(e.extension, head):
                signals.append("type_mismatch")
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
                member_paths: list[str] = []  # the first few, for their sensitivity

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
                        if len(member_paths) < ARCHIVE_SAMPLE:
                            member_paths.append(entry.path)

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
                    if tagged and origin_path is None:
                        level = None
                        for member_path in member_paths:
                            level = higher(level, self._sensitivity(member_path))
                        if level is not None:
                            changes["lineage_sensitivity"] = level
                    if info.encrypted and "encrypted" not in signals:
                        signals.append("encrypted")
        if origin_path is not None and origin_path != e.lineage_origin:
            changes["lineage_origin"] = origin_path
            sensitivity = changes.get("lineage_sensitivity") or self._sensitivity(origin_path)
            if sensitivity is not None:
                changes["lineage_sensitivity"] = sensitivity
        if origin_tags and origin_tags != e.lineage_tags:
            changes["lineage_tags"] = origin_tags
        if len(signals) > len(e.disguise):
            self.counters["disguised"] += 1
            changes["disguise"] = tuple(dict.fromkeys(signals))
        return (evolve(e, **changes) if changes else e), read

    def _unwrapped(
        self, e: Event, head: bytes | None, enc: str | None
    ) -> tuple[Any, str | None, int]:
        """(tagged entry, via, bytes read) when the file carries a tagged file's content
        encoded, as a mail attachment, or as the last of a set of split chunks."""
        lineage = self.lineage
        assert lineage is not None and e.size
        limit = self.settings.decode_max_bytes
        hash_max = lineage.hash_max_bytes
        chunks = self.chunks.add(e.path, e.size)
        if chunks is not None and len(chunks) > 1:
            total = sum(size for _, size in chunks)
            if total <= limit and lineage.has_size(total):
                parts = [read_bounded(path, size) for path, size in chunks]
                got = [p for p in parts if p is not None]
                if sum(len(p) for p in got) == total and len(got) == len(chunks):
                    joined = b"".join(got)
                    entry = lineage.match_member_content(
                        total, lambda: bytes_digest(joined, hash_max)
                    )
                    if entry is not None:
                        return entry, "split", total
        if head is None or e.size > limit or not (enc == "encoded" or looks_like_mail(head)):
            return None, None, 0
        data = read_bounded(e.path, limit)
        if data is None:
            return None, None, 0
        for kind, payload in decode(data, head):
            entry = lineage.match_member_content(
                len(payload), partial(bytes_digest, payload, hash_max)
            )
            if entry is not None:
                return entry, kind, len(data)
        return None, None, len(data)

    def _sensitivity(self, origin_path: str) -> str | None:
        resolve = self.resolve_dir
        if resolve is None:
            return None
        return resolve(origin_path.rsplit("/", 1)[0] or "/").sensitivity

    def _tagged(self, e: Event) -> Event:
        """Keep the index current from the tagged trees' own events; flag renames that
        change a tagged file's extension."""
        lineage = self.lineage
        changes: dict[str, Any] = {}
        if lineage is not None:
            known = lineage.size_of(e.path)  # before this event updates the index
            # A file a directory scan found being created (cp -r into a new directory): its
            # closed_write completes the creation, it does not write over anything.
            fresh = self._fresh.pop(e.path, 0) if e.action in ("closed_write", "moved") else 0
            if known is not None and e.file_type == "file" and not fresh:
                if e.action == "closed_write" and e.size:
                    # Written in place to the byte count it had (dd conv=notrunc, shred): the
                    # shape of destruction that a size or truncation check does not see.
                    changes["overwrite"] = "same_size" if known == e.size else "rewritten"
                elif e.action == "moved" and e.src_path != e.path:
                    changes["overwrite"] = "replaced"  # a new file renamed over it
            if e.action == "deleted" and known is not None:
                changes.update(self._directory_deletes(e, lineage))
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
                and (
                    e.action in ("closed_write", "moved_in", "moved", "rescanned")
                    # A creation seen live is followed by its closed_write: only files found
                    # by a scan are complete when created (and a same-size overwrite is a
                    # write to a file the index knew before it).
                    or (e.action == "created" and e.source != "inotify")
                )
            ):
                lineage.add(e.path, e.size, (e.mtime_us or 0) * 1000, e.tags)
                if e.action == "created":
                    self._fresh[e.path] = 1
                    if len(self._fresh) > FRESH_FILES:
                        self._fresh.popitem(last=False)
                        if self._on_cap is not None:
                            self._on_cap("fresh_files", FRESH_FILES)
            if e.action == "moved" and e.src_path is not None:
                if e.file_type == "dir":
                    lineage.move_tree(e.src_path, e.path)
                else:
                    lineage.remove(e.src_path)
        signals: list[str] = []
        if (
            self.settings.disguise
            and e.action == "moved"
            and e.src_path is not None
            and e.file_type == "file"
            and extension_changed(e.src_path, e.path)
        ):
            signals.append("extension_changed")
        if self.settings.disguise and "overwrite" in changes and e.size:
            # A tagged file written over: with encrypted content it is encryption in place
            # (`openssl enc -in a.c -out a.c.t && mv a.c.t a.c` keeps every name), which no
            # extension shows. One bounded read of its head per overwrite.
            head = read_head(e.path)
            if head is not None and encoding(head) == "encrypted":
                signals.append("encrypted")
                self.counters["encrypted_in_place"] += 1
        if signals:
            changes["disguise"] = tuple(signals)
        return evolve(e, **changes) if changes else e

    def _directory_deletes(self, e: Event, lineage: LineageIndex) -> dict[str, Any]:
        """Files of the deleted file's directory deleted within DIR_DELETE_WINDOW_US (this
        one included), and their share of the files the directory had: removing most of a
        small directory is destruction too, below any count threshold."""
        directory = e.path.rpartition("/")[0] or "/"
        remaining = lineage.files_in(directory)  # this file included (not removed yet)
        seen = self._dir_deletes.pop(directory, None)
        count = 0
        first = e.timestamp_us
        if seen is not None and e.timestamp_us - seen[1] <= DIR_DELETE_WINDOW_US:
            count, first = seen
        count += 1
        self._dir_deletes[directory] = (count, first)
        if len(self._dir_deletes) > DIR_DELETE_DIRS:
            self._dir_deletes.popitem(last=False)
            if self._on_cap is not None:
                self._on_cap("directory_deletes", DIR_DELETE_DIRS)
        total = count - 1 + remaining
        share = round(count / total, 3) if total > 0 else 1.0
        return {"dir_deleted": count, "dir_deleted_share": min(share, 1.0)}


def _landed(e: Event) -> bool:
    """Content that arrived: closed after write, moved or renamed in, or found by the scan of
    a new directory (a `cp -r` writes files before their directory can be watched)."""
    if e.action in _LANDED:
        return True
    if e.action == "created":
        return e.source in ("scan", "rescan", "watchdog", "polling")
    return e.action == "modified" and e.source in ("watchdog", "polling")
