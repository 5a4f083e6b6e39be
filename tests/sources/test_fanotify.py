"""The fanotify reader on real files: who touched what, what it skips, and what it cleans up."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sources import fanotify
from agent.sources.fanotify import Access, FanotifyWatcher, _mnt_id, _mount_points, available

USABLE, WHY_NOT = available()
pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fanotify is Linux-only"),
    pytest.mark.skipif(not USABLE, reason=f"fanotify unavailable here: {WHY_NOT}"),
]

# A child that prints its pid first, so the test knows whom to expect, then runs its body.
CHILD = "import os, sys\nprint(os.getpid(), flush=True)\n"


def run_child(body: str, *args: str) -> int:
    """Runs a python child to completion; returns its pid."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD + body, *args], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


def wait_for(
    watcher: FanotifyWatcher, path: Path, timeout: float = 5.0, **kw: object
) -> Access | None:
    deadline = time.monotonic() + timeout
    while True:
        found = watcher.lookup(str(path), **kw)  # type: ignore[arg-type]
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


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


@pytest.fixture
def watch(records: list[dict[str, Any]]) -> Iterator[Callable[..., FanotifyWatcher]]:
    """Starts watchers that report into `records`, and always stops them."""
    started: list[FanotifyWatcher] = []

    def start(*paths: Path, **kw: object) -> FanotifyWatcher:
        kw.setdefault("report", records.append)
        watcher = FanotifyWatcher([str(p) for p in paths], **kw)  # type: ignore[arg-type]
        watcher.start()
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.stop()


def test_available_says_yes_as_root_and_why_not_without_cap_sys_admin() -> None:
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
            os.write(w, f"{ok}|{why}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        answer = fh.read()
    os.waitpid(pid, 0)
    assert answer.startswith("False|needs root")


def test_a_python_child_reading_and_writing_is_named_by_pid_and_action_within_a_second(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    src, dst = tmp_path / "design.v", tmp_path / "copy.v"
    src.write_text("module top; endmodule\n")
    watcher = watch(tmp_path)
    pid = run_child(
        "data = open(sys.argv[1]).read()\nopen(sys.argv[2], 'w').write(data)\n", str(src), str(dst)
    )
    read = wait_for(watcher, src, timeout=1.0, actions={"closed_nowrite"})
    wrote = wait_for(watcher, dst, timeout=1.0, actions={"closed_write"})
    assert read is not None and (read.pid, read.path) == (pid, str(src))
    assert wrote is not None and wrote.pid == pid and wrote.path == str(dst)
    # Without a filter the latest thing that happened to each file comes back.
    latest_src = watcher.lookup(str(src))
    latest_dst = watcher.lookup(str(dst))
    assert latest_src is not None and latest_src.action == "closed_nowrite"
    assert latest_dst is not None and latest_dst.action == "closed_write"
    opened = watcher.lookup(str(dst), actions={"opened"})
    assert opened is not None and opened.pid == pid


def test_shell_tools_are_named_by_their_own_pids(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    src, dst, pidfile = tmp_path / "secret.txt", tmp_path / "out.txt", tmp_path / "cat.pid"
    src.write_text("x" * 100)
    watcher = watch(tmp_path)
    # cat runs as the shell's child; the shell itself opens out.txt for the redirection.
    script = f"cat {src} > /dev/null & echo $! > {pidfile}; wait; echo x > {dst}"
    shell = subprocess.Popen(["sh", "-c", script])
    assert shell.wait(5) == 0
    cat_pid = int(pidfile.read_text())
    read = wait_for(watcher, src, timeout=1.0, actions={"closed_nowrite"})
    wrote = wait_for(watcher, dst, timeout=1.0, actions={"closed_write"})
    assert read is not None and read.pid == cat_pid
    assert wrote is not None and wrote.pid == shell.pid


def test_a_writer_that_keeps_the_file_open_is_seen_modifying_it(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    log = tmp_path / "log.txt"
    watcher = watch(tmp_path)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD + "fh = open(sys.argv[1], 'w')\nfh.write('a')\nfh.flush()\n"
            "print('wrote', flush=True)\nsys.stdin.read()\nfh.close()\n",
            str(log),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        assert child.stdout.readline().strip() == "wrote"
        seen = wait_for(watcher, log, actions={"modified"})
        assert seen is not None and seen.pid == pid
        assert watcher.lookup(str(log)) == seen  # the latest thing that happened to it
    finally:
        child.communicate("", timeout=5)
    closed = wait_for(watcher, log, actions={"closed_write"})
    assert closed is not None and closed.pid == pid


def test_files_outside_the_watched_trees_are_not_cached(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    inside, beside, other = tmp_path / "rnd", tmp_path / "rnd-old", tmp_path / "home"
    for d in (inside, beside, other):
        d.mkdir()
    watcher = watch(inside)
    # Same mount, so the kernel reports all three; rnd-old shares rnd's prefix but not its
    # component. The file inside is written last: once it is seen, the others were read.
    body = "for p in sys.argv[1:]:\n    open(p, 'w').write('x')\n"
    pid = run_child(body, str(beside / "f"), str(other / "f"), str(inside / "f"))
    seen = wait_for(watcher, inside / "f")
    assert seen is not None and seen.pid == pid
    assert watcher.lookup(str(beside / "f")) is None
    assert watcher.lookup(str(other / "f")) is None
    assert watcher.stats()["outside_skipped"] >= 2


def test_the_agents_own_reads_and_writes_from_any_thread_are_skipped(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    mine, theirs = tmp_path / "marker", tmp_path / "theirs"
    watcher = watch(tmp_path)
    mine.write_text("agent marker")
    reader = threading.Thread(target=mine.read_text)
    reader.start()
    reader.join()
    pid = run_child("open(sys.argv[1], 'w').write('x')\n", str(theirs))
    seen = wait_for(watcher, theirs)
    assert seen is not None and seen.pid == pid
    assert watcher.lookup(str(mine)) is None
    # At least one record: the kernel merges this pid's queued events on one file into one.
    assert watcher.stats()["own_events_skipped"] >= 1


def test_stop_within_half_a_second_leaves_no_thread_and_no_fanotify_fd(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    watcher = watch(tmp_path)
    assert len(fanotify_fds()) == 1
    assert any(t.name == "fanotify-reader" for t in threading.enumerate())
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
        # Once the reader has cached some of the burst it is busy with it: stop then.
        deadline = time.monotonic() + 15
        while watcher.stats()["accesses_cached"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert watcher.stats()["accesses_cached"] > 0
        t0 = time.monotonic()
        watcher.stop()
        assert time.monotonic() - t0 < 0.5
    finally:
        burst.wait(30)
    assert not any(t.name == "fanotify-reader" for t in threading.enumerate())
    assert fanotify_fds() == []
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert watcher.stats()["running"] is False
    watcher.stop()  # a second stop is harmless


def test_the_cache_holds_no_more_paths_than_cache_size(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    watcher = watch(tmp_path, cache_size=50)
    body = "for i in range(300):\n    open(f'{sys.argv[1]}/f{i:03d}', 'w').write('x')\n"
    pid = run_child(body, str(tmp_path))
    last = wait_for(watcher, tmp_path / "f299")
    assert last is not None and last.pid == pid
    stats = watcher.stats()
    assert stats["cache_size"] <= 50
    assert stats["accesses_cached"] >= 300
    # The least recently touched paths were evicted.
    assert watcher.lookup(str(tmp_path / "f000")) is None


def test_accesses_older_than_the_window_or_since_us_are_not_returned(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    target = tmp_path / "f"
    watcher = watch(tmp_path, window_s=0.3)
    run_child("open(sys.argv[1], 'w').write('x')\n", str(target))
    # The close is the child's last access; open and write may be read before it (a busy
    # machine splits them over reads), so the newest is looked up once the close is in.
    assert wait_for(watcher, target, actions={"closed_write"}) is not None
    seen = watcher.lookup(str(target))
    assert seen is not None
    assert watcher.lookup(str(target), since_us=seen.timestamp_us + 1) is None
    time.sleep(0.4)
    assert watcher.lookup(str(target)) is None


def test_a_file_unlinked_before_it_is_closed_keeps_its_name(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    target = tmp_path / "scratch"
    watcher = watch(tmp_path)
    # The close comes after the unlink, so its event fd reads back as "<path> (deleted)".
    body = "fh = open(sys.argv[1], 'w')\nfh.write('x')\nos.unlink(sys.argv[1])\nfh.close()\n"
    pid = run_child(body, str(target))
    closed = wait_for(watcher, target, actions={"closed_write"})
    assert closed is not None and closed.pid == pid and closed.path == str(target)


def test_a_tree_reached_through_a_symlink_is_found_by_either_spelling(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    watcher = watch(link)
    pid = run_child("open(sys.argv[1], 'w').write('x')\n", str(link / "f"))
    by_link = wait_for(watcher, link / "f")
    assert by_link is not None and by_link.pid == pid and by_link.path == str(real / "f")
    assert watcher.lookup(str(real / "f")) == by_link


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs mount, always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "fanotest", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_update_marks_a_new_mount_and_unmarks_one_no_longer_watched(
    tmp_path: Path, tmpfs: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    watcher = watch(disk)
    assert watcher.stats()["mounts_marked"] == 1
    write = "open(sys.argv[1], 'w').write('x')\n"
    run_child(write, str(tmpfs / "before"))
    watcher.update([str(disk), str(tmpfs)])
    assert watcher.stats()["mounts_marked"] == 2
    pid = run_child(write, str(tmpfs / "after"))
    seen = wait_for(watcher, tmpfs / "after")
    assert seen is not None and seen.pid == pid
    # The tmpfs was not marked when "before" was written: nothing could have seen it.
    assert watcher.lookup(str(tmpfs / "before")) is None
    watcher.update([str(tmpfs)])
    stats = watcher.stats()
    assert stats["mounts_marked"] == 1 and stats["mark_errors"] == {}
    pid = run_child(write, str(tmpfs / "still"))
    seen = wait_for(watcher, tmpfs / "still")
    assert seen is not None and seen.pid == pid


def test_a_mount_replaced_under_a_watched_tree_is_marked_again_on_update(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    target = tmp_path / "usb stick"  # a space, which mountinfo writes as an octal escape
    target.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "fanotest", str(target)]
    subprocess.run(mount, check=True)
    try:
        watcher = watch(target)
        subprocess.run(["umount", str(target)], check=True)
        # The old mount's mark went with it; the new mount may even reuse its id.
        subprocess.run(mount, check=True)
        watcher.update([str(target)])
        assert watcher.stats()["mounts_marked"] == 1
        pid = run_child("open(sys.argv[1], 'w').write('x')\n", str(target / "f"))
        seen = wait_for(watcher, target / "f")
        assert seen is not None and seen.pid == pid
        fd = os.open(target, os.O_RDONLY)
        try:
            assert _mount_points(_mnt_id(fd)) == [str(target)]
        finally:
            os.close(fd)
        watcher.update([str(tmp_path / "elsewhere")])
        stats = watcher.stats()
        # The tmpfs is unmarked; only the disk's mount, where "elsewhere" will be, is left.
        assert (stats["mounts_marked"], stats["mark_errors"], stats["errors"]) == (1, {}, 0)
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_tree_that_does_not_exist_yet_is_watched_through_its_mount(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher]
) -> None:
    later = tmp_path / "later" / "rnd"
    watcher = watch(later)
    assert watcher.stats()["mounts_marked"] == 1
    body = "os.makedirs(os.path.dirname(sys.argv[1]))\nopen(sys.argv[1], 'w').write('x')\n"
    pid = run_child(body, str(later / "f"))
    seen = wait_for(watcher, later / "f")
    assert seen is not None and seen.pid == pid


QUEUE_KNOB = Path("/proc/sys/fs/fanotify/max_queued_events")


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


def test_a_queue_overflow_is_an_event_loss_record_and_a_failing_reporter_is_survived(
    tmp_path: Path, small_queue: Callable[[], None]
) -> None:
    records: list[dict[str, Any]] = []

    def report(rec: dict[str, Any]) -> None:
        records.append(rec)
        raise RuntimeError("sink bug")

    watcher = FanotifyWatcher([str(tmp_path)], report=report)
    # Hold the reader in its first batch so the 16-event queue fills up behind it: a real
    # overflow, the kernel's own FAN_Q_OVERFLOW event.
    release = threading.Event()
    handle = watcher._handle

    def slow_handle(buf: bytes) -> None:
        release.wait(10)
        handle(buf)

    watcher._handle = slow_handle  # type: ignore[method-assign]
    try:
        watcher.start()
        small_queue()
        body = "for i in range(100):\n    open(f'{sys.argv[1]}/f{i}', 'w').write('x')\n"
        run_child(body, str(tmp_path))
        release.set()
        deadline = time.monotonic() + 10
        while not health(records, "event_loss") and time.monotonic() < deadline:
            time.sleep(0.01)
        (loss, *_) = health(records, "event_loss")
        assert loss["event"]["reason"] == "fanotify_overflow"
        assert loss["event"]["kind"] == "metric"
        data = loss["exfilwatch"]["health"]
        assert data["source"] == "fanotify" and data["overflows"] >= 1
        assert data["max_queued_events"] == 16
        assert "inferred" in data["hint"]
        stats = watcher.stats()
        assert stats["overflows"] >= 1
        assert stats["errors"] >= 1 and "sink bug" in stats["last_error"]
        # The reader goes on after the overflow and the reporter's exception. Its queue holds
        # 16 events for its whole life, and on a busy machine other writers on the same mount
        # overflow it again: a write is retried until one is not lost (each attempt is real).
        deadline = time.monotonic() + 20
        while True:
            pid = run_child("open(sys.argv[1], 'w').write('x')\n", str(tmp_path / "after"))
            seen = wait_for(watcher, tmp_path / "after", timeout=1.0)
            if (seen is not None and seen.pid == pid) or time.monotonic() > deadline:
                break
        assert seen is not None and seen.pid == pid
        assert watcher.stats()["running"] is True
    finally:
        release.set()
        watcher.stop()
    # Overflows held back by the rate limit are reported at the latest at stop: every one
    # counted is in a record.
    reported = sum(r["exfilwatch"]["health"]["overflows"] for r in health(records, "event_loss"))
    assert reported == watcher.stats()["overflows"]


def test_a_mount_that_cannot_be_marked_is_a_source_error_reported_once_a_minute(
    tmp_path: Path,
    watch: Callable[..., FanotifyWatcher],
    records: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No mount here refuses a mark, and exhausting fs.fanotify.max_user_marks would break every
    # other fanotify user on the host: the kernel's refusal is injected at the syscall wrapper,
    # on a real group.
    def refuse(fan_fd: int, flags: int, dir_fd: int) -> None:
        raise OSError(errno.ENOSPC, "fanotify_mark: No space left on device")

    monkeypatch.setattr(fanotify, "_fanotify_mark", refuse)
    watcher = watch(tmp_path)
    stats = watcher.stats()
    assert stats["running"] is True and stats["mounts_marked"] == 0
    assert list(stats["mark_errors"]) == [str(tmp_path)]
    watcher.update([str(tmp_path)])
    watcher.update([str(tmp_path)])
    (error,) = health(records, "source_error")
    assert error["event"]["reason"] == "ENOSPC"
    data = error["exfilwatch"]["health"]
    assert (data["source"], data["stage"], data["root"]) == ("fanotify", "mark", str(tmp_path))
    assert "No space left" in data["message"]
    monkeypatch.undo()
    watcher.update([str(tmp_path)])
    assert (watcher.stats()["mounts_marked"], watcher.stats()["mark_errors"]) == (1, {})
    assert len(health(records, "source_error")) == 1


def test_a_watcher_without_trouble_reports_nothing(
    tmp_path: Path, watch: Callable[..., FanotifyWatcher], records: list[dict[str, Any]]
) -> None:
    watcher = watch(tmp_path)
    pid = run_child("open(sys.argv[1], 'w').write('x')\n", str(tmp_path / "f"))
    seen = wait_for(watcher, tmp_path / "f")
    assert seen is not None and seen.pid == pid
    watcher.stop()
    assert records == []


def test_the_watcher_keeps_the_component_contract(tmp_path: Path) -> None:
    from agent.components import Component

    watcher = FanotifyWatcher([str(tmp_path)], report=lambda r: None)
    assert isinstance(watcher, Component) and watcher.name == "fanotify"
    watcher.stop()  # before start: harmless
    watcher.start()
    watcher.stop()
    watcher.stop()
    assert watcher.stats()["running"] is False


def test_the_constructor_rejects_an_empty_cache() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        FanotifyWatcher(["/tmp"], report=lambda r: None, cache_size=0)
