"""Portable source on watchdog (FSEvents, ReadDirectoryChangesW, kqueue, inotify, polling)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from agent.config import WatchSpec
from agent.health import Reporter, now_us, record
from agent.sources.base import EmitBatch, RawEvent, wanted_outside_tagged
from agent.sources.paths import Excludes, compile_excludes

log = structlog.get_logger(__name__)

_ACTIONS = {
    "created": "created",
    "modified": "modified",
    "deleted": "deleted",
    "moved": "moved",
    "opened": "opened",
    "closed": "closed_write",
    "closed_no_write": "closed_nowrite",
    "attrib": "attributes_changed",
}


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into raw events. Never raises: an exception escaping a watchdog
    handler kills the observer's dispatch thread and every later event with it."""

    def __init__(self, source: WatchdogSource, spec: WatchSpec, excludes: Excludes) -> None:
        self._source = source
        self._spec = spec
        self._excludes = excludes
        self._root = spec.path.rstrip("/") or "/"

    def _excluded(self, path: str) -> bool:
        if not self._excludes:
            return False
        rel = path[len(self._root) :].lstrip("/")
        return self._excludes.excluded(rel)

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception as exc:
            self._source.handler_failed(exc)

    def _dispatch(self, event: FileSystemEvent) -> None:
        action = _ACTIONS.get(event.event_type)
        if action is None:
            return
        is_dir = event.is_directory
        if is_dir and action in ("modified", "opened", "closed_nowrite", "attributes_changed"):
            return  # a directory's own modified event repeats its children's events
        path = os.fsdecode(event.src_path)
        name = os.path.basename(path)
        if name == self._source.marker_name and action in ("opened", "closed_nowrite"):
            return
        loc = self._spec.location
        if action == "moved":
            dest = os.fsdecode(event.dest_path)
            src_out = self._excluded(path)
            dst_out = self._excluded(dest)
            if src_out and dst_out:
                return
            if dst_out:
                raw = RawEvent(now_us(), "moved_out", path, None, is_dir, self._source.name, loc)
            elif src_out:
                raw = RawEvent(now_us(), "moved_in", dest, None, is_dir, self._source.name, loc)
            else:
                raw = RawEvent(now_us(), "moved", dest, path, is_dir, self._source.name, loc)
        else:
            if self._excluded(path):
                return
            raw = RawEvent(now_us(), action, path, None, is_dir, self._source.name, loc)
        if loc != "tagged" and not wanted_outside_tagged(raw.action, is_dir, raw.source):
            self._source.counters["filtered"] += 1
            return
        self._source.emit([raw])


class WatchdogSource:
    """One watchdog observer; each root is a scheduled watch, re-scheduled if it comes back."""

    def __init__(
        self,
        specs: Sequence[WatchSpec],
        emit: EmitBatch,
        report: Reporter,
        *,
        polling: bool = False,
        marker_name: str = ".exfilwatch.yaml",
        root_check_interval: float = 5.0,
        polling_interval: float = 1.0,
    ) -> None:
        self.name = "polling" if polling else "watchdog"
        self.marker_name = marker_name
        self._emit = emit
        self._report = report
        self._polling = polling
        self._polling_interval = polling_interval
        self._specs = list(specs)
        self._watches: dict[WatchSpec, ObservedWatch] = {}
        self._observer: BaseObserver | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._checker: threading.Thread | None = None
        self._root_check_interval = root_check_interval
        self.counters = {"emitted": 0, "handler_errors": 0, "filtered": 0}
        self._actions: frozenset[str] | None = None

    def set_actions(self, actions: frozenset[str] | None) -> None:
        # watchdog's observers have no per-action mask: what nobody uses is dropped here.
        self._actions = actions

    def emit(self, batch: list[RawEvent]) -> None:
        actions = self._actions
        if actions is not None:
            kept = [e for e in batch if e.action in actions]
            self.counters["filtered"] += len(batch) - len(kept)
            batch = kept
            if not batch:
                return
        self.counters["emitted"] += len(batch)
        self._emit(batch)

    def handler_failed(self, exc: Exception) -> None:
        self.counters["handler_errors"] += 1
        log.error("handler_error", error=type(exc).__name__)
        self._report(record("source_error", type(exc).__name__, message=str(exc)))

    def start(self) -> None:
        if self._polling:
            self._observer = PollingObserver(timeout=self._polling_interval)
        else:
            self._observer = Observer()
        with self._lock:
            for spec in self._specs:
                self._schedule(spec, first=True)
        self._observer.start()
        self._checker = threading.Thread(
            target=self._check_roots, name="exfilwatch-roots", daemon=True
        )
        self._checker.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._checker is not None:
            self._checker.join(timeout=5)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def update(self, specs: Sequence[WatchSpec]) -> None:
        with self._lock:
            new = list(specs)
            for spec in list(self._watches):
                if spec not in new:
                    self._unschedule(spec)
            self._specs = new
            for spec in new:
                if spec not in self._watches:
                    self._schedule(spec, first=True)

    def rescan(self, since_us: int, reason: str) -> None:
        # No walk of its own here: the record says nothing was looked for, not that nothing
        # was found.
        self._report(
            record(
                "rescan_completed",
                reason,
                since_us=since_us,
                scanned=0,
                changed=0,
                supported=False,
                hint=f"the {self.name} source does not rescan; changes made meanwhile were not "
                "looked for",
            )
        )

    def stats(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "roots": {
                s.path: ("watching" if s in self._watches else "missing") for s in self._specs
            },
            **self.counters,
        }

    def _schedule(self, spec: WatchSpec, first: bool) -> bool:
        assert self._observer is not None
        if not os.path.isdir(spec.path):
            if first:
                self._report(
                    record(
                        "watch_root_missing",
                        "not_found",
                        root=spec.path,
                        hint="it will be watched as soon as it appears",
                    )
                )
            return False
        handler = _Handler(self, spec, compile_excludes(spec.exclude))
        try:
            self._watches[spec] = self._observer.schedule(
                handler, spec.path, recursive=spec.recursive
            )
        except OSError as exc:
            self._report(record("source_error", type(exc).__name__, root=spec.path))
            return False
        return True

    def _unschedule(self, spec: WatchSpec) -> None:
        watch = self._watches.pop(spec, None)
        if watch is not None and self._observer is not None:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(watch)

    def _check_roots(self) -> None:
        # watchdog's emitter for a deleted root dies and never comes back by itself, so the
        # root is unscheduled when it goes and scheduled again when it reappears.
        while not self._stopping.wait(self._root_check_interval):
            with self._lock:
                for spec in self._specs:
                    present = os.path.isdir(spec.path)
                    if spec in self._watches and not present:
                        self._unschedule(spec)
                        self._report(record("watch_root_vanished", "deleted", root=spec.path))
                    elif spec not in self._watches and present and self._schedule(spec, False):
                        self._report(record("watch_root_restored", None, root=spec.path))
