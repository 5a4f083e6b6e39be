"""Capture under attack: loss is bounded and recovered from, and the watched user finds no blind
spot (hard links, swapped or remounted roots, mounts, the watch limit, very long paths)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import InotifySettings, LineageSettings, SinkSpec, WatchSpec
from agent.events import Event
from agent.service import Agent
from agent.sources.inotify import read_sysctl
from tests.conftest import REPO, Collector, as_user, make_config, needs_root
from tests.sources.test_inotify import user_watches

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")

NO_SYSCTL = InotifySettings(apply_sysctl=False)
ALL_KINDS = frozenset({"event", "health", "alert"})


def start(run_agent: Callable[..., Agent], tmp_path: Path, *specs: WatchSpec, **kw: Any) -> Agent:
    kw.setdefault("inotify", NO_SYSCTL)
    return run_agent(make_config(specs, tmp_path, source="inotify", **kw))


def source_of(agent: Agent) -> Any:
    assert agent.source is not None
    return agent.source


@contextlib.contextmanager
def sysctl(name: str, value: int) -> Iterator[int]:
    """Set an inotify sysctl for the block; the original value is always put back."""
    original = read_sysctl(name)
    assert original is not None
    path = Path("/proc/sys/fs/inotify") / name
    path.write_text(str(value))
    try:
        yield original
    finally:
        path.write_text(str(original))


def stall_reader(agent: Agent) -> threading.Event:
    """The reader thread waits on the returned gate: the kernel queue fills meanwhile."""
    gate = threading.Event()
    entered = threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(120)

    source_of(agent)._commands.put(hold)
    assert entered.wait(5)
    return gate


class Stall:
    """An enrichment stage that holds the consumer until released: a stuck sink or a slow
    disk, as far as the lanes can tell."""

    name = "stall"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, event: Event) -> Event:
        self.entered.set()
        self.gate.wait(60)
        return event


def settle(agent: Agent, timeout: float = 30.0) -> None:
    """Until the reader has nothing queued for it and the consumer has taken everything."""
    pipeline = agent.pipeline
    assert pipeline is not None
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        time.sleep(1.0)
        done = pipeline.processed
        if done == last and len(pipeline.queue) == 0:
            return
        last = done
    raise AssertionError(f"still busy after {timeout} s: {pipeline.stats()}")


def wait_line(collector: Collector, needle: str, timeout: float) -> bool:
    """Until a line holding `needle` was written; each line is looked at once (parsing every
    record on each poll, as Collector.health does, is quadratic at 200,000 lines)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        lines = collector.lines[seen:]
        seen += len(lines)
        if any(needle in line for line in lines):
            return True
        time.sleep(0.1)
    return False


def health_of(collector: Collector, action: str) -> list[dict[str, Any]]:
    return [
        r["exfilwatch"]["health"] | {"reason": r["event"].get("reason")}
        for r in collector.health(action)
    ]


def paths_by_action(collector: Collector) -> dict[str, set[str]]:
    """Event paths by action, parsed once from raw lines (cheap with 200,000 lines)."""
    out: dict[str, set[str]] = {}
    for line in list(collector.lines):
        if '"dataset":"exfilwatch.file"' not in line:
            continue
        rec = json.loads(line)
        out.setdefault(rec["event"]["action"], set()).add(rec["file"]["path"])
    return out


def landed(collector: Collector) -> set[str]:
    """Paths reported as written, or found by a rescan."""
    seen = paths_by_action(collector)
    return seen.get("rescanned", set()) | seen.get("closed_write", set())


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other users can reach (pytest's own tmp is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="exfilwatch-capture-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def tmpfs(target: Path) -> Iterator[Path]:
    """A tmpfs mounted on `target` for the block; always unmounted (lazily if busy)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "exfiltest", str(target)], check=True)
    try:
        yield target
    finally:
        mounted = os.path.ismount(target)
        if mounted and subprocess.run(["umount", str(target)], check=False).returncode:
            subprocess.run(["umount", "-l", str(target)], check=False)


def unmount(target: Path, *, lazy: bool = False) -> None:
    subprocess.run(["umount", *(["-l"] if lazy else []), str(target)], check=True)


needs_mount = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root and mount(8)"
)


# 1. Loss is bounded and always recovered from ----------------------------------------------


@needs_root
@pytest.mark.timeout(300)
def test_an_overflow_rescan_of_200_000_changed_files_feeds_the_queue_in_pieces_and_drops_none(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    dirs = [root / f"d{i}" for i in range(20)]
    for d in dirs:
        d.mkdir(parents=True)
    # The kernel reads the queue limit when the instance is made: 16 events, for a moment.
    with sysctl("max_queued_events", 16):
        agent = start(
            run_agent,
            tmp_path,
            WatchSpec(str(root)),
            queue_size=2_000,
            rescan_max_entries=400_000,
            lineage=LineageSettings(enabled=False),
        )
    gate = stall_reader(agent)
    wanted: set[str] = set()
    for d in dirs:
        for i in range(10_000):
            p = f"{d}/f{i}"
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            wanted.add(p)
    gate.set()
    assert wait_line(collector, '"action":"rescan_completed"', timeout=120)
    pipeline = agent.pipeline
    assert pipeline is not None
    settle(agent, timeout=180)
    seen = paths_by_action(collector)
    found = seen.get("rescanned", set()) & wanted
    accounted = found | (seen.get("created", set()) & wanted)
    drops = [h for h in health_of(collector, "event_loss") if h["reason"] == "queue_full"]
    done = health_of(collector, "rescan_completed")[0]
    print(
        f"\noverflow rescan: changed={len(wanted)} found={len(found)} "
        f"accounted={len(accounted)} queue_full_drops={sum(h['dropped'] for h in drops)} "
        f"record={done}"
    )
    assert drops == []
    assert accounted == wanted
    assert done["reason"] == "inotify_overflow"
    assert done["changed"] >= len(found) and not done["truncated"]
    assert pipeline.stats()["lanes"]["tagged"]["dropped_total"] == 0
    # The walk's own directory listings did not overflow the 16-event queue again.
    assert (source_of(agent).stats()["overflows"], source_of(agent).stats()["rescans"]) == (1, 1)


def test_a_tagged_lane_drop_is_followed_by_a_rescan_that_reports_the_dropped_files(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    agent = start(
        run_agent,
        tmp_path,
        WatchSpec(str(root), ("rnd",)),
        queue_size=100,
        lineage=LineageSettings(enabled=False),
    )
    pipeline = agent.pipeline
    assert pipeline is not None
    pipeline.backpressure = 0.2  # a consumer stuck for 0.2 s is stuck, for this test
    stall = Stall()
    pipeline.stages = (stall,)
    (root / "first").write_text("x")
    assert stall.entered.wait(5)
    wanted = {str(root / f"f{i}") for i in range(1000)}
    for p in sorted(wanted):
        Path(p).write_text("x")
    assert collector.wait_for(lambda c: pipeline.queue.dropped["tagged"] > 0, timeout=10)
    pipeline.stages = ()
    stall.gate.set()
    assert collector.wait_for(
        lambda c: any(h["reason"] == "queue_full" for h in health_of(c, "rescan_completed")),
        timeout=30,
    )
    assert collector.wait_for(lambda c: wanted <= landed(c), timeout=20)
    loss = [h for h in health_of(collector, "event_loss") if h["reason"] == "queue_full"]
    assert loss and loss[0]["lane"] == "tagged"
    done = [h for h in health_of(collector, "rescan_completed") if h["reason"] == "queue_full"]
    assert done[0]["directories"] >= 1 and done[0]["changed"] >= 1
    # The rescan found the files the cut batches held, as rescanned events of the tagged root.
    rescanned = [e for e in collector.events() if e.action == "rescanned"]
    assert rescanned and all(e.tags == ("rnd",) and e.source == "rescan" for e in rescanned)


def test_egress_drops_are_rescanned_and_staging_sheds_are_only_reported(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    usb = tmp_path / "usb"
    stage = tmp_path / "stage"
    for d in (usb, stage):
        d.mkdir()
    agent = start(
        run_agent,
        tmp_path,
        WatchSpec(str(usb), location="removable"),
        WatchSpec(str(stage), location="staging"),
        egress_queue_size=50,
        staging_queue_size=50,
        lineage=LineageSettings(enabled=False),
    )
    pipeline = agent.pipeline
    assert pipeline is not None
    stall = Stall()
    pipeline.stages = (stall,)
    (usb / "first").write_text("x")
    assert stall.entered.wait(5)
    copied = {str(usb / f"copy{i}.v") for i in range(400)}
    for i in range(400):
        (usb / f"copy{i}.v").write_text("x")
        (stage / f"junk{i}.o").write_text("x")
    assert collector.wait_for(
        lambda c: pipeline.queue.dropped["egress"] > 0 and pipeline.queue.dropped["staging"] > 0,
        timeout=10,
    )
    pipeline.stages = ()
    stall.gate.set()
    assert collector.wait_for(lambda c: copied <= landed(c), timeout=30)
    lanes = {h["lane"] for h in health_of(collector, "event_loss") if h["reason"] == "queue_full"}
    assert lanes == {"egress", "staging"}
    time.sleep(1.5)  # a staging rescan, if one were scheduled, would have run by now
    assert not any(
        e.action == "rescanned" and e.path.startswith(str(stage)) for e in collector.events()
    )


def test_health_records_pass_a_reader_that_waits_for_room_in_a_full_tagged_lane(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    agent = start(run_agent, tmp_path, WatchSpec(str(root)), queue_size=10)
    pipeline = agent.pipeline
    assert pipeline is not None
    pipeline.backpressure = 30.0
    stall = Stall()
    pipeline.stages = (stall,)
    (root / "first").write_text("x")
    assert stall.entered.wait(5)
    for i in range(100):
        (root / f"f{i}").write_text("x")
    assert collector.wait_for(lambda c: pipeline.queue.waits > 0, timeout=10)
    # The consumer is stuck and the reader waits for room: a heartbeat still goes out at once.
    begun = time.monotonic()
    agent.heartbeat()
    assert time.monotonic() - begun < 10.0  # not the 30 s wait for room (load is slack)
    pipeline.stages = ()
    stall.gate.set()
    collector.wait_event("closed_write", root / "f99")
    # Written ahead of the events that were queued before it, and none of those was lost.
    order = [(r["event"]["action"], r.get("file", {}).get("path")) for r in collector.records()]
    assert order.index(("heartbeat", None)) < order.index(("closed_write", str(root / "f99")))
    assert pipeline.queue.dropped["tagged"] == 0


# 2. Hard links -----------------------------------------------------------------------------


@needs_root
def test_a_hard_link_to_a_tagged_file_made_outside_the_tree_is_an_event_and_an_alert(
    shared_tmp: Path,
    tmp_path: Path,
    run_agent: Callable[..., Agent],
    collector: Collector,
    test_user: str,
) -> None:
    root = shared_tmp / "rnd"
    root.mkdir()
    secret = root / "tapeout.gds"
    secret.write_text("GDSII")
    outside = shared_tmp / "out"
    outside.mkdir()
    for p in (root, secret, outside):
        shutil.chown(p, test_user)
    config = make_config(
        [WatchSpec(str(root), ("chip",), "high")],
        tmp_path,
        source="inotify",
        inotify=NO_SYSCTL,
        rules=(str(REPO / "rules"),),
        sinks=(SinkSpec("stdout", None, ALL_KINDS),),
    )
    run_agent(config, kinds=ALL_KINDS)
    assert collector.wait_for(lambda c: bool(c.health("source_ready")))
    # The insider's move: a second name for the design where no one watches, read from there.
    as_user(test_user, 'ln "$1" "$2"', str(secret), str(outside / "notes.txt"))
    collector.wait_event("attributes_changed", secret, nlink=2, tags=("chip",))
    assert collector.wait_for(
        lambda c: any(
            r["event"]["kind"] == "alert" and r["rule"]["id"] == "exfil-tagged-hard-link"
            for r in c.records()
        )
    )
    alert = next(r for r in collector.records() if r["event"]["kind"] == "alert")
    assert alert["file"]["path"] == str(secret)
    assert alert["exfilwatch"]["level"] == "high"
    assert alert["threat"]["technique"]["id"] == ["T1074.001"]


def test_hard_links_to_tagged_files_that_exist_at_start_are_reported(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "top.v").write_text("module top; endmodule\n")
    (root / "plain.v").write_text("x")
    os.link(root / "sub" / "top.v", tmp_path / "stash.v")
    start(run_agent, tmp_path, WatchSpec(str(root), ("chip",)))
    assert collector.wait_for(lambda c: bool(c.health("hard_links_found")))
    found = health_of(collector, "hard_links_found")[0]
    assert found["count"] == 1 and found["sample"] == [str(root / "sub" / "top.v")]
    assert found["root"] == str(root) and found["truncated"] is False


# 3. Roots that are renamed, replaced or remounted ------------------------------------------


def test_a_root_renamed_away_and_back_is_watched_again_with_a_record(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    (root / "sub").mkdir(parents=True)
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    away = tmp_path / "away"
    root.rename(away)
    (away / "sub" / "while-away.v").write_text("x")
    away.rename(root)
    assert collector.wait_for(lambda c: bool(c.health("watch_root_restored")), timeout=10)
    (root / "sub" / "after.v").write_text("x")
    collector.wait_event("closed_write", root / "sub" / "after.v", tags=("rnd",))
    # What was written while it was away is found when the root is watched again.
    assert collector.wait_for(
        lambda c: any(
            e.path == str(root / "sub" / "while-away.v") and e.source in ("scan", "rescan")
            for e in c.events()
        )
    )
    assert collector.health("watch_path_vanished") == []


def test_a_root_replaced_by_a_symlink_is_not_followed_and_is_reported_once(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    agent = start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    root.rmdir()
    root.symlink_to(elsewhere)
    assert collector.wait_for(lambda c: bool(c.health("watch_root_replaced")), timeout=10)
    (elsewhere / "through-the-link.v").write_text("x")
    time.sleep(1.0)  # five root checks
    assert len(collector.health("watch_root_replaced")) == 1
    assert collector.health("watch_path_vanished") == []
    assert not any("through-the-link" in e.path for e in collector.events())
    assert source_of(agent).stats()["roots"][str(root)] == "replaced"
    root.unlink()
    root.mkdir()
    assert collector.wait_for(lambda c: bool(c.health("watch_root_restored")), timeout=10)
    (root / "real.v").write_text("x")
    collector.wait_event("closed_write", root / "real.v", tags=("rnd",))


@needs_mount
def test_a_filesystem_mounted_over_a_root_is_watched_by_device_and_inode_with_a_record(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    with tmpfs(root):
        assert collector.wait_for(lambda c: bool(c.health("watch_root_changed")), timeout=10)
        changed = health_of(collector, "watch_root_changed")[0]
        assert changed["reason"] == "remounted"
        assert changed["device"] != changed["previous_device"]
        (root / "on-tmpfs.v").write_text("x")
        collector.wait_event("closed_write", root / "on-tmpfs.v", tags=("rnd",))
        unmount(root)
        # The tmpfs watches end (IN_UNMOUNT): the directory it covered is watched again.
        assert collector.wait_for(lambda c: bool(c.health("watch_root_restored")), timeout=10)
        assert health_of(collector, "watch_root_vanished")[0]["reason"] == "unmounted"
        (root / "underneath.v").write_text("x")
        collector.wait_event("closed_write", root / "underneath.v", tags=("rnd",))


@needs_mount
def test_a_tmpfs_mounted_then_unmounted_inside_a_tree_is_a_record_each_time_and_stays_watched(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    mnt = root / "sub" / "mnt"
    mnt.mkdir(parents=True)
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    with tmpfs(mnt):
        assert collector.wait_for(lambda c: bool(c.health("watch_mounted")), timeout=10)
        assert health_of(collector, "watch_mounted")[0]["path"] == str(mnt)
        (mnt / "on-tmpfs.v").write_text("x")
        collector.wait_event("closed_write", mnt / "on-tmpfs.v", tags=("rnd",))
        unmount(mnt)
        assert collector.wait_for(lambda c: bool(c.health("watch_unmounted")), timeout=10)
    gone = health_of(collector, "watch_unmounted")[0]
    assert gone["path"] == str(mnt) and gone["root"] == str(root)
    (mnt / "underneath.v").write_text("x")
    collector.wait_event("closed_write", mnt / "underneath.v", tags=("rnd",))
    assert len(collector.health("watch_unmounted")) == 1


@needs_mount
def test_a_mount_inside_a_tree_is_seen_at_once_not_at_the_next_root_check(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    # The reader sleeps until its next root check (here an hour away) when nothing happens;
    # a change of the mount table wakes it.
    root = tmp_path / "rnd"
    mnt = root / "mnt"
    mnt.mkdir(parents=True)
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)), root_check_interval=3600.0)
    with tmpfs(mnt):
        assert collector.wait_for(lambda c: bool(c.health("watch_mounted")), timeout=10)
        (mnt / "on-tmpfs.v").write_text("x")
        collector.wait_event("closed_write", mnt / "on-tmpfs.v", tags=("rnd",))
        unmount(mnt)
        assert collector.wait_for(lambda c: bool(c.health("watch_unmounted")), timeout=10)


@needs_mount
def test_a_mount_over_a_root_is_seen_soon_not_at_the_next_root_check(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)), root_check_interval=3600.0)
    with tmpfs(root):
        assert collector.wait_for(lambda c: bool(c.health("watch_root_changed")), timeout=10)
        (root / "on-tmpfs.v").write_text("x")
        collector.wait_event("closed_write", root / "on-tmpfs.v", tags=("rnd",))


@needs_mount
def test_a_lazy_unmount_of_a_busy_filesystem_inside_a_tree_is_a_record(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    mnt = root / "mnt"
    mnt.mkdir(parents=True)
    with tmpfs(mnt):
        (mnt / "inside").mkdir()
        start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
        busy = os.open(mnt / "inside", os.O_RDONLY | os.O_DIRECTORY)
        try:
            # The filesystem lives on (a process sits in it) but is no longer at that path.
            unmount(mnt, lazy=True)
            assert collector.wait_for(lambda c: bool(c.health("watch_unmounted")), timeout=10)
            assert health_of(collector, "watch_unmounted")[0]["path"] == str(mnt)
            (mnt / "underneath.v").write_text("x")
            collector.wait_event("closed_write", mnt / "underneath.v", tags=("rnd",))
        finally:
            os.close(busy)


# 4. The watch limit and very long paths ----------------------------------------------------


@needs_root
def test_directories_skipped_at_the_watch_limit_are_watched_once_watches_free_up(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    for i in range(300):
        (root / f"d{i:03}").mkdir(parents=True)
    agent = None
    for _ in range(3):  # another process freeing watches meanwhile can leave room: try again
        with sysctl("max_user_watches", user_watches() + 5):
            agent = start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
            limited = bool(collector.health("watch_limit_reached"))
        if limited:
            break
        agent.stop()
    assert agent is not None and collector.health("watch_limit_reached"), collector.health()
    # The limit is back to normal: the next retry watches what was skipped, and says so.
    assert collector.wait_for(lambda c: bool(c.health("watch_retried")), timeout=10)
    retried = health_of(collector, "watch_retried")[-1]
    assert retried["watched"] >= 200 and retried["still_skipped"] == 0
    (root / "d299" / "late.v").write_text("x")
    collector.wait_event("closed_write", root / "d299" / "late.v", tags=("rnd",))
    assert source_of(agent).stats()["watches"] == 301


def _long_chain(top: Path, levels: int) -> str:
    """Nested 200-byte directory names under `top`, made with *at() calls: the whole path is
    longer than PATH_MAX, which no single path-taking call accepts."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    path = str(top)
    try:
        for i in range(levels):
            name = f"L{i:02}" + "x" * 197
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
            path += "/" + name
        return path
    finally:
        os.close(fd)


@contextlib.contextmanager
def _dir_fd(path: str) -> Iterator[int]:
    """An open descriptor of a directory however long its path, one component at a time."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in path.strip("/").split("/"):
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def _write_at(path: str, name: str) -> None:
    with _dir_fd(path) as fd:
        f = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(f, b"x")
        os.close(f)


def _mkdir_at(path: str, name: str) -> str:
    with _dir_fd(path) as fd:
        os.mkdir(name, dir_fd=fd)
    return f"{path}/{name}"


def test_a_directory_deeper_than_path_max_is_watched_not_reported_vanished(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    deep = _long_chain(root, 25)
    assert len(deep.encode()) > 5_000
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    _write_at(deep, "deep.v")
    collector.wait_event("closed_write", f"{deep}/deep.v")
    assert collector.health("watch_path_vanished") == []
    # A directory made down there later is watched too, and what lands in it seen.
    newer = _mkdir_at(deep, "L00" + "x" * 197)
    collector.wait_event("created", newer)
    _write_at(newer, "newer.v")
    collector.wait_event("closed_write", f"{newer}/newer.v")
    assert collector.health("watch_path_vanished") == []
    assert collector.health("watch_path_too_long") == []
