"""Alerts: ECS-shaped records with a stable id, built from a rule and what matched."""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from agent.events import Event, _file_part, format_timestamp, text_and_raw
from agent.health import now_us
from agent.rules.model import SEVERITY, Rule


def alert_id(rule_id: str, *parts: object) -> str:
    """Deterministic: the same rule on the same events gives the same id (live or replayed),
    so a SIEM can drop the duplicates of an at-least-once delivery. The SHA-256 of the rule
    id and each part's text, each part after a 0x1f byte (surrogates as the bytes they
    escape), in one call."""
    data = rule_id.encode()
    if parts:
        data += b"\x1f" + "\x1f".join(map(str, parts)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).hexdigest()[:32]


class _RuleParts(NamedTuple):
    """What every alert of a rule takes from it, worked out once per rule."""

    rule: Rule
    severity: int
    tactics: tuple[str, ...]


# id(rule) -> its parts (holding the rule, so the id stays its own); cleared at the cap, which
# bounds the rules of replaced rule sets kept alive by it
_RULE_PARTS: dict[int, _RuleParts] = {}
_RULE_PARTS_CAP = 8192


def _rule_parts(rule: Rule) -> _RuleParts:
    parts = _RULE_PARTS.get(id(rule))
    if parts is None or parts.rule is not rule:
        if len(_RULE_PARTS) >= _RULE_PARTS_CAP:
            _RULE_PARTS.clear()
        parts = _RULE_PARTS[id(rule)] = _RuleParts(rule, SEVERITY[rule.level], rule.tactics)
    return parts


def build_alert(
    rule: Rule,
    event: Event,
    *,
    correlation: dict[str, Any] | None = None,
    suppressed: int = 0,
    identity: tuple[object, ...] | None = None,
) -> dict[str, Any]:
    """The alert record: what the event holds as `to_dict` gives it (file, user, process,
    host and the exfilwatch fields but `source`), with the rule's, built directly from the
    Event (every dict and list in it new: sinks may change an alert in place)."""
    e = event
    parts = _rule_parts(rule)
    severity = parts.severity
    action = e.action
    ident = identity or (e.hostname, e.timestamp_us, e.sequence, action, e.path)
    ev: dict[str, Any] = {
        "kind": "alert",
        "id": alert_id(rule.id, *ident),
        "category": [e.category],
        "type": ["info"],
        "action": action,
        "severity": severity,
        "risk_score": float(severity),
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
        "trigger": {"sequence": e.sequence, "action": action},
    }
    # The file, as `to_dict` gives it (_file_part: the same text, name and extension).
    path_text, path_raw, directory, name, ext = _file_part(e.path)
    file: dict[str, Any] = {"path": path_text, "name": name, "directory": directory}
    if ext is not None:
        file["extension"] = ext
    if e.file_type is not None:
        file["type"] = e.file_type
    if e.size is not None:
        file["size"] = e.size
    if e.uid is not None:
        file["uid"] = e.uid
    if e.gid is not None:
        file["gid"] = e.gid
    if e.inode is not None:
        file["inode"] = e.inode
    if e.mode is not None:
        file["mode"] = e.mode
    if e.mtime_us is not None:
        file["mtime"] = format_timestamp(e.mtime_us)
    # The exfilwatch fields, in the order alerts have always given them; `raw` in the order
    # `to_dict` fills it.
    raw: dict[str, str] = {}
    if path_raw is not None:
        raw["file.path"] = path_raw
    src = e.src_path
    if src is not None:
        src, r = text_and_raw(src)
        if r is not None:
            raw["exfilwatch.src_path"] = r
    root = e.root
    if root is not None:
        root, r = text_and_raw(root)
        if r is not None:
            raw["exfilwatch.root"] = r
    if e.tags:
        custom["tags"] = list(e.tags)
    if e.sensitivity is not None:
        custom["sensitivity"] = e.sensitivity
    if e.location is not None or e.location_provider is not None or e.location_trusted is not None:
        location: dict[str, Any] = {}
        if e.location is not None:
            location["class"] = e.location
        if e.location_provider is not None:
            location["provider"] = e.location_provider
        if e.location_trusted is not None:
            location["trusted"] = e.location_trusted
        custom["location"] = location
    if e.watchlist is not None or e.watchlist_days is not None:
        custom["watchlist"] = _present(
            ("status", e.watchlist), ("days_to_last_day", e.watchlist_days)
        )
    if (
        e.lineage_origin is not None
        or e.lineage_tags
        or e.lineage_sensitivity is not None
        or e.lineage_via is not None
    ):
        lineage: dict[str, Any] = {}
        if e.lineage_origin is not None:
            text, r = text_and_raw(e.lineage_origin)
            lineage["origin_path"] = text
            if r is not None:
                raw["exfilwatch.lineage.origin_path"] = r
        if e.lineage_tags:
            lineage["origin_tags"] = list(e.lineage_tags)
        if e.lineage_sensitivity is not None:
            lineage["origin_sensitivity"] = e.lineage_sensitivity
        if e.lineage_via is not None:
            lineage["via"] = e.lineage_via
        custom["lineage"] = lineage
    if e.archive_tagged is not None or e.archive_truncated is not None:
        custom["archive"] = _present(
            ("tagged_members", e.archive_tagged), ("truncated", e.archive_truncated)
        )
    if e.disguise:
        custom["disguise"] = list(e.disguise)
    if e.nlink is not None or e.overwrite is not None:
        custom["file"] = _present(("nlink", e.nlink), ("overwrite", e.overwrite))
    if e.dir_deleted is not None or e.dir_deleted_share is not None:
        custom["directory"] = _present(
            ("deleted", e.dir_deleted), ("deleted_share", e.dir_deleted_share)
        )
    if e.history_first_use is not None or e.history_ratio is not None:
        custom["history"] = _present(("first_use", e.history_first_use), ("ratio", e.history_ratio))
    if e.off_hours is not None:
        custom["off_hours"] = e.off_hours
    if root is not None:
        custom["root"] = root
    if src is not None:
        custom["src_path"] = src
    if (
        e.attribution is not None
        or e.attribution_method is not None
        or e.user_login_name is not None
        or e.user_login_id is not None
        or e.masquerade is not None
    ):
        attribution: dict[str, Any] = {}
        if e.attribution is not None:
            attribution["confidence"] = e.attribution
        if e.attribution_method is not None:
            attribution["method"] = e.attribution_method
        if e.user_login_name is not None:
            attribution["login_user"] = e.user_login_name
        if e.user_login_id is not None:
            attribution["login_uid"] = e.user_login_id
        if e.masquerade is not None:
            attribution["masquerade"] = e.masquerade
        custom["attribution"] = attribution
    if e.enrichment_skipped is not None:
        custom["enrichment"] = {"skipped": e.enrichment_skipped}
    if raw:
        custom["raw"] = raw
    if correlation is not None:
        custom["correlation"] = correlation
    if suppressed:
        custom["suppressed_count"] = suppressed
    if rule.overridden_by:
        custom["overridden_by"] = list(rule.overridden_by)
    out: dict[str, Any] = {
        "@timestamp": format_timestamp(e.timestamp_us),
        "event": ev,
        "rule": rule_out,
        "file": file,
        "exfilwatch": custom,
    }
    # Of a rule naming several ways out, the one this event took (an lru_cache lookup).
    techniques = rule.techniques_for(e.location)
    tactics = parts.tactics
    if techniques or tactics:
        threat: dict[str, Any] = {"framework": "MITRE ATT&CK"}
        if techniques:
            threat["technique"] = {"id": list(techniques)}
        if tactics:
            threat["tactic"] = {"name": list(tactics)}
        out["threat"] = threat
    if e.user_name is not None or e.user_id is not None:
        user: dict[str, Any] = {}
        if e.user_name is not None:
            user["name"] = e.user_name
        if e.user_id is not None:
            user["id"] = e.user_id
        out["user"] = user
    process: dict[str, Any] = {}
    if e.process_pid is not None:
        process["pid"] = e.process_pid
    if e.process_name is not None:
        process["name"] = e.process_name
    if e.process_executable is not None:
        process["executable"] = e.process_executable
    if e.process_command_line is not None:
        process["command_line"] = e.process_command_line
    if e.process_working_directory is not None:
        process["working_directory"] = e.process_working_directory
    if e.process_args:
        process["args"] = list(e.process_args)
    if (
        e.process_parent_pid is not None
        or e.process_parent_name is not None
        or e.process_parent_executable is not None
        or e.process_parent_command_line is not None
    ):
        process["parent"] = _present(
            ("pid", e.process_parent_pid),
            ("name", e.process_parent_name),
            ("executable", e.process_parent_executable),
            ("command_line", e.process_parent_command_line),
        )
    if process:
        out["process"] = process
    if e.hostname is not None:
        out["host"] = {"hostname": e.hostname}
    return out


def _present(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pairs if v is not None}


def stamp_created(alert: dict[str, Any], now: int | None = None) -> dict[str, Any]:
    """Set `event.created`, when the alert was made, beside `@timestamp` (the trigger's
    time). Done where alerts leave the engine, which stays free of the wall clock."""
    alert["event"]["created"] = format_timestamp(now_us() if now is None else now)
    return alert
