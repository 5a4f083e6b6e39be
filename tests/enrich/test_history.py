"""Per-user egress memory: first use of a destination, and today's copies against the user's
usual, bounded and carried across a restart."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from agent.enrich.history import MIN_ACTIVE_DAYS, UserHistory
from agent.events import Event
from agent.risk import RiskSettings, factors

DAY_US = 86_400_000_000


def copy(day: int, user: str = "jo", provider: str = "KINGSTON", n: int = 0) -> Event:
    noon = dt.datetime(2026, 11, 1, 12) + dt.timedelta(days=day)
    return Event(
        int(noon.timestamp() * 1_000_000) + n,
        "closed_write",
        f"/media/{user}/USB/f{day}-{n}.v",
        user_name=user,
        location="removable",
        location_provider=provider,
        size=100,
        sequence=n,
    )


def test_the_first_copy_to_a_destination_is_first_use_and_the_next_is_not() -> None:
    h = UserHistory()
    assert h(copy(0)).history_first_use is True
    assert h(copy(0, n=1)).history_first_use is False
    assert h(copy(0, provider="SANDISK", n=2)).history_first_use is True, "another stick"
    assert h(copy(0, user="kim", n=3)).history_first_use is True, "another user"
    local = Event(1, "closed_write", "/srv/rnd/a.v", user_name="jo", location="tagged")
    assert h(local) is local, "not egress: untouched"


def test_the_ratio_needs_five_active_days_and_compares_today_with_their_median() -> None:
    h = UserHistory()
    for day in range(MIN_ACTIVE_DAYS - 1):
        for n in range(2):
            assert h(copy(day, n=n)).history_ratio is None, "no baseline yet"
    for n in range(2):
        h(copy(MIN_ACTIVE_DAYS - 1, n=n))  # the fifth active day: two copies, like the others
    today = MIN_ACTIVE_DAYS + 3
    ratios = [h(copy(today, n=n)).history_ratio for n in range(8)]
    assert ratios == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    e = h(copy(today, n=8))
    names = [name for name, _ in factors(e, RiskSettings().weights)]
    assert "history.above_baseline" in names and "history.first_use" not in names


def test_the_memory_survives_a_restart() -> None:
    h = UserHistory()
    h(copy(0))
    state = json.loads(json.dumps(h.export_state()))
    again = UserHistory()
    assert again.import_state(state) == 1
    assert again(copy(1)).history_first_use is False, "known from before the restart"
    assert again.import_state({"version": 99}) == 0
    assert again.import_state({"version": 1, "users": {"x": {"days": {"y": [1]}}}}) == 1


def test_a_full_memory_drops_the_least_recent_user_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.enrich import history

    monkeypatch.setattr(history, "USERS_CAP", 2)
    hits: list[tuple[str, int]] = []
    h = UserHistory(on_cap=lambda name, cap, **data: hits.append((name, cap)))
    for user in ("a", "b", "c"):
        h(copy(0, user=user))
    assert hits == [("history_users", 2)]
    assert h(copy(1, user="a")).history_first_use is True, "a was forgotten"
