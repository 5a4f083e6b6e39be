"""The typed builder: every runtime component, wired from the config, in start order."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.components import Component
from agent.config import Config, WatchSpec
from agent.enrich.history import UserHistory
from agent.enrich.ownreads import OwnReads
from agent.enrich.tags import TagResolver
from agent.enrich.watchlist import WatchlistStage
from agent.enrich.worker import EnrichmentWorker, WorkerSettings
from agent.health import CapReporter, Reporter, record
from agent.pipeline import Pipeline, Stage
from agent.risk import OffHours
from agent.sinks import Router
from agent.sources import Source, make_source

if TYPE_CHECKING:
    from agent.enrich.attribution import Attributor, ExactLookup, Proc, ProcessTable
    from agent.enrich.destinations import Destinations
    from agent.enrich.lineage import LineageIndex
    from agent.sources.fandirs import DirEventsWatcher
    from agent.sources.fanotify import FanotifyWatcher
    from agent.sources.mounts import MountWatcher
    from agent.sources.paths import Excludes
    from agent.sources.procevents import ProcEvent
    from agent.sources.procsnap import ProcEventsProcess, Snapshot


# A tagged tree to index: its path, its excludes, and how to find a directory's tags.
LineageRoot = tuple[str, "Excludes", Callable[[str], tuple[str, ...]]]


class LineageBuilder:
    """Walks the tagged trees once, in the background, to fill the lineage index."""

    name = "lineage_builder"

    def __init__(
        self,
        index: LineageIndex,
        roots: Callable[[], list[LineageRoot]],
        report: Reporter,
    ) -> None:
        self.index = index
        self._roots = roots
        self._report = report
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.files = 0
        self.seconds: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="exfilwatch-lineage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        began = time.monotonic()
        try:
            self.files = self.index.build(self._roots(), cancel=self._cancel)
        except Exception as exc:
            self._report(record("source_error", type(exc).__name__, stage="lineage_builder"))
            return
        if self._cancel.is_set():
            return
        self.seconds = round(time.monotonic() - began, 3)
        self._report(
            record(
                "lineage_index_built",
                None,
                files=self.files,
                indexed=len(self.index),
                seconds=self.seconds,
            )
        )

    def stop(self) -> None:
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def stats(self) -> dict[str, Any]:
        return {
            "files_walked": self.files,
            "indexed": len(self.index),
            "build_seconds": self.seconds,
            **self.index.stats,
        }


@dataclass
class Components:
    """What one running agent is made of. `ordered()` is the start order (bottom-up: the
    consumer before its producers); the service stops them in reverse."""

    resolver: TagResolver
    pipeline: Pipeline
    source: Source
    worker: EnrichmentWorker | None = None
    lineage: LineageIndex | None = None
    lineage_builder: LineageBuilder | None = None
    destinations: Destinations | None = None
    processes: ProcessTable | None = None
    attributor: Attributor | None = None
    fanotify: FanotifyWatcher | None = None
    fanotify_dirs: DirEventsWatcher | None = None
    proc_events: ProcEventsProcess | None = None
    mounts: MountWatcher | None = None
    watchlist: WatchlistStage | None = None
    history: UserHistory | None = None
    extra: list[Component] = field(default_factory=list)

    def ordered(self) -> list[Component]:
        parts: list[Component | None] = [
            self.pipeline,
            self.worker,
            self.lineage_builder,
            self.processes,
            self.proc_events,
            self.fanotify,
            self.fanotify_dirs,
            self.mounts,
            *self.extra,
            self.source,
        ]
        return [p for p in parts if p is not None]


def build(
    config: Config,
    router: Router,
    report: Reporter,
    caps: CapReporter,
    specs: Sequence[WatchSpec],
    *,
    mounts: MountWatcher | None = None,
    on_started: Callable[[list[Proc]], None] | None = None,
) -> Components:
    """Construct (not start) every component for `config`; `specs` are the tagged trees plus
    the destinations found on this host, `mounts` the watcher that found the media."""
    resolver = TagResolver(specs, config.marker_name, report, caps, state_dir=config.state_dir)
    lineage = _lineage(config, caps)
    destinations = None
    if lineage is not None or config.locations.enabled:
        from agent.enrich.destinations import Destinations, DestinationSettings
        from agent.enrich.repos import RepoIndex

        destinations = Destinations(
            lineage,
            DestinationSettings(decode_max_bytes=config.enrichment.decode_max_bytes),
            resolve_dir=resolver.resolve_dir,
            repos=RepoIndex(
                lambda: [w.path for w in config.watch],
                announce=_announce(lineage),
                on_cap=caps.hit,
            ),
            on_cap=caps.hit,
        )
    processes = attributor = fanotify = fanotify_dirs = None
    proc_events = None
    stages: list[Stage] = []
    if destinations is not None:
        stages.append(destinations)
    if config.processes.enabled:
        from agent.enrich.attribution import KNOWN_TOOLS, Attributor, ProcessTable

        processes = ProcessTable(report=report, tools=KNOWN_TOOLS)
        if config.processes.source != "poll" and sys.platform.startswith("linux"):
            from agent.sources.procsnap import ProcEventsProcess

            table = processes

            def started(events: list[ProcEvent], snapshots: dict[int, Snapshot]) -> None:
                procs = table.on_kernel_events(events, snapshots)
                if procs and on_started is not None:
                    on_started(procs)

            proc_events = ProcEventsProcess(started, report)
            processes.sync = proc_events.sync
        exact = dir_exact = None
        if config.processes.fanotify != "off":
            fanotify, exact = _fanotify(config, processes, report)
        if config.processes.fanotify_dirs != "off":
            fanotify_dirs, dir_exact = _fanotify_dirs(config, processes, report)
        if config.processes.attribution:
            from agent.enrich.attribution import first_of

            attributor = Attributor(processes, exact=first_of(dir_exact, exact), on_cap=caps.hit)
            stages.append(attributor)
    if config.trusted:
        from agent.enrich.trusted import TrustedStage

        # After attribution: a copy tool's destination is read from its arguments.
        stages.append(TrustedStage(config.trusted, mounts.kind_of if mounts else None))
    if config.working_hours is not None:
        stages.append(OffHours(config.working_hours))
    watchlist = WatchlistStage()  # after attribution: it looks at the user found
    stages.append(watchlist)
    history = UserHistory(on_cap=caps.hit)
    stages.append(history)
    pipeline = Pipeline(
        router,
        resolver,
        {
            "tagged": config.queue_size,
            "egress": config.egress_queue_size,
            "staging": config.staging_queue_size,
        },
        stages=stages,
        content=destinations,
        risk=config.risk,
    )
    if config.pseudonymize:
        from agent.privacy import KEY_FILE, Pseudonyms, load_or_make_key

        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        pipeline.pseudonyms = Pseudonyms(load_or_make_key(os.path.join(config.state_dir, KEY_FILE)))
    if lineage is not None:
        own_reads = OwnReads(on_cap=caps.hit)
        lineage.own_reads = own_reads
        pipeline.own_reads = own_reads
    worker = None
    if destinations is not None:
        e = config.enrichment
        worker = EnrichmentWorker(
            destinations,
            WorkerSettings(
                queue_size=e.queue_size,
                per_user_queue=e.per_user_queue,
                max_delay=e.max_delay,
                io_budget_bytes=e.io_budget_bytes,
                cpu_budget=e.cpu_budget,
            ),
            report,
            pipeline.checked,
        )
        pipeline.worker = worker
    lineage_builder = None
    if lineage is not None:
        from agent.sources.paths import compile_excludes

        def roots() -> list[LineageRoot]:
            return [
                (w.path, compile_excludes(w.exclude), lambda d: resolver.resolve_dir(d).tags)
                for w in config.watch
            ]

        lineage_builder = LineageBuilder(lineage, roots, report)
    source, why = make_source(config, pipeline.emit, report, caps, specs)
    report(record("source_selected", why, source=source.name))
    return Components(
        resolver=resolver,
        pipeline=pipeline,
        source=source,
        worker=worker,
        lineage=lineage,
        lineage_builder=lineage_builder,
        destinations=destinations,
        processes=processes,
        proc_events=proc_events,
        attributor=attributor,
        fanotify=fanotify,
        fanotify_dirs=fanotify_dirs,
        mounts=mounts,
        watchlist=watchlist,
        history=history,
    )


def _lineage(config: Config, caps: CapReporter) -> LineageIndex | None:
    settings = config.lineage
    if not settings.enabled:
        return None
    from agent.enrich.lineage import LineageIndex

    def on_cap(name: str, cap: int, data: dict[str, Any]) -> None:
        caps.hit(name, cap, **data)

    return LineageIndex(
        max_files=settings.max_files,
        hash_max_bytes=settings.hash_max_bytes,
        io_budget=settings.io_budget_bytes,
        on_cap=on_cap,
    )


def _fanotify(
    config: Config, processes: ProcessTable, report: Reporter
) -> tuple[FanotifyWatcher | None, ExactLookup | None]:
    """The fanotify reader when it can run here, and the exact-pid lookup it gives."""
    required = config.processes.fanotify == "on"
    try:
        from agent.sources.fanotify import FanotifyWatcher, available
    except ImportError:
        return None, None
    ok, why = available()
    if not ok:
        if required:  # `fanotify: on` asked for exact attribution: its absence is an error
            report(record("source_error", why, source="fanotify", required=True))
        else:
            report(record("source_selected", why, source="fanotify", active=False))
        return None, None
    from agent.enrich.attribution import kernel_lookup

    watcher = FanotifyWatcher([w.path for w in config.watch], report=report)
    return watcher, kernel_lookup(watcher, processes)


def _fanotify_dirs(
    config: Config, processes: ProcessTable, report: Reporter
) -> tuple[DirEventsWatcher | None, ExactLookup | None]:
    """Who created, deleted or renamed a file (fanotify directory-entry events on the
    filesystems holding the trees) when it can run here, and the exact-pid lookup it gives."""
    required = config.processes.fanotify_dirs == "on"
    try:
        from agent.sources.fandirs import DirEventsWatcher, available
    except ImportError:
        return None, None
    ok, why = available()
    if not ok:
        if required:
            report(record("source_error", why, source="fanotify_dirs", required=True))
        else:
            report(record("source_selected", why, source="fanotify_dirs", active=False))
        return None, None
    from agent.enrich.attribution import dir_kinds, kernel_lookup

    watcher = DirEventsWatcher([w.path for w in config.watch], report=report)
    return watcher, kernel_lookup(watcher, processes, dir_kinds, frozenset({"modified"}))


def _announce(lineage: LineageIndex | None) -> Callable[[str], None] | None:
    """Tell the own-reads ledger (set on the index once built) about a read of a tagged file
    the agent is about to make, so it is never reported as a user's."""
    if lineage is None:
        return None

    def announce(path: str) -> None:
        if lineage.own_reads is not None:
            lineage.own_reads.expect(path)

    return announce
