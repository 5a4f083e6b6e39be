"""Where tagged content goes: sync folders, staging, removable media, archives, disguise."""

from __future__ import annotations

import shutil
import subprocess
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import LocationSettings, SinkSpec, WatchSpec
from agent.service import Agent
from tests.conftest import Collector, make_config, needs_mount

REPO = Path(__file__).resolve().parents[2]


class World:
    """A tagged tree, a home with a Dropbox folder, a staging dir, and a running agent."""

    def __init__(self, tmp: Path, run_agent: Callable[..., Agent], collector: Collector) -> None:
        self.tmp = tmp
        self.collector = collector
        self.rnd = tmp / "rnd"
        (self.rnd / "chip").mkdir(parents=True)
        for i in range(30):
            (self.rnd / "chip" / f"m{i}.v").write_text(f"module m{i}; endmodule\n" * (20 + i))
        (self.rnd / "chip" / ".exfilwatch.yaml").write_text("tags: [crown-jewels]\n")
        self.home = tmp / "home" / "alice"
        self.dropbox = self.home / "Dropbox"
        self.dropbox.mkdir(parents=True)
        self.stage = tmp / "stage"
        self.stage.mkdir()
        config = make_config(
            [WatchSpec(str(self.rnd), ("rnd",), "high")],
            tmp,
            rules=(str(REPO / "rules"),),
            sinks=(SinkSpec("stdout", None, frozenset({"event", "health", "alert"})),),
            locations=LocationSettings(
                enabled=True, home_roots=(str(tmp / "home"),), staging_dirs=(str(self.stage),)
            ),
        )
        self.agent = run_agent(config, kinds=frozenset({"event", "health", "alert"}))
        assert collector.wait_for(lambda c: bool(c.health("lineage_index_built")))

    def alerts(self, rule: str) -> list[dict[str, object]]:
        return [
            r
            for r in self.collector.records()
            if r["event"]["kind"] == "alert" and r["rule"]["id"] == rule
        ]


@pytest.fixture
def world(tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector) -> Iterator[World]:
    yield World(tmp_path, run_agent, collector)


def test_a_renamed_copy_into_a_sync_folder_is_traced_and_alerts(world: World) -> None:
    target = world.dropbox / "notes-for-later.txt"
    shutil.copy(world.rnd / "chip" / "m3.v", target)
    world.collector.wait_event(
        "closed_write",
        target,
        location="cloud_sync",
        location_provider="dropbox",
        lineage_origin=str(world.rnd / "chip" / "m3.v"),
    )
    event = next(
        e for e in world.collector.events() if e.path == str(target) and e.action == "closed_write"
    )
    assert event.lineage_tags == ("rnd", "crown-jewels")
    assert event.tags == ()  # the sync folder is not a tagged tree
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-cloud-sync-tagged-copy")))


def test_a_hidden_directory_in_a_home_is_a_staging_area(world: World) -> None:
    stash = world.home / ".stash"
    stash.mkdir()
    world.collector.wait_event("created", stash, location="staging")
    target = stash / "a.v"
    shutil.copy(world.rnd / "chip" / "m4.v", target)
    world.collector.wait_event(
        "closed_write", target, location="staging", lineage_origin=str(world.rnd / "chip" / "m4.v")
    )
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-staging-tagged-copy")))


def test_a_file_moved_out_of_the_tagged_tree_is_its_own_origin(world: World) -> None:
    src = world.rnd / "chip" / "m5.v"
    dst = world.stage / "m5.bak"
    src.rename(dst)
    world.collector.wait_event(
        "moved",
        dst,
        location="staging",
        lineage_origin=str(src),
        src_path=str(src),
        disguise=("extension_changed",),
    )
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-rename-disguise")))


def test_an_archive_of_tagged_files_counts_its_tagged_members(world: World) -> None:
    archive = world.stage / "backup.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(12):
            zf.write(world.rnd / "chip" / f"m{i}.v", f"rnd/chip/m{i}.v")
        zf.writestr("README.txt", "not tagged")
    world.collector.wait_event("closed_write", archive, archive_tagged=12)
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-archive-of-tagged")))


def test_a_tagged_file_renamed_inside_the_tree_is_flagged(world: World) -> None:
    src = world.rnd / "chip" / "m6.v"
    dst = world.rnd / "chip" / "holiday.jpg"
    src.rename(dst)
    world.collector.wait_event("moved", dst, location="tagged", disguise=("extension_changed",))
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-rename-disguise")))


def test_encrypted_output_is_flagged_and_traced_by_name(world: World) -> None:
    out = world.stage / "m7.v.asc"
    out.write_text("-----BEGIN PGP MESSAGE-----\n\nhQEMA5v3\n-----END PGP MESSAGE-----\n")
    world.collector.wait_event(
        "closed_write",
        out,
        disguise=("encrypted",),
        lineage_origin=str(world.rnd / "chip" / "m7.v"),
    )
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-encoded-tagged")))


@needs_mount
def test_a_usb_stick_is_watched_when_mounted_and_a_bulk_copy_alerts(
    world: World, loop_mount: Callable[[Path], Path]
) -> None:
    label = f"exfil-{uuid.uuid4().hex[:8]}"
    stick = loop_mount(Path("/media") / label / "EXFILTEST")
    assert world.collector.wait_for(
        lambda c: any(
            r["exfilwatch"]["health"].get("mountpoint") == str(stick)
            for r in c.health("media_mounted")
        ),
        timeout=5,
    )
    mounted = next(
        r
        for r in world.collector.health("media_mounted")
        if r["exfilwatch"]["health"].get("mountpoint") == str(stick)
    )
    assert mounted["event"]["reason"] == "removable"
    assert mounted["exfilwatch"]["health"]["label"] == "EXFILTEST"
    # Watched at once: a copy right after the mount is seen.
    for i in range(25):
        shutil.copy(world.rnd / "chip" / f"m{i}.v", stick / f"copy{i}.txt")
    world.collector.wait_event(
        "closed_write", stick / "copy24.txt", location="removable", location_provider="EXFILTEST"
    )
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-removable-bulk-copy")))
    assert world.alerts("exfil-removable-crown-jewel")
    bulk = world.alerts("exfil-removable-bulk-copy")[0]
    assert bulk["exfilwatch"]["correlation"]["distinct_files"] == 20  # type: ignore[index]
    subprocess.run(["umount", str(stick)], check=True)
    assert world.collector.wait_for(lambda c: bool(c.health("media_unmounted")), timeout=5)
