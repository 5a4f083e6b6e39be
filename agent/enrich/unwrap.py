"""Content wrapped for transport: decode it to find the tagged file inside.

A base64, hex or uuencoded copy of a tagged file, a MIME message (an `.eml`, a mail spool)
carrying it as an attachment, and a set of `split` chunks hold the tagged content without
being byte-for-byte copies of it, so hashing them finds nothing. This module turns them back
into the bytes they carry, bounded: at most `max_bytes` of the file are read and decoded, and
anything malformed gives nothing rather than an error. Lineage then compares the decoded bytes
with the tagged files of the same size (agent/enrich/lineage.py)."""

from __future__ import annotations

import binascii
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from email import policy
from email.parser import BytesParser
from typing import Any

from agent.enrich.disguise import open_regular

CapHit = Callable[..., Any]  # CapReporter.hit(name, cap, **data): a cap_reached record
DEFAULT_DECODE_MAX_BYTES = 16 * 1024 * 1024
MAX_PARTS = 64  # attachments looked at in one mail file
CHUNK_SETS = 1000  # split chunk sets remembered
CHUNK_SECONDS = 600.0  # a chunk set is forgotten this long after its last chunk
MAX_CHUNKS = 1000

_B64 = re.compile(rb"[A-Za-z0-9+/=\s]+")
_B64URL = re.compile(rb"[A-Za-z0-9\-_=\s]+")
_HEX_PLAIN = re.compile(rb"[0-9a-fA-F\s]+")
_DUMP_OFFSET = re.compile(rb"^[0-9a-fA-F]{6,16}:?\s")
_HEX_TOKEN = re.compile(rb"[0-9a-fA-F]{2,8}")
_OFFSET_ONLY = re.compile(rb"[0-9a-fA-F]{6,16}:?")
_UU_BEGIN = re.compile(rb"\s*begin [0-7]{3,4} [^\r\n]+\r?\n")
_UU_BASE64_BEGIN = re.compile(rb"\s*begin-base64 [0-7]{3,4} [^\r\n]+\r?\n")
_MAIL_HEADERS = (
    b"from ",
    b"from:",
    b"received:",
    b"return-path:",
    b"mime-version:",
    b"content-type:",
    b"message-id:",
    b"subject:",
    b"to:",
    b"date:",
    b"delivered-to:",
    b"x-",
)
# split's suffixes: aa..zz (and longer), 00..99 with -d, or x00 / part names.
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*?)(?P<suffix>[a-z]{2,4}|[0-9]{2,4})$")


def read_bounded(path: str, max_bytes: int) -> bytes | None:
    """The whole regular file when it is at most `max_bytes`, else None (no symlink, no FIFO,
    atime untouched)."""
    fd = open_regular(path)
    if isinstance(fd, str):
        return None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            return None
        chunks = []
        left = size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _base64(data: bytes) -> bytes | None:
    body = data.strip()
    if not body:
        return None
    for pattern, alt in ((_B64, None), (_B64URL, b"-_")):
        if pattern.fullmatch(body):
            compact = b"".join(body.split())
            if alt is not None:
                compact = compact.translate(bytes.maketrans(b"-_", b"+/"))
            compact += b"=" * (-len(compact) % 4)
            try:
                return binascii.a2b_base64(compact, strict_mode=False)
            except (binascii.Error, ValueError):
                return None
    return None


def _hex(data: bytes) -> bytes | None:
    body = data.strip()
    if body and _HEX_PLAIN.fullmatch(body):
        compact = b"".join(body.split())
        if len(compact) % 2 == 0:
            try:
                return bytes.fromhex(compact.decode())
            except ValueError:
                return None
    return _hex_dump(body)


def _hex_dump(body: bytes) -> bytes | None:
    """xxd (`offset: hex groups  text`), `hexdump -C` (`offset  hex  hex  |text|`) and od with
    offsets: the hex part of each line, without the offset and the text column."""
    out = bytearray()
    lines = body.splitlines()
    if not lines or not _DUMP_OFFSET.match(lines[0]):
        return None
    for line in lines:
        m = _DUMP_OFFSET.match(line)
        if m is None:
            if line.strip() in (b"", b"*") or _OFFSET_ONLY.fullmatch(line.strip()):
                continue  # a repeat marker, or the closing offset of hexdump -C
            return None
        rest = line[m.end() :]
        # hexdump -C: the text column is between bars; xxd: two spaces before the text
        # column (its hex part never has two).
        bars = b"  |" in rest
        rest = rest.split(b"  |", 1)[0] if bars else rest.lstrip(b" ").split(b"  ", 1)[0]
        for token in rest.split():
            if not _HEX_TOKEN.fullmatch(token) or len(token) % 2:
                return None
            out += bytes.fromhex(token.decode())
    return bytes(out) if out else None


def _uudecode(data: bytes) -> bytes | None:
    m = _UU_BASE64_BEGIN.match(data)
    if m is not None:
        body = data[m.end() :].split(b"\n====", 1)[0]
        return _base64(body)
    m = _UU_BEGIN.match(data)
    if m is None:
        return None
    out = bytearray()
    for line in data[m.end() :].splitlines():
        if line.strip() == b"end":
            break
        if not line or line in (b"`", b" "):
            continue
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            try:  # some encoders pad lines short; decode the whole groups only
                n = (line[0] - 32) & 63
                out += binascii.a2b_uu(line[: 1 + (n + 2) // 3 * 4])
            except (binascii.Error, IndexError):
                return None
    return bytes(out) if out else None


def looks_like_mail(head: bytes) -> bool:
    """A mail message or spool: header lines at the start, a MIME or mbox marker."""
    first = head.lstrip()[:200].lower()
    if not first.startswith(_MAIL_HEADERS):
        return False
    lower = head.lower()
    return b"content-transfer-encoding:" in lower or b"multipart/" in lower


def _messages(data: bytes) -> Iterator[bytes]:
    """One message, or each message of an mbox spool (split at "From " lines)."""
    if not data.startswith(b"From "):
        yield data
        return
    start = 0
    while True:
        nxt = data.find(b"\nFrom ", start + 1)
        if nxt < 0:
            yield data[start:]
            return
        yield data[start : nxt + 1]
        start = nxt + 1


def mail_attachments(data: bytes) -> Iterator[bytes]:
    """The decoded payloads of a mail file's non-text parts and attachments."""
    parser = BytesParser(policy=policy.compat32)
    parts = 0
    for raw in _messages(data):
        try:
            message = parser.parsebytes(raw)
        except Exception:  # noqa: S112 - untrusted input: a parse error gives nothing
            continue
        try:
            parts_of = list(message.walk())
        except RecursionError:  # a message nested past the interpreter's depth: nothing
            continue
        for part in parts_of:
            if part.is_multipart():
                continue
            parts += 1
            if parts > MAX_PARTS:
                return
            encoding = (part.get("Content-Transfer-Encoding") or "").strip().lower()
            filename = part.get_filename()
            if encoding not in ("base64", "quoted-printable", "x-uuencode", "uuencode") and not (
                filename
            ):
                continue
            try:
                payload = part.get_payload(decode=True)
            except Exception:  # noqa: S112 - a malformed payload gives nothing
                continue
            if isinstance(payload, bytes) and payload:
                yield payload


def decode(data: bytes, head: bytes) -> Iterator[tuple[str, bytes]]:
    """(via, bytes carried) for each thing `data` wraps: "mime" attachments, or the whole file
    decoded as "uuencode", "base64" or "hex"."""
    if looks_like_mail(head):
        for payload in mail_attachments(data):
            yield "mime", payload
        return
    for via, fn in (("uuencode", _uudecode), ("hex", _hex), ("base64", _base64)):
        try:
            out = fn(data)
        except (ValueError, binascii.Error):
            out = None
        if out:
            yield via, out
            return


class ChunkSets:
    """Files written by `split` (or any tool that cuts a file in numbered pieces): by directory
    and name prefix, in suffix order. Bounded in sets, chunks and time."""

    def __init__(self, on_cap: CapHit | None = None) -> None:
        self._on_cap = on_cap
        self._sets: OrderedDict[tuple[str, str], tuple[float, dict[str, tuple[str, int]]]] = (
            OrderedDict()
        )

    def add(self, path: str, size: int) -> list[tuple[str, int]] | None:
        """Record a chunk; the set it completes so far (paths and sizes in suffix order,
        starting at the first suffix), or None when `path` is not named like a chunk."""
        directory, _, name = path.rpartition("/")
        m = _SPLIT_NAME.match(name)
        if m is None or not m.group("prefix"):
            return None
        prefix, suffix = m.group("prefix"), m.group("suffix")
        now = time.monotonic()
        key = (directory, prefix)
        entry = self._sets.pop(key, None)
        chunks = entry[1] if entry is not None and now - entry[0] <= CHUNK_SECONDS else {}
        if len(chunks) < MAX_CHUNKS:
            chunks[suffix] = (path, size)
        elif self._on_cap is not None:
            self._on_cap("chunk_set_size", MAX_CHUNKS, directory=directory)
        self._sets[key] = (now, chunks)
        if len(self._sets) > CHUNK_SETS:
            self._sets.popitem(last=False)
            if self._on_cap is not None:
                self._on_cap("chunk_sets", CHUNK_SETS)
        first = "a" * len(suffix) if suffix.isalpha() else "0" * len(suffix)
        if first not in chunks or len(chunks) < 2:
            return None
        return [chunks[s] for s in sorted(chunks) if len(s) == len(suffix)]
