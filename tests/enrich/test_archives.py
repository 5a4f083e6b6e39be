"""Archive listing on real archives: formats, encryption, limits, and hostile files."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.enrich.archives import ARCHIVE_EXTENSIONS, archive_kind, inspect_archive

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
def test_without_py7zr_a_7z_is_recognised_and_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "py7zr", None)  # makes `import py7zr` fail
    info = inspect_archive(str(make_7z(tmp_path)))
    assert info is not None
    assert (info.kind, info.members, info.error) == ("7z", (), "7z listing needs py7zr")


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
