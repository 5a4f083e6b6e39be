"""The enrichment worker: content checks off the consumer's path, bounded, fair, never silent."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

from agent.enrich.destinations import Destinations, DestinationSettings
from agent.enrich.lineage import LineageIndex
from agent.enrich.worker import EnrichmentWorker, WorkerSettings
from agent.events import Event
from agent.pipeline import wait_until
from agent.sources.paths import compile_excludes


class Delivered:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[Event]) -> None:
        with self.lock:
            self.events.extend(events)

    def paths(self) -> list[str]:
        with self.lock:
            return [e.path for e in self.events]


def tagged_tree(tmp: Path, n: int = 5, size: int = 4096) -> tuple[Path, LineageIndex]:
    rnd = tmp / "rnd"
    rnd.mkdir()
    for i in range(n):
        (rnd / f"m{i}.v").write_bytes(bytes([i % 251]) * (size + i))
    index = LineageIndex()
    index.build([(str(rnd), compile_excludes(()), lambda d: ("rnd",))])
    return rnd, index


def landed(path: Path, owner: str = "1000", location: str = "staging") -> Event:
    st = path.stat()
    return Event(
        0,
        "closed_write",
        str(path),
        file_type="file",
        size=st.st_size,
        uid=owner,
        location=location,
    )


def worker_for(
    index: LineageIndex, delivered: Delivered, reports: list[dict[str, Any]], **settings: Any
) -> EnrichmentWorker:
    return EnrichmentWorker(
        Destinations(index, DestinationSettings()),
        WorkerSettings(**settings),
        reports.append,
        delivered,
    )


def test_a_copy_landing_outside_the_trees_comes_back_traced_to_its_origin(
    tmp_path: Path,
) -> None:
    rnd, index = tagged_tree(tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copy(rnd / "m3.v", stage / "notes.txt")
    delivered, reports = Delivered(), []
    worker = worker_for(index, delivered, reports)
    worker.start()
    try:
        assert worker.submit(landed(stage / "notes.txt"))
        assert wait_until(lambda: bool(delivered.events), timeout=10)
    finally:
        worker.stop()
    (event,) = delivered.events
    assert event.lineage_origin == str(rnd / "m3.v")
    assert event.lineage_tags == ("rnd",)
    assert event.enrichment_skipped is None
    assert worker.stats()["bytes_read"] > 0


def test_one_owners_flood_does_not_hold_back_another_owners_copy(tmp_path: Path) -> None:
    rnd, index = tagged_tree(tmp_path)
    flood = tmp_path / "flood"
    flood.mkdir()
    for i in range(300):
        (flood / f"junk{i}.bin").write_bytes(os.urandom(4096 + i % 5))  # same sizes as tagged
    victim = tmp_path / "stick"
    victim.mkdir()
    shutil.copy(rnd / "m1.v", victim / "m1.v")
    delivered, reports = Delivered(), []
    worker = worker_for(index, delivered, reports)
    for i in range(300):
        assert worker.submit(landed(flood / f"junk{i}.bin", owner="2001"))
    assert worker.submit(landed(victim / "m1.v", owner="1000"))
    worker.start()
    try:
        assert wait_until(lambda: len(delivered.events) == 301, timeout=30)
    finally:
        worker.stop()
    # Round-robin by owner: the one copy is checked second, not after 300 junk files.
    assert delivered.paths().index(str(victim / "m1.v")) <= 2


def test_events_over_budget_go_on_marked_and_a_health_record_counts_them(
    tmp_path: Path,
) -> None:
    _, index = tagged_tree(tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    for i in range(20):
        (stage / f"big{i}.bin").write_bytes(b"x" * 262_144)
    delivered, reports = Delivered(), []
    # 1 KiB a second: the first file puts the budget in debt for minutes.
    worker = worker_for(index, delivered, reports, io_budget_bytes=1024, max_delay=0.3)
    worker.start()
    try:
        for i in range(20):
            assert worker.submit(landed(stage / f"big{i}.bin"))
        assert wait_until(lambda: len(delivered.events) == 20, timeout=20)
    finally:
        worker.stop()
    skipped = [e for e in delivered.events if e.enrichment_skipped == "over_budget"]
    assert len(skipped) >= 18
    records = [r for r in reports if r["event"]["action"] == "enrichment_skipped"]
    assert records
    assert sum(r["exfilwatch"]["health"]["skipped"].get("over_budget", 0) for r in records) == len(
        skipped
    )


def test_a_full_queue_refuses_and_counts_and_stop_hands_back_what_waited(tmp_path: Path) -> None:
    _, index = tagged_tree(tmp_path)
    f = tmp_path / "x.bin"
    f.write_bytes(b"y" * 100)
    delivered, reports = Delivered(), []
    worker = worker_for(index, delivered, reports, queue_size=3, per_user_queue=2)
    assert worker.submit(landed(f, owner="1"))
    assert worker.submit(landed(f, owner="1"))
    assert not worker.submit(landed(f, owner="1"))  # that owner's share is full
    assert worker.submit(landed(f, owner="2"))
    assert not worker.submit(landed(f, owner="3"))  # the whole queue is full
    worker.stop()  # never started: what waited goes on, marked, not dropped
    assert [e.enrichment_skipped for e in delivered.events] == ["stopping"] * 3
    record = next(r for r in reports if r["event"]["action"] == "enrichment_skipped")
    assert record["exfilwatch"]["health"]["skipped_total"] == {
        "queue_full": 2,
        "over_budget": 0,
        "stopping": 3,
    }


def test_a_staging_flood_over_its_budget_leaves_the_budget_of_egress_places_untouched(
    tmp_path: Path,
) -> None:
    rnd, index = tagged_tree(tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    for i in range(10):
        (stage / f"big{i}.bin").write_bytes(b"x" * 262_144)
    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.copy(rnd / "m2.v", stick / "m2.v")
    delivered, reports = Delivered(), []
    worker = worker_for(index, delivered, reports, io_budget_bytes=8192, max_delay=0.5)
    worker.start()
    try:
        for i in range(10):
            assert worker.submit(landed(stage / f"big{i}.bin"))
        # The staging class is deep in debt now; a copy to removable media still gets checked.
        assert wait_until(lambda: worker.stats()["enriched"] >= 1, timeout=10)
        assert worker.submit(landed(stick / "m2.v", location="removable"))
        assert wait_until(lambda: str(stick / "m2.v") in delivered.paths(), timeout=10)
    finally:
        worker.stop()
    copy = next(e for e in delivered.events if e.path == str(stick / "m2.v"))
    assert copy.enrichment_skipped is None
    assert copy.lineage_origin == str(rnd / "m2.v")
