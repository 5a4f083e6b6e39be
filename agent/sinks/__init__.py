"""Record sinks (an explicit registry) and the router that sends each kind where it belongs."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO, Protocol

import structlog

from agent.config import SinkSpec

log = structlog.get_logger(__name__)


class Sink(Protocol):
    name: str

    def write(self, lines: Sequence[str]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """Appends JSON lines to a file (created 0640, parent directories 0750)."""

    def __init__(self, path: str) -> None:
        self.name = f"file:{path}"
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, lines: Sequence[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("ascii")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def reopen(self) -> None:
        """After log rotation moved the file away."""
        old = self._fd
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
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


class Router:
    """Sends each record kind (alert, health, event) to the sinks that take it."""

    def __init__(self, routes: Sequence[tuple[Sink, frozenset[str]]]) -> None:
        self._routes = list(routes)
        self._lock = threading.Lock()
        self.errors = 0

    @classmethod
    def from_specs(cls, specs: Sequence[SinkSpec]) -> Router:
        return cls([(make_sink(s), s.records) for s in specs])

    def wants(self, kind: str) -> bool:
        return any(kind in kinds for _, kinds in self._routes)

    def write(self, kind: str, lines: Sequence[str]) -> None:
        if not lines:
            return
        with self._lock:
            for sink, kinds in self._routes:
                if kind not in kinds:
                    continue
                try:
                    sink.write(lines)
                except (OSError, ValueError) as exc:
                    self.errors += 1
                    log.exception("sink_error", sink=sink.name, error=str(exc), lost=len(lines))

    def replace(self, specs: Sequence[SinkSpec]) -> None:
        """Swap in new sinks between two writes (a reload), closing the old ones."""
        routes = [(make_sink(s), s.records) for s in specs]
        with self._lock:
            old, self._routes = self._routes, routes
        for sink, _ in old:
            try:
                sink.close()
            except OSError as exc:
                log.exception("sink_close_failed", sink=sink.name, error=str(exc))

    def reopen(self) -> None:
        with self._lock:
            for sink, _ in self._routes:
                if isinstance(sink, FileSink):
                    sink.reopen()

    def close(self) -> None:
        with self._lock:
            for sink, _ in self._routes:
                try:
                    sink.close()
                except OSError as exc:
                    log.exception("sink_close_failed", sink=sink.name, error=str(exc))
