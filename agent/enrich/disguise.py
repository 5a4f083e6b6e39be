"""Cheap signals that a file's content is disguised: wrong extension, encrypted or encoded."""

from __future__ import annotations

import binascii
import errno
import os
import re
import stat
import struct
import zlib
from functools import lru_cache

HEAD_BYTES = 8192

# Encrypted OpenPGP messages start with a session-key packet (tag 1 public-key, tag 3
# symmetric) or, when the session key was passed by hand, with the encrypted data itself
# (tag 18 SEIPD, tag 20 GnuPG's AEAD). Tag 9 (SED, no integrity check) is left out on purpose:
# it has no header to validate, so one lead byte would match 2% of random binaries. Signed,
# compressed or literal messages and key blocks are not "gpg" here: they are not encrypted.
_PGP_PKESK, _PGP_SKESK, _PGP_SEIPD, _PGP_AEAD = 1, 3, 18, 20
_PGP_ENCRYPTED_TAGS = frozenset({_PGP_PKESK, _PGP_SKESK, _PGP_SEIPD, _PGP_AEAD})
_PGP_PUBKEY_ALGOS = frozenset({1, 2, 3, 16, 18, 20, 22, 25, 26})
_PGP_SYM_ALGOS = frozenset({1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13})
_PGP_S2K_TYPES = frozenset({0, 1, 3, 4, 101})

# Fixed magic numbers at offset 0, checked in order.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "pdf"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip: only the end-of-central-directory record
    (b"PK\x07\x08", "zip"),  # a spanned zip's first part
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!\x1a\x07\x00", "rar"),
    (b"Rar!\x1a\x07\x01\x00", "rar"),
    (b"\x7fELF", "elf"),
    (b"SQLite format 3\x00", "sqlite"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),  # .doc/.xls/.msg, and password-protected .docx
    (b"Salted__", "openssl-enc"),
    (b"age-encryption.org/v1\n", "age"),
)
_BZIP2_BLOCK = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")  # first block / empty
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9][A-Z0-9 ]{0,60})-----")
_ENCRYPTED_TYPES = frozenset({"gpg", "openssl-enc", "age"})
_SEVEN_ZIP_AES = b"\x06\xf1\x07\x01"

# C0 controls other than \t \n \v \f \r and ESC (terminal colours): text has almost none.
_CONTROLS = bytes([*range(0x01, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BASE64_STD = _BASE64 + b"+/="
_BASE64_URL = _BASE64 + b"-_="
_BASE64_ANY = _BASE64 + b"+/-_="
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/=]*")
_HEX = b"0123456789abcdefABCDEF"
_UUENCODE = re.compile(rb"\s*begin(?:-base64)? [0-7]{3,4} [^\r\n]+\r?\n")
# xxd, hexdump -C, od -A x -t x1: an offset, then at least four groups of hex digits.
_HEX_DUMP_LINE = re.compile(rb"[0-9a-fA-F]{6,16}:? +(?:[0-9a-fA-F]{2,8} +){3,}[0-9a-fA-F]{2,8}")
_HEX_BYTES_LINE = re.compile(rb"\s*(?:[0-9a-fA-F]{2}\s+){3,}[0-9a-fA-F]{2}\s*")
_MIN_ENCODED = 256

_TEXT = frozenset({"text", "pem", "pgp-armor"})
_ZIP = frozenset({"zip"})
_OFFICE = frozenset({"zip", "ole"})  # a password-protected .docx is an OLE container
_MEDIA = frozenset({"mp4"})


def _expect(types: frozenset[str], *extensions: str) -> dict[str, frozenset[str]]:
    return dict.fromkeys(extensions, types)


# Only extensions whose content type is unambiguous: an extension missing here is "unknown"
# and never yields a mismatch (e.g. .db, .dat, .bin, .lib, .hex, .key are several formats).
EXPECTED: dict[str, frozenset[str]] = {
    **_expect(frozenset({"jpeg"}), "jpg", "jpeg", "jpe", "jfif"),
    **_expect(frozenset({"png"}), "png"),
    **_expect(frozenset({"gif"}), "gif"),
    **_expect(frozenset({"webp"}), "webp"),
    **_expect(frozenset({"pdf"}), "pdf"),
    **_expect(_ZIP, "zip", "jar", "war", "ear", "apk", "aar", "whl", "ipa", "xpi", "epub"),
    **_expect(_ZIP, "odt", "ods", "odp", "nupkg", "vsix"),
    **_expect(_OFFICE, "docx", "xlsx", "pptx", "docm", "xlsm", "pptm"),
    **_expect(frozenset({"ole"}), "doc", "xls", "ppt", "msg", "msi"),
    **_expect(frozenset({"gzip"}), "gz", "tgz"),
    **_expect(frozenset({"bzip2"}), "bz2", "tbz", "tbz2"),
    **_expect(frozenset({"xz"}), "xz", "txz"),
    **_expect(frozenset({"7z"}), "7z"),
    **_expect(frozenset({"rar"}), "rar"),
    **_expect(frozenset({"tar"}), "tar"),
    **_expect(_MEDIA, "mp4", "m4v", "m4a", "mov", "3gp", "heic", "heif", "avif"),
    **_expect(frozenset({"sqlite"}), "sqlite", "sqlite3"),
    **_expect(frozenset({"elf"}), "o", "elf"),
    **_expect(frozenset({"elf", "text"}), "so"),  # libc.so is a linker script
    **_expect(frozenset({"pe"}), "exe", "dll", "sys"),
    **_expect(frozenset({"gpg", "pgp-armor"}), "gpg", "pgp"),
    **_expect(frozenset({"pgp-armor", "pem", "text"}), "asc"),
    **_expect(frozenset({"age"}), "age"),
    **_expect(frozenset({"pem"}), "pem", "crt", "csr"),
    **_expect(
        _TEXT,
        *("txt", "md", "rst", "csv", "tsv", "json", "yaml", "yml", "toml", "ini", "cfg"),
        *("conf", "xml", "html", "htm", "css", "js", "ts", "svg", "tex", "bib", "log", "sql"),
        *("py", "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "java", "go", "rs", "rb", "sh"),
        *("pl", "tcl", "mk", "cmake", "patch", "diff", "ipynb"),
        # hardware design sources
        *("v", "vh", "sv", "svh", "vhd", "vhdl", "sdc", "xdc", "ucf", "lef", "spef", "sp"),
    ),
}

# Extensions that wrap another file's content: strip_wrapper_extension guesses the origin.
_WRAPPERS = frozenset(
    {
        *("gpg", "pgp", "asc", "age", "enc", "aes", "cpt"),  # encrypted
        *("b64", "base64", "uu", "uue", "xxe"),  # encoded
        *("gz", "bz2", "xz", "zst", "lz4", "lzma"),  # one file compressed
    }
)
_DOUBLE = frozenset({"gz", "bz2", "xz", "zst", "lz", "lzma", "lz4", "z"})  # after .tar
_ALIASES = {
    "tgz": "tar.gz",
    "tbz": "tar.bz2",
    "tbz2": "tar.bz2",
    "tb2": "tar.bz2",
    "txz": "tar.xz",
    "tzst": "tar.zst",
    "jpeg": "jpg",
    "jpe": "jpg",
    "tiff": "tif",
    "htm": "html",
    "yml": "yaml",
}
# Atomic saves write `name.tmp` (or rsync's `.name.XXXXXX`) and rename it over `name`;
# backups rename `name` to `name.bak` or `name~`. Neither disguises anything.
_TEMP_SUFFIXES = frozenset(
    {"tmp", "temp", "swp", "swx", "part", "partial", "crdownload", "new", "lock", "download"}
)
_SEPARATORS = re.compile(r"[._~-]+")
_MKSTEMP = re.compile(r"[a-z]{0,8}[._-]?([A-Za-z0-9]{6})")
_TOOL_TEMP_PREFIXES = ("sed",)  # GNU sed -i: sedXXXXXX in the file's directory
# Whole temporary names of tools that save by write-then-rename, unrelated to the final name:
# GLib/GIO (gedit, Nautilus, every GTK app) `.goutputstream-XXXXXX`, KDE's QSaveFile
# `name.XXXXXX.new` is covered by the remainder rule.
_TOOL_TEMP_NAME = re.compile(r"\.goutputstream-[A-Za-z0-9]{6}")
# Temporary names built around the final name: JetBrains IDEs' safe write
# (`name___jb_tmp___`, the old copy `name___jb_old___`), Syncthing (`.syncthing.name.tmp`,
# `~syncthing~name.tmp` from Windows peers), Emacs' lock and auto-save files.
_WRAPPED_TEMP = (
    ("", "___jb_tmp___"),
    ("", "___jb_old___"),
    ("", "___jb_bak___"),
    (".syncthing.", ".tmp"),
    ("~syncthing~", ".tmp"),
    (".#", ""),
    ("#", "#"),
)
# Backups made by renaming the original aside: cp/mv/install --backup=numbered (`name.~3~`)
# and JetBrains' old copy.
_NUMBERED_BACKUP = re.compile(r"\.~[0-9]+~")
_BACKUP_SUFFIXES = frozenset({"bak", "backup", "orig", "old", "save"})
_EXT_TOKEN = re.compile(r"[a-z0-9][a-z0-9_+-]{0,9}")
_RSYNC_TOKEN = re.compile(r"[A-Za-z0-9]{6}")


def open_regular(path: str) -> int | str:
    """Open `path` read-only as root would safely: no symlink, no blocking on a FIFO, regular
    files only. Returns the fd, or why it was not opened ("missing", "not a regular file",
    "unreadable: ...")."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        # O_NOATIME: a monitor's reads must not rewrite the access times investigators read.
        fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER; retry without
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            return _open_error(exc)
    except OSError as exc:
        return _open_error(exc)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as exc:
        os.close(fd)
        return _open_error(exc)
    if not regular:
        os.close(fd)
        return "not a regular file"
    return fd


def _open_error(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "missing"
    if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # symlink, socket, directory
        return "not a regular file"
    return f"unreadable: {exc.strerror or exc}"


def read_head(path: str, size: int = HEAD_BYTES) -> bytes | None:
    """The first `size` bytes of a regular file (b"" if empty); None if not a readable file."""
    fd = open_regular(path)
    if isinstance(fd, str):
        return None
    try:
        return os.pread(fd, size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


@lru_cache(maxsize=8)  # type_mismatch and encoding ask about the same head in a row
def sniff(head: bytes) -> str | None:
    """Content type from magic bytes (see the module constants); "text" for valid UTF-8
    without NULs and with few control characters; None when nothing is recognised."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[4:10] in _BZIP2_BLOCK:
        return "bzip2"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and len(head) >= 12:  # ISO base media: mp4, mov, m4a, heic, avif
        return "mp4"
    if _is_pe(head):
        return "pe"
    if head[257:262] == b"ustar":
        return "tar"
    if _pgp_encrypted_packet(head):
        return "gpg"
    armor = _armor(head)
    if armor is not None:
        return armor
    if _is_text(head):
        return "text"
    return None


def _is_pe(head: bytes) -> bool:
    if not head.startswith(b"MZ") or len(head) < 0x40:
        return False
    (pe_offset,) = struct.unpack_from("<I", head, 0x3C)
    return head[pe_offset : pe_offset + 4] == b"PE\x00\x00"


def _pgp_encrypted_packet(head: bytes) -> bool:
    """An OpenPGP packet that starts an encrypted message, with a plausible body."""
    packet = _pgp_packet(head)
    if packet is None:
        return False
    tag, body = packet
    if tag == _PGP_PKESK:  # version 3: 8-byte key id, then the public-key algorithm
        return len(body) >= 10 and body[0] == 3 and body[9] in _PGP_PUBKEY_ALGOS
    if tag == _PGP_SKESK:  # version 4: symmetric algorithm, then the S2K type
        if len(body) >= 3 and body[0] == 4:
            return body[1] in _PGP_SYM_ALGOS and body[2] in _PGP_S2K_TYPES
        return len(body) >= 2 and body[0] in (5, 6) and body[1] > 0
    if tag == _PGP_SEIPD:
        return len(body) >= 1 and body[0] in (1, 2)
    return tag == _PGP_AEAD and len(body) >= 1 and body[0] == 1


def _pgp_packet(head: bytes) -> tuple[int, bytes] | None:
    """(tag, start of body) of the first OpenPGP packet, if the header is well formed."""
    if len(head) < 2 or not head[0] & 0x80:
        return None
    first = head[0]
    if first & 0x40:  # new format: tag in 6 bits, length in 1, 2 or 5 octets (or partial)
        tag, octet = first & 0x3F, head[1]
        # 1 octet below 192, 2 up to 223, 255 then 4 more; 224-254 a partial length (1 octet)
        start = 2 if octet < 192 or 224 <= octet < 255 else 3 if octet < 224 else 6
    else:  # old format: tag in 4 bits, length type in 2 bits
        tag, length_type = (first >> 2) & 0x0F, first & 0x03
        start = 1 + (1, 2, 4, 0)[length_type]
    if tag not in _PGP_ENCRYPTED_TAGS:
        return None
    return tag, head[start : start + 16]


def _armor(head: bytes) -> str | None:
    text = head[:256].lstrip(b"\xef\xbb\xbf \t\r\n")
    match = _PEM.match(text)
    if match is None:
        return None
    label = match.group(1)
    if label == b"PGP MESSAGE":
        return "pgp-armor"
    if label == b"AGE ENCRYPTED FILE":
        return "age"
    return "pem"


def _is_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    if not head.isascii():
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            # The head may end in the middle of a multi-byte character: that alone is fine.
            if exc.end != len(head) or exc.reason != "unexpected end of data":
                return False
    controls = len(head) - len(head.translate(None, _CONTROLS))
    return controls * 100 <= len(head)


def _normal_extension(extension: str | None) -> str | None:
    if not extension:
        return None
    ext = extension.lower().lstrip(".")
    return ext if ext in EXPECTED else ext.rsplit(".", 1)[-1]


def type_mismatch(extension: str | None, head: bytes) -> bool:
    """True only when the extension's type is known, the content's type is known, and they
    disagree. Unknown either way is not evidence, so it is False."""
    ext = _normal_extension(extension)
    expected = EXPECTED.get(ext) if ext else None
    if expected is None:
        return False
    kind = sniff(head)
    return kind is not None and kind not in expected


def encoding(head: bytes) -> str | None:
    """Whether `head` is encrypted ("encrypted": gpg, openssl enc, age, a zip entry or 7z
    header with encryption) or encoded ("encoded": base64, uuencode, hex dump), else None.
    Looks at `head` only, so it stays cheap; a 7z's header counts only if it is in `head`."""
    kind = sniff(head)
    if _encrypted(head, kind):
        return "encrypted"
    if kind == "pgp-armor":  # armor of a signed-only message is an encoding, not encryption
        return "encoded" if _armor_not_encrypted(head) else "encrypted"
    if kind != "text":
        return None
    if _UUENCODE.match(head) or _is_hex(head):
        return "encoded"
    decoded = _base64_prefix(head)
    if decoded is None:
        return None
    # `openssl enc -a`, `gpg | base64`, `age -a` style: the decoded start is itself encrypted.
    return "encrypted" if _encrypted(decoded, sniff(decoded)) else "encoded"


def _encrypted(head: bytes, kind: str | None) -> bool:
    if kind in _ENCRYPTED_TYPES:
        return True
    if kind == "zip" and head.startswith(b"PK\x03\x04") and len(head) >= 8:
        (flags,) = struct.unpack_from("<H", head, 6)
        return bool(flags & 0x0001)
    if kind == "7z":
        where = seven_zip_next_header(head)
        if where is not None and where[0] + where[1] <= len(head):
            return seven_zip_header_encrypted(head[where[0] : where[0] + where[1]])
    return False


def _armor_not_encrypted(head: bytes) -> bool:
    lines = head.split(b"\n")
    body = next((i for i, line in enumerate(lines[1:], 1) if not line.strip()), None)
    if body is None or body + 1 >= len(lines):
        return False
    first = lines[body + 1].strip()[:64]
    try:
        raw = binascii.a2b_base64(first[: len(first) // 4 * 4])
    except binascii.Error:
        return False
    if len(raw) < 2 or not raw[0] & 0x80:
        return False
    tag = raw[0] & 0x3F if raw[0] & 0x40 else (raw[0] >> 2) & 0x0F
    return tag in (2, 4, 8, 11)  # signature, one-pass signature, compressed, literal data


def _body(head: bytes) -> bytes:
    """`head` without its last line, which the head limit may have cut, if there are others."""
    end = head.rfind(b"\n")
    return head[: end + 1] if end > 0 else head


def _lines(body: bytes) -> list[bytes]:
    lines = [line.rstrip(b"\r") for line in body.split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _consistent(body: bytes) -> bool:
    """Wrapped output: every line but the last has one width and the last is not longer.
    Checked on newline positions in C rather than line by line."""
    body = body.rstrip(b"\r\n") + b"\n"
    width = body.find(b"\n")
    sampled = body[width :: width + 1]  # where each newline must be if all lines are full
    return sampled == b"\n" * len(sampled) and body.count(b"\n") - len(sampled) in (0, 1)


def _first_line(head: bytes) -> bytes:
    """Up to 256 bytes of the first line: enough to rule most text out cheaply."""
    return head[:256].split(b"\n", 1)[0].rstrip(b"\r")


def _is_hex(head: bytes) -> bool:
    first = _first_line(head)
    plain = not first.translate(None, _HEX)
    if not plain and _HEX_BYTES_LINE.fullmatch(first.rstrip(b"\r")):
        # od -An -tx1 and similar: hex bytes separated by spaces, no offsets.
        lines = _lines(_body(head))
        spaced = sum(1 for line in lines if _HEX_BYTES_LINE.fullmatch(line.rstrip(b"\r")))
        return len(lines) >= 8 and spaced * 10 >= len(lines) * 9
    if not plain and not _HEX_DUMP_LINE.match(first):
        return False
    body = _body(head)
    data = body.translate(None, b"\r\n")
    if len(data) < _MIN_ENCODED:
        return False
    if plain:  # xxd -p, hex strings; not a long decimal number
        hex_only = not data.translate(None, _HEX)
        return hex_only and bool(data.translate(None, b"0123456789")) and _consistent(body)
    lines = _lines(body)
    dumped = sum(1 for line in lines if _HEX_DUMP_LINE.match(line))
    return len(lines) >= 8 and dumped * 10 >= len(lines) * 9


def _base64_prefix(head: bytes) -> bytes | None:
    """The decoded start of `head` if it looks like base64: >= 95% alphabet over at least
    256 bytes, wrapped at one width, varied (not hex, not bit strings) and decodable."""
    if len(_first_line(head).translate(None, _BASE64_ANY)) * 20 > len(_first_line(head)):
        return None  # prose and code stop here, on their first line
    body = _body(head)
    data = body.translate(None, b"\r\n")
    if len(data) < _MIN_ENCODED:
        return None
    url = b"-" in data or b"_" in data
    alphabet = _BASE64_URL if url else _BASE64_STD
    if len(data.translate(None, alphabet)) * 20 > len(data):  # prose and code stop here
        return None
    if len(set(data[:256])) < 24 or not _consistent(body):
        return None
    if url:
        data = data.replace(b"-", b"+").replace(b"_", b"/")
    whole = len(data) // 4 * 4
    try:  # usually all of it decodes; else the longest clean prefix must
        return binascii.a2b_base64(data[:whole], strict_mode=True)
    except binascii.Error:
        pass
    run = _BASE64_RUN.match(data)
    cut = (run.end() if run else 0) // 4 * 4
    if cut < _MIN_ENCODED:
        return None
    try:
        return binascii.a2b_base64(data[:cut], strict_mode=True)
    except binascii.Error:
        return None


def seven_zip_next_header(head: bytes) -> tuple[int, int] | None:
    """(offset, size) of a 7z archive's header, from its 32-byte start header if it is valid
    (its CRC checks), else None. The header itself sits at the end of the archive."""
    if not head.startswith(b"7z\xbc\xaf\x27\x1c") or len(head) < 32:
        return None
    (crc,) = struct.unpack_from("<I", head, 8)
    if zlib.crc32(head[12:32]) != crc:
        return None
    offset, size, _ = struct.unpack_from("<QQI", head, 12)
    return 32 + offset, size


def seven_zip_header_encrypted(header: bytes) -> bool:
    """True when a 7z header is itself encrypted (7z -p -mhe=on): it is an encoded header
    whose first folder's coders include AES-256. Malformed input yields False."""
    if not header or header[0] != 0x17:  # kEncodedHeader; a plain header names files openly
        return False
    try:
        return _seven_zip_coders_aes(header, 1)
    except (IndexError, ValueError):
        return False


def _seven_zip_coders_aes(buf: bytes, pos: int) -> bool:
    if buf[pos] == 0x06:  # kPackInfo: pack position, stream count, then sizes and CRCs
        _, pos = _seven_zip_number(buf, pos + 1)
        streams, pos = _seven_zip_number(buf, pos)
        if streams > 64:
            raise ValueError("implausible stream count")
        while buf[pos] != 0x00:
            prop = buf[pos]
            pos += 1
            if prop == 0x09:  # kSize
                for _ in range(streams):
                    _, pos = _seven_zip_number(buf, pos)
            elif prop == 0x0A:  # kCRC: all-defined flag or bit vector, then the CRCs
                defined = streams
                if buf[pos] == 0:
                    bits = buf[pos + 1 : pos + 1 + (streams + 7) // 8]
                    defined = sum(bin(b).count("1") for b in bits)
                    pos += len(bits)
                pos += 1 + 4 * defined
            else:
                raise ValueError("unexpected property")
        pos += 1
    if buf[pos] != 0x07 or buf[pos + 1] != 0x0B:  # kUnpackInfo, kFolder
        return False
    folders, pos = _seven_zip_number(buf, pos + 2)
    if folders < 1 or buf[pos] != 0:  # external: folders stored elsewhere (never for headers)
        return False
    coders, pos = _seven_zip_number(buf, pos + 1)
    for _ in range(min(coders, 64)):
        flag = buf[pos]
        size = flag & 0x0F
        method = buf[pos + 1 : pos + 1 + size]
        pos += 1 + size
        if method == _SEVEN_ZIP_AES:
            return True
        if flag & 0x10:  # complex coder: input and output stream counts
            _, pos = _seven_zip_number(buf, pos)
            _, pos = _seven_zip_number(buf, pos)
        if flag & 0x20:  # coder properties
            length, pos = _seven_zip_number(buf, pos)
            pos += length
    return False


def _seven_zip_number(buf: bytes, pos: int) -> tuple[int, int]:
    """7z's variable-length number: leading 1 bits of the first byte count extra bytes."""
    first = buf[pos]
    pos += 1
    value = 0
    mask = 0x80
    for i in range(8):
        if not first & mask:
            return value | ((first & (mask - 1)) << (8 * i)), pos
        value |= buf[pos] << (8 * i)
        pos += 1
        mask >>= 1
    return value, pos


def _split_extension(name: str) -> tuple[str, str | None]:
    """(stem, extension lowercased) of a file name; a double extension like .tar.gz counts
    whole and aliases (.tgz, .jpeg) are normalised. Leading dots mark hidden files, not
    extensions; a suffix of digits only (.1, .001, v1.2) is a version, not an extension."""
    base = name.rsplit("/", 1)[-1].rstrip("~")
    hidden = len(base) - len(base.lstrip("."))
    stem, dot, ext = base[hidden:].rpartition(".")
    ext = ext.lower()
    if not dot or not stem or not _EXT_TOKEN.fullmatch(ext) or ext.isdigit():
        return base, None
    if ext in _DOUBLE and stem.lower().endswith(".tar") and len(stem) > 4:
        return base[: hidden + len(stem) - 4], f"tar.{ext}"
    return base[: hidden + len(stem)], _ALIASES.get(ext, ext)


def _temporary_token(token: str) -> bool:
    """A name part that tools generate for a temporary file: a temp word (tmp, lock, swp,
    part...), a pid or counter (digits), or a random suffix (mkstemp's XXXXXX: letters mixed
    with digits or case). A plain lowercase word (gds, v, pdf) is an extension, not this."""
    t = token.lower()
    if t in _TEMP_SUFFIXES or t.startswith(("tmp", "temp")):
        return True
    if any(c.isdigit() for c in token):
        return True
    return len(token) >= 6 and token.isalnum() and not (token.islower() or token.isupper())


def _temporary_remainder(rest: str) -> bool:
    """`rest` (what a temp name adds to the final one: "tmp.1234", "lock", "Ab12Cd") consists
    of temporary tokens only."""
    parts = [p for p in _SEPARATORS.split(rest) if p]
    return bool(parts) and all(_temporary_token(p) for p in parts)


def _temporary_name(name: str) -> bool:
    """A name made for a temporary file, with no real extension: `tmp_pack_Ab12Cd`,
    `.tmp-9829-x`, `tmp1234` (git, mkstemp, sync clients write these and rename them into
    place)."""
    base = name.lstrip(".")
    if _split_extension(name)[1] not in (None, *_TEMP_SUFFIXES):
        return False
    first = _SEPARATORS.split(base, 1)[0].lower()
    if first.startswith(("tmp", "temp")) or base.lower().startswith(("tmp", "temp")):
        return True
    # mkstemp's names: a short tool prefix and six random letters and digits (sed -i writes
    # sedQLNEpz, perl -i and many editors similar ones).
    m = _MKSTEMP.fullmatch(base)
    if m is None:
        return False
    # sed -i's own names are sed + any six letters and digits (all lower or upper case
    # too, one time in a hundred); other prefixes need a token that looks random.
    return base.startswith(_TOOL_TEMP_PREFIXES) or _temporary_token(m.group(1))


def atomic_replace(src_path: str, dst_path: str) -> bool:
    """True when a rename puts a temporary file into place (an atomic save): the final name
    plus a temporary remainder (`x.c.tmp.1234`, `.x.c.swp`, git's `index.lock`, rsync's
    `.x.c.Ab12Cd`), or a temporary name with no real extension (`tmp_pack_Ab12Cd`)."""
    src = src_path.rsplit("/", 1)[-1]
    dst = dst_path.rsplit("/", 1)[-1]
    if not dst:
        return False
    if src.startswith("." + dst + ".") and _RSYNC_TOKEN.fullmatch(src[len(dst) + 2 :]):
        return True  # rsync's .name.XXXXXX, whatever letters the six are
    for before, after in _WRAPPED_TEMP:
        if len(src) == len(before) + len(dst) + len(after) and src == before + dst + after:
            return True
    if _TOOL_TEMP_NAME.fullmatch(src):
        return True
    bare = src.lstrip(".")
    for stem in (bare, src):
        if (
            stem.startswith(dst)
            and len(stem) > len(dst)
            and stem[len(dst)] in "._-~"
            and _temporary_remainder(stem[len(dst) + 1 :])
        ):
            return True
    return _temporary_name(src)


def extension_changed(src_path: str, dst_path: str) -> bool:
    """True when a rename changes the file's extension (case-insensitive; adding or removing
    one counts). Atomic saves (`x.txt.tmp` -> `x.txt`, rsync's `.x.txt.Ab12Cd` -> `x.txt`,
    git's `index.lock` -> `index`, `tmp_pack_Ab12Cd` -> `pack-1.pack`) and backups (`x.txt`
    -> `x.txt.bak` / `x.txt~`) are not changes."""
    src = src_path.rsplit("/", 1)[-1]
    dst = dst_path.rsplit("/", 1)[-1]
    if atomic_replace(src, dst):
        return False
    if dst.startswith(src + ".") and dst[len(src) + 1 :].lower() in _BACKUP_SUFFIXES:
        return False
    if dst.startswith(src) and (
        _NUMBERED_BACKUP.fullmatch(dst[len(src) :]) or dst[len(src) :] in ("___jb_old___",)
    ):
        return False  # the original renamed aside as a backup
    return _split_extension(src)[1] != _split_extension(dst)[1]


def strip_wrapper_extension(name: str) -> str | None:
    """`name` without its last extension when that extension wraps another file (encrypted,
    encoded, single-file compressed): "top.v.gpg" -> "top.v". One layer only; None when the
    last extension is not a wrapper or nothing would be left."""
    head, slash, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot or ext.lower() not in _WRAPPERS or not stem.strip("."):
        return None
    return f"{head}{slash}{stem}"


_TRASH = re.compile(r"\.Trash(?:-\d+)?")


def deceptive_directory(path: str) -> str | None:
    """Whether a directory on the way to `path` is named to be overlooked: "deceptive_name"
    for dots and spaces only (`...`, `.. `), leading or trailing whitespace (`"... "`: T1036.006)
    or control and invisible characters; "deceptive_location" for a trash directory
    (`.Trash-1000`) anywhere but at the top of a mounted filesystem, where desktops make them
    (T1036.005; ~/.local/share/Trash is named differently). None for ordinary names."""
    return _deceptive_dir(path.rpartition("/")[0])


@lru_cache(maxsize=4096)  # by directory: files land in few directories, many times
def _deceptive_dir(directory: str) -> str | None:
    parts = directory.split("/")[1:]
    for i, part in enumerate(parts):
        if not part or part in (".", ".."):
            continue
        if part.strip(". ") == "" or part != part.strip() or not part.isprintable():
            return "deceptive_name"
        if _TRASH.fullmatch(part) and not os.path.ismount("/" + "/".join(parts[:i])):
            return "deceptive_location"
    return None
