"""Risk on every alert: documented, configurable weights for what makes an alert worse (a
departing user, removable media, crown-jewel sensitivity, off hours), a score, the factors
that made it, and bands that raise the severity.

Applied where alerts leave the engine (the live pipeline and `exfilwatch replay` alike): a
pure function of the alert and the event that triggered it, so a replay scores the same.

Off hours: `working_hours` (days, start, end, time zone) decide whether an event happened
outside them; the `OffHours` stage sets `exfilwatch.off_hours` on every event."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from msgspec.structs import replace as evolve

from agent.events import Event
from agent.rules.model import SEVERITY

LEVELS = ("informational", "low", "medium", "high", "critical")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# factor -> weight. `watchlist.<type>` for the user's watchlist type (a custom type counts as
# `watchlist.other`), `location.<class>` for where the file went, `sensitivity.<level>` for
# the file's (or its origin's) sensitivity, `off_hours` outside working hours,
# `history.first_use` a destination the user never used, `history.above_baseline` at least
# ABOVE_BASELINE times the user's usual daily egress copies (enrich/history.py).
DEFAULT_WEIGHTS: Mapping[str, int] = MappingProxyType(
    {
        "watchlist.departing": 4,
        "watchlist.flight_risk": 3,
        "watchlist.elevated_access": 2,
        "watchlist.high_impact": 2,
        "watchlist.contractor": 1,
        "watchlist.other": 2,
        "location.removable": 3,
        "location.cloud_sync": 2,
        "location.network_share": 2,
        "sensitivity.critical": 3,
        "sensitivity.high": 1,
        "off_hours": 2,
        "history.first_use": 2,
        "history.above_baseline": 2,
    }
)
ABOVE_BASELINE = 3.0  # today's egress copies at least this many times the user's usual
# (score at least, levels raised): the highest band reached applies.
DEFAULT_BANDS: tuple[tuple[int, int], ...] = ((5, 1), (9, 2))


@dataclass(frozen=True, slots=True)
class RiskSettings:
    weights: Mapping[str, int] = field(default_factory=lambda: DEFAULT_WEIGHTS)
    bands: tuple[tuple[int, int], ...] = DEFAULT_BANDS


@dataclass(frozen=True, slots=True)
class WorkingHours:
    days: tuple[str, ...] = DAYS[:5]
    start: dt.time = dt.time(8, 0)
    end: dt.time = dt.time(18, 0)
    timezone: str | None = None  # None: the host's local time


def factors(event: Event, weights: Mapping[str, int]) -> list[tuple[str, int]]:
    """The factors present in an event, with their weights (weight 0 or absent: skipped)."""
    found: list[str] = []
    if event.watchlist is not None:
        key = f"watchlist.{event.watchlist}"
        found.append(key if key in weights else "watchlist.other")
    if event.location is not None:
        found.append(f"location.{event.location}")
    if event.sensitivity is not None:
        found.append(f"sensitivity.{event.sensitivity}")
    if event.off_hours:
        found.append("off_hours")
    if event.history_first_use:
        found.append("history.first_use")
    if event.history_ratio is not None and event.history_ratio >= ABOVE_BASELINE:
        found.append("history.above_baseline")
    return [(name, weights[name]) for name in found if weights.get(name)]


def score_alert(alert: dict[str, Any], event: Event, settings: RiskSettings) -> dict[str, Any]:
    """Adds `exfilwatch.risk` {score, factors, raised} to the alert; a band raises
    `event.severity` and `exfilwatch.level` (the rule's own level stays in
    `exfilwatch.rule_level`); `event.risk_score` (ECS, 0-100) is the severity plus 5 per
    point, at most 100."""
    found = factors(event, settings.weights)
    score = sum(w for _, w in found)
    raised = 0
    for at_least, levels in settings.bands:
        if score >= at_least:
            raised = max(raised, levels)
    custom = alert.setdefault("exfilwatch", {})
    level = custom.get("level", "medium")
    if level in LEVELS and raised:
        new = LEVELS[min(LEVELS.index(level) + raised, len(LEVELS) - 1)]
        custom["rule_level"] = level
        custom["level"] = new
        alert["event"]["severity"] = SEVERITY[new]
    severity = alert["event"].get("severity", 0)
    alert["event"]["risk_score"] = float(min(100, severity + 5 * score))
    custom["risk"] = {
        "score": score,
        "factors": [{"name": n, "weight": w} for n, w in found],
        "raised": raised,
    }
    return alert


class OffHours:
    """An enrichment stage: `exfilwatch.off_hours` from the event's time. The answer is cached
    per minute, so the cost per event is one integer division and a dict lookup."""

    name = "off_hours"

    def __init__(self, hours: WorkingHours) -> None:
        self.hours = hours
        self._zone = zoneinfo.ZoneInfo(hours.timezone) if hours.timezone else None
        self._days = frozenset(DAYS.index(d) for d in hours.days)
        self._minute = -1
        self._answer = False

    def off(self, timestamp_us: int) -> bool:
        minute = timestamp_us // 60_000_000
        if minute != self._minute:
            when = dt.datetime.fromtimestamp(minute * 60, tz=self._zone or dt.UTC)
            if self._zone is None:
                when = when.astimezone()  # the host's local time
            hours = self.hours
            t = when.time()
            inside = when.weekday() in self._days and (
                hours.start <= t < hours.end
                if hours.start <= hours.end
                else t >= hours.start or t < hours.end
            )
            self._minute, self._answer = minute, not inside
        return self._answer

    def __call__(self, e: Event, /) -> Event:
        off = self.off(e.timestamp_us)
        return evolve(e, off_hours=off) if off != e.off_hours else e
