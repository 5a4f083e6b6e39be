"""Record sinks (an explicit registry) and the router that sends each kind where it belongs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import pwd
import random
import shlex
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, Protocol

import msgspec
import structlog

from agent.beat import until_beat
from agent.config import SinkSpec
from agent.events import dumps
from agent.health import record
from agent.sinks.errors import DeliveryError
from agent.sinks.outbox import Outbox, Row

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
    where it was, so a reader never sees half a line and a retry never duplicates one. With
    `max_bytes`, a write that would pass it first rotates the file (`alerts.jsonl` ->
    `alerts.jsonl.1` -> ... `.<keep>`, the oldest deleted), for hosts without logrotate."""

    def __init__(
        self, path: str, *, max_bytes: int | None = None, keep: int = 5, fsync: bool = True
    ) -> None:
        self.name = f"file:{path}"
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self.rotations = 0
        self._fd = open_sink_file(path)

    def fileno(self) -> int:
        return self._fd

    def write(self, lines: Sequence[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("ascii")
        size = os.fstat(self._fd).st_size
        if self.max_bytes is not None and size and size + len(data) > self.max_bytes:
            self._rotate()
            size = 0
        view = memoryview(data)
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

    def sync(self) -> None:
        """The lines written so far are on disk (called before the outbox lets alerts go)."""
        if self.fsync:
            os.fdatasync(self._fd)

    def _rotate(self) -> None:
        """Shift the numbered files up by one (the directory passed the sink checks: only
        root or the agent can change names in it), then start a new file."""
        for n in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")
        self.rotations += 1
        self.reopen()

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


def _secret(file: str | None, env: str | None, what: str) -> str | None:
    """A credential from its file (first line, whitespace trimmed) or environment variable."""
    if file is not None:
        with open(file, encoding="utf-8") as fh:
            value = fh.readline().strip()
        if not value:
            raise DeliveryError("secret_empty", f"the {what} file {file} is empty")
        return value
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise DeliveryError("secret_missing", f"the environment has no {what} in {env}")
        return value
    return None


def _stdout(spec: SinkSpec) -> Sink:
    from agent.sinks.pretty import PrettySink  # only when asked for

    fmt = spec.format or "auto"
    if fmt == "pretty" or (fmt == "auto" and sys.stdout.isatty()):
        return PrettySink(sys.stdout)
    return StreamSink(sys.stdout)


def _file(spec: SinkSpec) -> Sink:
    return FileSink(spec.path or "", max_bytes=spec.max_bytes, keep=spec.keep, fsync=spec.fsync)


def _syslog(spec: SinkSpec) -> Sink:
    from agent.sinks.syslog import SyslogSink

    return SyslogSink(
        spec.address or "",
        spec.protocol,
        facility=spec.facility,
        ca_file=spec.ca_file,
        verify=spec.verify,
        cert_file=spec.cert_file,
        key_file=spec.key_file,
        timeout=spec.timeout,
    )


def _http(spec: SinkSpec) -> Sink:
    from agent.sinks.http import HttpSink

    return HttpSink(
        spec.url or "",
        spec.format or "json",
        token=_secret(spec.token_file, spec.token_env, "token"),
        username=spec.username,
        password=_secret(spec.password_file, spec.password_env, "password"),
        ca_file=spec.ca_file,
        verify=spec.verify,
        timeout=spec.timeout,
        index=spec.index,
        sourcetype=spec.sourcetype,
    )


SINKS: dict[str, Callable[[SinkSpec], Sink]] = {
    "stdout": _stdout,
    "file": _file,
    "syslog": _syslog,
    "http": _http,
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


def open_sinks(specs: Sequence[SinkSpec]) -> list[tuple[Sink, frozenset[str], int]]:
    """Every sink of a config, opened, or none: SinkOpenError lists each one that failed.
    (A network sink connects at its first write: a collector that is down does not stop the
    agent, its records wait in the outbox.)"""
    opened: list[tuple[Sink, frozenset[str], int]] = []
    failures: list[tuple[str, Exception]] = []
    for spec in specs:
        try:
            opened.append((make_sink(spec), spec.records, spec.min_severity))
        except (OSError, UnsafeSinkError, ValueError) as exc:
            failures.append((spec.label, exc))
    if failures:
        for sink, _, _ in opened:
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
    if isinstance(exc, DeliveryError):
        return exc.reason
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}")
    return type(exc).__name__


def _error_text(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# The router -----------------------------------------------------------------------------------
#
# Alerts and health records ("durable" kinds) go into the outbox first; each sink then reads
# what it takes from the outbox after its cursor, in order, and acknowledges by moving the
# cursor. File events are too many for a disk queue (a checkout makes 100,000 in seconds):
# each sink owes them from a bounded in-memory queue, and a drop there is reported.

DURABLE = frozenset({"alert", "health"})
BATCH = 1000  # lines per sink write
JITTER = 0.5  # a retry waits between (1 - JITTER) and 1 times the backoff
CLOSE_TIMEOUT = 2.0
IDLE_TICK = 5.0  # an idle delivery thread's wake-up while the outbox's disk is failing
# log.level of a health record -> the severity its sink filter compares (rules' scale).
LEVEL_SEVERITY: Mapping[str, int] = MappingProxyType({"info": 1, "warning": 47, "error": 73})


class _Level(msgspec.Struct):
    level: str | None = None


class _EventHead(msgspec.Struct):
    severity: int | None = None


class _Head(msgspec.Struct):
    event: _EventHead | None = None
    log: _Level | None = None


_HEAD = msgspec.json.Decoder(_Head)


def severity_of(line: str) -> int:
    """The severity a sink's `min_severity` compares: an alert's `event.severity`, else the
    record's log.level (info 1, warning 47, error 73); 0 when the line says neither."""
    try:
        head = _HEAD.decode(line)
    except msgspec.DecodeError:  # ValidationError is one
        return 0
    if head.event is not None and head.event.severity is not None:
        return head.event.severity
    if head.log is not None and head.log.level is not None:
        return LEVEL_SEVERITY.get(head.log.level, 0)
    return 0


@dataclass(eq=False)
class _Route:
    """One sink: the kinds it takes, how far it has the outbox, the events it owes, and the
    state of its current outage."""

    sink: Sink
    kinds: frozenset[str]
    min_severity: int = 0
    cursor: int = 0  # every durable record up to this id that the sink takes, it has
    events: deque[str] = field(default_factory=deque)
    io: threading.Lock = field(default_factory=threading.Lock)  # one write at a time
    thread: threading.Thread | None = None
    errors: int = 0
    delivered: int = 0
    dropped: int = 0  # events, at the in-memory cap
    last_reason: str | None = None
    backoff: float = 0.0  # 0 while healthy
    next_retry: float = 0.0
    unreported_failures: int = 0
    error_reported: float | None = None
    unreported_drops: int = 0
    drop_reported: float | None = None
    outage_since: float | None = None
    outage_failures: int = 0
    outage_dropped: int = 0
    outage_late: int = 0

    @property
    def name(self) -> str:
        return self.sink.name

    @property
    def durable(self) -> frozenset[str]:
        return self.kinds & DURABLE


RouteSpec = tuple[Sink, frozenset[str]] | tuple[Sink, frozenset[str], int]


class Router:
    """Sends each record kind (alert, health, event) to the sinks that take it, at least once.

    Alerts and health records are in the durable outbox before any sink is tried and leave it
    when every sink that takes them has them. A sink that fails is retried with exponential
    backoff and jitter; meanwhile a `sink_error` health record (at most one per sink per
    interval) tells the other sinks that it is failing, and `sink_recovered` ends the outage.

    Threaded (the agent): each sink has its own delivery thread, so a collector that times out
    never holds up the pipeline. Inline (tests, benches, `replay`): the writer's thread
    delivers, and `retry()` runs due retries; the same steps either way.

    The bottom component of the agent: it reports its own health records through itself."""

    name = "sinks"

    def __init__(
        self,
        routes: Sequence[RouteSpec],
        *,
        outbox: Outbox | None = None,
        threaded: bool = False,
        pending_caps: Mapping[str, int] | None = None,
        error_interval: float = ERROR_INTERVAL,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        jitter: float = JITTER,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.outbox = outbox if outbox is not None else Outbox(None)
        self._routes = [self._route(spec) for spec in routes]
        self._threaded = threaded
        self._event_cap = {**PENDING_CAPS, **(pending_caps or {})}["event"]
        self._error_interval = error_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._jitter = jitter
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - retry jitter, not a secret
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._started = False
        self.errors = 0
        self.alerts = 0
        lost = self.outbox.register(r.name for r in self._routes if r.durable)
        self._cursors_from_outbox()
        self._announce([self._lost_by_removal(name, n) for name, n in lost.items()])

    @staticmethod
    def _route(spec: RouteSpec) -> _Route:
        sink, kinds = spec[0], spec[1]
        severity = spec[2] if len(spec) > 2 else 0
        return _Route(sink, kinds, severity)

    def _cursors_from_outbox(self) -> None:
        for route in self._routes:
            route.cursor = self.outbox.cursor(route.name) or 0

    @classmethod
    def from_specs(
        cls, specs: Sequence[SinkSpec], *, outbox: Outbox | None = None, **options: Any
    ) -> Router:
        """A router for a config's sinks; SinkOpenError when any of them cannot be opened."""
        return cls(open_sinks(specs), outbox=outbox, **options)

    # component -------------------------------------------------------------------------------

    def start(self) -> None:
        """Threaded: one delivery thread per sink (records written before start wait in the
        outbox). Inline: nothing to start."""
        with self._lock:
            self._started = True
            if self._threaded:
                for route in self._routes:
                    self._spawn(route)

    def stop(self) -> None:
        self.close()

    def _spawn(self, route: _Route) -> None:
        route.thread = threading.Thread(
            target=self._work, args=(route,), name=f"sink:{route.name}"[:60], daemon=True
        )
        route.thread.start()

    def wants(self, kind: str) -> bool:
        return any(kind in route.kinds for route in self._routes)

    # writing ---------------------------------------------------------------------------------

    def write(
        self, kind: str, lines: Sequence[str], severities: Sequence[int] | None = None
    ) -> None:
        """Hand records of one kind to the sinks: alerts and health into the outbox (one commit),
        events into each sink's bounded queue. Delivered at once (inline) or by the sinks'
        threads."""
        if not lines:
            return
        if kind in DURABLE and not self.wants(kind):
            # No sink takes them (a raw-event log only): kept, they would be owed for ever,
            # and the consumer would wake twice a second to retry them.
            if kind == "alert":
                self.alerts += len(lines)
            return
        if kind in DURABLE:
            sev = severities if severities is not None else [severity_of(x) for x in lines]
            self.outbox.append(kind, list(zip(sev, lines, strict=True)))
            if kind == "alert":
                self.alerts += len(lines)
            notes = self.outbox.take_notes()
        else:
            with self._lock:
                notes = [n for r in self._routes if kind in r.kinds for n in self._owe(r, lines)]
        self._announce(notes)
        self._kick()

    def _owe(self, route: _Route, lines: Sequence[str]) -> list[dict[str, Any]]:
        """Queue events for a sink; past the cap, the oldest are dropped and reported."""
        route.events.extend(lines)
        excess = len(route.events) - self._event_cap
        if excess <= 0:
            return []
        for _ in range(excess):
            route.events.popleft()
        route.dropped += excess
        route.outage_dropped += excess
        route.unreported_drops += excess
        now = self._clock()
        if route.drop_reported is not None and now - route.drop_reported < self._error_interval:
            return []
        route.drop_reported = now
        dropped, route.unreported_drops = route.unreported_drops, 0
        log.error("sink_backlog_full", sink=route.name, kind="event", dropped=dropped)
        return [
            record(
                "event_loss",
                "sink_backlog_full",
                sink=route.name,
                kind="event",
                dropped=dropped,
                dropped_total=route.dropped,
                cap=self._event_cap,
                hint="the sink has been failing or slow; the oldest owed file events were "
                "dropped (alerts and health wait in the outbox)",
            )
        ]

    def _announce(self, notes: list[dict[str, Any]]) -> None:
        """The router's and the outbox's own health records go where health goes, through the
        outbox like any other. Terminates: what a failure here reports is rate-limited."""
        appended = False
        for _ in range(4):
            if not notes or not self.wants("health"):
                break
            lines = [dumps(n) for n in notes]
            self.outbox.append("health", [(severity_of(x), x) for x in lines])
            appended = True
            notes = self.outbox.take_notes()
        if appended and self._threaded and self._started:
            # From a sink's own thread (sink_recovered, sink_error): the other sinks' threads
            # must hear of it now, not at their next idle tick.
            with self._wake:
                self._wake.notify_all()

    def _kick(self) -> None:
        if self._threaded and self._started:
            with self._wake:
                self._wake.notify_all()
        else:
            self._pump(force=False)

    def _pump(self, *, force: bool, healthy_only: bool = False) -> None:
        """Inline delivery: step every sink with due work until none progresses."""
        for _ in range(64):
            progressed = False
            for route in list(self._routes):
                if healthy_only and route.outage_since is not None:
                    continue
                if self._due(route, self._clock(), force=force) and self._step(route):
                    progressed = True
            if not progressed:
                return

    def _has_work(self, route: _Route) -> bool:
        return bool(route.events) or (bool(route.durable) and self.outbox.last_id() > route.cursor)

    def _due(self, route: _Route, now: float, *, force: bool) -> bool:
        return self._has_work(route) and (force or now >= route.next_retry)

    # delivering ------------------------------------------------------------------------------

    def _step(self, route: _Route) -> bool:
        """One batch to one sink; True when something was delivered or skipped past."""
        if not route.io.acquire(blocking=False):
            return False
        try:
            with self._lock:
                events = list(itertools.islice(route.events, BATCH))
            rows: list[Row] = []
            covered = route.cursor
            if route.durable and len(events) < BATCH:
                rows, covered = self.outbox.read(
                    route.cursor, route.durable, route.min_severity, BATCH - len(events)
                )
            lines = events + [r.line for r in rows]
            if lines:
                try:
                    route.sink.write(lines)
                    if rows:
                        _sync(route.sink)
                except (OSError, ValueError) as exc:
                    first = "event" if events else rows[0].kind
                    with self._lock:
                        notes = self._failed(route, exc, first)
                    self._announce(notes)
                    return False
        finally:
            route.io.release()
        with self._lock:
            for _ in range(len(events)):
                route.events.popleft()
            route.delivered += len(lines)
            notes = self._recovered(route, len(lines)) if route.outage_since is not None else []
        moved = covered > route.cursor
        if moved:
            route.cursor = covered
            self.outbox.ack(route.name, covered)
            notes += self.outbox.take_notes()
        self._announce(notes)
        return bool(lines) or moved

    def _work(self, route: _Route) -> None:
        """A sink's delivery thread: waits for work (or its retry time), delivers, repeats.
        Idle, it wakes every 5 s to write the outbox's cursors and retry its disk."""
        while True:
            with self._wake:
                if self._stopping or route not in self._routes:
                    return
                now = self._clock()
                due = self._due(route, now, force=False) and not route.io.locked()
                idle = False
                if not due:
                    # Idle, a sink's thread wakes every 30 s (cursors to disk); every 5 s while
                    # the outbox holds records its disk refused.
                    tick = IDLE_TICK if self.outbox.unsaved() else until_beat()
                    wait = route.next_retry - now if route.backoff else tick
                    idle = not self._wake.wait(max(min(wait, tick), 0.01))
                    if self._stopping or route not in self._routes:
                        return
                    due = self._due(route, self._clock(), force=False)
            try:
                if (due and not self._step(route)) or (idle and not due):
                    self.outbox.retry()
            except Exception:
                # Nothing may end a delivery thread (its sink would never get another line).
                log.exception("sink_thread_error", sink=route.name)
                with self._lock:
                    route.next_retry = self._clock() + self._retry_initial
                    route.backoff = route.backoff or self._retry_initial

    def _failed(self, route: _Route, exc: Exception, kind: str) -> list[dict[str, Any]]:
        """Count a failed write, back off (with jitter), report at most once per interval."""
        now = self._clock()
        route.errors += 1
        self.errors += 1
        route.unreported_failures += 1
        route.outage_failures += 1
        route.last_reason = _reason(exc)
        if route.outage_since is None:
            route.outage_since = now
        route.backoff = (
            min(route.backoff * 2, self._retry_max) if route.backoff else self._retry_initial
        )
        wait = route.backoff * (1.0 - self._jitter * self._rng.random())
        route.next_retry = now + wait
        if route.error_reported is not None and now - route.error_reported < self._error_interval:
            return []
        route.error_reported = now
        failures, route.unreported_failures = route.unreported_failures, 0
        return [self._error_record(route, "write", exc, failures=failures, now=now, kind=kind)]

    def _recovered(self, route: _Route, delivered: int) -> list[dict[str, Any]]:
        now = self._clock()
        since = route.outage_since if route.outage_since is not None else now
        data = {
            "sink": route.name,
            "failures": route.outage_failures,
            "dropped": route.outage_dropped,
            "outage_s": round(now - since, 3),
            "first_batch": delivered,
        }
        route.backoff = route.next_retry = 0.0
        route.outage_since = None
        route.outage_failures = route.outage_dropped = 0
        route.error_reported = None
        route.unreported_failures = 0
        log.info("sink_recovered", **data)
        return [record("sink_recovered", None, **data)]

    def _error_record(
        self,
        route: _Route,
        op: str,
        exc: Exception,
        *,
        failures: int,
        now: float,
        kind: str | None = None,
    ) -> dict[str, Any]:
        reason, error = _reason(exc), _error_text(exc)
        pending = self._behind(route)
        log.error(
            "sink_error",
            sink=route.name,
            op=op,
            reason=reason,
            error=error,
            pending=pending,
            failures=failures,
        )
        data: dict[str, Any] = {"sink": route.name, "op": op}
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

    def _behind(self, route: _Route) -> int:
        """Records a sink still owes: its events, and outbox ids past its cursor (of any kind,
        an upper bound: cheap, no disk read)."""
        durable = max(self.outbox.last_id() - route.cursor, 0) if route.durable else 0
        return len(route.events) + durable

    # the rest of the component -----------------------------------------------------------------

    def retry(self) -> int:
        """Retry what is due (inline), or nudge the outbox and the threads; lines still owed."""
        self.outbox.retry()
        self._announce(self.outbox.take_notes())
        if self._threaded and self._started:
            self._kick()
        else:
            self._pump(force=False)
        return self.owed()

    def owed(self) -> int:
        """Records some sink does not have yet."""
        with self._lock:
            events = sum(len(r.events) for r in self._routes)
        return events + self.outbox.backlog()

    def stats(self) -> dict[str, Any]:
        """Per sink: owed, delivered, failed writes, dropped events, up or failing."""
        with self._lock:
            routes = list(self._routes)
        out: dict[str, Any] = {}
        for i, route in enumerate(routes):
            name = route.name if route.name not in out else f"{route.name}#{i}"
            out[name] = {
                "pending": self._behind(route),
                "pending_events": len(route.events),
                "delivered": route.delivered,
                "errors": route.errors,
                "dropped": route.dropped,
                "up": route.outage_since is None,
                "last_error": route.last_reason,
                "min_severity": route.min_severity,
                **_sink_counters(route.sink),
            }
        return out

    def replace(self, specs: Sequence[SinkSpec]) -> None:
        """Swap in new sinks (a reload), closing the old ones. A sink that stays (same name)
        keeps its cursor, events owed and error state. Every new sink is opened first: when one
        cannot be, SinkOpenError is raised and the old sinks stay."""
        fresh = open_sinks(specs)
        closing: list[_Route] = []
        with self._wake:
            old = {route.name: route for route in self._routes}
            routes: list[_Route] = []
            spawn: list[_Route] = []
            for spec in fresh:
                new = self._route(spec)
                route = old.pop(new.name, None)
                if route is None:
                    routes.append(new)
                    spawn.append(new)
                    continue
                with route.io:
                    closing.append(_Route(route.sink, route.kinds))
                    route.sink, route.kinds, route.min_severity = (
                        new.sink,
                        new.kinds,
                        new.min_severity,
                    )
                route.next_retry = self._clock()  # the new file or stream may well work
                routes.append(route)
            notes: list[dict[str, Any]] = []
            for route in old.values():
                closing.append(route)
                if route.events:
                    notes.append(self._lost(route, "sink_removed"))
            self._routes = routes
            self._wake.notify_all()
        lost = self.outbox.register(r.name for r in routes if r.durable)
        self._cursors_from_outbox()
        notes += [self._lost_by_removal(name, n) for name, n in lost.items()]
        if self._threaded and self._started:
            for route in spawn:
                self._spawn(route)
        for route in closing:
            if route.thread is not None:
                route.thread.join(CLOSE_TIMEOUT)
            with route.io:
                _close(route.sink)
        self._announce(notes)
        self._kick()

    def reopen(self) -> None:
        """Every file sink opens its path again (SIGHUP after logrotate renamed the file).

        A file that cannot be reopened is a sink_error record; the sink keeps writing to the
        file it had open, which is better than writing nowhere."""
        notes: list[dict[str, Any]] = []
        for route in list(self._routes):
            if not isinstance(route.sink, FileSink):
                continue
            with route.io:
                try:
                    route.sink.reopen()
                except (OSError, UnsafeSinkError) as exc:
                    with self._lock:
                        route.errors += 1
                        self.errors += 1
                        route.last_reason = _reason(exc)
                        # Not rate-limited: once per SIGHUP, and it says something a write
                        # error would not (the sink is still on the rotated file).
                        notes.append(
                            self._error_record(route, "reopen", exc, failures=1, now=self._clock())
                        )
                else:
                    route.next_retry = self._clock()  # the new file may have room: retry now
        self._announce(notes)
        self._kick()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """One last try for every sink whatever its backoff, then close them. Alerts and health
        not delivered stay in the outbox for the next start (on disk); only owed file events
        (and, with an outbox in memory, every owed record) are lost, and reported as such."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
            threads = [r.thread for r in self._routes if r.thread is not None]
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.05))
        for route in self._routes:
            route.thread = None
        # One last try for the sinks that work; one in an outage is not waited for again (a
        # collector that hangs would hold up the stop by its timeout): its alerts stay in the
        # outbox for the next start.
        self._pump(force=True, healthy_only=True)
        notes = [self._lost(r, "sink_closed") for r in self._routes if self._owes(r)]
        if notes:
            self._announce(notes)
            self._pump(force=True, healthy_only=True)
        for route in self._routes:
            with route.io:
                _close(route.sink)
        self.outbox.close()

    def _owes(self, route: _Route) -> bool:
        if route.events:
            return True
        return self.outbox.path is None and bool(route.durable) and self._has_work(route)

    def _lost(self, route: _Route, reason: str) -> dict[str, Any]:
        by_kind = {"event": len(route.events)} if route.events else {}
        if self.outbox.path is None and route.durable:
            rows, _ = self.outbox.read(route.cursor, route.durable, route.min_severity, 1 << 30)
            for row in rows:
                by_kind[row.kind] = by_kind.get(row.kind, 0) + 1
        log.error("sink_backlog_lost", sink=route.name, reason=reason, lost=by_kind)
        return record(
            "event_loss",
            reason,
            sink=route.name,
            dropped=sum(by_kind.values()),
            dropped_by_kind=by_kind,
        )

    @staticmethod
    def _lost_by_removal(name: str, behind: int) -> dict[str, Any]:
        log.error("sink_backlog_lost", sink=name, reason="sink_removed", behind=behind)
        return record(
            "event_loss",
            "sink_removed",
            sink=name,
            dropped=behind,
            hint="a sink left the config with records it had not acknowledged (an upper "
            "bound: records of kinds it did not take are counted too)",
        )


def _sync(sink: Sink) -> None:
    """Make a batch of alerts durable in the sink before the outbox lets it go (a file sink
    fsyncs; a network sink's write already waited for its receiver)."""
    sync = getattr(sink, "sync", None)
    if sync is not None:
        sync()


def _close(sink: Sink) -> None:
    try:
        sink.close()
    except OSError as exc:
        log.exception("sink_close_failed", sink=sink.name, error=str(exc))


def _sink_counters(sink: Sink) -> dict[str, Any]:
    """A network sink's own counters (requests, reconnects, truncated...)."""
    out: dict[str, Any] = {}
    for key in ("requests", "sent", "reconnects", "truncated", "last_status", "rotations"):
        value = getattr(sink, key, None)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out[key] = value
    return out
