"""What every file source hands the pipeline, and the interface a source offers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from agent.config import WatchSpec
from agent.health import Reporter


class RawEvent(NamedTuple):
    """A file event as a source saw it, before enrichment (stat, tags)."""

    timestamp_us: int
    action: str
    path: str
    src_path: str | None
    is_dir: bool
    source: str


EmitBatch = Callable[[list[RawEvent]], None]


class Source(Protocol):
    """A producer of raw file events for a set of watch specs."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def update(self, specs: Sequence[WatchSpec]) -> None:
        """Apply a new watch list without losing events on unchanged roots."""

    def stats(self) -> dict[str, Any]: ...


__all__ = ["EmitBatch", "RawEvent", "Reporter", "Source"]
