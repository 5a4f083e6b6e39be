"""Record sinks (an explicit registry) and the router that sends each kind where it belongs."""

from __future__ import annotations

import errno
import itertools
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, Protocol

import structlog

from agent.config import SinkSpec
from agent.events import dumps
from agent.health import record

log = structlog.get_logger(__name__)

# Lines one sink may owe per record kind while it fails, until the durable outbox takes over.
# Health is smaller: it is mostly the router's own sink_error records about the same outage.
PENDING_CAPS: Mapping[str, int] = MappingProxyType(
    {"alert": 100_000, "health": 10_000, "event": 100_000}
)
ERROR_INTERVAL = 10.0  # at most one sink_error, and one event_loss per kind, per sink per interval
RETRY_INITIAL = 1.0
RETRY_MAX = 30.0
# Owed lines go out in chunks: each chunk is all-or-nothing, so a sink that fails half-way
# through a large backlog keeps what it took and owes only the rest.
_CHUNK = 1000


class Sink(Protocol):
    name: str

    def write(self, lines: Sequence[str]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """Appends JSON lines to a file (created 0640, parent directories 0750).

    A write is all-or-nothing: when the disk fills part-way through, the file is cut back to
    where it was, so a reader never sees half a line and a retry never duplicates one."""

    def __init__(self, path: str) -> None:
        self.name = f"file:{path}"
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, lines: Sequence[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("ascii")
        view = memoryview(data)
        size = os.fstat(self._fd).st_size
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            if len(view) < len(data):
                try:
                    os.ftruncate(self._fd, size)
                except OSError as exc:
                    log.exception("sink_truncate_failed", sink=self.name, size=size, error=str(exc))
            raise

    def reopen(self) -> None:
        """After log rotation moved the file away: write to a new file at the same path."""
        old = self._fd
        self._fd = self._open()
        os.close(old)

    def close(self) -> None:
        os.close(self._fd)


class StreamSink:
    """Writes JSON lines to a text stream (stdout)."""

    def __init__(self, stream: IO[str], name: str = "stdout") -> None:
        self.name = name
        self._stream = stream

    def write(self, lines: Sequence[str]) -> None:
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


SINKS: dict[str, Callable[[SinkSpec], Sink]] = {
    "stdout": lambda spec: StreamSink(sys.stdout),
    "file": lambda spec: FileSink(spec.path or ""),
}


def make_sink(spec: SinkSpec) -> Sink:
    try:
        factory = SINKS[spec.type]
    except KeyError:
        raise ValueError(f"unknown sink type {spec.type!r}") from None
    return factory(spec)


def _reason(exc: Exception) -> str:
    """ENOSPC, EIO, EPIPE... or the exception type when there is no errno (a closed stream)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}")
    return type(exc).__name__


def _error_text(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


@dataclass
class _Pass:
    """One locked pass of the router: its time, and the health records it has to announce."""

    now: float
    notes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(eq=False)
class _Route:
    """One sink, the kinds it takes, and what it owes while it fails."""

    sink: Sink
    kinds: frozenset[str]
    # kind -> (sequence, line), oldest first. One deque per kind so each kind has its own cap;
    # the router-wide sequence number restores the order across kinds when they are written.
    pending: dict[str, deque[tuple[int, str]]] = field(default_factory=dict)
    errors: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    backoff: float = 0.0  # 0 while healthy
    next_retry: float = 0.0
    unreported_failures: int = 0
    error_reported: float | None = None
    unreported_drops: dict[str, int] = field(default_factory=dict)
    drop_reported: dict[str, float] = field(default_factory=dict)
    # The current outage, for the sink_recovered record.
    outage_since: float | None = None
    outage_failures: int = 0
    outage_dropped: int = 0

    def owed(self) -> int:
        return sum(len(q) for q in self.pending.values())

    def head(self, limit: int) -> tuple[list[str], dict[str, int]]:
        """Up to `limit` owed lines in the order they were written, and how many of each kind."""
        iters: dict[str, Iterator[tuple[int, str]]] = {
            k: iter(q) for k, q in self.pending.items() if q
        }
        heads = {k: next(it) for k, it in iters.items()}
        lines: list[str] = []
        taken = dict.fromkeys(heads, 0)
        while heads and len(lines) < limit:
            kind = min(heads, key=lambda k: heads[k][0])
            lines.append(heads[kind][1])
            taken[kind] += 1
            following = next(iters[kind], None)
            if following is None:
                del heads[kind]
            else:
                heads[kind] = following
        return lines, taken


class Router:
    """Sends each record kind (alert, health, event) to the sinks that take it.

    A sink that fails keeps what it was given in a bounded pending buffer and gets it, in order,
    when it works again (retried with backoff, by the next write or by `retry()`); meanwhile a
    `sink_error` health record tells the other sinks, and stderr, that it is failing.

    The bottom component of the agent: it reports its own health records straight to the
    sinks that take them (there is nothing below it to report through)."""

    name = "sinks"

    def __init__(
        self,
        routes: Sequence[tuple[Sink, frozenset[str]]],
        *,
        pending_caps: Mapping[str, int] | None = None,
        error_interval: float = ERROR_INTERVAL,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._routes = [_Route(sink, kinds) for sink, kinds in routes]
        self._caps = {**PENDING_CAPS, **(pending_caps or {})}
        self._error_interval = error_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.errors = 0

    def start(self) -> None:
        """Sinks open when they are made (a bad path fails the config check, not a run)."""

    def stop(self) -> None:
        self.close()

    @classmethod
    def from_specs(cls, specs: Sequence[SinkSpec], **options: Any) -> Router:
        return cls([(make_sink(s), s.records) for s in specs], **options)

    def wants(self, kind: str) -> bool:
        return any(kind in route.kinds for route in self._routes)

    def write(self, kind: str, lines: Sequence[str]) -> None:
        if not lines:
            return
        with self._lock:
            step = _Pass(self._clock())
            for route in self._routes:
                if kind not in route.kinds:
                    continue
                if route.owed() and step.now >= route.next_retry:
                    self._flush(route, step)
                if route.owed():
                    # Behind a backlog: queued after it, so the sink still gets lines in order.
                    self._queue(route, kind, lines, step)
                else:
                    self._attempt(route, kind, lines, step)
            self._announce(step)

    def retry(self) -> int:
        """Retry each failing sink whose backoff has run out; the lines still owed after it.

        Meant for the pipeline's idle tick, so a sink that recovers while nothing is written
        still gets its backlog."""
        with self._lock:
            step = _Pass(self._clock())
            for route in self._routes:
                if route.owed() and step.now >= route.next_retry:
                    self._flush(route, step)
            self._announce(step)
            return sum(route.owed() for route in self._routes)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per sink: lines owed (in total and by kind), failed writes, lines dropped."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for i, route in enumerate(self._routes):
                name = route.sink.name if route.sink.name not in out else f"{route.sink.name}#{i}"
                out[name] = {
                    "pending": route.owed(),
                    "pending_by_kind": {k: len(q) for k, q in route.pending.items() if q},
                    "errors": route.errors,
                    "dropped": sum(route.dropped.values()),
                    "dropped_by_kind": dict(route.dropped),
                }
            return out

    def replace(self, specs: Sequence[SinkSpec]) -> None:
        """Swap in new sinks between two writes (a reload), closing the old ones.

        A sink that stays (same name) keeps its backlog and its error state."""
        fresh = [(make_sink(s), s.records) for s in specs]
        with self._lock:
            step = _Pass(self._clock())
            old = {route.sink.name: route for route in self._routes}
            closing: list[Sink] = []
            routes: list[_Route] = []
            for sink, kinds in fresh:
                route = old.pop(sink.name, None)
                if route is None:
                    route = _Route(sink, kinds)
                else:
                    closing.append(route.sink)
                    route.sink, route.kinds = sink, kinds
                    route.next_retry = step.now  # the new file or stream may well work
                routes.append(route)
            for route in old.values():
                closing.append(route.sink)
                if route.owed():
                    step.notes.append(self._lost(route, "sink_removed"))
            self._routes = routes
            self._announce(step)
        for sink in closing:
            try:
                sink.close()
            except OSError as exc:
                log.exception("sink_close_failed", sink=sink.name, error=str(exc))

    def reopen(self) -> None:
        """Every file sink opens its path again (SIGHUP after logrotate renamed the file).

        A file that cannot be reopened is a sink_error record; the sink keeps writing to the
        file it had open, which is better than writing nowhere."""
        with self._lock:
            step = _Pass(self._clock())
            for route in self._routes:
                if not isinstance(route.sink, FileSink):
                    continue
                try:
                    route.sink.reopen()
                except OSError as exc:
                    route.errors += 1
                    self.errors += 1
                    # Not rate-limited: it happens once per SIGHUP, and says something a write
                    # error would not (the sink is still on the rotated file).
                    step.notes.append(
                        self._error_record(route, "reopen", None, exc, failures=1, now=step.now)
                    )
                else:
                    # A new file may have room where the old one had none: retry at once.
                    route.next_retry = step.now
            self._announce(step)

    def close(self) -> None:
        """One last try for every backlog, whatever the backoff, then close every sink."""
        with self._lock:
            step = _Pass(self._clock())
            for route in self._routes:
                if route.owed():
                    self._flush(route, step)
            step.notes.extend(
                self._lost(route, "sink_closed") for route in self._routes if route.owed()
            )
            self._announce(step)
            for route in self._routes:
                try:
                    route.sink.close()
                except OSError as exc:
                    log.exception("sink_close_failed", sink=route.sink.name, error=str(exc))

    # internals, called with the lock held ----------------------------------------------------

    def _attempt(self, route: _Route, kind: str, lines: Sequence[str], step: _Pass) -> None:
        try:
            route.sink.write(lines)
        except (OSError, ValueError) as exc:
            at = len(step.notes)
            self._queue(route, kind, lines, step)
            self._failed(route, kind, exc, step, at)

    def _flush(self, route: _Route, step: _Pass) -> None:
        """Write what the sink owes, oldest first; on success, report that it recovered."""
        late = 0
        while True:
            lines, taken = route.head(_CHUNK)
            if not lines:
                break
            try:
                route.sink.write(lines)
            except (OSError, ValueError) as exc:
                first = min(taken, key=lambda k: route.pending[k][0][0])
                self._failed(route, first, exc, step, len(step.notes))
                return
            for kind, n in taken.items():
                queue = route.pending[kind]
                for _ in range(n):
                    queue.popleft()
            late += len(lines)
        since = route.outage_since if route.outage_since is not None else step.now
        data = {
            "sink": route.sink.name,
            "delivered_late": late,
            "failures": route.outage_failures,
            "dropped": route.outage_dropped,
            "outage_s": round(step.now - since, 3),
        }
        route.pending.clear()
        route.backoff = route.next_retry = 0.0
        route.outage_since = None
        route.outage_failures = route.outage_dropped = 0
        log.info("sink_recovered", **data)
        step.notes.append(record("sink_recovered", None, **data))

    def _queue(self, route: _Route, kind: str, lines: Sequence[str], step: _Pass) -> None:
        queue = route.pending.setdefault(kind, deque())
        queue.extend((next(self._seq), line) for line in lines)
        cap = self._caps.get(kind, self._caps["event"])
        excess = len(queue) - cap
        if excess <= 0:
            return
        for _ in range(excess):
            queue.popleft()
        route.dropped[kind] = route.dropped.get(kind, 0) + excess
        route.outage_dropped += excess
        route.unreported_drops[kind] = route.unreported_drops.get(kind, 0) + excess
        last = route.drop_reported.get(kind)
        if last is not None and step.now - last < self._error_interval:
            return
        route.drop_reported[kind] = step.now
        dropped = route.unreported_drops.pop(kind)
        log.error("sink_backlog_full", sink=route.sink.name, kind=kind, dropped=dropped, cap=cap)
        step.notes.append(
            record(
                "event_loss",
                "sink_backlog_full",
                sink=route.sink.name,
                kind=kind,
                dropped=dropped,
                dropped_total=route.dropped[kind],
                cap=cap,
                hint="the sink has been failing for a while; the oldest owed lines were dropped",
            )
        )

    def _failed(self, route: _Route, kind: str, exc: Exception, step: _Pass, at: int) -> None:
        """Count a failed write, back off, and report it (at most once per interval)."""
        route.errors += 1
        self.errors += 1
        route.unreported_failures += 1
        route.outage_failures += 1
        if route.outage_since is None:
            route.outage_since = step.now
        route.backoff = (
            min(route.backoff * 2, self._retry_max) if route.backoff else self._retry_initial
        )
        route.next_retry = step.now + route.backoff
        if (
            route.error_reported is not None
            and step.now - route.error_reported < self._error_interval
        ):
            return
        route.error_reported = step.now
        failures, route.unreported_failures = route.unreported_failures, 0
        # Before any event_loss the same write caused: the cause first, then the consequence.
        step.notes.insert(
            at, self._error_record(route, "write", kind, exc, failures=failures, now=step.now)
        )

    def _error_record(
        self,
        route: _Route,
        op: str,
        kind: str | None,
        exc: Exception,
        *,
        failures: int,
        now: float,
    ) -> dict[str, Any]:
        reason, error = _reason(exc), _error_text(exc)
        pending = route.owed()
        log.error(
            "sink_error",
            sink=route.sink.name,
            op=op,
            kind=kind,
            reason=reason,
            error=error,
            pending=pending,
            failures=failures,
        )
        data: dict[str, Any] = {"sink": route.sink.name, "op": op}
        if kind is not None:
            data["kind"] = kind
        if pending:
            data["retry_in_s"] = round(max(route.next_retry - now, 0.0), 3)
        return record(
            "sink_error",
            reason,
            **data,
            error=error,
            pending=pending,
            failures=failures,
            errors_total=route.errors,
        )

    def _lost(self, route: _Route, reason: str) -> dict[str, Any]:
        by_kind = {k: len(q) for k, q in route.pending.items() if q}
        log.error("sink_backlog_lost", sink=route.sink.name, reason=reason, lost=by_kind)
        return record(
            "event_loss",
            reason,
            sink=route.sink.name,
            dropped=sum(by_kind.values()),
            dropped_by_kind=by_kind,
        )

    def _announce(self, step: _Pass) -> None:
        """The router's own health records go to every sink that takes health: written now to a
        working one, queued behind the backlog of a failing one (its SIEM learns why, later).

        Terminates: a sink that fails here joins the queued ones, and what that failure reports
        is rate-limited."""
        while step.notes:
            line = dumps(step.notes.pop(0))
            for route in self._routes:
                if "health" not in route.kinds:
                    continue
                if route.owed():
                    self._queue(route, "health", [line], step)
                else:
                    self._attempt(route, "health", [line], step)
