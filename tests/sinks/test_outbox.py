"""The durable outbox: stored before any sink is tried, gone only when every sink has it,
kept across restarts, capped with a report, and a full disk costs nothing but memory."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.events import dumps
from agent.health import record
from agent.sinks import FileSink, Router
from agent.sinks.outbox import Outbox
from tests.conftest import Collector
from tests.sinks.test_router import fill, needs_tmpfs, tmpfs

HEALTH = frozenset({"health"})
ALERT = frozenset({"alert"})


def alerts(first: int, count: int, severity: int = 73) -> list[str]:
    return [
        dumps({"event": {"kind": "alert", "id": f"a{n}", "severity": severity}, "n": n})
        for n in range(first, first + count)
    ]


def numbers(lines: Sequence[str]) -> list[int]:
    return [json.loads(x)["n"] for x in lines if '"n":' in x]


class Gate:
    """A sink that fails until opened, remembering every line it took."""

    def __init__(self, name: str = "gate") -> None:
        self.name = name
        self.lines: list[str] = []
        self.open = False
        self.lock = threading.Lock()

    def write(self, lines: Sequence[str]) -> None:
        with self.lock:
            if not self.open:
                raise ConnectionRefusedError(111, "Connection refused")
            self.lines.extend(lines)

    def close(self) -> None:
        pass


def wait(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def on_disk(outbox: Path) -> list[int]:
    """The record numbers (`n`) in the outbox's segment files, as another process sees them."""
    out = []
    for seg in sorted(outbox.glob("*.log")):
        for line in seg.read_text().splitlines():
            n = json.loads(line.split(" ", 4)[4]).get("n")
            if n is not None:
                out.append(n)
    return out


def test_records_are_on_disk_before_any_sink_is_tried_and_leave_when_every_sink_has_them(
    tmp_path: Path,
) -> None:
    box = tmp_path / "outbox"
    seen_on_disk: list[list[int]] = []

    class Peek(Gate):
        def write(self, lines: Sequence[str]) -> None:
            seen_on_disk.append(on_disk(box))
            super().write(lines)

    fast, slow = Peek("fast"), Gate("slow")
    fast.open = True
    router = Router(
        [(fast, ALERT), (slow, ALERT)],
        outbox=Outbox(str(box), segment_bytes=4096),
        retry_initial=0.01,
    )
    try:
        router.write("alert", alerts(0, 3))
        assert seen_on_disk[0] == [0, 1, 2], "stored before the first sink was tried"
        assert numbers(fast.lines) == [0, 1, 2]
        # The slow sink owes them; its sink_error is not kept: no sink here takes health.
        assert router.outbox.backlog() == 3, "the slow sink owes them"
        assert stat.S_IMODE(box.stat().st_mode) == 0o700
        assert {stat.S_IMODE(f.stat().st_mode) for f in box.iterdir()} == {0o600}
        router.write("alert", alerts(3, 100))  # past one segment's size
        router.write("alert", alerts(103, 1))  # so this one starts a second file
        assert len(list(box.glob("*.log"))) >= 2
        slow.open = True
        wait(lambda: router.retry() == 0, "the slow sink's backlog delivered")
        assert numbers(slow.lines) == list(range(104))
        assert router.outbox.backlog() == 0

        def swept() -> bool:
            router.outbox.retry()  # cursors are written, segments deleted, every 0.5 s at most
            return on_disk(box) in ([], [103])

        wait(swept, "done segments deleted")
        assert len(list(box.glob("*.log"))) <= 1
    finally:
        router.close()


def test_a_restart_delivers_what_a_sink_had_not_acknowledged_and_nothing_twice(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "outbox")
    up, down = Gate("up"), Gate("down")
    up.open = True
    router = Router([(up, ALERT), (down, ALERT)], outbox=Outbox(db))
    router.write("alert", alerts(0, 5))
    router.close()  # "down" never took them: they stay on disk

    up2, down2 = Gate("up"), Gate("down")
    up2.open = down2.open = True
    outbox = Outbox(db)
    assert outbox.recovered_at_start >= 5
    router = Router([(up2, ALERT), (down2, ALERT)], outbox=outbox)
    try:
        router.retry()
        assert numbers(down2.lines) == [0, 1, 2, 3, 4], "every alert, in order"
        assert numbers(up2.lines) == [], "the sink that had them gets none again"
        assert router.outbox.backlog() == 0
    finally:
        router.close()


def test_min_severity_and_kinds_filter_per_sink(tmp_path: Path) -> None:
    everything, high = Gate("all"), Gate("high")
    everything.open = high.open = True
    router = Router(
        [(everything, frozenset({"alert", "health"})), (high, frozenset({"alert", "health"}), 73)]
    )
    try:
        router.write("alert", alerts(0, 2, severity=21) + alerts(2, 2, severity=99))
        router.write("health", [dumps(record("agent_started"))])
        router.write("health", [dumps(record("source_error", "EIO"))])
        assert numbers(everything.lines) == [0, 1, 2, 3]
        assert len(everything.lines) == 6
        assert numbers(high.lines) == [2, 3]
        levels = [json.loads(x)["log"]["level"] for x in high.lines if '"log"' in x]
        assert levels == ["error"]
        assert router.outbox.backlog() == 0, "records a sink does not take do not hold the outbox"
    finally:
        router.close()


def test_only_at_the_cap_are_the_oldest_dropped_counted_and_reported(tmp_path: Path) -> None:
    down, collector = Gate("down"), Collector()
    outbox = Outbox(str(tmp_path / "outbox"), max_rows=50)
    router = Router([(down, ALERT), (collector, HEALTH)], outbox=outbox, retry_initial=0.01)
    try:
        router.write("alert", alerts(0, 40))
        assert not collector.health("event_loss"), "under the cap nothing goes"
        router.write("alert", alerts(40, 30))
        (loss,) = collector.health("event_loss")  # one report, however many appends dropped
        assert loss["event"]["reason"] == "outbox_full"
        dropped = outbox.stats()["dropped_total"]
        assert dropped >= 20
        assert loss["exfilwatch"]["health"]["dropped"] <= dropped
        down.open = True
        wait(lambda: router.retry() == 0, "the backlog delivered")
        got = numbers(down.lines)
        assert got == list(range(70 - len(got), 70)), "the newest, in order, once"
        assert len(got) + dropped >= 70
    finally:
        router.close()


def test_a_torn_or_damaged_outbox_loses_only_what_is_damaged_and_says_so(
    tmp_path: Path,
) -> None:
    """A kill -9 mid-write leaves half a line; someone's edit leaves lines that do not parse;
    cursors.json may be garbage. The next start keeps every good record and reports the rest."""
    box = tmp_path / "outbox"
    first = Router([(Gate("down"), ALERT)], outbox=Outbox(str(box)))
    first.write("alert", alerts(0, 5))
    first.close()
    (seg,) = box.glob("*.log")
    good = seg.read_text().splitlines()
    seg.write_text(good[0] + "\nnot a record\n" + "\n".join(good[1:]) + '\n7 alert 73 12.5 {"torn')
    (box / "cursors.json").write_text("{not json")
    down, collector = Gate("down"), Collector()
    down.open = True
    router = Router([(down, ALERT), (collector, HEALTH)], outbox=Outbox(str(box)))
    try:
        router.retry()
        assert numbers(down.lines) == [0, 1, 2, 3, 4], "every good record, once"
        reasons = {r["event"]["reason"] for r in collector.health("outbox_error")}
        assert reasons == {"damaged"}
        assert not seg.exists() or not seg.read_text().endswith("torn"), "the torn line is cut"
    finally:
        router.close()


def test_sinks_have_their_own_threads_so_a_stuck_sink_never_holds_up_the_writer(
    tmp_path: Path,
) -> None:
    release = threading.Event()

    class Stuck(Gate):
        def write(self, lines: Sequence[str]) -> None:
            release.wait(30)
            super().write(lines)

    stuck, fine = Stuck("stuck"), Gate("fine")
    stuck.open = fine.open = True
    router = Router(
        [(stuck, ALERT), (fine, ALERT)],
        outbox=Outbox(str(tmp_path / "outbox")),
        threaded=True,
    )
    router.start()
    try:
        began = time.monotonic()
        for n in range(100):
            router.write("alert", alerts(n, 1))
        assert time.monotonic() - began < 5.0, "the writer never waits for a sink"
        wait(lambda: len(fine.lines) == 100, "the healthy sink's alerts")
        assert numbers(fine.lines) == list(range(100))
        release.set()
        wait(lambda: len(stuck.lines) == 100, "the stuck sink's alerts, once it moves")
        assert numbers(stuck.lines) == list(range(100))
        wait(lambda: router.outbox.backlog() == 0, "an empty outbox")
    finally:
        release.set()
        router.close()


@pytest.fixture
def tiny_state(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs as state_dir: a disk that fills up."""
    with tmpfs(tmp_path / "state", "256k") as target:
        yield target


@needs_tmpfs
def test_a_full_state_disk_keeps_records_in_memory_reports_it_and_recovers(
    tiny_state: Path, tmp_path: Path
) -> None:
    out = tmp_path / "log" / "alerts.jsonl"
    down = Gate("down")
    outbox = Outbox(str(tiny_state / "outbox"))
    router = Router(
        [(FileSink(str(out)), frozenset({"alert", "health"})), (down, ALERT)],
        outbox=outbox,
        threaded=True,
        retry_initial=0.05,
        retry_max=0.2,
    )
    router.start()
    filler = tiny_state / "filler"
    try:
        router.write("alert", alerts(0, 10))
        fill(filler)
        for n in range(10, 400):
            router.write("alert", alerts(n, 1))
        assert outbox.stats()["disk_failing"], "the disk refused the outbox's writes"

        def file_records() -> list[dict[str, Any]]:
            """Complete lines only: the sink's thread may be mid-write."""
            text = out.read_text() if out.exists() else ""
            return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]

        wait(
            lambda: any(r["event"].get("action") == "outbox_error" for r in file_records()),
            "an outbox_error record in the sink",
        )
        (error,) = [r for r in file_records() if r["event"].get("action") == "outbox_error"]
        assert error["event"]["reason"] == "disk_full"
        wait(lambda: len(numbers([json.dumps(r) for r in file_records()])) == 400, "all alerts")

        os.unlink(filler)
        router.write("alert", alerts(400, 1))  # the next write takes the disk again
        wait(lambda: not outbox.stats()["disk_failing"], "the disk taken again")
        wait(
            lambda: any(r["event"].get("action") == "outbox_recovered" for r in file_records()),
            "an outbox_recovered record",
        )
        down.open = True
        wait(lambda: len(numbers(down.lines)) == 401, "the late sink gets every alert")
        assert numbers(down.lines) == list(range(401))
        wait(lambda: outbox.backlog() == 0, "an empty outbox")
        got = sorted(r["n"] for r in file_records() if "n" in r)
        assert got == list(range(401)), "once each in the file sink"
    finally:
        router.close()


def test_ids_never_go_back_after_a_restart_with_an_empty_outbox(tmp_path: Path) -> None:
    """Everything delivered and deleted, then a restart: new records are new to every sink."""
    db = str(tmp_path / "outbox")
    first = Gate("sink")
    first.open = True
    router = Router([(first, ALERT)], outbox=Outbox(db))
    router.write("alert", alerts(0, 5))
    router.close()
    again = Gate("sink")
    again.open = True
    router = Router([(again, ALERT)], outbox=Outbox(db))
    try:
        router.write("alert", alerts(5, 2))
        assert numbers(again.lines) == [5, 6]
    finally:
        router.close()


def test_records_no_sink_takes_are_not_kept_nor_owed(tmp_path: Path) -> None:
    # A raw-event log alone: alerts and health go to no sink. Kept in the outbox they would
    # be owed for ever (no sink acknowledges them), the consumer would retry them twice a
    # second (1.8% of a core on an idle agent, measured), and the outbox would fill up.
    events = Gate("events")
    events.open = True
    router = Router([(events, frozenset({"event"}))], outbox=Outbox(str(tmp_path / "box")))
    try:
        router.write("alert", alerts(0, 5))
        router.write("health", [dumps(record("heartbeat"))])
        router.write("event", [dumps({"event": {"kind": "event"}, "n": 99})])
        wait(lambda: numbers(events.lines) == [99], "the event delivered")
        assert router.owed() == 0
        assert router.outbox.backlog() == 0
        assert router.alerts == 5  # still counted as made
    finally:
        router.close()
