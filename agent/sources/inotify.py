"""Linux source: one raw inotify reader with recursive watches; lossless on bursts, loud on loss."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from inotify_simple import INotify
from inotify_simple import flags as F

from agent.config import InotifySettings, WatchSpec
from agent.health import CapReporter, Reporter, now_us, record
from agent.sources.base import EmitBatch, RawEvent
from agent.sources.paths import Excludes, compile_excludes

log = structlog.get_logger(__name__)

MASK = (
    F.CREATE
    | F.DELETE
    | F.MODIFY
    | F.ATTRIB
    | F.MOVED_FROM
    | F.MOVED_TO
    | F.OPEN
    | F.CLOSE_WRITE
    | F.CLOSE_NOWRITE
    | F.DELETE_SELF
    | F.MOVE_SELF
    | F.ONLYDIR
    | F.DONT_FOLLOW
    | F.EXCL_UNLINK
)
# Places that are not tagged trees (removable media, sync folders, staging) only matter for
# what lands there: the kernel is asked for nothing else, so reads, attribute changes and
# deletions there never reach the queue (the reader's cheap filter drops the rest).
EGRESS_MASK = (
    F.CREATE
    | F.MOVED_FROM
    | F.MOVED_TO
    | F.CLOSE_WRITE
    | F.DELETE_SELF
    | F.MOVE_SELF
    | F.ONLYDIR
    | F.DONT_FOLLOW
    | F.EXCL_UNLINK
)
# Plain ints for the hot loop: an IntEnum attribute costs several times a global int.
_SELF = int(F.DELETE_SELF | F.MOVE_SELF)
_DIR_READ = int(F.OPEN | F.CLOSE_NOWRITE | F.ACCESS)
_Q_OVERFLOW, _IGNORED, _UNMOUNT, _ISDIR = (
    int(F.Q_OVERFLOW),
    int(F.IGNORED),
    int(F.UNMOUNT),
    int(F.ISDIR),
)
_MOVE_SELF, _MODIFY, _OPEN, _CLOSE_WRITE = (
    int(F.MOVE_SELF),
    int(F.MODIFY),
    int(F.OPEN),
    int(F.CLOSE_WRITE),
)
_CLOSE_NOWRITE, _CREATE, _DELETE = int(F.CLOSE_NOWRITE), int(F.CREATE), int(F.DELETE)
_MOVED_FROM, _MOVED_TO, _ATTRIB = int(F.MOVED_FROM), int(F.MOVED_TO), int(F.ATTRIB)
_NOT_LANDED = _MODIFY | _OPEN | _CLOSE_NOWRITE | _ATTRIB | _DELETE
# A batch handed to the pipeline at most this big: lines reach the sinks while a burst is
# still being read, and memory follows the batch, not the burst.
BATCH = 4096
_SYSCTL = "/proc/sys/fs/inotify/"
# Paths a scan reported as created are remembered briefly so the kernel's own CREATE for the
# same path (when it raced the scan) is not reported twice.
_RECENT_SCAN_SECONDS = 2.0
_RECENT_SCAN_CAP = 100_000
_SAMPLE = 5
# A place that starts being watched while the agent runs (media just mounted, a root added by
# a reload) may already hold files written since it appeared and before its watch: those
# changed within this many seconds are reported as found by a scan.
LATE_ROOT_LOOKBACK_US = 10_000_000


@dataclass(eq=False)
class _Root:
    spec: WatchSpec
    excludes: Excludes
    state: str = "missing"  # "watching" | "missing"
    wds: set[int] = field(default_factory=set)

    @property
    def filtered(self) -> bool:
        """Not a tagged tree: only landed content and new directories are wanted."""
        return self.spec.location != "tagged"

    @property
    def mask(self) -> int:
        return int(EGRESS_MASK if self.filtered else MASK)

    @property
    def path(self) -> str:
        return self.spec.path

    def rel(self, path: str) -> str:
        return path[len(self.spec.path) :].lstrip("/")


@dataclass
class _Problems:
    """Watch problems found while adding one tree, reported as one record per reason."""

    by_reason: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        sample = self.by_reason.setdefault(reason, [])
        if len(sample) < _SAMPLE:
            sample.append(path)


def read_sysctl(name: str) -> int | None:
    try:
        with open(_SYSCTL + name) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def apply_kernel_settings(settings: InotifySettings, report: Reporter) -> dict[str, int | None]:
    """Raise (never lower) the inotify queue and watch limits when root; report either way.

    max_queued_events is read by the kernel when an inotify instance is created, so this runs
    before the instance exists."""
    wanted = {
        "max_queued_events": settings.max_queued_events,
        "max_user_watches": settings.max_user_watches,
    }
    current = {name: read_sysctl(name) for name in wanted}
    changed: dict[str, Any] = {}
    low: dict[str, Any] = {}
    for name, want in wanted.items():
        have = current[name]
        if have is None or have >= want:
            continue
        if settings.apply_sysctl and os.geteuid() == 0:
            try:
                with open(_SYSCTL + name, "w") as fh:
                    fh.write(str(want))
                changed[name] = {"from": have, "to": want}
                current[name] = want
                continue
            except OSError as exc:
                low[name] = {"value": have, "wanted": want, "error": exc.strerror}
                continue
        low[name] = {"value": have, "wanted": want}
    if changed:
        report(record("kernel_settings_applied", None, settings=changed))
    if low:
        report(
            record(
                "kernel_settings_low",
                "not_root" if os.geteuid() != 0 else "sysctl_failed",
                settings=low,
                hint="run as root, or install packaging/sysctl.d/60-exfilwatch.conf",
            )
        )
    return current


class InotifySource:
    """Watches every directory of each root with one inotify instance, read by one thread."""

    name = "inotify"

    def __init__(
        self,
        specs: Sequence[WatchSpec],
        emit: EmitBatch,
        report: Reporter,
        *,
        settings: InotifySettings | None = None,
        marker_name: str = ".exfilwatch.yaml",
        rescan_max_entries: int = 200_000,
        root_check_interval: float = 1.0,
        caps: CapReporter | None = None,
    ) -> None:
        self._emit = emit
        self._report = report
        self._settings = settings or InotifySettings()
        self._marker = marker_name
        self._rescan_max = rescan_max_entries
        self._root_check_interval = root_check_interval
        self._caps = caps or CapReporter(report)
        self._roots: list[_Root] = [_Root(s, compile_excludes(s.exclude)) for s in specs]
        self._ino: INotify | None = None
        self._wd_path: dict[int, str] = {}
        self._wd_root: dict[int, _Root] = {}
        self._path_wd: dict[str, int] = {}
        self._pending: dict[int, tuple[int, str, bool, _Root, int]] = {}
        self._recent_scan: dict[str, float] = {}
        self._batch = 0
        self._last_batch_us = now_us()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {
            "events_read": 0,
            "overflows": 0,
            "rescans": 0,
            "emitted": 0,
            "filtered": 0,
            "vanished_before_watch": 0,
        }
        self.kernel: dict[str, int | None] = {}

    # lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.kernel = apply_kernel_settings(self._settings, self._report)
        self._ino = INotify()
        for root in self._roots:
            self._setup_root(root, scan=False, first=True)
        self._thread = threading.Thread(target=self._run, name="exfilwatch-inotify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._ino is not None:
            self._ino.close()
            self._ino = None

    def update(self, specs: Sequence[WatchSpec]) -> None:
        done = threading.Event()

        def apply() -> None:
            try:
                self._apply_specs(specs)
            finally:
                done.set()

        if self._thread is None:
            apply()
            return
        self._commands.put(apply)
        done.wait(timeout=30)

    def stats(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "watches": len(self._wd_path),
            "roots": {r.path: r.state for r in self._roots},
            **self.counters,
        }

    # reader thread ---------------------------------------------------------------------

    def _run(self) -> None:
        assert self._ino is not None
        ino = self._ino
        next_check = time.monotonic() + self._root_check_interval
        while not self._stopping.is_set():
            try:
                # Idle wake-ups cost CPU on every workstation: a stop is seen within 0.25 s.
                events = ino.read(timeout=5 if self._pending else 250)
                if events or self._pending:
                    self._handle(events)
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    command()
                if time.monotonic() >= next_check:
                    self._check_roots()
                    next_check = time.monotonic() + self._root_check_interval
            except Exception as exc:
                # Unlike watchdog's dispatcher, the reader never dies on an error: it reports
                # and goes on, so a bug costs one batch, not all events from then on.
                log.exception("source_error")
                self._report(record("source_error", type(exc).__name__, message=str(exc)))
                time.sleep(0.05)
        try:
            for _ in range(2):  # what the kernel queued before stop, then unpaired moves
                self._handle(ino.read(timeout=0))
        except Exception as exc:
            self._report(record("source_error", type(exc).__name__, message=str(exc)))

    def _handle(self, events: list[Any]) -> None:
        self._batch += 1
        batch = self._batch
        ts = now_us()
        out: list[RawEvent] = []
        append = out.append
        wd_path = self._wd_path
        wd_root = self._wd_root
        marker = self._marker
        recent = self._recent_scan
        self.counters["events_read"] += len(events)
        filtered = 0
        for wd, mask, cookie, name in events:
            if len(out) >= BATCH:
                self.counters["emitted"] += len(out)
                self._emit(out)
                out = []
                append = out.append
            if mask & _Q_OVERFLOW:
                self._overflow(ts, out)
                continue
            dirpath = wd_path.get(wd)
            if dirpath is None:
                continue
            root = wd_root[wd]
            loc = root.spec.location
            if mask & _IGNORED:
                self._forget(wd)
                if dirpath == root.path and root.state == "watching":
                    self._root_lost(root, "unmounted" if mask & _UNMOUNT else "ignored")
                continue
            if mask & _SELF:
                if dirpath == root.path:
                    self._root_lost(root, "moved" if mask & _MOVE_SELF else "deleted")
                continue
            if mask & _UNMOUNT:
                continue
            isdir = bool(mask & _ISDIR)
            if loc != "tagged" and (mask & _NOT_LANDED or (mask & _CREATE and not isdir)):
                filtered += 1  # outside tagged trees a new empty file says nothing yet
                continue
            if (isdir and mask & _DIR_READ) or (name == marker and mask & _DIR_READ):
                continue  # directory listings and the agent's own marker reads
            path = f"{dirpath}/{name}" if dirpath != "/" else f"/{name}"
            ex = root.excludes
            if ex and ex.leaf_excluded(root.rel(path), name):
                continue
            if mask & _MODIFY:
                append(RawEvent(ts, "modified", path, None, isdir, "inotify", loc))
            elif mask & _OPEN:
                append(RawEvent(ts, "opened", path, None, isdir, "inotify", loc))
            elif mask & _CLOSE_WRITE:
                append(RawEvent(ts, "closed_write", path, None, isdir, "inotify", loc))
            elif mask & _CLOSE_NOWRITE:
                append(RawEvent(ts, "closed_nowrite", path, None, isdir, "inotify", loc))
            elif mask & _CREATE:
                if recent and recent.pop(path, None) is not None:
                    continue
                append(RawEvent(ts, "created", path, None, isdir, "inotify", loc))
                if isdir and root.spec.recursive:
                    self._add_tree(root, path, out, scan=True, ts=ts)
            elif mask & _DELETE:
                append(RawEvent(ts, "deleted", path, None, isdir, "inotify", loc))
            elif mask & _MOVED_FROM:
                self._pending[cookie] = (ts, path, isdir, root, batch)
            elif mask & _MOVED_TO:
                pend = self._pending.pop(cookie, None)
                if pend is not None:
                    append(RawEvent(ts, "moved", path, pend[1], isdir, "inotify", loc))
                    if isdir:
                        self._dir_moved(pend[1], pend[3], path, root, out=out, ts=ts)
                else:
                    append(RawEvent(ts, "moved_in", path, None, isdir, "inotify", loc))
                    if isdir and root.spec.recursive:
                        self._add_tree(root, path, out, scan=True, ts=ts)
            elif mask & _ATTRIB:
                append(RawEvent(ts, "attributes_changed", path, None, isdir, "inotify", loc))
        if self._pending:
            for cookie, (pts, ppath, pdir, proot, pbatch) in list(self._pending.items()):
                if pbatch < batch or self._stopping.is_set():
                    del self._pending[cookie]
                    if proot.filtered:
                        filtered += 1  # content leaving a staging place is not landing
                    else:
                        append(
                            RawEvent(
                                pts, "moved_out", ppath, None, pdir, "inotify", proot.spec.location
                            )
                        )
                    if pdir:
                        self._drop_subtree(ppath)
        if recent:
            self._expire_recent()
        self.counters["filtered"] += filtered
        self._last_batch_us = ts
        if out:
            self.counters["emitted"] += len(out)
            self._emit(out)

    # watches ---------------------------------------------------------------------------

    def _register(self, wd: int, path: str, root: _Root) -> None:
        self._wd_path[wd] = path
        self._wd_root[wd] = root
        self._path_wd[path] = wd
        root.wds.add(wd)

    def _forget(self, wd: int) -> None:
        path = self._wd_path.pop(wd, None)
        root = self._wd_root.pop(wd, None)
        if path is not None and self._path_wd.get(path) == wd:
            del self._path_wd[path]
        if root is not None:
            root.wds.discard(wd)

    def _subtree(self, top: str) -> list[tuple[str, int]]:
        prefix = top + "/"
        return [(p, wd) for p, wd in self._path_wd.items() if p == top or p.startswith(prefix)]

    def _drop_subtree(self, top: str) -> None:
        assert self._ino is not None
        for _, wd in self._subtree(top):
            self._forget(wd)
            with contextlib.suppress(OSError):  # already gone with its directory
                self._ino.rm_watch(wd)

    def _dir_moved(
        self, src: str, src_root: _Root, dst: str, dst_root: _Root, *, out: list[RawEvent], ts: int
    ) -> None:
        moved = self._subtree(src)
        if src_root is dst_root and moved:
            for old, wd in moved:
                new = dst + old[len(src) :]
                self._forget(wd)
                self._register(wd, new, dst_root)
            return
        # Moved between roots (their excludes and recursion may differ): re-add under the new one.
        self._drop_subtree(src)
        if dst_root.spec.recursive:
            self._add_tree(dst_root, dst, out, scan=False, ts=ts)

    def _add_tree(
        self,
        root: _Root,
        top: str,
        out: list[RawEvent] | None,
        *,
        scan: bool,
        ts: int,
        since_us: int | None = None,
    ) -> int:
        """Watch `top` and (when recursive) every directory under it; returns watches added.

        With `scan`, entries already inside are reported as created (source "scan"): a tree
        made or moved in faster than we can watch it would otherwise be invisible."""
        assert self._ino is not None
        ino = self._ino
        problems = _Problems()
        added = 0
        limit_hit = False
        stack = [top]
        ex = root.excludes
        recent = self._recent_scan
        max_depth = root.spec.max_depth
        max_dirs = root.spec.max_dirs
        budget_hit = False
        home = root.spec.location == "home"
        while stack:
            d = stack.pop()
            depth = root.rel(d).count("/") + 1 if d != root.path else 0
            if max_depth is not None and depth > max_depth:
                continue
            if max_dirs is not None and len(root.wds) >= max_dirs:
                if not budget_hit:
                    budget_hit = True
                    self._caps.hit("watch_budget", max_dirs, root=root.path)
                continue
            if not limit_hit:
                try:
                    wd = ino.add_watch(d, root.mask)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        limit_hit = True
                        problems.add("watch_limit", d)
                    elif exc.errno in (errno.EACCES, errno.EPERM):
                        problems.add("permission", d)
                        continue
                    else:
                        # A new directory gone before it could be watched: what was written in
                        # it meanwhile was never seen. A loss, not a warning.
                        problems.add("vanished_before_watch" if scan else "vanished", d)
                        continue
                else:
                    known = self._wd_path.get(wd)
                    if known is not None and known != d:
                        continue  # same directory reached twice (bind mount): never loop
                    self._register(wd, d, root)
                    added += 1
            else:
                problems.add("watch_limit", d)
            if d != root.path and not root.spec.recursive:
                continue
            if d == root.path and not root.spec.recursive and not scan:
                continue
            hidden: list[str] = []
            try:
                with os.scandir(d) as it:
                    for entry in it:
                        name = entry.name
                        p = f"{d}/{name}" if d != "/" else f"/{name}"
                        if ex and ex.leaf_excluded(root.rel(p), name):
                            continue
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            continue
                        report = scan and out is not None
                        if report and since_us is not None:
                            # On the medium before it was mounted: not news.
                            try:
                                changed = entry.stat(follow_symlinks=False).st_ctime_ns
                            except OSError:
                                continue
                            report = changed // 1000 >= since_us
                        if report and out is not None:
                            out.append(
                                RawEvent(ts, "created", p, None, is_dir, "scan", root.spec.location)
                            )
                            if len(recent) < _RECENT_SCAN_CAP:
                                recent[p] = time.monotonic()
                            else:
                                self._caps.hit("recent_scan", _RECENT_SCAN_CAP)
                        if (
                            is_dir
                            and root.spec.recursive
                            and (max_depth is None or depth < max_depth)
                        ):
                            if home and name.startswith("."):
                                hidden.append(p)
                            else:
                                stack.append(p)
            except PermissionError:
                problems.add("permission", d)
            except (FileNotFoundError, NotADirectoryError):
                problems.add("vanished", d)
            except OSError:
                problems.add("vanished", d)
            # In a home, hidden directories are the staging places: watched first, so a
            # large source tree beside them cannot use up the watch budget before them.
            stack.extend(hidden)
        self._report_problems(root, problems)
        return added

    def _report_problems(self, root: _Root, problems: _Problems) -> None:
        names = {
            "watch_limit": "watch_limit_reached",
            "permission": "watch_permission_denied",
            "vanished": "watch_path_vanished",
            "vanished_before_watch": "event_loss",
        }
        for reason, sample in problems.by_reason.items():
            data: dict[str, Any] = {
                "root": root.path,
                "count": problems.counts[reason],
                "sample": sample,
            }
            if reason == "vanished_before_watch":
                self.counters["vanished_before_watch"] += problems.counts[reason]
                data["source"] = self.name
                data["location"] = root.spec.location
                data["hint"] = (
                    "a directory was created and removed (or moved away) before it could be "
                    "watched; files written inside it in between were not seen"
                )
            if reason == "watch_limit":
                data["max_user_watches"] = read_sysctl("max_user_watches")
                data["watches"] = len(self._wd_path)
                data["hint"] = "raise fs.inotify.max_user_watches or exclude build/cache trees"
            self._report(record(names[reason], reason, **data))

    def _setup_root(
        self, root: _Root, *, scan: bool, first: bool = False, since_us: int | None = None
    ) -> None:
        if not os.path.isdir(root.path):
            root.state = "missing"
            if first:
                self._report(
                    record(
                        "watch_root_missing",
                        "not_found",
                        root=root.path,
                        hint="it will be watched as soon as it appears",
                    )
                )
            return
        out: list[RawEvent] = []
        self._add_tree(root, root.path, out, scan=scan, ts=now_us(), since_us=since_us)
        root.state = "watching" if root.path in self._path_wd else "missing"
        if out:
            self.counters["emitted"] += len(out)
            self._emit(out)

    def _root_lost(self, root: _Root, reason: str) -> None:
        assert self._ino is not None
        for wd in list(root.wds):
            self._forget(wd)
            with contextlib.suppress(OSError):
                self._ino.rm_watch(wd)
        root.state = "missing"
        action = "watch_root_moved" if reason == "moved" else "watch_root_vanished"
        self._report(
            record(action, reason, root=root.path, hint="watched again when the path reappears")
        )

    def _check_roots(self) -> None:
        for root in self._roots:
            if root.state == "missing" and os.path.isdir(root.path):
                self._setup_root(root, scan=True)
                if root.state == "watching":
                    self._report(record("watch_root_restored", None, root=root.path))

    def _apply_specs(self, specs: Sequence[WatchSpec]) -> None:
        old = {r.spec: r for r in self._roots}
        new_roots: list[_Root] = []
        for spec in specs:
            if spec in old:
                new_roots.append(old.pop(spec))
            else:
                new_roots.append(_Root(spec, compile_excludes(spec.exclude)))
        for gone in old.values():
            self._root_lost_quietly(gone)
        self._roots = new_roots
        for root in new_roots:
            if root.state == "missing" and not root.wds:
                # Media mounted a moment ago may hold copies made before its watch existed.
                since = now_us() - LATE_ROOT_LOOKBACK_US
                self._setup_root(root, scan=True, first=True, since_us=since)

    def _root_lost_quietly(self, root: _Root) -> None:
        assert self._ino is not None
        for wd in list(root.wds):
            self._forget(wd)
            with contextlib.suppress(OSError):
                self._ino.rm_watch(wd)
        root.state = "missing"

    def _expire_recent(self) -> None:
        recent = self._recent_scan
        cutoff = time.monotonic() - _RECENT_SCAN_SECONDS
        while recent:
            key = next(iter(recent))
            if recent[key] >= cutoff:
                break
            del recent[key]

    # loss ------------------------------------------------------------------------------

    def _overflow(self, ts: int, out: list[RawEvent]) -> None:
        self.counters["overflows"] += 1
        self._report(
            record(
                "event_loss",
                "inotify_overflow",
                source=self.name,
                # The limit this instance got when it was created, not today's sysctl.
                max_queued_events=self.kernel.get("max_queued_events"),
                since=self._last_batch_us,
                hint="events were lost in the kernel queue; a rescan follows",
            )
        )
        self._rescan(self._last_batch_us - 1_000_000, ts, out)

    def _rescan(self, since_us: int, ts: int, out: list[RawEvent]) -> None:
        """Walk the roots (bounded): watch directories we missed, report what changed since."""
        self.counters["rescans"] += 1
        for path, wd in list(self._path_wd.items()):
            if not os.path.isdir(path):
                self._forget(wd)
        budget = self._rescan_max
        scanned = changed = watched = 0
        truncated = False
        for root in self._roots:
            if root.state != "watching":
                continue
            stack = [root.path]
            ex = root.excludes
            while stack and not truncated:
                d = stack.pop()
                if d not in self._path_wd:
                    watched += self._add_tree(root, d, None, scan=False, ts=ts)
                try:
                    with os.scandir(d) as it:
                        for entry in it:
                            scanned += 1
                            if scanned > budget:
                                truncated = True
                                break
                            name = entry.name
                            p = f"{d}/{name}" if d != "/" else f"/{name}"
                            if ex and ex.leaf_excluded(root.rel(p), name):
                                continue
                            try:
                                st = entry.stat(follow_symlinks=False)
                                is_dir = entry.is_dir(follow_symlinks=False)
                            except OSError:
                                continue
                            if st.st_ctime_ns // 1000 >= since_us:
                                changed += 1
                                out.append(
                                    RawEvent(
                                        ts,
                                        "rescanned",
                                        p,
                                        None,
                                        is_dir,
                                        "rescan",
                                        root.spec.location,
                                    )
                                )
                            if is_dir and root.spec.recursive:
                                stack.append(p)
                except OSError:
                    continue
        if truncated:
            self._caps.hit("rescan_max_entries", self._rescan_max)
        if out:  # the events first, so the record that closes the rescan comes after them
            self.counters["emitted"] += len(out)
            self._emit(out[:])
            out.clear()
        self._report(
            record(
                "rescan_completed",
                "inotify_overflow",
                scanned=min(scanned, budget),
                changed=changed,
                watches_added=watched,
                truncated=truncated,
                since_us=since_us,
            )
        )
