"""The one place structlog is configured: operational logs on stderr."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", json_logs: bool | None = None) -> None:
    """JSON lines on stderr when it is not a terminal (journald, files); colours on a TTY."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer: structlog.types.Processor
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # WriteLogger writes each line with its newline in one call: a log line and an alert
        # printed on the same terminal by another thread never share a line.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
