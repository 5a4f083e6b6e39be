"""Record sinks (an explicit registry) and the router that sends each kind where it belongs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import pwd
import shlex
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, Protocol

import structlog

from agent.config import SinkSpec
from agent.events import dumps
from agent.health import record

log = structlog.get_logger(__name__)

# Lines one sink may owe per record kind while it fails, until the durable outbox takes over.
# Health is smaller: it is mostly the router's own sink_error records about the same outage.
PENDING_CAPS: Mapping[str, int] = MappingProxyType(
    {"alert": 100_000, "health": 10_000, "event": 100_000}
)
ERROR_INTERVAL = 10.0  # at most one sink_error, and one event_loss per kind, per sink per interval
RETRY_INITIAL = 1.0
RETRY_MAX = 30.0
# Owed lines go out in chunks: each chunk is all-or-nothing, so a sink that fails half-way
# through a large backlog keeps what it took and owes only the rest.
_CHUNK = 1000


class Sink(Protocol):
    name: str

    def write(self, lines: Sequence[str]) -> None: ...

    def close(self) -> None: ...


# Opening a sink safely ------------------------------------------------------------------------
#
# The agent often runs as root and appends lines whose content a watched user chooses (file
# names). So a sink must be a file only the agent could have put there, and stay one: every
# directory from / down to it owned by root or the agent and writable by nobody else (OpenSSH's
# StrictModes rule), the file itself a regular file of the agent's with no mode bit outside
# 0640. `config check`, start, reload and reopen all go through `check_sink_path` /
# `open_sink_file`, so what the check passes is what the agent opens. Nothing is ever fixed
# silently: a refused sink names the problem and the command that fixes it.

UNSAFE_SINK = "CFG_UNSAFE_SINK"
SINK_UNWRITABLE = "CFG_SINK_UNWRITABLE"
SINK_FILE_MODE = 0o640  # a new file gets this; an existing one may have no bit outside it
SINK_DIR_MODE = 0o750  # missing directories below a checked one are made with this
_MAX_SYMLINKS = 40  # the kernel's own limit before ELOOP
_LOOK = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC  # stat-only: opens no device, no FIFO
# O_NONBLOCK: opening a FIFO for writing would otherwise wait for a reader forever.
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True, slots=True)
class SinkProblem:
    """Why the agent would refuse (or fail) to open a sink path, and the fix."""

    code: str  # UNSAFE_SINK or SINK_UNWRITABLE
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.message}" + (f" (hint: {self.hint})" if self.hint else "")


class UnsafeSinkError(Exception):
    """A sink path the agent refuses to open, with every problem found."""

    code = UNSAFE_SINK

    def __init__(self, path: str, problems: Sequence[SinkProblem]) -> None:
        self.path = path
        self.problems = tuple(problems)
        super().__init__("; ".join(p.message for p in self.problems))


@dataclass(frozen=True, slots=True)
class _Dir:
    fd: int  # O_PATH
    path: str  # as reached, symlinks resolved
    st: os.stat_result


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _writers(mode: int) -> str:
    """Who besides the owner may write, for a message: 'its group', 'everyone' or both."""
    return " and ".join(
        who for bit, who in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "everyone")) if mode & bit
    )


def _shared(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _sticky(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_ISVTX)


def _dir_problems(d: _Dir, euid: int, sink: str) -> list[SinkProblem]:
    """A directory on the way to a sink: root's or the agent's, writable by nobody else. A
    sticky one (/tmp) is fine on the way, as long as what the path takes from it is root's or
    the agent's (checked for that entry); the sink's own directory is checked apart."""
    q, mode = shlex.quote(d.path), d.st.st_mode
    owner = _user(euid)
    if d.st.st_uid not in (0, euid):
        return [
            SinkProblem(
                UNSAFE_SINK,
                f"directory {d.path} on the way to {sink} belongs to {_user(d.st.st_uid)}, "
                "who can rename what is in it and put their own file or link in its place",
                f"chown {owner}: {q} && chmod go-w {q}",
            )
        ]
    if _shared(d.st) and not _sticky(d.st):
        return [
            SinkProblem(
                UNSAFE_SINK,
                f"directory {d.path} on the way to {sink} is writable by {_writers(mode)}, "
                "who can rename what is in it and put their own file or link in its place",
                f"chmod go-w {q}",
            )
        ]
    return []


def _walk(
    sink: str, directory: str, euid: int, problems: list[SinkProblem], *, create: bool
) -> tuple[list[_Dir], bool]:
    """Opens `directory` from / one component at a time, checking each directory. Returns the
    open directories, ending with `directory` itself (complete: True) or, when part of it is
    missing and `create` is false or a problem was found (nothing is made below a refused
    directory), with its deepest existing ancestor (False). Missing directories are made 0750
    when `create`.

    Walking by descriptors rather than by path: what is checked is what is used. A symlink on
    the way is followed (/var/run -> /run) because the directory holding it passed the checks,
    so only root or the agent could have made it; in a sticky shared directory such as /tmp,
    where anyone may add one, it must also be root's or the agent's (the kernel's
    protected_symlinks rule)."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack = [_Dir(fd, "/", os.fstat(fd))]
    try:
        problems += _dir_problems(stack[0], euid, sink)
        complete = _descend(stack, sink, directory, euid, problems, create=create)
    except BaseException:
        for d in stack:
            os.close(d.fd)
        raise
    return stack, complete


def _descend(
    stack: list[_Dir],
    sink: str,
    directory: str,
    euid: int,
    problems: list[SinkProblem],
    *,
    create: bool,
) -> bool:
    """The loop of `_walk`: pushes each directory it opens onto `stack`."""
    todo = deque(directory.split("/"))
    links = 0
    while todo:
        part = todo.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if len(stack) > 1:
                os.close(stack.pop().fd)
            continue
        top = stack[-1]
        where = os.path.join(top.path, part)
        try:
            fd = os.open(part, _LOOK, dir_fd=top.fd)
        except FileNotFoundError:
            if not create or problems:
                return False
            # FileExistsError: made meanwhile by someone allowed to write here; checked below.
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, SINK_DIR_MODE, dir_fd=top.fd)
            fd = os.open(part, _LOOK, dir_fd=top.fd)
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            os.close(fd)
            if _shared(top.st) and st.st_uid not in (0, euid):
                problems.append(
                    SinkProblem(
                        UNSAFE_SINK,
                        f"{where} on the way to {sink} is a symbolic link that "
                        f"{_user(st.st_uid)} made in the shared directory {top.path}",
                        f"name the link's target in the config instead of {shlex.quote(where)}",
                    )
                )
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), where)
            target = os.readlink(part, dir_fd=top.fd)
            if target.startswith("/"):
                while len(stack) > 1:
                    os.close(stack.pop().fd)
            todo.extendleft(reversed(target.split("/")))
            continue
        if not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            # What `mkdir -p` says about a file where a directory should be.
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", where)
        stack.append(_Dir(fd, where, st))
        problems += _dir_problems(stack[-1], euid, sink)
    return True


def _own_dir_problems(d: _Dir, sink: str) -> list[SinkProblem]:
    """The sink's own directory may not even be sticky-shared: anyone could create the sink's
    name (or, after logrotate renamed the file, the next one) before the agent does. (Shared
    and not sticky is refused on the way already.)"""
    if not (_shared(d.st) and _sticky(d.st)):
        return []
    q = shlex.quote(os.path.join(d.path, "exfilwatch"))
    return [
        SinkProblem(
            UNSAFE_SINK,
            f"{d.path}, the directory of {sink}, is writable by {_writers(d.st.st_mode)}, who "
            "can create the sink's name first or swap the file after a log rotation",
            f"use a directory of the agent's own, e.g. mkdir -m 0750 {q}",
        )
    ]


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _file_problems(
    st: os.stat_result, path: str, euid: int, link: str | None = None
) -> list[SinkProblem]:
    q = shlex.quote(path)
    if stat.S_ISLNK(st.st_mode):
        to = f" to {link}" if link is not None else ""
        return [
            SinkProblem(
                UNSAFE_SINK,
                f"{path} is a symbolic link{to}; the agent never follows one, since whoever "
                "made it would choose the file the agent appends to",
                f"rm {q}, find out who made it, and let the agent create the file",
            )
        ]
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        return [
            SinkProblem(
                UNSAFE_SINK,
                f"{path} is {kind}, not a regular file",
                "point the sink at a file, or remove what is there; the agent creates the file",
            )
        ]
    out = []
    if st.st_uid != euid:
        out.append(
            SinkProblem(
                UNSAFE_SINK,
                f"{path} belongs to {_user(st.st_uid)}, not to {_user(euid)} (the agent), "
                "so they can read, truncate or replace what the agent writes",
                f"chown {_user(euid)}: {q}",
            )
        )
    extra = stat.S_IMODE(st.st_mode) & ~SINK_FILE_MODE
    if extra:
        why = []
        if extra & (stat.S_IWGRP | stat.S_IWOTH):
            why.append(f"writable by {_writers(st.st_mode)}")
        if extra & stat.S_IROTH:
            why.append("readable by everyone")
        if extra & ~(stat.S_IWGRP | stat.S_IWOTH | stat.S_IROTH):
            why.append("has execute, set-id or sticky bits")
        out.append(
            SinkProblem(
                UNSAFE_SINK,
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: {', '.join(why)} (a sink may "
                "be 0600 or 0640: records name what is watched and who is suspected)",
                f"chmod 0640 {q}",
            )
        )
    elif euid != 0 and not st.st_mode & stat.S_IWUSR:
        out.append(SinkProblem(SINK_UNWRITABLE, f"{path} is read-only", f"chmod u+w {q}"))
    return out


def _look(d: _Dir, name: str, path: str, euid: int) -> list[SinkProblem] | None:
    """The problems of what is at the sink's name, looked at without opening it (a device or
    a FIFO is refused without its open ever running); None when nothing is there yet."""
    try:
        fd = os.open(name, _LOOK, dir_fd=d.fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    link = None
    if stat.S_ISLNK(st.st_mode):
        try:
            link = os.readlink(name, dir_fd=d.fd)
        except OSError:
            link = None
    return _file_problems(st, path, euid, link)


def _can_create_in(st: os.stat_result, euid: int) -> bool:
    if euid == 0:
        return True
    if st.st_uid == euid:
        need = stat.S_IWUSR | stat.S_IXUSR
    elif st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        need = stat.S_IWGRP | stat.S_IXGRP
    else:
        need = stat.S_IWOTH | stat.S_IXOTH
    return st.st_mode & need == need


def _split(path: str) -> tuple[str, str]:
    """The sink's directory and file name, from / (relative paths are from the working dir)."""
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    head, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise IsADirectoryError(errno.EISDIR, "names a directory, not a file", path)
    return head, name


def check_sink_path(path: str) -> list[SinkProblem]:
    """Every reason the agent (this process's effective user) would refuse or fail to open
    `path` as a file sink; [] when it can. Only looks: creates nothing, opens nothing for
    writing, never blocks."""
    euid = os.geteuid()
    problems: list[SinkProblem] = []
    try:
        head, name = _split(path)
        stack, complete = _walk(path, head, euid, problems, create=False)
    except OSError as exc:
        return [*problems, SinkProblem(SINK_UNWRITABLE, f"cannot open {path}: {_error_text(exc)}")]
    except ValueError:  # a lone surrogate or a NUL: repr, or printing the message would fail
        return [SinkProblem(SINK_UNWRITABLE, f"{path!r} cannot be a file name")]
    try:
        d = stack[-1]
        found = _look(d, name, path, euid) if complete else None
        if complete:
            problems += _own_dir_problems(d, path)
        if found is not None:
            problems += found
        elif not _can_create_in(d.st, euid):
            problems.append(
                SinkProblem(
                    SINK_UNWRITABLE,
                    f"the agent ({_user(euid)}) cannot create {path}: {d.path} is not writable "
                    "for it",
                    f"create {shlex.quote(path)} as {_user(euid)}, mode 0640",
                )
            )
        if os.fstatvfs(d.fd).f_flag & os.ST_RDONLY:
            problems.append(SinkProblem(SINK_UNWRITABLE, f"{path} is on a read-only filesystem"))
    except OSError as exc:
        problems.append(SinkProblem(SINK_UNWRITABLE, f"cannot open {path}: {_error_text(exc)}"))
    except ValueError:
        problems.append(SinkProblem(SINK_UNWRITABLE, f"{path!r} cannot be a file name"))
    finally:
        for x in stack:
            os.close(x.fd)
    return problems


def open_sink_file(path: str) -> int:
    """A descriptor appending to `path` (made 0640, with missing directories 0750), after the
    checks of `check_sink_path`. Raises UnsafeSinkError when refused, OSError when the system
    says no. The checks that count are made on what was opened, not on the name."""
    euid = os.geteuid()
    head, name = _split(path)
    problems: list[SinkProblem] = []
    stack, complete = _walk(path, head, euid, problems, create=True)
    try:
        if complete:
            problems += _own_dir_problems(stack[-1], path)
            problems += _look(stack[-1], name, path, euid) or []
        if problems:
            raise UnsafeSinkError(path, problems)
        fd = os.open(name, _APPEND, SINK_FILE_MODE, dir_fd=stack[-1].fd)
    finally:
        for x in stack:
            os.close(x.fd)
    try:
        st = os.fstat(fd)
        # Back to blocking writes: O_NONBLOCK was only for the open.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except OSError:
        os.close(fd)
        raise
    problems = _file_problems(st, path, euid)
    if problems:
        os.close(fd)
        raise UnsafeSinkError(path, problems)
    return fd


class FileSink:
    """Appends JSON lines to a file, opened (and reopened) by `open_sink_file`.

    A write is all-or-nothing: when the disk fills part-way through, the file is cut back to
    where it was, so a reader never sees half a line and a retry never duplicates one."""

    def __init__(self, path: str) -> None:
        self.name = f"file:{path}"
        self.path = path
        self._fd = open_sink_file(path)

    def fileno(self) -> int:
        return self._fd

    def write(self, lines: Sequence[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("ascii")
        view = memoryview(data)
        size = os.fstat(self._fd).st_size
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            if len(view) < len(data):
                try:
                    os.ftruncate(self._fd, size)
                except OSError as exc:
                    log.exception("sink_truncate_failed", sink=self.name, size=size, error=str(exc))
            raise

    def reopen(self) -> None:
        """After log rotation moved the file away: write to a new file at the same path."""
        old = self._fd
        self._fd = open_sink_file(self.path)
        os.close(old)

    def close(self) -> None:
        os.close(self._fd)


class StreamSink:
    """Writes JSON lines to a text stream (stdout)."""

    def __init__(self, stream: IO[str], name: str = "stdout") -> None:
        self.name = name
        self._stream = stream

    def write(self, lines: Sequence[str]) -> None:
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


SINKS: dict[str, Callable[[SinkSpec], Sink]] = {
    "stdout": lambda spec: StreamSink(sys.stdout),
    "file": lambda spec: FileSink(spec.path or ""),
}


def make_sink(spec: SinkSpec) -> Sink:
    try:
        factory = SINKS[spec.type]
    except KeyError:
        raise ValueError(f"unknown sink type {spec.type!r}") from None
    return factory(spec)


class SinkOpenError(Exception):
    """Sinks of a config that could not be opened; the ones that did open were closed again."""

    def __init__(self, failures: Sequence[tuple[str, Exception]]) -> None:
        self.failures = tuple(failures)
        super().__init__("; ".join(f"{name}: {_error_text(exc)}" for name, exc in self.failures))

    @property
    def reason(self) -> str:
        """CFG_UNSAFE_SINK or the errno name (EACCES, ENOSPC...) of the first failure."""
        return _reason(self.failures[0][1])

    @property
    def problems(self) -> list[str]:
        out = []
        for name, exc in self.failures:
            if isinstance(exc, UnsafeSinkError):
                out += [f"{name}: {p}" for p in exc.problems]
            else:
                out.append(f"{name}: {_reason(exc)} {_error_text(exc)}")
        return out


def open_sinks(specs: Sequence[SinkSpec]) -> list[tuple[Sink, frozenset[str]]]:
    """Every sink of a config, opened, or none: SinkOpenError lists each one that failed."""
    opened: list[tuple[Sink, frozenset[str]]] = []
    failures: list[tuple[str, Exception]] = []
    for spec in specs:
        try:
            opened.append((make_sink(spec), spec.records))
        except (OSError, UnsafeSinkError) as exc:
            failures.append((f"{spec.type}:{spec.path}" if spec.path else spec.type, exc))
    if failures:
        for sink, _ in opened:
            try:
                sink.close()
            except OSError as exc:
                log.exception("sink_close_failed", sink=sink.name, error=str(exc))
        raise SinkOpenError(failures)
    return opened


def _reason(exc: Exception) -> str:
    """ENOSPC, EIO, EPIPE... CFG_UNSAFE_SINK for a refused file, or the exception type when
    there is no errno (a closed stream)."""
    if isinstance(exc, UnsafeSinkError):
        return exc.code
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}")
    return type(exc).__name__


def _error_text(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


@dataclass
class _Pass:
    """One locked pass of the router: its time, and the health records it has to announce."""

    now: float
    notes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(eq=False)
class _Route:
    """One sink, the kinds it takes, and what it owes while it fails."""

    sink: Sink
    kinds: frozenset[str]
    # kind -> (sequence, line), oldest first. One deque per kind so each kind has its own cap;
    # the router-wide sequence number restores the order across kinds when they are written.
    pending: dict[str, deque[tuple[int, str]]] = field(default_factory=dict)
    errors: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    backoff: float = 0.0  # 0 while healthy
    next_retry: float = 0.0
    unreported_failures: int = 0
    error_reported: float | None = None
    unreported_drops: dict[str, int] = field(default_factory=dict)
    drop_reported: dict[str, float] = field(default_factory=dict)
    # The current outage, for the sink_recovered record.
    outage_since: float | None = None
    outage_failures: int = 0
    outage_dropped: int = 0

    def owed(self) -> int:
        return sum(len(q) for q in self.pending.values())

    def head(self, limit: int) -> tuple[list[str], dict[str, int]]:
        """Up to `limit` owed lines in the order they were written, and how many of each kind."""
        iters: dict[str, Iterator[tuple[int, str]]] = {
            k: iter(q) for k, q in self.pending.items() if q
        }
        heads = {k: next(it) for k, it in iters.items()}
        lines: list[str] = []
        taken = dict.fromkeys(heads, 0)
        while heads and len(lines) < limit:
            kind = min(heads, key=lambda k: heads[k][0])
            lines.append(heads[kind][1])
            taken[kind] += 1
            following = next(iters[kind], None)
            if following is None:
                del heads[kind]
            else:
                heads[kind] = following
        return lines, taken


class Router:
    """Sends each record kind (alert, health, event) to the sinks that take it.

    A sink that fails keeps what it was given in a bounded pending buffer and gets it, in order,
    when it works again (retried with backoff, by the next write or by `retry()`); meanwhile a
    `sink_error` health record tells the other sinks, and stderr, that it is failing.

    The bottom component of the agent: it reports its own health records straight to the
    sinks that take them (there is nothing below it to report through)."""

    name = "sinks"

    def __init__(
        self,
        routes: Sequence[tuple[Sink, frozenset[str]]],
        *,
        pending_caps: Mapping[str, int] | None = None,
        error_interval: float = ERROR_INTERVAL,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._routes = [_Route(sink, kinds) for sink, kinds in routes]
        self._caps = {**PENDING_CAPS, **(pending_caps or {})}
        self._error_interval = error_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.errors = 0

    def start(self) -> None:
        """Sinks open when they are made (a bad path fails the config check, not a run)."""

    def stop(self) -> None:
        self.close()

    @classmethod
    def from_specs(cls, specs: Sequence[SinkSpec], **options: Any) -> Router:
        """A router for a config's sinks; SinkOpenError when any of them cannot be opened."""
        return cls(open_sinks(specs), **options)

    def wants(self, kind: str) -> bool:
        return any(kind in route.kinds for route in self._routes)

    def write(self, kind: str, lines: Sequence[str]) -> None:
        if not lines:
            return
        with self._lock:
            step = _Pass(self._clock())
            for route in self._routes:
                if kind not in route.kinds:
                    continue
                if route.owed() and step.now >= route.next_retry:
                    self._flush(route, step)
                if route.owed():
                    # Behind a backlog: queued after it, so the sink still gets lines in order.
                    self._queue(route, kind, lines, step)
                else:
                    self._attempt(route, kind, lines, step)
            self._announce(step)

    def retry(self) -> int:
        """Retry each failing sink whose backoff has run out; the lines still owed after it.

        Meant for the pipeline's idle tick, so a sink that recovers while nothing is written
        still gets its backlog."""
        with self._lock:
            step = _Pass(self._clock())
            for route in self._routes:
                if route.owed() and step.now >= route.next_retry:
                    self._flush(route, step)
            self._announce(step)
            return sum(route.owed() for route in self._routes)

    def owed(self) -> int:
        """Lines written to no sink yet (a failing sink's backlog)."""
        with self._lock:
            return sum(route.owed() for route in self._routes)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per sink: lines owed (in total and by kind), failed writes, lines dropped."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for i, route in enumerate(self._routes):
                name = route.sink.name if route.sink.name not in out else f"{route.sink.name}#{i}"
                out[name] = {
                    "pending": route.owed(),
                    "pending_by_kind": {k: len(q) for k, q in route.pending.items() if q},
                    "errors": route.errors,
                    "dropped": sum(route.dropped.values()),
                    "dropped_by_kind": dict(route.dropped),
                }
            return out

    def replace(self, specs: Sequence[SinkSpec]) -> None:
        """Swap in new sinks between two writes (a reload), closing the old ones.

        A sink that stays (same name) keeps its backlog and its error state. Every new sink is
        opened first: when one cannot be, SinkOpenError is raised and the old sinks stay."""
        fresh = open_sinks(specs)
        with self._lock:
            step = _Pass(self._clock())
            old = {route.sink.name: route for route in self._routes}
            closing: list[Sink] = []
            routes: list[_Route] = []
            for sink, kinds in fresh:
                route = old.pop(sink.name, None)
                if route is None:
                    route = _Route(sink, kinds)
                else:
                    closing.append(route.sink)
                    route.sink, route.kinds = sink, kinds
                    route.next_retry = step.now  # the new file or stream may well work
                routes.append(route)
            for route in old.values():
                closing.append(route.sink)
                if route.owed():
                    step.notes.append(self._lost(route, "sink_removed"))
            self._routes = routes
            self._announce(step)
        for sink in closing:
            try:
                sink.close()
            except OSError as exc:
                log.exception("sink_close_failed", sink=sink.name, error=str(exc))

    def reopen(self) -> None:
        """Every file sink opens its path again (SIGHUP after logrotate renamed the file).

        A file that cannot be reopened is a sink_error record; the sink keeps writing to the
        file it had open, which is better than writing nowhere."""
        with self._lock:
            step = _Pass(self._clock())
            for route in self._routes:
                if not isinstance(route.sink, FileSink):
                    continue
                try:
                    route.sink.reopen()
                except (OSError, UnsafeSinkError) as exc:
                    route.errors += 1
                    self.errors += 1
                    # Not rate-limited: it happens once per SIGHUP, and says something a write
                    # error would not (the sink is still on the rotated file).
                    step.notes.append(
                        self._error_record(route, "reopen", None, exc, failures=1, now=step.now)
                    )
                else:
                    # A new file may have room where the old one had none: retry at once.
                    route.next_retry = step.now
            self._announce(step)

    def close(self) -> None:
        """One last try for every backlog, whatever the backoff, then close every sink."""
        with self._lock:
            step = _Pass(self._clock())
            for route in self._routes:
                if route.owed():
                    self._flush(route, step)
            step.notes.extend(
                self._lost(route, "sink_closed") for route in self._routes if route.owed()
            )
            self._announce(step)
            for route in self._routes:
                try:
                    route.sink.close()
                except OSError as exc:
                    log.exception("sink_close_failed", sink=route.sink.name, error=str(exc))

    # internals, called with the lock held ----------------------------------------------------

    def _attempt(self, route: _Route, kind: str, lines: Sequence[str], step: _Pass) -> None:
        try:
            route.sink.write(lines)
        except (OSError, ValueError) as exc:
            at = len(step.notes)
            self._queue(route, kind, lines, step)
            self._failed(route, kind, exc, step, at)

    def _flush(self, route: _Route, step: _Pass) -> None:
        """Write what the sink owes, oldest first; on success, report that it recovered."""
        late = 0
        while True:
            lines, taken = route.head(_CHUNK)
            if not lines:
                break
            try:
                route.sink.write(lines)
            except (OSError, ValueError) as exc:
                first = min(taken, key=lambda k: route.pending[k][0][0])
                self._failed(route, first, exc, step, len(step.notes))
                return
            for kind, n in taken.items():
                queue = route.pending[kind]
                for _ in range(n):
                    queue.popleft()
            late += len(lines)
        since = route.outage_since if route.outage_since is not None else step.now
        data = {
            "sink": route.sink.name,
            "delivered_late": late,
            "failures": route.outage_failures,
            "dropped": route.outage_dropped,
            "outage_s": round(step.now - since, 3),
        }
        route.pending.clear()
        route.backoff = route.next_retry = 0.0
        route.outage_since = None
        route.outage_failures = route.outage_dropped = 0
        log.info("sink_recovered", **data)
        step.notes.append(record("sink_recovered", None, **data))

    def _queue(self, route: _Route, kind: str, lines: Sequence[str], step: _Pass) -> None:
        queue = route.pending.setdefault(kind, deque())
        queue.extend((next(self._seq), line) for line in lines)
        cap = self._caps.get(kind, self._caps["event"])
        excess = len(queue) - cap
        if excess <= 0:
            return
        for _ in range(excess):
            queue.popleft()
        route.dropped[kind] = route.dropped.get(kind, 0) + excess
        route.outage_dropped += excess
        route.unreported_drops[kind] = route.unreported_drops.get(kind, 0) + excess
        last = route.drop_reported.get(kind)
        if last is not None and step.now - last < self._error_interval:
            return
        route.drop_reported[kind] = step.now
        dropped = route.unreported_drops.pop(kind)
        log.error("sink_backlog_full", sink=route.sink.name, kind=kind, dropped=dropped, cap=cap)
        step.notes.append(
            record(
                "event_loss",
                "sink_backlog_full",
                sink=route.sink.name,
                kind=kind,
                dropped=dropped,
                dropped_total=route.dropped[kind],
                cap=cap,
                hint="the sink has been failing for a while; the oldest owed lines were dropped",
            )
        )

    def _failed(self, route: _Route, kind: str, exc: Exception, step: _Pass, at: int) -> None:
        """Count a failed write, back off, and report it (at most once per interval)."""
        route.errors += 1
        self.errors += 1
        route.unreported_failures += 1
        route.outage_failures += 1
        if route.outage_since is None:
            route.outage_since = step.now
        route.backoff = (
            min(route.backoff * 2, self._retry_max) if route.backoff else self._retry_initial
        )
        route.next_retry = step.now + route.backoff
        if (
            route.error_reported is not None
            and step.now - route.error_reported < self._error_interval
        ):
            return
        route.error_reported = step.now
        failures, route.unreported_failures = route.unreported_failures, 0
        # Before any event_loss the same write caused: the cause first, then the consequence.
        step.notes.insert(
            at, self._error_record(route, "write", kind, exc, failures=failures, now=step.now)
        )

    def _error_record(
        self,
        route: _Route,
        op: str,
        kind: str | None,
        exc: Exception,
        *,
        failures: int,
        now: float,
    ) -> dict[str, Any]:
        reason, error = _reason(exc), _error_text(exc)
        pending = route.owed()
        log.error(
            "sink_error",
            sink=route.sink.name,
            op=op,
            kind=kind,
            reason=reason,
            error=error,
            pending=pending,
            failures=failures,
        )
        data: dict[str, Any] = {"sink": route.sink.name, "op": op}
        if kind is not None:
            data["kind"] = kind
        if pending:
            data["retry_in_s"] = round(max(route.next_retry - now, 0.0), 3)
        return record(
            "sink_error",
            reason,
            **data,
            error=error,
            pending=pending,
            failures=failures,
            errors_total=route.errors,
        )

    def _lost(self, route: _Route, reason: str) -> dict[str, Any]:
        by_kind = {k: len(q) for k, q in route.pending.items() if q}
        log.error("sink_backlog_lost", sink=route.sink.name, reason=reason, lost=by_kind)
        return record(
            "event_loss",
            reason,
            sink=route.sink.name,
            dropped=sum(by_kind.values()),
            dropped_by_kind=by_kind,
        )

    def _announce(self, step: _Pass) -> None:
        """The router's own health records go to every sink that takes health: written now to a
        working one, queued behind the backlog of a failing one (its SIEM learns why, later).

        Terminates: a sink that fails here joins the queued ones, and what that failure reports
        is rate-limited."""
        while step.notes:
            line = dumps(step.notes.pop(0))
            for route in self._routes:
                if "health" not in route.kinds:
                    continue
                if route.owed():
                    self._queue(route, "health", [line], step)
                else:
                    self._attempt(route, "health", [line], step)
