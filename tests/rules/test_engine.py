"""The engine: indexed, pure, bounded; correlations, suppression, exceptions and scope."""

from __future__ import annotations

import csv
from typing import Any

from agent.alerts import stamp_created
from agent.events import Event, event_from_fields, format_timestamp
from agent.rules.compiler import RuleSet, load_text
from agent.rules.engine import Caps, Engine
from agent.rules.testing import TEST_EPOCH_US, flatten
from tests.conftest import ECS_FIELDS

T0 = TEST_EPOCH_US
S = 1_000_000


def ruleset(text: str) -> RuleSet:
    rs, problems = load_text(text, T0, "t.yaml")
    assert rs is not None, [str(p) for p in problems]
    return rs


def ev(t: float, **fields: Any) -> Event:
    values = {
        "host.hostname": "ws1",
        "user.name": "alice",
        **{k.replace("__", "."): v for k, v in fields.items()},
    }
    return event_from_fields(values, T0 + int(t * S))


DELETE = """\
id: del
title: tagged delete
level: low
tags: [attack.impact]
detection:
  selection: {event.action: deleted, exfilwatch.tags|exists: true}
  condition: selection
"""

MASS = (
    DELETE
    + """\
---
id: mass
title: mass delete
level: high
tags: [attack.t1485]
correlation:
  type: event_count
  rules: [del]
  group-by: [user.name]
  timespan: 1m
  condition: {gte: 3}
"""
)


def test_a_rule_is_only_tried_on_the_actions_it_can_match() -> None:
    engine = Engine(
        ruleset(
            DELETE
            + """\
---
id: any-tagged
title: anything tagged
level: low
tags: [attack.collection]
detection:
  selection: {exfilwatch.tags|exists: true}
  condition: selection
"""
        )
    )
    assert [r.id for r in engine._by_action["deleted"]] == ["del", "any-tagged"]
    assert [r.id for r in engine._any] == ["any-tagged"]
    assert "created" not in engine._by_action


def test_a_correlation_alert_carries_count_files_bytes_times_and_a_bounded_sample() -> None:
    engine = Engine(ruleset(MASS), Caps(sample_paths=2))
    alerts = []
    for i in range(3):
        alerts += engine.process(
            ev(
                i * 10,
                event__action="deleted",
                file__path=f"/r/f{i}",
                exfilwatch__tags=["t"],
                file__size=100,
            )
        )
    assert len(alerts) == 1
    flat = flatten(alerts[0])
    assert flat["rule.id"] == "mass"
    assert flat["event.kind"] == "alert"
    assert flat["exfilwatch.correlation.count"] == 3
    assert flat["exfilwatch.correlation.distinct_files"] == 3
    assert flat["exfilwatch.correlation.sample_paths"] == ["/r/f0", "/r/f1"]
    assert flat["exfilwatch.correlation.first"] == "2026-01-01T00:00:00.000000Z"
    assert flat["exfilwatch.correlation.last"] == "2026-01-01T00:00:20.000000Z"
    assert flat["exfilwatch.correlation.group.user.name"] == "alice"
    assert flat["threat.technique.id"] == ["T1485"]
    assert flat["user.name"] == "alice"


def test_events_outside_the_timespan_do_not_count() -> None:
    engine = Engine(ruleset(MASS))
    alerts = []
    for t in (0, 40, 80, 120):  # never three inside one minute
        alerts += engine.process(
            ev(t, event__action="deleted", file__path=f"/r/{t}", exfilwatch__tags=["t"])
        )
    assert alerts == []


def test_the_same_events_give_the_same_alerts_with_the_same_ids() -> None:
    events = [
        ev(
            i,
            event__action="deleted",
            file__path=f"/r/{i}",
            exfilwatch__tags=["t"],
            event__sequence=i,
        )
        for i in range(9)
    ]
    one = [a for e in events for a in Engine(ruleset(MASS)).process(e)]
    engine_a, engine_b = Engine(ruleset(MASS)), Engine(ruleset(MASS))
    a = [x for e in events for x in engine_a.process(e)]
    b = [x for e in events for x in engine_b.process(e)]
    assert a == b and len(a) == 3
    assert len({x["event"]["id"] for x in a}) == 3
    assert one == []  # a fresh engine per event never correlates: state is per engine


def test_group_state_is_capped_and_the_cap_is_reported() -> None:
    hits: list[tuple[str, int]] = []
    engine = Engine(ruleset(MASS), Caps(max_groups=100), on_cap=lambda n, c, d: hits.append((n, c)))
    for i in range(250):
        engine.process(
            ev(
                i / 100,
                event__action="deleted",
                file__path="/r/x",
                exfilwatch__tags=["t"],
                user__name=f"u{i}",
            )
        )
    assert engine.stats()["groups"] == 100
    assert hits and hits[0] == ("correlation_groups", 100)


def test_events_kept_per_group_are_capped_and_reported() -> None:
    text = MASS.replace("{gte: 3}", "{gte: 1000}")
    hits: list[str] = []
    engine = Engine(ruleset(text), Caps(max_events=50), on_cap=lambda n, c, d: hits.append(n))
    for i in range(200):
        engine.process(
            ev(i / 1000, event__action="deleted", file__path="/r/x", exfilwatch__tags=["t"])
        )
    window = next(iter(engine._windows["mass"].values()))
    assert len(window.items) == 50
    assert "correlation_events" in hits


SUPPRESSED = DELETE.replace(
    "condition: selection", "condition: selection\nsuppress: {by: [user.name], for: 10m}"
)


def test_suppression_drops_repeats_and_the_next_alert_says_how_many() -> None:
    engine = Engine(ruleset(SUPPRESSED))
    out = []
    for t in (0, 60, 120, 180, 700):
        out += engine.process(
            ev(t, event__action="deleted", file__path="/r/a", exfilwatch__tags=["t"])
        )
    assert len(out) == 2
    assert "suppressed_count" not in out[0]["exfilwatch"]
    assert out[1]["exfilwatch"]["suppressed_count"] == 3
    other = engine.process(
        ev(
            200,
            event__action="deleted",
            file__path="/r/a",
            exfilwatch__tags=["t"],
            user__name="bob",
        )
    )
    assert len(other) == 1  # suppression is per key


def test_an_exception_silences_its_match_until_it_expires() -> None:
    text = (
        DELETE
        + """\
exceptions:
  - match: {user.name: backup-bot}
    reason: nightly pruning
    owner: it@example.com
    expires: 2026-01-02
"""
    )
    engine = Engine(ruleset(text))
    bot = {
        "event__action": "deleted",
        "file__path": "/r/a",
        "exfilwatch__tags": ["t"],
        "user__name": "backup-bot",
    }
    assert engine.process(ev(0, **bot)) == []
    assert engine.process(ev(10, **{**bot, "user__name": "alice"}))
    assert engine.process(ev(2 * 86400, **bot)), "an expired exception no longer applies"


def test_a_scoped_rule_only_sees_users_on_the_watchlist() -> None:
    engine = Engine(ruleset(DELETE.replace("detection:", "scope: [departing]\ndetection:")))
    base = {"event__action": "deleted", "file__path": "/r/a", "exfilwatch__tags": ["t"]}
    assert engine.process(ev(0, **base)) == []
    alerts = engine.process(ev(1, **base, exfilwatch__watchlist__status="departing"))
    assert len(alerts) == 1


def read_then_delete(span: str) -> str:
    """A tagged read, then a tagged delete, by one user within `span`."""
    return (
        DELETE
        + """\
---
id: rd
title: tagged read
level: low
tags: [attack.collection]
detection:
  selection: {event.action: closed_nowrite, exfilwatch.tags|exists: true}
  condition: selection
---
id: read-then-delete
title: read then delete
level: high
tags: [attack.impact]
correlation:
  type: temporal_ordered
  rules: [rd, del]
  group-by: [user.name]
  timespan: SPAN
""".replace("SPAN", span)
    )


def test_temporal_ordered_needs_the_steps_in_order_within_the_span() -> None:
    text = read_then_delete("5m")
    read = {"event__action": "closed_nowrite", "file__path": "/r/a", "exfilwatch__tags": ["t"]}
    delete = {**read, "event__action": "deleted"}
    engine = Engine(ruleset(text))
    assert engine.process(ev(0, **delete)) == []
    assert engine.process(ev(10, **read)) == []
    alerts = engine.process(ev(20, **delete))
    # Base rules of a correlation do not alert by themselves (Sigma v2's `generate: false`).
    assert [a["rule"]["id"] for a in alerts] == ["read-then-delete"]
    late = Engine(ruleset(text))
    late.process(ev(0, **read))
    assert late.process(ev(400, **delete)) == []


def test_state_of_unchanged_correlations_survives_a_swap() -> None:
    old = Engine(ruleset(MASS))
    for i in range(2):
        old.process(ev(i, event__action="deleted", file__path=f"/r/{i}", exfilwatch__tags=["t"]))
    new = Engine(ruleset(MASS + "\n---\nlist: unrelated\nitems: [x]\n"))
    assert new.adopt(old) == 1
    alerts = new.process(ev(3, event__action="deleted", file__path="/r/3", exfilwatch__tags=["t"]))
    assert [a["rule"]["id"] for a in alerts] == ["mass"]
    changed = Engine(ruleset(MASS.replace("timespan: 1m", "timespan: 2m")))
    assert changed.adopt(old) == 0


def test_alert_fields_are_ecs_or_in_our_namespace() -> None:
    if not ECS_FIELDS.exists():
        return
    with ECS_FIELDS.open() as fh:
        ecs = {row["Field"] for row in csv.DictReader(fh)}
    engine = Engine(ruleset(MASS))
    alerts = []
    for i in range(3):
        alerts += engine.process(
            ev(
                i,
                event__action="deleted",
                file__path=f"/r/{i}",
                exfilwatch__tags=["t"],
                process__name="rm",
            )
        )
    for alert in alerts:
        for name in flatten(alert):
            assert name.startswith("exfilwatch.") or name in ecs, name


def test_a_repeated_first_step_restarts_the_sequence_from_the_newer_one() -> None:
    text = read_then_delete("30m")
    read = {"event__action": "closed_nowrite", "file__path": "/r/a", "exfilwatch__tags": ["t"]}
    delete = {**read, "event__action": "deleted"}
    engine = Engine(ruleset(text))
    engine.process(ev(0, **read))
    engine.process(ev(29 * 60, **read))
    alerts = engine.process(ev(31 * 60, **delete))
    assert [a["rule"]["id"] for a in alerts] == ["read-then-delete"]
    # A later step alone leaves nothing behind.
    lone = Engine(ruleset(text))
    lone.process(ev(0, **delete))
    assert lone.stats()["groups"] == 0


def test_memory_held_by_all_windows_is_bounded_and_reported() -> None:
    hits: list[str] = []
    text = MASS.replace("{gte: 3}", "{gte: 100000}")
    engine = Engine(
        ruleset(text), Caps(max_total_events=500), on_cap=lambda n, c, d: hits.append(n)
    )
    for i in range(2000):
        engine.process(
            ev(
                i / 100,
                event__action="deleted",
                file__path=f"/r/{i}",
                exfilwatch__tags=["t"],
                user__name=f"u{i % 50}",
            )
        )
    assert engine._items <= 500
    held = sum(len(w.items) for w in engine._windows["mass"].values())
    assert held == engine._items
    assert "correlation_memory" in hits


def test_an_alert_says_when_it_was_made_and_how_sure_the_agent_is_of_who_did_it() -> None:
    engine = Engine(ruleset(DELETE))
    (alert,) = engine.process(
        ev(
            0,
            event__action="deleted",
            file__path="/r/top.v",
            exfilwatch__tags=["t"],
            exfilwatch__attribution__confidence="inferred",
            exfilwatch__attribution__method="cmdline",
        )
    )
    assert "created" not in alert["event"]  # the engine has no wall clock
    made = stamp_created(alert, T0 + 90 * S)
    assert made["event"]["created"] == format_timestamp(T0 + 90 * S)
    assert made["event"]["created"] > made["@timestamp"]
    assert made["exfilwatch"]["attribution"] == {"confidence": "inferred", "method": "cmdline"}


def test_a_rule_is_only_tried_where_its_location_can_match() -> None:
    engine = Engine(
        ruleset(
            """\
id: usb
title: written to removable media
level: low
tags: [attack.exfiltration]
detection:
  selection: {event.action: closed_write, exfilwatch.location.class: [Removable, cloud_sync]}
  condition: selection
---
id: anywhere
title: written anywhere
level: low
tags: [attack.collection]
detection:
  selection: {event.action: closed_write}
  condition: selection
"""
        )
    )
    usb = engine.process(
        ev(
            0,
            event__action="closed_write",
            file__path="/media/u/a",
            **{"exfilwatch__location__class": "removable"},
        )
    )
    assert sorted(a["rule"]["id"] for a in usb) == ["anywhere", "usb"]
    tagged = engine.process(
        ev(
            1,
            event__action="closed_write",
            file__path="/srv/rnd/a",
            **{"exfilwatch__location__class": "tagged"},
        )
    )
    assert [a["rule"]["id"] for a in tagged] == ["anywhere"]
    nowhere = engine.process(ev(2, event__action="closed_write", file__path="/x/a"))
    assert [a["rule"]["id"] for a in nowhere] == ["anywhere"]
    # The matcher ignores case; so does the index.
    shouting = engine.process(
        ev(
            3,
            event__action="closed_write",
            file__path="/media/u/b",
            **{"exfilwatch__location__class": "REMOVABLE"},
        )
    )
    assert sorted(a["rule"]["id"] for a in shouting) == ["anywhere", "usb"]
    assert [r.id for r in engine._by_place[("closed_write", "tagged")].rules] == ["anywhere"]
