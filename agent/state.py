"""What the agent remembers across runs: when it last ran, and whether it stopped cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

STATE_FILE = "agent.state.json"
MAX_STATE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class PreviousRun:
    """The last run as its state file left it."""

    pid: int | None
    started_us: int | None
    last_seen_us: int | None  # the last checkpoint: the agent was alive then
    stopped_us: int | None  # set by a clean stop only
    clean: bool

    @property
    def down_since_us(self) -> int | None:
        """From when on nothing was watched: the clean stop, else the last sign of life."""
        return self.stopped_us if self.clean else self.last_seen_us


class AgentState:
    """A small JSON file under `state_dir`, written atomically (temporary file, fsync,
    rename) with mode 0600; the directory is created 0700. A missing, unreadable or
    malformed file means no previous run is known, never an error that stops the agent."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        self._data: dict[str, Any] = {}

    def previous(self) -> tuple[PreviousRun | None, str | None]:
        """The previous run, and why it is unknown when it is (None when there was none)."""
        data, why = read_private_json(self.path, MAX_STATE_BYTES)
        if data is None:
            return None, None if why == "missing" else why

        def num(key: str) -> int | None:
            value = data.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        return (
            PreviousRun(
                pid=num("pid"),
                started_us=num("started_us"),
                last_seen_us=num("last_seen_us"),
                stopped_us=num("stopped_us"),
                clean=data.get("clean") is True,
            ),
            None,
        )

    def started(self, now_us: int) -> None:
        self._data = {
            "pid": os.getpid(),
            "started_us": now_us,
            "last_seen_us": now_us,
            "clean": False,
        }
        self._write()

    def checkpoint(self, now_us: int) -> None:
        if self._data:
            self._data["last_seen_us"] = now_us
            self._write()

    def stopped(self, now_us: int) -> None:
        if self._data:
            self._data.update(last_seen_us=now_us, stopped_us=now_us, clean=True)
            self._write()

    def _write(self) -> None:
        write_private(self.path, json.dumps(self._data, sort_keys=True).encode("ascii"))


def read_private_json(path: str, max_bytes: int) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object the agent wrote with write_private, read without following a link or
    blocking on a FIFO; None and why otherwise ("missing", "unreadable: ...", "not a regular
    file", "malformed")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable: {exc.strerror}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "not a regular file"
        raw = os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "malformed"
    if not isinstance(data, dict):
        return None, "malformed"
    return data, None


def write_private(path: str, data: bytes) -> None:
    """A file only the agent reads: its directory made 0700 when missing, the file written
    0600 to a temporary name, fsynced, renamed over the old one, the directory fsynced."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    """A rename or a new file in `path` survives a power loss."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
