"""Linux source: one raw inotify reader with recursive watches; lossless on bursts, loud on loss."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import queue
import re
import select
import stat
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import structlog
from inotify_simple import INotify
from inotify_simple import flags as F

from agent.beat import until_beat
from agent.config import InotifySettings, WatchSpec
from agent.health import CapReporter, Reporter, now_us, record
from agent.sources.base import LANE_OF, EmitBatch, RawEvent
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
# what lands there, and for the evidence removed from them (deleted archives and shell
# histories, see evidence_name): reads and attribute changes are never asked for, and the
# reader's cheap filter drops every other delete before the queue.
EGRESS_MASK = (
    F.CREATE
    | F.DELETE
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
_ONLYDIR, _DONT_FOLLOW = int(F.ONLYDIR), int(F.DONT_FOLLOW)
_MOVED_FROM, _MOVED_TO, _ATTRIB = int(F.MOVED_FROM), int(F.MOVED_TO), int(F.ATTRIB)
_NOT_LANDED = _MODIFY | _OPEN | _CLOSE_NOWRITE | _ATTRIB | _DELETE
# The reader's fast path: a file event whose mask is exactly one of these, under a watch in
# a tagged tree without excludes (see InotifySource._fast), needs none of the checks below it.
_PLAIN_ACTIONS: dict[int, str] = {
    _MODIFY: "modified",
    _OPEN: "opened",
    _CLOSE_WRITE: "closed_write",
    _CLOSE_NOWRITE: "closed_nowrite",
    _ATTRIB: "attributes_changed",
}
# Deletes reported outside the tagged trees: archives and shell histories, what an insider
# removes to cover their tracks (rules/antiforensics.yaml).
_EVIDENCE_SUFFIXES = (
    ".zip",
    ".7z",
    ".rar",
    ".tar",
    ".tgz",
    ".gz",
    ".bz2",
    ".xz",
    ".tbz2",
    ".txz",
    ".zst",
    ".cpio",
    ".bundle",
)
_EVIDENCE_NAMES = frozenset(
    {
        ".bash_history",
        ".zsh_history",
        ".zhistory",
        ".history",
        ".sh_history",
        ".ksh_history",
        "fish_history",
        ".python_history",
        ".mysql_history",
        ".psql_history",
    }
)


def evidence_name(name: str) -> bool:
    return name in _EVIDENCE_NAMES or name.lower().endswith(_EVIDENCE_SUFFIXES)


# The kernel bits of the actions only rules or event sinks use (see set_actions).
_OPTIONAL_BITS = {
    "opened": _OPEN,
    "modified": _MODIFY,
    "closed_nowrite": _CLOSE_NOWRITE,
    "attributes_changed": _ATTRIB,
}
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
# Each tagged regular file gets a watch of its own for its link count: a hard link made
# anywhere (outside the tree too) changes it, and the kernel reports that (IN_ATTRIB) only to
# a watch on the file itself, never to one on its directory. MASK_ADD: a race that turns the
# path into a watched directory cannot replace that directory's mask.
FILE_MASK = int(F.ATTRIB | F.DONT_FOLLOW | F.MASK_ADD)
# A file watch costs the kernel about 1 KiB (the mark, and the inode it keeps in memory) and
# the agent about 300 bytes. Past this many (or half of fs.inotify.max_user_watches), files are
# not watched one by one (cap_reached file_watches); at the watch limit directories come first.
FILE_WATCH_MAX = 100_000
# A path handed to inotify_add_watch, scandir or lstat must be shorter than this (in bytes,
# with its NUL); deeper directories are reached through a chain of descriptors (_open_path).
_PATH_MAX = 4096
# Directories skipped at the watch limit, kept to be watched once watches free up.
_SKIPPED_CAP = 10_000
# Directories a queue_full rescan lists one by one; past this it walks their whole roots.
_DROP_DIRS_CAP = 4_096
# A walk reads the kernel queue after every this many directories listed (each listing
# queues up to four events of the agent's own), fewer when the kernel queue is small: at
# most a sixteenth of it between two reads.
_DRAIN_EVERY = 64
# After a change of the mount table, the roots are checked this soon.
_MOUNT_ROOT_CHECK_DELAY = 0.25
# After a read of fewer than _GATHER_BELOW events, the reader lets the next ones gather this
# long before it reads again (a stop or a command still wakes it at once). Read as they came,
# a build's or a copy's stream cost up to twice the CPU per event of a burst read in large
# batches: every small read is a wake-up of the reader and of the consumer, and a write of a
# few lines to every sink. A burst already waiting in the kernel is read without a pause.
_GATHER_MS = 5
_GATHER_BELOW = 1024
# Roots all watched: checked this many times less often (30 s at the default 5 s).
WATCHING_CHECK_FACTOR = 6
# Events read from the kernel during a walk and held until it ends.
_DEFERRED_CAP = 262_144
# A rescan after queue_full drops waits for the stuck consumer this long, and twice as long
# each time its own pieces are dropped again (up to the maximum).
_DROP_RESCAN_DELAY = 1.0
_DROP_RESCAN_DELAY_MAX = 60.0
# Dropped events no rescan can bring back: nothing on disk keeps a read or a name gone.
_NOT_RECOVERABLE = frozenset({"deleted", "moved_out", "opened", "closed_nowrite"})
_SCOPES = {None: 0, "tagged": 1, "all": 2}
_ESCAPED = re.compile(rb"\\([0-7]{3})")


@dataclass(eq=False)
class _Root:
    spec: WatchSpec
    excludes: Excludes
    state: str = "missing"  # "watching" | "missing" | "replaced" (a symlink or a file there)
    wds: set[int] = field(default_factory=set)
    # (st_dev, st_ino) of the directory watched: the path may later lead elsewhere (a mount
    # over it, a swap) without any event on the old watches.
    ident: tuple[int, int] | None = None
    confirmed_us: int = 0  # when that identity last held
    lost_us: int | None = None  # when it stopped being watched
    # Whether any pattern excludes anything (tested per event: Excludes.__bool__ is a
    # Python call).
    has_excludes: bool = field(init=False)

    def __post_init__(self) -> None:
        self.has_excludes = bool(self.excludes)

    @property
    def filtered(self) -> bool:
        """Not a tagged tree: only landed content and new directories are wanted."""
        return self.spec.location != "tagged"

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
    files_left: bool = False  # the file watch budget ran out: later files were not checked

    def add(self, reason: str, path: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        sample = self.by_reason.setdefault(reason, [])
        if len(sample) < _SAMPLE:
            sample.append(path)


@dataclass
class _Rescan:
    """A pending rescan: whole roots (all of them, the tagged ones, or those listed) and
    single directories (listed, not walked), each with the time changes are looked for since."""

    reason: str
    since_us: int
    due: float = 0.0  # time.monotonic()
    scope: str | None = None  # "all" | "tagged" | None (only `roots` and `dirs`)
    roots: list[_Root] = field(default_factory=list)
    dirs: dict[str, tuple[_Root, int]] = field(default_factory=dict)
    dropped: int = 0  # queue_full: the events that were dropped
    not_recoverable: dict[str, int] = field(default_factory=dict)

    def merge(self, other: _Rescan) -> None:
        self.since_us = min(self.since_us, other.since_us)
        self.due = min(self.due, other.due)
        if _SCOPES[other.scope] > _SCOPES[self.scope]:
            self.scope = other.scope
        self.roots.extend(r for r in other.roots if r not in self.roots)
        for d, (root, since) in other.dirs.items():
            have = self.dirs.get(d)
            if have is None or since < have[1]:
                self.dirs[d] = (root, since)
        self.dropped += other.dropped
        for action, n in other.not_recoverable.items():
            self.not_recoverable[action] = self.not_recoverable.get(action, 0) + n


@dataclass
class _Walk:
    """What one rescan found and handed over so far."""

    since_us: int
    budget: int
    out: list[RawEvent] = field(default_factory=list)
    scanned: int = 0
    changed: int = 0
    directories: int = 0
    watched: int = 0
    pieces: int = 0
    dropped: int = 0
    truncated: bool = False


def _long(path: str) -> bool:
    """Too long for a call that takes a path (fewer than 1,024 characters never are)."""
    return len(path) >= _PATH_MAX // 4 and len(os.fsencode(path)) >= _PATH_MAX


def _open_path(path: str, last: int) -> int:
    """A descriptor for `path` however long: the longest prefix a path-taking call accepts is
    opened at once (as any lookup would), the rest one component at a time without following
    a symlink, the last component with the flags `last`."""
    parts = [p for p in os.fsencode(path).split(b"/") if p]
    head, size = 0, 1
    while head < len(parts) - 1 and size + len(parts[head]) + 1 < _PATH_MAX:
        size += len(parts[head]) + 1
        head += 1
    step = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(b"/" + b"/".join(parts[:head]), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i in range(head, len(parts)):
            flags = (last | os.O_CLOEXEC) if i == len(parts) - 1 else step
            nfd = os.open(parts[i], flags, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _listing(path: str) -> Iterator[Iterator[os.DirEntry[str]]]:
    """os.scandir, also for a directory whose path exceeds PATH_MAX."""
    if not _long(path):
        with os.scandir(path) as it:
            yield it
        return
    fd = _open_path(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with os.scandir(fd) as it:
            yield it
    finally:
        os.close(fd)


def _lstat(path: str) -> os.stat_result | None:
    """os.lstat (None when there is nothing there), also for a path past PATH_MAX."""
    try:
        if not _long(path):
            return os.lstat(path)
        parent, _, name = path.rpartition("/")
        fd = _open_path(parent or "/", os.O_PATH | os.O_DIRECTORY)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
    except OSError:
        return None


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _mount_points() -> dict[int, str]:
    """Mount id -> mount point, from /proc/self/mountinfo (empty when it cannot be read)."""
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            data = fh.read()
    except OSError:
        return {}
    out: dict[int, str] = {}
    for line in data.splitlines():
        fields = line.split(b" ", 5)
        if len(fields) < 5 or not fields[0].isdigit():
            continue
        point = _ESCAPED.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
        out[int(fields[0])] = os.fsdecode(point)
    return out


_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
# Bytes taken from the kernel queue per read: whole events only (the kernel never splits
# one), about 30,000 of them, so memory follows this, not the queue's length.
_READ_MAX = 1 << 20
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def _read_events(ino: INotify, listings: bool = True) -> list[tuple[int, int, int, str]]:
    """What the kernel has queued now, as plain (wd, mask, cookie, name) tuples: inotify_simple's
    reader builds a namedtuple per event and decodes each name through os.fsdecode, a third
    of the reader's time in a burst. Never waits. Without `listings`, a directory's open,
    read and close are left out before anything is made of them (a walk's own, see _drain)."""
    fd = ino.fileno()
    avail = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, avail, True)
    if not avail[0]:
        return []
    data = os.read(fd, min(avail[0], _READ_MAX))
    out: list[tuple[int, int, int, str]] = []
    append = out.append
    unpack = _HEADER.unpack_from
    pos, end = 0, len(data)
    while pos < end:
        wd, mask, cookie, size = unpack(data, pos)
        pos += 16
        if not listings and mask & _ISDIR and mask & _DIR_READ:
            pos += size
            continue
        if size:
            name = data[pos : pos + size]
            pos += size
            # The name is NUL-padded; bytes that are not UTF-8 become surrogate escapes, as
            # os.fsdecode makes them (a name is data, never refused).
            append((wd, mask, cookie, name.rstrip(b"\0").decode(_FS_ENCODING, _FS_ERRORS)))
        else:
            append((wd, mask, cookie, ""))
    return out


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
        root_check_interval: float = 5.0,
        caps: CapReporter | None = None,
        file_watch_max: int = FILE_WATCH_MAX,
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
        # wd -> its path + "/" for the directories of tagged trees without excludes: where
        # most events of a burst come from, handled in a few steps (_handle). Kept with
        # _wd_path by _register and _forget (a root's spec never changes in place).
        self._fast: dict[int, str] = {}
        self._pending: dict[int, tuple[int, str, bool, _Root, int]] = {}
        self._recent_scan: dict[str, float] = {}
        # Tagged regular files watched for their link count: wd <-> path, and the counts
        # above 1 (most files have one name: only the exceptions are kept).
        self._file_wd: dict[int, str] = {}
        self._file_path: dict[str, int] = {}
        self._file_links: dict[int, int] = {}
        self._file_budget = file_watch_max
        # What the rules and sinks use (set_actions): the tagged trees' kernel mask, and
        # whether files get link-count watches (they report attributes_changed only).
        self._actions: frozenset[str] | None = None
        self._tagged_mask = int(MASK)
        self._files_wanted = True
        self._batch = 0
        self._last_batch_us = now_us()
        # When the kernel queue was last read empty, and (after an overflow) the time from
        # which events were lost.
        self._read_us = now_us()
        self._overflow_since: int | None = None
        self._deferred: list[Any] = []
        self._rescans: dict[str, _Rescan] = {}
        self._drop_delay = _DROP_RESCAN_DELAY
        # Directories the watch limit left unwatched: path -> (root, when skipped).
        self._skipped: dict[str, tuple[_Root, int]] = {}
        self._skipped_more: list[_Root] = []  # roots with more skipped than _SKIPPED_CAP
        self._freed = False  # a watch went away: room, maybe, for a skipped directory
        self._unmounted: list[tuple[str, _Root]] = []
        self._mounts: dict[int, str] = {}
        self._mounts_file: IO[bytes] | None = None
        self._mounts_poll: select.poll | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._poller = select.poll()
        self._wake_poller = select.poll()  # the wake pipe only: for the gathering pause
        self._wake_r = self._wake_w = -1
        self._mounts_changed = False
        # Called (on the reader's thread) when the mount table changed: the agent checks its
        # media and shares then, instead of polling the table every second.
        self.on_mounts_changed: Callable[[], None] | None = None
        self._drain_every = 1
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {
            "events_read": 0,
            "reads": 0,  # reads of the kernel queue that returned events
            "unknown_watch": 0,  # events of a watch no longer known (left out)
            "overflows": 0,
            "rescans": 0,
            "emitted": 0,
            "dropped": 0,
            "filtered": 0,
            "vanished_before_watch": 0,
            "link_count_changes": 0,
        }
        self.kernel: dict[str, int | None] = {}

    # lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.kernel = apply_kernel_settings(self._settings, self._report)
        limit = self.kernel.get("max_user_watches")
        if limit:
            self._file_budget = min(self._file_budget, limit // 2)  # directories first
        queued = read_sysctl("max_queued_events") or 16_384
        self._drain_every = max(1, min(_DRAIN_EVERY, queued // 64))
        self._ino = INotify()
        self._poller = select.poll()
        self._poller.register(self._ino.fileno(), select.POLLIN)
        # A stop or a command wakes the reader at once through this pipe, so it can sleep
        # until the next root check when nothing happens.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller.register(self._wake_r, select.POLLIN)
        self._wake_poller = select.poll()
        self._wake_poller.register(self._wake_r, select.POLLIN)
        self._read_us = now_us()
        self._open_mounts()
        for root in self._roots:
            self._setup_root(root, scan=False, first=True)
        self._thread = threading.Thread(target=self._run, name="exfilwatch-inotify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._ino is not None:
            self._ino.close()
            self._ino = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._mounts_file is not None:
            self._mounts_file.close()
            self._mounts_file = None
            self._mounts_poll = None

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
        self._command(apply)
        done.wait(timeout=30)

    def set_actions(self, actions: frozenset[str] | None) -> None:
        """Ask the kernel only for what is used: an action left out costs no event at all.
        Directories keep the bits the tree needs (creations, deletions, moves, closes after
        write); opens, writes, reads and attribute changes are asked for only when wanted."""
        mask = int(MASK)
        if actions is not None:
            for action, bit in _OPTIONAL_BITS.items():
                if action not in actions:
                    mask &= ~bit
        files = actions is None or "attributes_changed" in actions
        if self._thread is None:
            self._actions, self._tagged_mask, self._files_wanted = actions, mask, files
            return
        self._command(lambda: self._apply_actions(actions, mask, files))

    def _apply_actions(self, actions: frozenset[str] | None, mask: int, files: bool) -> None:
        changed = mask != self._tagged_mask
        turned_on = files and not self._files_wanted
        self._actions, self._tagged_mask, self._files_wanted = actions, mask, files
        if not files and self._file_wd:
            for wd in list(self._file_wd):
                with contextlib.suppress(OSError):
                    assert self._ino is not None
                    self._ino.rm_watch(wd)
                self._forget_file(wd)
        if not changed and not turned_on:
            return
        ts = now_us()
        for root in self._roots:
            if root.filtered or root.state != "watching":
                continue
            if turned_on:
                # Every directory again with the new mask, and each file its link watch.
                self._add_tree(root, root.path, None, scan=False, ts=ts)
                continue
            for wd in list(root.wds):
                path = self._wd_path.get(wd)
                if path is None:
                    continue
                got = self._watch_dir(path, root)  # same inode: the same wd, mask replaced
                if isinstance(got, int) and got != wd:
                    self._add_tree(root, path, None, scan=False, ts=ts)

    def rescan(self, since_us: int, reason: str) -> None:
        """Report what changed in the tagged trees since `since_us` (ctime or mtime at or
        after it) as `rescanned` events, then a `rescan_completed` record with `reason`.

        Returns at once, from any thread: the walk runs on the reader thread (first thing
        after `start` when called before it), bounded by rescan_max_entries, and hands its
        events over in pieces of at most BATCH that wait for room like any tagged batch.
        Requests with the same reason that are still pending are merged (earliest `since_us`)."""
        request = _Rescan(reason, since_us, scope="tagged")
        self._command(lambda: self._schedule(request))

    def _command(self, command: Callable[[], None]) -> None:
        """Run `command` on the reader thread, soon (the reader is woken for it)."""
        self._commands.put(command)
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):  # full (already woken) or closed
                os.write(self._wake_w, b"\0")

    def stats(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "watches": len(self._wd_path),
            "file_watches": len(self._file_wd),
            "actions": "all" if self._actions is None else sorted(self._actions),
            "roots": {r.path: r.state for r in self._roots},
            "skipped_at_limit": len(self._skipped),
            "rescans_pending": len(self._rescans),
            **self.counters,
        }

    # reader thread ---------------------------------------------------------------------

    def _run(self) -> None:
        next_check = time.monotonic() + self._check_interval()
        while not self._stopping.is_set():
            try:
                if self._deferred:  # read during a walk: older than anything still queued
                    deferred, self._deferred = self._deferred, []
                    self._handle(deferred)
                # Idle wake-ups cost CPU on every workstation: with nothing to do the reader
                # sleeps until the next root check (a stop or a command wakes it at once).
                if self._deferred:
                    wait_ms = 0
                elif self._pending:
                    wait_ms = 5
                else:
                    wait_ms = max(1, int((next_check - time.monotonic()) * 1000))
                events = self._read(wait_ms)
                if events or self._pending:
                    self._handle(events)
                    # A root lost by an event is looked for at the shorter interval.
                    next_check = min(next_check, time.monotonic() + self._check_interval())
                    if (
                        0 < len(events) < _GATHER_BELOW
                        and not self._deferred
                        and self._wake_poller.poll(_GATHER_MS)  # see _GATHER_MS
                    ):
                        # Woken (a stop or a command, both looked at below): emptied, or
                        # every later pause would end at once.
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                if self._unmounted:
                    self._unmounts()
                if (
                    events
                    and not self._mounts_changed
                    and self._mounts_poll is not None
                    and self._mounts_poll.poll(0)
                ):
                    self._mounts_changed = True  # the wait above was skipped: events came
                if self._mounts_changed:
                    # A filesystem mounted over (or unmounted from) a root changes no watch:
                    # the roots are checked soon, not at the next interval. Not at once: the
                    # kernel's own events for it (IN_UNMOUNT) come first and say more.
                    self._check_mounts()
                    next_check = min(next_check, time.monotonic() + _MOUNT_ROOT_CHECK_DELAY)
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    command()
                if self._rescans:
                    self._run_rescans()
                checking = time.monotonic() >= next_check
                if checking:
                    self._check_roots()
                    self._check_mounts()
                    next_check = time.monotonic() + self._check_interval()
                if (self._skipped or self._skipped_more) and (checking or self._freed):
                    self._retry_skipped()
            except Exception as exc:
                # Unlike watchdog's dispatcher, the reader never dies on an error: it reports
                # and goes on, so a bug costs one batch, not all events from then on.
                log.exception("source_error")
                self._report(record("source_error", type(exc).__name__, message=str(exc)))
                time.sleep(0.05)
        try:
            if self._deferred:
                deferred, self._deferred = self._deferred, []
                self._handle(deferred)
            for _ in range(2):  # what the kernel queued before stop, then unpaired moves
                self._handle(self._read(0))
        except Exception as exc:
            self._report(record("source_error", type(exc).__name__, message=str(exc)))

    def _check_interval(self) -> float:
        """Seconds to the next root check: root_check_interval while a root is missing or
        replaced (looked for), WATCHING_CHECK_FACTOR times that while all are watched. A
        watched root's own rename or deletion comes as an event on its watch, a filesystem
        mounted over it through the mount table's poll; what only the check sees is a parent
        directory swapped. Each check is a wake-up of an idle agent (on this VM ~20 ms of CPU:
        most of its idle cost at a 5 s interval)."""
        if all(root.state == "watching" for root in self._roots):
            return until_beat(self._root_check_interval * WATCHING_CHECK_FACTOR)
        return self._root_check_interval

    def _read(self, timeout: int, listings: bool = True) -> list[Any]:
        """What the kernel queued; with nothing there, waits up to `timeout` ms for it, for a
        wake-up (a stop, a command) or for a change of the mount table."""
        assert self._ino is not None
        events = _read_events(self._ino, listings)
        if not events and timeout:
            ready = self._poller.poll(timeout)
            for fd, _ in ready:
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(fd, 4096)  # emptied; non-blocking
                elif self._mounts_file is not None and fd == self._mounts_file.fileno():
                    self._mounts_changed = True
            if ready:
                events = _read_events(self._ino)
        if events and events[-1][1] & _Q_OVERFLOW:
            # The kernel queues the overflow last: what it lost came after the previous read.
            since = self._read_us - 1_000_000
            if self._overflow_since is None or since < self._overflow_since:
                self._overflow_since = since
        self._read_us = now_us()
        return events

    def _drain(self) -> None:
        """Read what the kernel queued while a walk runs, and keep it for the reader loop.

        A walk's own listings queue four events per directory (open and close, on the
        directory and on its parent): left in the kernel, a walk of a few thousand directories
        overflows the default queue, and the rescan that follows overflows it again, for
        ever. Those listing events are dropped here; everything else is handled after the
        walk, in order."""
        if self._ino is None or len(self._deferred) >= _DEFERRED_CAP:
            return  # past the cap the kernel holds the rest, as it would without a walk
        events = self._read(0, listings=False)
        if events:
            self._deferred.extend(events)

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
        file_wd = self._file_wd
        file_path = self._file_path
        fast = self._fast
        plain = _PLAIN_ACTIONS
        # RawEvent's own __new__ is a Python function; the tuple's is a third of its cost.
        new = tuple.__new__
        self.counters["events_read"] += len(events)
        self.counters["reads"] += 1 if events else 0
        filtered = 0
        for wd, mask, cookie, name in events:
            if len(out) >= BATCH:
                self._send(out)
                out = []
                append = out.append
            hit = fast.get(wd)
            if hit is not None and name and name != marker:
                action = plain.get(mask)  # one bit: no ISDIR, no move, no overflow
                if action is not None:
                    # What the checks below decide for it: a tagged tree's file, no listing,
                    # nothing excluded, no marker.
                    append(
                        new(RawEvent, (ts, action, hit + name, None, False, "inotify", "tagged"))
                    )
                    continue
            if mask & _Q_OVERFLOW:
                self._overflow()
                continue
            dirpath = wd_path.get(wd)
            if dirpath is None:
                if file_wd and wd in file_wd:
                    self._file_event(wd, mask, ts, out)
                elif not mask & _IGNORED:
                    # A watch already forgotten (its IN_IGNORED read before): counted, so
                    # that every event read is accounted for in the stop record.
                    self.counters["unknown_watch"] += 1
                continue
            root = wd_root[wd]
            loc = root.spec.location
            if mask & _IGNORED:
                self._forget(wd)
                self._freed = True
                if dirpath == root.path and root.state == "watching":
                    unmounted = any(p == dirpath for p, _ in self._unmounted)
                    self._root_lost(root, "unmounted" if unmounted else "ignored")
                continue
            if mask & _SELF:
                if dirpath == root.path:
                    self._root_lost(root, "moved" if mask & _MOVE_SELF else "deleted")
                continue
            if mask & _UNMOUNT:
                # The filesystem under this watch went away; IN_IGNORED follows. What is at
                # the path now is watched once the batch is done (_unmounts).
                self._unmounted.append((dirpath, root))
                continue
            isdir = bool(mask & _ISDIR)
            if (
                loc != "tagged"
                and (mask & _NOT_LANDED or (mask & _CREATE and not isdir))
                and not (mask & _DELETE and not isdir and evidence_name(name))
            ):
                # Outside tagged trees a new empty file says nothing yet, nor does a delete,
                # except of the evidence an insider removes (an archive, a shell history).
                filtered += 1
                continue
            if (isdir and mask & _DIR_READ) or (name == marker and mask & _DIR_READ):
                continue  # directory listings and the agent's own marker reads
            if not name:
                # The directory's own event (its attributes): its parent's watch reports the
                # same with a name, so only a root's own is reported.
                if dirpath != root.path:
                    continue
                path = dirpath
            else:
                path = f"{dirpath}/{name}" if dirpath != "/" else f"/{name}"
                if root.has_excludes and root.excludes.leaf_excluded(root.rel(path), name):
                    continue
            if mask & _MODIFY:
                append(new(RawEvent, (ts, "modified", path, None, isdir, "inotify", loc)))
            elif mask & _OPEN:
                append(new(RawEvent, (ts, "opened", path, None, isdir, "inotify", loc)))
            elif mask & _CLOSE_WRITE:
                append(new(RawEvent, (ts, "closed_write", path, None, isdir, "inotify", loc)))
            elif mask & _CLOSE_NOWRITE:
                append(new(RawEvent, (ts, "closed_nowrite", path, None, isdir, "inotify", loc)))
            elif mask & _CREATE:
                if recent and recent.pop(path, None) is not None:
                    continue
                append(new(RawEvent, (ts, "created", path, None, isdir, "inotify", loc)))
                if isdir:
                    if root.spec.recursive:
                        self._add_tree(root, path, out, scan=True, ts=ts)
                elif loc == "tagged":
                    self._watch_file(path, 1)
            elif mask & _DELETE:
                append(new(RawEvent, (ts, "deleted", path, None, isdir, "inotify", loc)))
                if not isdir and file_path:
                    self._unwatch_file(path)
            elif mask & _MOVED_FROM:
                self._pending[cookie] = (ts, path, isdir, root, batch)
            elif mask & _MOVED_TO:
                pend = self._pending.pop(cookie, None)
                if pend is not None:
                    append(new(RawEvent, (ts, "moved", path, pend[1], isdir, "inotify", loc)))
                    if isdir:
                        self._dir_moved(pend[1], pend[3], path, root, out=out, ts=ts)
                    else:
                        self._file_moved(pend[1], path, loc == "tagged")
                else:
                    append(new(RawEvent, (ts, "moved_in", path, None, isdir, "inotify", loc)))
                    if isdir:
                        if root.spec.recursive:
                            self._add_tree(root, path, out, scan=True, ts=ts)
                    elif loc == "tagged":
                        self._watch_file(path, 1)
            elif mask & _ATTRIB:
                append(new(RawEvent, (ts, "attributes_changed", path, None, isdir, "inotify", loc)))
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
                    elif self._file_path:
                        self._unwatch_file(ppath)
        if recent:
            self._expire_recent()
        self.counters["filtered"] += filtered
        self._last_batch_us = ts
        if out:
            self._send(out)

    def _send(self, out: list[RawEvent], since_us: int | None = None) -> int:
        """Hand events to the pipeline, at most BATCH at a time. What it could not queue is
        looked for again by a rescan (`since_us`: from when; by default a second before each
        dropped event). Returns how many were dropped."""
        dropped = 0
        for i in range(0, len(out), BATCH):
            piece = out[i : i + BATCH] if len(out) > BATCH else out
            self.counters["emitted"] += len(piece)
            cut = self._emit(piece)
            if cut:
                dropped += len(cut)
                self._dropped(cut, since_us)
        return dropped

    # watches ---------------------------------------------------------------------------

    def _register(self, wd: int, path: str, root: _Root) -> None:
        self._wd_path[wd] = path
        self._wd_root[wd] = root
        self._path_wd[path] = wd
        root.wds.add(wd)
        if root.spec.location == "tagged" and not root.has_excludes:
            self._fast[wd] = "/" if path == "/" else path + "/"
        else:
            self._fast.pop(wd, None)

    def _forget(self, wd: int) -> None:
        self._fast.pop(wd, None)
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
        self._unwatch_files_under(top)

    def _dir_moved(
        self, src: str, src_root: _Root, dst: str, dst_root: _Root, *, out: list[RawEvent], ts: int
    ) -> None:
        moved = self._subtree(src)
        if src_root is dst_root and moved:
            for old, wd in moved:
                new = dst + old[len(src) :]
                self._forget(wd)
                self._register(wd, new, dst_root)
            if self._file_path:
                prefix = src + "/"
                for old in [p for p in self._file_path if p.startswith(prefix)]:
                    self._file_moved(old, dst + old[len(src) :], True)
            return
        # Moved between roots (their excludes and recursion may differ): re-add under the new one.
        self._drop_subtree(src)
        if dst_root.spec.recursive:
            self._add_tree(dst_root, dst, out, scan=False, ts=ts)

    # file watches (link counts) ----------------------------------------------------------

    def _watch_file(self, path: str, nlink: int) -> bool:
        """Watch a tagged file's link count. False once the file watch budget is spent."""
        if not self._files_wanted:
            return True  # no rule uses attributes_changed: nothing would read the watch
        if len(self._file_wd) >= self._file_budget:
            if self._file_budget > 0:
                self._caps.hit(
                    "file_watches",
                    self._file_budget,
                    hint="hard links made to tagged files past this many are seen only by a "
                    "rescan; raise fs.inotify.max_user_watches",
                )
            return False
        try:
            wd = self._add_watch(path, FILE_MASK)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._file_budget = len(self._file_wd)
                return False
            return True  # gone already, or not ours to watch: the next file may be
        if wd in self._wd_path:
            return True  # it became a directory meanwhile; that one has its own watch
        old = self._file_wd.get(wd)
        if old is not None and self._file_path.get(old) == wd and old != path:
            del self._file_path[old]  # a second name inside the tree: keep the newest
        self._file_wd[wd] = path
        self._file_path[path] = wd
        if nlink > 1:
            self._file_links[wd] = nlink
        return True

    def _forget_file(self, wd: int) -> None:
        path = self._file_wd.pop(wd, None)
        self._file_links.pop(wd, None)
        if path is not None and self._file_path.get(path) == wd:
            del self._file_path[path]

    def _unwatch_file(self, path: str) -> None:
        wd = self._file_path.get(path)
        if wd is None:
            return
        self._forget_file(wd)
        if self._ino is not None:
            with contextlib.suppress(OSError):  # gone with the file's last name
                self._ino.rm_watch(wd)

    def _unwatch_files_under(self, top: str) -> None:
        if not self._file_path:
            return
        prefix = top.rstrip("/") + "/"
        for path in [p for p in self._file_path if p.startswith(prefix)]:
            self._unwatch_file(path)

    def _file_moved(self, src: str, dst: str, tagged: bool) -> None:
        wd = self._file_path.get(src)
        if wd is None:
            if tagged:
                self._watch_file(dst, 1)
        elif not tagged:  # renamed into a place that is not a tagged tree
            self._unwatch_file(src)
        else:
            del self._file_path[src]
            self._file_wd[wd] = dst
            self._file_path[dst] = wd

    def _file_event(self, wd: int, mask: int, ts: int, out: list[RawEvent]) -> None:
        """A tagged file's own watch: its link count may have changed. A chmod or touch
        shows up here too, and is left to the directory's watch, which reports it by name."""
        if mask & _IGNORED:
            self._forget_file(wd)
            self._freed = True
            return
        if not mask & _ATTRIB:
            return
        path = self._file_wd[wd]
        st = _lstat(path)
        if st is None:
            return  # its last name in the tree went: the directory's watch said so
        nlink = st.st_nlink if stat.S_ISREG(st.st_mode) else 1
        if nlink == self._file_links.get(wd, 1):
            return
        if nlink > 1:
            self._file_links[wd] = nlink
        else:
            self._file_links.pop(wd, None)
        self.counters["link_count_changes"] += 1
        out.append(RawEvent(ts, "attributes_changed", path, None, False, "inotify", "tagged"))

    def _shed_file_watches(self) -> bool:
        """At the watch limit directories come first (a directory's watch sees every file in
        it; a file's own watch only its link count): give some file watches back."""
        if not self._file_wd or self._ino is None:
            return False
        for _ in range(min(len(self._file_wd), 1024)):
            wd, path = self._file_wd.popitem()
            self._file_links.pop(wd, None)
            if self._file_path.get(path) == wd:
                del self._file_path[path]
            with contextlib.suppress(OSError):
                self._ino.rm_watch(wd)
        self._file_budget = len(self._file_wd)
        self._caps.hit(
            "file_watches",
            self._file_budget,
            why="watch_limit",
            hint="file watches were given back so that directories can be watched",
        )
        return True

    def _add_watch(self, path: str, mask: int) -> int:
        """inotify_add_watch, also for a path longer than PATH_MAX: through a descriptor
        opened component by component (never following a symlink) and its /proc/self/fd
        name, which the kernel resolves to the inode itself."""
        assert self._ino is not None
        if not _long(path):
            wd: int = self._ino.add_watch(path, mask)
            return wd
        last = os.O_PATH | os.O_NOFOLLOW | (os.O_DIRECTORY if mask & _ONLYDIR else 0)
        fd = _open_path(path, last)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            try:
                wd = self._ino.add_watch(f"/proc/self/fd/{fd}", mask & ~_DONT_FOLLOW)
            except FileNotFoundError as exc:  # no /proc here: such a path cannot be named
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path) from exc
            return wd
        finally:
            os.close(fd)

    def _watch_dir(self, d: str, root: _Root) -> int | str:
        """Watch one directory: its wd, or why not (a _Problems reason)."""
        for attempt in (0, 1):
            try:
                return self._add_watch(d, EGRESS_MASK if root.filtered else self._tagged_mask)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    if attempt == 0 and self._shed_file_watches():
                        continue
                    return "watch_limit"
                if exc.errno in (errno.EACCES, errno.EPERM):
                    return "permission"
                if exc.errno == errno.ENAMETOOLONG:
                    return "too_long"
                return "vanished"
        return "watch_limit"

    def _skip(self, d: str, root: _Root) -> None:
        """Remember a directory the watch limit left unwatched, to retry it (bounded)."""
        if d in self._skipped:
            return
        if len(self._skipped) < _SKIPPED_CAP:
            self._skipped[d] = (root, now_us())
        elif root not in self._skipped_more:
            self._skipped_more.append(root)

    def _add_tree(
        self,
        root: _Root,
        top: str,
        out: list[RawEvent] | None,
        *,
        scan: bool,
        ts: int,
        since_us: int | None = None,
        retrying: bool = False,
    ) -> int:
        """Watch `top` and (when recursive) every directory under it; returns watches added.

        With `scan`, entries already inside are reported as created (source "scan"): a tree
        made or moved in faster than we can watch it would otherwise be invisible. In a
        tagged tree each regular file also gets a watch for its link count (within the file
        watch budget), and files that already have more than one name are reported
        (`hard_links_found`): one lstat and one add_watch per file, bounded by the budget.
        `retrying`: directories the watch limit still leaves out are not reported again."""
        problems = _Problems()
        added = 0
        listed = 0
        limit_hit = False
        stack = [top]
        ex = root.excludes
        recent = self._recent_scan
        max_depth = root.spec.max_depth
        max_dirs = root.spec.max_dirs
        budget_hit = False
        home = root.spec.location == "home"
        files = not root.filtered and self._file_budget > 0 and self._files_wanted
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
                got = self._watch_dir(d, root)
                if isinstance(got, str):
                    if got == "watch_limit":
                        limit_hit = True
                        self._skip(d, root)
                        problems.add(got, d)
                    else:
                        # A new directory gone before it could be watched: what was written
                        # in it meanwhile was never seen. A loss, not a warning.
                        vanished = got == "vanished" and scan
                        problems.add("vanished_before_watch" if vanished else got, d)
                        continue
                else:
                    known = self._wd_path.get(got)
                    if known is not None and known != d:
                        continue  # same directory reached twice (bind mount): never loop
                    stale = self._path_wd.get(d)
                    if stale is not None and stale != got:
                        # The name now holds another directory (replaced while events were
                        # lost): the old watch sees nothing there any more.
                        self._forget(stale)
                        with contextlib.suppress(OSError):
                            assert self._ino is not None
                            self._ino.rm_watch(stale)
                    if known is None:
                        self._register(got, d, root)
                        added += 1
            else:
                self._skip(d, root)
                problems.add("watch_limit", d)
            if d != root.path and not root.spec.recursive:
                continue
            if d == root.path and not root.spec.recursive and not scan and not files:
                continue
            hidden: list[str] = []
            try:
                with _listing(d) as it:
                    for entry in it:
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)  # d_type: no syscall
                        except OSError:
                            continue
                        if not is_dir and not files and not (scan and out is not None):
                            # Only directories are watched here: a million files in /tmp
                            # cost a d_type test each, not a path and a glob match.
                            continue
                        name = entry.name
                        p = f"{d}/{name}" if d != "/" else f"/{name}"
                        if ex and ex.leaf_excluded(root.rel(p), name):
                            continue
                        st: os.stat_result | None = None
                        report = scan and out is not None
                        if report and since_us is not None:
                            # On the medium before it was mounted: not news.
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            report = max(st.st_ctime_ns, st.st_mtime_ns) // 1000 >= since_us
                        if report and out is not None:
                            out.append(
                                RawEvent(ts, "created", p, None, is_dir, "scan", root.spec.location)
                            )
                            if len(recent) < _RECENT_SCAN_CAP:
                                recent[p] = time.monotonic()
                            else:
                                self._caps.hit("recent_scan", _RECENT_SCAN_CAP)
                        if (
                            files
                            and not is_dir
                            and p not in self._file_path
                            and entry.is_file(follow_symlinks=False)
                        ):
                            try:
                                st = st or entry.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            if st.st_nlink > 1:
                                problems.add("hard_link", p)
                            files = self._watch_file(p, st.st_nlink)
                            problems.files_left = not files
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
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR) and d != root.path:
                    # Removed after its watch was added (mkdir; rmdir): its deletion comes
                    # through that watch, nothing is missed, and it is not a problem.
                    pass
                else:
                    problems.add("too_long" if exc.errno == errno.ENAMETOOLONG else "vanished", d)
            # In a home, hidden directories are the staging places: watched first, so a
            # large source tree beside them cannot use up the watch budget before them.
            stack.extend(hidden)
            listed += 1
            if not listed % self._drain_every:
                self._drain()
        if retrying:
            problems.by_reason.pop("watch_limit", None)
        self._report_problems(root, problems)
        return added

    def _report_problems(self, root: _Root, problems: _Problems) -> None:
        names = {
            "watch_limit": "watch_limit_reached",
            "permission": "watch_permission_denied",
            "vanished": "watch_path_vanished",
            "vanished_before_watch": "event_loss",
            "too_long": "watch_path_too_long",
            "hard_link": "hard_links_found",
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
                data["hint"] = (
                    "raise fs.inotify.max_user_watches or exclude build/cache trees; these "
                    "directories are watched as soon as watches free up (watch_retried)"
                )
            if reason == "hard_link":
                data["truncated"] = problems.files_left
                data["hint"] = (
                    "these tagged files have another name, possibly outside any watched tree, "
                    "where reads and copies leave no trace"
                )
            self._report(record(names[reason], reason, **data))

    def _setup_root(
        self, root: _Root, *, scan: bool, first: bool = False, since_us: int | None = None
    ) -> None:
        st = _lstat(root.path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if root.state != "replaced":
                self._replaced(root, st)
            return
        if st is None:
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
        ts = now_us()
        root.ident = _ident(st)
        root.confirmed_us = ts
        out: list[RawEvent] = []
        self._add_tree(root, root.path, out, scan=scan, ts=ts, since_us=since_us)
        root.state = "watching" if root.path in self._path_wd else "missing"
        if root.state == "watching":
            root.lost_us = None
        self._send(out)

    def _root_lost(self, root: _Root, reason: str) -> None:
        self._root_lost_quietly(root)
        action = "watch_root_moved" if reason == "moved" else "watch_root_vanished"
        self._report(
            record(action, reason, root=root.path, hint="watched again when the path reappears")
        )

    def _replaced(self, root: _Root, st: os.stat_result) -> None:
        link = stat.S_ISLNK(st.st_mode)
        target = None
        if link:
            with contextlib.suppress(OSError):
                target = os.readlink(root.path)
        self._root_lost_quietly(root)
        root.state = "replaced"
        self._report(
            record(
                "watch_root_replaced",
                "symlink" if link else "not_directory",
                root=root.path,
                target=target,
                hint="a symbolic link is never followed: nothing is watched here until a real "
                "directory is back at this path (configure the directory itself)",
            )
        )

    def _check_roots(self) -> None:
        """Each root is still the directory that is watched: one lstat per root compares its
        device and inode (a rename away and back, a symlink put in its place, a filesystem
        mounted over it or under it all show here, most without any event on the watches)."""
        # What already happened (a MOVE_SELF, a DELETE_SELF) says more than a stat: first.
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            self._handle(deferred)
        events = self._read(0)
        if events:
            self._handle(events)
        now = now_us()
        for root in self._roots:
            st = _lstat(root.path)
            isdir = st is not None and stat.S_ISDIR(st.st_mode)
            if root.state == "watching":
                if st is not None and isdir and _ident(st) == root.ident:
                    root.confirmed_us = now
                else:
                    self._root_changed(root, st)
            elif isdir:
                previous = root.state
                since = root.lost_us - 1_000_000 if root.lost_us is not None else None
                self._setup_root(root, scan=True, since_us=since)
                if root.state == "watching":
                    self._report(
                        record(
                            "watch_root_restored",
                            None,
                            root=root.path,
                            after=previous,
                            watches=len(root.wds),
                            since_us=since,
                        )
                    )
            elif st is not None and root.state != "replaced":
                self._replaced(root, st)
            elif st is None and root.state == "replaced":
                root.state = "missing"

    def _root_changed(self, root: _Root, st: os.stat_result | None) -> None:
        previous = root.ident
        since = root.confirmed_us - 1_000_000
        self._root_lost_quietly(root)
        root.lost_us = root.confirmed_us
        if st is None:
            self._report(
                record(
                    "watch_root_vanished",
                    "gone",
                    root=root.path,
                    hint="the path leads nowhere now (a mount over a parent, a lazy unmount); "
                    "watched again when it reappears",
                )
            )
            return
        if not stat.S_ISDIR(st.st_mode):
            self._replaced(root, st)
            return
        self._setup_root(root, scan=True, since_us=since)
        moved = previous is None or previous[0] != st.st_dev
        self._report(
            record(
                "watch_root_changed",
                "remounted" if moved else "replaced",
                root=root.path,
                previous_device=previous[0] if previous else None,
                previous_inode=previous[1] if previous else None,
                device=st.st_dev,
                inode=st.st_ino,
                watches=len(root.wds),
                since_us=since,
                hint="the path leads to another directory now: that one is watched, and what "
                "changed in it since the last check is reported",
            )
        )

    # mounts ------------------------------------------------------------------------------

    @property
    def signals_mounts(self) -> bool:
        """Does this source say when the mount table changes (on_mounts_changed)?"""
        return self._mounts_poll is not None

    def _open_mounts(self) -> None:
        """The mount table, and a poll that says when it changes (no reading it every second)."""
        try:
            fh = open("/proc/self/mounts", "rb")  # noqa: SIM115 - kept open to be polled
        except OSError:
            return
        poller = select.poll()
        poller.register(fh.fileno(), select.POLLPRI | select.POLLERR)
        self._mounts_file = fh
        self._mounts_poll = poller
        # The reader's own wait ends on a change too: mounts are seen at once, not at the next
        # root check. Whichever poll sees a change first takes it (the kernel reports each
        # change once per open file), so the reader's records it in _mounts_changed.
        self._poller.register(fh.fileno(), select.POLLPRI | select.POLLERR)
        self._mounts = _mount_points()

    def _check_mounts(self, force: bool = False) -> set[str]:
        """A filesystem mounted or unmounted (lazily too) at a path inside a watched tree
        leaves the old watches on an inode no longer at that path: what is there now is
        watched instead, with a record. Returns the paths dealt with."""
        if self._mounts_changed:
            self._mounts_changed, force = False, True
        if self._mounts_poll is None or not (self._mounts_poll.poll(0) or force):
            return set()
        hook = self.on_mounts_changed
        if hook is not None:
            hook()
        current = _mount_points()
        previous, self._mounts = self._mounts, current
        appeared = {current[i] for i in current.keys() - previous.keys()}
        gone = {previous[i] for i in previous.keys() - current.keys()}
        done: set[str] = set()
        for path in sorted(appeared | gone):
            root = self._tree_of(path)
            parent = path[: path.rfind("/")] or "/"
            if root is None or parent not in self._path_wd:
                continue  # a root itself (_check_roots), or excluded, or not watched
            self._remount(root, path, "mounted" if path in appeared else "unmounted")
            done.add(path)
        return done

    def _tree_of(self, path: str) -> _Root | None:
        """The watched root `path` is strictly inside (the deepest, when roots nest)."""
        best: _Root | None = None
        for root in self._roots:
            inside = root.state == "watching" and path.startswith(root.path.rstrip("/") + "/")
            if inside and (best is None or len(root.path) > len(best.path)):
                best = root
        return best

    def _remount(self, root: _Root, path: str, how: str) -> None:
        ts = now_us()
        dropped = len(self._subtree(path))
        self._drop_subtree(path)
        out: list[RawEvent] = []
        added = 0
        st = _lstat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            since = ts - LATE_ROOT_LOOKBACK_US
            added = self._add_tree(root, path, out, scan=True, ts=ts, since_us=since)
        self._send(out)
        self._report(
            record(
                "watch_mounted" if how == "mounted" else "watch_unmounted",
                how,
                root=root.path,
                path=path,
                device=st.st_dev if st is not None else None,
                watches_dropped=dropped,
                watches=added,
                found=len(out),
                hint="another filesystem is at this path now: it is watched instead, and what "
                "changed in it in the last seconds is reported",
            )
        )

    def _unmounts(self) -> None:
        """After IN_UNMOUNT: what is at each unmounted path now (the directory the mount
        covered) is watched, unless the mount table check already did it."""
        unmounted, self._unmounted = self._unmounted, []
        done = self._check_mounts(force=True)
        if any(path == root.path for path, root in unmounted):
            self._check_roots()  # a root unmounted: what it covered is watched now, not later
        paths = {p for p, _ in unmounted}
        for path, root in unmounted:
            parent = path[: path.rfind("/")] or "/"
            if (
                path == root.path  # a root: _root_lost said so; _check_roots watches it again
                or path in done
                or path in self._path_wd
                or parent in paths
                or root not in self._roots
                or root.state != "watching"
                or parent not in self._path_wd
            ):
                continue
            done.add(path)
            self._remount(root, path, "unmounted")

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
        self._unwatch_files_under(root.path)
        for d in [d for d, (r, _) in self._skipped.items() if r is root]:
            del self._skipped[d]
        if root.state == "watching":
            root.lost_us = now_us()
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

    def _overflow(self) -> None:
        since = self._overflow_since
        if since is None:
            since = self._last_batch_us - 1_000_000
        self._overflow_since = None
        self.counters["overflows"] += 1
        self._report(
            record(
                "event_loss",
                "inotify_overflow",
                source=self.name,
                # The limit this instance got when it was created, not today's sysctl.
                max_queued_events=self.kernel.get("max_queued_events"),
                since=since + 1_000_000,
                hint="events were lost in the kernel queue; a rescan follows",
            )
        )
        self._schedule(_Rescan("inotify_overflow", since, scope="all"))

    def _dropped(self, events: list[RawEvent], since_us: int | None) -> None:
        """Events the pipeline had no room for (already counted and reported as queue_full):
        the directories they were in are listed again, soon, for what changed since.

        Staging places are not: what is shed there is a flood (a build, a package manager, or
        the watched user's own storm to bury something), and rescanning it would put the
        flood back in the queue. Their sheds are reported only."""
        self.counters["dropped"] += len(events)
        req = _Rescan(
            "queue_full", since_us if since_us is not None else now_us(), due=time.monotonic()
        )
        req.due += self._drop_delay
        for raw in events:
            if LANE_OF.get(raw.location, "staging") == "staging":
                continue
            req.dropped += 1
            if raw.action in _NOT_RECOVERABLE:
                req.not_recoverable[raw.action] = req.not_recoverable.get(raw.action, 0) + 1
                continue
            directory = raw.path[: raw.path.rfind("/")] or "/"
            wd = self._path_wd.get(directory)
            root = self._wd_root.get(wd) if wd is not None else None
            if root is None:
                continue  # no longer watched: gone, moved out, or its root went
            if since_us is not None:
                since = since_us
            elif raw.source == "scan":
                since = 0  # a scan reports what was there, however old
            else:
                since = raw.timestamp_us - 1_000_000
            have = req.dirs.get(directory)
            if have is None or since < have[1]:
                req.dirs[directory] = (root, since)
        if not req.dropped:
            return
        req.since_us = min((s for _, s in req.dirs.values()), default=req.since_us)
        self._schedule(req)
        pending = self._rescans["queue_full"]
        if len(pending.dirs) > _DROP_DIRS_CAP:  # too many to list one by one: walk the roots
            for root, _ in pending.dirs.values():
                if root not in pending.roots:
                    pending.roots.append(root)
            pending.dirs.clear()

    def _schedule(self, req: _Rescan) -> None:
        have = self._rescans.get(req.reason)
        if have is None:
            self._rescans[req.reason] = req
        else:
            have.merge(req)

    def _run_rescans(self) -> None:
        now = time.monotonic()
        for reason in list(self._rescans):
            req = self._rescans[reason]
            if req.due <= now:
                del self._rescans[reason]
                self._rescan(req)

    def _rescan(self, req: _Rescan) -> None:
        """Walk what `req` covers (bounded by rescan_max_entries), watch directories found
        unwatched, and report entries changed since `req.since_us` as `rescanned` events,
        handed over in pieces of at most BATCH that wait for room: never one batch bigger
        than the queue. A `rescan_completed` record closes it (health records travel ahead
        of queued events, so it can be written before the last of them)."""
        self.counters["rescans"] += 1
        began = time.monotonic()
        ts = now_us()
        overflow = req.scope == "all"
        if overflow:
            self._purge_stale()
        walk = _Walk(req.since_us, self._rescan_max)
        roots = [
            r
            for r in self._roots
            if r.state == "watching"
            and (overflow or (req.scope == "tagged" and not r.filtered) or r in req.roots)
        ]
        for root in roots:
            self._walk(root, root.path, walk, ts=ts, since=req.since_us, deep=True, fix=overflow)
        for d, (root, since) in req.dirs.items():
            if root in roots or root not in self._roots or root.state != "watching":
                continue
            self._walk(root, d, walk, ts=ts, since=since, deep=False, fix=False)
        self._flush(walk)
        if walk.truncated:
            self._caps.hit("rescan_max_entries", self._rescan_max)
        if req.reason == "queue_full":
            # Dropped again (the consumer is still stuck): look again later, not at once.
            delay = self._drop_delay * 2 if walk.dropped else _DROP_RESCAN_DELAY
            self._drop_delay = min(delay, _DROP_RESCAN_DELAY_MAX)
        data: dict[str, Any] = {
            "since_us": req.since_us,
            "roots": [r.path for r in roots],
            "directories": walk.directories,
            "scanned": min(walk.scanned, walk.budget),
            "changed": walk.changed,
            "pieces": walk.pieces,
            "dropped": walk.dropped,
            "watches_added": walk.watched,
            "truncated": walk.truncated,
            "seconds": round(time.monotonic() - began, 3),
        }
        if req.reason == "queue_full":
            data["events_dropped"] = req.dropped
            data["not_recoverable"] = req.not_recoverable
            data["hint"] = (
                "what the queue could not take was looked for again; reads, deletions and "
                "moves out leave nothing to find"
            )
        self._report(record("rescan_completed", req.reason, **data))

    def _walk(
        self, root: _Root, top: str, w: _Walk, *, ts: int, since: int, deep: bool, fix: bool
    ) -> None:
        """List `top` (and with `deep`, what is below it) for entries changed since `since`.
        With `fix` (after an overflow, when events about directories were lost too) every
        directory is watched again: one that was replaced under the same name gets a watch."""
        stack = [top]
        ex = root.excludes
        loc = root.spec.location
        max_depth = root.spec.max_depth
        descend = deep and root.spec.recursive
        while stack and not w.truncated:
            d = stack.pop()
            depth = root.rel(d).count("/") + 1 if d != root.path else 0
            if d not in self._path_wd:
                w.watched += self._add_tree(root, d, None, scan=False, ts=ts)
            elif fix:
                got = self._watch_dir(d, root)
                if isinstance(got, int) and got != self._path_wd.get(d):
                    w.watched += self._add_tree(root, d, None, scan=False, ts=ts)
            try:
                with _listing(d) as it:
                    for entry in it:
                        w.scanned += 1
                        if w.scanned > w.budget:
                            w.truncated = True
                            break
                        name = entry.name
                        p = f"{d}/{name}" if d != "/" else f"/{name}"
                        if ex and ex.leaf_excluded(root.rel(p), name):
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        is_dir = stat.S_ISDIR(st.st_mode)
                        if max(st.st_ctime_ns, st.st_mtime_ns) // 1000 >= since:
                            w.changed += 1
                            w.out.append(RawEvent(ts, "rescanned", p, None, is_dir, "rescan", loc))
                            if len(w.out) >= BATCH:
                                self._flush(w)
                        if is_dir and descend and (max_depth is None or depth < max_depth):
                            stack.append(p)
            except OSError:
                pass
            w.directories += 1
            if not w.directories % self._drain_every:
                self._drain()

    def _flush(self, w: _Walk) -> None:
        if w.out:
            out, w.out = w.out, []
            w.pieces += 1
            w.dropped += self._send(out, since_us=w.since_us)

    def _purge_stale(self) -> None:
        """After an overflow the IN_IGNORED of deleted directories may be lost: forget watches
        whose path holds no directory now (their names may be reused)."""
        assert self._ino is not None
        for path, wd in list(self._path_wd.items()):
            st = _lstat(path)
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._forget(wd)
                with contextlib.suppress(OSError):
                    self._ino.rm_watch(wd)
        for path in [p for p in self._file_path if _lstat(p) is None]:
            self._unwatch_file(path)

    def _retry_skipped(self) -> None:
        """Watch directories the watch limit left out, now that watches may have freed up
        (one of ours went, or once per root check for other processes'). What changed in
        them while unwatched is reported as found by a scan."""
        self._freed = False
        skipped = self._skipped
        ts = now_us()
        out: list[RawEvent] = []
        watched = 0
        roots: list[str] = []
        full = False
        for d, (root, at) in list(skipped.items()):
            if d not in skipped:
                continue  # watched meanwhile, under a directory retried before it
            if root not in self._roots or root.state != "watching" or d in self._path_wd:
                del skipped[d]
                continue
            added = self._add_tree(
                root, d, out, scan=True, ts=ts, since_us=at - 1_000_000, retrying=True
            )
            watched += added
            if added and root.path not in roots:
                roots.append(root.path)
            if d in self._path_wd or _lstat(d) is None:
                del skipped[d]
                continue
            full = True  # still at the limit: the rest waits for the next try
            break
        for p in [p for p in skipped if p in self._path_wd]:  # watched with a parent
            del skipped[p]
        if not skipped and not full and self._skipped_more:
            # More were skipped than remembered: a walk of those roots finds and watches them.
            more, self._skipped_more = self._skipped_more, []
            alive = [r for r in more if r in self._roots]
            self._schedule(_Rescan("watch_limit_retry", ts - 1_000_000, roots=alive))
        self._send(out)
        if watched:
            self._report(
                record(
                    "watch_retried",
                    None,
                    roots=roots,
                    watched=watched,
                    still_skipped=len(skipped),
                    found=len(out),
                    watches=len(self._wd_path),
                )
            )
