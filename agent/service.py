"""Wiring and lifecycle: start bottom-up, stop top-down, reload without losing events."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import gc
import hashlib
import json
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import psutil
import structlog

from agent import __version__, watchlist
from agent.beat import BEAT, next_beat, until_beat
from agent.builder import Components, build
from agent.components import Component
from agent.config import Config, WatchSpec, check_file
from agent.diagnostics import Problem, check_permissions, errors_only
from agent.events import format_timestamp
from agent.health import CapReporter, now_us, record
from agent.pipeline import Pipeline
from agent.rules.compiler import RuleSet, load_rules
from agent.rules.engine import Engine
from agent.sinks import Router, SinkOpenError
from agent.sinks.outbox import OUTBOX_DIR, Outbox
from agent.sources import Source
from agent.sources.base import OPTIONAL_ACTIONS, needed_actions
from agent.state import AgentState, PreviousRun, write_private

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from agent.enrich.attribution import Proc, ProcessTable
    from agent.enrich.lineage import LineageIndex
    from agent.metrics import Metrics
    from agent.sources.fanotify import FanotifyWatcher
    from agent.sources.mounts import MountInfo, MountWatcher

log = structlog.get_logger(__name__)

# The state file says the agent was alive: written every 30 s while events flow, at least
# every 60 s when idle (a crash is then dated to within a minute; nothing changed in the
# trees while idle, so the downtime rescan that follows finds the same files either way).
STATE_CHECKPOINT_SECONDS = 30.0
# With the kernel's process events, the process table is read at once when the reader says
# events were lost (a receive buffer overrun, a sequence gap), and this often as a safety
# net: what was lost is found (as process_started events from process_poll). Each timed run
# costs an idle agent a read of every process.
PROCESS_RECONCILE_SECONDS = 300.0
# With a source that says when the mount table changes, the mounts job runs then, plus this
# often as a safety net (each timed run of a job costs an idle agent milliseconds of CPU).
MOUNTS_SAFETY_SECONDS = 30.0
STATE_CHECKPOINT_IDLE_SECONDS = 60.0
ENGINE_STATE_FILE = "engine.state.json"
HISTORY_FILE = "history.state.json"
ENGINE_STATE_MAX_BYTES = 64 * 1024 * 1024
# Keys a reload cannot change on a running agent (they shape objects made at start).
_RESTART_KEYS = (
    "source",
    "queue_size",
    "egress_queue_size",
    "staging_queue_size",
    "enrichment",
    "inotify",
    "marker_name",
    "state_dir",
)


class Agent:
    """One running agent: sinks <- pipeline <- source, plus the scheduler beside them."""

    def __init__(
        self, config: Config, router: Router | None = None, own_paths: Sequence[str] = ()
    ) -> None:
        self.config = config
        self._outbox_problem: dict[str, Any] | None = None
        self.router = router or Router.from_specs(
            config.sinks, outbox=self._open_outbox(config), threaded=True
        )
        self._own_router = router is None
        self.metrics: Metrics | None = None
        self._rate_at = (time.monotonic(), 0, 0)  # for events/s and alerts/s in the heartbeat
        self._lane_counts: dict[str, int] = {}  # events processed per lane, at _rate_at
        self.scheduler: BackgroundScheduler | None = None
        self._written: dict[str, bytes] = {}  # state file -> digest of what was written last
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
        self.mounts: MountWatcher | None = None
        self.parts: Components | None = None
        self._running: list[Component] = []
        self.state = AgentState(config.state_dir)
        # For `exfilwatch status` (agent/status.py): the last heartbeat's counters, the last
        # reload's outcome, when the agent started (wall clock).
        self._last_stats: dict[str, Any] = {}
        self._last_reload: dict[str, Any] | None = None
        self._started_wall = time.time()
        self._status_error: str | None = None
        # One writer at a time: heartbeats, reloads and the stop write it from their threads
        # through one temporary name.
        self._status_lock = threading.Lock()
        # The config file as this run read it (for config_changed): taken now, so an edit
        # made while the agent starts is still a change.
        self._config_identity: dict[str, Any] | None = (
            _file_identity(config.source_file) if config.source_file else None
        )
        # The agent's own installed code, as this run loaded it (for agent_files_changed).
        self._code_identity = _code_identity()
        self._state_error: str | None = None
        self._ruleset: RuleSet | None = None
        self._actions: frozenset[str] | None = None
        self._actions_known = False
        self._ticker: threading.Thread | None = None
        self._ticking = threading.Event()  # set: the file-checks thread ends
        self._tick_wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watchlist_signature: tuple[int, ...] | None = (-1,)
        self._watchlist_entries: list[watchlist.Entry] = []
        self._watchlist_day: dt.date | None = None
        self._checkpoint_processed = -1
        self._checkpoint_at = 0.0

    def _open_outbox(self, config: Config) -> Outbox | None:
        """The outbox under state_dir; in memory (and said so at start) when it cannot be
        opened there, since an agent that delivers without a disk queue beats one that stops."""
        if not config.outbox.enabled:
            return None
        settings = config.outbox
        try:
            os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
            return Outbox(
                os.path.join(config.state_dir, OUTBOX_DIR),
                max_rows=settings.max_records,
                max_bytes=settings.max_bytes,
                sync=settings.sync,
            )
        except OSError as exc:
            log.exception("outbox_error", error=str(exc))
            self._outbox_problem = record(
                "outbox_error",
                _errno_name(exc),
                error=str(exc),
                state_dir=config.state_dir,
                hint="alerts are kept in memory only until the state directory is usable; "
                "they are lost if the agent stops",
            )
            return None

    def check_watchlist(self) -> None:
        """Pick up watchlist changes (the file's identity changed) and window edges (the day
        changed): events then carry the new statuses. A bad file keeps the last good list."""
        try:
            self._check_watchlist()
        except Exception as exc:
            # A scheduled job must not fail silently inside the scheduler's own log.
            log.exception("watchlist_check_failed")
            self._report(record("source_error", type(exc).__name__, component="watchlist"))

    def _tick(self) -> None:
        """Rule files and the watchlist, checked when inotify says their directories changed
        (and, while a rule change settles, every rules_check_interval); otherwise every
        FILE_CHECK_SAFETY seconds and at local midnight (watch windows open and close by
        date). A timed wake costs milliseconds of CPU on some machines, so an idle agent
        wakes for these checks only a few times a minute. Without inotify: the configured
        intervals. The safety checks fall on the agent's idle beat (agent/beat.py)."""
        watcher = _DirWatcher(self._file_check_dirs())
        try:
            rules_every = self.config.rules_check_interval
            wl_every = self.config.watchlist.check_interval
            quiet = watcher.ok  # then the safety checks fall on the agent's idle beat

            def safety() -> float:
                return until_beat(FILE_CHECK_SAFETY)

            now = time.monotonic()
            next_rules = now + (safety() if quiet else rules_every)
            if not self.config.rules:
                next_rules = float("inf")
            next_wl = now + min(safety() if quiet else wl_every, _to_midnight())
            while True:
                timeout = max(min(next_rules, next_wl) - time.monotonic(), 0.0)
                changed = watcher.wait(timeout, self._tick_wake[0])
                if self._ticking.is_set():
                    return
                now = time.monotonic()
                if changed:
                    next_wl = now
                    if self.config.rules:
                        next_rules = now
                    self.check_config_file()
                    self.check_code_files()
                if now >= next_rules:
                    try:
                        self.check_rules()
                    except Exception as exc:
                        log.exception("rules_check_failed")
                        self._report(record("source_error", type(exc).__name__, component="rules"))
                    settling = self._pending_signature is not None
                    next_rules = now + (rules_every if settling or not quiet else safety())
                if now >= next_wl:
                    self.check_watchlist()
                    next_wl = now + min(safety() if quiet else wl_every, _to_midnight())
        finally:
            watcher.close()

    def _file_check_dirs(self) -> dict[str, frozenset[str] | None]:
        """Directory -> the names in it whose change is news (None: any). The state dir is
        written by the agent itself (status, checkpoints) and a config's directory may hold
        other busy files: only the watchlist and the config wake the checks there."""
        dirs: dict[str, frozenset[str] | None] = {}

        def want(directory: str, names: frozenset[str] | None) -> None:
            if directory in dirs:
                have = dirs[directory]
                dirs[directory] = None if have is None or names is None else have | names
            else:
                dirs[directory] = names

        want(self.config.state_dir, frozenset({watchlist.WATCHLIST_FILE}))
        if self.config.source_file and os.path.isfile(self.config.source_file):
            source = os.path.abspath(self.config.source_file)
            want(os.path.dirname(source), frozenset({os.path.basename(source)}))
        for directory in sorted({os.path.dirname(p) for p in self._code_identity}):
            want(directory, None)
        for path in self.config.rules:
            want(path if os.path.isdir(path) else os.path.dirname(path) or ".", None)
        return dirs

    def _check_watchlist(self) -> None:
        parts = self.parts
        if parts is None or parts.watchlist is None:
            return
        path = watchlist.store_path(self.config.state_dir)
        try:
            st = os.stat(path)
            signature: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        today = dt.date.today()
        changed = signature != self._watchlist_signature
        if changed:
            self._watchlist_signature = signature
            entries, problems = self._load_watchlist(path, signature is not None)
            if entries is None:
                errors = errors_only(problems)
                log.error("watchlist_rejected", problems=len(errors))
                self._report(
                    record(
                        "watchlist_rejected",
                        errors[0].code if errors else "WL_INVALID",
                        file=path,
                        problems=[str(p) for p in errors[:20]],
                        kept_entries=len(self._watchlist_entries),
                        hint="the last good list stays in force; fix the file or use "
                        "`exfilwatch watchlist` to rewrite it",
                    )
                )
                changed = False
            else:
                self._watchlist_entries = entries
        if not changed and today == self._watchlist_day:
            return
        self._watchlist_day = today
        before = parts.watchlist.active
        now = watchlist.active(self._watchlist_entries, today)
        parts.watchlist.set(now)
        if changed:
            self._report(
                record(
                    "watchlist_loaded",
                    None,
                    file=path,
                    entries=len(self._watchlist_entries),
                    active=len(now),
                )
            )
        for user in sorted(now.keys() - before.keys()):
            status = now[user]
            self._report(
                record(
                    "watchlist_entered",
                    status.type,
                    user=user,
                    last_day=status.last_day.isoformat(),
                    days_to_last_day=status.days_to_last_day,
                )
            )
        for user in sorted(before.keys() - now.keys()):
            self._report(record("watchlist_left", before[user].type, user=user))

    def _load_watchlist(
        self, path: str, exists: bool
    ) -> tuple[list[watchlist.Entry] | None, list[Problem]]:
        if not exists:
            return [], []
        unsafe = errors_only(check_permissions(path, "WL"))
        if unsafe:
            return None, unsafe
        return watchlist.load(path)

    def load_rules(self) -> bool:
        """Read and compile the configured rules before start; False (and problems) when bad."""
        self._rule_signature = rule_signature(self.config.rules)
        ruleset, problems = self._compile_rules(self.config.rules)
        self._loaded_rules = ruleset
        self._rule_problems = problems
        return ruleset is not None

    def _compile_rules(
        self, paths: Sequence[str], mode: str | None = None
    ) -> tuple[RuleSet | None, list[Problem]]:
        """The rule set as the config's `rule_errors` wants it (quarantine or fatal)."""
        mode = mode or self.config.rule_errors
        return load_rules(paths, now_us(), keep_going=mode == "quarantine")

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
        if ruleset.rejected:
            kept = self._keep_good_versions(ruleset) if not initial else []
            self._report(
                record(
                    "rules_rejected",
                    errors_only(problems)[0].code if errors_only(problems) else "invalid",
                    rejected=sorted(ruleset.rejected)[:50],
                    problems=[str(p) for p in errors_only(problems)][:50],
                    errors=len(errors_only(problems)),
                    kept_previous=kept,
                    hint="these rules are left out (the previous version of each runs when "
                    "there was one); the rest run. exfilwatch rules validate lists them",
                )
            )
        engine = Engine(ruleset, on_cap=self._engine_cap)
        if initial:
            self._restore_engine_state(engine)
        self.pipeline.set_engine(engine)
        self._ruleset = ruleset
        self._update_actions()
        self._report(
            record(
                "rules_loaded" if initial else "rules_reloaded",
                None,
                rules=len(ruleset.rules),
                correlations=len(ruleset.correlations),
                disabled=len(ruleset.disabled),
                inactive=len(ruleset.inactive),
                rejected=len(ruleset.rejected),
                files=len(ruleset.files),
                sha256=ruleset.sha256,
                warnings=[str(p) for p in problems][:50],
            )
        )
        return True

    def _keep_good_versions(self, ruleset: RuleSet) -> list[str]:
        """On a reload, a rejected rule that ran before keeps running in its last good version
        (a bad edit loses nothing); returns their ids."""
        old = self._ruleset
        if old is None:
            return []
        kept = []
        for rid in ruleset.rejected:
            for have, new in ((old.rules, ruleset.rules), (old.correlations, ruleset.correlations)):
                if rid in have and rid not in new:
                    new[rid] = have[rid]
                    kept.append(rid)
        ruleset.link()
        return sorted(kept)

    def _update_actions(self) -> None:
        """Ask the file source only for the actions the rules and sinks use (recomputed when
        either changes), and say so in a record when that set changes."""
        source = self.source
        if source is None:
            return
        rules = self._ruleset.rules.values() if self._ruleset is not None else ()
        actions = needed_actions((r.actions for r in rules), self.router.wants("event"))
        if self._actions_known and actions == self._actions:
            return
        self._actions, self._actions_known = actions, True
        source.set_actions(actions)
        own = self.pipeline.own_reads if self.pipeline is not None else None
        if own is not None:
            own.set_delivered(actions)
        self._report(
            record(
                "source_actions",
                "all" if actions is None else "used",
                actions="all" if actions is None else sorted(actions),
                left_out=[] if actions is None else sorted(OPTIONAL_ACTIONS - actions),
                hint=None
                if actions is None
                else "actions no rule uses and no sink writes are not asked of the kernel",
            )
        )

    def _engine_cap(self, name: str, cap: int, data: dict[str, Any]) -> None:
        if self.caps is not None:
            self.caps.hit(name, cap, **data)

    def alive(self, within: float) -> bool:
        """The pipeline's consumer is turning (systemd's watchdog asks this)."""
        pipeline = self.pipeline
        return pipeline is not None and pipeline.alive(within)

    def check_config_file(self) -> None:
        """The config file as the running agent read it, compared with what is on disk now:
        an edit, a replacement, a new owner or mode, a deletion is a `config_changed` record
        (who can change the agent's config can blind it: the SIEM should see it). The running
        config stays until a reload (SIGHUP) takes the new one, after its checks."""
        path = self.config.source_file
        if not path:
            return
        now = _file_identity(path)
        before = self._config_identity
        if now == before:
            return
        self._config_identity = now
        if before is None:
            return  # no file to compare with when the agent was made
        changed = [
            k
            for k in ("exists", "inode", "size", "mtime_ns", "mode", "uid")
            if before.get(k) != now.get(k)
        ]
        self._report(
            record(
                "config_changed",
                "deleted" if not now.get("exists") else "modified",
                config=path,
                changed=changed,
                before={k: before.get(k) for k in ("size", "mode", "uid", "sha256")},
                now={k: now.get(k) for k in ("size", "mode", "uid", "sha256")},
                hint="the running config is kept until a reload (SIGHUP) checks and takes "
                "the new one; an edit nobody expected is worth a look",
            )
        )

    def check_code_files(self) -> None:
        """The agent's own installed code compared with what this run loaded: a change (an
        upgrade, or someone editing the agent to blind it) is an `agent_files_changed`
        record; the running agent keeps the code it loaded until it is restarted."""
        now = _code_identity()
        before = self._code_identity
        if now == before:
            return
        self._code_identity = now
        changed = sorted(p for p in before.keys() | now.keys() if before.get(p) != now.get(p))
        self._report(
            record(
                "agent_files_changed",
                None,
                changed=changed[:20],
                count=len(changed),
                hint="the running agent keeps the code it loaded until restarted; an "
                "upgrade explains this, anything else is worth a look",
            )
        )

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
            ruleset, problems = self._compile_rules(self.config.rules)
            self.install_rules(ruleset, problems)

    def expire_windows(self) -> None:
        if self.pipeline is not None:
            self.pipeline.request_expiry(now_us())

    def start(self) -> None:
        """Build every component from the config, then start them bottom-up."""
        self._started = time.monotonic()
        if self._own_router:
            self.router.start()
        if self._outbox_problem is not None:
            self._report(self._outbox_problem)
        if self.config.metrics_textfile or self.config.metrics_listen:
            # Imported only when asked for: prometheus_client is ~30 ms of every start.
            from agent.metrics import Metrics

            self.metrics = Metrics(
                self.stats,
                textfile=self.config.metrics_textfile,
                listen=self.config.metrics_listen,
            )
            try:
                self.metrics.start()
            except (OSError, ValueError) as exc:
                self._report(record("source_error", type(exc).__name__, component="metrics"))
                self.metrics = None
        if self.config.rules and self._loaded_rules is None and not self._rule_problems:
            self.load_rules()
        self.caps = CapReporter(self._report)
        self._discover_destinations()
        parts = build(
            self.config,
            self.router,
            self._report,
            self.caps,
            self.all_specs(),
            mounts=self.mounts,
            on_started=self._kernel_started,
        )
        self.parts = parts
        self._restore_history()
        self._report(
            record(
                "agent_started",
                None,
                version=__version__,
                pid=os.getpid(),
                outbox=self.router.outbox.stats(),
                config=self.config.source_file,
                roots=[w.path for w in self.config.watch],
                source_setting=self.config.source,
            )
        )
        previous, unknown = self.state.previous()
        self._save_state(self.state.started)
        for component in parts.ordered():
            if component is parts.source:
                if self.config.rules:
                    self.install_rules(self._loaded_rules, self._rule_problems, initial=True)
                self._update_actions()
                began = time.monotonic()
                component.start()
                self._running.append(component)
                self._report(
                    record(
                        "source_ready",
                        None,
                        seconds=round(time.monotonic() - began, 3),
                        **component.stats(),
                    )
                )
                self._downtime(previous, unknown)
                continue
            try:
                component.start()
            except OSError as exc:
                if component is parts.pipeline:
                    raise
                # An optional part that cannot run here (fanotify without the capability)
                # is said by name; the agent runs on without it.
                self._report(record("source_error", _errno_name(exc), component=component.name))
                continue
            self._running.append(component)
        # Imported once the trees are watched: APScheduler (and the entry points it looks
        # up) is ~50 ms of imports that need not come before the first event is seen.
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(daemon=True)
        jobs: list[tuple[Callable[[], None], float, str]] = [
            (self.heartbeat, self.config.heartbeat_interval, "heartbeat"),
            (self.checkpoint, STATE_CHECKPOINT_SECONDS, "state_checkpoint"),
        ]
        if parts.processes is not None:
            kernel = parts.proc_events is not None and parts.proc_events in self._running
            self._report_process_source(kernel)
            # With the kernel's events the table is polled only to find what an overrun lost.
            interval = PROCESS_RECONCILE_SECONDS if kernel else self.config.processes.interval
            jobs.append((self.check_processes, interval, "processes"))
        signalled = self.mounts is not None and bool(getattr(parts.source, "signals_mounts", False))
        if self.mounts is not None:
            interval = self.config.locations.mount_check_interval
            if signalled:
                interval = max(interval, MOUNTS_SAFETY_SECONDS)
            jobs.append((self.check_mounts, interval, "mounts"))
        self.check_watchlist()
        # The rule files and the watchlist are checked every second by one plain thread, not
        # by scheduler jobs: an APScheduler dispatch costs milliseconds of CPU, and a 1 s job
        # took an idle agent from 0.8 % to 2.5 % of a core (bench/capture.py idle).
        self._ticker = threading.Thread(target=self._tick, name="file-checks", daemon=True)
        self._ticker.start()
        if self.config.rules:
            jobs.append((self.expire_windows, 60.0, "window_expiry"))
        # On the idle beat (agent/beat.py): jobs whose intervals are multiples of it run in
        # one wake-up of the scheduler, with the other threads' idle checks; shorter ones
        # (polling) start on their own next multiple.
        for func, seconds, job_id in jobs:
            self.scheduler.add_job(
                func,
                "interval",
                seconds=seconds,
                start_date=next_beat(min(seconds, BEAT)),
                id=job_id,
                max_instances=1,
                coalesce=True,
            )
        self.scheduler.start()
        if parts.proc_events is not None and parts.proc_events in self._running:
            parts.proc_events.on_loss = self._processes_lost
        if signalled:
            parts.source.on_mounts_changed = self._mounts_changed  # type: ignore[attr-defined]
            self.check_mounts()  # a change while it started, before the hook was there
        self.check_config_file()  # an edit while it started
        self._last_stats = self.stats()
        self._write_status("running")
        # What start-up made (modules, rules, the watch maps: most of what the agent ever
        # holds) lives as long as the agent: out of the collector's sight, a full collection
        # no longer walks it during a burst (gc.freeze; refcounting still frees it).
        gc.freeze()
        log.info("agent_started", source=parts.source.name, roots=len(self.config.watch))

    def _report_process_source(self, kernel: bool) -> None:
        """Say where process starts come from (kernel events, or polling and what it misses)."""
        wanted = self.config.processes.source
        if kernel:
            events = self.parts.proc_events if self.parts is not None else None
            self._report(
                record(
                    "source_selected",
                    "proc_connector",
                    source="processes",
                    setting=wanted,
                    # realtime | nice | normal: how soon an exec is read (agent/sources/procsnap.py)
                    reader_priority=events.priority if events is not None else None,
                )
            )
            return
        if wanted == "kernel":
            self._report(
                record(
                    "source_error",
                    "proc_connector_unavailable",
                    source="processes",
                    required=True,
                    hint="processes.source is kernel: run as root (CAP_NET_ADMIN) on Linux "
                    "with CONFIG_PROC_EVENTS; polling instead",
                )
            )
        self._report(
            record(
                "source_selected",
                "process_poll",
                source="processes",
                setting=wanted,
                interval=self.config.processes.interval,
                hint=None
                if wanted == "poll"
                else "processes that live shorter than the poll interval can be missed",
            )
        )

    def _downtime(self, previous: PreviousRun | None, unknown: str | None) -> None:
        """Say how the previous run ended, and look for what changed while nobody watched."""
        if previous is None:
            self._report(
                record(
                    "agent_previous_stop",
                    "unknown" if unknown else "first_start",
                    state=self.state.path,
                    why=unknown,
                )
            )
            return
        since = previous.down_since_us
        self._report(
            record(
                "agent_previous_stop" if previous.clean else "agent_unclean_stop",
                "clean" if previous.clean else "unclean",
                pid=previous.pid,
                started=format_timestamp(previous.started_us) if previous.started_us else None,
                down_since=format_timestamp(since) if since else None,
                down_seconds=round((now_us() - since) / 1e6, 1) if since else None,
                hint=None
                if previous.clean
                else "the agent was killed or crashed; changes since its last checkpoint are "
                "rescanned",
            )
        )
        source = self.source
        if since and source is not None:
            # A second of slack: the last checkpoint and a write may share a clock tick.
            source.rescan(since - 1_000_000, "downtime")

    def checkpoint(self) -> None:
        """The agent is alive now: what an unclean stop will be measured from. Skipped when
        no event was processed since the last one and it is not a minute old (an idle agent
        does not write and fsync a file every 30 s)."""
        pipeline = self.pipeline
        processed = pipeline.processed if pipeline is not None else 0
        now = time.monotonic()
        if (
            processed == self._checkpoint_processed
            and now - self._checkpoint_at < STATE_CHECKPOINT_IDLE_SECONDS
        ):
            return
        self._checkpoint_processed, self._checkpoint_at = processed, now
        self._save_state(self.state.checkpoint)
        if pipeline is not None:
            self.save_engine_state(pipeline.engine_state())
        self.save_history()

    def _restore_engine_state(self, engine: Engine) -> None:
        """Correlation windows and suppression of the previous run, for rules that did not
        change: half a threshold before a restart and half after is one alert."""
        path = os.path.join(self.config.state_dir, ENGINE_STATE_FILE)
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read(ENGINE_STATE_MAX_BYTES + 1))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self._report(
                record(
                    "engine_state_restored",
                    "unreadable",
                    file=path,
                    error=str(exc)[:200],
                    hint="correlations start empty; the file is replaced at the next checkpoint",
                )
            )
            return
        restored = engine.import_state(data, now_us())
        self._report(record("engine_state_restored", None, file=path, **restored))

    def save_history(self) -> None:
        """The per-user egress memory (destinations used, daily counts), 0600, atomically."""
        history = self.parts.history if self.parts is not None else None
        if history is None:
            return
        path = os.path.join(self.config.state_dir, HISTORY_FILE)
        data = json.dumps(history.export_state(), ensure_ascii=True, separators=(",", ":"))
        try:
            self._write_changed(path, data.encode("ascii"))
        except OSError as exc:
            self._report(record("source_error", _errno_name(exc), stage="history", path=path))

    def _restore_history(self) -> None:
        history = self.parts.history if self.parts is not None else None
        if history is None:
            return
        path = os.path.join(self.config.state_dir, HISTORY_FILE)
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read(ENGINE_STATE_MAX_BYTES + 1))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("history_unreadable", path=path, error=str(exc)[:200])
            return
        history.import_state(data)

    def save_engine_state(self, state: dict[str, Any] | None) -> None:
        """Write the engine's state (atomically, 0600); too large a state keeps only the
        suppression (reported)."""
        if state is None:
            return
        path = os.path.join(self.config.state_dir, ENGINE_STATE_FILE)
        text = json.dumps(state, ensure_ascii=True, separators=(",", ":"))
        if len(text) > ENGINE_STATE_MAX_BYTES:
            self._report(
                record(
                    "cap_reached",
                    "engine_state_size",
                    cap=ENGINE_STATE_MAX_BYTES,
                    size=len(text),
                    hint="correlation windows are not saved; suppression is",
                )
            )
            text = json.dumps({**state, "windows": {}}, ensure_ascii=True, separators=(",", ":"))
        try:
            self._write_changed(path, text.encode("ascii"))
        except OSError as exc:
            self._report(record("source_error", _errno_name(exc), stage="engine_state", path=path))

    def _write_changed(self, path: str, data: bytes) -> None:
        """write_private, unless the file holds these bytes already (as this agent wrote them
        last and it is still there): an idle agent does not rewrite and fsync unchanged state
        every checkpoint."""
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if self._written.get(path) == digest and os.path.exists(path):
            return
        self._written.pop(path, None)
        write_private(path, data)
        self._written[path] = digest

    def _save_state(self, step: Callable[[int], None]) -> None:
        try:
            step(now_us())
        except OSError as exc:
            error = f"{_errno_name(exc)}: {exc.strerror}"
            if error != self._state_error:  # once per distinct error, not every 10 s
                self._state_error = error
                self._report(
                    record("source_error", _errno_name(exc), stage="state", path=self.state.path)
                )
        else:
            self._state_error = None

    @property
    def pipeline(self) -> Pipeline | None:
        return self.parts.pipeline if self.parts is not None else None

    @property
    def source(self) -> Source | None:
        return self.parts.source if self.parts is not None else None

    @property
    def lineage(self) -> LineageIndex | None:
        return self.parts.lineage if self.parts is not None else None

    @property
    def processes(self) -> ProcessTable | None:
        return self.parts.processes if self.parts is not None else None

    @property
    def fanotify(self) -> FanotifyWatcher | None:
        return self.parts.fanotify if self.parts is not None else None

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
        self._derived = [
            *cloud,
            *staging_places(
                homes,
                loc.staging_dirs,
                avoid=avoid,
                home_depth=loc.home_depth,
                exclude=loc.exclude,
            ),
        ]
        if self.mounts is None:
            self.mounts = MountWatcher(
                report=self._report, removable_patterns=loc.removable_patterns
            )
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

    def _mount_spec(self, info: MountInfo) -> WatchSpec:
        return WatchSpec(
            info.mount.mountpoint,
            location=info.kind,
            provider=info.label,
            # Network shares can be huge: watch their top levels only.
            max_depth=None if info.kind == "removable" else 2,
            max_dirs=50_000 if info.kind == "removable" else 2_000,
        )

    def _run_job_now(self, job_id: str) -> None:
        """Run a scheduled job at once, on the scheduler's thread (called from a source's)."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        from apscheduler.jobstores.base import JobLookupError

        with contextlib.suppress(JobLookupError):  # stopping, or no such job: nothing to do
            scheduler.modify_job(job_id, next_run_time=dt.datetime.now(scheduler.timezone))

    def _mounts_changed(self) -> None:
        """The source saw the mount table change: check it now."""
        self._run_job_now("mounts")

    def _processes_lost(self) -> None:
        """The kernel's process events were lost: read the process table now."""
        self._run_job_now("processes")

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
                for info in removed:
                    self._mount_specs.pop(info.mount.mountpoint, None)
                # Watched first, then said: a `media_mounted` record means the medium is
                # watched (what was written on it before is reported by the scan).
                self._apply_specs()
                for info in added:
                    self._report(record("media_mounted", info.kind, **_mount_data(info)))
                for info in removed:
                    self._report(record("media_unmounted", info.kind, **_mount_data(info)))
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

    def check_processes(self) -> None:
        """New processes since the last poll become process-started events."""
        processes, pipeline = self.processes, self.pipeline
        if processes is None or pipeline is None:
            return
        try:
            new = processes.poll()
            if new:
                self._emit_started(new, "process_poll")
        except Exception as exc:
            log.exception("process_check_failed")
            self._report(record("source_error", type(exc).__name__, stage="processes"))

    def _kernel_started(self, procs: list[Proc]) -> None:
        """Processes the kernel's process events saw exec (on the reader's thread)."""
        try:
            self._emit_started(procs, "proc_connector")
        except Exception as exc:
            log.exception("process_events_failed")
            self._report(record("source_error", type(exc).__name__, stage="proc_events"))

    def _emit_started(self, procs: list[Proc], source: str) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        from agent.enrich.attribution import process_event

        roots = [w.path.rstrip("/") + "/" for w in self.config.watch]

        def tagged(path: str) -> bool:
            return any((path + "/").startswith(r) for r in roots)

        ts = now_us()
        pipeline.emit_events([process_event(p, ts, tagged, source=source) for p in procs])

    def stop(self, timeout: float = 1.8, reason: str = "stopped") -> bool:
        """Stop within `timeout` seconds, writing what is queued. True when nothing was left.
        Components stop in the reverse of their start order: producers first, the consumer
        (which drains what they queued) last."""
        if self._stopped:
            return True
        self._stopped = True
        began = time.monotonic()
        deadline = began + timeout
        # How long each part took to stop (ms), in the stop record: a slow stop says which.
        took: dict[str, float] = {}
        self._ticking.set()
        with contextlib.suppress(OSError):
            os.write(self._tick_wake[1], b"x")
        if self._ticker is not None:
            self._ticker.join(5.0)
            self._ticker = None
        for fd in self._tick_wake:
            with contextlib.suppress(OSError):
                os.close(fd)
        took["ticker"] = _ms_since(began)
        if self.scheduler is not None:
            # Wait for a running job (a checkpoint, a process scan): none may run into a
            # drained pipeline or write the state file beside the clean stop's write.
            t0 = time.monotonic()
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
            took["scheduler"] = _ms_since(t0)
        pipeline = self.pipeline
        drained = True
        for component in reversed(self._running):
            if component is pipeline:
                continue
            t0 = time.monotonic()
            try:
                component.stop()
            except Exception as exc:
                log.exception("component_stop_failed", component=component.name)
                self._report(record("source_error", type(exc).__name__, component=component.name))
            took[component.name] = _ms_since(t0)
        if pipeline is not None:
            left = max(0.1, deadline - time.monotonic() - 0.05)
            t0 = time.monotonic()
            drained = pipeline.drain(timeout=left)
            took["pipeline"] = _ms_since(t0)
            unwritten = len(pipeline.queue)
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
                    reason if drained else "drain_timeout",
                    stop_reason=reason,
                    outbox_backlog=self.router.outbox.backlog(),
                    drained=drained,
                    unwritten=unwritten,
                    **pipeline.stats(),
                    # The file source's counters (events read, handed on, filtered...): with
                    # the pipeline's `processed`, where every event read went.
                    source_counters=self._source_counters(),
                    stop_ms=took,
                )
            )
        self._running = []
        if pipeline is not None and pipeline.engine is not None:
            self.save_engine_state(pipeline.engine.export_state())
        self.save_history()
        self._save_state(self.state.stopped)
        self._write_status("stopped", stop_reason=reason)
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self._own_router:
            self.router.close()
        log.info("agent_stopped", drained=drained)
        return drained

    def _source_counters(self) -> dict[str, int]:
        source = self.source
        if source is None:
            return {}
        try:
            stats = source.stats()
        except Exception:  # a stopped source that cannot say: the stop record still goes out
            log.exception("source_stats_failed")
            return {}
        return {k: v for k, v in stats.items() if type(v) is int}

    def _write_status(self, state: str, stop_reason: str | None = None) -> None:
        """status.json for `exfilwatch status`; a failure is reported once per error."""
        from agent.status import write_status

        ruleset = self._ruleset
        data: dict[str, Any] = {
            "state": state,
            "pid": os.getpid(),
            "version": __version__,
            "config": self.config.source_file,
            "started": round(self._started_wall, 3),
            "updated": round(time.time(), 3),
            "heartbeat_interval_s": self.config.heartbeat_interval,
            "stats": self._last_stats,
            "last_reload": self._last_reload,
            "rules": {
                "active": len(ruleset.rules) + len(ruleset.correlations),
                "inactive": len(ruleset.inactive),
                "disabled": len(ruleset.disabled),
                "rejected": len(ruleset.rejected),
            }
            if ruleset is not None
            else None,
        }
        if stop_reason is not None:
            data["stop_reason"] = stop_reason
        try:
            with self._status_lock:
                write_status(self.config.state_dir, data)
        except OSError as exc:
            error = _errno_name(exc)
            if error != self._status_error:
                self._status_error = error
                self._report(record("source_error", error, stage="status", path="status.json"))
        else:
            self._status_error = None

    def _report(self, rec: dict[str, Any]) -> None:
        reload = _RELOADS.get(rec.get("event", {}).get("action", ""))
        if reload is not None:
            what, ok = reload
            self._last_reload = {
                "what": what,
                "ok": ok,
                "reason": rec["event"].get("reason"),
                "at": round(time.time(), 3),
            }
            if self._running:
                self._write_status("running")
        if self.pipeline is not None:
            self.pipeline.report(rec)
        else:
            from agent.events import dumps

            self.router.write("health", [dumps(rec)])

    def stats(self) -> dict[str, Any]:
        """Every running component's counters, by name, for the heartbeat."""
        out: dict[str, Any] = {"uptime_s": round(time.monotonic() - self._started, 1)}
        for component in self._running:
            try:
                out[component.name] = component.stats()
            except Exception as exc:  # a broken counter must not cost the heartbeat
                out[component.name] = {"error": type(exc).__name__}
        out["sinks"] = self.router.stats()
        out["outbox"] = self.router.outbox.stats()
        out["version"] = __version__
        if self._ruleset is not None:
            out["ruleset"] = {"sha256": self._ruleset.sha256, "rules": len(self._ruleset.rules)}
        out["alerts"] = self.router.alerts
        now = time.monotonic()
        processed = self.pipeline.processed if self.pipeline is not None else 0
        at, before, alerts_before = self._rate_at
        lanes = self.pipeline.processed_by_lane if self.pipeline is not None else {}
        if now > at:
            out["events_per_s"] = round((processed - before) / (now - at), 2)
            out["alerts_per_s"] = round((self.router.alerts - alerts_before) / (now - at), 3)
            out["events_per_s_by_lane"] = {
                lane: round((n - self._lane_counts.get(lane, 0)) / (now - at), 2)
                for lane, n in lanes.items()
            }
        self._rate_at = (now, processed, self.router.alerts)
        self._lane_counts = dict(lanes)
        out["max_user_watches"] = _max_user_watches()
        if self.parts is not None:
            out["markers"] = self.parts.resolver.store.stats()
            if self.parts.history is not None:
                out["history"] = self.parts.history.stats()
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
        stats = self._last_stats = self.stats()
        self._report(record("heartbeat", None, **stats))
        self._write_status("running")
        if self.metrics is not None and self.config.metrics_textfile:
            try:
                self.metrics.write_textfile()
            except OSError as exc:
                log.exception("metrics_textfile_failed", error=str(exc))

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
                try:
                    self.router.replace(new.sinks)
                except SinkOpenError as exc:
                    # The check passed but the open did not (a race, a full disk, an immutable
                    # file): the old sinks are still open and the old config stays with them.
                    self._report(
                        record(
                            "config_reload_rejected",
                            exc.reason,
                            config=path,
                            problems=exc.problems,
                            kept="previous configuration",
                        )
                    )
                    return False
            self.config = new
            self._update_actions()
            self._discover_destinations()
            self._apply_specs()
            if self.fanotify is not None:
                self.fanotify.update([w.path for w in new.watch])
            dirs = self.parts.fanotify_dirs if self.parts is not None else None
            if dirs is not None:
                dirs.update([w.path for w in new.watch])
            if new.rules:
                ruleset, rule_problems = self._compile_rules(new.rules, new.rule_errors)
                self._rule_signature = rule_signature(new.rules)
                self.install_rules(ruleset, rule_problems)
            self._config_identity = _file_identity(path) if path else None
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


# Health records that end a reload: what reloaded, and whether it was taken (for status).
_RELOADS = {
    "config_reloaded": ("config", True),
    "config_reload_rejected": ("config", False),
    "rules_reloaded": ("rules", True),
    "rules_reload_rejected": ("rules", False),
}


def _mount_data(info: MountInfo) -> dict[str, Any]:
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


FILE_CHECK_SAFETY = 30.0  # seconds between file checks when inotify reports changes


def _to_midnight() -> float:
    """Seconds to the next local midnight (and a little after it)."""
    now = dt.datetime.now().astimezone()
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=1, microsecond=0)
    return max((tomorrow - now).total_seconds(), 1.0)


class _DirWatcher:
    """inotify on a few directories (the state dir, the rule dirs): `wait` returns True when
    something that matters in them changed (`dirs` maps a directory to the names that
    matter in it, None for any; a change of the directory itself always matters). `ok` is
    False when inotify is not available (then the caller polls)."""

    def __init__(self, dirs: Mapping[str, frozenset[str] | None]) -> None:
        self._ino: Any = None
        self._names: dict[int, frozenset[str] | None] = {}
        mask = 0
        try:
            from inotify_simple import INotify, flags

            self._ino = INotify()
            mask = (
                flags.CLOSE_WRITE
                | flags.MOVED_TO
                | flags.MOVED_FROM
                | flags.CREATE
                | flags.DELETE
                | flags.ATTRIB
            )
        except (OSError, ImportError):
            self._ino = None
        watched = 0
        for d, names in dirs.items():
            if self._ino is None:
                break
            try:
                wd = self._ino.add_watch(d, mask)
            except OSError:
                continue  # missing for now: the safety poll covers it
            watched += 1
            have = self._names.get(wd, frozenset())
            self._names[wd] = None if names is None or have is None else have | names
        self.ok = self._ino is not None and watched > 0

    def wait(self, timeout: float, stop_fd: int) -> bool:
        fds = [stop_fd] + ([self._ino.fileno()] if self._ino is not None else [])
        ready, _, _ = select.select(fds, [], [], timeout)
        if self._ino is not None and self._ino.fileno() in ready:
            for event in self._ino.read(timeout=0):
                names = self._names.get(event.wd)
                if names is None or not event.name or event.name in names:
                    return True  # (what else the read gave is not needed: it changed)
        return False

    def close(self) -> None:
        if self._ino is not None:
            with contextlib.suppress(OSError):
                self._ino.close()


def _file_identity(path: str) -> dict[str, Any]:
    """What a config file is now: inode, size, mtime, mode, owner and a digest of its bytes
    (never its content: a config may hold secrets)."""
    try:
        # Not through a link, never blocking on a FIFO put in its place, regular files only.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {"exists": False}
    try:
        st = os.fstat(fd)
        data = os.read(fd, 4 << 20) if stat.S_ISREG(st.st_mode) else b""
    except OSError:
        return {"exists": False}
    finally:
        os.close(fd)
    digest = hashlib.sha256(data).hexdigest()[:16]
    return {
        "exists": True,
        "inode": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "uid": st.st_uid,
        "sha256": digest,
    }


def _code_identity() -> dict[str, tuple[int, int, int]]:
    """The agent package's Python files: path -> (inode, size, mtime). A few hundred stats."""
    root = os.path.dirname(os.path.abspath(__file__))
    out: dict[str, tuple[int, int, int]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    out[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _max_user_watches() -> int | None:
    try:
        with open("/proc/sys/fs/inotify/max_user_watches", encoding="ascii") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def _ms_since(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
