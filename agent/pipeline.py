"""Bounded queue from sources to one consumer that enriches events and routes records."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from agent.enrich.tags import TagResolver
from agent.events import Event, dumps, event_line
from agent.health import record
from agent.rules.engine import Engine
from agent.sinks import Router
from agent.sources.base import RawEvent

log = structlog.get_logger(__name__)

_NO_STAT = frozenset({"deleted", "moved_out"})
_MARKER_ACTIONS = frozenset({"created", "closed_write", "deleted", "moved_in", "moved_out"})
_TREE_ACTIONS = frozenset({"deleted", "moved", "moved_out", "moved_in"})
_HEALTH_CAP = 10_000
_STOP = object()


class _Ready:
    """A ready-made Event travelling the raw-event queue (it counts against the same cap)."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event


class BoundedQueue:
    """Batches of raw events, capped by event count. A batch that does not fit is cut and the
    rest is counted as dropped; `take_dropped` hands the count to whoever reports it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: deque[Any] = deque()
        self._size = 0
        self._cond = threading.Condition()
        self.dropped = 0
        self._unreported = 0
        self.high_water = 0
        self.waits = 0

    def put(self, batch: list[RawEvent], wait: float = 0.0) -> int:
        """Queue a batch. With `wait`, a full queue makes the producer wait (up to `wait`
        seconds) for room instead of dropping: the inotify reader then leaves events in the
        kernel queue, which the agent sized for bursts, and nothing is lost."""
        with self._cond:
            if wait > 0 and self.cap - self._size < len(batch):
                deadline = time.monotonic() + wait
                while self.cap - self._size < len(batch):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.waits += 1
                    self._cond.wait(min(left, 0.05))
            room = self.cap - self._size
            if room <= 0:
                self.dropped += len(batch)
                self._unreported += len(batch)
                self._cond.notify()
                return 0
            if len(batch) > room:
                self.dropped += len(batch) - room
                self._unreported += len(batch) - room
                batch = batch[:room]
            self._items.append(batch)
            self._size += len(batch)
            self.high_water = max(self.high_water, self._size)
            self._cond.notify()
            return len(batch)

    def put_control(self, item: Any) -> None:
        """Health records and the stop sentinel: never cut by the event cap."""
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float) -> Any:
        with self._cond:
            if not self._items and not self._unreported:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, list):
                self._size -= len(item)
                self._cond.notify_all()  # a producer may be waiting for room
            return item

    def take_dropped(self) -> int:
        with self._cond:
            n, self._unreported = self._unreported, 0
            return n

    def __len__(self) -> int:
        return self._size


class Pipeline:
    """Consumes raw events: stat, tags, Event; then every event hook and the event sinks."""

    def __init__(
        self,
        router: Router,
        resolver: TagResolver,
        queue_size: int,
        *,
        source_name: str = "inotify",
    ) -> None:
        self.router = router
        self.resolver = resolver
        self.queue = BoundedQueue(queue_size)
        # How long a source waits for room before its batch is cut (then counted and reported).
        self.backpressure = 2.0
        self._expire_at: int | None = None
        self.engine: Engine | None = None
        self.destinations: Callable[[Event], Event] | None = None
        self.attributor: Callable[[Event], Event] | None = None
        self._next_engine: Engine | None = None
        self._hostname = socket.gethostname()
        self._sequence = 0
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._source_name = source_name
        self._health_pending = 0
        self._health_lock = threading.Lock()
        self.health_dropped = 0
        self.processed = 0

    # producers -------------------------------------------------------------------------

    def emit(self, batch: list[RawEvent]) -> None:
        self.queue.put(batch, wait=self.backpressure)

    def emit_events(self, events: list[Event]) -> None:
        """Events built elsewhere (process starts): tags, location and rules still apply."""
        if events:
            self.queue.put([_Ready(e) for e in events])  # type: ignore[misc]

    def report(self, rec: dict[str, Any]) -> None:
        """Health records travel the same queue, so they stay in order with the events."""
        level = rec.get("log", {}).get("level", "info")
        log.log(
            {"error": 40, "warning": 30}.get(level, 20),
            "health",
            action=rec["event"]["action"],
            reason=rec["event"].get("reason"),
        )
        if self._thread is None or self._stopped.is_set():
            self.router.write("health", [dumps(rec)])
            return
        with self._health_lock:
            if self._health_pending >= _HEALTH_CAP:
                self.health_dropped += 1  # the consumer is stuck; reported by the heartbeat
                return
            self._health_pending += 1
        self.queue.put_control(rec)

    # consumer --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="exfilwatch-pipeline", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.5) -> bool:
        """Drain what is queued (up to `timeout`), then stop. True when all was written."""
        if self._thread is None:
            return True
        self.queue.put_control(_STOP)
        self._thread.join(timeout)
        drained = not self._thread.is_alive()
        self._stopped.set()
        self._thread = None
        return drained

    def _run(self) -> None:
        while True:
            item = self.queue.get(timeout=0.5)
            dropped = self.queue.take_dropped()
            if dropped:
                self._write_health(
                    record(
                        "event_loss",
                        "queue_full",
                        dropped=dropped,
                        dropped_total=self.queue.dropped,
                        queue_size=self.queue.cap,
                        hint="raise queue_size or exclude noisy trees",
                    )
                )
            if self._expire_at is not None and self.engine is not None:
                # Engine state is touched by this thread only: expiry runs here, not in the
                # scheduler's thread (a dict changing size mid-iteration would be the result).
                expire_at, self._expire_at = self._expire_at, None
                self.engine.expire(expire_at)
            if item is None:
                if self._next_engine is not None:
                    self._install_engine()
                continue
            if item is _STOP:
                return
            if isinstance(item, dict):
                with self._health_lock:
                    self._health_pending -= 1
                self._write_health(item)
                continue
            try:
                self._process(item)
            except Exception as exc:
                # One bad batch must not stop the consumer (that would lose every later event).
                log.exception("pipeline_error")
                self._write_health(
                    record("source_error", type(exc).__name__, stage="pipeline", lost=len(item))
                )

    def _write_health(self, rec: dict[str, Any]) -> None:
        self.router.write("health", [dumps(rec)])

    def _process(self, batch: list[RawEvent]) -> None:
        resolver = self.resolver
        marker = resolver.marker_name
        if self._next_engine is not None:
            self._install_engine()
        want_lines = self.router.wants("event")
        engine = self.engine
        destinations = self.destinations
        attributor = self.attributor
        lines: list[str] = []
        alerts: list[str] = []
        stats: dict[str, os.stat_result | None] = {}
        for raw in batch:
            if isinstance(raw, _Ready):
                event = self._ready(raw.event)
                if want_lines:
                    lines.append(event_line(event))
                if engine is not None:
                    alerts.extend(dumps(a) for a in engine.process(event))
                continue
            ts, action, path, src_path, is_dir, source = raw
            slash = path.rfind("/")
            directory = path[:slash] or "/"
            name = path[slash + 1 :]
            if is_dir and action in _TREE_ACTIONS:
                resolver.tree_changed(path)
                if src_path is not None:
                    resolver.tree_changed(src_path)
            if not is_dir and (name == marker or (src_path and src_path.endswith("/" + marker))):
                self._marker_event(action, directory, src_path, source)
            resolved = resolver.resolve_dir(path if is_dir else directory)
            file_type = "dir" if is_dir else "file"
            size = uid = gid = inode = mode = mtime = None
            if action not in _NO_STAT:
                # One lstat per path per batch: a write is opened, modified and closed_write
                # events for the same file, read together, all answered by the same stat.
                if path in stats:
                    st = stats[path]
                else:
                    try:
                        st = os.lstat(path)
                    except OSError:
                        st = None
                    stats[path] = st
                if st is not None:
                    fmt = stat.S_IFMT(st.st_mode)
                    if fmt == stat.S_IFLNK:
                        file_type = "symlink"
                    elif fmt == stat.S_IFDIR:
                        file_type = "dir"
                    elif fmt != stat.S_IFREG:
                        file_type = "other"
                    size = st.st_size
                    uid = str(st.st_uid)
                    gid = str(st.st_gid)
                    inode = str(st.st_ino)
                    mode = f"{stat.S_IMODE(st.st_mode):04o}"
                    mtime = st.st_mtime_ns // 1000
            self._sequence += 1
            event = Event(
                ts,
                action,
                path,
                "file",
                file_type,
                size,
                uid,
                gid,
                inode,
                mode,
                mtime,
                src_path,
                resolved.tags,
                resolved.sensitivity,
                resolved.root,
                source,
                self._sequence,
                self._hostname,
                location=resolved.location,
                location_provider=resolved.provider,
            )
            if destinations is not None:
                event = destinations(event)
            if attributor is not None:
                event = attributor(event)
            if want_lines:
                lines.append(event_line(event))
            if engine is not None:
                for alert in engine.process(event):
                    alerts.append(dumps(alert))
        self.processed += len(batch)
        if lines:
            self.router.write("event", lines)
        if alerts:
            self.router.write("alert", alerts)

    def _ready(self, e: Event) -> Event:
        slash = e.path.rfind("/")
        resolved = self.resolver.resolve_dir(e.path[:slash] or "/")
        self._sequence += 1
        return e._replace(
            tags=resolved.tags,
            sensitivity=resolved.sensitivity,
            root=resolved.root,
            location=resolved.location if resolved.root is not None else None,
            sequence=self._sequence,
            hostname=self._hostname,
        )

    def request_expiry(self, now_us: int) -> None:
        """Ask the consumer to drop stale correlation groups at its next turn."""
        self._expire_at = now_us

    def set_engine(self, engine: Engine) -> None:
        """Swap rule sets between two batches: intake never pauses, state of unchanged rules
        carries over (the consumer thread does the swap, so no batch sees half of each)."""
        if self._thread is None:
            if self.engine is not None:
                engine.adopt(self.engine)
            self.engine = engine
        else:
            self._next_engine = engine

    def _install_engine(self) -> None:
        new, self._next_engine = self._next_engine, None
        if new is None:
            return
        if self.engine is not None:
            new.adopt(self.engine)
        self.engine = new

    def _marker_event(self, action: str, directory: str, src_path: str | None, source: str) -> None:
        reload = action in _MARKER_ACTIONS or action == "moved"
        if action == "modified" and source != "inotify":
            reload = True  # no close-after-write event on every platform
        if not reload:
            return
        # Either end of a move may be the marker (renamed into place, or renamed away).
        self.resolver.marker_changed(directory)
        if src_path is not None:
            src_dir = src_path[: src_path.rfind("/")] or "/"
            if src_dir != directory:
                self.resolver.marker_changed(src_dir)

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self.queue),
            "queue_size": self.queue.cap,
            "queue_high_water": self.queue.high_water,
            "queue_waits": self.queue.waits,
            "dropped_total": self.queue.dropped,
            "processed": self.processed,
            "health_dropped": self.health_dropped,
        }


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
