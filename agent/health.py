"""Health records: the agent's own state and every loss or limit, as ECS-shaped records."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.events import format_timestamp

# action -> (event.kind, log.level). Every action a component may report is listed here, so a
# typo fails loudly instead of producing a record no SIEM query looks for.
ACTIONS: dict[str, tuple[str, str]] = {
    "agent_started": ("state", "info"),
    "agent_stopped": ("state", "info"),
    "agent_previous_stop": ("state", "info"),
    "agent_unclean_stop": ("state", "warning"),
    "heartbeat": ("metric", "info"),
    "config_reloaded": ("state", "info"),
    "config_changed": ("state", "warning"),
    "agent_files_changed": ("state", "warning"),
    "config_reload_rejected": ("state", "error"),
    "rules_loaded": ("state", "info"),
    "rules_reloaded": ("state", "info"),
    "rules_reload_rejected": ("state", "error"),
    "rules_rejected": ("state", "error"),
    "kernel_settings_applied": ("state", "info"),
    "kernel_settings_low": ("state", "warning"),
    "source_selected": ("state", "info"),
    "source_ready": ("state", "info"),
    "event_loss": ("metric", "error"),
    "watch_limit_reached": ("state", "error"),
    "watch_permission_denied": ("state", "warning"),
    "watch_path_vanished": ("state", "warning"),
    "watch_root_missing": ("state", "warning"),
    "watch_root_vanished": ("state", "warning"),
    "watch_root_moved": ("state", "warning"),
    "watch_root_restored": ("state", "info"),
    # The root path is now a symlink or not a directory: never followed, nothing watched.
    "watch_root_replaced": ("state", "warning"),
    # The root path now leads to another directory (a mount over it, a swap): re-watched.
    "watch_root_changed": ("state", "warning"),
    "watch_mounted": ("state", "warning"),
    "watch_unmounted": ("state", "warning"),
    "watch_retried": ("state", "info"),
    "watch_path_too_long": ("state", "warning"),
    # Tagged files that already had a second name when first watched.
    "hard_links_found": ("state", "warning"),
    "rescan_completed": ("state", "info"),
    "marker_loaded": ("state", "info"),
    "marker_rejected": ("state", "warning"),
    "marker_removed": ("state", "info"),
    # Someone deleted, broke or weakened a marker whose tags the agent keeps (sticky tags).
    # An insider untagging a tree before copying it is a detection, not agent health: ECS
    # event.kind "alert" puts it in the SIEM's alert queues (which select on event.kind),
    # and log.level "error" in front of whoever watches the agent's own errors. ("event",
    # "warning") would file it with media mounts, under exfilwatch.host, where no one triages.
    "marker_tampered": ("alert", "error"),
    # An admin removed stored marker tags (`exfilwatch markers forget`, then a reload).
    "marker_forgotten": ("state", "warning"),
    "cap_reached": ("metric", "warning"),
    "media_mounted": ("event", "info"),
    "media_unmounted": ("event", "info"),
    "destinations_watched": ("state", "info"),
    "lineage_index_built": ("state", "info"),
    "source_error": ("state", "error"),
    "sink_error": ("state", "error"),
    "enrichment_skipped": ("metric", "warning"),
    "sink_recovered": ("state", "info"),
    # The outbox's disk refused a write (full, read-only): records wait in memory meanwhile.
    "outbox_error": ("state", "error"),
    # The watchlist file was read (entries, active), refused (problems; the last good list
    # stays), and a user's watch window opened or closed.
    "watchlist_loaded": ("state", "info"),
    # Correlation windows and suppression of the previous run, resumed at start.
    "engine_state_restored": ("state", "info"),
    "trusted_activity": ("metric", "info"),
    "watchlist_rejected": ("state", "error"),
    "watchlist_entered": ("state", "warning"),
    "watchlist_left": ("state", "info"),
    "outbox_recovered": ("state", "info"),
    "source_actions": ("state", "info"),
}

Reporter = Callable[[dict[str, Any]], None]

_HOSTNAME = socket.gethostname()


def now_us() -> int:
    return time.time_ns() // 1000


def record(action: str, reason: str | None = None, **data: Any) -> dict[str, Any]:
    """A health record (`event.kind` metric or state) ready for the sinks."""
    kind, level = ACTIONS[action]
    event: dict[str, Any] = {
        "kind": kind,
        "category": ["host"],
        "type": ["info"],
        "action": action,
        "module": "exfilwatch",
        # Host events (media mounted) are events about the machine, not about the agent.
        "dataset": "exfilwatch.host" if kind == "event" else "exfilwatch.health",
    }
    if reason is not None:
        event["reason"] = reason
    return {
        "@timestamp": format_timestamp(now_us()),
        "event": event,
        "log": {"level": level},
        "host": {"hostname": _HOSTNAME},
        "exfilwatch": {"health": data},
    }


class CapReporter:
    """Reports each named cap when it is hit, at most once per interval, with a running count."""

    def __init__(self, report: Reporter, interval: float = 60.0) -> None:
        self._report = report
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self.hits: dict[str, int] = {}

    def hit(self, name: str, cap: int, **data: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self.hits[name] = self.hits.get(name, 0) + 1
            last = self._last.get(name)
            if last is not None and now - last < self._interval:
                return
            self._last[name] = now
            hits = self.hits[name]
        self._report(record("cap_reached", name, cap=cap, hits=hits, **data))
