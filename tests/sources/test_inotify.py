"""The Linux inotify source on real directories: every operation, every way a watch can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import InotifySettings, WatchSpec
from agent.service import Agent
from agent.sources.inotify import _GATHER_MS, InotifySource, read_sysctl
from tests.conftest import Collector, make_config, needs_root

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")

NO_SYSCTL = InotifySettings(apply_sysctl=False)


def start(
    run_agent: Callable[..., Agent], tmp_path: Path, *specs: WatchSpec, **kw: object
) -> Agent:
    kw.setdefault("inotify", NO_SYSCTL)
    agent = run_agent(make_config(specs, tmp_path, source="inotify", **kw))
    return agent


def test_create_write_read_rename_delete_are_reported_in_order(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    start(run_agent, tmp_path, WatchSpec(str(root), ("chip",), "high"))
    f = root / "design.v"
    f.write_text("module top; endmodule\n")
    f.read_text()
    f.rename(root / "design.bak")
    (root / "design.bak").unlink()
    collector.wait_event("deleted", root / "design.bak")
    actions = [(e.action, e.path) for e in collector.events()]
    assert actions == [
        ("created", str(f)),
        ("opened", str(f)),
        ("modified", str(f)),
        ("closed_write", str(f)),
        ("opened", str(f)),
        ("closed_nowrite", str(f)),
        ("moved", str(root / "design.bak")),
        ("deleted", str(root / "design.bak")),
    ]
    moved = next(e for e in collector.events() if e.action == "moved")
    assert moved.src_path == str(f)
    assert all(e.tags == ("chip",) and e.sensitivity == "high" for e in collector.events())


def test_events_carry_the_cheap_facts_of_the_file(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    start(run_agent, tmp_path, WatchSpec(str(root), ("chip",), "high"))
    f = root / "netlist.v"
    f.write_text("module top; endmodule\n")
    collector.wait_event("closed_write", f)
    written = next(e for e in collector.events() if e.action == "closed_write")
    st = f.stat()
    assert written.size == st.st_size == 22
    assert written.inode == str(st.st_ino)
    assert written.uid == str(st.st_uid)
    assert written.gid == str(st.st_gid)
    assert written.mode == f"{st.st_mode & 0o7777:04o}"
    assert written.file_type == "file"
    assert written.root == str(root)
    assert written.hostname
    sequences = [e.sequence for e in collector.events()]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


def test_mkdir_p_then_write_deep_is_seen_at_every_level(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    deep = root / "a" / "b" / "c" / "d"
    # One shell process so the whole chain races the watcher, as a real `mkdir -p` does.
    subprocess.run(["sh", "-c", f"mkdir -p '{deep}' && echo x > '{deep}/leaf.txt'"], check=True)
    collector.wait_event("created", deep / "leaf.txt")
    for d in (root / "a", root / "a" / "b", root / "a" / "b" / "c", deep):
        assert collector.has_event("created", d)
    created = [e.path for e in collector.events() if e.action == "created"]
    assert len(created) == len(set(created)), "a path raced by the scan is reported once"
    # The new directories are watched: a later write deep inside is reported too.
    (deep / "later.txt").write_text("y")
    collector.wait_event("closed_write", deep / "later.txt")


def test_directory_moved_in_from_outside_is_watched_with_its_contents(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    outside = tmp_path / "outside" / "proj"
    (outside / "src").mkdir(parents=True)
    (outside / "src" / "main.c").write_text("int main(){}")
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    (outside).rename(root / "proj")
    collector.wait_event("moved_in", root / "proj")
    collector.wait_event("created", root / "proj" / "src" / "main.c", source="scan")
    (root / "proj" / "src" / "main.c").write_text("changed")
    collector.wait_event("closed_write", root / "proj" / "src" / "main.c")


def test_directory_renamed_inside_keeps_watching_under_the_new_name(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    (root / "old" / "sub").mkdir(parents=True)
    start(run_agent, tmp_path, WatchSpec(str(root)))
    (root / "old").rename(root / "new")
    collector.wait_event("moved", root / "new", src_path=str(root / "old"))
    (root / "new" / "sub" / "f").write_text("x")
    collector.wait_event("closed_write", root / "new" / "sub" / "f")
    assert not any(e.path.startswith(str(root / "old") + "/") for e in collector.events())


def test_directory_moved_out_is_reported_and_no_longer_watched(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    (root / "proj").mkdir(parents=True)
    start(run_agent, tmp_path, WatchSpec(str(root)))
    elsewhere = tmp_path / "usb"
    elsewhere.mkdir()
    (root / "proj").rename(elsewhere / "proj")
    collector.wait_event("moved_out", root / "proj")
    (elsewhere / "proj" / "after.txt").write_text("x")
    (root / "marker.txt").write_text("x")
    collector.wait_event("closed_write", root / "marker.txt")
    assert not any("after.txt" in e.path for e in collector.events())


def test_excluded_globs_never_reach_the_pipeline(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    spec = WatchSpec(str(root), exclude=("*.tmp", "node_modules", "build/**"))
    start(run_agent, tmp_path, spec)
    (root / "node_modules" / "x").mkdir(parents=True)
    (root / "node_modules" / "x" / "index.js").write_text("x")
    (root / "build" / "obj").mkdir(parents=True)
    (root / "build" / "obj" / "a.o").write_text("x")
    (root / "scratch.tmp").write_text("x")
    (root / "keep.c").write_text("x")
    collector.wait_event("closed_write", root / "keep.c")
    paths = {e.path for e in collector.events()}
    assert not any("node_modules" in p or ".tmp" in p or "/build/" in p for p in paths)
    assert str(root / "build") not in paths  # `dir/**` excludes the directory itself too


def test_the_agents_own_marker_reads_are_not_events(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    # The agent reads a marker to learn its tags: reported, each read would be an event on
    # the marker, read again, for ever. Writes to it are still events (who changed the tags).
    root = tmp_path / "rnd"
    (root / "proj").mkdir(parents=True)
    start(run_agent, tmp_path, WatchSpec(str(root)))
    marker = root / "proj" / ".exfilwatch.yaml"
    marker.write_text("tags: [crown-jewels]\n")
    collector.wait_event("closed_write", marker)
    (root / "proj" / "design.v").write_text("x")
    collector.wait_event("closed_write", root / "proj" / "design.v", tags=("crown-jewels",))
    reads = [e.action for e in collector.events() if e.path == str(marker)]
    assert "closed_write" in reads
    assert not {"opened", "closed_nowrite"} & set(reads[reads.index("closed_write") :]), reads


def test_symlink_loops_are_not_followed(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    (root / "a").mkdir(parents=True)
    (root / "a" / "loop").symlink_to(root)
    (root / "a" / "self").symlink_to(root / "a")
    agent = start(run_agent, tmp_path, WatchSpec(str(root)))
    assert agent.source is not None
    assert agent.source.stats()["watches"] == 2  # rnd and rnd/a, nothing through the links
    (root / "a" / "loop2").symlink_to(root / "a")
    collector.wait_event("created", root / "a" / "loop2", file_type="symlink")
    assert agent.source.stats()["watches"] == 2


def test_deleted_root_is_reported_and_watched_again_when_recreated(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    (root / "sub").mkdir(parents=True)
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    shutil.rmtree(root)
    assert collector.wait_for(lambda c: bool(c.health("watch_root_vanished")))
    root.mkdir()
    (root / "early.txt").write_text("before the watch came back")
    assert collector.wait_for(lambda c: bool(c.health("watch_root_restored")))
    collector.wait_event("created", root / "early.txt", source="scan")
    (root / "late.txt").write_text("x")
    collector.wait_event("closed_write", root / "late.txt", tags=("rnd",))


def test_renamed_root_is_reported_and_its_new_location_is_not_watched(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    start(run_agent, tmp_path, WatchSpec(str(root)))
    root.rename(tmp_path / "renamed")
    assert collector.wait_for(lambda c: bool(c.health("watch_root_moved")))
    (tmp_path / "renamed" / "x").write_text("x")
    root.mkdir()
    assert collector.wait_for(lambda c: bool(c.health("watch_root_restored")))
    (root / "y").write_text("y")
    collector.wait_event("closed_write", root / "y")
    assert not any(e.path.startswith(str(tmp_path / "renamed")) for e in collector.events())


def test_a_root_that_does_not_exist_yet_is_picked_up_when_it_appears(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "later" / "rnd"
    start(run_agent, tmp_path, WatchSpec(str(root), ("rnd",)))
    assert collector.wait_for(lambda c: bool(c.health("watch_root_missing")))
    root.mkdir(parents=True)
    assert collector.wait_for(lambda c: bool(c.health("watch_root_restored")))
    (root / "f").write_text("x")
    collector.wait_event("closed_write", root / "f", tags=("rnd",))


@needs_root
def test_kernel_queue_overflow_is_reported_and_followed_by_a_rescan(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    original = read_sysctl("max_queued_events")
    assert original is not None
    path = "/proc/sys/fs/inotify/max_queued_events"
    # The kernel reads the limit when the instance is created; restore it right after.
    Path(path).write_text("16")
    try:
        agent = start(run_agent, tmp_path, WatchSpec(str(root)))
    finally:
        Path(path).write_text(str(original))
    assert agent.source is not None
    # Stall the reader by giving it a command that waits, then burst past the tiny queue.
    import threading

    gate = threading.Event()
    agent.source._commands.put(lambda: gate.wait(5))  # type: ignore[attr-defined]
    for i in range(200):
        (root / f"f{i}").write_text("x")
    gate.set()
    assert collector.wait_for(lambda c: bool(c.health("event_loss")), timeout=10)
    loss = collector.health("event_loss")[0]
    assert loss["event"]["reason"] == "inotify_overflow"
    assert collector.wait_for(lambda c: bool(c.health("rescan_completed")), timeout=10)
    # Every file is accounted for: by its own events before the overflow, or by the rescan.
    wanted = {str(root / f"f{i}") for i in range(200)}
    assert collector.wait_for(lambda c: wanted <= {e.path for e in c.events()}, timeout=10)
    assert any(e.action == "rescanned" and e.source == "rescan" for e in collector.events())


def user_watches() -> int:
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                    total += sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


@needs_root
def test_watch_limit_is_reported_by_name_with_what_was_left_unwatched(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    # Many more directories than the headroom: other processes' watches may come and go.
    for i in range(300):
        (root / f"d{i}").mkdir(parents=True)
    original = read_sysctl("max_user_watches")
    assert original is not None
    path = "/proc/sys/fs/inotify/max_user_watches"
    records: list[dict[str, object]] = []
    for _ in range(3):  # another process freeing watches meanwhile can leave room: try again
        Path(path).write_text(str(user_watches() + 5))
        try:
            agent = start(run_agent, tmp_path, WatchSpec(str(root)))
        finally:
            Path(path).write_text(str(original))
        records = collector.health("watch_limit_reached")
        agent.stop()
        if records:
            break
    assert records, collector.health()
    data = records[0]["exfilwatch"]["health"]
    assert data["count"] >= 200
    assert data["root"] == str(root)
    assert data["sample"]


def test_outside_tagged_trees_only_landed_content_and_new_directories_reach_the_pipeline(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    agent = start(run_agent, tmp_path, WatchSpec(str(stage), location="staging"))
    noise = stage / "build.o"
    noise.write_bytes(b"\0" * 100)
    noise.read_bytes()
    noise.chmod(0o600)
    noise.rename(stage / "build2.o")
    (stage / "build2.o").unlink()
    sub = stage / "new"
    sub.mkdir()
    collector.wait_event("created", sub)  # watched and scanned by then
    (sub / "landed.v").write_text("module top; endmodule\n")
    collector.wait_event("closed_write", sub / "landed.v")
    # As a set: landed files wait for content checks in the enrichment worker, so they may
    # be written after events that needed none (a file already gone has nothing to check).
    assert sorted((e.action, e.path) for e in collector.events()) == sorted(
        [
            ("closed_write", str(noise)),
            ("moved", str(stage / "build2.o")),
            ("created", str(sub)),
            ("closed_write", str(sub / "landed.v")),
        ]
    )
    assert all(e.location == "staging" for e in collector.events())
    assert agent.source is not None
    # The file creations were dropped by the reader; opens, reads, attribute changes and
    # deletions never left the kernel.
    assert agent.source.stats()["filtered"] >= 2


def test_a_new_directory_gone_before_it_could_be_watched_is_an_event_loss(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    start(run_agent, tmp_path, WatchSpec(str(root), ("chip",)))
    # The agent reads a directory's CREATE after it is made; a tight loop of mkdir and rmdir
    # wins that race on some turns. Each turn that wins must be an event_loss by path.
    gone: set[str] = set()
    for i in range(2000):
        d = root / f"flash{i}"
        d.mkdir()
        d.rmdir()
        gone.add(str(d))
        if collector.health("event_loss"):
            break
    assert collector.wait_for(lambda c: bool(c.health("event_loss")), timeout=10)
    loss = collector.health("event_loss")[0]
    assert loss["event"]["reason"] == "vanished_before_watch"
    assert set(loss["exfilwatch"]["health"]["sample"]) <= gone
    assert collector.health("watch_path_vanished") == []


def test_in_a_home_hidden_directories_are_watched_before_a_big_tree_uses_up_the_budget(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    home = tmp_path / "home" / "alice"
    for i in range(20):
        (home / "src" / f"pkg{i}").mkdir(parents=True)
    (home / "src" / ".old").mkdir()
    (home / ".stash").mkdir()
    start(
        run_agent,
        tmp_path,
        WatchSpec(str(home), location="home", max_depth=4, max_dirs=5),
    )
    for stash in (home / ".stash", home / "src" / ".old"):
        (stash / "top.v").write_text("module top; endmodule\n")
        collector.wait_event("closed_write", stash / "top.v", location="staging")
    budget = collector.health("cap_reached")
    assert budget and budget[0]["event"]["reason"] == "watch_budget"


def test_rescan_reports_what_changed_in_the_tagged_trees_since_a_time_in_pieces(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    import threading
    import time

    root = tmp_path / "rnd"
    (root / "sub").mkdir(parents=True)
    stage = tmp_path / "stage"
    stage.mkdir()
    (root / "before.v").write_text("x")
    time.sleep(0.05)
    since = time.time_ns() // 1000
    # Written while no agent ran (the downtime the service asks about at start).
    written = {str(root / "sub" / f"m{i}.v") for i in range(5000)}
    for p in written:
        Path(p).write_text("x")
    (stage / "junk.o").write_text("x")
    agent = start(
        run_agent,
        tmp_path,
        WatchSpec(str(root), ("rnd",)),
        WatchSpec(str(stage), location="staging"),
        queue_size=1000,
    )
    assert agent.source is not None
    caller = threading.Thread(target=agent.source.rescan, args=(since, "downtime"))
    caller.start()
    caller.join(1)
    assert not caller.is_alive(), "rescan returns at once; the reader thread walks"
    assert collector.wait_for(lambda c: bool(c.health("rescan_completed")), timeout=20)
    done = collector.health("rescan_completed")[0]
    data = done["exfilwatch"]["health"]
    assert done["event"]["reason"] == "downtime"
    assert data["roots"] == [str(root)]  # tagged trees only
    assert data["changed"] == len(written) + 1  # and rnd/sub, whose ctime changed
    assert data["pieces"] >= 2 and data["dropped"] == 0
    assert collector.wait_for(
        lambda c: written <= {e.path for e in c.events() if e.action == "rescanned"}, timeout=20
    )
    rescanned = {e.path for e in collector.events() if e.action == "rescanned"}
    assert str(root / "before.v") not in rescanned
    assert not any(p.startswith(str(stage)) for p in rescanned)
    assert collector.health("event_loss") == []


def test_a_stream_of_small_writes_is_read_in_batches_not_one_read_per_file(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    """A build or a copy writes file after file: read as each came, every file would cost
    a wake-up of the reader and of the consumer and a write to every sink. The reader lets
    events gather for a few ms after a small read."""
    root = tmp_path / "rnd"
    root.mkdir()
    agent = start(run_agent, tmp_path, WatchSpec(str(root), ("chip",)))
    source = agent.source
    assert isinstance(source, InotifySource)
    files = 200
    for attempt in range(3):
        before = source.counters["reads"]
        began = time.monotonic()
        for i in range(files):
            (root / f"f{attempt}-{i}.o").write_bytes(b"x")
            time.sleep(0.0005)  # the workload: a file every half millisecond, not a wait
        took_ms = (time.monotonic() - began) * 1000
        collector.wait_event("closed_write", root / f"f{attempt}-{files - 1}.o")
        reads = source.counters["reads"] - before
        # At most one read per gathering pause while the files came (and a few after): on a
        # loaded machine the writer is slow too, and fewer files fall in each pause.
        paused = took_ms / _GATHER_MS * 1.25 + 3
        if paused < files / 2:
            break  # fast enough for the pause to show; else the machine is too busy: again
    closed = {e.path for e in collector.events() if e.action == "closed_write"}
    assert {str(root / f"f{attempt}-{i}.o") for i in range(files)} <= closed
    # Read as they came: about one read per file (four events each). Gathered for 5 ms:
    # about ten files a read on an idle machine.
    assert reads <= max(files / 4, paused), (reads, round(took_ms))


def test_the_stop_record_accounts_for_every_event_read(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    """agent_stopped carries the source's counters beside the pipeline's: events read, handed
    on, filtered, of a watch no longer known. A gap between them names where events went."""
    root = tmp_path / "rnd"
    root.mkdir()
    agent = start(run_agent, tmp_path, WatchSpec(str(root), ("chip",)))
    (root / "a.v").write_text("x")
    collector.wait_event("closed_write", root / "a.v")
    agent.stop()
    stopped = collector.health("agent_stopped")[-1]["exfilwatch"]["health"]
    counters = stopped["source_counters"]
    # created, opened, modified, closed_write: at least four read and handed on
    assert counters["events_read"] >= counters["emitted"] >= 4
    assert counters["reads"] >= 1
    assert counters["unknown_watch"] == 0
    assert stopped["processed"] == counters["emitted"]
