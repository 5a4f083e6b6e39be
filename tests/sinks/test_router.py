"""A sink that fails keeps its lines, says so in health records, and gets them back in order."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.events import dumps
from agent.health import record
from agent.sinks import FileSink, Router
from tests.conftest import Collector

HEALTH = frozenset({"health"})
DEV_FULL = "/dev/full"  # every write fails with ENOSPC; a real device, no root needed

needs_tmpfs = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("mount", "umount")),
    reason="needs root and mount/umount to mount a small tmpfs (a filesystem that fills up)",
)


class Clock:
    """The router's monotonic clock, moved by the test: backoff and rate limits without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def alerts(first: int, count: int, pad: int = 0) -> list[str]:
    return [
        dumps({"event": {"kind": "alert", "dataset": "exfilwatch.alert"}, "n": n, "pad": "x" * pad})
        for n in range(first, first + count)
    ]


def lines_of(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"partial line at the end of {path}"
    return [json.loads(line) for line in text.splitlines()]


def alert_numbers(path: Path) -> list[int]:
    return [r["n"] for r in lines_of(path) if r["event"]["kind"] == "alert"]


def actions(path: Path) -> list[str]:
    return [r["event"]["action"] for r in lines_of(path) if "action" in r["event"]]


def full_file(tmp_path: Path) -> Path:
    """A sink path for `full`; unlinking it and reopening mends the sink."""
    path = tmp_path / "log" / "alerts.jsonl"
    path.parent.mkdir()
    return path


def full(sink: FileSink) -> FileSink:
    """Points the sink's descriptor at /dev/full: every write fails with ENOSPC until a reopen
    (a sink path that is a symlink to /dev/full is refused, see tests/hostile/test_sinks.py)."""
    fd = os.open(DEV_FULL, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(fd, sink.fileno(), inheritable=False)
    os.close(fd)
    return sink


def mend(router: Router, path: Path) -> None:
    path.unlink()
    router.reopen()


@contextlib.contextmanager
def tmpfs(target: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at `target` (made here): a filesystem that fills up. Always
    unmounted."""
    target.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target)], check=True
    )
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs."""
    with tmpfs(tmp_path / "fs", "64k") as target:
        yield target


def fill(filler: Path, leave: int = 0) -> None:
    """Writes until the filesystem is full, then gives `leave` bytes back."""
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)


@needs_tmpfs
def test_a_full_filesystem_is_a_sink_error_and_every_line_arrives_once_in_order_after(
    small_fs: Path,
) -> None:
    clock = Clock()
    collector = Collector()
    out = small_fs / "alerts.jsonl"
    router = Router(
        [(FileSink(str(out)), frozenset({"alert", "health"})), (collector, HEALTH)], clock=clock
    )
    try:
        router.write("alert", alerts(0, 10))
        filler = small_fs / "filler"
        fill(filler, leave=4096)
        before = out.read_bytes()

        router.write("alert", alerts(10, 100, pad=200))  # ~25 KiB: fills the page left, then fails
        (error,) = collector.health("sink_error")
        assert error["event"]["reason"] == "ENOSPC"
        assert error["exfilwatch"]["health"]["sink"] == f"file:{out}"
        assert error["exfilwatch"]["health"]["kind"] == "alert"
        assert error["exfilwatch"]["health"]["pending"] == 100
        assert error["exfilwatch"]["health"]["error"] == os.strerror(errno.ENOSPC)
        assert '"pad"' not in collector.lines[0], "a sink_error never carries the lines"
        assert out.read_bytes() == before, "the half-written batch was cut back"

        router.write("alert", alerts(110, 5))
        assert router.stats()[f"file:{out}"]["pending"] == 100 + 1 + 5  # the sink_error too
        filler.unlink()
        clock.now += 1.0
        assert router.retry() == 0

        records = lines_of(out)
        assert [r["n"] for r in records if "n" in r] == list(range(115)), "once each, in order"
        assert actions(out) == ["sink_error", "sink_recovered"]
        assert records[110]["event"]["action"] == "sink_error", "right after the failed batch"
        (recovered,) = collector.health("sink_recovered")
        assert recovered["exfilwatch"]["health"]["first_batch"] == 106
        assert recovered["exfilwatch"]["health"]["failures"] == 1
        assert router.stats()[f"file:{out}"]["pending"] == 0
    finally:
        router.close()


def events(first: int, count: int) -> list[str]:
    return [dumps({"event": {"kind": "event"}, "n": n}) for n in range(first, first + count)]


def test_a_backlog_keeps_the_order_of_each_kind_and_its_sink_error_comes_after_the_cause(
    tmp_path: Path,
) -> None:
    """Alerts and health come from the outbox in the order they were written; file events
    from the sink's own queue, in theirs (the two streams are not interleaved by time)."""
    clock = Clock()
    path = full_file(tmp_path)
    router = Router(
        [(full(FileSink(str(path))), frozenset({"alert", "health", "event"}))], clock=clock
    )
    try:
        router.write("event", events(0, 1))
        router.write("alert", alerts(1, 2500))  # more than one batch
        router.write("event", events(2501, 1))
        mend(router, path)
        router.write("alert", alerts(2502, 1))

        records = lines_of(path)
        numbered = [r["n"] for r in records if "n" in r]
        assert sorted(numbered) == list(range(2503)), "every line once"
        assert [n for n in numbered if n in (0, 2501)] == [0, 2501]
        assert [n for n in numbered if n not in (0, 2501)] == [*range(1, 2501), 2502]
        durable = [r for r in records if r["event"]["kind"] != "event"]
        assert [r["event"]["action"] for r in durable if "n" not in r] == [
            "sink_error",
            "sink_recovered",
        ]
        assert durable[0]["event"]["action"] == "sink_error", "the event's write failed first"
    finally:
        router.close()


def test_file_events_owed_past_the_cap_drop_the_oldest_with_an_event_loss_record(
    tmp_path: Path,
) -> None:
    """File events wait in memory (alerts and health wait in the outbox, tests/sinks/
    test_outbox.py): past the cap the oldest go, counted and reported."""
    clock = Clock()
    collector = Collector()
    path = full_file(tmp_path)
    router = Router(
        [(full(FileSink(str(path))), frozenset({"event"})), (collector, HEALTH)],
        pending_caps={"event": 5},
        clock=clock,
    )
    try:
        for first in (0, 3, 6):
            router.write("event", events(first, 3))
        (loss,) = collector.health("event_loss")
        assert loss["event"]["reason"] == "sink_backlog_full"
        health = loss["exfilwatch"]["health"]
        assert {k: health[k] for k in ("sink", "kind", "dropped", "dropped_total", "cap")} == {
            "sink": f"file:{path}",
            "kind": "event",
            "dropped": 1,
            "dropped_total": 1,
            "cap": 5,
        }
        clock.now += 10.0
        router.write("event", events(9, 1))
        later = collector.health("event_loss")[-1]["exfilwatch"]["health"]
        assert (later["dropped"], later["dropped_total"]) == (4, 5), "a running count"
        assert router.stats()[f"file:{path}"]["dropped"] == 5

        mend(router, path)
        assert router.retry() == 0
        assert [r["n"] for r in lines_of(path)] == [5, 6, 7, 8, 9], "the newest, in order"
        recovered = collector.health("sink_recovered")[0]["exfilwatch"]["health"]
        assert (recovered["first_batch"], recovered["dropped"]) == (5, 5)
    finally:
        router.close()


def test_sink_errors_are_one_per_sink_per_ten_seconds_with_a_running_count(
    tmp_path: Path,
) -> None:
    clock = Clock()
    collector = Collector()
    path = full_file(tmp_path)
    router = Router(
        [(full(FileSink(str(path))), frozenset({"alert"})), (collector, HEALTH)], clock=clock
    )
    try:
        for _ in range(6):
            clock.now += 2.0  # failing writes, some of them due retries of the backlog
            router.write("alert", alerts(0, 1))
        assert len(collector.health("sink_error")) == 1
        clock.now += 10.0
        router.write("alert", alerts(0, 1))
        first, second = collector.health("sink_error")
        assert first["exfilwatch"]["health"]["failures"] == 1
        assert (
            second["exfilwatch"]["health"]["failures"]
            == router.stats()[f"file:{path}"]["errors"] - 1
        )
    finally:
        router.close()


def test_retry_backs_off_from_one_second_doubling_to_thirty_and_resets_on_success(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = full_file(tmp_path)
    sink = full(FileSink(str(path)))
    router = Router([(sink, frozenset({"alert"}))], clock=clock, jitter=0.0)
    name = f"file:{path}"

    def attempts_after(wait: float) -> int:
        clock.now += wait
        router.retry()
        return int(router.stats()[name]["errors"])

    try:
        router.write("alert", alerts(0, 1))
        assert router.stats()[name]["errors"] == 1
        gaps = []
        for _ in range(8):
            waited = 0.0
            before = router.stats()[name]["errors"]
            while attempts_after(0.25) == before:
                waited += 0.25
            gaps.append(waited + 0.25)
        assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
        router.write("alert", alerts(1, 1))
        assert router.stats()[name]["errors"] == 9, "a write behind a backlog waits its turn"

        mend(router, path)  # a reopen makes the retry due at once
        assert router.retry() == 0
        full(sink)
        router.write("alert", alerts(2, 1))
        assert attempts_after(0.75) == 10, "after a success the backoff starts at 1 s again"
        assert attempts_after(0.25) == 11
    finally:
        router.close()


def test_retries_are_jittered_between_half_and_all_of_the_backoff(tmp_path: Path) -> None:
    """Equal jitter: a fleet of agents whose collector came back does not retry in step."""
    clock = Clock()
    path = full_file(tmp_path)
    router = Router([(full(FileSink(str(path))), frozenset({"alert"}))], clock=clock)
    name = f"file:{path}"
    try:
        router.write("alert", alerts(0, 1))
        waits = []
        backoff = 1.0
        for _ in range(40):
            before = router.stats()[name]["errors"]
            waited = 0.0
            while router.stats()[name]["errors"] == before:
                clock.now += 0.05
                waited += 0.05
                router.retry()
            waits.append(waited / backoff)
            backoff = min(backoff * 2, 30.0)
        assert all(0.45 <= w <= 1.05 for w in waits), waits
        assert max(waits) - min(waits) > 0.1, "not all the same wait"
    finally:
        router.close()


def test_a_failed_reopen_is_a_sink_error_and_the_sink_keeps_writing_its_open_file(
    tmp_path: Path,
) -> None:
    collector = Collector()
    out = tmp_path / "log" / "alerts.jsonl"
    router = Router([(FileSink(str(out)), frozenset({"alert"})), (collector, HEALTH)])
    try:
        router.write("alert", alerts(0, 1))
        (tmp_path / "log").rename(tmp_path / "log.old")
        (tmp_path / "log").write_text("a file where the directory was\n")
        router.reopen()
        (error,) = collector.health("sink_error")
        assert error["event"]["reason"] == "EEXIST"
        assert error["exfilwatch"]["health"]["op"] == "reopen"
        router.write("alert", alerts(1, 1))
        assert alert_numbers(tmp_path / "log.old" / "alerts.jsonl") == [0, 1]
    finally:
        router.close()


def test_writers_on_several_threads_each_get_every_line_once_in_their_order(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = full_file(tmp_path)
    router = Router([(full(FileSink(str(path))), frozenset({"alert"}))], clock=clock)
    mended = threading.Event()

    def writer(t: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(200):
                if t == 0 and i == 100:
                    mend(router, path)
                    mended.set()
                router.write("alert", alerts(t * 1000 + i, 1))

        return run

    threads = [threading.Thread(target=writer(t), name=f"writer-{t}") for t in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=10)
        assert mended.is_set()
        assert router.retry() == 0
        seen = alert_numbers(path)
        assert sorted(seen) == sorted(t * 1000 + i for t in range(4) for i in range(200))
        for t in range(4):
            mine = [n for n in seen if n // 1000 == t]
            assert mine == sorted(mine)
    finally:
        router.close()


def test_sink_health_records_use_known_actions() -> None:
    assert record("sink_recovered", None)["log"]["level"] == "info"
