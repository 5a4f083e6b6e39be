"""Archive listing on real archives: formats, encryption, limits, and hostile files."""

from __future__ import annotations

import importlib.util
import io
import os
import pwd
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.enrich import archives
from agent.enrich.archives import (
    ARCHIVE_EXTENSIONS,
    WALL_MIN_SECONDS,
    ArchiveInfo,
    HashLimits,
    MemberDigest,
    archive_kind,
    inspect_archive,
)
from agent.enrich.lineage import content_digest

HOSTILE = ("../../etc/cron.d/evil", "/abs/olute.txt", "line\nbreak.v", "back\\slash", "ü.txt")
TAR_MODES = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}
FIXTURE_REUSED = HealthCheck.function_scoped_fixture  # one file per example, rewritten each time
needs_7z = pytest.mark.skipif(shutil.which("7z") is None, reason="needs the 7z CLI (p7zip-full)")
needs_py7zr = pytest.mark.skipif(
    importlib.util.find_spec("py7zr") is None, reason="needs py7zr (optional dependency)"
)


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_tar(path: Path, kind: str, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, TAR_MODES[kind]) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            add_file(tf, name, data)
    return path


def run(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=60)


def test_a_zip_lists_its_regular_files_with_uncompressed_sizes(tmp_path: Path) -> None:
    path = tmp_path / "out.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("rtl/top.v", b"module top; endmodule\n" * 100)
        zf.writestr("rtl/", b"")
        link = zipfile.ZipInfo("rtl/link")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/shadow")
    info = inspect_archive(str(path))
    assert info is not None
    assert info.kind == "zip"
    assert info.members == (("rtl/top.v", 2200),)
    assert info.total_members == 1
    assert (info.truncated, info.encrypted, info.error) == (False, False, None)


def test_hostile_member_names_are_kept_exactly_as_stored(tmp_path: Path) -> None:
    files = {name: b"x" for name in HOSTILE}
    for kind, path in (
        ("zip", make_zip(tmp_path / "h.zip", files)),
        ("tar.gz", make_tar(tmp_path / "h.tgz", "tar.gz", files)),
    ):
        info = inspect_archive(str(path))
        assert info is not None
        assert info.kind == kind
        assert [name for name, _ in info.members] == list(HOSTILE)


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_each_tar_flavour_lists_regular_files_only(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"out.{kind}"
    with tarfile.open(path, TAR_MODES[kind]) as tf:  # type: ignore[call-overload]
        add_file(tf, "a/secret.v", b"module secret; endmodule\n")
        for name, kind_flag in (("a", tarfile.DIRTYPE), ("a/link", tarfile.SYMTYPE)):
            entry = tarfile.TarInfo(name)
            entry.type = kind_flag
            entry.linkname = "/etc/shadow"
            tf.addfile(entry)
        hard = tarfile.TarInfo("a/hard")
        hard.type = tarfile.LNKTYPE
        hard.linkname = "a/secret.v"
        tf.addfile(hard)
        add_file(tf, "a/empty.txt", b"")
    info = inspect_archive(str(path))
    assert info is not None
    assert info.kind == kind
    assert info.members == (("a/secret.v", 25), ("a/empty.txt", 0))
    assert (info.truncated, info.encrypted, info.error) == (False, False, None)


def test_a_compressed_tar_is_recognised_by_content_whatever_its_name(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "holiday.jpg", "tar.xz", {"top.v": b"x"})
    assert archive_kind(str(path)) == "tar.xz"
    info = inspect_archive(str(path))
    assert info is not None and info.members == (("top.v", 1),)


def test_a_gzip_of_one_file_is_not_an_archive(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "notes.txt.gz"
    path.write_bytes(gzip.compress(b"just some notes\n" * 100))
    assert archive_kind(str(path)) is None
    assert inspect_archive(str(path)) is None


def test_a_zip_after_a_self_extractor_stub_is_still_listed(tmp_path: Path) -> None:
    inner = make_zip(tmp_path / "inner.zip", {"a.txt": b"abc"})
    path = tmp_path / "setup.zip"
    path.write_bytes(b"MZ" + b"\x00" * 4094 + inner.read_bytes())
    info = inspect_archive(str(path))
    assert info is not None and info.members == (("a.txt", 3),) and info.error is None


def test_a_zip64_archive_is_counted_through_its_zip64_end_record(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:  # over 65,535 entries: zipfile writes zip64 records
        for i in range(70_000):
            zf.writestr(str(i), b"")
    assert b"PK\x06\x06" in path.read_bytes()[-200:]
    info = inspect_archive(str(path), max_members=10, max_seconds=60)
    assert info is not None
    assert (info.total_members, len(info.members), info.error) == (70_000, 10, None)


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs the zip CLI")
def test_utf8_names_from_the_zip_cli_read_as_utf8_not_cp437(tmp_path: Path) -> None:
    (tmp_path / "überblick.txt").write_text("x")
    run("zip", "-q", "out.zip", "überblick.txt", cwd=tmp_path)
    info = inspect_archive(str(tmp_path / "out.zip"))
    assert info is not None and info.members == (("überblick.txt", 1),)


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs the zip CLI")
def test_a_password_protected_zip_made_by_zip_cli_is_encrypted(tmp_path: Path) -> None:
    (tmp_path / "top.v").write_text("module top; endmodule\n")
    run("zip", "-q", "-e", "-P", "secret", "out.zip", "top.v", cwd=tmp_path)
    info = inspect_archive(str(tmp_path / "out.zip"))
    assert info is not None
    assert info.encrypted is True
    assert info.members == (("top.v", 22),)  # zip encrypts contents, not the directory


def make_7z(tmp_path: Path, *options: str) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "top.v").write_text("module top; endmodule\n")
    (src / "sub").mkdir(exist_ok=True)
    (src / "sub" / "notes.txt").write_text("notes\n")
    run("7z", "a", "-bd", *options, "../out.7z", ".", cwd=src)
    return tmp_path / "out.7z"


@needs_7z
@needs_py7zr
def test_a_7z_made_by_7z_cli_is_listed_with_py7zr(tmp_path: Path) -> None:
    info = inspect_archive(str(make_7z(tmp_path)))
    assert info is not None
    assert info.kind == "7z"
    assert sorted(info.members) == [("sub/notes.txt", 6), ("top.v", 22)]
    assert (info.encrypted, info.error) == (False, None)


@needs_7z
def test_a_7z_made_by_7z_cli_is_listed_by_the_7z_program_without_py7zr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "py7zr", None)  # makes `import py7zr` fail
    info = inspect_archive(str(make_7z(tmp_path)))
    assert info is not None
    assert sorted(info.members) == [("sub/notes.txt", 6), ("top.v", 22)]
    assert (info.kind, info.encrypted, info.error, info.cut_short) == ("7z", False, None, False)


@needs_7z
def test_without_the_7z_program_nor_py7zr_a_7z_is_recognised_and_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_7z(tmp_path)
    monkeypatch.setitem(sys.modules, "py7zr", None)
    monkeypatch.setattr(archives, "seven_zip_program", lambda: None)
    info = inspect_archive(str(path))
    assert info is not None
    assert (info.kind, info.members) == ("7z", ())
    assert info.error == "7z listing needs the 7z program or py7zr"
    assert info.cut_short is True


@needs_7z
@pytest.mark.parametrize("has_py7zr", [True, False])
def test_a_7z_with_encrypted_headers_is_encrypted_with_or_without_py7zr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_py7zr: bool
) -> None:
    if not has_py7zr:
        monkeypatch.setitem(sys.modules, "py7zr", None)
    info = inspect_archive(str(make_7z(tmp_path, "-psecret", "-mhe=on")))
    assert info is not None
    assert (info.kind, info.members, info.encrypted, info.error) == ("7z", (), True, None)


@needs_7z
@needs_py7zr
def test_a_7z_with_encrypted_contents_lists_names_and_is_encrypted(tmp_path: Path) -> None:
    info = inspect_archive(str(make_7z(tmp_path, "-psecret")))
    assert info is not None
    assert info.encrypted is True
    assert sorted(info.members) == [("sub/notes.txt", 6), ("top.v", 22)]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_max_members_truncates_the_list_but_counting_goes_on(tmp_path: Path, kind: str) -> None:
    files = {f"d/{i:05}.txt": b"x" for i in range(20_000)}
    path = (
        make_zip(tmp_path / "many.zip", files)
        if kind == "zip"
        else make_tar(tmp_path / "many.tgz", kind, files)
    )
    info = inspect_archive(str(path), max_members=100, max_seconds=60)
    assert info is not None
    assert len(info.members) == 100 and info.members[0] == ("d/00000.txt", 1)
    assert info.total_members == 20_000
    assert info.truncated is True and info.error is None


@pytest.mark.parametrize("suffix", ["zip", "tgz"])
def test_the_time_limit_stops_counting_where_it_got(tmp_path: Path, suffix: str) -> None:
    files = {f"{i}.txt": b"x" for i in range(20_000)}
    path = (
        make_zip(tmp_path / "many.zip", files)
        if suffix == "zip"
        else make_tar(tmp_path / "many.tgz", "tar.gz", files)
    )
    info = inspect_archive(str(path), max_seconds=0.0)
    assert info is not None
    assert info.truncated is True
    assert info.total_members < 20_000
    assert info.total_members == len(info.members)


def test_a_compression_bomb_stops_at_max_read_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        big = tarfile.TarInfo("zeros.bin")
        big.size = 64 * 1024 * 1024
        tf.addfile(big, io.BytesIO(bytes(big.size)))
        add_file(tf, "after.txt", b"never reached")
    assert path.stat().st_size < 1024 * 1024
    info = inspect_archive(str(path), max_read_bytes=4 * 1024 * 1024)
    assert info is not None
    assert info.members == (("zeros.bin", 64 * 1024 * 1024),)
    assert info.truncated is True


def test_a_plain_tar_is_listed_by_seeking_over_member_data(tmp_path: Path) -> None:
    path = tmp_path / "huge.tar"
    big = tarfile.TarInfo("huge.bin")
    big.size = 10 * 1024**3  # a sparse file: the 10 GiB are never written nor read
    small = tarfile.TarInfo("after.txt")
    small.size = 3
    with open(path, "wb") as f:
        header = big.tobuf()  # a pax header then a ustar one: the size needs more than 11 digits
        f.write(header)
        f.seek(len(header) + big.size)
        f.write(small.tobuf() + b"abc".ljust(512, b"\0") + bytes(1024))
    started = time.monotonic()
    info = inspect_archive(str(path), max_read_bytes=64 * 1024)
    assert time.monotonic() - started < 1.0
    assert info is not None
    assert info.members == (("huge.bin", big.size), ("after.txt", 3))
    assert (info.truncated, info.error) == (False, None)


def test_a_tar_header_claiming_a_huge_long_name_is_refused_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "longname.tar"
    header = tarfile.TarInfo("././@LongLink")
    header.type = tarfile.GNUTYPE_LONGNAME
    header.size = 2 * 1024**3
    path.write_bytes(header.tobuf(tarfile.GNU_FORMAT) + bytes(4096))
    info = inspect_archive(str(path))
    assert info is not None
    assert info.error == "too large" and info.members == ()


@pytest.mark.timeout(20)
def test_a_pax_header_of_digits_cannot_stall_the_parser(tmp_path: Path) -> None:
    # Python < 3.11.10 scans pax headers with a regex quadratic in digit runs (CVE-2024-6232).
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 200_000
    body = b"1" * pax.size
    padding = bytes(-len(body) % 512)
    path = tmp_path / "redos.tar"
    path.write_bytes(pax.tobuf(tarfile.USTAR_FORMAT) + body + padding + bytes(1024))
    started = time.monotonic()
    info = inspect_archive(str(path))
    assert time.monotonic() - started < 1.0
    assert info is not None and info.error == "corrupt"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("x.zip", b"this is not a zip at all\n" * 10),
        ("x.zip", b"PK\x03\x04" + bytes(100)),
        ("x.tar.gz", b"\x1f\x8b\x08\x00" + b"garbage" * 50),
        ("x.tar", b"\x01" * 700),
        ("x.7z", b"7z\xbc\xaf\x27\x1c" + bytes(26)),
    ],
)
def test_a_corrupt_file_with_an_archive_name_is_reported_not_raised(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    info = inspect_archive(str(path))
    assert info is not None
    assert info.error == "corrupt"
    assert info.members == ()


def test_a_truncated_zip_and_tar_gz_are_corrupt(tmp_path: Path) -> None:
    files = {f"{i}.bin": os.urandom(2000) for i in range(20)}
    for path in (
        make_zip(tmp_path / "t.zip", files),
        make_tar(tmp_path / "t.tgz", "tar.gz", files),
    ):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        info = inspect_archive(str(path))
        assert info is not None and info.error == "corrupt"


def test_a_symlink_named_like_an_archive_is_not_followed(tmp_path: Path) -> None:
    target = make_zip(tmp_path / "real.zip", {"secret.v": b"x"})
    link = tmp_path / "x.zip"
    link.symlink_to(target)
    info = inspect_archive(str(link))
    assert info is not None
    assert (info.kind, info.members, info.error) == ("zip", (), "not a regular file")
    assert archive_kind(str(link)) == "zip"  # by name: the content is never read


@pytest.mark.timeout(10)
def test_a_fifo_named_like_a_tar_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "x.tar"
    os.mkfifo(fifo)
    info = inspect_archive(str(fifo))
    assert info is not None
    assert (info.kind, info.error) == ("tar", "not a regular file")


def test_a_missing_file_and_a_non_archive_give_none_or_say_why(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    assert inspect_archive(str(tmp_path / "notes.txt")) is None
    assert inspect_archive(str(tmp_path / "gone.txt")) is None
    gone = inspect_archive(str(tmp_path / "gone.zip"))
    assert gone is not None and gone.error == "missing"


def test_archive_extensions_cover_the_common_archive_names() -> None:
    assert {"zip", "jar", "7z", "tar", "tgz", "tar.gz", "tbz2", "tar.bz2", "txz", "tar.xz"} <= (
        ARCHIVE_EXTENSIONS
    )
    assert archive_kind("/x/a.TAR.GZ", b"") == "tar.gz"
    assert archive_kind("/x/a.jar", b"") == "zip"
    assert archive_kind("/x/a.gz", b"") is None


@settings(max_examples=300, deadline=None, suppress_health_check=[FIXTURE_REUSED])
@given(
    data=st.binary(max_size=4096),
    name=st.sampled_from(["x.zip", "x.tar", "x.tgz", "x.tar.bz2", "x.txz", "x.7z", "x.bin"]),
)
def test_inspect_archive_never_raises_on_arbitrary_bytes(
    tmp_path: Path, data: bytes, name: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    info = inspect_archive(str(path), max_seconds=1.0)
    assert info is None or isinstance(info.members, tuple)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("seeds")
    files = {f"d/{i}.txt": bytes([i]) * (i * 37) for i in range(12)}
    return {
        "x.zip": make_zip(base / "s.zip", files).read_bytes(),
        "x.tgz": make_tar(base / "s.tgz", "tar.gz", files).read_bytes(),
        "x.tar": make_tar(base / "s.tar", "tar", files).read_bytes(),
        "x.txz": make_tar(base / "s.txz", "tar.xz", files).read_bytes(),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[FIXTURE_REUSED])
@given(
    name=st.sampled_from(["x.zip", "x.tgz", "x.tar", "x.txz"]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 1 << 20),
)
def test_inspect_archive_never_raises_on_damaged_real_archives(
    tmp_path: Path, seeds: dict[str, bytes], name: str, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seeds[name])
    for where, value in edits:
        data[where % len(data)] = value
    path = tmp_path / name
    path.write_bytes(bytes(data[: max(1, len(data) - cut % len(data))]))
    info = inspect_archive(str(path), max_seconds=1.0)
    assert info is None or info.total_members >= len(info.members)


# --- members found by content: lineage's digest computed from inside the archive ----------

GIB = 1024**3
needs_zstd_tar = pytest.mark.skipif(
    shutil.which("zstd") is None or shutil.which("tar") is None,
    reason="needs GNU tar and the zstd CLI",
)


class Recorder:
    """An `on_member` check as lineage makes it: asks the digest of members of wanted sizes."""

    def __init__(self, sizes: set[int] | None = None) -> None:
        self.sizes = sizes
        self.seen: list[tuple[str, int]] = []
        self.digests: dict[str, bytes | None] = {}

    def __call__(self, name: str, size: int, digest: MemberDigest) -> None:
        self.seen.append((name, size))
        if self.sizes is None or size in self.sizes:
            self.digests[name] = digest()


def sources(tmp_path: Path) -> dict[str, bytes]:
    """Random contents of awkward sizes: a tar block exactly, windows that overlap when
    sampled with a small hash_max_bytes, a size not a multiple of any block."""
    sizes = (1, 512, 1000, 100_000, 300_000, 1024 * 1024 + 3)
    out = {}
    for size in sizes:
        data = os.urandom(size)
        (tmp_path / f"orig-{size}.dat").write_bytes(data)
        out[f"renamed/{size}.bin"] = data
    return out


def expected(tmp_path: Path, files: dict[str, bytes], hash_max: int) -> dict[str, bytes | None]:
    return {
        name: content_digest(str(tmp_path / f"orig-{len(data)}.dat"), len(data), hash_max)
        for name, data in files.items()
    }


def build(tmp_path: Path, kind: str, files: dict[str, bytes]) -> Path:
    if kind.startswith("zip"):
        method = {
            "zip": zipfile.ZIP_DEFLATED,
            "zip-stored": zipfile.ZIP_STORED,
            "zip-bzip2": zipfile.ZIP_BZIP2,
            "zip-lzma": zipfile.ZIP_LZMA,
        }[kind]
        path = tmp_path / "out.zip"
        with zipfile.ZipFile(path, "w", method) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return path
    if kind == "tar.zst":
        plain = make_tar(tmp_path / "plain.tar", "tar", files)
        path = tmp_path / "out.tar.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
        return path
    return make_tar(tmp_path / f"out.{kind}", kind, files)


@pytest.mark.parametrize("hash_max", [16 * 1024 * 1024, 100_000, 1_000])
@pytest.mark.parametrize(
    "kind",
    ["zip", "zip-stored", "zip-bzip2", "zip-lzma", "tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst"],
)
def test_a_member_digest_is_the_lineage_digest_of_the_same_content_whatever_its_name(
    tmp_path: Path, kind: str, hash_max: int
) -> None:
    files = sources(tmp_path)
    check = Recorder()
    limits = HashLimits(hash_max_bytes=hash_max, max_bytes=1024**3)
    info = inspect_archive(
        str(build(tmp_path, kind, files)), max_seconds=60, on_member=check, hashing=limits
    )
    assert info is not None and info.error is None
    assert check.digests == expected(tmp_path, files, hash_max)
    assert (info.hashed, info.unchecked, info.cut_short) == (len(files), 0, False)


def test_every_member_is_offered_even_past_max_members(tmp_path: Path) -> None:
    files = {f"{i}.txt": b"x" * i for i in range(1, 51)}
    check = Recorder(sizes={50})
    path = make_zip(tmp_path / "m.zip", files)
    info = inspect_archive(str(path), max_members=10, on_member=check)
    assert info is not None
    assert len(info.members) == 10 and info.truncated is True and info.stopped is False
    assert len(check.seen) == 50
    assert check.digests["50.txt"] is not None
    assert info.cut_short is False  # every member was seen and the wanted one hashed


def test_the_hashing_budget_leaves_members_past_it_unchecked(tmp_path: Path) -> None:
    files = {f"{i}.bin": os.urandom(10_000) for i in range(5)}
    path = make_zip(tmp_path / "five.zip", files)
    by_members = Recorder()
    info = inspect_archive(str(path), on_member=by_members, hashing=HashLimits(max_members=2))
    assert info is not None
    assert (info.hashed, info.unchecked, info.cut_short) == (2, 3, True)
    assert sum(d is None for d in by_members.digests.values()) == 3
    by_bytes = Recorder()
    info = inspect_archive(str(path), on_member=by_bytes, hashing=HashLimits(max_bytes=25_000))
    assert info is not None
    assert (info.hashed, info.unchecked, info.hashed_bytes) == (2, 3, 20_000)


def test_a_member_nobody_asks_about_is_never_read(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "t.tgz", "tar.gz", {"a.bin": os.urandom(5000)})
    info = inspect_archive(str(path), on_member=Recorder(sizes=set()))
    assert info is not None
    assert (info.hashed, info.unchecked, info.cut_short) == (0, 0, False)


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs the zip CLI")
def test_an_encrypted_zip_member_of_a_wanted_size_is_unchecked(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(os.urandom(4000))
    run("zip", "-q", "-e", "-P", "secret", "out.zip", "notes.txt", cwd=tmp_path)
    check = Recorder()
    info = inspect_archive(str(tmp_path / "out.zip"), on_member=check)
    assert info is not None
    assert check.digests == {"notes.txt": None}
    assert (info.encrypted, info.unchecked, info.cut_short) == (True, 1, True)


@needs_7z
@pytest.mark.parametrize("method", ["Deflate64", "PPMd"])
def test_a_zip_member_in_a_method_not_read_here_is_unchecked(tmp_path: Path, method: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_bytes(b"notes " * 5000)
    run("7z", "a", "-bd", "-tzip", f"-mm={method}", "../out.zip", "notes.txt", cwd=tmp_path / "src")
    check = Recorder()
    info = inspect_archive(str(tmp_path / "out.zip"), on_member=check)
    assert info is not None and info.members == (("notes.txt", 30_000),)
    assert check.digests == {"notes.txt": None}
    assert info.cut_short is True


def test_a_zip_member_declared_larger_than_its_data_is_unchecked(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "liar.zip", {"a.bin": os.urandom(3000)})
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 24, 4000)  # uncompressed size in the directory
    path.write_bytes(bytes(data))
    check = Recorder()
    info = inspect_archive(str(path), on_member=check)
    assert info is not None and info.members == (("a.bin", 4000),)
    assert check.digests == {"a.bin": None} and info.unchecked == 1


def overlapping_zip(path: Path, copies: int, size: int) -> Path:
    """One deflated member of `size` zero bytes named by `copies` directory entries: a bomb
    that costs nothing to store and `copies` times `size` to decompress."""
    make_zip(path, {"0": bytes(size)})
    data = path.read_bytes()
    central = data.rfind(b"PK\x01\x02")
    end = data.rfind(b"PK\x05\x06")
    entry = data[central:end]
    name_at = 46
    entries = b"".join(
        entry[:28] + struct.pack("<H", len(str(i))) + entry[30:name_at] + str(i).encode()
        for i in range(copies)
    )
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, copies, copies, len(entries), central, 0)
    path.write_bytes(data[:central] + entries + eocd)
    return path


@pytest.mark.timeout(30)
def test_a_zip_bomb_of_overlapping_members_is_decompressed_only_within_the_budget(
    tmp_path: Path,
) -> None:
    path = overlapping_zip(tmp_path / "bomb.zip", copies=2000, size=10 * 1024 * 1024)
    assert path.stat().st_size < 200_000
    check = Recorder()
    started = time.monotonic()
    info = inspect_archive(str(path), on_member=check, max_seconds=2.0)
    assert time.monotonic() - started < 3.0
    assert info is not None and info.total_members == 2000
    assert info.hashed == 6  # 64 MiB of hashing budget: six members of 10 MiB
    assert info.unchecked == 1994 and info.cut_short is True


def test_a_zip_member_too_large_for_the_budget_is_not_decompressed(tmp_path: Path) -> None:
    path = tmp_path / "big.zip"
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
        zf.open("zeros.bin", "w") as member,
    ):
        chunk = bytes(1024 * 1024)
        for _ in range(256):
            member.write(chunk)
    started = time.monotonic()
    info = inspect_archive(str(path), on_member=Recorder())
    assert time.monotonic() - started < 0.5
    assert info is not None and (info.hashed, info.unchecked) == (0, 1)


def test_a_zip_with_a_huge_first_member_lists_the_rest_from_its_directory(
    tmp_path: Path,
) -> None:
    # The central directory is at the end: a padding member in front costs nothing to list.
    path = tmp_path / "padded.zip"
    tagged = os.urandom(3000)
    with open(path, "wb") as f, zipfile.ZipFile(SparseWriter(f), "w") as zf:
        with zf.open("padding.bin", "w", force_zip64=True) as member:
            zeros = bytes(1024 * 1024)
            for _ in range(1024):
                member.write(zeros)
        zf.writestr("holiday.jpg", tagged)
    assert path.stat().st_size > GIB
    assert path.stat().st_blocks * 512 < 10 * 1024 * 1024  # sparse on disk
    check = Recorder(sizes={3000})
    started = time.monotonic()
    result = inspect_archive(str(path), on_member=check)
    assert time.monotonic() - started < 0.5
    assert result is not None and result.error is None
    assert result.members == (("padding.bin", GIB), ("holiday.jpg", 3000))
    (tmp_path / "orig").write_bytes(tagged)
    assert check.digests["holiday.jpg"] == content_digest(str(tmp_path / "orig"), 3000, 16 << 20)


class SparseWriter(io.RawIOBase):
    """A file that zipfile writes through, whose runs of zeros become holes (no disk)."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self._file = file

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        data = bytes(data)
        if len(data) >= 4096 and not data.strip(b"\0"):
            self._file.seek(len(data), io.SEEK_CUR)
        else:
            self._file.write(data)
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(pos, whence)

    def tell(self) -> int:
        return self._file.tell()


def sparse_padded_tar(path: Path, padding: int, files: dict[str, bytes]) -> Path:
    """A plain tar whose first member is `padding` zero bytes, written as a hole."""
    pad = tarfile.TarInfo("padding.bin")
    pad.size = padding
    with open(path, "wb") as f:
        f.write(pad.tobuf(tarfile.GNU_FORMAT))
        f.seek(padding, io.SEEK_CUR)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    return path


def test_a_plain_tar_with_a_1gib_sparse_padding_member_hashes_the_members_after_it(
    tmp_path: Path,
) -> None:
    files = {"a/holiday.jpg": os.urandom(5000), "a/notes.txt": os.urandom(7000)}
    path = sparse_padded_tar(tmp_path / "padded.tar", GIB, files)
    if shutil.which("tar"):  # GNU tar reads the same members
        listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, check=True)
        assert listed.stdout.split() == [b"padding.bin", b"a/holiday.jpg", b"a/notes.txt"]
    check = Recorder(sizes={5000, 7000})
    started = time.thread_time()  # the budget is the agent's CPU time: a loaded machine's
    info = inspect_archive(str(path), on_member=check, max_seconds=0.5)  # wall time varies
    assert time.thread_time() - started < 0.5
    assert info is not None and info.cut_short is False
    for name, data in files.items():
        (tmp_path / "orig").write_bytes(data)
        assert check.digests[name] == content_digest(str(tmp_path / "orig"), len(data), 16 << 20)


def gzip_padded_tar(path: Path, padding: int, files: dict[str, bytes]) -> Path:
    """A tar.gz whose first member is `padding` zero bytes: gzip members concatenated, as
    `cat a.gz b.gz` makes them (gzip and tar read them as one stream), so it is quick to make."""
    import gzip

    pad = tarfile.TarInfo("padding.bin")
    pad.size = padding
    mib = gzip.compress(bytes(1024 * 1024), compresslevel=9)
    rest = io.BytesIO()
    with tarfile.open(fileobj=rest, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in files.items():
            add_file(tf, name, data)
    with open(path, "wb") as f:
        f.write(gzip.compress(pad.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(padding // len(bytes(1024 * 1024))):
            f.write(mib)
        f.write(gzip.compress(rest.getvalue()))
    return path


def test_a_tar_gz_with_1gib_of_padding_is_cut_short_within_the_time_limit(tmp_path: Path) -> None:
    files = {"a/top.v": os.urandom(5000)}
    path = gzip_padded_tar(tmp_path / "padded.tar.gz", GIB, files)
    assert path.stat().st_size < 2 * 1024 * 1024
    started, cpu = time.monotonic(), time.thread_time()
    info = inspect_archive(str(path), on_member=Recorder(), max_seconds=0.5)
    # 0.5 s of the agent's CPU time (a loaded machine reads as far as an idle one), and never
    # more than the wall-clock cap for a read that stalls.
    assert time.thread_time() - cpu < 1.0
    assert time.monotonic() - started < WALL_MIN_SECONDS + 1.0
    assert info is not None
    assert info.members == (("padding.bin", GIB),)
    assert (info.stopped, info.truncated, info.cut_short, info.error) == (True, True, True, None)


def test_the_padded_tar_gz_is_a_real_one_listed_to_its_end_given_the_time(tmp_path: Path) -> None:
    files = {"a/top.v": os.urandom(5000)}
    path = gzip_padded_tar(tmp_path / "padded.tar.gz", 64 * 1024 * 1024, files)
    if shutil.which("tar"):
        listed = subprocess.run(["tar", "-tzf", str(path)], capture_output=True, check=True)
        assert listed.stdout.split() == [b"padding.bin", b"a/top.v"]
    info = inspect_archive(str(path), on_member=Recorder(sizes={5000}), max_seconds=30)
    assert info is not None and info.members[-1] == ("a/top.v", 5000)
    assert info.cut_short is False


def test_members_after_an_end_of_archive_marker_are_listed_as_gnu_tar_i_does(
    tmp_path: Path,
) -> None:
    first = make_tar(tmp_path / "a.tar", "tar", {"readme.txt": b"hello"})
    second = make_tar(tmp_path / "b.tar", "tar", {"top.v": b"module top; endmodule\n"})
    path = tmp_path / "both.tar"
    path.write_bytes(first.read_bytes() + bytes(64 * 1024) + second.read_bytes())
    if shutil.which("tar"):
        listed = subprocess.run(["tar", "-tif", str(path)], capture_output=True, check=True)
        assert listed.stdout.split() == [b"readme.txt", b"top.v"]
    info = inspect_archive(str(path))
    assert info is not None
    assert info.members == (("readme.txt", 5), ("top.v", 22))


@needs_zstd_tar
def test_a_tar_zst_made_by_tar_is_listed_and_its_members_hashed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(40_000)
    (src / "holiday.jpg").write_bytes(data)
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("notes\n")
    run("tar", "--zstd", "-cf", "../backup.bin", ".", cwd=src)  # no telling name
    path = tmp_path / "backup.bin"
    assert archive_kind(str(path)) == "tar.zst"
    check = Recorder(sizes={40_000})
    info = inspect_archive(str(path), on_member=check)
    assert info is not None and info.kind == "tar.zst" and info.error is None
    assert sorted(info.members) == [("./holiday.jpg", 40_000), ("./sub/notes.txt", 6)]
    digest = content_digest(str(src / "holiday.jpg"), 40_000, 1 << 24)
    assert check.digests["./holiday.jpg"] == digest


@needs_zstd_tar
def test_a_tar_zst_with_1gib_of_sparse_padding_is_listed_past_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "padding.bin", "wb") as f:
        f.truncate(GIB)  # a hole: no disk; tar reads zeros, zstd squeezes them to ~30 KB
    (src / "top.v").write_text("module top; endmodule\n")
    run("tar", "--zstd", "-cf", "../padded.tar.zst", "padding.bin", "top.v", cwd=src)
    started = time.monotonic()
    info = inspect_archive(str(tmp_path / "padded.tar.zst"), max_seconds=2.0)
    assert time.monotonic() - started < 2.0
    assert info is not None
    assert info.members == (("padding.bin", GIB), ("top.v", 22))
    assert info.cut_short is False


def test_a_zstd_frame_asking_for_a_1gib_window_is_refused_not_allocated(tmp_path: Path) -> None:
    plain = make_tar(tmp_path / "p.tar", "tar", {"top.v": b"x" * 1000})
    params = zstandard.ZstdCompressionParameters(window_log=30, write_content_size=False)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    path = tmp_path / "x.tar.zst"
    path.write_bytes(compressor.compress(plain.read_bytes()) + compressor.flush())
    assert zstandard.get_frame_parameters(path.read_bytes()).window_size == GIB
    info = inspect_archive(str(path))
    assert info is not None
    assert (info.kind, info.error, info.cut_short) == ("tar.zst", "too large", True)


def test_a_corrupt_tar_zst_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "x.tar.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 50)
    info = inspect_archive(str(path))
    assert info is not None and info.error == "corrupt"


# --- 7z through the 7z program: as whom it runs, and what its output may not do -----------


def tiny_7z(path: Path) -> Path:
    """A 7z whose start header is valid and whose header is one byte: enough to reach the
    program, which the tests below replace."""
    header = b"\x01"
    start = struct.pack("<QQI", 0, len(header), zlib.crc32(header))
    path.write_bytes(
        b"7z\xbc\xaf\x27\x1c\x00\x04" + struct.pack("<I", zlib.crc32(start)) + start + header
    )
    return path


@pytest.fixture
def fake_7z(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Replaces the 7z program by a script, in a directory anyone may enter (it runs as
    nobody when the tests run as root)."""
    where = Path(tempfile.mkdtemp(prefix="fake7z-"))
    where.chmod(0o755)

    def install(script: str) -> None:
        program = where / "7z"
        program.write_text("#!/bin/sh\n" + script)
        program.chmod(0o755)
        monkeypatch.setattr(archives, "seven_zip_program", lambda: str(program))

    yield install
    shutil.rmtree(where)


LISTING = "printf -- '----------\\nPath = %s\\nSize = 7\\nAttributes = A -rw-r--r--\\n\\n' "


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the program drops to nobody")
def test_the_7z_program_never_runs_as_root(
    tmp_path: Path, fake_7z: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "py7zr", None)
    fake_7z(LISTING + '"uid-$(id -u)-groups-$(id -G | tr " " ,)"\n')
    path = tiny_7z(tmp_path / "x.7z")
    path.chmod(0o644)
    info = inspect_archive(str(path))
    assert info is not None and info.error is None
    nobody = pwd.getpwnam("nobody")
    assert info.members == ((f"uid-{nobody.pw_uid}-groups-{nobody.pw_gid}", 7),)
    os.chown(path, 4242, 4242)
    path.chmod(0o600)  # only its owner may read it: read as the owner
    info = inspect_archive(str(path))
    assert info is not None and info.members[0][0].startswith("uid-4242-")
    os.chown(path, 0, 0)  # only root may read it: not handed to the program
    info = inspect_archive(str(path))
    assert info is not None
    assert (info.error, info.cut_short) == ("not listed: readable by root only", True)


def test_the_7z_program_reads_the_file_checked_not_the_path(
    tmp_path: Path, fake_7z: Callable[[str], None]
) -> None:
    # Its argument is the descriptor the agent opened (O_NOFOLLOW, a regular file): a path
    # swapped for a symlink or a FIFO meanwhile is never what it reads.
    fake_7z(LISTING + '"$6:$(head -c 2 "$6")"\n')
    info = inspect_archive(str(tiny_7z(tmp_path / "x.7z")))
    assert info is not None and len(info.members) == 1
    assert re.fullmatch(r"/dev/fd/[0-9]+:7z", info.members[0][0])


@pytest.mark.timeout(20)
def test_a_7z_program_that_hangs_is_killed_at_the_deadline(
    tmp_path: Path, fake_7z: Callable[[str], None]
) -> None:
    fake_7z(LISTING + "first\nexec sleep 60\n")
    started = time.monotonic()
    info = inspect_archive(str(tiny_7z(tmp_path / "x.7z")), max_seconds=0.5)
    # Killed at its 0.5 s wall-clock deadline (another process: its time is not ours to
    # count), not after its 60 s sleep; the margin is for starting a shell on a loaded machine.
    assert time.monotonic() - started < 5.0
    assert info is not None
    assert info.members == (("first", 7),)
    assert (info.stopped, info.cut_short) == (True, True)


@pytest.mark.timeout(20)
def test_a_7z_program_that_floods_its_output_is_stopped_by_the_read_budget(
    tmp_path: Path, fake_7z: Callable[[str], None]
) -> None:
    fake_7z("echo ----------; exec yes 'Path = x'\n")
    started = time.monotonic()
    info = inspect_archive(str(tiny_7z(tmp_path / "x.7z")), max_read_bytes=1024 * 1024)
    assert time.monotonic() - started < 5.0  # `yes` would run for ever
    assert info is not None and (info.stopped, info.cut_short) == (True, True)


@pytest.mark.parametrize(
    "output",
    [
        "----------\\nPath = a\\nSize = 7\\nSize = 99\\n\\n",  # a name with a newline, printed raw
        "----------\\nPath = a\\nb\\nSize = 7\\n\\n",
        "----------\\nSize = 7\\nPath = a\\n\\n",
        "----------\\nPath = a\\nSize = lots\\n\\n",
    ],
)
def test_a_7z_listing_of_an_unexpected_shape_is_corrupt_not_misread(
    tmp_path: Path, fake_7z: Callable[[str], None], output: str
) -> None:
    fake_7z(f"printf -- '{output}'\n")
    info = inspect_archive(str(tiny_7z(tmp_path / "x.7z")))
    assert info is not None
    assert (info.error, info.cut_short) == ("corrupt", True)


def test_a_7z_line_longer_than_any_listing_line_is_corrupt(
    tmp_path: Path, fake_7z: Callable[[str], None]
) -> None:
    fake_7z("echo ----------; head -c 200000 /dev/zero | tr '\\0' a\n")
    info = inspect_archive(str(tiny_7z(tmp_path / "x.7z")))
    assert info is not None and info.error == "corrupt"


@needs_7z
def test_7z_members_are_listed_not_hashed_so_a_wanted_one_is_unchecked(tmp_path: Path) -> None:
    check = Recorder(sizes={22})
    info = inspect_archive(str(make_7z(tmp_path)), on_member=check)
    assert info is not None
    assert check.digests == {"top.v": None}
    assert (info.unchecked, info.cut_short) == (1, True)


@needs_7z
def test_7z_directories_links_and_empty_files_are_not_members(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("abc")
    (src / "empty").write_text("")
    (src / "link").symlink_to("/etc/passwd")
    run("7z", "a", "-bd", "-snl", "../out.7z", ".", cwd=src)
    info = inspect_archive(str(tmp_path / "out.7z"))
    assert info is not None
    assert sorted(info.members) == [("d/f.txt", 3), ("empty", 0)]


@pytest.mark.parametrize(
    ("fields", "cut_short"),
    [
        ({}, False),
        ({"truncated": True}, False),  # max_members only: every member was still seen
        ({"stopped": True, "truncated": True}, True),
        ({"unchecked": 1}, True),
        ({"encrypted": True}, True),  # nothing listed: the member list is encrypted
        ({"encrypted": True, "total_members": 1}, False),
        ({"error": "corrupt"}, True),
        ({"error": "unsupported: rar"}, True),
        ({"error": "missing"}, False),
        ({"error": "not a regular file"}, False),
    ],
)
def test_cut_short_means_part_of_the_content_is_unknown(
    fields: dict[str, object], cut_short: bool
) -> None:
    base: dict[str, object] = {
        "kind": "zip",
        "members": (),
        "total_members": 0,
        "truncated": False,
        "encrypted": False,
        "error": None,
    }
    info = ArchiveInfo(**{**base, **fields})  # type: ignore[arg-type]
    assert info.cut_short is cut_short


@pytest.mark.parametrize("kind", ["tar.bz2", "tar.zst"])
def test_a_compressed_tar_whose_first_block_is_longer_than_the_head_is_found_by_content(
    tmp_path: Path, kind: str
) -> None:
    # bzip2 and zstd decode whole blocks: incompressible data first makes the first block
    # longer than the head read to sniff types, and the name says nothing.
    files = {"holiday.jpg": os.urandom(200_000), "top.v": b"module top; endmodule\n"}
    built = build(tmp_path, kind, files)
    path = built.rename(tmp_path / "backup.bin")
    assert archive_kind(str(path)) == kind
    info = inspect_archive(str(path))
    assert info is not None and info.members == (("holiday.jpg", 200_000), ("top.v", 22))


@pytest.fixture(scope="module")
def hashed_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("hashed-seeds")
    files = {f"d/{i}.bin": os.urandom(i * 997) for i in range(1, 9)}
    out = {}
    for name, kind in (
        ("x.zip", "zip"),
        ("y.zip", "zip-bzip2"),
        ("z.zip", "zip-lzma"),
        ("x.tgz", "tar.gz"),
        ("x.tar", "tar"),
        ("x.tar.zst", "tar.zst"),
    ):
        where = base / name.replace(".", "-")
        where.mkdir()
        out[name] = build(where, kind, files).read_bytes()
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[FIXTURE_REUSED])
@given(
    name=st.sampled_from(["x.zip", "y.zip", "z.zip", "x.tgz", "x.tar", "x.tar.zst"]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 1 << 20),
)
def test_hashing_members_of_damaged_archives_never_raises(
    tmp_path: Path,
    hashed_seeds: dict[str, bytes],
    name: str,
    edits: list[tuple[int, int]],
    cut: int,
) -> None:
    data = bytearray(hashed_seeds[name])
    for where, value in edits:
        data[where % len(data)] = value
    path = tmp_path / name
    path.write_bytes(bytes(data[: max(1, len(data) - cut % len(data))]))
    check = Recorder()
    info = inspect_archive(str(path), max_seconds=1.0, on_member=check)
    assert info is None or info.hashed + info.unchecked <= len(check.digests)


def test_garbage_after_a_tar_gz_stream_is_ignored_as_gzip_and_tar_ignore_it(
    tmp_path: Path,
) -> None:
    path = make_tar(tmp_path / "t.tgz", "tar.gz", {"top.v": b"module top; endmodule\n"})
    path.write_bytes(path.read_bytes() + b"trailing garbage, not gzip" * 10)
    info = inspect_archive(str(path))
    assert info is not None
    assert (info.members, info.error, info.cut_short) == ((("top.v", 22),), None, False)
