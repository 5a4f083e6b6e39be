"""Archives made to hide tagged content: padding, renamed members, 7z, zstd, encryption, bombs.

Each test lands an archive made with the real tools in a staging directory watched by a
running agent with the shipped rules, and checks the event (`exfilwatch.archive.*`) and the
alert a security team would get.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.service import Agent
from tests.conftest import Collector
from tests.enrich.test_archives import gzip_padded_tar, overlapping_zip, sparse_padded_tar
from tests.enrich.test_destinations import World

GIB = 1024**3
needs_7z = pytest.mark.skipif(shutil.which("7z") is None, reason="needs the 7z CLI (p7zip-full)")
needs_zip = pytest.mark.skipif(shutil.which("zip") is None, reason="needs the zip CLI")
needs_zstd_tar = pytest.mark.skipif(
    shutil.which("zstd") is None or shutil.which("tar") is None,
    reason="needs GNU tar and the zstd CLI",
)


@pytest.fixture
def world(tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector) -> Iterator[World]:
    yield World(tmp_path, run_agent, collector)


def tagged(world: World, *numbers: int) -> dict[str, bytes]:
    """Contents of tagged files, under names that say nothing of where they came from."""
    return {f"misc/notes-{i}.txt": (world.rnd / "chip" / f"m{i}.v").read_bytes() for i in numbers}


def workdir(world: World, files: dict[str, bytes]) -> Path:
    """The files written out in a directory the agent does not watch (where tools run)."""
    work = world.tmp / "work"
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    return work


def run(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=120)


def land(world: World, built: Path, name: str) -> Path:
    """Copies an archive made elsewhere into the staging directory, as a download would."""
    target = world.stage / name
    subprocess.run(["cp", "--sparse=always", str(built), str(target)], check=True)
    return target


def archive_event(world: World, path: Path, timeout: float = 10.0, **fields: object) -> None:
    world.collector.wait_event("closed_write", path, timeout=timeout, **fields)


def alerts_on(world: World, rule: str, path: Path) -> list[dict[str, Any]]:
    return [
        a
        for a in world.collector.records()
        if a["event"]["kind"] == "alert"
        and a["rule"]["id"] == rule
        and a["file"]["path"] == str(path)
    ]


def alerted(world: World, rule: str, path: Path) -> bool:
    return world.collector.wait_for(lambda c: bool(alerts_on(world, rule, path)), timeout=5)


def test_a_tar_with_1gib_of_sparse_padding_before_renamed_tagged_members_counts_them(
    world: World,
) -> None:
    target = sparse_padded_tar(world.stage / "backup.tar", GIB, tagged(world, 1, 2, 3, 4, 5))
    archive_event(world, target, archive_tagged=5, archive_truncated=None)
    assert alerted(world, "exfil-archive-of-tagged", target)


def test_a_tar_gz_with_1gib_of_padding_is_truncated_and_after_tagged_reads_alerts_high(
    world: World,
) -> None:
    for i in range(3):  # the collection step: tagged files read by the same user
        (world.rnd / "chip" / f"m{i}.v").read_bytes()
    built = gzip_padded_tar(world.tmp / "padded.tar.gz", GIB, tagged(world, 1, 2, 3))
    started = time.monotonic()
    target = land(world, built, "padded.tar.gz")
    archive_event(world, target, archive_tagged=0, archive_truncated=True)
    assert time.monotonic() - started < 5.0
    assert alerted(world, "exfil-archive-unchecked", target)
    assert alerted(world, "exfil-read-then-unchecked-archive", target)
    assert not world.alerts("exfil-archive-of-tagged")


@needs_zstd_tar
def test_a_tar_zst_of_renamed_tagged_files_counts_them(world: World) -> None:
    work = workdir(world, tagged(world, 6, 7, 8))
    run("tar", "--zstd", "-cf", "../out.tzst", "misc", cwd=work)
    target = land(world, world.tmp / "out.tzst", "photos.bin")  # no telling name either
    archive_event(world, target, archive_tagged=3, archive_truncated=None)
    assert alerted(world, "exfil-archive-of-tagged", target)


@needs_zstd_tar
def test_a_tar_zst_with_1gib_of_sparse_padding_is_read_past_it(world: World) -> None:
    work = workdir(world, tagged(world, 9))
    with open(work / "misc" / "aaa-padding.bin", "wb") as f:
        f.truncate(GIB)
    run("tar", "--zstd", "-cf", "../padded.tar.zst", "misc/aaa-padding.bin", "misc", cwd=work)
    target = land(world, world.tmp / "padded.tar.zst", "padded.tar.zst")
    archive_event(world, target, archive_tagged=1)
    assert alerted(world, "exfil-archive-of-tagged", target)


@needs_7z
def test_a_7z_of_tagged_files_counts_them_by_name_and_size(world: World) -> None:
    run("7z", "a", "-bd", str(world.tmp / "out.7z"), "chip/m1*.v", cwd=world.rnd)
    target = land(world, world.tmp / "out.7z", "out.7z")
    archive_event(world, target, archive_tagged=11, archive_truncated=None)  # m1, m10-m19
    assert alerted(world, "exfil-archive-of-tagged", target)


@needs_7z
def test_a_7z_of_renamed_tagged_files_is_truncated_not_passed_as_clean(world: World) -> None:
    # 7z members are listed, not hashed: one the size of a tagged file is left unchecked.
    work = workdir(world, tagged(world, 11, 12))
    run("7z", "a", "-bd", "../renamed.7z", "misc", cwd=work)
    target = land(world, world.tmp / "renamed.7z", "renamed.7z")
    archive_event(world, target, archive_tagged=0, archive_truncated=True)
    assert alerted(world, "exfil-archive-unchecked", target)
    # Making it read the tagged files: the reads then the unchecked archive raise the high one.
    assert alerted(world, "exfil-read-then-unchecked-archive", target)


@needs_7z
def test_a_7z_with_encrypted_headers_is_truncated_and_encrypted(world: World) -> None:
    work = workdir(world, tagged(world, 13))
    run("7z", "a", "-bd", "-psecret", "-mhe=on", "../locked.7z", "misc", cwd=work)
    target = land(world, world.tmp / "locked.7z", "locked.7z")
    archive_event(world, target, archive_truncated=True, disguise=("encrypted",))
    assert alerted(world, "exfil-archive-unchecked", target)


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
def test_a_zip_of_renamed_tagged_members_counts_them_by_content(world: World, method: int) -> None:
    built = world.tmp / "out.zip"
    with zipfile.ZipFile(built, "w", method) as zf:
        for name, data in tagged(world, 14, 15, 16, 17).items():
            zf.writestr(name, data)
        zf.writestr("misc/readme.txt", "not tagged")
    target = land(world, built, "holiday-photos.zip")
    archive_event(world, target, archive_tagged=4, archive_truncated=None)
    assert alerted(world, "exfil-archive-of-tagged", target)


@needs_zip
def test_an_encrypted_zip_of_renamed_tagged_files_is_truncated(world: World) -> None:
    work = workdir(world, tagged(world, 18, 19))
    run("zip", "-q", "-r", "-e", "-P", "secret", "../locked.zip", "misc", cwd=work)
    target = land(world, world.tmp / "locked.zip", "locked.zip")
    archive_event(world, target, archive_tagged=0, archive_truncated=True)
    assert alerted(world, "exfil-archive-unchecked", target)
    assert alerted(world, "exfil-read-then-unchecked-archive", target)


def test_a_tar_hiding_tagged_members_after_its_end_marker_counts_them(world: World) -> None:
    decoy = io.BytesIO()
    with tarfile.open(fileobj=decoy, mode="w") as tf:
        info = tarfile.TarInfo("readme.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    hidden = io.BytesIO()
    with tarfile.open(fileobj=hidden, mode="w") as tf:
        for name, data in tagged(world, 20, 21).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    target = world.stage / "readme.tar"
    target.write_bytes(decoy.getvalue() + bytes(1024 * 1024) + hidden.getvalue())
    archive_event(world, target, archive_tagged=2)
    assert alerted(world, "exfil-archive-of-tagged", target)


@pytest.mark.timeout(60)
def test_a_zip_bomb_of_a_tagged_size_stays_bounded_and_the_agent_keeps_checking(
    world: World,
) -> None:
    # A tagged file of 10 MiB, and 2,000 directory entries naming one deflated 10 MiB member:
    # 20 GiB to decompress, all of a tagged size. Six are hashed (the 64 MiB budget), the
    # rest are left unchecked, and the agent goes on to check the next file.
    (world.rnd / "chip" / "weights.bin").write_bytes(bytes(10 * 1024 * 1024))
    world.collector.wait_event("closed_write", world.rnd / "chip" / "weights.bin")
    built = overlapping_zip(world.tmp / "bomb.zip", copies=2000, size=10 * 1024 * 1024)
    started = time.monotonic()
    target = land(world, built, "bomb.zip")
    archive_event(world, target, archive_truncated=True)
    assert time.monotonic() - started < 5.0
    event = next(e for e in world.collector.events() if e.path == str(target) and e.archive_tagged)
    assert event.archive_tagged == 6
    copy = world.stage / "after.txt"
    shutil.copy(world.rnd / "chip" / "m22.v", copy)
    world.collector.wait_event(
        "closed_write", copy, lineage_origin=str(world.rnd / "chip" / "m22.v")
    )


def test_an_untagged_archive_listed_to_its_end_raises_nothing(world: World) -> None:
    # The nearest benign case: a zip of ordinary files in staging.
    built = world.tmp / "photos.zip"
    with zipfile.ZipFile(built, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(20):
            zf.writestr(f"img{i}.jpg", os.urandom(2000 + i))
    target = land(world, built, "photos.zip")
    archive_event(world, target, archive_tagged=0, archive_truncated=None)
    time.sleep(0.5)
    assert not [a for a in world.collector.records() if a["event"]["kind"] == "alert"]


def test_a_large_download_cut_short_without_tagged_reads_raises_only_the_low_alert(
    world: World,
) -> None:
    # A big dataset landing in Downloads is cut short too: low, and no correlation without
    # tagged reads by the same user.
    built = gzip_padded_tar(world.tmp / "dataset.tar.gz", GIB, {"README": b"a dataset"})
    target = land(world, built, "dataset.tar.gz")
    archive_event(world, target, archive_truncated=True)
    assert alerted(world, "exfil-archive-unchecked", target)
    alert = alerts_on(world, "exfil-archive-unchecked", target)[0]
    assert alert["event"]["severity"] == 21
    time.sleep(0.5)
    assert not world.alerts("exfil-read-then-unchecked-archive")
