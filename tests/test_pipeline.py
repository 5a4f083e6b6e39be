"""The lanes between sources and the consumer: tagged trees first, shedding counted and reported."""

from __future__ import annotations

import threading
from typing import Any

from agent.config import WatchSpec
from agent.enrich.tags import TagResolver
from agent.events import Event
from agent.health import CapReporter
from agent.pipeline import LaneQueue, Pipeline
from agent.sinks import Router
from agent.sources.base import RawEvent
from tests.conftest import Collector

LANE_CAPS = {"tagged": 1000, "egress": 1000, "staging": 1000}


def raw(i: int, location: str = "tagged", root: str = "/nowhere") -> RawEvent:
    return RawEvent(i, "created", f"{root}/f{i}", None, False, "test", location)


def make_pipeline(collector: Collector, caps: dict[str, int] | int = 1000) -> Pipeline:
    reports: list[dict[str, Any]] = []
    resolver = TagResolver(
        [
            WatchSpec("/nowhere", ("rnd",)),
            WatchSpec("/tmp-like", location="staging"),
            WatchSpec("/media-like", location="removable"),
        ],
        ".m",
        reports.append,
        CapReporter(reports.append),
    )
    return Pipeline(Router([(collector, frozenset({"event", "health"}))]), resolver, caps)


def test_a_full_lane_cuts_the_batch_and_counts_every_dropped_event_by_lane_and_place() -> None:
    q = LaneQueue(LANE_CAPS)
    assert q.put("staging", [raw(i, "staging") for i in range(800)]) == 800
    assert q.put("staging", [raw(i, "home") for i in range(300)]) == 200
    assert q.put("staging", [raw(0, "staging")]) == 0
    assert q.put("tagged", [raw(i) for i in range(1000)]) == 1000  # lanes do not share room
    assert q.dropped == {"tagged": 0, "egress": 0, "staging": 101}
    assert q.take_shed() == {("staging", "home"): 100, ("staging", "staging"): 1}
    assert q.take_shed() == {}
    assert len(q) == 2000


def test_the_tagged_lane_is_served_before_a_flood_queued_earlier_elsewhere() -> None:
    q = LaneQueue(LANE_CAPS)
    q.put("staging", [raw(i, "staging") for i in range(500)])
    q.put("egress", [raw(i, "removable") for i in range(10)])
    q.put("tagged", [raw(i) for i in range(3)])
    assert [q.get(0)[0] for _ in range(3)] == ["tagged", "egress", "staging"]


def test_a_staging_flood_is_shed_and_reported_while_tagged_events_all_arrive() -> None:
    collector = Collector()
    pipeline = make_pipeline(collector)
    # The consumer is not running yet, as when it stalls behind a slow sink.
    pipeline.emit([raw(i, "staging", "/tmp-like") for i in range(1500)])
    pipeline.emit([raw(i) for i in range(1000)])
    pipeline.start()
    try:
        assert collector.wait_for(lambda c: len(c.events()) == 2000, timeout=20)
        assert collector.wait_for(lambda c: bool(c.health("event_loss")), timeout=20)
    finally:
        assert pipeline.drain()
    loss = collector.health("event_loss")[0]
    assert loss["event"]["reason"] == "queue_full"
    assert loss["exfilwatch"]["health"]["lane"] == "staging"
    assert loss["exfilwatch"]["health"]["location"] == "staging"
    assert loss["exfilwatch"]["health"]["dropped"] == 500
    paths = [e.path for e in collector.events()]
    # Every tagged event, and before any of the staging flood queued ahead of it.
    assert paths[:1000] == [f"/nowhere/f{i}" for i in range(1000)]
    assert pipeline.stats()["lanes"]["tagged"]["dropped_total"] == 0


def test_stop_writes_everything_queued_before_returning() -> None:
    collector = Collector()
    pipeline = make_pipeline(collector, 100_000)
    pipeline.start()
    for start in range(0, 50_000, 1000):
        pipeline.emit([raw(i) for i in range(start, start + 1000)])
    assert pipeline.drain(timeout=20)
    assert len(collector.lines) == 50_000


def test_a_waiting_producer_gets_room_in_the_tagged_lane_instead_of_losing_events() -> None:
    q = LaneQueue(LANE_CAPS)
    q.put("tagged", [raw(i) for i in range(1000)])
    started = threading.Event()

    def produce() -> None:
        started.set()
        produced.append(q.put("tagged", [raw(i) for i in range(500)], wait=20))

    produced: list[int] = []
    producer = threading.Thread(target=produce)
    producer.start()
    assert started.wait(5)
    while producer.is_alive() and q.waits == 0:
        producer.join(0.01)  # until the producer is seen waiting for room
    assert q.get(timeout=1)[0] == "tagged"
    producer.join(20)
    assert produced == [500]
    assert q.dropped["tagged"] == 0 and q.waits > 0


def test_a_process_working_on_a_tagged_root_itself_carries_the_roots_tags(tmp_path: Any) -> None:
    root = tmp_path / "nova"
    root.mkdir()
    (root / "core").mkdir()
    collector = Collector()
    reports: list[dict[str, Any]] = []
    resolver = TagResolver(
        [WatchSpec(str(root), ("nova",), "critical")],
        ".m",
        reports.append,
        CapReporter(reports.append),
    )
    pipeline = Pipeline(Router([(collector, frozenset({"event"}))]), resolver, 100)
    started = [
        Event(1, "process_started", str(p), category="process", source="process_poll")
        for p in (root, root / "core")
    ]
    pipeline.emit_events(started)  # `tar -C /srv/rnd/nova`, `rsync -a /srv/rnd/nova/core/`
    pipeline.start()
    try:
        assert collector.wait_for(lambda c: len(c.events()) == 2)
    finally:
        pipeline.drain()
    for event in collector.events():
        assert (event.tags, event.sensitivity, event.root) == (("nova",), "critical", str(root))
    assert pipeline.stats()["lanes"]["tagged"]["processed"] == 2


def test_events_of_one_file_in_one_batch_carry_the_same_fields_as_events_built_alone(
    tmp_path: Any,
) -> None:
    """A write is opened, modified and closed_write in one batch: the later ones are built
    from the first (one stat, one tag lookup); they must be what building each alone gives,
    and a marker or a move is never built that way."""
    tree = tmp_path / "rnd"
    tree.mkdir()
    design = tree / "top.v"
    design.write_bytes(b"module top; endmodule\n")
    other = tree / "b.v"
    other.write_bytes(b"x" * 10)
    (tree / ".m").write_text("tags: [chip]\n")

    def make() -> tuple[Pipeline, Collector]:
        reports: list[dict[str, Any]] = []
        resolver = TagResolver(
            [WatchSpec(str(tree), ("rnd",))], ".m", reports.append, CapReporter(reports.append)
        )
        collector = Collector()
        return Pipeline(Router([(collector, frozenset({"event"}))]), resolver, 1000), collector

    d, o, m = str(design), str(other), str(tree / ".m")
    batch = [
        RawEvent(5, action, path, src, False, "inotify", "tagged")
        for action, path, src in [
            ("opened", d, None),
            ("modified", d, None),
            ("closed_write", d, None),
            ("opened", o, None),
            ("closed_nowrite", o, None),
            ("attributes_changed", d, None),
            ("closed_write", m, None),
            ("closed_write", m, None),
            ("moved", d, o),
            ("closed_write", d, None),
        ]
    ]
    together, seen = make()
    together._process("tagged", batch)
    alone, seen_alone = make()
    for raw_event in batch:
        alone._process("tagged", [raw_event])
    assert len(seen.lines) == len(batch)
    # Every field equal, the sequence too (both count from the same start); the marker's
    # tags (chip) reach the events after it in both.
    assert seen.events() == seen_alone.events()
    assert "chip" in seen.events()[-1].tags
    assert together.stats_taken < alone.stats_taken


def test_the_next_batch_takes_its_own_stat_of_the_same_file(tmp_path: Any) -> None:
    design = tmp_path / "top.v"
    design.write_bytes(b"a")
    reports: list[dict[str, Any]] = []
    resolver = TagResolver(
        [WatchSpec(str(tmp_path), ("rnd",))], ".m", reports.append, CapReporter(reports.append)
    )
    collector = Collector()
    pipeline = Pipeline(Router([(collector, frozenset({"event"}))]), resolver, 1000)
    pipeline._process("tagged", [RawEvent(5, "opened", str(design), None, False, "inotify")])
    design.write_bytes(b"abc")
    pipeline._process("tagged", [RawEvent(5, "closed_write", str(design), None, False, "inotify")])
    assert [e.size for e in collector.events()] == [1, 3]
