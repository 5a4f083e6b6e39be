"""Alerts: ECS-shaped records with a stable id, built from a rule and what matched."""

from __future__ import annotations

import hashlib
from typing import Any

from agent.events import Event, format_timestamp, to_dict
from agent.health import now_us
from agent.rules.model import SEVERITY, Rule


def alert_id(rule_id: str, *parts: object) -> str:
    """Deterministic: the same rule on the same events gives the same id (live or replayed),
    so a SIEM can drop the duplicates of an at-least-once delivery."""
    h = hashlib.sha256(rule_id.encode())
    for part in parts:
        h.update(b"\x1f")
        h.update(str(part).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def build_alert(
    rule: Rule,
    event: Event,
    *,
    correlation: dict[str, Any] | None = None,
    suppressed: int = 0,
    identity: tuple[object, ...] | None = None,
) -> dict[str, Any]:
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
        "id": alert_id(rule.id, *ident),
        "category": source["event"]["category"],
        "type": ["info"],
        "action": event.action,
        "severity": SEVERITY[rule.level],
        "risk_score": float(SEVERITY[rule.level]),
        "reason": rule.title,
        "module": "exfilwatch",
        "dataset": "exfilwatch.alert",
    }
    rule_out: dict[str, Any] = {
        "id": rule.id,
        "name": rule.title,
        "ruleset": rule.where.file,
    }
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
    techniques = rule.techniques_for(event.location)
    tactics = rule.tactics
    if techniques or tactics:
        threat: dict[str, Any] = {"framework": "MITRE ATT&CK"}
        if techniques:
            threat["technique"] = {"id": list(techniques)}
        if tactics:
            threat["tactic"] = {"name": list(tactics)}
        out["threat"] = threat
    for key in ("user", "process", "host"):
        if key in source:
            out[key] = source[key]
    return out


def stamp_created(alert: dict[str, Any], now: int | None = None) -> dict[str, Any]:
    """Set `event.created`, when the alert was made, beside `@timestamp` (the trigger's
    time). Done where alerts leave the engine, which stays free of the wall clock."""
    alert["event"]["created"] = format_timestamp(now_us() if now is None else now)
    return alert
