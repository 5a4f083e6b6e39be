"""The one contract every runtime component keeps (sources, pollers, workers, sinks)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Component(Protocol):
    """A part of the running agent. It is given a health reporter (`agent.health.Reporter`)
    at construction and reports every loss, cap or error through it as a health record;
    `stats()` holds counters for the heartbeat only (a counter is not a report).

    The service starts components in the order the builder lists them and stops them in
    reverse; `stop()` is safe to call twice and on a component that never started."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...
