"""The fanotify directory-entry reader on a real kernel: who created, deleted or renamed what."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.components import Component
from agent.sources.fandirs import DirEventsWatcher, available
from agent.sources.fanotify import Access

T = TypeVar("T")

USABLE, WHY_NOT = available()
RENAME_USABLE, RENAME_WHY_NOT = available("rename")
pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fanotify is Linux-only"),
    pytest.mark.skipif(not USABLE, reason=f"fanotify directory events unavailable: {WHY_NOT}"),
]

QUEUE_KNOB = Path("/proc/sys/fs/fanotify/max_queued_events")


def op(*argv: str, cwd: Path | None = None) -> int:
    """Runs one command in its own process to completion; returns that process's pid (the
    shell prints its pid, then exec's the command in place)."""
    out = subprocess.run(
        ["sh", "-c", 'echo $$; exec "$@"', "sh", *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    )
    return int(out.stdout.split()[0])


def wait_until(probe: Callable[[], T | None], timeout: float = 5.0) -> T | None:
    """probe() as soon as it is not None, or its last answer at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def seen(watcher: DirEventsWatcher, path: Path, action: str, timeout: float = 5.0) -> Access | None:
    return wait_until(lambda: watcher.lookup(str(path), actions={action}), timeout)


def health(records: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"]["action"] == action]


def fanotify_fds() -> list[str]:
    """This process's fds that are fanotify groups (their fdinfo says so)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as fh:
                if "fanotify flags:" in fh.read():
                    found.append(fd)
        except OSError:
            continue
    return found


@pytest.fixture
def records() -> list[dict[str, Any]]:
    """The health records the watchers of a test reported."""
    return []


@pytest.fixture(params=["rename", "moves"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each behaviour in both modes: rename (Linux 5.17+) and moves (the 5.9+ fallback)."""
    if request.param == "rename" and not RENAME_USABLE:
        pytest.skip(f"rename mode unavailable: {RENAME_WHY_NOT}")
    return str(request.param)


@pytest.fixture
def watch(records: list[dict[str, Any]], mode: str) -> Iterator[Callable[..., DirEventsWatcher]]:
    """Starts watchers that report into `records`, and always stops them."""
    started: list[DirEventsWatcher] = []

    def start(*paths: Path, **kw: Any) -> DirEventsWatcher:
        kw.setdefault("report", records.append)
        kw.setdefault("mode", mode)
        watcher = DirEventsWatcher([str(p) for p in paths], **kw)
        watcher.start()
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.stop()


class Held:
    """Keeps the reader from reading while held (it takes the model lock for each batch), so
    what a test does meanwhile is read afterwards, as by a reader far behind on a busy host."""

    def __init__(self, watcher: DirEventsWatcher) -> None:
        self._lock = watcher._model_lock

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_available_says_yes_as_root_and_start_raises_eperm_without_privileges() -> None:
    assert available() == (True, "")
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and exits
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            ok, why = available()
            try:
                # A tree this user can open, so the mark itself is what is refused.
                DirEventsWatcher(["/usr"], report=lambda r: None).start()
                raised = "nothing"
            except OSError as exc:
                raised = str(exc.errno)
            os.write(w, f"{ok}|{why}|{raised}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        answer = fh.read().split("|")
    os.waitpid(pid, 0)
    assert answer[0] == "False" and answer[1] == "needs CAP_SYS_ADMIN for a filesystem mark"
    assert answer[2] == "1"  # EPERM: the caller goes on without this source


def test_each_create_rename_and_delete_is_named_by_the_pid_of_the_process_that_did_it(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    watcher = watch(tmp_path)
    a, b, d = tmp_path / "a", tmp_path / "b", tmp_path / "d"
    touch = op("touch", str(a))
    mv = op("mv", str(a), str(b))
    rm = op("rm", str(b))
    mkdir = op("mkdir", str(d))
    rmdir = op("rmdir", str(d))
    expected = [
        (a, "created", touch),
        (a, "moved_out", mv),
        (b, "moved_in", mv),
        (b, "deleted", rm),
        (d, "created", mkdir),
        (d, "deleted", rmdir),
    ]
    for path, action, pid in expected:
        found = seen(watcher, path, action)
        assert found == Access(pid, str(path), action, found.timestamp_us if found else 0)
    # Without a filter the latest thing that happened to each path comes back.
    assert watcher.lookup(str(a)) == watcher.lookup(str(a), actions={"moved_out"})
    assert watcher.lookup(str(b)) == watcher.lookup(str(b), actions={"deleted"})
    assert watcher.lookup(str(tmp_path / "never")) is None


def test_each_write_is_named_by_the_pid_of_the_process_that_closed_it(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    # The writer, not the creator: a file made by one process and appended to by another
    # names each; a write to a file that existed before the watcher started too.
    before = tmp_path / "before"
    before.write_text("x")
    watcher = watch(tmp_path)
    f = tmp_path / "f"
    creator = op("sh", "-c", f"echo a > {f}")
    first = seen(watcher, f, "closed_write")
    assert first is not None and first.pid == creator
    appender = op("sh", "-c", f"echo b >> {f}")
    second = wait_until(
        lambda: (
            a
            if (a := watcher.lookup(str(f), actions={"closed_write"})) and a.pid != creator
            else None
        )
    )
    assert second is not None and second.pid == appender
    writer = op("sh", "-c", f"echo c >> {before}")
    found = seen(watcher, before, "closed_write")
    assert found is not None and found.pid == writer
    # A read-only open and close is not a write.
    op("cat", str(tmp_path / "before"))
    assert watcher.lookup(str(before), actions={"closed_write"}) == found


def test_the_process_is_described_as_it_was_when_its_event_was_read(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    watcher = watch(tmp_path)
    target = tmp_path / "made"
    # The child stays alive until its event has been read, so its snapshot is certain.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys\nos.mkdir(sys.argv[1])\nprint(os.getpid(), flush=True)\n"
            "sys.stdin.read()\n",
            str(target),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        found = seen(watcher, target, "created")
        assert found is not None and found.pid == pid
    finally:
        child.communicate("", timeout=5)
    info = watcher.process_info(pid)
    assert info is not None
    name, uid, ppid = info
    assert name.startswith("python") and uid == os.geteuid() and ppid == os.getpid()
    assert watcher.process_info(1 << 30) is None


def test_paths_outside_the_watched_tree_are_not_cached(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    inside, beside, other = tmp_path / "rnd", tmp_path / "rnd-old", tmp_path / "home"
    for d in (inside, beside, other):
        d.mkdir()
    watcher = watch(inside)
    # Same filesystem, so the kernel reports all of them; rnd-old shares rnd's prefix but not
    # its component. The inside one is last: once it is seen, the others were read.
    op("touch", str(beside / "f"), str(other / "f"))
    op("mkdir", str(other / "sub"))
    op("mv", str(other / "sub"), str(other / "sub2"))
    pid = op("touch", str(inside / "f"))
    found = seen(watcher, inside / "f", "created")
    assert found is not None and found.pid == pid
    for path in (beside / "f", other / "f", other / "sub", other / "sub2"):
        assert watcher.lookup(str(path)) is None
    assert watcher.stats()["outside_skipped"] >= 4


def test_the_agents_own_changes_from_any_thread_are_not_attributed(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    watcher = watch(tmp_path)
    mine = tmp_path / "marker"

    def agent_work() -> None:
        mine.write_text("x")
        mine.rename(tmp_path / "marker2")
        (tmp_path / "marker2").unlink()
        (tmp_path / "state").mkdir()
        (tmp_path / "state").rmdir()

    thread = threading.Thread(target=agent_work)
    thread.start()
    thread.join()
    pid = op("touch", str(tmp_path / "theirs"))
    found = seen(watcher, tmp_path / "theirs", "created")
    assert found is not None and found.pid == pid
    for path in (mine, tmp_path / "marker2", tmp_path / "state"):
        assert watcher.lookup(str(path)) is None
    # At least one per name: the kernel merges a pid's queued events on one name into one.
    assert watcher.stats()["own_events_skipped"] >= 3


def test_a_directory_renamed_after_its_handle_was_cached_is_followed_to_its_new_name(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    (tmp_path / "proj" / "deep").mkdir(parents=True)
    for name in ("proj/f", "proj/deep/g"):
        (tmp_path / name).write_text("x")
    watcher = watch(tmp_path)  # proj and proj/deep are cached by the walk at start
    old, new = tmp_path / "proj", tmp_path / "proj2"
    mv = op("mv", str(old), str(new))
    rm = op("rm", str(new / "f"), str(new / "deep" / "g"))
    for path, action, pid in (
        (old, "moved_out", mv),
        (new, "moved_in", mv),
        (new / "f", "deleted", rm),
        (new / "deep" / "g", "deleted", rm),
    ):
        found = seen(watcher, path, action)
        assert found is not None and (found.pid, found.path) == (pid, str(path))
    assert watcher.lookup(str(old / "f")) is None
    assert watcher.lookup(str(old / "deep" / "g")) is None


def test_a_tree_removed_before_the_reader_catches_up_is_attributed_file_by_file(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    # The tree exists before start, so the walk cached every directory's handle: the deletes
    # are placed although every directory is gone when they are read.
    tree = tmp_path / "rnd"
    files = [tree / f"d{i}" / f"s{j}" / "f" for i in range(3) for j in range(3)]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    watcher = watch(tmp_path)
    with Held(watcher):
        rm = op("rm", "-rf", str(tree))
    for path in [*files, tree / "d0" / "s0", tree / "d2", tree]:
        found = seen(watcher, path, "deleted")
        assert found is not None and found.pid == rm, path


def test_a_directory_made_renamed_and_removed_before_the_reader_catches_up(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher], mode: str, records: list[Any]
) -> None:
    watcher = watch(tmp_path)
    d, e = tmp_path / "d", tmp_path / "e"
    with Held(watcher):
        mkdir = op("mkdir", str(d))
        touch = op("touch", str(d / "x"))
        mv = op("mv", str(d), str(e))
        rm = op("rm", str(e / "x"))
        rmdir = op("rmdir", str(e))
    # Entries of the tree's own top directory are placed either way.
    for path, action, pid in (
        (d, "created", mkdir),
        (d, "moved_out", mv),
        (e, "moved_in", mv),
        (e, "deleted", rmdir),
    ):
        found = seen(watcher, path, action)
        assert found is not None and found.pid == pid, (path, action)
    if mode == "rename":
        # The mkdir event carries the new directory's handle and the rename both names: the
        # cache follows d to e in queue order, with no syscall for a directory long gone.
        for path, action, pid in ((d / "x", "created", touch), (e / "x", "deleted", rm)):
            found = seen(watcher, path, action)
            assert found is not None and found.pid == pid, (path, action)
        assert watcher.stats()["handles_unresolved"] == 0
    else:
        # Documented limitation of the pre-5.17 fallback: no child handle, so a directory made
        # after start is known only by resolving its handle, and it is gone. Both events in it
        # are lost, and said so.
        assert watcher.lookup(str(d / "x")) is None and watcher.lookup(str(e / "x")) is None
        assert watcher.stats()["handles_unresolved"] >= 2
        watcher.stop()  # reports the held-back count
        losses = [
            r
            for r in health(records, "event_loss")
            if r["event"]["reason"] == "fanotify_dirs_unresolved"
        ]
        assert sum(r["exfilwatch"]["health"]["events"] for r in losses) >= 2


def test_a_directory_outside_removed_before_the_reader_catches_up_is_no_loss_in_rename_mode(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher], mode: str, records: list[Any]
) -> None:
    build, inside = tmp_path / "build", tmp_path / "rnd"
    (build / "obj").mkdir(parents=True)
    (build / "obj" / "a.o").write_text("x")
    inside.mkdir()
    watcher = watch(inside)
    with Held(watcher):
        op("rm", "-rf", str(build))
    pid = op("touch", str(inside / "after"))
    found = seen(watcher, inside / "after", "created")
    assert found is not None and found.pid == pid
    stats = watcher.stats()
    watcher.stop()
    unresolved = [
        r
        for r in health(records, "event_loss")
        if r["event"]["reason"] == "fanotify_dirs_unresolved"
    ]
    if mode == "rename":
        # Every directory of the tree is cached, so a handle that cannot be resolved was
        # elsewhere: a build's temporary directory is not reported as a loss.
        assert stats["dirs_complete"] is True
        assert stats["handles_gone_outside"] >= 1 and stats["handles_unresolved"] == 0
        assert unresolved == []
    else:
        # Without child handles the cache cannot be known complete: the event is a loss.
        assert stats["dirs_complete"] is False and stats["handles_unresolved"] >= 1
        assert sum(r["exfilwatch"]["health"]["events"] for r in unresolved) >= 1


def test_a_directory_moved_in_from_outside_is_watched_under_its_new_name(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    inside, outside = tmp_path / "rnd", tmp_path / "downloads"
    (outside / "pkg" / "sub").mkdir(parents=True)
    inside.mkdir()
    watcher = watch(inside)
    # Seen (and cached as not mattering) while outside.
    op("touch", str(outside / "pkg" / "sub" / "before"))
    mv = op("mv", str(outside / "pkg"), str(inside / "pkg"))
    found = seen(watcher, inside / "pkg", "moved_in")
    assert found is not None and found.pid == mv
    touch = op("touch", str(inside / "pkg" / "sub" / "after"))
    found = seen(watcher, inside / "pkg" / "sub" / "after", "created")
    assert found is not None and found.pid == touch
    assert watcher.lookup(str(outside / "pkg" / "sub" / "before")) is None


def test_update_marks_a_new_filesystem_and_unmarks_one_no_longer_watched(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    disk, mnt = tmp_path / "disk", tmp_path / "mnt"
    disk.mkdir()
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "fandirs", str(mnt)], check=True)
    try:
        watcher = watch(disk, disk / "again")  # two roots, one filesystem: one mark
        assert watcher.stats()["filesystems_marked"] == 1
        op("touch", str(mnt / "before"))
        watcher.update([str(disk), str(mnt)])
        assert watcher.stats()["filesystems_marked"] == 2
        pid = op("touch", str(mnt / "after"))
        found = seen(watcher, mnt / "after", "created")
        assert found is not None and found.pid == pid
        assert watcher.lookup(str(mnt / "before")) is None
        watcher.update([str(mnt)])
        stats = watcher.stats()
        assert (stats["filesystems_marked"], stats["mark_errors"]) == (1, {})
        # Nothing holds the tmpfs open while idle: it can be unmounted under the watcher.
        subprocess.run(["umount", str(mnt)], check=True)
        assert watcher.stats()["running"] is True
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def test_a_tree_reached_through_a_symlink_is_found_by_either_spelling(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    watcher = watch(link)
    pid = op("touch", str(link / "f"))
    by_link = seen(watcher, link / "f", "created")
    assert by_link is not None and by_link.pid == pid and by_link.path == str(real / "f")
    assert watcher.lookup(str(real / "f"), actions={"created"}) == by_link


def test_the_cache_holds_no_more_paths_than_cache_size_nor_older_than_the_window(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    watcher = watch(tmp_path, cache_size=50, window_s=0.5)
    names = [str(tmp_path / f"f{i:03d}") for i in range(300)]
    pid = op("touch", *names)
    last = seen(watcher, tmp_path / "f299", "created")
    assert last is not None and last.pid == pid
    assert watcher.stats()["cache_size"] <= 50
    assert watcher.lookup(str(tmp_path / "f000")) is None  # the oldest were evicted
    # touch's close comes after its create, in the same read or (on a busy machine) a later one
    closed = seen(watcher, tmp_path / "f299", "closed_write")
    assert closed is not None and closed.timestamp_us >= last.timestamp_us
    newest = watcher.lookup(str(tmp_path / "f299"))
    assert newest is not None and newest.timestamp_us == closed.timestamp_us
    assert watcher.lookup(str(tmp_path / "f299"), since_us=newest.timestamp_us + 1) is None
    assert wait_until(lambda: watcher.lookup(str(tmp_path / "f299")) is None or None, 2.0)


@pytest.fixture
def small_queue() -> Iterator[Callable[[], None]]:
    """fs.fanotify.max_queued_events lowered to 16; the kernel reads it only at fanotify_init,
    so the test restores it (the returned callable) as soon as its group exists."""
    if os.geteuid() != 0 or not QUEUE_KNOB.exists():
        pytest.skip("needs root and fs.fanotify.max_queued_events (Linux 5.13+)")
    old = QUEUE_KNOB.read_text()

    def restore() -> None:
        QUEUE_KNOB.write_text(old)

    QUEUE_KNOB.write_text("16")
    try:
        yield restore
    finally:
        restore()


def test_a_queue_overflow_is_one_event_loss_record_per_interval(
    tmp_path: Path,
    small_queue: Callable[[], None],
    watch: Callable[..., DirEventsWatcher],
    records: list[dict[str, Any]],
) -> None:
    watcher = watch(tmp_path)
    small_queue()
    with Held(watcher):
        op("touch", *(str(tmp_path / f"f{i}") for i in range(100)))
    # Only overflow records: on a busy host, moves mode may report other losses meanwhile.
    loss = wait_until(
        lambda: (
            [
                r
                for r in health(records, "event_loss")
                if r["event"]["reason"] == "fanotify_dirs_overflow"
            ]
            or None
        )
    )
    assert loss is not None
    (first,) = loss
    data = first["exfilwatch"]["health"]
    assert data["source"] == "fanotify_dirs" and data["overflows"] >= 1
    assert data["max_queued_events"] == 16 and "inferred" in data["hint"]
    assert watcher.stats()["overflows"] >= 1
    watcher.stop()
    # Overflows held back by the rate limit are reported at the latest at stop.
    reported = sum(
        r["exfilwatch"]["health"]["overflows"]
        for r in health(records, "event_loss")
        if r["event"]["reason"] == "fanotify_dirs_overflow"
    )
    assert reported == watcher.stats()["overflows"]


def test_stop_within_a_second_leaves_no_thread_and_no_fd(
    tmp_path: Path, watch: Callable[..., DirEventsWatcher]
) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    watcher = watch(tmp_path)
    assert len(fanotify_fds()) == 1
    assert any(t.name == "fanotify-dirs-reader" for t in threading.enumerate())
    # Stop while a burst is being read: the reader must not finish the burst first.
    burst = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfor i in range(5000):\n    open(f'{sys.argv[1]}/f{i}', 'w').close()\n",
            str(tmp_path),
        ]
    )
    try:
        assert wait_until(lambda: watcher.stats()["accesses_cached"] or None, 15)
        t0 = time.monotonic()
        watcher.stop()
        assert time.monotonic() - t0 < 1.0
    finally:
        burst.wait(30)
    assert not any(t.name == "fanotify-dirs-reader" for t in threading.enumerate())
    assert fanotify_fds() == []
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert watcher.stats()["running"] is False
    watcher.stop()  # a second stop is harmless


def test_the_watcher_keeps_the_component_contract(tmp_path: Path) -> None:
    watcher = DirEventsWatcher([str(tmp_path)], report=lambda r: None)
    assert isinstance(watcher, Component) and watcher.name == "fanotify_dirs"
    watcher.stop()  # before start: harmless
    watcher.start()
    watcher.stop()
    watcher.stop()
    assert watcher.stats()["running"] is False


def test_the_constructor_rejects_an_empty_cache_and_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="cache sizes"):
        DirEventsWatcher(["/tmp"], report=lambda r: None, dir_cache_size=0)
    with pytest.raises(ValueError, match="mode"):
        DirEventsWatcher(["/tmp"], report=lambda r: None, mode="inotify")
