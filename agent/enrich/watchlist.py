"""The watchlist stage: events of a listed user carry the list's type and the days to the last
working day, by user name or, failing that, by login user (someone who `su`s or `sudo`s to
another account is still the person on the list)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from msgspec.structs import replace as evolve

from agent.events import Event
from agent.watchlist import Status


class WatchlistStage:
    """An enrichment stage; `set()` swaps in a new active set (from the scheduler's thread)
    between two events of the consumer (one reference assignment)."""

    name = "watchlist"

    def __init__(self) -> None:
        self._active: Mapping[str, Status] = MappingProxyType({})

    def set(self, active: Mapping[str, Status]) -> None:
        self._active = MappingProxyType(dict(active))

    @property
    def active(self) -> Mapping[str, Status]:
        return self._active

    def __call__(self, e: Event, /) -> Event:
        active = self._active
        if not active:
            return e
        status = active.get(e.user_name) if e.user_name is not None else None
        if status is None and e.user_login_name is not None:
            status = active.get(e.user_login_name)
        if status is None:
            return e
        return evolve(e, watchlist=status.type, watchlist_days=status.days_to_last_day)
