"""Where tagged content goes: sync folders, staging, removable media, archives, disguise."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import LocationSettings, SinkSpec, WatchSpec
from agent.enrich.locations import staging_places
from agent.service import Agent
from agent.sources.paths import compile_excludes
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


def traced(collector: Collector, wanted: set[str]) -> set[str]:
    """Which of `wanted` were reported as copies traced to a tagged file."""
    return {e.path for e in collector.events() if e.path in wanted and e.lineage_origin is not None}


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


def test_a_hidden_directory_three_levels_down_a_home_is_within_the_home_watch_depth(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home" / "alice"
    (home / "a" / "b" / ".stash").mkdir(parents=True)
    specs = staging_places([str(home)], dirs=(), home_depth=4, exclude=())
    spec = next(s for s in specs if s.location == "home")
    assert spec.path == str(home)
    assert spec.max_depth == 4
    assert len(Path("a/b/.stash").parts) <= spec.max_depth
    assert not compile_excludes(spec.exclude).excluded("a/b/.stash")
    deeper = staging_places([str(home)], dirs=(), home_depth=2, exclude=())
    assert next(s for s in deeper if s.location == "home").max_depth == 2


def test_locations_exclude_leaves_noisy_subtrees_of_homes_and_staging_dirs_unwatched(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home" / "alice"
    for d in (".cache/thumbs", ".config/google-chrome/Default", ".config/app", "Downloads"):
        (home / d).mkdir(parents=True)
    tmp = tmp_path / "tmp"
    (tmp / "job" / ".cache").mkdir(parents=True)
    exclude = (".cache", ".config/google-chrome")
    specs = staging_places([str(home)], dirs=(str(tmp),), exclude=exclude)
    by_path = {s.path: compile_excludes(s.exclude) for s in specs}
    home_ex = by_path[str(home)]
    assert home_ex.excluded(".cache/thumbs")
    assert home_ex.excluded(".config/google-chrome/Default")
    assert not home_ex.excluded(".config/app")
    assert home_ex.excluded("Downloads")  # watched as a staging dir of its own
    assert by_path[str(tmp)].excluded("job/.cache")  # a name pattern matches at any depth
    assert not by_path[str(tmp)].excluded("job")
    assert str(home / "Downloads") in by_path


def test_a_tree_watched_otherwise_hides_only_itself_from_the_home_watch(tmp_path: Path) -> None:
    home = tmp_path / "home" / "alice"
    (home / "work" / "rnd").mkdir(parents=True)
    (home / "work" / ".stash").mkdir()
    specs = staging_places([str(home)], dirs=(), avoid=[str(home / "work" / "rnd")])
    home_ex = compile_excludes(next(s for s in specs if s.location == "home").exclude)
    assert home_ex.excluded("work/rnd/src")
    assert not home_ex.excluded("work/.stash")


def test_a_home_is_watched_to_its_depth_but_not_in_excluded_or_deeper_trees(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    home = tmp_path / "home" / "alice"
    (home / "a" / "b").mkdir(parents=True)
    (home / "1" / "2" / "3" / "4").mkdir(parents=True)
    # The shipped defaults: four levels, LOCATION_EXCLUDES (.cache, .config/google-chrome...).
    config = make_config(
        [],
        tmp_path,
        locations=LocationSettings(
            enabled=True, home_roots=(str(tmp_path / "home"),), staging_dirs=()
        ),
    )
    run_agent(config)
    noise = [
        home / ".cache" / "thumbs" / "t.png",
        home / ".config" / "google-chrome" / "Default" / "Cookies",
        home / "1" / "2" / "3" / "4" / ".x" / "deeper.txt",  # .x is level 5
    ]
    for f in noise:
        f.parent.mkdir(parents=True)
        f.write_text("noise")
    stash = home / "a" / "b" / ".stash"
    stash.mkdir()
    collector.wait_event("created", stash, location="staging")  # watched and scanned by then
    (stash / "top.v").write_text("module top; endmodule\n")
    collector.wait_event("closed_write", stash / "top.v", location="staging")
    paths = {e.path for e in collector.events()}
    assert not paths & {str(f) for f in noise}
    assert not any("/.cache" in p or "/google-chrome" in p for p in paths)


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
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-encrypted-tagged")))


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


def test_a_tree_copied_into_a_new_directory_counts_every_file_as_a_traced_copy(
    world: World,
) -> None:
    # `cp -r` makes the directory, then writes files before the agent can watch it: those
    # are found by the scan of the new directory and must be traced like any other copy.
    for i in range(30, 230):
        (world.rnd / "chip" / f"m{i}.v").write_text(f"module m{i}; endmodule\n" * (3 + i))
    assert world.collector.wait_for(
        lambda c: c.has_event("closed_write", world.rnd / "chip" / "m229.v"), timeout=20
    )
    dst = world.stage / "loot"
    subprocess.run(["cp", "-r", str(world.rnd / "chip"), str(dst)], check=True)
    wanted = {str(dst / f"m{i}.v") for i in range(230)}

    assert world.collector.wait_for(lambda c: traced(c, wanted) == wanted, timeout=30), len(
        traced(world.collector, wanted)
    )
    assert all(e.location == "staging" for e in world.collector.events() if e.path in wanted)


@needs_mount
def test_copies_made_the_moment_a_stick_is_mounted_are_all_traced(
    world: World, loop_mount: Callable[[Path], Path]
) -> None:
    # No wait for the agent to notice the mount: the first files land before the stick is
    # watched, and the scan of the newly watched medium must still report them as copies.
    label = f"exfil-{uuid.uuid4().hex[:8]}"
    stick = loop_mount(Path("/media") / label / "EXFILTEST")
    subprocess.run(["cp", "-r", str(world.rnd / "chip"), str(stick / "loot")], check=True)
    wanted = {str(stick / "loot" / f"m{i}.v") for i in range(30)}

    assert world.collector.wait_for(lambda c: traced(c, wanted) == wanted, timeout=30), sorted(
        wanted - traced(world.collector, wanted)
    )
    assert world.collector.wait_for(lambda c: bool(world.alerts("exfil-removable-bulk-copy")))


def test_a_marker_file_outside_the_tagged_trees_is_never_parsed(world: World) -> None:
    # Anyone can write `.exfilwatch.yaml` into /tmp: it tags nothing there, so the agent
    # spends no parse (and writes no record) on it.
    bait = world.stage / ".exfilwatch.yaml"
    bait.write_text("tags: [" + ", ".join(f"t{i}" for i in range(50)) + "]\n")
    world.collector.wait_event("closed_write", bait)
    names = {"marker_loaded", "marker_rejected", "marker_tampered"}
    assert not [
        r
        for r in world.collector.health()
        if r["event"]["action"] in names and str(world.stage) in json.dumps(r)
    ]
