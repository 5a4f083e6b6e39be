"""Archive members listed and hashed without extracting, bounded in count, bytes, time, memory."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import importlib
import io
import lzma
import os
import pwd
import re
import resource
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

from agent.enrich.disguise import (
    HEAD_BYTES,
    open_regular,
    read_head,
    seven_zip_header_encrypted,
    seven_zip_next_header,
)
from agent.enrich.lineage import DEFAULT_HASH_MAX_BYTES, SAMPLE_BYTES, hashed_bytes

_KIND_BY_EXTENSION = {
    **dict.fromkeys(("zip", "jar", "war", "ear", "apk", "aar", "whl", "ipa", "xpi"), "zip"),
    "nupkg": "zip",
    "7z": "7z",
    "rar": "rar",
    "tar": "tar",
    **dict.fromkeys(("tgz", "tar.gz"), "tar.gz"),
    **dict.fromkeys(("tbz", "tbz2", "tb2", "tar.bz2"), "tar.bz2"),
    **dict.fromkeys(("txz", "tar.xz"), "tar.xz"),
    **dict.fromkeys(("tzst", "tar.zst"), "tar.zst"),
}
# Lowercase, without the dot. Bare .gz/.bz2/.xz are left out on purpose: they compress one
# file and have no members; a .gz whose content is a tar is still found by its content.
ARCHIVE_EXTENSIONS: frozenset[str] = frozenset(_KIND_BY_EXTENSION)

_CHUNK = 1024 * 1024
# Enough compressed data for a whole first block: bzip2's are up to 900 kB, zstd's 128 KiB.
_LONG_HEAD = 1024 * 1024
_UNSURE = "?"  # compressed data whose head is too short to tell whether a tar is inside
# tarfile reads a pax or GNU long-name header in one read() of the header's declared size;
# real ones are a few hundred bytes, so a bigger read is refused before it is allocated.
_MAX_TAR_METADATA = 256 * 1024
# tarfile scans pax headers with re.search(rb"\d+ ...") patterns: quadratic in the length of
# a digit run (CVE-2024-6232; 64 KiB of digits costs 3.5 s on 3.11.7, 256 KiB a minute).
# Real pax values hold at most ~20 digits in a row, so long runs are refused before parsing.
_DIGIT_RUN = re.compile(rb"[0-9]{65}")
_MAX_7Z_HEADER = 64 * 1024 * 1024
# xz -9 needs 65 MiB; a crafted header may ask liblzma for a 1.5 GiB dictionary.
_XZ_MEMLIMIT = 128 * 1024 * 1024
# A zstd frame names its window size; zstd -19 --long=27 needs 128 MiB, a crafted one asks 2 GiB.
_ZSTD_MAX_WINDOW = 128 * 1024 * 1024
_TIME_CHECK_EVERY = 256

# The 7z program is looked up in system directories only, never in $PATH: the agent runs as
# root, and a user-writable PATH entry would let anyone choose what it runs.
_SEVEN_ZIP_DIRS = "/usr/bin:/bin:/usr/local/bin:/opt/homebrew/bin"
_SEVEN_ZIP_NAMES = ("7z", "7zz", "7za")
# The listing of 10,000 members is about 3 MB; a longer line than this is no `7z -slt` line.
_SEVEN_ZIP_MAX_LINE = 64 * 1024
# Address space of the 7z process: a listing decodes at most a header (bounded above); 7z
# itself maps about 30 MB. A crafted header asking for a 4 GiB dictionary fails instead.
_SEVEN_ZIP_MEMORY = 1024 * 1024 * 1024
_SEVEN_ZIP_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
_SLT_LINE = re.compile(r"([A-Za-z][A-Za-z ]*) = (.*)")
_UNIX_MODE = re.compile(r"[-dlcbps][-rwxsStT]{9}")

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_ZIP_MAX_ENTRY = _CENTRAL.size + 3 * 0xFFFF
_ZIP_TAIL = _EOCD.size + 0xFFFF + _EOCD64_LOCATOR.size + _EOCD64.size
_ZIP_LOCAL = struct.Struct("<4s5H3L2H")
_ZIP_ENCRYPTED = 0x0001
_ZIP_UTF8 = 0x0800
_ZIP_STORED, _ZIP_DEFLATED, _ZIP_BZIP2, _ZIP_LZMA = 0, 8, 12, 14
_UNIX = 3
_DOS_DIRECTORY = 0x10


# Errors that say the file went away or was replaced before it could be read: its new self
# gets an event of its own, so nothing about it is left unchecked here.
_GONE = frozenset({"missing", "not a regular file"})


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    """What an archive holds, as far as the limits allowed us to look."""

    kind: str
    members: tuple[tuple[str, int], ...]  # (path as stored, uncompressed size), regular files
    total_members: int  # regular files counted; more than len(members) when truncated
    truncated: bool  # max_members, max_read_bytes or max_seconds was reached
    encrypted: bool
    error: str | None  # "corrupt", "unsupported: ...", "not a regular file", "too large", ...
    # max_read_bytes or max_seconds ended the walk: members past that point were never seen
    # (max_members alone only shortens `members`: counting and matching go on).
    stopped: bool = False
    # Members offered for hashing (a tagged file has their size) whose content could not be
    # hashed: over the hashing budget, encrypted, a compression method not read here, a 7z.
    unchecked: int = 0
    hashed: int = 0  # members whose content digest was computed
    hashed_bytes: int = 0  # bytes those digests covered

    @property
    def cut_short(self) -> bool:
        """Part of what the archive holds is unknown: a limit ended the walk, members that may
        be tagged content were left unhashed, the member list itself is encrypted, or the
        listing failed (corrupt, unsupported, unreadable) before its end."""
        return (
            self.stopped
            or self.unchecked > 0
            or (self.encrypted and self.total_members == 0)
            or (self.error is not None and self.error not in _GONE)
        )


@dataclass(frozen=True, slots=True)
class HashLimits:
    """How archive members are hashed: lineage's digest (`hash_max_bytes` as configured
    there) under a per-archive budget of members and bytes."""

    hash_max_bytes: int = DEFAULT_HASH_MAX_BYTES
    max_members: int = 1_000
    max_bytes: int = 64 * 1024 * 1024


MemberDigest = Callable[[], bytes | None]


class MemberCheck(Protocol):
    """Called for each regular member as it is listed. `digest()` hashes the member's content
    the way lineage hashes a file of that size (None when it cannot, within the budget); call
    it before returning, or never: only the current member can be read."""

    def __call__(self, name: str, size: int, digest: MemberDigest, /) -> None: ...


class _Stop(Exception):
    """A limit was reached: the listing ends there, truncated, with `error` if any."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__(error)
        self.error = error


WALL_FACTOR = 10.0
WALL_MIN_SECONDS = 5.0


class _Budget:
    """What one archive may cost. The agent's own work (decompressing, hashing) is counted in
    this thread's CPU time, so a loaded machine does not cut an archive short that an idle
    one reads whole; a stalled read still ends at a wall-clock cap (WALL_FACTOR times that,
    at least WALL_MIN_SECONDS). The 7z program, another process, gets `deadline` (wall
    clock)."""

    def __init__(self, max_seconds: float, max_bytes: int) -> None:
        now = time.monotonic()
        self.deadline = now + max_seconds
        self.cpu_deadline = time.thread_time() + max_seconds
        self.wall_cap = now + max(WALL_MIN_SECONDS, WALL_FACTOR * max_seconds)
        self.left = max_bytes

    def spend(self, size: int) -> None:
        if size > self.left:
            raise _Stop()
        self.left -= size
        self.check_time()

    def check_time(self) -> None:
        if time.thread_time() > self.cpu_deadline or time.monotonic() > self.wall_cap:
            raise _Stop()


class _Sampler:
    """Lineage's digest of a member built from its bytes, exactly as `content_digest` reads a
    file of that size: blake2b of the size and the whole content up to `hash_max_bytes`, else
    of the size and three windows (head, middle, tail; they overlap on small sizes)."""

    def __init__(self, size: int, hash_max_bytes: int) -> None:
        self.size = size
        self._hash = hashlib.blake2b(digest_size=20)
        self._hash.update(size.to_bytes(8, "little"))
        self._whole = size <= hash_max_bytes
        self._done = 0  # whole content: bytes hashed so far, in order
        # The byte ranges hashed; a seekable source reads only these.
        self.ranges: tuple[tuple[int, int], ...] = (
            ((0, size),)
            if self._whole
            else tuple(
                (start, min(start + SAMPLE_BYTES, size))
                for start in (0, size // 2, max(0, size - SAMPLE_BYTES))
            )
        )
        self._parts = [bytearray() for _ in self.ranges]

    @property
    def end(self) -> int:
        """How far a stream must be read for the digest."""
        return max(end for _, end in self.ranges)

    def feed(self, offset: int, data: bytes) -> None:
        """The member's bytes at `offset`; each range must be fed in order, without gaps."""
        if self._whole:
            if offset == self._done:
                data = data[: self.size - offset]
                self._hash.update(data)
                self._done += len(data)
            return
        stop = offset + len(data)
        for (start, end), part in zip(self.ranges, self._parts, strict=True):
            at = start + len(part)  # the next byte this range needs
            if offset <= at < min(end, stop):
                part.extend(data[at - offset : min(end, stop) - offset])

    def digest(self) -> bytes | None:
        """The digest, or None if some hashed byte never came (the member was shorter)."""
        if self._whole:
            return self._hash.digest() if self._done == self.size else None
        for (start, end), part in zip(self.ranges, self._parts, strict=True):
            if len(part) != end - start:
                return None
            self._hash.update(part)
        return self._hash.digest()


# Feeds a member's bytes to a sampler; False when they cannot be read as the listing said.
_Read = Callable[[_Sampler], bool]


class _Check:
    """Hands each member to `on_member` with its digest on demand, within the per-archive
    budget: members and bytes hashed. What cannot be hashed when asked is counted."""

    def __init__(self, on_member: MemberCheck, limits: HashLimits) -> None:
        self.on_member = on_member
        self.limits = limits
        self.members_left = limits.max_members
        self.bytes_left = limits.max_bytes
        self.hashed = 0
        self.hashed_bytes = 0
        self.unchecked = 0

    def offer(self, name: str, size: int, read: _Read | None, cost: int | None) -> None:
        answer: list[bytes | None] = []

        def digest() -> bytes | None:
            if not answer:
                answer.append(self._digest(size, read, cost))
            return answer[0]

        self.on_member(name, size, digest)

    def _digest(self, size: int, read: _Read | None, cost: int | None) -> bytes | None:
        """`cost`: bytes the hashing reads or decompresses, when more than it hashes (a
        compressed zip member is decompressed up to its last hashed byte)."""
        hashed = hashed_bytes(size, self.limits.hash_max_bytes)
        cost = max(hashed, cost or 0)
        if read is None or self.members_left <= 0 or cost > self.bytes_left:
            self.unchecked += 1
            return None
        self.members_left -= 1
        self.bytes_left -= cost
        sampler = _Sampler(size, self.limits.hash_max_bytes)
        try:
            digest = sampler.digest() if read(sampler) else None
        except _Stop:
            raise
        except Exception:  # a decoder on hostile data: whatever it raises, it was not read
            digest = None
        if digest is None:
            self.unchecked += 1
            return None
        self.hashed += 1
        self.hashed_bytes += hashed
        return digest


class _Members:
    def __init__(self, max_members: int, check: _Check | None = None) -> None:
        self.max = max_members
        self.items: list[tuple[str, int]] = []
        self.total = 0
        self.truncated = False
        self.stopped = False
        self.encrypted = False
        self.check = check

    def add(self, name: str, size: int, read: _Read | None = None, cost: int | None = None) -> None:
        """A regular member; `read` (None: its content cannot be read here) feeds its bytes
        when a check wants its digest, at `cost` bytes read if more than those hashed."""
        self.total += 1
        if len(self.items) < self.max:
            self.items.append((name, size))
        else:
            self.truncated = True  # keep counting: how many files is itself a signal
        if self.check is not None:
            self.check.offer(name, size, read, cost)

    def stop(self) -> None:
        """A read or time limit ended the walk here."""
        self.truncated = True
        self.stopped = True

    def info(self, kind: str, error: str | None = None) -> ArchiveInfo:
        check = self.check
        return ArchiveInfo(
            kind,
            tuple(self.items),
            self.total,
            self.truncated,
            self.encrypted,
            error,
            self.stopped,
            check.unchecked if check is not None else 0,
            check.hashed if check is not None else 0,
            check.hashed_bytes if check is not None else 0,
        )


def archive_kind(path: str, head: bytes | None = None) -> str | None:
    """ "zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "7z", "rar", "tar.zst" or None: by content
    first (for compressed data, whether it decompresses to a tar header), else by name."""
    if head is None:
        head = read_head(path)
    if head:
        kind = _kind_by_content(head)
        if kind == _UNSURE and len(head) >= HEAD_BYTES:
            # bzip2 and zstd decode a block at a time: one block may be longer than the head
            # (incompressible data first). Read enough for one, so that a tar.zst named
            # backup.bin is still found; this costs a read only for such files.
            longer = read_head(path, _LONG_HEAD)
            kind = _kind_by_content(longer) if longer else None
        if kind is not None and kind != _UNSURE:
            return kind
    return _kind_by_name(path)


def _kind_by_name(path: str) -> str | None:
    base = path.rsplit("/", 1)[-1].lower()
    stem, _, ext = base.rpartition(".")
    if stem.endswith(".tar") and f"tar.{ext}" in _KIND_BY_EXTENSION:
        return _KIND_BY_EXTENSION[f"tar.{ext}"]
    return _KIND_BY_EXTENSION.get(ext) if stem else None


def _kind_by_content(head: bytes) -> str | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if head.startswith(b"Rar!\x1a\x07"):
        return "rar"
    if _is_tar_header(head):
        return "tar"
    for magic, kind, probe in _COMPRESSED:
        if head.startswith(magic):
            # Only a tar inside makes it an archive: a lone .gz has no members. Otherwise, and
            # when the head cannot tell (a bzip2 block longer than it), the name decides, so
            # a .tgz holding no tar is listed as corrupt rather than ignored.
            block = probe(head)
            if block is not None and len(block) < 512:
                return _UNSURE
            return kind if block is not None and _is_tar_header(block) else None
    return None


def _gunzip_head(head: bytes) -> bytes | None:
    try:
        return zlib.decompressobj(wbits=31).decompress(head, 512)
    except zlib.error:
        return None


def _bunzip_head(head: bytes) -> bytes | None:
    try:
        return bz2.BZ2Decompressor().decompress(head, max_length=512)
    except (OSError, EOFError, ValueError):
        return None


def _unxz_head(head: bytes) -> bytes | None:
    try:
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
        return decompressor.decompress(head, max_length=512)
    except (lzma.LZMAError, EOFError):
        return None


def _unzstd_head(head: bytes) -> bytes | None:
    try:
        return _zstd().stream_reader(io.BytesIO(head)).read(512)
    except zstandard.ZstdError:
        return None


def _zstd() -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)


_COMPRESSED: tuple[tuple[bytes, str, Callable[[bytes], bytes | None]], ...] = (
    (b"\x1f\x8b", "tar.gz", _gunzip_head),
    (b"BZh", "tar.bz2", _bunzip_head),
    (b"\xfd7zXZ\x00", "tar.xz", _unxz_head),
    (b"\x28\xb5\x2f\xfd", "tar.zst", _unzstd_head),
)


def _is_tar_header(block: bytes) -> bool:
    """A ustar/GNU/pax header (magic at 257), or a v7 header whose checksum adds up."""
    if len(block) < 512:
        return False
    if block[257:262] == b"ustar":
        return True
    field = block[148:156].split(b"\x00", 1)[0].strip()
    if not block[0] or not field or field.strip(b"01234567"):
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:512])
    return int(field, 8) == unsigned


def inspect_archive(
    path: str,
    *,
    max_members: int = 10_000,
    max_seconds: float = 2.0,
    max_read_bytes: int = 4 * 1024**3,  # a backstop: max_seconds is the limit that binds
    on_member: MemberCheck | None = None,
    hashing: HashLimits | None = None,
) -> ArchiveInfo | None:
    """List an archive's regular files without extracting anything; None if `path` is not an
    archive. Hostile input yields an ArchiveInfo with `error`, never an exception. Member names
    are kept as stored (they may hold "..", newlines or absolute paths: they are data).

    `on_member` sees every regular member counted (past `max_members` too) and may ask for its
    content digest: tar and zip members are read from the archive as it is walked (nothing is
    written anywhere, no link is followed), under `hashing` limits and the same time limit."""
    fd = open_regular(path)
    if isinstance(fd, str):
        kind = _kind_by_name(path)  # the content cannot be read: the name is all we have
        return None if kind is None else _Members(0).info(kind, fd)
    kind = None
    try:
        st = os.fstat(fd)
        head = os.pread(fd, HEAD_BYTES, 0)
        kind = archive_kind(path, head)
        if kind is None:
            return None
        budget = _Budget(max_seconds, max_read_bytes)
        check = None if on_member is None else _Check(on_member, hashing or HashLimits())
        members = _Members(max_members, check)
        if kind == "zip":
            return _list_zip(fd, st.st_size, budget, members)
        if kind == "7z":
            return _list_7z(fd, st, head, budget, members)
        if kind == "rar":
            return _Members(0).info(kind, "unsupported: rar")
        return _list_tar(fd, kind, budget, members)
    except OSError as exc:  # an I/O error on the file itself, not its format
        return None if kind is None else _Members(0).info(kind, f"unreadable: {exc.strerror}")
    finally:
        os.close(fd)


# --- zip: the central directory only, parsed here so that every limit applies as we go ---


def _list_zip(fd: int, size: int, budget: _Budget, members: _Members) -> ArchiveInfo:
    tail_start = max(0, size - _ZIP_TAIL)
    tail = os.pread(fd, size - tail_start, tail_start)
    end = _find_eocd(tail)
    if end is None:
        return members.info("zip", "corrupt")
    _, disk, cd_disk, _, _, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, end)
    locator = end - _EOCD64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        # Zip64: the real values are in a record just before the locator (as zipfile reads it).
        record = locator - _EOCD64.size
        if record < 0 or tail[record : record + 4] != b"PK\x06\x06":
            return members.info("zip", "corrupt")
        fields = _EOCD64.unpack_from(tail, record)
        disk, cd_disk, cd_size, cd_offset, end = fields[4], fields[5], fields[8], fields[9], record
    if disk or cd_disk:
        return members.info("zip", "unsupported: multi-volume zip")
    # The directory ends where the end records start; computing its start from there rather
    # than from its stored offset also lists self-extracting and prefixed archives.
    start = tail_start + end - cd_size
    if start < 0:
        return members.info("zip", "corrupt")
    # Local headers move with the directory: their stored offsets miss the same prefix.
    shift = start - cd_offset
    try:
        error = _read_central_directory(
            fd, start, start + cd_size, shift=shift, budget=budget, members=members
        )
    except _Stop as stop:
        members.stop()
        error = stop.error
    return members.info("zip", error)


def _find_eocd(tail: bytes) -> int | None:
    """Offset in `tail` of the end-of-central-directory record: the one whose comment reaches
    exactly the end of the file if any, else the last one that fits."""
    fallback = None
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0:
        if pos + _EOCD.size <= len(tail):
            (comment,) = struct.unpack_from("<H", tail, pos + 20)
            if pos + _EOCD.size + comment == len(tail):
                return pos
            if fallback is None:
                fallback = pos
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    return fallback


def _read_central_directory(
    fd: int, start: int, stop: int, *, shift: int, budget: _Budget, members: _Members
) -> str | None:
    buf = b""
    off = 0
    read_at = start
    entries = 0
    while read_at < stop or off < len(buf):
        if len(buf) - off < _ZIP_MAX_ENTRY and read_at < stop:
            want = min(_CHUNK, stop - read_at)
            budget.spend(want)
            chunk = os.pread(fd, want, read_at)
            if not chunk:
                return "corrupt"  # the directory runs past the end of the file
            buf = buf[off:] + chunk
            off = 0
            read_at += len(chunk)
        if len(buf) - off < _CENTRAL.size or buf[off : off + 4] != b"PK\x01\x02":
            return "corrupt"
        fields = _CENTRAL.unpack_from(buf, off)
        system, flags, method = fields[2], fields[5], fields[6]
        csize, usize, local = fields[10], fields[11], fields[18]
        name_len, extra_len, comment_len, attributes = (
            fields[12],
            fields[13],
            fields[14],
            fields[17],
        )
        name_end = off + _CENTRAL.size + name_len
        extra = buf[name_end : name_end + extra_len]
        off = name_end + extra_len + comment_len
        if off > len(buf):
            return "corrupt"
        if flags & _ZIP_ENCRYPTED:
            members.encrypted = True
        raw_name = buf[name_end - name_len : name_end]
        mode = attributes >> 16 if system == _UNIX else 0
        directory = (
            raw_name.endswith(b"/")
            or stat.S_ISDIR(mode)
            or (system != _UNIX and bool(attributes & _DOS_DIRECTORY))
        )
        # zipfile.writestr stores permission bits without a file type: no type is a file too.
        if not directory and stat.S_IFMT(mode) in (0, stat.S_IFREG):
            usize, csize, local = _zip64_sizes(extra, usize, csize, local)
            read = None
            if not flags & _ZIP_ENCRYPTED and members.check is not None:
                read = _zip_reader(fd, local + shift, method, csize, budget)
            cost = None if method == _ZIP_STORED else usize  # decompressed up to its end
            members.add(_zip_name(raw_name, flags, extra), usize, read, cost)
        entries += 1
        if entries % _TIME_CHECK_EVERY == 0:
            budget.check_time()
    return None


def _zip64_sizes(extra: bytes, usize: int, csize: int, local: int) -> tuple[int, int, int]:
    """Sizes and local header offset, from the zip64 field for those stored as 0xFFFFFFFF
    (they appear there in this order, only those that overflowed)."""
    values = [usize, csize, local]
    if 0xFFFFFFFF not in values:
        return usize, csize, local
    zip64 = _zip_extra(extra, 0x0001) or b""
    pos = 0
    for i, value in enumerate(values):
        if value == 0xFFFFFFFF and pos + 8 <= len(zip64):
            (values[i],) = struct.unpack_from("<Q", zip64, pos)
            pos += 8
    return values[0], values[1], values[2]


def _zip_reader(fd: int, local: int, method: int, csize: int, budget: _Budget) -> _Read:
    """Reads a member's content from its local entry: stored data by the ranges hashed,
    deflate, bzip2 and LZMA decompressed up to the last byte hashed, never past `csize`."""

    def read(sampler: _Sampler) -> bool:
        header = os.pread(fd, _ZIP_LOCAL.size, local)
        if len(header) < _ZIP_LOCAL.size or header[:4] != b"PK\x03\x04":
            return False
        name_len, extra_len = _ZIP_LOCAL.unpack(header)[9:]
        raw = _Range(fd, local + _ZIP_LOCAL.size + name_len + extra_len, csize, budget)
        if method == _ZIP_STORED:
            if csize != sampler.size:
                return False
            for start, end in sampler.ranges:
                if not _feed(raw.at(start, end - start), sampler, start, end):
                    return False
            return True
        decoder = _zip_decoder(method, raw)
        return decoder is not None and _feed(_Decoded(raw, decoder), sampler, 0, sampler.end)

    return read


def _feed(source: _Readable, sampler: _Sampler, start: int, end: int) -> bool:
    """Feeds `source` (positioned at member offset `start`) to the sampler up to `end`."""
    pos = start
    while pos < end:
        data = source.read(min(_CHUNK, end - pos))
        if not data:
            return False
        sampler.feed(pos, data)
        pos += len(data)
    return True


class _Decoder(Protocol):
    """bz2.BZ2Decompressor and lzma.LZMADecompressor, and _Inflater made to look like them."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = -1, /) -> bytes: ...


class _Inflater:
    """Raw deflate with the interface of the bz2 and lzma decompressors."""

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(-15)

    @property
    def eof(self) -> bool:
        return self._zlib.eof

    @property
    def needs_input(self) -> bool:
        return not self._zlib.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = -1, /) -> bytes:
        return self._zlib.decompress(self._zlib.unconsumed_tail + data, max(0, max_length))


def _zip_decoder(method: int, raw: _Range) -> _Decoder | None:
    if method == _ZIP_DEFLATED:
        return _Inflater()
    if method == _ZIP_BZIP2:
        return bz2.BZ2Decompressor()
    if method == _ZIP_LZMA:
        # A 4-byte header (version, properties size), LZMA1 properties, a raw LZMA1 stream.
        header = raw.read(4)
        if len(header) < 4:
            return None
        props = raw.read(struct.unpack_from("<H", header, 2)[0])
        if len(props) != 5:
            return None
        lc_lp_pb, dict_size = props[0], struct.unpack_from("<I", props, 1)[0]
        if lc_lp_pb >= 9 * 5 * 5 or dict_size > _XZ_MEMLIMIT:  # raw streams take no memlimit
            return None
        lzma1 = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size}
        lzma1.update(lc=lc_lp_pb % 9, lp=lc_lp_pb // 9 % 5, pb=lc_lp_pb // 45)
        try:
            return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1])
        except lzma.LZMAError:
            return None
    return None  # deflate64, PPMd, zstd...: not read here, the member stays unchecked


class _Range:
    """`length` bytes of the file from `start`, read forward, the deadline checked per read."""

    def __init__(self, fd: int, start: int, length: int, budget: _Budget) -> None:
        self._fd = fd
        self._pos = start
        self._end = start + length
        self._budget = budget

    def at(self, offset: int, length: int) -> _Range:
        """The part at `offset` of this range, `length` bytes long (clipped to the range)."""
        start = min(self._pos + offset, self._end)
        return _Range(self._fd, start, min(length, self._end - start), self._budget)

    def read(self, size: int = -1, /) -> bytes:
        self._budget.check_time()
        want = min(_CHUNK if size < 0 else size, self._end - self._pos)
        data = os.pread(self._fd, want, self._pos) if want > 0 else b""
        self._pos += len(data)
        return data


class _Decoded:
    """A decompressor's output, at most `size` bytes per read; b"" at the end of its stream,
    or when the input ends first (the digest then finds bytes missing)."""

    def __init__(self, raw: _Readable, decoder: _Decoder) -> None:
        self._raw = raw
        self._decoder = decoder

    def read(self, size: int = -1, /) -> bytes:
        size = size if size > 0 else _CHUNK
        idle = 0
        while not self._decoder.eof and idle < 2:
            data = self._raw.read(_CHUNK) if self._decoder.needs_input else b""
            try:
                out = self._decoder.decompress(data, size)
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError):
                return b""
            if out:
                return out
            if not data:
                # The input is exhausted before the end of the stream, or the decoder made
                # no progress on what it holds: either way nothing more will come.
                idle += 2 if self._decoder.needs_input else 1
        return b""


def _zip_extra(extra: bytes, wanted: int) -> bytes | None:
    pos = 0
    while pos + 4 <= len(extra):
        header_id, length = struct.unpack_from("<HH", extra, pos)
        if header_id == wanted:
            return extra[pos + 4 : pos + 4 + length]
        pos += 4 + length
    return None


def _zip_name(raw: bytes, flags: int, extra: bytes) -> str:
    """As zipfile decodes, plus what it misses: Info-ZIP's Unicode path field, and UTF-8
    names stored without the flag (Linux zip does that); cp437 otherwise."""
    if flags & _ZIP_UTF8:
        return raw.decode("utf-8", "replace")
    unicode_path = _zip_extra(extra, 0x7075)
    if unicode_path is not None and len(unicode_path) > 5 and unicode_path[0] == 1:
        (crc,) = struct.unpack_from("<I", unicode_path, 1)
        if crc == zlib.crc32(raw):
            return unicode_path[5:].decode("utf-8", "replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp437")


# --- tar family: tarfile reads the headers, we own the bytes it sees ---


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class _Clock:
    """The compressed file, read through with the deadline checked on every read: a stream of
    empty gzip members or xz padding produces no output, so only the input side sees it."""

    def __init__(self, raw: BinaryIO, budget: _Budget) -> None:
        self._raw = raw
        self._budget = budget

    def read(self, size: int = -1, /) -> bytes:
        self._budget.check_time()
        return self._raw.read(min(size, _CHUNK) if size >= 0 else _CHUNK)

    def seek(self, pos: int, whence: int = 0, /) -> int:
        return self._raw.seek(pos, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return False  # the decompressors only ever read forward


class _XzReader:
    """xz decompressed on demand, at most `size` bytes per read, under a memory limit
    (lzma.LZMAFile takes none). Concatenated streams and their padding read as one, as xz."""

    def __init__(self, raw: _Clock) -> None:
        self._raw = raw
        self._decompressor = self._new()
        self._eof = False

    @staticmethod
    def _new() -> lzma.LZMADecompressor:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)

    def read(self, size: int = -1, /) -> bytes:
        size = size if size >= 0 else _CHUNK
        while not self._eof and size:
            if self._decompressor.eof:
                rest = self._decompressor.unused_data.lstrip(b"\x00")
                while not rest:
                    more = self._raw.read(_CHUNK)
                    if not more:
                        self._eof = True
                        return b""
                    rest = more.lstrip(b"\x00")
                self._decompressor = self._new()
                data = rest
            elif self._decompressor.needs_input:
                data = self._raw.read(_CHUNK)
                if not data:
                    raise EOFError("xz stream ends before its end marker")
            else:
                data = b""
            out = self._decompressor.decompress(data, size)
            if out:
                return out
        return b""


class _TarStream:
    """The uncompressed tar as tarfile sees it. Reads are metered against the budget and
    oversized metadata reads refused; seeking forward skips member data: a real seek in a
    plain tar, decompressed and dropped otherwise (that is where the limits matter)."""

    def __init__(self, source: _Readable, budget: _Budget, file: BinaryIO | None) -> None:
        self._source = source
        self._budget = budget
        self._file = file  # set for a plain tar: data is skipped by seeking, not read
        self._pos = 0
        self.past_end = False  # the last header block read was zeros: an end-of-archive mark

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > _MAX_TAR_METADATA:
            raise _Stop("too large")
        self._budget.spend(size)
        data = self._source.read(size)
        self._pos += len(data)
        if size == len(data) == tarfile.BLOCKSIZE:
            self.past_end = not data.strip(b"\0")
        if size > tarfile.BLOCKSIZE and _DIGIT_RUN.search(data):  # a pax or long-name body
            raise _Stop("corrupt")
        return data

    def seek(self, pos: int, whence: int = 0, /) -> int:
        if whence != io.SEEK_SET or pos < self._pos:
            raise ValueError("a tar listing only moves forward")
        if self._file is not None:
            self._budget.check_time()
            self._pos = self._file.seek(pos)
            return self._pos
        while self._pos < pos:
            want = min(_CHUNK, pos - self._pos)
            self._budget.spend(want)
            data = self._source.read(want)
            if not data:
                break  # past the end: tarfile's next read finds nothing and says so
            self._pos += len(data)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def member(self, fd: int, start: int, sampler: _Sampler) -> bool:
        """Feeds the member whose data starts at `start` (where the stream is) to `sampler`:
        a plain tar by reading the ranges hashed, a compressed one by decompressing through it
        (as skipping it would, metered the same)."""
        if self._pos != start:
            return False
        if self._file is not None:
            for lo, hi in sampler.ranges:
                if not _feed(_Range(fd, start + lo, hi - lo, self._budget), sampler, lo, hi):
                    return False
            return True
        end = sampler.end
        while self._pos - start < end:
            want = min(_CHUNK, end - (self._pos - start))
            self._budget.spend(want)
            data = self._source.read(want)
            if not data:
                return False
            sampler.feed(self._pos - start, data)
            self._pos += len(data)
        return True

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("read-only")

    def close(self) -> None:
        pass


def _list_tar(fd: int, kind: str, budget: _Budget, members: _Members) -> ArchiveInfo:
    error: str | None = None
    stream = None
    with open(fd, "rb", buffering=_CHUNK, closefd=False) as raw:
        try:
            stream = _tar_stream(raw, kind, budget)
            archive = tarfile.TarFile(
                fileobj=stream, mode="r", encoding="utf-8", errors="surrogateescape"
            )
            # Once the first header is read (garbage there is a corrupt file), GNU tar -i's
            # reading: members after an end-of-archive marker (two tars concatenated, or zero
            # blocks put there as padding) are listed too. Zero blocks are read like any data,
            # under the same limits.
            archive.ignore_zeros = True
            while (member := archive.next()) is not None:
                # tarfile remembers every member it has read; we only walk forward, so drop
                # them to keep memory flat however many members there are.
                archive.members.clear()  # type: ignore[attr-defined]
                if member.isreg():
                    # GNU sparse data is a map of the content, not the content: not hashed.
                    read = None if member.issparse() else _tar_reader(stream, fd, member)
                    members.add(_printable(member.name), member.size, read)
                    # Hashed or not, the stream is moved to the next header here: tarfile
                    # would step back one byte to it, and this stream only goes forward.
                    if stream.tell() > member.offset_data:
                        stream.seek(archive.offset)
                budget.check_time()
        except _Stop as stop:
            members.stop()
            error = stop.error
        except lzma.LZMAError as exc:
            error = "too large" if "limit" in str(exc).lower() else "corrupt"
        except zstandard.ZstdError as exc:
            error = "too large" if "too much memory" in str(exc).lower() else "corrupt"
        except (tarfile.TarError, EOFError, zlib.error, ValueError, UnicodeError):
            error = "corrupt"
        except OSError as exc:  # gzip.BadGzipFile and bz2's bad data carry no errno
            error = "corrupt" if exc.errno is None else f"unreadable: {exc.strerror}"
        except Exception:  # tarfile on crafted headers also raises OverflowError and the like
            error = "corrupt"
    if error == "corrupt" and not members.stopped and stream is not None and stream.past_end:
        # Bad data after the end-of-archive mark (garbage after a gzip stream, a cut-off
        # tail): gzip and tar ignore it too, nothing can be extracted from it.
        error = None
    return members.info(kind, error)


def _tar_reader(stream: _TarStream, fd: int, member: tarfile.TarInfo) -> _Read:
    start = member.offset_data

    def read(sampler: _Sampler) -> bool:
        return stream.member(fd, start, sampler)

    return read


def _tar_stream(raw: BinaryIO, kind: str, budget: _Budget) -> _TarStream:
    if kind == "tar":
        return _TarStream(raw, budget, raw)
    clock = _Clock(raw, budget)
    source: _Readable
    if kind == "tar.gz":
        source = gzip.GzipFile(fileobj=clock, mode="rb")
    elif kind == "tar.bz2":
        source = bz2.BZ2File(clock)
    elif kind == "tar.zst":
        # stream_reader only ever calls read() on its source.
        source = _zstd().stream_reader(
            cast("IO[bytes]", clock), read_size=_CHUNK, read_across_frames=True
        )
    else:
        source = _XzReader(clock)
    return _TarStream(source, budget, None)


def _printable(name: str) -> str:
    """Undecodable bytes kept by surrogateescape become U+FFFD: names go to JSON later."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "replace").decode("utf-8")


# --- 7z: the 7z program (p7zip-full, 7-Zip) when installed, else py7zr when installed;
# encrypted headers are recognised without either. Members are listed, not hashed: a member
# a check asks the digest of stays unchecked.


def _list_7z(
    fd: int, st: os.stat_result, head: bytes, budget: _Budget, members: _Members
) -> ArchiveInfo:
    where = seven_zip_next_header(head)
    if where is None or where[0] + where[1] > st.st_size:
        return members.info("7z", "corrupt")
    if where[1] > min(_MAX_7Z_HEADER, budget.left):
        return members.info("7z", "too large")
    if seven_zip_header_encrypted(os.pread(fd, where[1], where[0])):
        members.encrypted = True  # names and sizes are encrypted too: nothing to list
        return members.info("7z")
    program = seven_zip_program()
    user = _seven_zip_user(st)
    if program is not None and not isinstance(user, str):
        return _list_7z_program(program, fd, user, budget, members)
    try:
        py7zr: Any = importlib.import_module("py7zr")
    except ImportError:
        if program is None:
            return members.info("7z", "7z listing needs the 7z program or py7zr")
        return members.info("7z", f"not listed: {user}")
    # py7zr parses the whole header in one call: max_seconds cannot interrupt it; the header
    # size bound above (and py7zr's own limits on decoded headers) are what bound it.
    with open(fd, "rb", closefd=False) as file:
        try:
            with py7zr.SevenZipFile(file, mode="r") as archive:
                members.encrypted = bool(archive.needs_password())
                entries = archive.list()
        except py7zr.exceptions.PasswordRequired:
            members.encrypted = True
            return members.info("7z")
        except Exception:  # a third-party parser on hostile input: any failure is a bad file
            return members.info("7z", "corrupt")
    try:
        for entry in entries:
            if not entry.is_directory and not entry.is_symlink:
                members.add(_printable(str(entry.filename)), int(entry.uncompressed or 0))
    except _Stop:
        raise
    except Exception:
        return members.info("7z", "corrupt")
    return members.info("7z")


def seven_zip_program() -> str | None:
    """The 7z program, from system directories only; None if none is installed."""
    for name in _SEVEN_ZIP_NAMES:
        found = shutil.which(name, path=_SEVEN_ZIP_DIRS)
        if found is not None:
            return found
    return None


def _seven_zip_user(st: os.stat_result) -> tuple[int, int] | str | None:
    """Whom the 7z program runs as: a parser of hostile files never runs as root. None: as
    the agent (it is not root). A world-readable archive is read as nobody; another as its
    owner (who already runs code as themselves; their primary group, not the file's). A
    string says why it is not run: an archive only root may read."""
    if os.geteuid() != 0:
        return None
    if st.st_mode & stat.S_IROTH:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            return 65534, 65534
        return nobody.pw_uid, nobody.pw_gid
    if st.st_uid != 0 and st.st_mode & stat.S_IRUSR:
        try:
            return st.st_uid, pwd.getpwuid(st.st_uid).pw_gid
        except KeyError:
            return st.st_uid, 65534
    return "readable by root only"


def _list_7z_program(
    program: str, fd: int, user: tuple[int, int] | None, budget: _Budget, members: _Members
) -> ArchiveInfo:
    """`7z l -slt` on the open file (/dev/fd/N: the file checked, not whatever the path names
    by then), type forced to 7z, an empty password so it never prompts, no stdin, no shell;
    its output read as it comes, under the deadline and the read budget, then killed."""
    argv = [program, "l", "-slt", "-t7z", "-p", "--", f"/dev/fd/{fd}"]
    ids: dict[str, Any] = {}
    if user is not None:
        ids = {"user": user[0], "group": user[1], "extra_groups": []}
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
            cwd="/",
            env=_SEVEN_ZIP_ENV,
            start_new_session=True,  # its own process group: killed with whatever it starts
            **ids,
        )
    except OSError as exc:
        return members.info("7z", f"unreadable: 7z did not start ({exc.strerror})")
    _limit_child(proc.pid)
    listing = _SltListing(members)
    error: str | None = None
    done = False
    try:
        assert proc.stdout is not None
        _read_child(proc.stdout.fileno(), listing, budget)
        listing.end()
        done = True
    except _Stop as stop:
        members.stop()
        error = stop.error
    finally:
        returncode = _reap(proc, budget if done else None)
    # 0: done; 1: warnings only (data after the archive's end, which 7z does not read either).
    if error is None and (returncode not in (0, 1) or listing.bad):
        error = "corrupt"
    return members.info("7z", error)


def _limit_child(pid: int) -> None:
    """Memory, CPU and core limits on the 7z process, set from here once it runs (a
    preexec_fn would run Python between fork and exec: unsafe in a threaded agent)."""
    prlimit = getattr(resource, "prlimit", None)  # Linux only
    if prlimit is None:
        return
    for which, value in (
        (resource.RLIMIT_AS, _SEVEN_ZIP_MEMORY),
        (resource.RLIMIT_CPU, 5),
        (resource.RLIMIT_CORE, 0),
    ):
        # ProcessLookupError: gone already; ValueError: a lower hard limit is in force.
        with contextlib.suppress(OSError, ValueError):
            prlimit(pid, which, (value, value))


def _read_child(out: int, listing: _SltListing, budget: _Budget) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(out, selectors.EVENT_READ)
        while True:
            left = budget.deadline - time.monotonic()
            if left <= 0:
                raise _Stop()
            if not selector.select(left):
                continue
            chunk = os.read(out, 65536)
            if not chunk:
                return
            budget.spend(len(chunk))
            listing.feed(chunk)


def _reap(proc: subprocess.Popen[bytes], budget: _Budget | None) -> int:
    """The exit status once its output ended, waiting until the deadline at most; without a
    budget (we stopped reading), or past the deadline, killed first (negative status)."""
    if proc.stdout is not None:
        proc.stdout.close()
    if budget is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=max(0.0, budget.deadline - time.monotonic()))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


class _SltListing:
    """`7z l -slt` output parsed as it arrives: after the "----------" line, one block of
    "Key = value" lines per entry, blocks separated by an empty line. A line of any other
    shape, or a key twice in a block (a name holding a newline, from a 7z that prints names
    raw) makes the listing corrupt rather than misread."""

    def __init__(self, members: _Members) -> None:
        self._members = members
        self._pending = b""
        self._started = False
        self._entry: dict[str, str] = {}
        self.bad = False

    def feed(self, chunk: bytes) -> None:
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > _SEVEN_ZIP_MAX_LINE:
            raise _Stop("corrupt")
        for line in lines:
            self._line(line.rstrip(b"\r").decode("utf-8", "replace"))

    def end(self) -> None:
        if self._pending:
            self._line(self._pending.decode("utf-8", "replace"))
        self._line("")

    def _line(self, line: str) -> None:
        if not self._started:
            self._started = line == "----------"
            return
        if not line:
            if self._entry:
                self._add(self._entry)
                self._entry = {}
            return
        match = _SLT_LINE.fullmatch(line)
        if match is None or match[1] in self._entry or (not self._entry and match[1] != "Path"):
            self.bad = True
            return
        self._entry[match[1]] = match[2]

    def _add(self, entry: dict[str, str]) -> None:
        if entry.get("Encrypted") == "+":
            self._members.encrypted = True
        attributes = entry.get("Attributes", "").split()
        unix = next((a for a in attributes if _UNIX_MODE.fullmatch(a)), "")
        windows = attributes[0] if attributes and attributes[0] != unix else ""
        if (
            "D" in windows
            or entry.get("Folder") == "+"
            or entry.get("Anti") == "+"
            or (unix and not unix.startswith("-"))
        ):
            return  # directories, links, devices; anti-items delete, they hold nothing
        try:
            size = int(entry.get("Size") or 0)
        except ValueError:
            self.bad = True
            return
        self._members.add(_printable(entry.get("Path", "")), size)
