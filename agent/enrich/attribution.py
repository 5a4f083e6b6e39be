"""Who did it: a process-table cache, process-started records, and attribution of file events."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import posixpath
import pwd
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import psutil
from msgspec.structs import replace as evolve

from agent.enrich.trusted import COPY_TOOLS, copy_destination
from agent.events import Event
from agent.health import CapReporter, Reporter, record
from agent.sources.procsnap import Snapshot, read_snapshot

if TYPE_CHECKING:
    from agent.sources.procevents import ProcEvent

# Interpreters run scripts: their comm is the script's name, which is not masquerading.
INTERPRETERS = (
    "python",
    "perl",
    "ruby",
    "node",
    "bash",
    "sh",
    "dash",
    "zsh",
    "java",
    "php",
    "lua",
    "env",
)
# Tools whose renamed copies are recognised (a `tar` running as `crond`).
KNOWN_TOOLS = (
    "tar",
    "zip",
    "7z",
    "gpg",
    "openssl",
    "curl",
    "wget",
    "scp",
    "rsync",
    "rclone",
    "nc",
    "ncat",
    "socat",
    "sftp",
    "shred",
    "base64",
)
MAX_PROCS = 65_536
RECENTLY_EXITED = 4_096
# How long an exited process is still found by the paths it named: its file events may be
# attributed well after it is gone (a short cp, a loaded pipeline), but a process long gone
# must not take the blame for a later writer.
EXITED_TTL = 30.0
UNREAD_REPORT_SECONDS = 10.0
# Longest the consumer waits, in total per second, for a kernel watcher to read a record it
# has queued (agent/sources/fandirs.py sync()).
SYNC_BUDGET = 0.05
# How much earlier than a modification's inotify read a close-after-write may have been read
# by the directory-entry reader and still answer for it (the readers are two threads).
MODIFY_SLACK_US = 100_000
CONSOLE_TTL = 10.0
# A creation's open is attributed to its creator when it comes within this long of the
# creation (they are one system call, read in one batch); creations remembered at most.
CREATOR_WINDOW_US = 1_000_000
CREATORS_CAP = 1024


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    name: str
    exe: str | None
    cmdline: tuple[str, ...]
    uid: int | None
    user: str | None
    login_uid: int | None
    login_user: str | None
    cwd: str | None
    start: float
    parent_name: str | None
    masquerade: str | None
    parent_exe: str | None = None
    parent_cmdline: tuple[str, ...] = ()
    forked: bool = False  # a copy of its parent made at fork, until its exec is read

    @property
    def command_line(self) -> str:
        return " ".join(self.cmdline)

    def paths(self) -> list[str]:
        """Absolute paths among the arguments (relative ones resolved against the cwd): an
        argument, the value of `--opt=value`, and of `key=value` (dd's if=/of=) as well as
        the whole argument (a file may be named `a=b`)."""
        out = []
        for given in self.cmdline[1:]:
            if given.startswith("-"):
                args = [given.split("=", 1)[1]] if "=" in given else [given]
            else:
                key, eq, value = given.partition("=")
                args = [given, value] if eq and key.isidentifier() else [given]
            for arg in args:
                if not arg or arg.startswith("-") or ("/" not in arg and arg not in (".", "..")):
                    continue
                if arg.startswith("/"):
                    out.append(posixpath.normpath(arg))
                elif self.cwd is not None:
                    out.append(posixpath.normpath(posixpath.join(self.cwd, arg)))
        return out


def masquerade_of(name: str, exe: str | None, cmdline: tuple[str, ...]) -> str | None:
    """Why a process looks like something it is not, or None.

    - `kernel_thread_name`: a user process (it has an executable) whose argv[0] is written like
      a kernel thread, `[kworker/0:1]`;
    - `deleted_executable`: the executable was deleted after start (a dropper cleaning up);
    - `name_mismatch`: the process name (comm, set by prctl) is not the executable's name;
    - `argv0_mismatch`: argv[0] names another program (`exec -a crond tar ...`).
    Scripts under an interpreter are exempt (their name is the script's)."""
    if exe is None:
        return None
    if cmdline and cmdline[0].startswith("[") and cmdline[0].endswith("]"):
        return "kernel_thread_name"
    if exe.endswith(" (deleted)"):
        return "deleted_executable"
    base = posixpath.basename(exe)
    if base.startswith(INTERPRETERS):
        return None

    def same(a: str, b: str) -> bool:  # the kernel keeps 15 characters of a name
        return bool(a) and bool(b) and (a.startswith(b[:15]) or b.startswith(a[:15]))

    if name and not same(name, base):
        return "name_mismatch"
    argv0 = posixpath.basename(cmdline[0]).lstrip("-") if cmdline else ""
    if argv0 and not same(argv0, base):
        return "argv0_mismatch"
    return None


class KnownTools:
    """Sizes and digests of well-known tools, to recognise a renamed copy (`tar` copied to
    `/tmp/crond`): a new executable outside the system directories with a tool's size is
    hashed once and compared."""

    SYSTEM_DIRS = ("/usr/bin/", "/bin/", "/usr/sbin/", "/sbin/", "/usr/local/bin/", "/usr/lib/")

    def __init__(self, names: Iterable[str]) -> None:
        self._by_size: dict[int, list[tuple[str, str]]] = {}
        self._digests: dict[str, bytes | None] = {}
        # An executable already judged, by identity: one big same-size binary run a thousand
        # times (a user's own, or to load the agent) is hashed once, not a thousand times.
        self._seen: OrderedDict[tuple[int, int, int, int], object] = OrderedDict()
        for name in names:
            for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"):
                path = os.path.join(d, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                self._by_size.setdefault(st.st_size, []).append((name, os.path.realpath(path)))
                break

    def identify(self, exe: str) -> str | None:
        if exe.startswith(self.SYSTEM_DIRS):
            return None
        try:
            st = os.stat(exe)
        except OSError:
            return None
        candidates = self._by_size.get(st.st_size)
        if not candidates:
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self._seen.get(key, _UNSEEN)
        if seen is not _UNSEEN:
            return seen if isinstance(seen, str) else None
        digest = _file_digest(exe)
        found = None
        for name, path in candidates:
            if path not in self._digests:
                self._digests[path] = _file_digest(path)
            if digest is not None and digest == self._digests[path]:
                found = name
                break
        self._seen[key] = found
        while len(self._seen) > _SEEN_CAP:
            with contextlib.suppress(KeyError):  # the poll thread may trim at the same time
                self._seen.popitem(last=False)
        return found


_SEEN_CAP = 1024
_UNSEEN = object()


def _file_digest(path: str) -> bytes | None:
    import hashlib

    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "blake2b").digest()
    except OSError:
        return None


def _login_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/loginuid") as fh:
            value = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return None if value == 4294967295 else value  # unset: a daemon, not a login session


def _username(uid: int | None, cache: dict[int, str | None]) -> str | None:
    if uid is None:
        return None
    if uid not in cache:
        try:
            cache[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            cache[uid] = None
    return cache[uid]


def _reason(exc: BaseException) -> str:
    """An error's stable name for a health record: the errno name (EACCES), else the type."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, type(exc).__name__)
    return type(exc).__name__


class ProcessTable:
    """The process table, cached. A poll lists pids and reads only new processes, so its cost
    follows process churn, not process count. Processes that exited recently stay known for
    a while: a short `cp` is gone before its file events are processed.

    start() reads what already runs (not reported as new); each poll() then returns the
    processes started since. Hitting max_procs is reported as cap_reached (process_table), a
    poll that fails as source_error (stage processes, once per distinct error): a poll never
    raises, so the job that calls it goes on."""

    name = "processes"

    def __init__(
        self, *, report: Reporter, max_procs: int = MAX_PROCS, tools: Iterable[str] = ()
    ) -> None:
        self.max_procs = max_procs
        self._report = report
        self._caps = CapReporter(report)
        self._tools = KnownTools(tools)
        self._procs: dict[int, Proc] = {}
        # pid -> (the process, time.monotonic() when a poll found it gone), in exit order
        self._exited: OrderedDict[int, tuple[Proc, float]] = OrderedDict()
        self._missing: OrderedDict[int, None] = OrderedDict()
        # Applies the kernel's process events already read but not yet handed over (set when
        # they come from the exec reader child: agent/sources/procsnap.py sync()).
        self.sync: Callable[[float], bool] | None = None
        self._synced = [0.0, time.monotonic()]  # seconds spent in sync() this second, since
        self._by_path: dict[str, list[int]] = {}
        self._nearest: dict[str, str | None] = {}  # directory -> nearest named ancestor
        self._users: dict[int, str | None] = {}
        self._lock = threading.Lock()
        self._own = os.getpid()
        # Read in the last poll: looked at once more, in case it was caught between fork and exec.
        self._fresh: set[int] = set()
        self._last_error: str | None = None
        self._running = False
        self._baseline_pending = False
        self.polls = 0
        self.over_cap = 0
        self.new = 0
        self.errors = 0
        self._forks: OrderedDict[int, int] = OrderedDict()  # pid -> parent, from fork events
        self.exec_read = 0  # kernel exec events read from /proc in time
        self.exec_unread = 0  # ... and those already gone
        self.exec_repeats = 0  # exec events that showed the image an earlier one reported
        self._unread_unreported = 0
        self._unread_reported_at = 0.0

    def __len__(self) -> int:
        return len(self._procs)

    def start(self) -> None:
        """Read the processes that run already: known from now on, never reported as new.

        A table polled before start() knows them already and is left as it is. If this read
        fails, the first poll that succeeds takes its place (and reports nothing)."""
        self._running = True
        if self.polls == 0:
            self._baseline_pending = self._poll() is None

    def stop(self) -> None:
        """Nothing to release: the table is memory only. Safe twice and before start().
        Execs not read since the last report are reported now."""
        self._running = False
        if self._unread_unreported:
            self._report_unread(time.monotonic())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tracked, exited = len(self._procs), len(self._exited)
        return {
            "running": self._running,
            "tracked": tracked,
            "exited_kept": exited,
            "cap": self.max_procs,
            "over_cap": self.over_cap,
            "polls": self.polls,
            "new": self.new,
            "errors": self.errors,
            "exec_read": self.exec_read,
            "exec_unread": self.exec_unread,
            "last_error": self._last_error,
        }

    def poll(self) -> list[Proc]:
        """Read new processes; forget exited ones. Returns the new processes (none when the
        poll failed: the failure is reported, not raised)."""
        new = self._poll()
        if new is None:
            return []
        if self._baseline_pending:  # start() could not read what already ran: this is it
            self._baseline_pending = False
            return []
        self.new += len(new)
        return new

    def _poll(self) -> list[Proc] | None:
        """The new processes, or None when the table could not be read (reported)."""
        self.polls += 1
        try:
            new = self._read_new()
        except Exception as exc:  # psutil or /proc trouble must not end the scheduler's job
            self.errors += 1
            reason = _reason(exc)
            # Polled many times a second: the same failure again says nothing new.
            if reason != self._last_error:
                self._report(
                    record(
                        "source_error",
                        reason,
                        stage="processes",
                        message=f"{type(exc).__name__}: {exc}",
                        hint="new processes are not seen until the process table can be read",
                    )
                )
            self._last_error = reason
            return None
        self._last_error = None
        return new

    def _read_new(self) -> list[Proc]:
        pids = set(psutil.pids())
        with self._lock:
            known = dict(self._procs)
        # A process read between its fork and its exec is its parent's copy (a shell, before it
        # becomes tar): one more look at each process read last time catches the exec.
        execed: list[Proc] = []
        for pid in self._fresh & pids & known.keys():
            proc = self._reread(known[pid])
            if proc is not None:
                execed.append(proc)
        new: list[Proc] = []
        unknown = pids - known.keys()
        room = self.max_procs - len(known)
        for i, pid in enumerate(unknown):
            if len(new) >= room:
                self.over_cap += 1
                self._caps.hit("process_table", self.max_procs, untracked=len(unknown) - i)
                break
            proc = self.read(pid)
            if proc is not None:
                new.append(proc)
        now = time.monotonic()
        with self._lock:
            # An exited process stays indexed by its paths until it is forgotten here. The
            # kernel's events (on_kernel_events, another thread) may have moved it already.
            for pid in known.keys() - pids:
                gone = self._procs.pop(pid, None)
                if gone is not None:
                    self._exited[pid] = (gone, now)
            exited = self._exited
            while exited and (
                len(exited) > RECENTLY_EXITED or now - next(iter(exited.values()))[1] > EXITED_TTL
            ):
                self._unindex(exited.popitem(last=False)[1][0])
            for proc in execed:
                before = self._procs.get(proc.pid)
                if before is not None:
                    self._unindex(before)
                self._procs[proc.pid] = proc
                self._index(proc)
            for proc in new:
                reused = exited.pop(proc.pid, None)
                if reused is not None:
                    self._unindex(reused[0])
                self._procs[proc.pid] = proc
                self._missing.pop(proc.pid, None)
                self._index(proc)
        self._fresh = {p.pid for p in execed} | {p.pid for p in new}
        # Read mid-exec (no arguments yet): reported once its arguments are read (_reread).
        return [p for p in execed + new if p.cmdline or p.exe is None]

    def _reread(self, old: Proc) -> Proc | None:
        """The process anew if it is no longer the program it was when read (it called exec,
        or its pid was reused), or if its arguments could not be read then; else None."""
        if not old.cmdline and old.exe is not None:
            # A user process with no arguments was read mid-exec (the new image is in place
            # before the kernel sets where its arguments are): read it again (and again at
            # the next poll while they are still missing).
            return self.read(old.pid)
        try:
            p = psutil.Process(old.pid)
            with p.oneshot():
                if p.create_time() == old.start:
                    try:
                        exe: str | None = p.exe() or None
                    except psutil.Error:
                        exe = None
                    # Without the executable (another user's process, not root) the name tells.
                    if p.name() == old.name and (exe is None or exe == old.exe):
                        return None
        except psutil.Error:
            return None
        return self.read(old.pid)

    def read(self, pid: int) -> Proc | None:
        """One process, read now (None if it is gone or unreadable)."""
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                name = p.name()
                ppid = p.ppid()
                start = p.create_time()
                try:
                    uid: int | None = p.uids().real
                except psutil.Error:
                    uid = None
                try:
                    exe: str | None = p.exe() or None
                except psutil.Error:
                    exe = None
                try:
                    cmdline = tuple(p.cmdline())
                except psutil.Error:
                    cmdline = ()
                try:
                    cwd: str | None = p.cwd() or None
                except psutil.Error:
                    cwd = None
        except psutil.Error:
            return None
        return self._assemble(
            pid,
            ppid=ppid,
            name=name,
            exe=exe,
            cmdline=cmdline,
            uid=uid,
            login=_login_uid(pid),
            cwd=cwd,
            start=start,
        )

    def _assemble(
        self,
        pid: int,
        *,
        ppid: int,
        name: str,
        exe: str | None,
        cmdline: tuple[str, ...],
        uid: int | None,
        login: int | None,
        cwd: str | None,
        start: float,
        strip_deleted: bool = False,
    ) -> Proc:
        """A Proc from what was read of a process: its parent's program (from the table, else
        /proc), its users' names, and whether it masquerades. With `strip_deleted`, a
        " (deleted)" suffix (a sign of masquerade) is taken off the executable recorded."""
        with self._lock:
            parent = self._procs.get(ppid)
        if parent is not None:
            parent_name: str | None = parent.name
            parent_exe, parent_cmdline = parent.exe, parent.cmdline
        else:
            parent_name, parent_exe, parent_cmdline = _image_of(ppid)
        masquerade = masquerade_of(name, exe, cmdline)
        if strip_deleted and exe is not None and exe.endswith(" (deleted)"):
            exe = exe[: -len(" (deleted)")]
        if masquerade is None and exe is not None:
            tool = self._tools.identify(exe)
            if tool is not None and tool != posixpath.basename(exe):
                masquerade = f"renamed_binary:{tool}"
        return Proc(
            pid,
            ppid,
            name,
            exe,
            cmdline,
            uid,
            _username(uid, self._users),
            login,
            _username(login, self._users),
            cwd,
            start,
            parent_name,
            masquerade,
            parent_exe,
            parent_cmdline,
        )

    def on_kernel_events(
        self, events: Sequence[ProcEvent], snapshots: Mapping[int, Snapshot] | None = None
    ) -> list[Proc]:
        """Apply the kernel's process events (agent/sources/procevents.py) as they come:
        each exec is read from /proc at once (the only moment a process that lives for a
        millisecond is still there to read), a fork copies its parent (until it execs, a
        child runs its parent's program), an exit keeps the process for EXITED_TTL. Returns
        the processes that exec'd: the process_started events. A process already gone when
        its exec is read is counted (exec_unread) and known by its parent only."""
        started: list[Proc] = []
        now = time.monotonic()
        for ev in events:
            kind = ev.kind
            if kind == "exec":
                snap = snapshots.get(ev.pid) if snapshots else None
                proc = self.from_snapshot(ev.pid, snap) if snap else self.read_exec(ev.pid)
                if proc is None:
                    self.exec_unread += 1
                    self._unread_unreported += 1
                    # Known by its parent only: the forked copy (with the uid the kernel
                    # reported at setuid) now answers for the parent's arguments, so what it
                    # wrote is not blamed on the parent (runuser -u NAME -- sh -c ... : the
                    # shell that wrote, not root's runuser).
                    with self._lock:
                        child = self._procs.get(ev.pid)
                        if child is not None and child.forked:
                            self._index(child)
                    continue
                self.exec_read += 1
                with self._lock:
                    old = self._procs.pop(proc.pid, None) or self._exited_pop(proc.pid)
                    # The same image read for two exec events of one pid: a shell that exec'd
                    # its last command (`bash -c "cp a b"`) before its own exec was read shows
                    # the command's image for both. One process_started, not two.
                    repeat = (
                        old is not None
                        and not old.forked
                        and old.exe == proc.exe
                        and old.cmdline == proc.cmdline
                        and old.start == proc.start
                    )
                    if old is not None:
                        self._unindex(old)
                    elif len(self._procs) >= self.max_procs:
                        self.over_cap += 1
                        self._caps.hit("process_table", self.max_procs, untracked=1)
                        continue
                    self._procs[proc.pid] = proc
                    self._missing.pop(proc.pid, None)
                    self._index(proc)
                if repeat:
                    self.exec_repeats += 1
                    continue
                started.append(proc)
            elif kind == "fork":
                forks = self._forks
                forks[ev.pid] = ev.ppid
                if len(forks) > RECENTLY_EXITED:
                    forks.popitem(last=False)
                with self._lock:
                    parent = self._procs.get(ev.ppid)
                    if parent is None or len(self._procs) >= self.max_procs:
                        continue
                    old = self._procs.pop(ev.pid, None) or self._exited_pop(ev.pid)
                    if old is not None:
                        self._unindex(old)
                    # Not indexed by paths: the parent is, and an exec follows.
                    self._procs[ev.pid] = replace(
                        parent,
                        pid=ev.pid,
                        ppid=ev.ppid,
                        start=time.time(),
                        parent_name=parent.name,
                        parent_exe=parent.exe,
                        parent_cmdline=parent.cmdline,
                        forked=True,
                    )
            elif kind == "exit":
                with self._lock:
                    proc = self._procs.pop(ev.pid, None)
                    if proc is not None:
                        self._exited[ev.pid] = (proc, now)
                        self._expire_exited(now)
            elif kind == "uid":
                with self._lock:
                    proc = self._procs.get(ev.pid)
                if proc is not None and ev.ruid is not None and ev.ruid != proc.uid:
                    changed = replace(proc, uid=ev.ruid, user=_username(ev.ruid, self._users))
                    with self._lock:
                        if self._procs.get(ev.pid) is proc:
                            self._procs[ev.pid] = changed
        self.new += len(started)
        if self._unread_unreported and now - self._unread_reported_at >= UNREAD_REPORT_SECONDS:
            self._report_unread(now)
        return started

    def _report_unread(self, now: float) -> None:
        """Execs whose process was gone before /proc could be read: process_started events
        that were not made. A loss, reported (at most every UNREAD_REPORT_SECONDS)."""
        count, self._unread_unreported = self._unread_unreported, 0
        self._unread_reported_at = now
        self._report(
            record(
                "event_loss",
                "process_exited_before_read",
                dropped=count,
                dropped_total=self.exec_unread,
                read_total=self.exec_read,
                hint="these processes exited before their arguments could be read: no "
                "process_started event; their file events are attributed by parent or owner",
            )
        )

    def _exited_pop(self, pid: int) -> Proc | None:
        entry = self._exited.pop(pid, None)
        return entry[0] if entry is not None else None

    def _expire_exited(self, now: float) -> None:
        exited = self._exited
        while exited and (
            len(exited) > RECENTLY_EXITED or now - next(iter(exited.values()))[1] > EXITED_TTL
        ):
            self._unindex(exited.popitem(last=False)[1][0])

    def read_exec(self, pid: int) -> Proc | None:
        """One process just after its exec, read straight from /proc in the order things
        vanish when it exits (see agent/sources/procsnap.py). None when it is gone."""
        snap = read_snapshot(pid)
        return self.from_snapshot(pid, snap) if snap is not None else None

    def from_snapshot(self, pid: int, snap: Snapshot) -> Proc:
        """The process that /proc/<pid> described in `snap` (read when it exec'd)."""
        cmdline = tuple(os.fsdecode(a) for a in snap.cmdline.rstrip(b"\0").split(b"\0"))
        exe = os.fsdecode(snap.exe) if snap.exe is not None else None
        cwd = os.fsdecode(snap.cwd) if snap.cwd is not None else None
        # What was read after the arguments may be missing: the process is still reported,
        # with its parent from the fork event.
        name = posixpath.basename(exe) if exe else (cmdline[0] if cmdline else "")
        ppid = self._forks.get(pid, 0)
        start = time.time()
        uid, login = snap.uid, snap.login_uid
        line = snap.stat
        if line:
            # "pid (comm) state ppid ... starttime (the 22nd)"; comm may hold spaces or ")".
            close = line.rfind(b")")
            with contextlib.suppress(ValueError, IndexError):
                name = os.fsdecode(line[line.find(b"(") + 1 : close])
                fields = line[close + 2 :].split()
                ppid = int(fields[1])
                start = _boot_time() + int(fields[19]) / _CLK_TCK
        return self._assemble(
            pid,
            ppid=ppid,
            name=name,
            exe=exe,
            cmdline=cmdline,
            uid=uid,
            login=login,
            cwd=cwd,
            start=start,
            strip_deleted=True,
        )

    def catch_up(self) -> bool:
        """Apply the kernel's process events read but not handed over yet (sync), within a
        budget of SYNC_BUDGET s a second so a lagging exec reader never holds the caller for
        long. False when there is nothing to sync with or the budget is spent."""
        if self.sync is None:
            return False
        now = time.monotonic()
        spent = self._synced
        if now - spent[1] >= 1.0:
            spent[0], spent[1] = 0.0, now
        if spent[0] >= SYNC_BUDGET:
            return False
        self.sync(SYNC_BUDGET - spent[0])
        spent[0] += time.monotonic() - now
        return True

    def get(self, pid: int) -> Proc | None:
        with self._lock:
            exited = self._exited.get(pid)
            proc = self._procs.get(pid) or (exited[0] if exited is not None else None)
            if proc is None and pid in self._missing:
                return None  # gone before it could be read: do not try again per event
        if proc is None:
            proc = self.read(pid)
            if proc is None:
                with self._lock:
                    self._missing[pid] = None
                    if len(self._missing) > RECENTLY_EXITED:
                        self._missing.popitem(last=False)
        return proc

    def _index(self, proc: Proc) -> None:
        # Arguments only. The working directory was measured to blame the wrong process every
        # time (bench/attribution.py: 0 of 1,026 right): shells, editors and idle jobs sit in
        # the trees that other processes write to.
        if proc.pid == self._own:
            return
        for path in set(proc.paths()):
            pids = self._by_path.get(path)
            if pids is None:
                self._nearest.clear()  # a new key may be the nearest of cached directories
                self._by_path[path] = [proc.pid]
            elif proc.pid not in pids:
                pids.append(proc.pid)

    def _unindex(self, proc: Proc) -> None:
        for path in set(proc.paths()):
            pids = self._by_path.get(path)
            if pids is not None and proc.pid in pids:
                pids.remove(proc.pid)
                if not pids:
                    del self._by_path[path]
                    self._nearest.clear()

    def _nearest_key(self, directory: str) -> str | None:
        """The nearest of `directory` and its ancestors that some process's arguments name;
        cached per directory until the set of named paths changes (a burst of events in one
        directory walks its ancestors once, not once per event)."""
        if directory in self._nearest:
            return self._nearest[directory]
        cur = directory
        found: str | None = None
        while cur and cur != "/":
            if cur in self._by_path:
                found = cur
                break
            cur = cur[: cur.rfind("/")]
        if len(self._nearest) >= _NEAREST_CAP:
            self._nearest.clear()
        self._nearest[directory] = found
        return found

    def by_path(self, path: str) -> tuple[Proc, str] | None:
        """The newest process whose arguments (or working directory) name `path` or one of its
        parent directories; the nearest match wins. Returns (process, "cmdline")."""
        horizon = time.monotonic() - EXITED_TTL
        with self._lock:
            if not self._by_path:
                return None
            cur: str | None = (
                path if path != "/" and path in self._by_path else self._nearest_key(_parent(path))
            )
            while cur is not None:
                pids = self._by_path.get(cur)
                if pids:
                    found: list[Proc] = []
                    for p in pids:
                        proc = self._procs.get(p)
                        if proc is None:
                            exited = self._exited.get(p)
                            if exited is not None and exited[1] >= horizon:
                                proc = exited[0]
                        if proc is not None:
                            found.append(proc)
                    if found:
                        # The newest wins; on a tie (runuser and the shell it starts share the
                        # argument and the clock tick), the child. Not by the higher pid: pids
                        # wrap (pid_max is 32768 on many hosts).
                        parents = {c.ppid for c in found}
                        best = max(found, key=lambda c: (c.start, c.pid not in parents, c.pid))
                        return best, "cmdline"
                cur = self._nearest_key(_parent(cur))  # every process there has exited
        return None


_NEAREST_CAP = 4096


def _parent(path: str) -> str:
    """posixpath.dirname for the absolute, normalized paths events carry ("" above "/x")."""
    return path[: path.rfind("/")]


_CMDLINE_MAX = 64 * 1024  # bytes of arguments read (ARG_MAX can be far larger)
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_BOOT: list[float] = []


def _boot_time() -> float:
    """When the machine booted, as psutil gives it (create_time = boot + starttime ticks)."""
    if not _BOOT:
        _BOOT.append(psutil.boot_time())
    return _BOOT[0]


def _image_of(pid: int) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(name, executable, argument vector) of a process not in the table; what is readable."""
    if pid <= 0:
        return None, None, ()
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            name = p.name()
            try:
                exe: str | None = p.exe() or None
            except psutil.Error:
                exe = None
            try:
                cmdline = tuple(p.cmdline())
            except psutil.Error:
                cmdline = ()
    except psutil.Error:
        return None, None, ()
    return name, exe, cmdline


def _name_of(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return None


class Attributor:
    """Fills process.* and user.* on file events, saying how sure it is.

    In order: a fanotify record of this path (exact: the kernel named the pid); a process
    whose arguments name the path or a parent directory (inferred);
    the file's owner for a creation (inferred, user only); the console user (inferred, user
    only); else confidence none."""

    name = "attribution"

    def __init__(
        self,
        table: ProcessTable,
        exact: ExactLookup | None = None,
        console: Callable[[], str | None] | None = None,
        on_cap: Callable[[str, int], None] | None = None,
    ) -> None:
        self.table = table
        self._exact = exact
        self._on_cap = on_cap
        self._console = console or console_user
        self._users: dict[int, str | None] = {}
        # path -> (its creator, when): the open that follows a creation is the creator's
        # (open with O_CREAT makes both, in that order); taken by that open, or aged out.
        self._creators: OrderedDict[str, tuple[Proc, int]] = OrderedDict()
        self.counters = {
            "exact": 0,
            "creator": 0,
            "cmdline": 0,
            "owner": 0,
            "console": 0,
            "none": 0,
        }

    def _remember_creator(self, path: str, proc: Proc, ts_us: int) -> None:
        creators = self._creators
        creators[path] = (proc, ts_us)
        creators.move_to_end(path)
        while len(creators) > CREATORS_CAP:
            _, (_, made) = creators.popitem(last=False)
            # One still within its window is a hint lost: said (a flood of creations no
            # open follows: links, FIFOs); an aged-out one is no loss.
            if ts_us - made <= CREATOR_WINDOW_US and self._on_cap is not None:
                self._on_cap("attribution_creators", CREATORS_CAP)

    def __call__(self, e: Event) -> Event:
        if e.process_pid is not None:
            return e
        proc: Proc | None = None
        method = ""
        if self._exact is not None:
            # A modification is matched to a close-after-write read no earlier than it (less
            # a slack for the two readers' lag): the writer closing it, not an earlier one.
            since = e.timestamp_us - MODIFY_SLACK_US if e.action == "modified" else None
            proc = self._exact(e.path, e.action, since)
            if proc is not None:
                method = "fanotify"
                if e.action == "created" and proc.name and e.file_type != "dir":
                    self._remember_creator(e.path, proc, e.timestamp_us)
        if proc is None and e.action == "opened" and self._creators:
            made = self._creators.pop(e.path, None)
            if made is not None and e.timestamp_us - made[1] <= CREATOR_WINDOW_US:
                proc, method = made[0], "creator"
        if proc is None or (not proc.name and proc.uid is None):
            # None, or only a pid: gone before anything of it could be read (rsync's
            # receiver, a forked worker). The process that names the path says who and what
            # (its command line); the bare pid is kept when nothing does.
            found = self.table.by_path(e.path)
            if found is None and self.table.catch_up():
                # The command that names it may have started a moment ago, its exec frame
                # still in the exec reader's pipe (a `cat` read and gone within 1 ms).
                found = self.table.by_path(e.path)
            if found is not None:
                proc, method = found
        if proc is not None and proc.uid is None and proc.name and method != "cmdline":
            # Named by the kernel, but gone before its user could be read (rsync's receiver
            # writing its temporary file): a process of the same program whose arguments
            # name the path is the one that forked it, and a fork keeps its user.
            named = self.table.by_path(e.path)
            if named is not None and named[0].name == proc.name and named[0].uid is not None:
                proc = dataclasses.replace(proc, uid=named[0].uid, user=named[0].user)
        if proc is not None:
            self.counters["exact" if method == "fanotify" else method] += 1
            fields = proc_fields(proc)
            if fields["user_id"] is None and e.uid is not None and e.action in _WRITES_SEEN:
                # The process was gone before its user could be read: its file's owner is.
                fields["user_id"] = e.uid
                fields["user_name"] = _username(int(e.uid), self._users)
            return evolve(
                e,
                **fields,
                attribution="exact" if method == "fanotify" else "inferred",
                attribution_method=method,
            )
        if e.action in ("created", "closed_write", "moved_in") and e.uid is not None:
            self.counters["owner"] += 1
            uid = int(e.uid)
            return evolve(
                e,
                user_name=_username(uid, self._users),
                user_id=e.uid,
                attribution="inferred",
                attribution_method="owner",
            )
        user = self._console()
        if user is not None:
            self.counters["console"] += 1
            return evolve(e, user_name=user, attribution="inferred", attribution_method="console")
        self.counters["none"] += 1
        return evolve(e, attribution="none")


_console_cache: tuple[float, str | None] = (0.0, None)


def console_user() -> str | None:
    """The user logged in on the console or a terminal (the most recent session); cached."""
    global _console_cache
    now = time.monotonic()
    if now - _console_cache[0] < CONSOLE_TTL:
        return _console_cache[1]
    try:
        users = sorted(psutil.users(), key=lambda u: u.started)
    except (OSError, RuntimeError):
        users = []
    name = users[-1].name if users else None
    _console_cache = (now, name)
    return name


_READS = frozenset({"opened", "closed_nowrite"})
# fanotify (without FID reporting) sees opens, writes and closes; a deletion or rename is
# not one of them, so the last writer of a path must not be blamed for its removal.
_KERNEL_SEES = frozenset({"opened", "modified", "closed_write", "closed_nowrite", "created"})
# The directory-entry watcher (agent/sources/fandirs.py) answers for creations, deletions and
# renames: the inotify action -> its records for that path.
_DIR_KINDS: dict[str, frozenset[str]] = {
    "created": frozenset({"created"}),
    "closed_write": frozenset({"closed_write"}),
    # A write's modification: the process that closed the file after writing it, read no
    # earlier than the modification (kernel_lookup's `bounded`). Most writers are short
    # and closed by the time their modification is attributed; a writer still writing has
    # no such close yet, and an earlier writer's close is too old: no exact answer.
    "modified": frozenset({"closed_write"}),
    "deleted": frozenset({"deleted"}),
    "moved": frozenset({"moved_in"}),
    "moved_in": frozenset({"moved_in"}),
    "moved_out": frozenset({"moved_out"}),
}


def _access_kinds(action: str) -> frozenset[str] | None:
    """The access watcher's records that answer for an action (a reader right after a
    writer must not take the write: the kind of access is matched)."""
    if action not in _KERNEL_SEES:
        return None
    if action in ("opened", "closed_nowrite"):
        return _READS
    return _CREATES if action == "created" else _WRITES


def dir_kinds(action: str) -> frozenset[str] | None:
    return _DIR_KINDS.get(action)


class ExactLookup(Protocol):
    """The process the kernel named for this path and action (since `since_us` where the
    lookup bounds that action: a write's modification is matched to a close after it)."""

    def __call__(self, path: str, action: str, since_us: int | None = None, /) -> Proc | None: ...


def first_of(*lookups: ExactLookup | None) -> ExactLookup | None:
    """One exact lookup from several (the first that knows wins), or None if none is given."""
    found = tuple(f for f in lookups if f is not None)
    if not found:
        return None
    if len(found) == 1:
        return found[0]

    def exact(path: str, action: str, since_us: int | None = None) -> Proc | None:
        for lookup in found:
            proc = lookup(path, action, since_us)
            if proc is not None:
                return proc
        return None

    return exact


_WRITES_SEEN = frozenset({"created", "closed_write"})
# fanotify cannot tell a read-open from a write-open: a scanner opening a file after its
# writer closed it must not become the writer, so writes match writes only; a creation is
# the open that made the file.
_WRITES = frozenset({"closed_write", "modified"})
_CREATES = frozenset({"opened", "modified", "closed_write"})


class Watcher(Protocol):
    def lookup(self, path: str, since_us: int | None = None, *, actions: Any = None) -> Any: ...

    def process_info(self, pid: int) -> tuple[str, int | None, int] | None: ...


def kernel_lookup(
    watcher: Watcher,
    table: ProcessTable,
    kinds_of: Callable[[str], frozenset[str] | None] | None = None,
    bounded: frozenset[str] = frozenset(),
) -> ExactLookup:
    """Exact attribution from fanotify records: the pid the kernel reported for this path and
    kind of access; the process from the table, or from the snapshot fanotify took when the
    process had already exited. `kinds_of(action)` says which of the watcher's records answer
    for an action (None: it has none); by default, those of the access watcher."""
    users: dict[int, str | None] = {}
    kinds_for = kinds_of or _access_kinds
    sync = getattr(watcher, "sync", None)
    waited = [0.0, time.monotonic()]  # seconds waited for the watcher in this second, since

    def exact(path: str, action: str, since_us: int | None = None) -> Proc | None:
        kinds = kinds_for(action)
        if kinds is None:
            return None
        if action not in bounded:
            since_us = None
        access = watcher.lookup(path, since_us, actions=kinds)
        if access is None and sync is not None:
            # Its record may be queued but not read yet (two kernel queues, two readers):
            # wait for the watcher to catch up, within a budget of SYNC_BUDGET s a second so
            # a lagging watcher never holds the consumer for long.
            now = time.monotonic()
            if now - waited[1] >= 1.0:
                waited[0], waited[1] = 0.0, now
            if waited[0] < SYNC_BUDGET:
                sync(SYNC_BUDGET - waited[0])
                waited[0] += time.monotonic() - now
                access = watcher.lookup(path, since_us, actions=kinds)
        if access is None:
            return None
        proc = table.get(access.pid)
        if proc is None and table.catch_up():
            # A pid the kernel named but the table does not know: a short process whose fork
            # or exec frame may wait in the exec reader's pipe (its thread waiting for a
            # core). Apply what is there and look again.
            proc = table.get(access.pid)
        if proc is not None and proc.forked:
            # Only the copy of its parent made at fork: its exec (if any) not applied yet.
            # Still running, /proc says what it runs now.
            now_running = table.read_exec(access.pid)
            if now_running is not None:
                return now_running
        info = watcher.process_info(access.pid)
        if proc is not None and not (proc.forked and info is not None and info[0] != proc.name):
            return proc
        # Not in the table, or only as the copy of its parent made at its fork while the
        # watcher saw it run another program (its exec not applied yet: a `rm` forked from
        # a shell is not the shell): what the watcher read when the event came.
        name, uid, ppid = info or ("", None, 0)
        if uid is None and ppid:
            # Gone before it could be read: a process has its parent's user unless it changed
            # it (a forked worker: rsync's receiver, a shell's subshell).
            parent = table.get(ppid)
            if parent is not None:
                uid = parent.uid
        login = None
        return Proc(
            access.pid,
            ppid,
            name,
            None,
            (),
            uid,
            _username(uid, users),
            login,
            None,
            None,
            0.0,
            _name_of(ppid) if ppid else None,
            None,
        )

    return exact


def proc_fields(proc: Proc) -> dict[str, Any]:
    """The Event fields that describe a process and its user."""
    return {
        "process_pid": proc.pid,
        "process_name": proc.name,
        "process_executable": proc.exe,
        "process_command_line": proc.command_line or None,
        "process_working_directory": proc.cwd,
        "process_parent_pid": proc.ppid,
        "process_parent_name": proc.parent_name,
        "process_args": proc.cmdline,
        "process_parent_executable": proc.parent_exe,
        "process_parent_command_line": " ".join(proc.parent_cmdline) or None,
        "user_name": proc.user,
        "user_id": str(proc.uid) if proc.uid is not None else None,
        "user_login_name": proc.login_user,
        "user_login_id": str(proc.login_uid) if proc.login_uid is not None else None,
        "masquerade": proc.masquerade,
    }


# Copy tools, for telling a copy into the trees from one out of them (scp and rclone too:
# `scp host:x /srv/rnd/` downloads).
_INTO_TOOLS = COPY_TOOLS | {"scp", "rclone"}


def _destination_only(
    proc: Proc, paths: list[str], first: str, tagged: Callable[[str], bool]
) -> bool:
    """A copy tool (by its program, not argv[0]) whose only tagged operand is its
    destination: a copy into the trees (`rsync -a host:upd/ /srv/rnd/src/`)."""
    if proc.masquerade is not None or not proc.exe or not proc.cmdline:
        return False
    args = (posixpath.basename(proc.exe), *proc.cmdline[1:])
    dest = copy_destination(args, proc.cwd, remote_sources=True, tools=_INTO_TOOLS)
    return dest == first and not any(tagged(p) for p in paths if p != dest)


def process_event(
    proc: Proc, timestamp_us: int, tagged: Callable[[str], bool], *, source: str = "process_poll"
) -> Event:
    """A process-started event. `file.path` is what the process works on when that is inside
    a tagged tree (an argument, else the working directory), else its executable."""
    paths = proc.paths()
    path = next((p for p in paths if tagged(p)), None)
    if path is not None and _destination_only(proc, paths, path, tagged):
        path = None  # `rsync -a upd/ /srv/rnd/src/`: content coming in, not going out
    elif path is None and proc.cwd is not None and tagged(proc.cwd):
        path = proc.cwd
    return Event(
        timestamp_us,
        "process_started",
        path or proc.exe or "/",
        category="process",
        source=source,
        attribution="exact",
        attribution_method="process_table",
        **proc_fields(proc),
    )
