"""The bounded queue between sources and the pipeline: drops are counted and reported."""

from __future__ import annotations

from typing import Any

from agent.config import WatchSpec
from agent.enrich.tags import TagResolver
from agent.health import CapReporter
from agent.pipeline import BoundedQueue, Pipeline
from agent.sinks import Router
from agent.sources.base import RawEvent
from tests.conftest import Collector


def raw(i: int) -> RawEvent:
    return RawEvent(i, "created", f"/nowhere/f{i}", None, False, "test")


def test_a_full_queue_cuts_the_batch_and_counts_every_dropped_event() -> None:
    q = BoundedQueue(1000)
    assert q.put([raw(i) for i in range(800)]) == 800
    assert q.put([raw(i) for i in range(300)]) == 200
    assert q.put([raw(0)]) == 0
    assert q.dropped == 101
    assert q.take_dropped() == 101
    assert q.take_dropped() == 0
    assert len(q) == 1000


def test_drops_become_an_event_loss_health_record_and_nothing_else_is_lost() -> None:
    collector = Collector()
    reports: list[dict[str, Any]] = []
    resolver = TagResolver(
        [WatchSpec("/nowhere")], ".m", reports.append, CapReporter(reports.append)
    )
    pipeline = Pipeline(Router([(collector, frozenset({"event", "health"}))]), resolver, 1000)
    # The consumer is not running yet, as when it stalls behind a slow sink.
    pipeline.emit([raw(i) for i in range(1500)])
    pipeline.start()
    assert collector.wait_for(lambda c: len(c.events()) == 1000)
    assert collector.wait_for(lambda c: bool(c.health("event_loss")))
    assert pipeline.stop()
    loss = collector.health("event_loss")[0]
    assert loss["event"]["reason"] == "queue_full"
    assert loss["exfilwatch"]["health"]["dropped"] == 500
    assert [e.path for e in collector.events()] == [f"/nowhere/f{i}" for i in range(1000)]


def test_stop_writes_everything_queued_before_returning() -> None:
    collector = Collector()
    resolver = TagResolver([], ".m", lambda r: None, CapReporter(lambda r: None))
    pipeline = Pipeline(Router([(collector, frozenset({"event"}))]), resolver, 100_000)
    pipeline.start()
    for start in range(0, 50_000, 1000):
        pipeline.emit([raw(i) for i in range(start, start + 1000)])
    assert pipeline.stop(timeout=10)
    assert len(collector.lines) == 50_000


def test_a_waiting_producer_gets_room_instead_of_losing_events() -> None:
    import threading

    q = BoundedQueue(1000)
    q.put([raw(i) for i in range(1000)])
    taker = threading.Timer(0.2, lambda: q.get(timeout=1))
    taker.start()
    try:
        assert q.put([raw(i) for i in range(500)], wait=5) == 500
    finally:
        taker.join()
    assert q.dropped == 0 and q.waits > 0
