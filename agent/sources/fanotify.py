"""Linux fanotify reader: which pid opened, modified or closed a file under the watched trees."""

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
from dataclasses import dataclass
from typing import Any, Final

from agent.health import Reporter, record

# Values from <linux/fanotify.h>; they are kernel ABI and never change.
FAN_MODIFY: Final = 0x02
FAN_CLOSE_WRITE: Final = 0x08
FAN_CLOSE_NOWRITE: Final = 0x10
FAN_OPEN: Final = 0x20
FAN_Q_OVERFLOW: Final = 0x4000
FAN_CLOEXEC: Final = 0x01
FAN_NONBLOCK: Final = 0x02
FAN_CLASS_NOTIF: Final = 0x00
FAN_MARK_ADD: Final = 0x01
FAN_MARK_REMOVE: Final = 0x02
FAN_MARK_MOUNT: Final = 0x10
FANOTIFY_METADATA_VERSION: Final = 3

# FAN_EVENT_ON_CHILD is left out: it only matters for inode marks on directories, and a mount
# mark already sees every file on the mount. FAN_ONDIR is left out so that directory listings
# (ls, find) are dropped in the kernel instead of costing us a readlink each. FAN_ACCESS (every
# read()) is left out: the open and close bracket a read without one event per syscall.
MASK: Final = FAN_OPEN | FAN_MODIFY | FAN_CLOSE_WRITE | FAN_CLOSE_NOWRITE

_INIT_FLAGS: Final = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK
# No O_NOATIME: we never read through the event fd and an open alone does not touch atime, so
# it would change nothing. O_LARGEFILE matters on 32-bit only (the kernel forces it on 64-bit).
_EVENT_F_FLAGS: Final = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC

# struct fanotify_event_metadata: event_len u32, vers u8, reserved u8, metadata_len u16,
# mask u64 (8-aligned, and it is at offset 8), fd s32, pid s32: 24 bytes, no padding.
_META: Final = struct.Struct("=IBBHQii")

# Every event in one read() arrives with an fd already open in this process, so a read of N
# events holds N fds until we close them. 4 KiB is 170 events: far under any RLIMIT_NOFILE and,
# measured, as fast as 16 or 64 KiB: the per-event work (readlink, close, Python) dominates.
_READ_SIZE: Final = 4096

# The kernel merges queued events of one pid on one file, so a lagging reader gets open, modify
# and close as one record. Each set bit is cached as its own action, in the order they happen,
# so lookup() by action still finds the open and the latest of them all is the close.
_ACTIONS: Final = (
    (FAN_OPEN, "opened"),
    (FAN_MODIFY, "modified"),
    (FAN_CLOSE_NOWRITE, "closed_nowrite"),
    (FAN_CLOSE_WRITE, "closed_write"),
)
ACTIONS: Final = frozenset(name for _, name in _ACTIONS)
_DELETED: Final = " (deleted)"
_STOP_WAIT_S: Final = 0.5


_PROC_CACHE = 4096
_SNAPSHOT_TTL_US = 2_000_000

# A flood can overflow the queue on every read: the first overflow is reported at once, later
# ones are counted and reported together at most this often (and at stop), so the loss is
# always said without one record per batch.
_LOSS_INTERVAL_S: Final = 5.0
# The same error (stage, errno, path) again within this many seconds is counted, not reported.
_ERROR_INTERVAL_S: Final = 60.0
_QUEUE_KNOB: Final = "/proc/sys/fs/fanotify/max_queued_events"


@dataclass(frozen=True, slots=True)
class Access:
    """One process's access to one file, as the kernel reported it."""

    pid: int  # the process (thread group) id, not the thread
    path: str  # resolved: readlink of the event fd, symlinks followed
    action: str  # "opened" | "closed_write" | "closed_nowrite" | "modified"
    timestamp_us: int  # when the reader saw it (wall clock): the kernel gives no event time


class _Libc:
    """The two libc entry points, bound once with argument types so the u64 mask is passed right."""

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


@functools.cache
def _lib() -> _Libc:
    # Bound on first use, so importing this module on a non-Linux host costs nothing.
    return _Libc()


def _fanotify_init() -> int:
    fd = int(_lib().init(_INIT_FLAGS, _EVENT_F_FLAGS))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fanotify_init: {os.strerror(err)}")
    return fd


def _fanotify_mark(fan_fd: int, flags: int, dir_fd: int) -> None:
    # pathname NULL: the kernel marks the object behind dir_fd, the very one we took mnt_id from.
    if _lib().mark(fan_fd, flags, MASK, dir_fd, None) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fanotify_mark: {os.strerror(err)}")


def available() -> tuple[bool, str]:
    """(True, "") when this process can watch with fanotify, else (False, why not)."""
    if not sys.platform.startswith("linux"):
        return False, "fanotify is Linux-only"
    try:
        _lib()
    except (OSError, AttributeError) as exc:
        return False, f"libc has no fanotify_init/fanotify_mark: {exc}"
    try:
        fd = _fanotify_init()
    except OSError as exc:
        reasons = {
            errno.EPERM: "needs root (CAP_SYS_ADMIN) for a notification group with event fds",
            errno.ENOSYS: "kernel built without CONFIG_FANOTIFY",
            errno.EMFILE: "fanotify group limit reached (fs.fanotify.max_user_groups)",
            errno.EINVAL: "kernel rejects the fanotify_init flags",
        }
        return False, reasons.get(exc.errno or 0, str(exc))
    os.close(fd)
    return True, ""


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    """Component-wise prefix: /a/bc is not inside /a/b."""
    for root in roots:
        if path.startswith(root) and (
            len(path) == len(root) or path[len(root)] == "/" or root == "/"
        ):
            return True
    return False


def _mount_dir(path: str) -> str:
    """The nearest existing directory at or above path: its mount is where the tree will be."""
    path = _norm(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _mnt_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as fh:
        for line in fh:
            if line.startswith("mnt_id:"):
                return int(line.split(":", 1)[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in /proc/self/fdinfo (kernel older than 3.15)")


def _marked_mounts(fan_fd: int) -> set[int]:
    """The mount ids this group has marks on, as the kernel lists them in fdinfo."""
    marked = set()
    with open(f"/proc/self/fdinfo/{fan_fd}") as fh:
        for line in fh:
            if line.startswith("fanotify mnt_id:"):
                marked.add(int(line.split()[1].split(":", 1)[1], 16))
    return marked


def _mount_points(mnt: int) -> list[str]:
    """Where mount `mnt` is mounted, from /proc/self/mountinfo (octal escapes undone)."""
    prefix = f"{mnt} "
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            if line.startswith(prefix):
                raw = line.split()[4]
                return [raw.encode().decode("unicode_escape").encode("latin-1").decode()]
    return []


def _reason(exc: BaseException) -> str:
    """An error's stable name for a health record: the errno name (EACCES), else the type."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, type(exc).__name__)
    return type(exc).__name__


def _queue_limit() -> int | None:
    try:
        with open(_QUEUE_KNOB) as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


class _Throttle:
    """Lets each key through at most once per interval and counts the repeats held back."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[tuple[str, ...], float] = {}
        self._held: dict[tuple[str, ...], int] = {}

    def due(self, key: tuple[str, ...]) -> int | None:
        """None when this key was let through within the interval; else the repeats held back
        since it last was (0 the first time)."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            if len(self._last) > 1024:  # bounded: distinct paths are attacker-chosen
                self._last.clear()
                self._held.clear()
            self._last[key] = now
            return self._held.pop(key, 0)


class FanotifyWatcher:
    """Reports which pid opened, modified or closed files on the mounts holding the watched trees.

    A mount mark sees the whole mount, so events are filtered to the trees before caching.
    Accesses by this process (any of its threads) are dropped: the agent's own reads are not
    evidence. The cache maps each path to its latest access per action, ordered by last update,
    capped at cache_size and pruned to window_s, so memory is bounded whatever the load.

    Every loss goes to `report` as a health record: a kernel queue overflow as `event_loss`
    (reason fanotify_overflow), a mount that cannot be marked and a reader error as
    `source_error` (reason the errno name), the same error at most once a minute.
    """

    name = "fanotify"

    def __init__(
        self,
        paths: Sequence[str],
        *,
        report: Reporter,
        cache_size: int = 65_536,
        window_s: float = 5.0,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._report = report
        self._cache_size = cache_size
        self._window_us = int(window_s * 1_000_000)
        self._errors_seen = _Throttle(_ERROR_INTERVAL_S)
        self._loss_lock = threading.Lock()
        self._loss_unreported = 0
        self._loss_reported_at: float | None = None
        self._queue_limit: int | None = None
        self._own_pid = os.getpid()
        self._set_roots(paths)
        self._cache: OrderedDict[str, dict[str, Access]] = OrderedDict()
        self._lock = threading.Lock()
        self._procs: OrderedDict[int, tuple[tuple[str, int | None, int] | None, int]] = (
            OrderedDict()
        )
        self._mark_lock = threading.Lock()
        self._marks: dict[int, str] = {}  # mnt_id -> directory we marked it through
        self._mark_errors: dict[str, str] = {}
        self._fan_fd = -1
        self._stop_r = -1
        self._stop_w = -1
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._proc_fd = -1
        # Counters are written by the reader thread only; reads from stats() may be a batch stale.
        self._events = 0
        self._cached = 0
        self._overflows = 0
        self._own = 0
        self._outside = 0
        self._errors = 0
        self._last_error = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the group, mark the mounts, start the reader; OSError if fanotify is unusable.

        A mount that cannot be marked does not stop the others: it is reported (source_error)
        and listed in stats()["mark_errors"]."""
        if self._thread is not None:
            raise RuntimeError("FanotifyWatcher already started")
        self._fan_fd = _fanotify_init()
        # The limit this group got: the kernel reads the sysctl only at fanotify_init.
        self._queue_limit = _queue_limit()
        try:
            # readlinkat against an open /proc/self/fd skips resolving that prefix per event.
            self._proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._stopping = False
            self._sync_marks()
            self._thread = threading.Thread(target=self._run, name="fanotify-reader", daemon=True)
            self._thread.start()
        except BaseException:
            self._close_fds()
            raise

    def stop(self) -> None:
        """Stop the reader (within ~0.5 s) and close every fd; safe to call twice."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            thread.join(_STOP_WAIT_S)
            self._thread = None
        # Closing the group fd drops all its marks and queued events (and their fds) in the kernel.
        with self._mark_lock:
            self._close_fds()
            self._marks.clear()
        # Overflows still held back by the rate limit are said now, not lost with the reader.
        self._report_loss(force=True)

    def _close_fds(self) -> None:
        for name in ("_fan_fd", "_proc_fd", "_stop_r", "_stop_w"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    def update(self, paths: Sequence[str]) -> None:
        """Watch these trees instead: marks mounts now needed, unmarks ones no longer needed."""
        self._set_roots(paths)
        if self._fan_fd >= 0:
            self._sync_marks()

    def _set_roots(self, paths: Sequence[str]) -> None:
        given = tuple(dict.fromkeys(_norm(p) for p in paths))
        # readlink() of an event fd yields the resolved path, so filtering uses resolved roots;
        # lookups by the configured spelling (through a symlink) are translated by _aliases.
        pairs = [(g, os.path.realpath(g)) for g in given]
        self._aliases = tuple((g, r) for g, r in pairs if g != r)
        self._given = given
        # One tuple swap: the reader sees the old or the new set, never a mix.
        self._roots = tuple(dict.fromkeys(r for _, r in pairs))

    def _sync_marks(self) -> None:
        with self._mark_lock:
            # The kernel's list, not ours: a mount that was unmounted took its mark with it, and
            # its id may since have been reused by a new mount that is not marked.
            present = _marked_mounts(self._fan_fd)
            wanted: dict[int, str] = {}
            errors: dict[str, str] = {}
            for root in self._given:
                directory = _mount_dir(root)
                try:
                    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    errors[root] = f"open {directory}: {exc.strerror}"
                    self._error("open", exc, errors[root], root=root, path=directory)
                    continue
                try:
                    mnt = _mnt_id(fd)
                    if mnt not in present and mnt not in wanted:
                        _fanotify_mark(self._fan_fd, FAN_MARK_ADD | FAN_MARK_MOUNT, fd)
                    wanted.setdefault(mnt, directory)
                except OSError as exc:
                    errors[root] = f"mark {directory}: {exc.strerror or exc}"
                    self._error("mark", exc, errors[root], root=root, path=directory)
                finally:
                    os.close(fd)
            for mnt in present - wanted.keys():
                self._unmark(mnt, [self._marks.get(mnt, ""), *_mount_points(mnt)])
            self._marks = wanted
            self._mark_errors = errors

    def _unmark(self, mnt: int, candidates: list[str]) -> None:
        # Only through a path that still leads to that very mount: a path now on another mount
        # must not lose that mount's mark. A mount no path reaches (overmounted) keeps its mark
        # until it is unmounted; events from it are still filtered by path.
        for directory in candidates:
            if not directory:
                continue
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if _mnt_id(fd) == mnt:
                    _fanotify_mark(self._fan_fd, FAN_MARK_REMOVE | FAN_MARK_MOUNT, fd)
                    return
            except OSError as exc:
                self._note_error("unmark", exc, f"unmark {directory}: {exc}", path=directory)
            finally:
                os.close(fd)

    # -- reader thread -----------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fan_fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while not self._stopping:
            try:
                # Asleep without a timeout when idle; awake when held-back overflows are due.
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
                    self._drain()
                self._report_loss(force=False)
            except Exception as exc:  # the reader must never die of one bad batch
                self._note_error("reader", exc, repr(exc))
                time.sleep(0.01)  # no hot loop if the error repeats

    def _drain(self) -> None:
        while not self._stopping:
            try:
                buf = os.read(self._fan_fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                # The kernel could not open an event fd for us (EMFILE, ENFILE, EPERM, ...): that
                # event is lost, the next read goes on.
                self._note_error("read", exc, f"read: {exc}", lost="one event")
                continue
            if not buf:
                return
            self._handle(buf)

    def _handle(self, buf: bytes) -> None:
        now = time.time_ns() // 1000
        own = self._own_pid
        roots = self._roots
        everything = "/" in roots
        proc_fd = self._proc_fd
        readlink = os.readlink
        close = os.close
        found: list[Access] = []
        offset = 0
        end = len(buf)
        while offset + _META.size <= end:
            event_len, vers, _, _, mask, fd, pid = _META.unpack_from(buf, offset)
            if vers != FANOTIFY_METADATA_VERSION or event_len < _META.size:
                # A layout we do not know: the rest of the buffer cannot be walked safely.
                message = f"fanotify metadata version {vers}, event_len {event_len}"
                self._note_error("read", "metadata_version", message, lost="rest of the batch")
                self._close_rest(buf, offset)
                return
            offset += event_len
            self._events += 1
            if mask & FAN_Q_OVERFLOW:
                self._overflow()
            if fd < 0:
                continue
            if pid == own:
                close(fd)
                self._own += 1
                continue
            try:
                path = readlink(str(fd), dir_fd=proc_fd)
            except OSError as exc:
                self._note_error("readlink", exc, f"readlink: {exc}", lost="one event")
                continue
            finally:
                close(fd)
            if path.endswith(_DELETED) and not os.path.lexists(path):
                # Unlinked before we read the event; the name it had is what matters.
                path = path[: -len(_DELETED)]
            if not (everything or _inside(path, roots)):
                self._outside += 1
                continue
            seen = self._procs.get(pid)
            if seen is None or now - seen[1] > _SNAPSHOT_TTL_US:
                # Re-read after a while: pids are reused, and a stale name or uid would
                # attribute a new process's access to an old one's user.
                self._snapshot(pid, now)
            for bit, action in _ACTIONS:
                if mask & bit:
                    found.append(Access(pid, path, action, now))
        if found:
            self._store(found, now)

    def _snapshot(self, pid: int, now: int) -> None:
        """Name, uid and parent of a pid, read when its first event arrives: a short-lived
        writer is usually gone by the time its events are attributed."""
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

    def process_info(self, pid: int) -> tuple[str, int | None, int] | None:
        """(name, uid, parent pid) of a pid as seen at its first access, if known."""
        with self._lock:
            entry = self._procs.get(pid)
        return entry[0] if entry is not None else None

    def _close_rest(self, buf: bytes, offset: int) -> None:
        while offset + _META.size <= len(buf):
            event_len, _, _, _, _, fd, _ = _META.unpack_from(buf, offset)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if event_len < _META.size:
                return
            offset += event_len

    def _store(self, found: list[Access], now: int) -> None:
        cache = self._cache
        cap = self._cache_size
        horizon = now - self._window_us
        with self._lock:
            for acc in found:
                entry = cache.get(acc.path)
                if entry is None:
                    cache[acc.path] = {acc.action: acc}
                else:
                    # Re-inserted so the dict's order is update order: lookup breaks timestamp
                    # ties (one batch shares a timestamp) in favour of the later event.
                    entry.pop(acc.action, None)
                    entry[acc.action] = acc
                    cache.move_to_end(acc.path)
            # Order is by last update, so old entries are at the front: drop what the window
            # can no longer return, then whatever exceeds the cap (least recently touched).
            while cache:
                first = next(iter(cache.values()))
                if max(a.timestamp_us for a in first.values()) >= horizon:
                    break
                cache.popitem(last=False)
            while len(cache) > cap:
                cache.popitem(last=False)
            self._cached += len(found)

    # -- health ------------------------------------------------------------------------------

    def _overflow(self) -> None:
        """The kernel queue overflowed: events were dropped before we could read them."""
        self._overflows += 1
        with self._loss_lock:
            self._loss_unreported += 1
        self._report_loss(force=False)

    def _loss_due_ms(self) -> int | None:
        """Milliseconds until held-back overflows may be reported; None when none are held."""
        with self._loss_lock:
            if not self._loss_unreported:
                return None
            last = self._loss_reported_at
        if last is None:
            return 0
        return max(0, int((last + _LOSS_INTERVAL_S - time.monotonic()) * 1000) + 1)

    def _report_loss(self, *, force: bool) -> None:
        now = time.monotonic()
        with self._loss_lock:
            count = self._loss_unreported
            last = self._loss_reported_at
            if not count or (not force and last is not None and now - last < _LOSS_INTERVAL_S):
                return
            self._loss_unreported = 0
            self._loss_reported_at = now
        self._emit(
            record(
                "event_loss",
                "fanotify_overflow",
                source=self.name,
                overflows=count,
                overflows_total=self._overflows,
                max_queued_events=self._queue_limit,
                hint="the kernel dropped access records: file events they would have named a "
                "pid for fall back from exact to inferred attribution",
            )
        )

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
        # Called on the reader thread too: a failing reporter must not stop the reader, and its
        # failure is not reported through itself again.
        try:
            self._report(rec)
        except Exception as exc:
            self._errors += 1
            self._last_error = f"report: {exc!r}"

    # -- queries -----------------------------------------------------------------------------

    def lookup(
        self, path: str, since_us: int | None = None, *, actions: Collection[str] | None = None
    ) -> Access | None:
        """The most recent access to exactly this path within the window (and since since_us).

        actions narrows it, e.g. {"closed_write", "modified"} for who wrote the file even when
        another process read it afterwards."""
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
        with self._mark_lock:
            mark_errors = dict(self._mark_errors)
            try:  # the kernel's count, so a mark we could not remove still shows
                mounts = len(_marked_mounts(self._fan_fd)) if self._fan_fd >= 0 else 0
            except OSError:
                mounts = 0
        return {
            "running": self._thread is not None and self._thread.is_alive(),
            "events_read": self._events,
            "accesses_cached": self._cached,
            "overflows": self._overflows,
            "own_events_skipped": self._own,
            "outside_skipped": self._outside,
            "cache_size": size,
            "cache_cap": self._cache_size,
            "mounts_marked": mounts,
            "mark_errors": mark_errors,
            "errors": self._errors,
            "last_error": self._last_error,
        }
