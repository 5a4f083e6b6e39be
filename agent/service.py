"""Wiring and lifecycle: start bottom-up, stop top-down, reload without losing events."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import psutil
import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from agent import __version__
from agent.config import Config, WatchSpec, check_file
from agent.diagnostics import Problem, errors_only
from agent.enrich.tags import TagResolver
from agent.health import CapReporter, now_us, record
from agent.pipeline import Pipeline
from agent.rules.compiler import RuleSet, load_rules
from agent.rules.engine import Engine
from agent.sinks import Router
from agent.sources import Source, make_source

log = structlog.get_logger(__name__)

# Keys a reload cannot change on a running agent (they shape objects made at start).
_RESTART_KEYS = ("source", "queue_size", "inotify", "marker_name", "state_dir")


class Agent:
    """One running agent: sinks <- pipeline <- source, plus the scheduler beside them."""

    def __init__(
        self, config: Config, router: Router | None = None, own_paths: Sequence[str] = ()
    ) -> None:
        self.config = config
        self.router = router or Router.from_specs(config.sinks)
        self._own_router = router is None
        self.pipeline: Pipeline | None = None
        self.source: Source | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.caps: CapReporter | None = None
        self._started = 0.0
        self._lock = threading.Lock()
        self._process = psutil.Process()
        self._loaded_rules: RuleSet | None = None
        self._rule_problems: list[Problem] = []
        self._rule_signature: tuple[Any, ...] = ()
        self._pending_signature: tuple[Any, ...] | None = None
        self._stopped = False
        # Files the agent writes: never watched, or it would record its own writes forever.
        self._own_paths = [
            *own_paths,
            config.state_dir,
            *(s.path for s in config.sinks if s.path is not None),
        ]
        self._derived: list[WatchSpec] = []
        self._mount_specs: dict[str, WatchSpec] = {}
        self.mounts: Any = None
        self.lineage: Any = None
        self.processes: Any = None
        self.fanotify: Any = None

    def load_rules(self) -> bool:
        """Read and compile the configured rules before start; False (and problems) when bad."""
        self._rule_signature = rule_signature(self.config.rules)
        ruleset, problems = load_rules(self.config.rules, now_us())
        self._loaded_rules = ruleset
        self._rule_problems = problems
        return ruleset is not None

    @property
    def rule_problems(self) -> list[Problem]:
        return list(self._rule_problems)

    def install_rules(
        self, ruleset: RuleSet | None, problems: list[Problem], *, initial: bool = False
    ) -> bool:
        assert self.pipeline is not None
        if ruleset is None:
            self._report(
                record(
                    "rules_reload_rejected",
                    errors_only(problems)[0].code if errors_only(problems) else "invalid",
                    problems=[str(p) for p in errors_only(problems)][:50],
                    errors=len(errors_only(problems)),
                    kept="previous rule set",
                )
            )
            return False
        engine = Engine(ruleset, on_cap=self._engine_cap)
        self.pipeline.set_engine(engine)
        self._report(
            record(
                "rules_loaded" if initial else "rules_reloaded",
                None,
                rules=len(ruleset.rules),
                correlations=len(ruleset.correlations),
                disabled=len(ruleset.disabled),
                files=len(ruleset.files),
                sha256=ruleset.sha256,
                warnings=[str(p) for p in problems][:50],
            )
        )
        return True

    def _engine_cap(self, name: str, cap: int, data: dict[str, Any]) -> None:
        if self.caps is not None:
            self.caps.hit(name, cap, **data)

    def check_rules(self, force: bool = False) -> None:
        """Reload rules when their files changed and then stayed unchanged for one interval
        (an editor's save, a rename into place, or a config-management run touching many)."""
        with self._lock:
            signature = rule_signature(self.config.rules)
            if not force:
                if signature == self._rule_signature:
                    self._pending_signature = None
                    return
                if signature != self._pending_signature:
                    self._pending_signature = signature  # still changing: wait one more tick
                    return
            self._pending_signature = None
            self._rule_signature = signature
            ruleset, problems = load_rules(self.config.rules, now_us())
            self.install_rules(ruleset, problems)

    def expire_windows(self) -> None:
        if self.pipeline is not None:
            self.pipeline.request_expiry(now_us())

    def start(self) -> None:
        self._started = time.monotonic()
        if self.config.rules and self._loaded_rules is None and not self._rule_problems:
            self.load_rules()
        resolver_caps = CapReporter(self._report)
        self.caps = resolver_caps
        self._discover_destinations()
        resolver = TagResolver(
            self.all_specs(), self.config.marker_name, self._report, resolver_caps
        )
        source_name = self.config.source
        self.pipeline = Pipeline(self.router, resolver, self.config.queue_size)
        self.pipeline.destinations = self._make_destinations()
        self._make_attribution()
        self.pipeline.start()
        self.source, why = make_source(
            self.config, self.pipeline.emit, self._report, resolver_caps, self.all_specs()
        )
        self._report(record("source_selected", why, source=self.source.name))
        self._report(
            record(
                "agent_started",
                None,
                version=__version__,
                pid=os.getpid(),
                config=self.config.source_file,
                roots=[w.path for w in self.config.watch],
                source_setting=source_name,
            )
        )
        began = time.monotonic()
        self.source.start()
        self._report(
            record(
                "source_ready",
                None,
                seconds=round(time.monotonic() - began, 3),
                **self.source.stats(),
            )
        )
        if self.config.rules:
            self.install_rules(self._loaded_rules, self._rule_problems, initial=True)
        if self.lineage is not None:
            threading.Thread(
                target=self._build_lineage, name="exfilwatch-lineage", daemon=True
            ).start()
        self.scheduler = BackgroundScheduler(daemon=True)
        if self.processes is not None:
            self.scheduler.add_job(
                self.check_processes,
                "interval",
                seconds=self.config.processes.interval,
                id="processes",
                max_instances=1,
                coalesce=True,
            )
        if self.mounts is not None:
            self.scheduler.add_job(
                self.check_mounts,
                "interval",
                seconds=self.config.locations.mount_check_interval,
                id="mounts",
                max_instances=1,
                coalesce=True,
            )
        self.scheduler.add_job(
            self.heartbeat,
            "interval",
            seconds=self.config.heartbeat_interval,
            id="heartbeat",
            max_instances=1,
            coalesce=True,
        )
        if self.config.rules:
            self.scheduler.add_job(
                self.check_rules,
                "interval",
                seconds=self.config.rules_check_interval,
                id="rules_check",
                max_instances=1,
                coalesce=True,
            )
            self.scheduler.add_job(
                self.expire_windows, "interval", seconds=60, id="window_expiry", max_instances=1
            )
        self.scheduler.start()
        log.info("agent_started", source=self.source.name, roots=len(self.config.watch))

    # destinations ----------------------------------------------------------------------

    def all_specs(self) -> list[WatchSpec]:
        """The configured tagged trees plus the destinations found on this host."""
        return [*self.config.watch, *self._derived, *self._mount_specs.values()]

    def _discover_destinations(self) -> None:
        loc = self.config.locations
        self._derived = []
        if not loc.enabled:
            self.mounts = None
            return
        from agent.enrich.locations import cloud_sync_places, find_homes, staging_places
        from agent.sources.mounts import MountWatcher

        homes = find_homes(loc.home_roots)
        cloud = cloud_sync_places(homes) if loc.cloud_sync else []
        avoid = [w.path for w in self.config.watch] + [c.path for c in cloud] + self._own_paths
        self._derived = [*cloud, *staging_places(homes, loc.staging_dirs, avoid=avoid)]
        if self.mounts is None:
            self.mounts = MountWatcher(removable_patterns=loc.removable_patterns)
            added, _ = self.mounts.poll()
            for info in added:
                self._mount_specs[info.mount.mountpoint] = self._mount_spec(info)
        self._report(
            record(
                "destinations_watched",
                None,
                cloud_sync=[{"path": c.path, "provider": c.provider} for c in cloud],
                staging=[s.path for s in self._derived if s.location != "cloud_sync"],
                mounts=[
                    {"path": s.path, "class": s.location, "label": s.provider}
                    for s in self._mount_specs.values()
                ],
            )
        )

    def _mount_spec(self, info: Any) -> WatchSpec:
        return WatchSpec(
            info.mount.mountpoint,
            location=info.kind,
            provider=info.label,
            # Network shares can be huge: watch their top levels only.
            max_depth=None if info.kind == "removable" else 2,
            max_dirs=50_000 if info.kind == "removable" else 2_000,
        )

    def check_mounts(self) -> None:
        """Mounts and unmounts since the last check: record them, watch removable media and
        shares at once, drop watches of what went away."""
        if self.mounts is None:
            return
        try:
            added, removed = self.mounts.poll()
            if not added and not removed:
                return
            with self._lock:
                for info in added:
                    self._mount_specs[info.mount.mountpoint] = self._mount_spec(info)
                    self._report(record("media_mounted", info.kind, **_mount_data(info)))
                for info in removed:
                    self._mount_specs.pop(info.mount.mountpoint, None)
                    self._report(record("media_unmounted", info.kind, **_mount_data(info)))
                self._apply_specs()
        except Exception as exc:
            # A scheduled job must not fail silently inside the scheduler's own log.
            log.exception("mount_check_failed")
            self._report(record("source_error", type(exc).__name__, stage="mounts"))

    def _apply_specs(self) -> None:
        specs = self.all_specs()
        if self.pipeline is not None:
            self.pipeline.resolver.set_specs(specs)
        if self.source is not None:
            self.source.update(specs)

    def _make_destinations(self) -> Any:
        settings = self.config.lineage
        if not settings.enabled:
            self.lineage = None
        else:
            from agent.enrich.lineage import LineageIndex

            self.lineage = LineageIndex(
                max_files=settings.max_files,
                hash_max_bytes=settings.hash_max_bytes,
                io_budget=settings.io_budget_bytes,
                on_cap=self._engine_cap,
            )
        if self.lineage is None and not self.config.locations.enabled:
            return None
        from agent.enrich.destinations import Destinations, DestinationSettings

        return Destinations(self.lineage, DestinationSettings())

    def _make_attribution(self) -> None:
        settings = self.config.processes
        if not settings.enabled:
            return
        from agent.enrich.attribution import KNOWN_TOOLS, Attributor, ProcessTable

        self.processes = ProcessTable(tools=KNOWN_TOOLS)
        self.processes.poll()  # what runs already is known, not reported as started
        exact = None
        if settings.fanotify != "off":
            exact = self._start_fanotify(settings.fanotify == "on")
        if settings.attribution and self.pipeline is not None:
            self.pipeline.attributor = Attributor(self.processes, exact=exact)

    def _start_fanotify(self, required: bool) -> Any:
        try:
            from agent.sources.fanotify import FanotifyWatcher, available
        except ImportError:
            return None
        ok, why = available()
        if not ok:
            if required:  # `fanotify: on` asked for exact attribution: its absence is an error
                self._report(record("source_error", why, source="fanotify", required=True))
            else:
                self._report(record("source_selected", why, source="fanotify", active=False))
            return None
        try:
            self.fanotify = FanotifyWatcher([w.path for w in self.config.watch])
            self.fanotify.start()
        except OSError as exc:
            self._report(record("source_error", type(exc).__name__, source="fanotify"))
            self.fanotify = None
            return None
        self._report(record("source_selected", "exact pids for file events", source="fanotify"))
        from agent.enrich.attribution import kernel_lookup

        return kernel_lookup(self.fanotify, self.processes)

    def check_processes(self) -> None:
        """New processes since the last poll become process-started events."""
        if self.processes is None or self.pipeline is None:
            return
        try:
            new = self.processes.poll()
            if not new:
                return
            from agent.enrich.attribution import process_event

            roots = [w.path.rstrip("/") + "/" for w in self.config.watch]

            def tagged(path: str) -> bool:
                return any((path + "/").startswith(r) for r in roots)

            ts = now_us()
            self.pipeline.emit_events([process_event(p, ts, tagged) for p in new])
        except Exception as exc:
            log.exception("process_check_failed")
            self._report(record("source_error", type(exc).__name__, stage="processes"))

    def _build_lineage(self) -> None:
        assert self.lineage is not None and self.pipeline is not None
        from agent.sources.paths import compile_excludes

        began = time.monotonic()
        resolver = self.pipeline.resolver
        roots = [
            (w.path, compile_excludes(w.exclude), lambda d: resolver.resolve_dir(d).tags)
            for w in self.config.watch
        ]
        files = self.lineage.build(roots)
        self._report(
            record(
                "lineage_index_built",
                None,
                files=files,
                indexed=len(self.lineage),
                seconds=round(time.monotonic() - began, 3),
            )
        )

    def stop(self, timeout: float = 1.8) -> bool:
        """Stop within `timeout` seconds, writing what is queued. True when nothing was left."""
        if self._stopped:
            return True
        self._stopped = True
        deadline = time.monotonic() + timeout
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self.source is not None:
            self.source.stop()
            self.source = None
        if self.mounts is not None:
            self.mounts.close()
        if self.fanotify is not None:
            self.fanotify.stop()
        drained = True
        if self.pipeline is not None:
            left = max(0.1, deadline - time.monotonic() - 0.05)
            drained = self.pipeline.stop(timeout=left)
            unwritten = len(self.pipeline.queue)
            if unwritten:
                # Said as a loss, not only in the stop record: a SIEM alerts on event_loss.
                self._report(
                    record(
                        "event_loss",
                        "stopped_with_backlog",
                        unwritten=unwritten,
                        hint="the agent was stopped during a burst; events still queued were "
                        "not written",
                    )
                )
            self._report(
                record(
                    "agent_stopped",
                    None if drained else "drain_timeout",
                    drained=drained,
                    unwritten=len(self.pipeline.queue),
                    **self.pipeline.stats(),
                )
            )
        if self._own_router:
            self.router.close()
        log.info("agent_stopped", drained=drained)
        return drained

    def _report(self, rec: dict[str, Any]) -> None:
        if self.pipeline is not None:
            self.pipeline.report(rec)
        else:
            from agent.events import dumps

            self.router.write("health", [dumps(rec)])

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uptime_s": round(time.monotonic() - self._started, 1)}
        if self.pipeline is not None:
            out["pipeline"] = self.pipeline.stats()
        if self.source is not None:
            out["source"] = self.source.stats()
        if self.pipeline is not None and self.pipeline.engine is not None:
            out["engine"] = self.pipeline.engine.stats()
        if self.caps is not None and self.caps.hits:
            out["caps_hit"] = dict(self.caps.hits)
        with self._process.oneshot():
            cpu = self._process.cpu_times()
            out["process"] = {
                "rss_bytes": self._process.memory_info().rss,
                "cpu_user_s": round(cpu.user, 3),
                "cpu_system_s": round(cpu.system, 3),
                "threads": self._process.num_threads(),
            }
        return out

    def heartbeat(self) -> None:
        self._report(record("heartbeat", None, **self.stats()))

    def reload(self) -> bool:
        """Re-read the config file. A bad file keeps the running config and says why."""
        with self._lock:
            path = self.config.source_file
            new, problems = check_file(path)
            errors = errors_only(problems)
            if new is None or errors:
                self._report(
                    record(
                        "config_reload_rejected",
                        errors[0].code if errors else "invalid",
                        config=path,
                        problems=[str(p) for p in errors or problems],
                        kept="previous configuration",
                    )
                )
                return False
            restart = [k for k in _RESTART_KEYS if getattr(new, k) != getattr(self.config, k)]
            # What cannot change live stays as it is, and the record says so.
            for key in restart:
                new = replace(new, **{key: getattr(self.config, key)})
            assert self.pipeline is not None and self.source is not None
            if new.sinks != self.config.sinks and self._own_router:
                self.router.replace(new.sinks)
            self.config = new
            self._discover_destinations()
            self._apply_specs()
            if self.fanotify is not None:
                self.fanotify.update([w.path for w in new.watch])
            if new.rules:
                ruleset, rule_problems = load_rules(new.rules, now_us())
                self._rule_signature = rule_signature(new.rules)
                self.install_rules(ruleset, rule_problems)
            self._report(
                record(
                    "config_reloaded",
                    None,
                    config=path,
                    roots=[w.path for w in new.watch],
                    needs_restart=restart,
                    warnings=[str(p) for p in problems],
                )
            )
            return True


def _mount_data(info: Any) -> dict[str, Any]:
    data: dict[str, Any] = info.to_dict()
    data["classified_by"] = data.pop("reason", None)
    return data


def rule_signature(paths: tuple[str, ...] | list[str]) -> tuple[Any, ...]:
    """What the rule files look like on disk (names, sizes, mtimes, inodes)."""
    from agent.rules.loader import rule_files

    files, _ = rule_files(paths)
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        out.append((f, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)
