"""Alert records (agent/alerts.py): `build_alert` builds them straight from the Event; the
record must be exactly the one built from `to_dict` (same keys in the same order, same
values and types), for any event."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.alerts import alert_id, build_alert
from agent.events import Event, format_timestamp, to_dict
from agent.rules.model import SEVERITY, Rule, Where


def reference_alert(
    rule: Rule,
    event: Event,
    *,
    correlation: dict[str, Any] | None = None,
    suppressed: int = 0,
    identity: tuple[object, ...] | None = None,
) -> dict[str, Any]:
    """The alert as it was built from `to_dict` (the record's contract)."""
    source = to_dict(event)
    ident = identity or (
        event.hostname,
        event.timestamp_us,
        event.sequence,
        event.action,
        event.path,
    )
    ev: dict[str, Any] = {
        "kind": "alert",
        "id": reference_id(rule.id, *ident),
        "category": source["event"]["category"],
        "type": ["info"],
        "action": event.action,
        "severity": SEVERITY[rule.level],
        "risk_score": float(SEVERITY[rule.level]),
        "reason": rule.title,
        "module": "exfilwatch",
        "dataset": "exfilwatch.alert",
    }
    rule_out: dict[str, Any] = {"id": rule.id, "name": rule.title, "ruleset": rule.where.file}
    if rule.description:
        rule_out["description"] = rule.description
    if rule.author:
        rule_out["author"] = [rule.author]
    if rule.references:
        rule_out["reference"] = rule.references[0]
    custom: dict[str, Any] = {
        "level": rule.level,
        "rule_tags": list(rule.tags),
        "trigger": {"sequence": event.sequence, "action": event.action},
    }
    for key in (
        "tags",
        "sensitivity",
        "location",
        "watchlist",
        "lineage",
        "archive",
        "disguise",
        "file",
        "directory",
        "history",
        "off_hours",
        "root",
        "src_path",
        "attribution",
        "enrichment",
    ):
        if key in source["exfilwatch"]:
            custom[key] = source["exfilwatch"][key]
    if "raw" in source["exfilwatch"]:
        custom["raw"] = source["exfilwatch"]["raw"]
    if correlation is not None:
        custom["correlation"] = correlation
    if suppressed:
        custom["suppressed_count"] = suppressed
    if rule.overridden_by:
        custom["overridden_by"] = list(rule.overridden_by)
    out: dict[str, Any] = {
        "@timestamp": format_timestamp(event.timestamp_us),
        "event": ev,
        "rule": rule_out,
        "file": source["file"],
        "exfilwatch": custom,
    }
    if rule.techniques or rule.tactics:
        threat: dict[str, Any] = {"framework": "MITRE ATT&CK"}
        if rule.techniques:
            threat["technique"] = {"id": list(rule.techniques)}
        if rule.tactics:
            threat["tactic"] = {"name": list(rule.tactics)}
        out["threat"] = threat
    for key in ("user", "process", "host"):
        if key in source:
            out[key] = source[key]
    return out


def reference_id(rule_id: str, *parts: object) -> str:
    h = hashlib.sha256(rule_id.encode())
    for part in parts:
        h.update(b"\x1f")
        h.update(str(part).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def same(a: Any, b: Any) -> None:
    """Equal, with the same types (a list is not a tuple) and keys in the same order."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    else:
        assert a == b


# Paths as a file system gives them: any bytes but NUL, decoded as Python does (surrogates).
paths = st.binary(min_size=1, max_size=12).map(lambda b: os.fsdecode(b.replace(b"\0", b"")) or "/")
texts = st.none() | st.text(max_size=6)
tuples = st.lists(st.text(max_size=5), max_size=3).map(tuple)
ints = st.none() | st.integers(min_value=-(2**40), max_value=2**62)
bools = st.none() | st.booleans()
floats = st.none() | st.floats(allow_nan=False, allow_infinity=False)

events = st.builds(
    Event,
    timestamp_us=st.integers(min_value=0, max_value=4_000_000_000_000_000),
    action=st.sampled_from(["created", "closed_write", "moved", "process_started", "odd"]),
    path=paths,
    category=st.sampled_from(["file", "process"]),
    file_type=texts,
    size=ints,
    uid=texts,
    gid=texts,
    inode=texts,
    mode=texts,
    mtime_us=st.none() | st.integers(min_value=0, max_value=4_000_000_000_000_000),
    src_path=st.none() | paths,
    tags=tuples,
    sensitivity=texts,
    root=st.none() | paths,
    sequence=st.integers(min_value=0, max_value=2**40),
    hostname=texts,
    user_name=texts,
    user_id=texts,
    process_pid=ints,
    process_name=texts,
    process_executable=texts,
    process_command_line=texts,
    process_parent_name=texts,
    location=texts,
    location_provider=texts,
    watchlist=texts,
    watchlist_days=ints,
    off_hours=bools,
    history_first_use=bools,
    history_ratio=floats,
    lineage_origin=st.none() | paths,
    lineage_tags=tuples,
    archive_tagged=ints,
    disguise=tuples,
    process_parent_pid=ints,
    process_working_directory=texts,
    user_login_name=texts,
    user_login_id=texts,
    attribution=texts,
    attribution_method=texts,
    masquerade=texts,
    enrichment_skipped=texts,
    nlink=ints,
    archive_truncated=bools,
    process_args=tuples,
    process_parent_executable=texts,
    process_parent_command_line=texts,
    location_trusted=bools,
    lineage_sensitivity=texts,
    lineage_via=texts,
    overwrite=texts,
    dir_deleted=ints,
    dir_deleted_share=floats,
)

rules = st.builds(
    Rule,
    id=st.text(min_size=1, max_size=8),
    title=st.text(max_size=8),
    description=st.text(max_size=4),
    level=st.sampled_from(sorted(SEVERITY)),
    where=st.builds(Where, file=st.text(max_size=8), line=st.integers(1, 9)),
    tags=st.lists(
        st.sampled_from(["attack.t1048", "attack.exfiltration", "attack.t1052.001", "x", ""]),
        max_size=3,
    ).map(tuple),
    author=st.text(max_size=4),
    references=st.lists(st.text(max_size=4), max_size=2).map(tuple),
    overridden_by=st.lists(st.text(max_size=4), max_size=2).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(
    rule=rules,
    e=events,
    correlation=st.none() | st.just({"type": "event_count", "value": 3.0}),
    suppressed=st.integers(0, 3),
    identity=st.none() | st.tuples(texts, st.tuples(texts, texts), st.integers(), st.integers()),
)
def test_an_alert_is_the_one_built_from_the_events_dict(
    rule: Rule,
    e: Event,
    correlation: dict[str, Any] | None,
    suppressed: int,
    identity: tuple[object, ...] | None,
) -> None:
    kw: dict[str, Any] = {
        "correlation": correlation,
        "suppressed": suppressed,
        "identity": identity,
    }
    try:
        expected = reference_alert(rule, e, **kw)
    except UnicodeEncodeError:  # a surrogate no file system gives in an id part
        return
    got = build_alert(rule, e, **kw)
    same(got, expected)
    assert json.dumps(got) == json.dumps(expected)
    # Nothing shared between two alerts (a sink may change one in place).
    again = build_alert(rule, e, **kw)
    assert again == got
    got["file"]["path"] = got["exfilwatch"]["rule_tags"] = None
    assert again["file"]["path"] is not None and again["exfilwatch"]["rule_tags"] is not None


@given(rule_id=st.text(max_size=5), parts=st.lists(st.text(max_size=5) | st.integers(), max_size=4))
def test_alert_ids_are_the_hash_of_the_rule_and_each_part(
    rule_id: str, parts: list[object]
) -> None:
    try:
        expected = reference_id(rule_id, *parts)
    except UnicodeEncodeError:
        return
    assert alert_id(rule_id, *parts) == expected
