"""Disguise signals on real files: content type, wrong extensions, encryption and encodings."""

from __future__ import annotations

import base64
import binascii
import bz2
import gzip
import lzma
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.enrich.disguise import (
    EXPECTED,
    deceptive_directory,
    encoding,
    extension_changed,
    read_head,
    sniff,
    strip_wrapper_extension,
    type_mismatch,
)

VERILOG = "".join(f"module m{i}(input a, output b); assign b = ~a; endmodule\n" for i in range(200))
JPEG_HEAD = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffdb004300") + bytes(64)
PDF_HEAD = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"


def png_bytes() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def head_of(path: Path) -> bytes:
    head = read_head(str(path))
    assert head is not None
    return head


def cli(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=60, env=env)


def test_sniff_recognises_real_files_by_their_magic(tmp_path: Path) -> None:
    db = tmp_path / "x.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("create table t (x)")
    conn.close()
    with zipfile.ZipFile(tmp_path / "x.docx", "w") as zf:
        zf.writestr("word/document.xml", "<w:document/>")
    with tarfile.open(tmp_path / "x.tar", "w") as tf:
        tf.add(db, "x.sqlite")
    cases = {
        write(tmp_path / "a.png", png_bytes()): "png",
        write(tmp_path / "a.jpg", JPEG_HEAD): "jpeg",
        write(tmp_path / "a.pdf", PDF_HEAD): "pdf",
        write(tmp_path / "a.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"): "gif",
        write(tmp_path / "a.gz", gzip.compress(VERILOG.encode())): "gzip",
        write(tmp_path / "a.bz2", bz2.compress(VERILOG.encode())): "bzip2",
        write(tmp_path / "a.xz", lzma.compress(VERILOG.encode())): "xz",
        write(tmp_path / "a.v", VERILOG.encode()): "text",
        write(tmp_path / "a.mp4", b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"): "mp4",
        write(tmp_path / "a.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n"): "pem",
        db: "sqlite",
        tmp_path / "x.docx": "zip",
        tmp_path / "x.tar": "tar",
    }
    for path, kind in cases.items():
        assert sniff(head_of(path)) == kind, path.name
    if sys.platform.startswith("linux"):
        assert sniff(head_of(Path(os.path.realpath(sys.executable)))) == "elf"


def test_random_bytes_and_empty_files_have_no_type(tmp_path: Path) -> None:
    assert sniff(head_of(write(tmp_path / "r.bin", b"\xfe" + os.urandom(4095)))) is None
    assert sniff(head_of(write(tmp_path / "empty.txt", b""))) is None


def test_read_head_refuses_symlinks_fifos_and_directories(tmp_path: Path) -> None:
    target = write(tmp_path / "real.v", b"module x; endmodule\n")
    (tmp_path / "link.v").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.v")
    assert read_head(str(target), size=6) == b"module"
    assert read_head(str(tmp_path / "link.v")) is None
    assert read_head(str(tmp_path / "fifo.v")) is None  # and does not block
    assert read_head(str(tmp_path)) is None
    assert read_head(str(tmp_path / "missing")) is None


@pytest.fixture
def gnupg_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    if shutil.which("gpg") is None:
        pytest.skip("needs the gpg CLI (gnupg)")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    yield env
    if shutil.which("gpgconf"):  # gpg starts an agent for this home: stop it
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, timeout=30)


def test_gpg_symmetric_output_binary_and_armored_is_encrypted(
    tmp_path: Path, gnupg_home: dict[str, str]
) -> None:
    write(tmp_path / "top.v", VERILOG.encode())
    base = ("gpg", "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", "x")
    cli(*base, "--symmetric", "-o", "top.v.gpg", "top.v", cwd=tmp_path, env=gnupg_home)
    cli(*base, "--symmetric", "--armor", "-o", "top.v.asc", "top.v", cwd=tmp_path, env=gnupg_home)
    binary = head_of(tmp_path / "top.v.gpg")
    armored = head_of(tmp_path / "top.v.asc")
    assert (sniff(binary), encoding(binary)) == ("gpg", "encrypted")
    assert (sniff(armored), encoding(armored)) == ("pgp-armor", "encrypted")
    assert type_mismatch("v", binary) is True  # encrypted bytes named like source
    assert type_mismatch("gpg", binary) is False


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_openssl_enc_output_raw_and_base64_is_encrypted(tmp_path: Path) -> None:
    write(tmp_path / "top.v", VERILOG.encode())
    enc = ("openssl", "enc", "-aes-256-cbc", "-pbkdf2", "-k", "x", "-in", "top.v")
    cli(*enc, "-out", "top.v.enc", cwd=tmp_path)
    cli(*enc, "-a", "-out", "top.v.b64", cwd=tmp_path)
    raw = head_of(tmp_path / "top.v.enc")
    armored = head_of(tmp_path / "top.v.b64")
    assert (sniff(raw), encoding(raw)) == ("openssl-enc", "encrypted")
    assert (sniff(armored), encoding(armored)) == ("text", "encrypted")


def test_age_files_binary_and_armored_are_encrypted() -> None:
    header = b"age-encryption.org/v1\n-> X25519 abcdefghijklmnop\nq83v\n--- abc\n" + os.urandom(64)
    assert (sniff(header), encoding(header)) == ("age", "encrypted")
    armored = b"-----BEGIN AGE ENCRYPTED FILE-----\nYWdlLWVuY3J5cHRpb24ub3JnL3YxCi0+\n"
    assert (sniff(armored), encoding(armored)) == ("age", "encrypted")


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs the zip CLI")
def test_a_zip_whose_first_entry_is_password_protected_is_encrypted(tmp_path: Path) -> None:
    write(tmp_path / "top.v", VERILOG.encode())
    cli("zip", "-q", "-e", "-P", "secret", "e.zip", "top.v", cwd=tmp_path)
    cli("zip", "-q", "p.zip", "top.v", cwd=tmp_path)
    assert encoding(head_of(tmp_path / "e.zip")) == "encrypted"
    assert encoding(head_of(tmp_path / "p.zip")) is None


@pytest.mark.skipif(shutil.which("7z") is None, reason="needs the 7z CLI (p7zip-full)")
def test_a_small_7z_with_encrypted_headers_is_encrypted_from_its_head(tmp_path: Path) -> None:
    write(tmp_path / "top.v", VERILOG.encode())
    cli("7z", "a", "-bd", "-psecret", "-mhe=on", "e.7z", "top.v", cwd=tmp_path)
    cli("7z", "a", "-bd", "p.7z", "top.v", cwd=tmp_path)
    assert encoding(head_of(tmp_path / "e.7z")) == "encrypted"
    assert encoding(head_of(tmp_path / "p.7z")) is None


def test_base64_of_random_bytes_is_encoded_wrapped_or_not(tmp_path: Path) -> None:
    data = os.urandom(12_000)
    wrapped = write(tmp_path / "w.txt", base64.encodebytes(data))  # 76 columns
    single = write(tmp_path / "s.txt", base64.b64encode(data))
    url = write(tmp_path / "u.txt", base64.urlsafe_b64encode(data))
    for path in (wrapped, single, url):
        assert encoding(head_of(path)) == "encoded", path.name
    if shutil.which("base64"):
        write(tmp_path / "r.bin", data)
        cli("sh", "-c", "base64 r.bin > cli.b64", cwd=tmp_path)
        assert encoding(head_of(tmp_path / "cli.b64")) == "encoded"


def test_uuencode_and_hex_dumps_are_encoded() -> None:
    data = os.urandom(4000)
    uu = b"begin 644 top.v\n" + b"".join(
        binascii.b2a_uu(data[i : i + 45]) for i in range(0, 4000, 45)
    )
    plain_hex = b"\n".join(data.hex().encode()[i : i + 60] for i in range(0, 8000, 60)) + b"\n"
    dump = b"".join(
        f"{i:08x}  {' '.join(f'{b:02x}' for b in data[i : i + 16])}  |................|\n".encode()
        for i in range(0, 4000, 16)
    )
    assert encoding(uu) == "encoded"
    assert encoding(plain_hex) == "encoded"
    assert encoding(dump) == "encoded"


def test_ordinary_text_and_binaries_are_not_encoded() -> None:
    bits = b"".join(b"0110100111010010" * 4 + b"\n" for _ in range(64))  # test vectors
    csv = b"".join(f"{i},{i * i},{i * 3.5}\n".encode() for i in range(500))
    digits = b"3141592653589793238462643383279502884197169399375105820974944592" * 8
    for head in (VERILOG.encode(), bits, csv, digits, png_bytes(), base64.b64encode(b"short")):
        assert encoding(head) is None


def test_text_named_jpg_is_a_mismatch_and_a_real_jpeg_is_not(tmp_path: Path) -> None:
    disguised = write(tmp_path / "holiday.jpg", VERILOG.encode())
    real = write(tmp_path / "photo.jpg", JPEG_HEAD)
    assert type_mismatch("jpg", head_of(disguised)) is True
    assert type_mismatch(".JPG", head_of(real)) is False
    assert type_mismatch("jpeg", head_of(real)) is False


def test_mismatch_needs_both_a_known_extension_and_a_known_content() -> None:
    assert type_mismatch("xyz", VERILOG.encode()) is False  # unknown extension
    assert type_mismatch(None, VERILOG.encode()) is False
    assert type_mismatch("jpg", b"\xfe" + os.urandom(500)) is False  # unknown content
    assert type_mismatch("jpg", b"") is False


def test_mismatch_follows_container_families() -> None:
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)
    zip_head = b"PK\x03\x04" + bytes(26)
    assert type_mismatch("docx", zip_head) is False
    assert type_mismatch("docx", ole) is False  # a password-protected .docx
    assert type_mismatch("jar", zip_head) is False
    assert type_mismatch("txt", png_bytes()) is True
    assert type_mismatch("v", zip_head) is True
    assert type_mismatch("tar.gz", gzip.compress(b"x")) is False
    assert type_mismatch("tgz", VERILOG.encode()) is True
    assert set(EXPECTED["v"]) >= {"text"}


@pytest.mark.parametrize(
    ("src", "dst", "changed"),
    [
        ("/d/top.v", "/d/holiday.jpg", True),
        ("/d/top.v", "/d/top.V", False),
        ("/d/report", "/d/report.pdf", True),
        ("/d/report.pdf", "/d/report", True),
        ("/d/a.tar.gz", "/d/b.tgz", False),
        ("/d/a.tar.gz", "/d/a.gz", True),
        ("/d/a.tar.gz", "/d/a.tar", True),
        ("/d/a.jpeg", "/d/b.JPG", False),
        ("/d/top.v", "/d/top.v.jpg", True),
        ("/d/design_v1.2", "/d/design_v1.3", False),
        ("/d/top.v.tmp", "/d/top.v", False),
        ("/d/.top.v.Ab3xZ9", "/d/top.v", False),
        ("/d/top.v", "/d/top.v.bak", False),
        ("/d/top.v", "/d/top.v~", False),
        ("/d/.bashrc", "/d/.profile", False),
        ("/d/Makefile.tmp", "/d/Makefile", False),
        # Atomic saves and git's lock files are not disguises.
        ("/d/.mod2.c.tmp.1234", "/d/mod2.c", False),
        ("/d/.top.v.abcdef", "/d/top.v", False),
        ("/d/HEAD.lock", "/d/HEAD", False),
        ("/d/index.lock", "/d/index", False),
        ("/d/tmp_pack_lNn4Xc", "/d/.tmp-9829-pack-9685.pack", False),
        ("/d/tmp_obj_a1B2c3", "/d/4b825dc642cb6eb9a060e54bf8d69288fbee4904", False),
        ("/d/report.pdf.crdownload", "/d/report.pdf", False),
        ("/d/sedQLNEpz", "/d/mod3.c", False),
        ("/d/sedTQWDRX", "/d/mod5.c", False),  # all upper case: seen on CI
        ("/d/sedabcdef", "/d/mod5.c", False),
        # Editors', IDEs' and sync clients' own temporary and backup names.
        ("/d/mod1.c___jb_tmp___", "/d/mod1.c", False),
        ("/d/mod1.c", "/d/mod1.c___jb_old___", False),
        ("/d/.goutputstream-AB12CD", "/d/mod2.c", False),
        ("/d/.syncthing.mod3.c.tmp", "/d/mod3.c", False),
        ("/d/~syncthing~mod3.c.tmp", "/d/mod3.c", False),
        ("/d/mod4.c", "/d/mod4.c.~1~", False),
        ("/d/mod4.c", "/d/mod4.c.~12~", False),
        ("/d/.#notes.org", "/d/notes.org", False),
        ("/d/#notes.org#", "/d/notes.org", False),
        # ... but only around the same name, and only those shapes.
        ("/d/.syncthing.top.v.tmp", "/d/holiday.jpg", True),
        ("/d/top.v___jb_tmp___", "/d/top.jpg", True),
        ("/d/.goutputstream-AB12CD.v", "/d/x.jpg", True),
        ("/d/top.v", "/d/top.v.~x~", True),
        ("/d/design", "/d/design.jpg", True),
        ("/d/.~lock.report.docx#", "/d/x.docx", True),
        # A real extension in the removed part is still a change: a two-step disguise
        # (design.gds -> cat.jpg.gds -> cat.jpg) is seen at the second step.
        ("/d/cat.jpg.gds", "/d/cat.jpg", True),
        ("/d/tmp_1.gds", "/d/cat.jpg", True),
        ("/d/design.gds", "/d/tmp_design", True),
    ],
)
def test_extension_changed(src: str, dst: str, changed: bool) -> None:
    assert extension_changed(src, dst) is changed


@pytest.mark.parametrize(
    ("name", "origin"),
    [
        ("top.v.gpg", "top.v"),
        ("a.txt.b64", "a.txt"),
        ("x.enc", "x"),
        ("/w/rtl/core.sv.AGE", "/w/rtl/core.sv"),
        ("a.txt.b64.gpg", "a.txt.b64"),
        ("logs.tar.gz", "logs.tar"),
        ("top.v", None),
        (".gpg", None),
        ("noext", None),
        ("dir.gpg/file", None),
    ],
)
def test_strip_wrapper_extension(name: str, origin: str | None) -> None:
    assert strip_wrapper_extension(name) == origin


@settings(max_examples=2000, deadline=None)
@given(head=st.binary(max_size=9000), extension=st.sampled_from([None, *EXPECTED, "xyz", ""]))
def test_sniff_encoding_and_mismatch_never_raise(head: bytes, extension: str | None) -> None:
    sniff(head)
    encoding(head)
    type_mismatch(extension, head)


@settings(max_examples=500, deadline=None)
@given(
    prefix=st.sampled_from(
        [
            b"7z\xbc\xaf\x27\x1c",
            b"PK\x03\x04",
            b"\x8c\x0d\x04",
            b"\xc1",
            b"\xd2",
            b"MZ",
            b"-----BEGIN PGP MESSAGE-----\n\n",
            b"begin 644 x\n",
        ]
    ),
    rest=st.binary(max_size=600),
)
def test_magic_prefixes_with_garbage_never_raise(prefix: bytes, rest: bytes) -> None:
    head = prefix + rest
    sniff(head)
    encoding(head)


@pytest.mark.parametrize(
    ("path", "signal"),
    [
        ("/tmp/... /a.c", "deceptive_name"),
        ("/tmp/.. /a.c", "deceptive_name"),
        ("/tmp/work /a.c", "deceptive_name"),
        ("/tmp/a\u200bb/a.c", "deceptive_name"),
        ("/tmp/.Trash-1000/files/a.c", "deceptive_location"),
        ("/tmp/.Trash/a.c", "deceptive_location"),
        ("/.Trash-1000/a.c", None),  # at the top of a mounted filesystem: where desktops put it
        ("/home/al/.local/share/Trash/files/a.c", None),
        ("/tmp/.stash/a.c", None),
        ("/tmp/work/a.c", None),
        ("/tmp/... ", None),  # the file's own name is not a directory
    ],
)
def test_deceptive_directories(path: str, signal: str | None) -> None:
    assert deceptive_directory(path) == signal
