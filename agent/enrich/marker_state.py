"""Sticky marker tags: what every marker ever gave its directory, kept under `state_dir`."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from agent.config import SENSITIVITY_LEVELS
from agent.events import format_timestamp
from agent.health import CapReporter, Reporter, now_us, record

STORE_NAME = "markers.json"
STORE_VERSION = 1
# Caps on what a marker may say. A marker with 9,500 tags once made every event in its tree
# ~300 KB; 64 tags of 64 characters is far beyond what a team labels a tree with.
MAX_TAGS = 64
MAX_TAG_CHARS = 64
# Kept per directory: a marker edited to new tags adds them to what is kept (removing a tag
# is an admin's job), so a directory may hold more than one marker's worth, up to this.
MAX_STORED_TAGS = 64
# Directories in the store. Each one costs at most ~4 KB of tags; the file is rewritten on a
# change, so this also bounds the cost of a write (~4 MB at worst, a few KB in practice).
MAX_DIRECTORIES = 1024
MAX_STORE_BYTES = 16 * 1024 * 1024
# Letters, digits and `-_.:/` (ASCII only: look-alike letters would make two tags that a SIEM
# query tells apart and a person does not).
TAG_PATTERN = re.compile(r"[A-Za-z0-9_.:/-]+")


def tag_problem(tag: str) -> tuple[str, str] | None:
    """(code, message) when `tag` breaks the tag rules, else None."""
    if len(tag) > MAX_TAG_CHARS:
        return "MRK_TAG_TOO_LONG", f"a tag has at most {MAX_TAG_CHARS} characters ({len(tag)})"
    if not TAG_PATTERN.fullmatch(tag):
        return "MRK_TAG_CHARS", "a tag is made of letters, digits and - _ . : / only"
    return None


@dataclass(frozen=True, slots=True)
class StoredMarker:
    """What a directory's markers ever gave it, and the state its marker was last found in."""

    tags: tuple[str, ...]
    sensitivity: str | None
    first_seen: str
    updated: str
    # The directory's identity when the marker was first learnt: a directory moved inside a
    # watched tree is found again by it and keeps its tags.
    device: int | None = None
    inode: int | None = None
    # The removal attempts in force when the marker was last looked at; () when intact.
    tampered: tuple[str, ...] = ()
    moved_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tags": list(self.tags),
            "sensitivity": self.sensitivity,
            "first_seen": self.first_seen,
            "updated": self.updated,
            "device": self.device,
            "inode": self.inode,
            "tampered": list(self.tampered),
        }
        if self.moved_from is not None:
            out["moved_from"] = self.moved_from
        return out

    @classmethod
    def from_dict(cls, data: object) -> StoredMarker:
        """Checks itself: the store is ours, but a corrupt entry must not become tags."""
        if not isinstance(data, dict):
            raise ValueError("an entry is an object")
        tags = data.get("tags")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("tags must be a list of strings")
        if len(tags) > MAX_STORED_TAGS:
            raise ValueError(f"more than {MAX_STORED_TAGS} tags")
        for tag in tags:
            bad = tag_problem(tag)
            if bad is not None:
                raise ValueError(f"tag {tag[:80]!r}: {bad[1]}")
        sensitivity = data.get("sensitivity")
        if sensitivity is not None and sensitivity not in SENSITIVITY_LEVELS:
            raise ValueError(f"unknown sensitivity {sensitivity!r}")
        texts = {k: data.get(k) for k in ("first_seen", "updated")}
        if not all(isinstance(v, str) for v in texts.values()):
            raise ValueError("first_seen and updated must be timestamps")
        ids = {k: data.get(k) for k in ("device", "inode")}
        if not all(
            v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in ids.values()
        ):
            raise ValueError("device and inode must be integers")
        tampered = data.get("tampered", [])
        if not isinstance(tampered, list) or not all(isinstance(t, str) for t in tampered):
            raise ValueError("tampered must be a list of strings")
        moved_from = data.get("moved_from")
        if moved_from is not None and not isinstance(moved_from, str):
            raise ValueError("moved_from must be a path")
        return cls(
            tuple(dict.fromkeys(tags)),
            sensitivity,
            str(texts["first_seen"]),
            str(texts["updated"]),
            ids["device"],
            ids["inode"],
            tuple(tampered),
            moved_from,
        )


def now_text() -> str:
    return format_timestamp(now_us())


def read_store(path: str) -> tuple[dict[str, StoredMarker] | None, list[str]]:
    """The entries of a store file ({} when there is none), and what was wrong with it. None
    when the file cannot be used at all; an entry that does not check itself is left out."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        return None, [f"{path}: {exc.strerror or exc}"]
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, [f"{path}: not a regular file"]
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_STORE_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_STORE_BYTES:
        return None, [f"{path}: larger than {MAX_STORE_BYTES} bytes"]
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        return None, [f"{path}: not JSON ({exc})"]
    if not isinstance(data, dict) or data.get("version") != STORE_VERSION:
        return None, [f"{path}: not a version {STORE_VERSION} marker store"]
    markers = data.get("markers")
    if not isinstance(markers, dict):
        return None, [f"{path}: 'markers' must be an object"]
    entries: dict[str, StoredMarker] = {}
    problems: list[str] = []
    for directory, raw in markers.items():
        if not directory.startswith("/"):
            problems.append(f"{path}: {directory[:200]!r}: not an absolute path")
            continue
        try:
            entries[directory] = StoredMarker.from_dict(raw)
        except ValueError as exc:
            problems.append(f"{path}: {directory[:200]!r}: {exc}")
    return entries, problems


def write_store(path: str, entries: Mapping[str, StoredMarker]) -> None:
    """Atomically: a new file (exclusive, not following links, 0600), fsync, rename, fsync
    of the directory. A crash leaves the old store or the new one, never half of one."""
    directory = os.path.dirname(path) or "."
    body = json.dumps(
        {
            "version": STORE_VERSION,
            "markers": {d: e.to_dict() for d, e in sorted(entries.items())},
        },
        indent=1,
        ensure_ascii=True,
    ).encode("ascii")
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ensure_state_dir(state_dir: str) -> None:
    """Created 0700 when missing; an existing one is left as it is (other parts use it too)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)


@contextmanager
def store_lock(path: str) -> Iterator[None]:
    """An exclusive flock shared by the agent and `exfilwatch markers`, so that a change made
    by one is never lost to a write by the other (each write is a read-modify-write)."""
    ensure_state_dir(os.path.dirname(path) or ".")
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(f"{path}.lock", flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class MarkerStore:
    """The sticky-tag store: in memory, and on disk when there is a state_dir.

    The agent only ever adds to it (tags, a higher sensitivity, a directory) and notes the
    state each marker was last found in; only an admin removes from it (`exfilwatch markers
    forget`, then a reload, which calls `load()`). Every change is written at once as a
    read-modify-write of the one directory changed, under the lock the command takes too: a
    directory the admin forgot is not written back by an unrelated change."""

    def __init__(
        self,
        state_dir: str | None,
        report: Reporter,
        caps: CapReporter,
        cap: int = MAX_DIRECTORIES,
    ) -> None:
        self.path = os.path.join(state_dir, STORE_NAME) if state_dir else None
        self.cap = cap
        self._report = report
        self._caps = caps
        self._entries: dict[str, StoredMarker] = {}
        self._by_inode: dict[tuple[int, int], str] = {}
        # Changed in memory but not yet on disk (the write failed): kept across a load().
        self._unsaved: set[str] = set()
        self._last_error: str | None = None
        self.writes = 0
        self.write_errors = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, directory: str) -> StoredMarker | None:
        return self._entries.get(directory)

    def by_inode(self, device: int, inode: int) -> str | None:
        return self._by_inode.get((device, inode))

    def items(self) -> list[tuple[str, StoredMarker]]:
        return sorted(self._entries.items())

    def load(self) -> list[tuple[str, StoredMarker]]:
        """(Re-)read the file. Returns the entries that were in memory and are no longer on
        disk: forgotten by an admin since the last load."""
        if self.path is None:
            return []
        try:
            with store_lock(self.path):
                entries, problems = read_store(self.path)
                moved_to = None
                if entries is None:
                    # Kept for the admin to look at; the agent goes on with what it has.
                    moved_to = f"{self.path}.rejected-{now_us()}"
                    try:
                        os.replace(self.path, moved_to)
                    except OSError:
                        moved_to = None
        except OSError as exc:
            self._failed("read", exc)
            return []
        if problems:
            self._report(
                record(
                    "source_error",
                    "marker_store_invalid",
                    stage="marker_store",
                    store=self.path,
                    problems=problems[:20],
                    problem_count=len(problems),
                    moved_to=moved_to,
                )
            )
        if entries is None:
            if self._entries:
                self._write(dict(self._entries))  # the file was lost: memory is all there is
            return []
        for directory in self._unsaved:
            if directory in self._entries:
                entries[directory] = self._entries[directory]
        forgotten = [(d, e) for d, e in self._entries.items() if d not in entries]
        self._entries = entries
        self._by_inode = {
            (e.device, e.inode): d
            for d, e in entries.items()
            if e.device is not None and e.inode is not None
        }
        return sorted(forgotten)

    def put(self, directory: str, entry: StoredMarker) -> bool:
        """Keep `entry` for `directory`: in memory at once, on disk as soon as it can be
        written. False when the store is full and the directory is new to it (cap_reached)."""
        if directory not in self._entries and len(self._entries) >= self.cap:
            self._caps.hit("marker_store", self.cap, directory=directory)
            return False
        self._entries[directory] = entry
        if entry.device is not None and entry.inode is not None:
            self._by_inode[(entry.device, entry.inode)] = directory
        if self.path is not None:
            self._unsaved.add(directory)
            if self._write({directory: entry}):
                self._unsaved.clear()
        return True

    def _write(self, changes: Mapping[str, StoredMarker]) -> bool:
        assert self.path is not None
        try:
            with store_lock(self.path):
                on_disk, _ = read_store(self.path)
                entries = dict(self._entries) if on_disk is None else on_disk
                for directory in self._unsaved:
                    if directory in self._entries:
                        entries[directory] = self._entries[directory]
                entries.update(changes)
                write_store(self.path, entries)
        except OSError as exc:
            self._failed("write", exc)
            return False
        self.writes += 1
        self._last_error = None
        return True

    def _failed(self, what: str, exc: OSError) -> None:
        if what == "write":
            self.write_errors += 1
        reason = f"{what}: {exc.strerror or exc}"
        # Tried at every marker change: the same failure again says nothing new.
        if reason != self._last_error:
            self._last_error = reason
            self._report(
                record(
                    "source_error",
                    "marker_store_" + what,
                    stage="marker_store",
                    store=self.path,
                    message=reason,
                    hint="sticky tags stay in force in memory until the agent stops; "
                    "make state_dir writable by the agent",
                )
            )

    def stats(self) -> dict[str, Any]:
        return {
            "directories": len(self._entries),
            "cap": self.cap,
            "writes": self.writes,
            "write_errors": self.write_errors,
            "unsaved": len(self._unsaved),
        }


def forget(state_dir: str, directory: str, recursive: bool = False) -> list[str]:
    """Remove the stored marker of `directory` (and, recursive, of every directory under
    it) from the file; the running agent drops it at its next reload. Returns what went."""
    path = os.path.join(state_dir, STORE_NAME)
    prefix = directory.rstrip("/") + "/"
    with store_lock(path):
        entries, problems = read_store(path)
        if entries is None:
            raise OSError("; ".join(problems))
        gone = [d for d in entries if d == directory or (recursive and d.startswith(prefix))]
        if gone:
            for d in gone:
                del entries[d]
            write_store(path, entries)
    return sorted(gone)
