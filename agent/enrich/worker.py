"""Content checks off the consumer's path: one bounded worker, a global budget, fair shares."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from msgspec.structs import replace as evolve

from agent.beat import until_beat
from agent.events import Event
from agent.health import Reporter, record

log = structlog.get_logger(__name__)

# Egress places (removable media, sync folders, shares) are served before staging places.
_FIRST = frozenset({"removable", "cloud_sync", "network_share"})
_REPORT_EVERY = 10.0
_DELIVER_BATCH = 256
_DELIVER_AFTER = 0.05  # seconds a checked event may wait for others to go with it


class ContentStage(Protocol):
    """An enrichment step that reads file content (hashing, sniffing, archive listing)."""

    name: str

    def wants(self, event: Event, /) -> bool: ...

    def content(self, event: Event, /) -> tuple[Event, int]:
        """The enriched event and the bytes read for it."""
        ...


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    queue_size: int = 10_000
    per_user_queue: int = 2_000
    max_delay: float = 1.0
    io_budget_bytes: int = 64 * 1024 * 1024
    cpu_budget: float = 0.25


class _Bucket:
    """A token bucket that may go into debt: one large file is never refused, but the work
    after it waits until the debt is paid back."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.tokens = rate
        self._clock = clock
        self._last = clock()

    def refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.rate, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def wait_time(self) -> float:
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class EnrichmentWorker:
    """Runs a content stage on events handed over by the pipeline's consumer, in a thread of
    its own, so no file anyone writes can stall event intake.

    Bounded: at most `queue_size` events wait, at most `per_user_queue` of one file owner's;
    the queues are served round-robin by owner (egress places first), so one user's flood of
    archives does not delay another's copies. The stage spends at most `io_budget_bytes` of
    reads and `cpu_budget` CPU-seconds per second. An event that cannot be checked in time
    (`max_delay`) or finds no room goes on unenriched, marked `exfilwatch.enrichment.skipped`
    with the reason, and a health record counts them."""

    name = "enrichment"

    def __init__(
        self,
        stage: ContentStage,
        settings: WorkerSettings,
        report: Reporter,
        deliver: Callable[[list[Event]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage = stage
        self.settings = settings
        self._report = report
        self._deliver = deliver
        self._clock = clock
        self._cond = threading.Condition()
        # Per class (0 egress, 1 staging): owner -> FIFO of (deadline, event).
        self._queues: tuple[OrderedDict[str, deque[tuple[float, Event]]], ...] = (
            OrderedDict(),
            OrderedDict(),
        )
        self._size = 0
        # A budget per class: a flood of archives in /tmp can never spend what the checks of
        # copies to a USB stick need (so at most twice the budget when both are flooded).
        self._io = tuple(_Bucket(float(settings.io_budget_bytes), clock) for _ in range(2))
        self._cpu = tuple(_Bucket(settings.cpu_budget, clock) for _ in range(2))
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._unreported: dict[str, int] = {}
        self._last_report = clock()
        self.counters = {
            "submitted": 0,
            "enriched": 0,
            "skipped_queue_full": 0,
            "skipped_over_budget": 0,
            "skipped_stopping": 0,
            "errors": 0,
            "bytes_read": 0,
            "busy_waits": 0,
        }
        self.cpu_seconds = 0.0
        self.high_water = 0

    # the consumer's side ---------------------------------------------------------------

    def submit(self, event: Event) -> bool:
        """Queue `event` for content checks; False (and counted) when there is no room."""
        owner = event.user_id or event.uid or "?"
        cls = 0 if event.location in _FIRST else 1
        with self._cond:
            if not self._stopping and self._size < self.settings.queue_size:
                q = self._queues[cls].get(owner)
                if q is None:
                    q = self._queues[cls][owner] = deque()
                if len(q) < self.settings.per_user_queue:
                    q.append((self._clock() + self.settings.max_delay, event))
                    self._size += 1
                    self.high_water = max(self.high_water, self._size)
                    self.counters["submitted"] += 1
                    self._cond.notify()
                    return True
                if not q:
                    del self._queues[cls][owner]
            self._skipped("stopping" if self._stopping else "queue_full", 1)
        return False

    def refused(self) -> str:
        """Why `submit` said no: the mark for the event that goes on unchecked."""
        return "stopping" if self._stopping else "queue_full"

    # lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="exfilwatch-enrich", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; events still waiting go on unenriched (marked), never dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._cond:
            left = self._take_all()
            if left:
                self._skipped("stopping", len(left))
        if left:
            self._deliver([evolve(e, enrichment_skipped="stopping") for e in left])
        self._flush_report(force=True)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            queued = self._size
        return {
            "queued": queued,
            "queue_size": self.settings.queue_size,
            "high_water": self.high_water,
            "cpu_seconds": round(self.cpu_seconds, 3),
            **self.counters,
        }

    # the worker's side -----------------------------------------------------------------

    def _run(self) -> None:
        done: list[Event] = []
        first_done: float | None = None
        while True:
            with self._cond:
                if self._stopping:
                    break
                expired = self._expire()
                item = None
                cls = 0
                wait = 0.5
                if self._size:
                    waits = []
                    for cls in (0, 1):
                        if not self._queues[cls]:
                            continue
                        self._io[cls].refill()
                        self._cpu[cls].refill()
                        budget_wait = max(self._io[cls].wait_time(), self._cpu[cls].wait_time())
                        if budget_wait <= 0:
                            item = self._next(cls)
                            break
                        waits.append(budget_wait)
                    if item is None and waits:
                        self.counters["busy_waits"] += 1
                        wait = min(*waits, self._next_deadline() - self._clock())
                if item is None and not expired and not done:
                    if not self._size:
                        # Nothing queued: sleep until a submit or a stop (which notify), or
                        # until skips wait to be reported; idle wake-ups cost CPU (issue 9).
                        wait = until_beat()
                        if self._unreported:
                            wait = _REPORT_EVERY - (self._clock() - self._last_report)
                        self._cond.wait(max(0.005, wait))
                    else:
                        self._cond.wait(max(0.005, min(wait, 0.5)))
            if expired:
                done.extend(evolve(e, enrichment_skipped="over_budget") for e in expired)
            if item is not None:
                done.append(self._work(item, cls))
            if done and first_done is None:
                first_done = self._clock()
            if done and (
                item is None
                or len(done) >= _DELIVER_BATCH
                or not self._size
                or self._clock() - (first_done or 0.0) >= _DELIVER_AFTER
            ):
                self._deliver(done)
                done = []
                first_done = None
            self._flush_report()
        if done:
            self._deliver(done)

    def _work(self, event: Event, cls: int) -> Event:
        began = time.thread_time()
        try:
            out, read = self.stage.content(event)
        except Exception as exc:
            # A hostile file must cost one event its enrichment, never the worker.
            log.exception("enrichment_error")
            self.counters["errors"] += 1
            self._report(record("source_error", type(exc).__name__, stage=self.stage.name))
            out, read = event, 0
        spent = time.thread_time() - began
        self.cpu_seconds += spent
        self.counters["bytes_read"] += read
        self.counters["enriched"] += 1
        with self._cond:
            # Debt is capped at one second of budget: a 100 GB sparse "archive" (charged by
            # its size) must not stop every later check for half an hour.
            io, cpu = self._io[cls], self._cpu[cls]
            io.tokens = max(-io.rate, io.tokens - read)
            cpu.tokens = max(-cpu.rate, cpu.tokens - spent)
        return out

    def _next(self, cls: int) -> Event | None:
        """The head of the next owner's queue in class `cls`, round-robin by owner."""
        queues = self._queues[cls]
        if not queues:
            return None
        owner, q = next(iter(queues.items()))
        _, event = q.popleft()
        self._size -= 1
        del queues[owner]
        if q:
            queues[owner] = q  # to the back of the round
        return event

    def _next_deadline(self) -> float:
        return min(q[0][0] for queues in self._queues for q in queues.values())

    def _expire(self) -> list[Event]:
        now = self._clock()
        out: list[Event] = []
        for queues in self._queues:
            for owner in list(queues):
                q = queues[owner]
                while q and q[0][0] <= now:
                    out.append(q.popleft()[1])
                if not q:
                    del queues[owner]
        if out:
            self._size -= len(out)
            self._skipped("over_budget", len(out))
        return out

    def _take_all(self) -> list[Event]:
        out = [e for queues in self._queues for q in queues.values() for _, e in q]
        for queues in self._queues:
            queues.clear()
        self._size = 0
        return out

    def _skipped(self, reason: str, n: int) -> None:
        self.counters[f"skipped_{reason}"] += n
        self._unreported[reason] = self._unreported.get(reason, 0) + n

    def _flush_report(self, force: bool = False) -> None:
        now = self._clock()
        with self._cond:
            if not self._unreported or (not force and now - self._last_report < _REPORT_EVERY):
                return
            counts, self._unreported = self._unreported, {}
            self._last_report = now
        self._report(
            record(
                "enrichment_skipped",
                max(counts, key=lambda k: counts[k]),
                skipped=counts,
                skipped_total={
                    k.removeprefix("skipped_"): v
                    for k, v in self.counters.items()
                    if k.startswith("skipped_")
                },
                io_budget_bytes=self.settings.io_budget_bytes,
                cpu_budget=self.settings.cpu_budget,
                max_delay_s=self.settings.max_delay,
                hint="events went on without content checks (lineage by hash, archive members, "
                "disguise); raise enrichment budgets or exclude the noisy place",
            )
        )
