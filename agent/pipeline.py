"""Bounded queue from sources to one consumer that enriches events and routes records."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog
from msgspec.structs import replace as evolve

from agent.alerts import stamp_created
from agent.beat import BEAT, until_beat
from agent.enrich.ownreads import OwnReads
from agent.enrich.tags import TagResolver
from agent.enrich.worker import ContentStage, EnrichmentWorker
from agent.events import Event, dumps, event_line
from agent.health import record
from agent.privacy import Pseudonyms
from agent.risk import RiskSettings, score_alert
from agent.rules.engine import Engine
from agent.sinks import Router
from agent.sources.base import LANE_OF, LANES, RawEvent

log = structlog.get_logger(__name__)

_NO_STAT = frozenset({"deleted", "moved_out"})
_MARKER_ACTIONS = frozenset({"created", "closed_write", "deleted", "moved_in", "moved_out"})
_TREE_ACTIONS = frozenset({"deleted", "moved", "moved_out", "moved_in"})
# Actions after which the next event of the same file in the same batch is built from this
# one: they change no tag, marker or directory tree, and both take the batch's one stat.
_PLAIN = frozenset({"opened", "modified", "closed_write", "closed_nowrite", "attributes_changed"})
_HEALTH_CAP = 10_000
TRUSTED_SUMMARY_ROWS = 50  # rule/user/place rows in one trusted_activity record
_IDLE_RETRY_SECONDS = 0.5
_S_IFMT = 0o170000
_FILE_TYPES = {stat.S_IFLNK: "symlink", stat.S_IFDIR: "dir"}  # anything else: "other"
_MODES = {m: f"{m:04o}" for m in range(0o10000)}  # permission bits -> "0644"
_IDS_CAP = 4096  # uid/gid -> text, cleared past this many
_STOP = object()


class _Ready:
    """A ready-made Event travelling the raw-event queue (it counts against the same cap)."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event


class LaneQueue:
    """Batches of raw events in lanes, each capped by event count, plus control items.

    `get` serves control items first (health records, checked events coming back from the
    enrichment worker, the stop sentinel), then the tagged lane, then egress, then staging:
    a flood in a staging place never delays a tagged-tree event. A tagged batch that finds
    no room makes its producer wait (backpressure: the kernel queue holds the burst); a
    batch for another lane that does not fit is cut at once (shed), counted by lane and
    location class, and `take_shed` hands the counts to whoever reports them."""

    def __init__(self, caps: Mapping[str, int]) -> None:
        self.caps = {lane: caps[lane] for lane in LANES}
        self._lanes: dict[str, deque[list[Any]]] = {lane: deque() for lane in LANES}
        self._sizes = dict.fromkeys(LANES, 0)
        self._control: deque[Any] = deque()
        self._stop: Any = None
        self._cond = threading.Condition()
        self.dropped = dict.fromkeys(LANES, 0)
        self._unreported: dict[tuple[str, str], int] = {}
        self._woken = False
        self.high_water = dict.fromkeys(LANES, 0)
        self.waits = 0

    @property
    def cap(self) -> int:
        return sum(self.caps.values())

    def put(
        self, lane: str, batch: list[Any], wait: float = 0.0, cut: list[Any] | None = None
    ) -> int:
        """Queue a batch in `lane`; returns how many items went in. With `wait`, a full lane
        makes the producer wait for room: the batch goes in piece by piece as the consumer
        frees room (a batch larger than the lane still fits in the end), and is cut only when
        no room came for `wait` seconds. What is cut is counted, and added to `cut` if given
        (a source can then look again for what it covered)."""
        cap = self.caps[lane]
        queued = 0
        with self._cond:
            if wait > 0 and cap - self._sizes[lane] < len(batch):
                deadline = time.monotonic() + wait
                while cap - self._sizes[lane] < len(batch):
                    room = cap - self._sizes[lane]
                    if room > 0:
                        self._lanes[lane].append(batch[:room])
                        self._sizes[lane] += room
                        self.high_water[lane] = max(self.high_water[lane], self._sizes[lane])
                        batch = batch[room:]
                        queued += room
                        self._cond.notify_all()
                        deadline = time.monotonic() + wait  # the consumer is moving
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.waits += 1
                    self._cond.wait(min(left, 0.05))
            room = cap - self._sizes[lane]
            if len(batch) > room:
                dropped = batch[max(room, 0) :]
                batch = batch[: max(room, 0)]
                self.dropped[lane] += len(dropped)
                for item in dropped:
                    key = (lane, getattr(item, "location", None) or lane)
                    self._unreported[key] = self._unreported.get(key, 0) + 1
                if cut is not None:
                    cut.extend(dropped)
            if batch:
                self._lanes[lane].append(batch)
                self._sizes[lane] += len(batch)
                self.high_water[lane] = max(self.high_water[lane], self._sizes[lane])
                queued += len(batch)
            self._cond.notify()
            return queued

    def put_control(self, item: Any) -> None:
        """Health records, checked events and the stop sentinel: never cut by a lane cap."""
        with self._cond:
            self._control.append(item)
            self._cond.notify()

    def put_stop(self, sentinel: Any) -> None:
        """`sentinel` comes out of `get` once everything queued before and after it has."""
        with self._cond:
            self._stop = sentinel
            self._cond.notify()

    def get(self, timeout: float) -> tuple[str | None, Any]:
        """(lane, batch) or (None, control item); (None, None) after `timeout` idle."""
        with self._cond:
            if (
                not self._control
                and not any(self._sizes.values())
                and not self._unreported
                and self._stop is None
                and not self._woken
            ):
                self._cond.wait(timeout)
            self._woken = False
            if self._control:
                return None, self._control.popleft()
            for lane in LANES:
                items = self._lanes[lane]
                if items:
                    batch = items.popleft()
                    self._sizes[lane] -= len(batch)
                    self._cond.notify_all()  # a producer may be waiting for room
                    return lane, batch
            if self._stop is not None:
                return None, self._stop
            return None, None

    def wake(self) -> None:
        """End a consumer's idle wait now (a new rule set, an expiry to run)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def take_shed(self) -> dict[tuple[str, str], int]:
        with self._cond:
            out, self._unreported = self._unreported, {}
            return out

    def size(self, lane: str) -> int:
        return self._sizes[lane]

    def __len__(self) -> int:
        return sum(self._sizes.values())


class _Checked:
    """Events back from the enrichment worker, to finish in the consumer (rules, sinks)."""

    __slots__ = ("events",)

    def __init__(self, events: list[Event]) -> None:
        self.events = events


class Stage(Protocol):
    """One enrichment step on the consumer's path: cheap and bounded (lookups, no reads of
    file content; those belong to a `ContentStage` in the enrichment worker)."""

    name: str

    def __call__(self, event: Event, /) -> Event: ...


class Pipeline:
    """Consumes raw events: stat, tags and location; then the declared enrichment stages in
    order; content checks in the worker; then the rules engine and the event sinks."""

    name = "pipeline"

    def __init__(
        self,
        router: Router,
        resolver: TagResolver,
        queue_size: int | Mapping[str, int],
        *,
        stages: Sequence[Stage] = (),
        content: ContentStage | None = None,
        source_name: str = "inotify",
        risk: RiskSettings | None = None,
    ) -> None:
        self.router = router
        self.risk = risk
        self.pseudonyms: Pseudonyms | None = None  # set by the builder (privacy.pseudonymize)
        self.resolver = resolver
        caps = dict.fromkeys(LANES, queue_size) if isinstance(queue_size, int) else dict(queue_size)
        self.queue = LaneQueue(caps)
        # How long a source waits for room in the tagged lane before its batch is cut.
        self.backpressure = 2.0
        self._expire_at: int | None = None
        self._state_wanted: threading.Event | None = None
        self._state: dict[str, Any] | None = None
        self.engine: Engine | None = None
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.content = content
        self.worker: EnrichmentWorker | None = None
        self.own_reads: OwnReads | None = None
        self.own_reads_dropped = 0
        self._next_engine: Engine | None = None
        self._hostname = socket.gethostname()
        self._sequence = 0
        self._thread: threading.Thread | None = None
        self._loop_at = time.monotonic()  # the consumer's last turn of its loop
        self._stopped = threading.Event()
        self._source_name = source_name
        self._health_pending = 0
        self._health_lock = threading.Lock()
        self.health_dropped = 0
        self._health_unreported = 0
        self.processed = 0
        self.stats_taken = 0  # lstat calls: at most one per path and batch
        self._ids: dict[int, str] = {}  # uid / gid -> its text
        self.batches = 0  # batches taken off the lanes (events per batch: processed / this)
        # The last event built, its raw event and its batch's stats, for the next event of
        # the same file (see _build).
        self._last_raw: RawEvent | None = None
        self._last_stats: dict[str, os.stat_result | None] | None = None
        self._last_event: Event | None = None
        self.processed_by_lane = dict.fromkeys(LANES, 0)
        self._last_retry = 0.0

    # producers -------------------------------------------------------------------------

    def emit(self, batch: list[RawEvent]) -> list[RawEvent]:
        """A source's batch, split into lanes by the location class of each event. Returns
        the events that found no room (each also counted for an `event_loss` record), so the
        source can rescan what they covered."""
        if not batch:
            return []
        lanes: dict[str, list[RawEvent]] = {}
        for raw in batch:
            lane = LANE_OF.get(raw.location, "staging")
            got = lanes.get(lane)
            if got is None:
                lanes[lane] = [raw]
            else:
                got.append(raw)
        cut: list[RawEvent] = []
        for lane in LANES:
            part = lanes.get(lane)
            if part:
                # Only the tagged lane makes the reader wait; the others are shed at once, so a
                # flood elsewhere can never hold the reader (and the tagged events behind it).
                # A rescan's pieces for egress places wait too: they are what a loss there left
                # to find, and shedding them would lose it again.
                wait = lane == "tagged" or (lane == "egress" and part[0].source == "rescan")
                self.queue.put(lane, part, wait=self.backpressure if wait else 0.0, cut=cut)
        return cut

    def emit_events(self, events: list[Event]) -> None:
        """Events built elsewhere (process starts): tags, location and rules still apply.
        Those on tagged paths go in the tagged lane, the rest are shed first."""
        tagged: list[Any] = []
        other: list[Any] = []
        for e in events:
            where = self.resolver.resolve_dir(e.path).location
            (tagged if where == "tagged" else other).append(_Ready(e))
        if tagged:
            self.queue.put("tagged", tagged)
        if other:
            self.queue.put("staging", other)

    def checked(self, events: list[Event]) -> None:
        """The enrichment worker's output: finished by the consumer, ahead of new batches."""
        if events:
            self.queue.put_control(_Checked(events))

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
            self._write_health(rec)
            return
        with self._health_lock:
            if self._health_pending >= _HEALTH_CAP and rec["event"].get("kind") != "alert":
                # The consumer is stuck: drop (alerts never), and say how many once it is not.
                self.health_dropped += 1
                self._health_unreported += 1
                return
            self._health_pending += 1
        self.queue.put_control(rec)

    # lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="exfilwatch-pipeline", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.drain()

    def drain(self, timeout: float = 1.5) -> bool:
        """Write what is queued (up to `timeout`), then stop. True when all was written."""
        if self._thread is None:
            return True
        self.queue.put_stop(_STOP)
        self._thread.join(timeout)
        drained = not self._thread.is_alive()
        self._stopped.set()
        self._thread = None
        return drained

    # consumer --------------------------------------------------------------------------

    def alive(self, within: float) -> bool:
        """The consumer runs and went round its loop within `within` seconds (it does at
        least every BEAT seconds): for systemd's watchdog."""
        thread = self._thread
        return (
            thread is not None
            and thread.is_alive()
            and time.monotonic() - self._loop_at < max(within, 2 * BEAT)
        )

    def _run(self) -> None:
        while True:
            self._loop_at = time.monotonic()
            # Idle, the consumer wakes every 30 s only: whatever needs it (an item, a new rule
            # set, an expiry, a shed count) wakes it at once; while a sink owes lines, twice a
            # second for its retries.
            idle = _IDLE_RETRY_SECONDS if self.router.owed() else until_beat()
            lane, item = self.queue.get(timeout=idle)
            try:
                self._turn(item)
            except Exception as exc:
                # Nothing may end the consumer (that would lose every later event).
                log.exception("pipeline_error")
                self._write_health(record("source_error", type(exc).__name__, stage="pipeline"))
            if item is _STOP:
                return
            if item is None:
                continue
            try:
                if isinstance(item, dict):
                    with self._health_lock:
                        self._health_pending -= 1
                    self._write_health(item)
                elif isinstance(item, _Checked):
                    self._finish(item.events)
                else:
                    assert lane is not None
                    self._process(lane, item)
            except Exception as exc:
                # One bad batch must not stop the consumer (that would lose every later event).
                log.exception("pipeline_error")
                if isinstance(item, _Checked):
                    lost = len(item.events)
                else:
                    lost = len(item) if isinstance(item, list) else 1
                self._write_health(
                    record("source_error", type(exc).__name__, stage="pipeline", lost=lost)
                )

    def _turn(self, item: Any) -> None:
        """Between two items: losses to report, window expiry, a new rule set, sink retries."""
        self._report_shed()
        if self._health_unreported:
            with self._health_lock:
                dropped, self._health_unreported = self._health_unreported, 0
            self._write_health(
                record(
                    "event_loss",
                    "health_queue_full",
                    dropped=dropped,
                    dropped_total=self.health_dropped,
                    queue_size=_HEALTH_CAP,
                    hint="health records were dropped while the consumer was stuck",
                )
            )
        if self._state_wanted is not None:
            done, self._state_wanted = self._state_wanted, None
            self._state = self.engine.export_state() if self.engine is not None else None
            done.set()
        if self._expire_at is not None and self.engine is not None:
            # Engine state is touched by this thread only: expiry runs here, not in the
            # scheduler's thread (a dict changing size mid-iteration would be the result).
            expire_at, self._expire_at = self._expire_at, None
            self.engine.expire(expire_at)
            self._report_trusted()
        elif item is _STOP:
            self._report_trusted()
        if item is None:
            if self._next_engine is not None:
                self._install_engine()
            self._retry_sinks()

    def _report_trusted(self) -> None:
        """What rules matched at trusted destinations since the last summary (they neither
        alerted nor fed correlations there): one record, so trusted volume stays visible."""
        engine = self.engine
        if engine is None:
            return
        counts = engine.take_trusted()
        if counts:
            self._write_health(
                record(
                    "trusted_activity",
                    "summary",
                    matches=sum(c["matches"] for c in counts),
                    bytes=sum(c.get("bytes", 0) for c in counts),
                    matches_total=engine.trusted_matched,
                    by=counts[:TRUSTED_SUMMARY_ROWS],
                    rows_left_out=max(0, len(counts) - TRUSTED_SUMMARY_ROWS),
                )
            )

    def _report_shed(self) -> None:
        shed = self.queue.take_shed()
        for (lane, location), n in sorted(shed.items()):
            self._write_health(
                record(
                    "event_loss",
                    "queue_full",
                    lane=lane,
                    location=location,
                    dropped=n,
                    dropped_total=self.queue.dropped[lane],
                    queue_size=self.queue.caps[lane],
                    hint="the tagged lane is never shed first; raise the lane's queue size "
                    "or exclude the noisy place"
                    if lane != "tagged"
                    else "the agent could not keep up with the tagged trees for 2 s; raise "
                    "queue_size or exclude noisy trees",
                )
            )

    def _retry_sinks(self) -> None:
        now = time.monotonic()
        if now - self._last_retry >= _IDLE_RETRY_SECONDS:
            self._last_retry = now
            self.router.retry()

    def _write_health(self, rec: dict[str, Any]) -> None:
        # A health record that is an alert (marker_tampered) goes where alerts go: a SIEM's
        # alert queue reads the alert route.
        kind = "alert" if rec["event"].get("kind") == "alert" else "health"
        if self.pseudonyms is not None:
            self.pseudonyms.record(rec)
        self.router.write(kind, [dumps(rec)])

    def _process(self, lane: str, batch: list[RawEvent]) -> None:
        resolver = self.resolver
        marker = resolver.marker_name
        if self._next_engine is not None:
            self._install_engine()
        stages = self.stages
        content = self.content
        worker = self.worker
        ready: list[Event] = []
        stats: dict[str, os.stat_result | None] = {}
        own = self.own_reads
        for raw in batch:
            if isinstance(raw, _Ready):
                event = self._ready(raw.event)
            else:
                if own and own.take(raw.path, raw.action):
                    self.own_reads_dropped += 1  # the agent hashing a tagged file: not a user
                    continue
                event = self._build(raw, resolver, marker, stats)
            for stage in stages:
                event = stage(event)
            if content is not None and content.wants(event):
                if worker is None:
                    event = content.content(event)[0]
                elif worker.submit(event):
                    continue  # finished when the worker hands it back
                else:
                    event = evolve(event, enrichment_skipped=worker.refused())
            ready.append(event)
        self.processed += len(batch)
        self.batches += 1
        self.processed_by_lane[lane] += len(batch)
        self._finish(ready)

    def _build(
        self,
        raw: RawEvent,
        resolver: TagResolver,
        marker: str,
        stats: dict[str, os.stat_result | None],
    ) -> Event:
        ts, action, path, src_path, is_dir, source, location = raw
        last = self._last_raw
        if (
            last is not None
            and last[2] == path
            and self._last_stats is stats
            and action in _PLAIN
            and last[0] == ts
            and last[3:] == raw[3:]
            and self._last_event is not None
        ):
            # The same file as the event before, in the same batch, by an action that
            # changes no tag, marker or tree (a write is opened, modified, closed_write): the
            # same fields but the action and sequence, from the same stat.
            self._sequence += 1
            built: Event = evolve(self._last_event, action=action, sequence=self._sequence)
            return built
        slash = path.rfind("/")
        directory = path[:slash] or "/"
        name = path[slash + 1 :]
        # Tags and markers belong to the tagged trees: what happens elsewhere (a marker file
        # or a mv loop in /tmp) never costs a marker parse or a cache flush, unless its other
        # end was in a tagged tree.
        tagged = location == "tagged"
        src_tagged = src_path is not None and (
            tagged
            or resolver.resolve_dir(src_path[: src_path.rfind("/")] or "/").location == "tagged"
        )
        if is_dir and action in _TREE_ACTIONS:
            if tagged:
                resolver.tree_changed(path)
            if src_path is not None and src_tagged:
                resolver.tree_changed(src_path)
        if not is_dir and (
            (tagged and name == marker)
            or (src_tagged and src_path is not None and src_path.endswith("/" + marker))
        ):
            self._marker_event(raw)
        resolved = resolver.resolve_dir(path if is_dir else directory)
        file_type = "dir" if is_dir else "file"
        size = uid = gid = inode = mode = mtime = nlink = None
        if action not in _NO_STAT:
            # One lstat per path per batch: a write is opened, modified and closed_write
            # events for the same file, read together, all answered by the same stat.
            if path in stats:
                st = stats[path]
            else:
                self.stats_taken += 1
                try:
                    st = os.lstat(path)
                except OSError:
                    st = None
                stats[path] = st
            if st is not None:
                st_mode = st.st_mode
                fmt = st_mode & _S_IFMT
                if fmt != stat.S_IFREG:
                    file_type = _FILE_TYPES.get(fmt, "other")
                size = st.st_size
                ids = self._ids
                uid = ids.get(st.st_uid)
                if uid is None:
                    uid = ids[st.st_uid] = str(st.st_uid)
                gid = ids.get(st.st_gid)
                if gid is None:
                    gid = ids[st.st_gid] = str(st.st_gid)
                if len(ids) > _IDS_CAP:
                    ids.clear()
                inode = str(st.st_ino)
                mode = _MODES[st_mode & 0o7777]
                mtime = st.st_mtime_ns // 1000
                if st.st_nlink > 1 and fmt == stat.S_IFREG:
                    nlink = st.st_nlink  # a second name elsewhere reaches the same content
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
            nlink=nlink,
        )
        if action in _PLAIN and src_path is None and not (tagged and name == marker):
            self._last_raw, self._last_stats, self._last_event = raw, stats, event
        else:
            self._last_raw = None
        return event

    def _finish(self, events: list[Event]) -> None:
        """Rules and sinks, in the order the engine sees the events (a replay of the written
        events gives the same alerts)."""
        if not events:
            return
        if self._next_engine is not None:
            self._install_engine()
        engine = self.engine
        lines: list[str] = []
        alerts: list[str] = []
        severities: list[int] = []
        want_lines = self.router.wants("event")
        hide = self.pseudonyms
        for event in events:
            if want_lines:
                lines.append(event_line(event if hide is None else hide.event(event)))
            if engine is not None:
                for alert in engine.process(event):
                    if self.risk is not None:
                        score_alert(alert, event, self.risk)
                    if hide is not None:
                        hide.record(alert)
                    alerts.append(dumps(stamp_created(alert)))
                    severities.append(int(alert["event"].get("severity") or 0))
        if lines:
            self.router.write("event", lines)
        if alerts:
            self.router.write("alert", alerts, severities)

    def _ready(self, e: Event) -> Event:
        # A process working on a tagged directory (`tar -C /srv/rnd/nova`) gets that
        # directory's tags, the root's own included: resolve the path itself, not its parent.
        path = e.path
        if not os.path.isdir(path):
            path = path[: path.rfind("/")] or "/"
        resolved = self.resolver.resolve_dir(path)
        self._sequence += 1
        return evolve(
            e,
            tags=resolved.tags,
            sensitivity=resolved.sensitivity,
            root=resolved.root,
            location=resolved.location if resolved.root is not None else None,
            sequence=self._sequence,
            hostname=self._hostname,
        )

    def engine_state(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The engine's correlation and suppression state (see Engine.export_state), taken on
        the consumer's thread between two items; directly when the consumer is not running.
        None when there is no engine or the consumer did not answer in time."""
        if self._thread is None:
            return self.engine.export_state() if self.engine is not None else None
        done = threading.Event()
        self._state_wanted = done
        self.queue.wake()
        if not done.wait(timeout):
            return None
        state, self._state = self._state, None
        return state

    def request_expiry(self, now_us: int) -> None:
        """Ask the consumer to drop stale correlation groups at its next turn."""
        self._expire_at = now_us
        self.queue.wake()

    def set_engine(self, engine: Engine) -> None:
        """Swap rule sets between two batches: intake never pauses, state of unchanged rules
        carries over (the consumer thread does the swap, so no batch sees half of each)."""
        if self._thread is None:
            if self.engine is not None:
                engine.adopt(self.engine)
            self.engine = engine
        else:
            self._next_engine = engine
            self.queue.wake()

    def _install_engine(self) -> None:
        new, self._next_engine = self._next_engine, None
        if new is None:
            return
        if self.engine is not None:
            new.adopt(self.engine)
        self.engine = new

    def _marker_event(self, raw: RawEvent) -> None:
        ts, action, path, src_path, _, source, _ = raw
        reload = action in _MARKER_ACTIONS or action == "moved"
        if action == "modified" and source != "inotify":
            reload = True  # no close-after-write event on every platform
        if not reload:
            return
        # Who changed the marker, for a marker_tampered record: the attribution stage runs
        # on this event here, since the event itself is attributed only after its tags are
        # resolved (lookups only: attributing it again later gives the same answer).
        by = Event(ts, action, path, src_path=src_path, source=source)
        attribute = next((s for s in self.stages if s.name == "attribution"), None)
        if attribute is not None:
            if action not in _NO_STAT:
                try:
                    owner: str | None = str(os.lstat(path).st_uid)  # for a creation
                except OSError:
                    owner = None
                by = evolve(by, uid=owner)
            by = attribute(by)
        directory = path[: path.rfind("/")] or "/"
        # Either end of a move may be the marker (renamed into place, or renamed away).
        self.resolver.marker_changed(directory, by)
        if src_path is not None:
            src_dir = src_path[: src_path.rfind("/")] or "/"
            if src_dir != directory:
                self.resolver.marker_changed(src_dir, by)

    def stats(self) -> dict[str, Any]:
        q = self.queue
        return {
            "queued": len(q),
            "queue_size": q.cap,
            "lanes": {
                lane: {
                    "queued": q.size(lane),
                    "queue_size": q.caps[lane],
                    "high_water": q.high_water[lane],
                    "dropped_total": q.dropped[lane],
                    "processed": self.processed_by_lane[lane],
                }
                for lane in LANES
            },
            "queue_waits": q.waits,
            "dropped_total": sum(q.dropped.values()),
            "processed": self.processed,
            "lstat_calls": self.stats_taken,
            "batches": self.batches,
            "own_reads_dropped": self.own_reads_dropped,
            "health_dropped": self.health_dropped,
        }


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
