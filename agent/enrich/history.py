"""Per-user memory of egress: the destinations each user has used before, and a baseline of
their daily egress copies, so "first time this user copied to a USB stick" and "five times
this user's usual" are facts on the event that rules and the risk score can use.

An egress copy is a file landing (closed_write, moved_in) on removable media, a sync folder or
a network share by a known user. For each one the stage sets:

- `exfilwatch.history.first_use`: true when this user had never used this destination
  (location class and provider, e.g. `removable:KINGSTON`) before; false otherwise.
- `exfilwatch.history.ratio`: today's copies so far (this one included) divided by the median
  of the user's daily copies over the previous 30 days on which they copied anything. Absent
  while the user has fewer than MIN_ACTIVE_DAYS such days: no baseline, no ratio (a new user
  is not "far above their usual" on their first day).

Bounded (USERS_CAP users, DESTINATIONS_CAP destinations each, 31 days of counts) and saved
under state_dir with the engine state, so a restart does not make every destination new."""

from __future__ import annotations

import datetime as dt
import statistics
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from msgspec.structs import replace as evolve

from agent.events import Event

EGRESS = frozenset({"removable", "cloud_sync", "network_share"})
LANDED = frozenset({"closed_write", "moved_in"})
DAYS = 30
MIN_ACTIVE_DAYS = 5
USERS_CAP = 10_000
DESTINATIONS_CAP = 256
STATE_VERSION = 1


class _User:
    __slots__ = ("days", "destinations")

    def __init__(self) -> None:
        self.destinations: dict[str, int] = {}  # destination -> first day (ordinal)
        self.days: dict[int, list[int]] = {}  # day (ordinal) -> [copies, bytes]


class UserHistory:
    """An enrichment stage (the consumer's thread); `export_state` may run on another thread
    (the checkpoint), hence the lock."""

    name = "history"

    def __init__(self, on_cap: Callable[..., None] | None = None) -> None:
        self._users: OrderedDict[str, _User] = OrderedDict()
        self._lock = threading.Lock()
        self._on_cap = on_cap  # CapReporter.hit: a cap reached is a cap_reached record
        self.over_cap = 0

    def __call__(self, e: Event, /) -> Event:
        if e.location not in EGRESS or e.action not in LANDED or e.user_name is None:
            return e
        day = dt.datetime.fromtimestamp(e.timestamp_us / 1_000_000).toordinal()
        where = f"{e.location}:{e.location_provider or ''}"
        with self._lock:
            user = self._users.get(e.user_name)
            if user is None:
                if len(self._users) >= USERS_CAP:
                    self._users.popitem(last=False)  # the least recently active user
                    self.over_cap += 1
                    if self._on_cap is not None:
                        self._on_cap("history_users", USERS_CAP)
                user = self._users[e.user_name] = _User()
            else:
                self._users.move_to_end(e.user_name)
            first = where not in user.destinations
            if first:
                if len(user.destinations) < DESTINATIONS_CAP:
                    user.destinations[where] = day
                elif self._on_cap is not None:
                    self._on_cap("history_destinations", DESTINATIONS_CAP, user=e.user_name)
            counts = user.days.setdefault(day, [0, 0])
            counts[0] += 1
            counts[1] += e.size or 0
            for old in [d for d in user.days if d < day - DAYS]:
                del user.days[old]
            past = [c[0] for d, c in user.days.items() if day - DAYS <= d < day and c[0]]
            ratio = None
            if len(past) >= MIN_ACTIVE_DAYS:
                ratio = round(counts[0] / statistics.median(past), 3)
        return evolve(e, history_first_use=first, history_ratio=ratio)

    def export_state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": STATE_VERSION,
                "users": {
                    name: {
                        "destinations": dict(u.destinations),
                        "days": {str(d): list(c) for d, c in u.days.items()},
                    }
                    for name, u in self._users.items()
                },
            }

    def import_state(self, data: Any) -> int:
        """Users restored (malformed entries are skipped)."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return 0
        users = data.get("users")
        if not isinstance(users, dict):
            return 0
        restored = 0
        with self._lock:
            for name, saved in list(users.items())[-USERS_CAP:]:
                if not isinstance(name, str) or not isinstance(saved, dict):
                    continue
                u = _User()
                dests = saved.get("destinations", {})
                days = saved.get("days", {})
                if isinstance(dests, dict):
                    for k, v in list(dests.items())[:DESTINATIONS_CAP]:
                        if isinstance(k, str) and isinstance(v, int):
                            u.destinations[k] = v
                if isinstance(days, dict):
                    for k, v in days.items():
                        if (
                            isinstance(k, str)
                            and k.isdigit()
                            and isinstance(v, list)
                            and len(v) == 2
                            and all(isinstance(x, int) for x in v)
                        ):
                            u.days[int(k)] = [v[0], v[1]]
                self._users[name] = u
                restored += 1
        return restored

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"users": len(self._users), "cap": USERS_CAP, "over_cap": self.over_cap}
