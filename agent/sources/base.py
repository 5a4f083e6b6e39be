"""What every file source hands the pipeline, and the interface a source offers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
    # The location class of the watched place (tagged, removable, staging...): the pipeline
    # routes the event to its lane by it.
    location: str = "tagged"


# Hands a batch to the pipeline; returns the events that found no room (they are counted and
# reported as lost), or None when the receiver does not say.
EmitBatch = Callable[[list[RawEvent]], "list[RawEvent] | None"]

# The lane of each location class. Tagged trees are never shed; when the pipeline must shed,
# staging events go first, then egress (removable media, sync folders, shares).
LANES = ("tagged", "egress", "staging")
LANE_OF: dict[str, str] = {
    "tagged": "tagged",
    "removable": "egress",
    "cloud_sync": "egress",
    "network_share": "egress",
    "staging": "staging",
    "home": "staging",
    "other": "staging",
}
# What can matter in a place that is not a tagged tree: content that lands there (a file
# closed after write, moved or renamed in, found by a scan) and new directories (watched and
# scanned). Everything else is dropped before any stat or object is made.
LANDED_ACTIONS = frozenset({"closed_write", "moved", "moved_in", "rescanned"})


def wanted_outside_tagged(action: str, is_dir: bool, source: str) -> bool:
    """The reader's cheap filter for egress and staging places (sources other than inotify,
    whose kernel mask does most of it, call it per event)."""
    if action in LANDED_ACTIONS:
        return True
    if source in ("watchdog", "polling"):
        # Observers without a close-after-write event (FSEvents, polling) say "created" or
        # "modified" for content that landed.
        return action in ("created", "modified")
    return action == "created" and (is_dir or source in ("scan", "rescan"))


# What the agent needs from the file sources whatever the rules say: directory tracking,
# markers, the lineage index, content landing elsewhere and rescans. The other actions
# (opened, modified, closed_nowrite, attributes_changed) cost a kernel event, a stat and a
# line each, and are asked for only when a rule or an event sink uses them.
CORE_ACTIONS = frozenset(
    {"created", "deleted", "moved", "moved_in", "moved_out", "closed_write", "rescanned"}
)
OPTIONAL_ACTIONS = frozenset({"opened", "modified", "closed_nowrite", "attributes_changed"})


def needed_actions(
    rule_actions: Iterable[frozenset[str] | None], events_written: bool
) -> frozenset[str] | None:
    """The file actions a source must report: None (all) when events are written to a sink
    or a rule may match any action; else the core ones and those the rules name."""
    if events_written:
        return None
    out = set(CORE_ACTIONS)
    for actions in rule_actions:
        if actions is None:
            return None
        out |= actions
    if out >= OPTIONAL_ACTIONS:
        return None
    return frozenset(out)


class Source(Protocol):
    """A producer of raw file events for a set of watch specs."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def update(self, specs: Sequence[WatchSpec]) -> None:
        """Apply a new watch list without losing events on unchanged roots."""

    def rescan(self, since_us: int, reason: str) -> None:
        """Report what changed in the tagged trees since `since_us` (ctime or mtime newer) as
        `rescanned` events, then a `rescan_completed` record with `reason`. Callable from any
        thread; returns at once (the walk runs on the source's own thread)."""

    def set_actions(self, actions: frozenset[str] | None) -> None:
        """Report only these actions (None: all); see `needed_actions`. Callable from any
        thread, before or after `start`; a change applies to the kernel's masks at once."""

    def stats(self) -> dict[str, Any]: ...


__all__ = [
    "CORE_ACTIONS",
    "LANDED_ACTIONS",
    "LANES",
    "LANE_OF",
    "OPTIONAL_ACTIONS",
    "EmitBatch",
    "RawEvent",
    "Reporter",
    "Source",
    "needed_actions",
    "wanted_outside_tagged",
]
