"""Linux fanotify directory-entry reader: which pid created, deleted, renamed or wrote a path.

Cost, measured on Linux 6.18, 2 vCPUs, ext4 (a loop-mounted image, so that no other activity
was counted), median of 15 runs. The filesystem mark makes every process on the filesystem pay,
inside the watched trees or not, and the reader reads and throws away what is outside:

- the storming process, a C loop over open(O_CREAT)+close then unlink of 20,000 files in 100
  directories: +0.7-0.8 us per create (7.7 us without the watcher, ~10%) and +0.2-0.65 us per
  unlink (5.4 us, ~4-12%), the same inside or outside the trees, in either mode;
- the reader: 1.3-2.0 us CPU per event outside the trees (one dict probe on the directory
  handle, plus read() and poll), 3.7-4.7 us per event inside (path, Access, cache);
- `cp -r` of 10,000 one-byte files in 100 directories, then `rm -rf` of the copy (20,202
  events): the reader spent 40 ms (outside the trees) or 94 ms (inside); the cp (206 ms CPU)
  and rm (87 ms) grew by less than the run-to-run noise (~5%), as the per-file figures predict;
- close-after-write (FAN_CLOSE_WRITE, so a write names its writer): a process rewriting
  20,000 existing files outside the trees (open, write, close) paid +1.3 us per file (50.4 ->
  51.8 us, median of 7) and the reader 2.5 us per file (/tmp/cwbench-style run, noted in the
  issue); a file made and closed at once is usually one record (the kernel merges the create
  and the close of one pid while they wait in the queue);
- idle: no wake-ups (poll without a timeout); start() walks the trees at ~12 us per directory
  (10,101 directories: 125 ms), and the handle cache holds ~200 bytes per directory.

Reading every event as it came cost ~7 us per event (1.7 events per read); letting events
gather for 5 ms after a read (_GATHER_MS) brought it to the figures above (60-140 per read).

An inode mark with FAN_EVENT_ON_CHILD on each directory of the trees instead costs nothing
outside them (measured: +0.0 us per create and unlink outside, 401 marked directories), but
takes a mark per directory (fs.fanotify.max_user_marks), pins those inodes, and misses what is
made in a new directory before its mark is added: the inotify race again. Outside cost can
also be bounded by keeping the trees on their own filesystem, or by ignore marks
(FAN_MARK_IGNORE, 6.0+) on busy directories, which only cover a directory's own entries.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import select
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from agent.health import CapReporter, Reporter, record
from agent.sources.fanotify import (
    Access,
    _inside,
    _mount_dir,
    _norm,
    _queue_limit,
    _reason,
    _Throttle,
)

# Values from <linux/fanotify.h>; they are kernel ABI and never change.
FAN_CLOSE_WRITE: Final = 0x08
FAN_MOVED_FROM: Final = 0x40
FAN_MOVED_TO: Final = 0x80
FAN_CREATE: Final = 0x100
FAN_DELETE: Final = 0x200
FAN_Q_OVERFLOW: Final = 0x4000
FAN_RENAME: Final = 0x10000000
FAN_ONDIR: Final = 0x40000000
FAN_CLOEXEC: Final = 0x01
FAN_NONBLOCK: Final = 0x02
FAN_CLASS_NOTIF: Final = 0x00
FAN_REPORT_FID: Final = 0x200
FAN_REPORT_DIR_FID: Final = 0x400
FAN_REPORT_NAME: Final = 0x800
FAN_REPORT_TARGET_FID: Final = 0x1000
FAN_REPORT_DFID_NAME: Final = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD: Final = 0x01
FAN_MARK_REMOVE: Final = 0x02
FAN_MARK_FILESYSTEM: Final = 0x100
FAN_EVENT_INFO_TYPE_FID: Final = 1
FAN_EVENT_INFO_TYPE_DFID_NAME: Final = 2
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME: Final = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME: Final = 12
FANOTIFY_METADATA_VERSION: Final = 3
MAX_HANDLE_SZ: Final = 128
AT_FDCWD: Final = -100


@dataclass(frozen=True, slots=True)
class Mode:
    """One way of asking the kernel for directory-entry events."""

    name: str
    init_flags: int
    mask: int


# Linux 5.17+: a rename is ONE event carrying both names and the moved object's handle, so a
# directory rename is applied to the handle cache exactly, in queue order (no pairing of
# MOVED_FROM with MOVED_TO, which fanotify gives no cookie for). The child handle on
# create/delete also lets the cache follow mkdir/rmdir without a syscall.
RENAME: Final = Mode(
    "rename",
    FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID,
    FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_ONDIR | FAN_CLOSE_WRITE,
)
# Linux 5.9-5.16: two events per rename and no child handle. A directory rename can only drop
# the cached paths under the old name; they are resolved again from the handle when next seen.
MOVES: Final = Mode(
    "moves",
    FAN_REPORT_DFID_NAME,
    FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO | FAN_ONDIR | FAN_CLOSE_WRITE,
)
MODES: Final = {m.name: m for m in (RENAME, MOVES)}

_INIT_BASE: Final = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK
# Checked by fanotify_init even though a file-handle group never opens an event fd.
_EVENT_F_FLAGS: Final = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC

_META: Final = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata, 24 bytes
_META_SIZE: Final = _META.size
_INFO: Final = struct.Struct("=BBH")  # struct fanotify_event_info_header
_U32: Final = struct.Struct("=I")
# A record is header (4), fsid (8), struct file_handle (handle_bytes u32, handle_type s32,
# f_handle): the cache key is fsid + file_handle, bytes 4..20+handle_bytes of the record.
_KEY_START: Final = 4
_HANDLE_START: Final = 12
_HANDLE_HEAD: Final = 20
_DIR_RECORDS: Final = frozenset(
    {
        FAN_EVENT_INFO_TYPE_DFID_NAME,
        FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
        FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
    }
)

# No event holds an fd (file-handle groups never open one), so a read is not bounded by
# RLIMIT_NOFILE as in fanotify.py; an event is 56-600 bytes, so 64 KiB is a few hundred.
_READ_SIZE: Final = 65536

# The kernel merges a pid's events on one name while they wait in the queue, so one record can
# carry several bits; they are cached in this order (one they can happen in: the kernel keeps
# none), all with the pid that did them all.
_ACTIONS: Final = (
    (FAN_CREATE, "created"),
    (FAN_CLOSE_WRITE, "closed_write"),
    (FAN_MOVED_TO, "moved_in"),
    (FAN_MOVED_FROM, "moved_out"),
    (FAN_DELETE, "deleted"),
)
ACTIONS: Final = frozenset({"created", "closed_write", "deleted", "moved_out", "moved_in"})
_DELETED: Final = " (deleted)"
_FS_ENCODING: Final = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
_STOP_WAIT_S: Final = 0.5
# How long the reader lets events gather after a read: the latency it adds to a lookup (see
# the module docstring for what it saves).
_GATHER_MS: Final = 5

_PROC_CACHE: Final = 4096
_SNAPSHOT_TTL_US: Final = 2_000_000
_LOSS_INTERVAL_S: Final = 5.0
_ERROR_INTERVAL_S: Final = 60.0
# A handle we could not turn into a path is an event we could not place; on a busy machine
# most are outside the trees (a build's temp directory, already removed), so at most once a
# minute, with the count.
_UNRESOLVED_INTERVAL_S: Final = 60.0


class _StatFs(ctypes.Structure):
    # struct statfs as glibc lays it out on 64-bit Linux (x86_64, aarch64, riscv64, ppc64le).
    # The layout is checked against os.fstatvfs at start, so another one fails loudly.
    _fields_ = (
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_ubyte * 8),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    )


class _Libc:
    """The libc entry points, bound once with argument types (the u64 mask is passed right)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self.init = lib.fanotify_init
        self.init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        self.init.restype = ctypes.c_int
        self.mark = lib.fanotify_mark
        self.mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self.mark.restype = ctypes.c_int
        self.open_by_handle_at = lib.open_by_handle_at
        self.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.open_by_handle_at.restype = ctypes.c_int
        self.name_to_handle_at = lib.name_to_handle_at
        self.name_to_handle_at.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        self.name_to_handle_at.restype = ctypes.c_int
        self.fstatfs = lib.fstatfs
        self.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatFs)]
        self.fstatfs.restype = ctypes.c_int


@functools.cache
def _lib() -> _Libc:
    # Bound on first use, so importing this module on a non-Linux host costs nothing.
    return _Libc()


def _fail(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def _fanotify_init(mode: Mode) -> int:
    fd = int(_lib().init(_INIT_BASE | mode.init_flags, _EVENT_F_FLAGS))
    if fd < 0:
        raise _fail("fanotify_init")
    return fd


def _mark(fan_fd: int, how: int, mask: int, dir_fd: int) -> None:
    # pathname NULL: the kernel marks the filesystem of the very directory we took fsid from.
    if _lib().mark(fan_fd, how | FAN_MARK_FILESYSTEM, mask, dir_fd, None) < 0:
        raise _fail("fanotify_mark")


def _init_group(mode: str | None) -> tuple[int, Mode]:
    """A group in the given mode, or in the best one this kernel has."""
    if mode is not None:
        chosen = MODES[mode]
        return _fanotify_init(chosen), chosen
    try:
        return _fanotify_init(RENAME), RENAME
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: FAN_REPORT_TARGET_FID unknown (before 5.17)
            raise
    return _fanotify_init(MOVES), MOVES


def _fsid(fd: int) -> bytes:
    """The filesystem id the kernel puts in fanotify records (statfs f_fsid, raw bytes)."""
    buf = _StatFs()
    if _lib().fstatfs(fd, ctypes.byref(buf)) < 0:
        raise _fail("fstatfs")
    return bytes(buf.f_fsid)


def _check_statfs_layout() -> None:
    # glibc and musl both put val[0] in the low half of statvfs's f_fsid: if ours differs, the
    # struct layout above is wrong for this platform and no handle would ever match.
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ours = _U32.unpack(_fsid(fd)[:4])[0]
        if ours != os.fstatvfs(fd).f_fsid & 0xFFFFFFFF:
            raise OSError(errno.ENOTSUP, "struct statfs layout not supported on this platform")
    finally:
        os.close(fd)


def _handle_of(path: str, mounts: dict[int, bytes | None]) -> bytes | None:
    """The cache key (fsid + file handle) of a directory, as fanotify would report it; None
    when it cannot be had (mounts: mount id -> fsid, filled as met)."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    _U32.pack_into(buf, 0, MAX_HANDLE_SZ)
    mnt = ctypes.c_int()
    if _lib().name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mnt), 0) < 0:
        return None
    if mnt.value not in mounts:
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            mounts[mnt.value] = _fsid(fd)
        except OSError:
            mounts[mnt.value] = None
        finally:
            os.close(fd)
    fsid = mounts[mnt.value]
    if fsid is None:
        return None
    size = _U32.unpack_from(buf, 0)[0]
    return fsid + buf.raw[: 8 + size]


def available(mode: str | None = None) -> tuple[bool, str]:
    """(True, "") when this process can read directory-entry events, else (False, why not)."""
    if not sys.platform.startswith("linux"):
        return False, "fanotify is Linux-only"
    try:
        _lib()
    except (OSError, AttributeError) as exc:
        return False, f"libc lacks fanotify or file-handle calls: {exc}"
    reasons = {
        errno.EPERM: "needs CAP_SYS_ADMIN for a filesystem mark",
        errno.ENOSYS: "kernel built without CONFIG_FANOTIFY",
        errno.EMFILE: "fanotify group limit reached (fs.fanotify.max_user_groups)",
        errno.EINVAL: "kernel older than 5.9 (no FAN_REPORT_DFID_NAME), or 5.17 for rename",
    }
    try:
        fd, chosen = _init_group(mode)
    except OSError as exc:
        return False, reasons.get(exc.errno or 0, str(exc))
    try:
        # Since 5.13 an unprivileged user may open a file-handle group too; only the
        # filesystem mark tells. It lives for these two syscalls.
        root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _mark(fd, FAN_MARK_ADD, chosen.mask, root)
        finally:
            os.close(root)
    except OSError as exc:
        return False, reasons.get(exc.errno or 0, str(exc))
    finally:
        os.close(fd)
    return True, ""


def _ancestors(roots: tuple[str, ...]) -> frozenset[str]:
    """Every proper ancestor of a root: entries created in them can be roots themselves."""
    found: set[str] = set()
    for root in roots:
        child, parent = root, os.path.dirname(root)
        while parent != child:
            found.add(parent)
            child, parent = parent, os.path.dirname(parent)
    return frozenset(found)


@dataclass(slots=True)
class _Fs:
    """A marked filesystem: its st_dev and the directories we reach it through."""

    dev: int
    dirs: list[str] = field(default_factory=list)


class DirEventsWatcher:
    """Reports which pid created, deleted or renamed each path in the watched trees.

    A filesystem mark sees every directory-entry change on the filesystems holding the trees;
    each event names its directory by file handle. A handle is turned into a path once and
    cached: from a walk of the trees at start (so a directory removed before its events are
    read is still placed), from mkdir events, else by open_by_handle_at on first sight.
    Handles of directories that cannot hold a watched path are cached as such, so a storm
    outside the trees costs a dictionary probe per event. Renamed directories are followed
    (rename mode) or dropped and resolved again (moves mode, kernels before 5.17).

    Events of this process are not attributed (they still keep the cache right). The event
    cache maps each path to its latest event per action, capped at cache_size and pruned to
    window_s. Every loss goes to `report`: a queue overflow as `event_loss` (reason
    fanotify_dirs_overflow), an event whose directory is gone before it could be placed as
    `event_loss` (fanotify_dirs_unresolved), a filesystem that cannot be marked and reader
    errors as `source_error` (reason the errno name), each rate-limited.
    """

    name = "fanotify_dirs"

    def __init__(
        self,
        paths: Sequence[str],
        *,
        report: Reporter,
        cache_size: int = 65_536,
        window_s: float = 5.0,
        dir_cache_size: int = 32_768,
        skip_cache_size: int = 16_384,
        mode: str | None = None,
    ) -> None:
        if min(cache_size, dir_cache_size, skip_cache_size) < 1:
            raise ValueError("cache sizes must be at least 1")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
        self._report = report
        self._caps = CapReporter(report)
        self._cache_size = cache_size
        self._window_us = int(window_s * 1_000_000)
        self._dir_cap = dir_cache_size
        self._skip_cap = skip_cache_size
        self._want_mode = mode
        self._mode = RENAME
        self._errors_seen = _Throttle(_ERROR_INTERVAL_S)
        self._loss_lock = threading.Lock()
        # reason -> [unreported, total, monotonic time last reported or None, interval]
        self._losses: dict[str, list[Any]] = {}
        self._queue_limit: int | None = None
        self._own_pid = os.getpid()
        self._cache: OrderedDict[str, dict[str, Access]] = OrderedDict()
        self._lock = threading.Lock()  # the event cache and process snapshots
        self._procs: OrderedDict[int, tuple[tuple[str, int | None, int] | None, int]] = (
            OrderedDict()
        )
        # The directory model: the reader holds it for a whole batch, update() to change roots.
        self._model_lock = threading.Lock()
        self._dirs: OrderedDict[bytes, str] = OrderedDict()  # handle -> path, relevant dirs
        self._skip: OrderedDict[bytes, None] = OrderedDict()  # handles that never matter
        self._fs: dict[bytes, _Fs] = {}  # fsid -> marked filesystem
        self._mark_errors: dict[str, str] = {}
        self._mount_fds: dict[bytes, int] = {}  # opened for one batch only, see _mount_fd
        self._rewalk = False  # set by an overflow: walk the trees when the queue is empty
        # True while every directory of the trees is known to be cached: rename mode, the last
        # walk of the trees was whole, and since then no directory was evicted, no event lost
        # and no moved-in directory missed (the mkdir, rename and rmdir events carry the
        # handles that keep it so). A handle we cannot resolve then was outside the trees.
        self._complete = False
        self._set_roots(paths)
        self._fan_fd = -1
        self._stop_r = -1
        self._stop_w = -1
        self._proc_fd = -1
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Counters are written by the reader thread only; stats() may read them a batch stale.
        self._events = 0
        self._cached = 0
        self._overflows = 0
        self._own = 0
        self._outside = 0
        self._resolved = 0
        self._unresolved = 0
        self._gone_outside = 0
        self._renames_followed = 0
        self._errors = 0
        self._last_error = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the group, mark the filesystems, cache the trees' directories, start reading.

        OSError when this kernel or these privileges do not allow it (EINVAL before 5.9,
        EPERM without CAP_SYS_ADMIN). A filesystem that cannot be marked (no file handles, a
        btrfs subvolume) does not stop the others: it is reported and listed in stats()."""
        if self._thread is not None:
            raise RuntimeError("DirEventsWatcher already started")
        self._fan_fd, self._mode = _init_group(self._want_mode)
        self._queue_limit = _queue_limit()  # the kernel reads the sysctl at fanotify_init only
        try:
            _check_statfs_layout()
            self._proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._stopping = False
            with self._model_lock:
                fatal = self._sync_marks()
                if fatal is None:
                    # Marks first: a directory made during the walk is then seen by an event.
                    self._walk_roots()
            if fatal is None:
                self._thread = threading.Thread(
                    target=self._run, name="fanotify-dirs-reader", daemon=True
                )
                self._thread.start()
        except BaseException:
            self._close_fds()
            raise
        if fatal is not None:
            self._close_fds()
            raise fatal

    def stop(self) -> None:
        """Stop the reader (within ~0.5 s) and close every fd; safe to call twice."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            thread.join(_STOP_WAIT_S)
            self._thread = None
        # Closing the group drops its marks and queued events in the kernel. The model lock
        # is not taken: a reader that missed the join deadline may hold it; it checks
        # _stopping and its reads fail on the closed fd.
        self._close_fds()
        self._report_losses(force=True)

    def _close_fds(self) -> None:
        for name in ("_fan_fd", "_proc_fd", "_stop_r", "_stop_w"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        self._close_mount_fds()

    def update(self, paths: Sequence[str]) -> None:
        """Watch these trees instead: marks filesystems now needed, unmarks the others."""
        with self._model_lock:
            self._set_roots(paths)
            # Which handles can matter changed: drop what the old roots decided, walk anew.
            self._skip.clear()
            for key in [k for k, p in self._dirs.items() if not self._relevant(p)]:
                del self._dirs[key]
            if self._fan_fd >= 0:
                self._sync_marks()
                self._walk_roots()

    def _set_roots(self, paths: Sequence[str]) -> None:
        given = tuple(dict.fromkeys(_norm(p) for p in paths))
        # Handles resolve to real paths; lookups through a symlinked root are translated.
        pairs = [(g, os.path.realpath(g)) for g in given]
        self._aliases = tuple((g, r) for g, r in pairs if g != r)
        self._given = given
        self._roots = tuple(dict.fromkeys(r for _, r in pairs))
        self._above = _ancestors(self._roots)
        self._everything = "/" in self._roots

    def _relevant(self, directory: str) -> bool:
        """Whether an entry of this directory can be a watched path (or a root)."""
        return self._everything or directory in self._above or _inside(directory, self._roots)

    def _sync_marks(self) -> OSError | None:
        """Mark each filesystem holding a root once; unmark those no root is on any more.
        Returns the error that makes the whole source unusable (EINVAL, EPERM), if any."""
        wanted: dict[bytes, _Fs] = {}
        errors: dict[str, str] = {}
        fatal: OSError | None = None
        for root in self._given:
            directory = _mount_dir(root)
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                errors[root] = f"open {directory}: {exc.strerror}"
                self._error("open", exc, errors[root], root=root, path=directory)
                continue
            try:
                fsid = _fsid(fd)
                if fsid not in wanted:
                    # Always added, even if marked before: ADD is idempotent, and a filesystem
                    # unmounted and mounted again (same fsid) lost its mark with the old mount.
                    _mark(self._fan_fd, FAN_MARK_ADD, self._mode.mask, fd)
                    wanted[fsid] = _Fs(os.fstat(fd).st_dev)
                wanted[fsid].dirs.append(directory)
            except OSError as exc:
                errors[root] = f"mark {directory}: {exc.strerror or exc}"
                self._error("mark", exc, errors[root], root=root, path=directory)
                if exc.errno in (errno.EINVAL, errno.EPERM) and fatal is None:
                    fatal = exc
            finally:
                os.close(fd)
        for fsid in self._fs.keys() - wanted.keys():
            self._unmark(fsid, self._fs[fsid])
        self._fs = wanted
        self._mark_errors = errors
        return fatal

    def _unmark(self, fsid: bytes, fs: _Fs) -> None:
        # Only through a directory still on that very filesystem; one that was unmounted took
        # its mark with it.
        for directory in fs.dirs:
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if _fsid(fd) == fsid:
                    _mark(self._fan_fd, FAN_MARK_REMOVE, self._mode.mask, fd)
                    return
            except OSError as exc:
                self._note_error("unmark", exc, f"unmark {directory}: {exc}", path=directory)
                return
            finally:
                os.close(fd)

    # -- directory model (callers hold _model_lock) --------------------------------------------

    def _walk_roots(self) -> None:
        mounts: dict[int, bytes | None] = {}
        complete = self._mode is RENAME
        for root in self._roots:
            # The existing ancestors too: creating a root (or a parent of one) is an event in
            # them, and a root that does not exist yet is reached through them.
            for above in sorted(a for a in self._above if _inside(root, (a,))):
                if os.path.isdir(above):
                    complete &= self._walk(above, mounts, descend=False)
            if os.path.isdir(root):
                complete &= self._walk(root, mounts)
        self._complete = complete

    def _walk(
        self,
        top: str,
        mounts: dict[int, bytes | None],
        *,
        descend: bool = True,
        expect: bytes | None = None,
    ) -> bool:
        """Caches the handle of `top` and, with descend, of the directories under it (as many
        as the cache holds), so that events read after a directory is gone can be placed.
        False if one could not be had, or `top` is not the directory `expect` names."""
        complete = True
        stack = [top]
        budget = self._dir_cap
        while stack:
            path = stack.pop()
            key = _handle_of(path, mounts)
            if key is None:
                complete = False
                continue
            if expect is not None and key != expect:
                return False  # not the directory that moved here: its subtree is not ours
            expect = None
            if key[:8] not in self._fs:
                continue  # a filesystem we do not mark (a mount inside the tree): no events
            self._remember(key, path)
            if not descend:
                continue
            budget -= 1
            if budget <= 0:
                # The rest is resolved on first sight; only a directory removed before its
                # events are read is then lost.
                self._caps.hit("fanotify_dirs_walk", self._dir_cap, root=top)
                return False
            try:
                with os.scandir(path) as entries:
                    stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
            except OSError:
                complete = False
        return complete

    def _remember(self, key: bytes, path: str) -> None:
        if self._relevant(path):
            self._skip.pop(key, None)
            self._dirs[key] = path
            self._dirs.move_to_end(key)
            if len(self._dirs) > self._dir_cap:
                self._dirs.popitem(last=False)
                self._complete = False
        else:
            self._skip_add(key)

    def _skip_add(self, key: bytes) -> None:
        self._dirs.pop(key, None)
        self._skip[key] = None
        if len(self._skip) > self._skip_cap:
            self._skip.popitem(last=False)

    def _forget(self, key: bytes) -> None:
        self._dirs.pop(key, None)
        self._skip.pop(key, None)

    def _dir(self, key: bytes) -> str | None:
        """The path of a directory handle if entries in it can matter, else None."""
        path = self._dirs.get(key)
        if path is not None:
            self._dirs.move_to_end(key)
            return path
        if key in self._skip:
            return None
        path = self._resolve(key)
        if path is None:
            return None
        self._remember(key, path)
        return path if key in self._dirs else None

    def _resolve(self, key: bytes) -> str | None:
        """open_by_handle_at + readlink: the directory's path now (it may have moved since the
        event; the cache is what keeps paths as of the event). None if it is gone."""
        if key[:8] not in self._fs:
            self._gone_outside += 1  # queued before its filesystem was unmarked
            return None
        mount_fd = self._mount_fd(key[:8])
        if mount_fd < 0:
            self._unresolved += 1
            self._loss("fanotify_dirs_unresolved", _UNRESOLVED_INTERVAL_S)
            return None
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        fd = _lib().open_by_handle_at(mount_fd, key[_HANDLE_START - _KEY_START :], flags)
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.ESTALE, errno.ENOENT):  # removed before we read the event
                if self._complete:
                    # Every directory of the trees is cached (see _complete): this one was
                    # elsewhere, typically a build's temporary directory. Not a loss.
                    self._gone_outside += 1
                else:
                    self._unresolved += 1
                    self._loss("fanotify_dirs_unresolved", _UNRESOLVED_INTERVAL_S)
            else:
                self._unresolved += 1
                message = f"open_by_handle_at: {os.strerror(err)}"
                self._note_error("resolve", OSError(err, message), message)
            return None
        try:
            path = os.readlink(str(fd), dir_fd=self._proc_fd)
        except OSError as exc:
            self._unresolved += 1
            self._note_error("readlink", exc, f"readlink: {exc}")
            return None
        finally:
            os.close(fd)
        self._resolved += 1
        if path.endswith(_DELETED) and not os.path.lexists(path):
            path = path[: -len(_DELETED)]  # removed meanwhile; its last name is what counts
        return path

    def _mount_fd(self, fsid: bytes) -> int:
        """An fd on that filesystem for open_by_handle_at, kept for the rest of the batch only:
        an fd held while idle would make the filesystem impossible to unmount."""
        fd = self._mount_fds.get(fsid, -1)
        if fd >= 0:
            return fd
        fs = self._fs.get(fsid)
        if fs is None:
            return -1
        for marked in fs.dirs:
            # The directory we marked through, else its nearest ancestor still there (the
            # tree may have been removed), as long as it is on the same filesystem.
            directory = marked
            while True:
                try:
                    # Not O_PATH: open_by_handle_at refuses an O_PATH mount fd (EBADF).
                    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    parent = os.path.dirname(directory)
                    if parent == directory:
                        break
                    directory = parent
                    continue
                if os.fstat(fd).st_dev == fs.dev:
                    self._mount_fds[fsid] = fd
                    return fd
                os.close(fd)
                break
        return -1

    def _close_mount_fds(self) -> None:
        for fd in self._mount_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._mount_fds.clear()

    def _dir_renamed(
        self, old: str | None, new: str | None, new_dir: bytes, child: bytes | None
    ) -> None:
        """A directory was renamed from `old` to `new` (None: its directory cannot matter, or
        is gone; in moves mode the two halves arrive as two calls, each with one side)."""
        if old is not None and self._relevant(old):
            # The cached paths at and under `old` follow it, or are dropped to be resolved
            # again by handle when next seen (moves mode: where it went is another event).
            self._renames_followed += 1
            prefix = old + "/"
            cut = len(old)
            for key in [k for k, p in self._dirs.items() if p == old or p.startswith(prefix)]:
                path = self._dirs.pop(key)
                if new is not None:
                    self._remember(key, new + path[cut:])
        elif new is not None and self._relevant(new):
            # Came in from where nothing is cached, or (moves mode) from anywhere: its subtree
            # may be cached as skippable, and is walked so that it is placed even if removed
            # before its events are read.
            self._renames_followed += 1
            self._skip.clear()
            if not self._walk(new, {}, expect=child):
                self._complete = False  # gone or moved on before we read the event
        if child is not None:
            if new is not None:
                self._remember(child, new)
            elif new_dir in self._skip:
                self._skip_add(child)
            else:
                self._forget(child)

    # -- reader thread -----------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fan_fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        stop_only = select.poll()
        stop_only.register(self._stop_r, select.POLLIN)
        while not self._stopping:
            try:
                # Asleep without a timeout when idle; awake when held-back losses are due.
                ready = poller.poll(self._loss_due_ms())
                for fd, flags in ready:
                    if fd == self._stop_r:
                        return
                    if flags & (select.POLLNVAL | select.POLLERR):
                        reason = "POLLNVAL" if flags & select.POLLNVAL else "POLLERR"
                        message = f"poll flags {flags:#x} on the fanotify fd: reader stopped"
                        self._note_error("reader", reason, message)
                        return
                if ready:
                    with self._model_lock:
                        try:
                            self._drain()
                        finally:
                            self._close_mount_fds()
                    # Let the next events gather before reading again: woken per event, a
                    # storm cost ~7 us per event (module docstring). Only after a read, so an
                    # idle reader still never wakes; a stop still ends it at once.
                    if stop_only.poll(_GATHER_MS):
                        return
                self._report_losses(force=False)
            except Exception as exc:  # the reader must never die of one bad batch
                self._note_error("reader", exc, repr(exc))
                time.sleep(0.01)  # no hot loop if the error repeats

    def _drain(self) -> None:
        while not self._stopping:
            try:
                buf = os.read(self._fan_fd, _READ_SIZE)
            except BlockingIOError:
                if self._rewalk:
                    self._rewalk = False
                    self._walk_roots()
                return
            if not buf:
                return
            self._handle(buf)

    def _handle(self, buf: bytes) -> None:
        now = time.time_ns() // 1000
        own = self._own_pid
        dirs = self._dirs
        skip = self._skip
        above = self._above
        roots = self._roots
        renames = self._mode is RENAME
        found: list[Access] = []
        offset = 0
        end = len(buf)
        while offset + _META_SIZE <= end:
            event_len, vers, _, meta_len, mask, _, pid = _META.unpack_from(buf, offset)
            if vers != FANOTIFY_METADATA_VERSION or event_len < _META_SIZE:
                message = f"fanotify metadata version {vers}, event_len {event_len}"
                self._note_error("read", "metadata_version", message, lost="rest of the batch")
                return
            pos = offset + meta_len
            stop = offset + event_len
            offset = stop
            self._events += 1
            if mask & FAN_Q_OVERFLOW:
                self._overflows += 1
                self._loss("fanotify_dirs_overflow", _LOSS_INTERVAL_S)
                # Lost events may have renamed or moved directories: no cached path can be
                # trusted. Handles resolve again on sight; the trees are walked again once
                # the queue is drained (_drain), not while the reader is behind.
                self._dirs.clear()
                self._skip.clear()
                self._complete = False
                self._rewalk = True
                continue
            ondir = mask & FAN_ONDIR
            if pid == own and not ondir:
                self._own += 1  # our own files change no directory we cache
                continue
            if pos + _HANDLE_HEAD > stop:
                continue  # no directory record: nothing to place
            if not mask & (FAN_ONDIR | FAN_RENAME):
                # The storm path, most events: a file made, removed or moved (one half) in one
                # directory. Only the first record is read; a directory that cannot matter is
                # dropped on its handle alone: 0.8 us of Python per event outside the trees.
                kend = pos + _HANDLE_HEAD + _U32.unpack_from(buf, pos + _HANDLE_START)[0]
                key = buf[pos + _KEY_START : kend]
                directory = dirs.get(key)
                if directory is None:
                    if key in skip:
                        self._outside += 1
                        continue
                    directory = self._dir(key)
                    if directory is None:
                        self._outside += 1
                        continue
                else:
                    dirs.move_to_end(key)
                rend = pos + _INFO.unpack_from(buf, pos)[2]
                nul = buf.find(b"\0", kend, rend)
                path = ("/" if directory == "/" else directory + "/") + buf[
                    kend : nul if nul >= 0 else rend
                ].decode(*_FS_ENCODING)
                if directory in above and not _inside(path, roots):
                    self._outside += 1
                    continue
                for bit, action in _ACTIONS:
                    if mask & bit:
                        found.append(Access(pid, path, action, now))
                continue
            # The records: a directory handle and name (two for a rename), then in rename
            # mode the handle of the created/deleted/moved object itself.
            names: list[tuple[int, bytes, bytes]] = []
            child: bytes | None = None
            while pos + _HANDLE_HEAD <= stop:
                rtype, _, rlen = _INFO.unpack_from(buf, pos)
                if rlen < _HANDLE_HEAD:
                    break
                kend = pos + _HANDLE_HEAD + _U32.unpack_from(buf, pos + _HANDLE_START)[0]
                key = buf[pos + _KEY_START : kend]
                if rtype == FAN_EVENT_INFO_TYPE_FID:
                    child = key
                elif rtype in _DIR_RECORDS:
                    nul = buf.find(b"\0", kend, pos + rlen)
                    names.append((rtype, key, buf[kend : nul if nul >= 0 else pos + rlen]))
                pos += rlen
            if renames and mask & FAN_RENAME:
                old = new = None
                new_dir = b""
                for rtype, key, name in names:
                    if rtype == FAN_EVENT_INFO_TYPE_OLD_DFID_NAME:
                        old = self._entry(key, name)
                    elif rtype == FAN_EVENT_INFO_TYPE_NEW_DFID_NAME:
                        new = self._entry(key, name)
                        new_dir = key
                if ondir:
                    self._dir_renamed(
                        old[0] if old else None, new[0] if new else None, new_dir, child
                    )
                if pid == own:
                    self._own += 1
                    continue
                kept = len(found)
                if old is not None and old[1]:
                    found.append(Access(pid, old[0], "moved_out", now))
                if new is not None and new[1]:
                    found.append(Access(pid, new[0], "moved_in", now))
                if len(found) == kept:
                    self._outside += 1
                continue
            if not names:
                continue
            _, key, name = names[0]
            entry = self._entry(key, name)
            if ondir:
                self._dir_event(mask, key, entry[0] if entry else None, child)
            if pid == own:
                self._own += 1
                continue
            if entry is None or not entry[1]:
                self._outside += 1
                continue
            for bit, action in _ACTIONS:
                if mask & bit:
                    found.append(Access(pid, entry[0], action, now))
        if found:
            for pid in {a.pid for a in found}:
                seen = self._procs.get(pid)
                if seen is None or now - seen[1] > _SNAPSHOT_TTL_US:
                    # Re-read after a while: pids are reused.
                    self._snapshot(pid, now)
            self._store(found, now)

    def _entry(self, key: bytes, name: bytes) -> tuple[str, bool] | None:
        """The full path of a directory entry and whether it is in the trees; None when its
        directory cannot matter (or is gone)."""
        directory = self._dir(key)
        if directory is None:
            return None
        path = ("/" if directory == "/" else directory + "/") + name.decode(*_FS_ENCODING)
        # Every cached directory is in a tree or above a root; only above one does the name
        # decide.
        return path, directory not in self._above or _inside(path, self._roots)

    def _dir_event(self, mask: int, parent: bytes, path: str | None, child: bytes | None) -> None:
        """Keeps the directory model right after a mkdir, an rmdir or half of a rename."""
        if mask & FAN_DELETE:
            if child is not None:
                self._forget(child)
            return
        if mask & FAN_MOVED_FROM:
            self._dir_renamed(path, None, b"", None)
        if mask & FAN_MOVED_TO:
            self._dir_renamed(None, path, b"", None)
        if mask & FAN_CREATE and child is not None:
            if path is not None:
                self._remember(child, path)
            elif parent in self._skip:
                # A child of a directory that cannot matter cannot matter either.
                self._skip_add(child)

    def _snapshot(self, pid: int, now: int) -> None:
        """Name, uid and parent of a pid when its first event is read: a short-lived rm or mv
        is usually gone by the time its events are attributed."""
        info: tuple[str, int | None, int] | None = None
        try:
            with open(f"/proc/{pid}/status", "rb") as fh:
                fields = dict(
                    line.split(b":", 1) for line in fh.read(2048).splitlines() if b":" in line
                )
            name = fields.get(b"Name", b"").strip().decode("utf-8", "replace")
            uid_field = fields.get(b"Uid", b"").split()
            uid = int(uid_field[0]) if uid_field else None
            ppid = int(fields.get(b"PPid", b"0").strip() or 0)
            info = (name, uid, ppid)
        except (OSError, ValueError):
            info = None
        with self._lock:
            self._procs[pid] = (info, now)
            self._procs.move_to_end(pid)
            while len(self._procs) > _PROC_CACHE:
                self._procs.popitem(last=False)

    def sync(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until the events the kernel queued before this call are
        in the cache. fsnotify queues an operation's fanotify event in the same call as its
        inotify event, so once an inotify event is read its fanotify event is queued: a lookup
        after sync() finds it even when this reader had not read it yet. True when caught up.

        The caller reads the queue itself rather than waiting for the reader thread: on a
        loaded machine the reader may not get a core for tens of ms after it wakes (and it
        gathers 5 ms between reads), which spent the caller's whole budget waiting while the
        record sat in the kernel queue (a git checkout's deletes then lost their process)."""
        deadline = time.monotonic() + timeout
        if not self._model_lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            fd = self._fan_fd
            if fd < 0:
                return False
            while not self._stopping:
                try:
                    buf = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    return True  # all queued before the call is read and handled
                except OSError:
                    return False
                if not buf:
                    return True
                self._handle(buf)
                if time.monotonic() >= deadline:
                    return False  # a storm behind it: the reader thread goes on
            return False
        finally:
            try:
                self._close_mount_fds()
            finally:
                self._model_lock.release()

    def process_info(self, pid: int) -> tuple[str, int | None, int] | None:
        """(name, uid, parent pid) of a pid as read with its first event, if known."""
        with self._lock:
            entry = self._procs.get(pid)
        return entry[0] if entry is not None else None

    def _store(self, found: list[Access], now: int) -> None:
        cache = self._cache
        horizon = now - self._window_us
        with self._lock:
            for acc in found:
                entry = cache.get(acc.path)
                if entry is None:
                    cache[acc.path] = {acc.action: acc}
                else:
                    # Re-inserted so the dict's order is event order: lookup breaks timestamp
                    # ties (one batch shares a timestamp) in favour of the later event.
                    entry.pop(acc.action, None)
                    entry[acc.action] = acc
                    cache.move_to_end(acc.path)
            while cache:
                first = next(iter(cache.values()))
                if max(a.timestamp_us for a in first.values()) >= horizon:
                    break
                cache.popitem(last=False)
            while len(cache) > self._cache_size:
                cache.popitem(last=False)
            self._cached += len(found)

    # -- health ------------------------------------------------------------------------------

    def _loss(self, reason: str, interval: float) -> None:
        with self._loss_lock:
            entry = self._losses.setdefault(reason, [0, 0, None, interval])
            entry[0] += 1
            entry[1] += 1
        self._report_losses(force=False)

    def _loss_due_ms(self) -> int | None:
        """Milliseconds until held-back losses may be reported; None when none are held."""
        now = time.monotonic()
        due: float | None = None
        with self._loss_lock:
            for count, _, last, interval in self._losses.values():
                if count:
                    at = 0.0 if last is None else max(0.0, last + interval - now)
                    due = at if due is None else min(due, at)
        return None if due is None else int(due * 1000) + 1

    def _report_losses(self, *, force: bool) -> None:
        now = time.monotonic()
        due: list[tuple[str, int, int]] = []
        with self._loss_lock:
            for reason, entry in self._losses.items():
                count, total, last, interval = entry
                if count and (force or last is None or now - last >= interval):
                    entry[0] = 0
                    entry[2] = now
                    due.append((reason, count, total))
        for reason, count, total in due:
            if reason == "fanotify_dirs_overflow":
                data: dict[str, Any] = {
                    "overflows": count,
                    "overflows_total": total,
                    "max_queued_events": self._queue_limit,
                    "hint": "the kernel dropped directory events: creations, deletions and "
                    "renames they would have named a pid for fall back to inferred attribution",
                }
            else:
                data = {
                    "events": count,
                    "events_total": total,
                    "hint": "directories removed before their events were read (most often "
                    "temporary ones outside the trees): those events named no path",
                }
            self._emit(record("event_loss", reason, source=self.name, **data))

    def _note_error(
        self, stage: str, cause: BaseException | str, message: str, **data: Any
    ) -> None:
        """A reader-side error: counted, kept as last_error, and reported."""
        self._errors += 1
        self._last_error = message
        self._error(stage, cause, message, **data)

    def _error(self, stage: str, cause: BaseException | str, message: str, **data: Any) -> None:
        reason = cause if isinstance(cause, str) else _reason(cause)
        repeats = self._errors_seen.due((stage, reason, str(data.get("path", ""))))
        if repeats is None:
            return
        self._emit(
            record(
                "source_error",
                reason,
                source=self.name,
                stage=stage,
                message=message,
                repeats_not_reported=repeats,
                **data,
            )
        )

    def _emit(self, rec: dict[str, Any]) -> None:
        # Called on the reader thread: a failing reporter must not stop the reader.
        try:
            self._report(rec)
        except Exception as exc:
            self._errors += 1
            self._last_error = f"report: {exc!r}"

    # -- queries -----------------------------------------------------------------------------

    def lookup(
        self, path: str, since_us: int | None = None, *, actions: Collection[str] | None = None
    ) -> Access | None:
        """The most recent creation, deletion or rename of exactly this path within the window
        (and since since_us). actions narrows it: {"moved_out"} for who renamed it away."""
        floor = time.time_ns() // 1000 - self._window_us
        if since_us is not None and since_us > floor:
            floor = since_us
        with self._lock:
            entry = self._cache.get(path)
            if entry is None:
                for given, real in self._aliases:
                    if path.startswith(given) and (
                        len(path) == len(given) or path[len(given)] == "/"
                    ):
                        entry = self._cache.get(real + path[len(given) :])
                        break
            if entry is None:
                return None
            best: Access | None = None
            for action, acc in entry.items():
                if actions is not None and action not in actions:
                    continue
                if acc.timestamp_us >= floor and (
                    best is None or acc.timestamp_us >= best.timestamp_us
                ):
                    best = acc
            return best

    def stats(self) -> dict[str, Any]:
        with self._lock:
            size = len(self._cache)
        marked = 0
        if self._fan_fd >= 0:
            with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{self._fan_fd}") as fh:
                marked = sum(1 for line in fh if line.startswith("fanotify sdev:"))
        return {
            "running": self._thread is not None and self._thread.is_alive(),
            "mode": self._mode.name,
            "events_read": self._events,
            "accesses_cached": self._cached,
            "overflows": self._overflows,
            "own_events_skipped": self._own,
            "outside_skipped": self._outside,
            "handles_resolved": self._resolved,
            "handles_unresolved": self._unresolved,
            "handles_gone_outside": self._gone_outside,
            "dirs_complete": self._complete,
            "dir_renames_followed": self._renames_followed,
            "dirs_cached": len(self._dirs),
            "dirs_skipped": len(self._skip),
            "cache_size": size,
            "cache_cap": self._cache_size,
            "filesystems_marked": marked,
            "mark_errors": dict(self._mark_errors),
            "errors": self._errors,
            "last_error": self._last_error,
        }
