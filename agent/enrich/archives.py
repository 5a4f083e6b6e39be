"""Archive members listed without extracting, bounded in count, bytes read, time and memory."""

from __future__ import annotations

import bz2
import gzip
import importlib
import io
import lzma
import os
import re
import stat
import struct
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from agent.enrich.disguise import (
    HEAD_BYTES,
    open_regular,
    read_head,
    seven_zip_header_encrypted,
    seven_zip_next_header,
)

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
_TIME_CHECK_EVERY = 256

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_ZIP_MAX_ENTRY = _CENTRAL.size + 3 * 0xFFFF
_ZIP_TAIL = _EOCD.size + 0xFFFF + _EOCD64_LOCATOR.size + _EOCD64.size
_ZIP_ENCRYPTED = 0x0001
_ZIP_UTF8 = 0x0800
_UNIX = 3
_DOS_DIRECTORY = 0x10


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    """What an archive holds, as far as the limits allowed us to look."""

    kind: str
    members: tuple[tuple[str, int], ...]  # (path as stored, uncompressed size), regular files
    total_members: int  # regular files counted; more than len(members) when truncated
    truncated: bool  # max_members, max_read_bytes or max_seconds was reached
    encrypted: bool
    error: str | None  # "corrupt", "unsupported: ...", "not a regular file", "too large", ...


class _Stop(Exception):
    """A limit was reached: the listing ends there, truncated, with `error` if any."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__(error)
        self.error = error


class _Budget:
    def __init__(self, max_seconds: float, max_bytes: int) -> None:
        self.deadline = time.monotonic() + max_seconds
        self.left = max_bytes

    def spend(self, size: int) -> None:
        if size > self.left:
            raise _Stop()
        self.left -= size
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Stop()


class _Members:
    def __init__(self, max_members: int) -> None:
        self.max = max_members
        self.items: list[tuple[str, int]] = []
        self.total = 0
        self.truncated = False
        self.encrypted = False

    def add(self, name: str, size: int) -> None:
        self.total += 1
        if len(self.items) < self.max:
            self.items.append((name, size))
        else:
            self.truncated = True  # keep counting: how many files is itself a signal

    def info(self, kind: str, error: str | None = None) -> ArchiveInfo:
        return ArchiveInfo(
            kind, tuple(self.items), self.total, self.truncated, self.encrypted, error
        )


def archive_kind(path: str, head: bytes | None = None) -> str | None:
    """ "zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "7z", "rar", "tar.zst" or None: by content
    first (for compressed data, whether it decompresses to a tar header), else by name."""
    if head is None:
        head = read_head(path)
    if head:
        kind = _kind_by_content(head)
        if kind is not None:
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


_COMPRESSED: tuple[tuple[bytes, str, Callable[[bytes], bytes | None]], ...] = (
    (b"\x1f\x8b", "tar.gz", _gunzip_head),
    (b"BZh", "tar.bz2", _bunzip_head),
    (b"\xfd7zXZ\x00", "tar.xz", _unxz_head),
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
    max_read_bytes: int = 512 * 1024 * 1024,
) -> ArchiveInfo | None:
    """List an archive's regular files without extracting anything; None if `path` is not an
    archive. Hostile input yields an ArchiveInfo with `error`, never an exception. Member names
    are kept as stored (they may hold "..", newlines or absolute paths: they are data)."""
    fd = open_regular(path)
    if isinstance(fd, str):
        kind = _kind_by_name(path)  # the content cannot be read: the name is all we have
        return None if kind is None else _Members(0).info(kind, fd)
    kind = None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_BYTES, 0)
        kind = archive_kind(path, head)
        if kind is None:
            return None
        budget = _Budget(max_seconds, max_read_bytes)
        if kind == "zip":
            return _list_zip(fd, size, budget, _Members(max_members))
        if kind == "7z":
            return _list_7z(fd, size, head, budget, _Members(max_members))
        if kind == "rar":
            return _Members(0).info(kind, "unsupported: rar")
        if kind == "tar.zst":
            return _Members(0).info(kind, "unsupported: zstd")
        return _list_tar(fd, kind, budget, _Members(max_members))
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
    _, disk, cd_disk, _, _, cd_size, _, _ = _EOCD.unpack_from(tail, end)
    locator = end - _EOCD64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        # Zip64: the real values are in a record just before the locator (as zipfile reads it).
        record = locator - _EOCD64.size
        if record < 0 or tail[record : record + 4] != b"PK\x06\x06":
            return members.info("zip", "corrupt")
        fields = _EOCD64.unpack_from(tail, record)
        disk, cd_disk, cd_size, end = fields[4], fields[5], fields[8], record
    if disk or cd_disk:
        return members.info("zip", "unsupported: multi-volume zip")
    # The directory ends where the end records start; computing its start from there rather
    # than from its stored offset also lists self-extracting and prefixed archives.
    start = tail_start + end - cd_size
    if start < 0:
        return members.info("zip", "corrupt")
    try:
        error = _read_central_directory(fd, start, start + cd_size, budget, members)
    except _Stop as stop:
        members.truncated = True
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
    fd: int, start: int, stop: int, budget: _Budget, members: _Members
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
        system, flags, usize = fields[2], fields[5], fields[11]
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
            if usize == 0xFFFFFFFF:
                zip64 = _zip_extra(extra, 0x0001)
                if zip64 is not None and len(zip64) >= 8:
                    (usize,) = struct.unpack_from("<Q", zip64)
            members.add(_zip_name(raw_name, flags, extra), usize)
        entries += 1
        if entries % _TIME_CHECK_EVERY == 0:
            budget.check_time()
    return None


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

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > _MAX_TAR_METADATA:
            raise _Stop("too large")
        self._budget.spend(size)
        data = self._source.read(size)
        self._pos += len(data)
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

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("read-only")

    def close(self) -> None:
        pass


def _list_tar(fd: int, kind: str, budget: _Budget, members: _Members) -> ArchiveInfo:
    error: str | None = None
    with open(fd, "rb", buffering=_CHUNK, closefd=False) as raw:
        try:
            stream = _tar_stream(raw, kind, budget)
            archive = tarfile.TarFile(
                fileobj=stream, mode="r", encoding="utf-8", errors="surrogateescape"
            )
            while (member := archive.next()) is not None:
                # tarfile remembers every member it has read; we only walk forward, so drop
                # them to keep memory flat however many members there are.
                archive.members.clear()  # type: ignore[attr-defined]
                if member.isreg():
                    members.add(_printable(member.name), member.size)
                budget.check_time()
        except _Stop as stop:
            members.truncated = True
            error = stop.error
        except lzma.LZMAError as exc:
            error = "too large" if "limit" in str(exc).lower() else "corrupt"
        except (tarfile.TarError, EOFError, zlib.error, ValueError, UnicodeError):
            error = "corrupt"
        except OSError as exc:  # gzip.BadGzipFile and bz2's bad data carry no errno
            error = "corrupt" if exc.errno is None else f"unreadable: {exc.strerror}"
        except Exception:  # tarfile on crafted headers also raises OverflowError and the like
            error = "corrupt"
    return members.info(kind, error)


def _tar_stream(raw: BinaryIO, kind: str, budget: _Budget) -> _TarStream:
    if kind == "tar":
        return _TarStream(raw, budget, raw)
    clock = _Clock(raw, budget)
    source: _Readable
    if kind == "tar.gz":
        source = gzip.GzipFile(fileobj=clock, mode="rb")
    elif kind == "tar.bz2":
        source = bz2.BZ2File(clock)
    else:
        source = _XzReader(clock)
    return _TarStream(source, budget, None)


def _printable(name: str) -> str:
    """Undecodable bytes kept by surrogateescape become U+FFFD: names go to JSON later."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "replace").decode("utf-8")


# --- 7z: py7zr when installed; encrypted headers are recognised without it ---


def _list_7z(fd: int, size: int, head: bytes, budget: _Budget, members: _Members) -> ArchiveInfo:
    where = seven_zip_next_header(head)
    if where is None or where[0] + where[1] > size:
        return members.info("7z", "corrupt")
    if where[1] > min(_MAX_7Z_HEADER, budget.left):
        return members.info("7z", "too large")
    if seven_zip_header_encrypted(os.pread(fd, where[1], where[0])):
        members.encrypted = True  # names and sizes are encrypted too: nothing to list
        return members.info("7z")
    try:
        py7zr: Any = importlib.import_module("py7zr")
    except ImportError:
        return members.info("7z", "7z listing needs py7zr")
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
    except Exception:
        return members.info("7z", "corrupt")
    return members.info("7z")
