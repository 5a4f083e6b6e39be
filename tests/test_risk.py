"""Risk on alerts (weights, factors, bands that raise severity) and the off-hours flag."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from agent.alerts import build_alert
from agent.config import check_text
from agent.events import Event
from agent.risk import OffHours, RiskSettings, WorkingHours, score_alert
from agent.rules.model import Rule, Where


def us(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1_000_000)


def event(**kw: object) -> Event:
    base: dict[str, object] = {
        "action": "closed_write",
        "path": "/media/jo/USB/top.v",
        "timestamp_us": us("2026-11-30T14:00:00+00:00"),
        "sequence": 1,
        "source": "test",
    }
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def alert_for(e: Event, level: str = "high") -> dict[str, object]:
    rule = Rule(id="r", title="a copy", description="", level=level, where=Where("r.yaml", 1, 1))
    return build_alert(rule, e)


def test_off_hours_follow_days_hours_and_the_time_zone() -> None:
    ny = OffHours(WorkingHours(timezone="America/New_York"))
    assert ny.off(us("2026-11-30T14:00:00+00:00")) is False, "Monday 09:00 in New York"
    assert ny.off(us("2026-11-30T12:59:00+00:00")) is True, "Monday 07:59 in New York"
    assert ny.off(us("2026-11-30T22:59:00+00:00")) is False, "Monday 17:59 in New York"
    assert ny.off(us("2026-11-30T23:00:00+00:00")) is True, "18:00: the end is not inside"
    assert ny.off(us("2026-11-28T16:00:00+00:00")) is True, "Saturday"
    night = OffHours(WorkingHours(days=("sat",), start=dt.time(22), end=dt.time(6), timezone="UTC"))
    assert night.off(us("2026-11-28T23:30:00+00:00")) is False
    assert night.off(us("2026-11-28T12:00:00+00:00")) is True
    marked = ny(event(timestamp_us=us("2026-11-28T16:00:00+00:00")))
    assert marked.off_hours is True
    assert marked.to_dict()["exfilwatch"]["off_hours"] is True


def test_a_departing_users_off_hours_copy_of_a_critical_file_to_usb_is_raised_and_explained() -> (
    None
):
    e = event(watchlist="departing", location="removable", sensitivity="critical", off_hours=True)
    alert = score_alert(alert_for(e, "medium"), e, RiskSettings())
    risk = alert["exfilwatch"]["risk"]  # type: ignore[index]
    assert risk["score"] == 4 + 3 + 3 + 2
    assert [f["name"] for f in risk["factors"]] == [
        "watchlist.departing",
        "location.removable",
        "sensitivity.critical",
        "off_hours",
    ]
    assert risk["raised"] == 2
    assert alert["exfilwatch"]["level"] == "critical"  # type: ignore[index]
    assert alert["exfilwatch"]["rule_level"] == "medium"  # type: ignore[index]
    assert alert["event"]["severity"] == 99  # type: ignore[index]
    assert alert["event"]["risk_score"] == 100.0  # type: ignore[index]


def test_the_same_copy_by_someone_not_listed_in_working_hours_keeps_its_level() -> None:
    e = event(location="removable", off_hours=False)
    alert = score_alert(alert_for(e, "medium"), e, RiskSettings())
    assert alert["exfilwatch"]["risk"] == {  # type: ignore[index]
        "score": 3,
        "factors": [{"name": "location.removable", "weight": 3}],
        "raised": 0,
    }
    assert alert["exfilwatch"]["level"] == "medium"  # type: ignore[index]
    assert "rule_level" not in alert["exfilwatch"]  # type: ignore[operator]
    assert alert["event"]["risk_score"] == 47 + 15  # type: ignore[index]


def test_weights_and_bands_come_from_the_config_with_located_mistakes(tmp_path: Path) -> None:
    text = """\
watch: []
working_hours: {days: [mon, tue], start: "09:30", end: "17:00", timezone: Europe/Berlin}
risk:
  weights: {watchlist.departing: 6, off_hours: 0, watchlist.red_team: 5}
  bands: [{score: 3, raise: 1}]
"""
    config, problems = check_text(text, str(tmp_path / "a.yaml"))
    assert config is not None, problems
    assert config.working_hours == WorkingHours(
        ("mon", "tue"), dt.time(9, 30), dt.time(17), "Europe/Berlin"
    )
    assert config.risk.weights["watchlist.departing"] == 6
    assert config.risk.bands == ((3, 1),)
    e = event(watchlist="red_team", off_hours=True)
    risk = score_alert(alert_for(e), e, config.risk)["exfilwatch"]["risk"]  # type: ignore[index]
    assert risk["factors"] == [{"name": "watchlist.red_team", "weight": 5}], "off_hours is 0"

    bad = """\
watch: []
working_hours: {days: [mon, funday], start: "9am", timezone: Mars/Olympus}
risk:
  weights: {departng: 4, off_hours: 99}
  bands: [{score: 3}]
"""
    _, problems = check_text(bad, str(tmp_path / "b.yaml"))
    got = [f"{p.line}:{p.col} {p.code} {p.message}" for p in problems]
    for want in (
        "2:23 CFG_VALUE unknown day 'funday'",
        "2:45 CFG_VALUE working_hours.start must be a time",
        "2:62 CFG_VALUE unknown time zone 'Mars/Olympus'",
        "4:13 CFG_VALUE unknown risk factor 'departng'",
        "4:37 CFG_VALUE risk.weights.off_hours must be -10 to 10",
        "5:11 CFG_REQUIRED a risk band needs 'score' and 'raise'",
    ):
        assert any(g.startswith(want) for g in got), f"{want!r} not in {got}"
