"""File sources, and the one place that decides which one this platform gets."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from agent.config import Config, WatchSpec
from agent.health import CapReporter, Reporter
from agent.sources.base import EmitBatch, RawEvent, Source


def choose_source(wanted: str) -> tuple[str, str]:
    """The source to use and why. On Linux the raw inotify reader is the default: watchdog's
    inotify path loses events on bursts (it drains the kernel queue too slowly) and cannot
    tell user code about an overflow; elsewhere watchdog picks the native API."""
    if wanted != "auto":
        return wanted, "set in config (source)"
    if sys.platform.startswith("linux"):
        try:
            import inotify_simple  # noqa: F401
        except ImportError:
            return "watchdog", "inotify_simple is not installed"
        return "inotify", "Linux: raw inotify reader, lossless on bursts and reports overflow"
    return "watchdog", f"{sys.platform}: watchdog's native observer"


def make_source(
    config: Config,
    emit: EmitBatch,
    report: Reporter,
    caps: CapReporter,
    specs: Sequence[WatchSpec] | None = None,
) -> tuple[Source, str]:
    name, why = choose_source(config.source)
    if name == "inotify":
        from agent.sources.inotify import InotifySource

        return (
            InotifySource(
                specs if specs is not None else config.watch,
                emit,
                report,
                settings=config.inotify,
                marker_name=config.marker_name,
                rescan_max_entries=config.rescan_max_entries,
                root_check_interval=config.root_check_interval,
                caps=caps,
            ),
            why,
        )
    from agent.sources.watch import WatchdogSource

    return (
        WatchdogSource(
            specs if specs is not None else config.watch,
            emit,
            report,
            polling=name == "polling",
            marker_name=config.marker_name,
            root_check_interval=config.root_check_interval,
        ),
        why,
    )


__all__ = ["EmitBatch", "RawEvent", "Source", "choose_source", "make_source"]
