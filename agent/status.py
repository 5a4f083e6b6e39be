"""`exfilwatch status`: what the running agent last said about itself.

The agent writes `status.json` in its state_dir (0600, atomically) when it has started, at
every heartbeat, after a config or rules reload, and when it stops: its pid, when it started
and last wrote, the heartbeat's counters, the rule set's sizes and the last reload's outcome.
`status` reads it, checks that the pid is alive and the file fresh, and answers for people
(a table) or tools (`--format json`), with an exit code monitoring can use:

    0  running and healthy
    1  running but degraded (no fresh status, losses, rejected rules, a sink down)
    3  not running (as LSB init scripts' `status`: stopped, never started, or gone)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from agent.state import read_private_json, write_private

STATUS_FILE = "status.json"
MAX_STATUS_BYTES = 1 << 20
EXIT_HEALTHY = 0
EXIT_DEGRADED = 1
EXIT_NOT_RUNNING = 3


def write_status(state_dir: str, data: dict[str, Any]) -> None:
    """Replace the status file (raises OSError: the caller reports it)."""
    text = json.dumps(data, sort_keys=True, default=str, ensure_ascii=True)
    write_private(os.path.join(state_dir, STATUS_FILE), text.encode("ascii"))


def read_status(state_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """The status file's content, or None and why (no file, not a regular file, malformed)."""
    path = os.path.join(state_dir, STATUS_FILE)
    data, why = read_private_json(path, MAX_STATUS_BYTES)
    if why == "missing":
        return None, f"no status file at {path}: the agent has not run with this state_dir"
    return data, f"{path}: {why}" if why else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; another user's
    return True


def assess(
    data: dict[str, Any] | None, why: str | None, now: float | None = None
) -> dict[str, Any]:
    """The verdict on a status file's content: state (running | degraded | stopped | down),
    the exit code, and the problems found."""
    now = time.time() if now is None else now
    if data is None:
        return {"state": "down", "exit": EXIT_NOT_RUNNING, "problems": [why or "no status"]}
    problems: list[str] = []
    pid = data.get("pid")
    if data.get("state") == "stopped":
        reason = data.get("stop_reason") or "stopped"
        return {
            "state": "stopped",
            "exit": EXIT_NOT_RUNNING,
            "problems": [f"stopped ({reason})"],
            "status": data,
        }
    if not _alive(pid):
        return {
            "state": "down",
            "exit": EXIT_NOT_RUNNING,
            "problems": [f"pid {pid} is not running: the agent ended without a clean stop"],
            "status": data,
        }
    updated = data.get("updated")
    interval = data.get("heartbeat_interval_s") or 60
    if isinstance(updated, int | float) and now - updated > 2 * interval + 30:
        problems.append(f"no status for {int(now - updated)} s (heartbeat every {interval} s)")
    stats = data.get("stats") or {}
    pipeline = stats.get("pipeline") or {}
    if pipeline.get("dropped_total"):
        problems.append(f"{pipeline['dropped_total']} events dropped since start")
    inotify = stats.get("inotify") or {}
    if inotify.get("overflows"):
        problems.append(f"{inotify['overflows']} kernel queue overflows since start")
    rules = data.get("rules") or {}
    if rules.get("rejected"):
        problems.append(f"{rules['rejected']} rules rejected (exfilwatch rules validate)")
    for name, sink in (stats.get("sinks") or {}).items():
        if isinstance(sink, dict) and sink.get("up") is False:
            problems.append(f"sink {name} is down ({sink.get('pending', 0)} records waiting)")
    reload = data.get("last_reload") or {}
    if reload.get("ok") is False:
        problems.append(f"last reload rejected ({reload.get('reason')}): previous kept")
    return {
        "state": "degraded" if problems else "running",
        "exit": EXIT_DEGRADED if problems else EXIT_HEALTHY,
        "problems": problems,
        "status": data,
    }


def human(verdict: dict[str, Any], now: float | None = None) -> str:
    """The verdict as a short table for people."""
    now = time.time() if now is None else now
    data = verdict.get("status") or {}
    stats = data.get("stats") or {}
    rows: list[tuple[str, str]] = [("state", verdict["state"])]
    if data:
        rows.append(("pid", str(data.get("pid"))))
        started = data.get("started")
        if isinstance(started, int | float) and verdict["state"] in ("running", "degraded"):
            rows.append(("uptime", _span(now - started)))
        updated = data.get("updated")
        if isinstance(updated, int | float):
            rows.append(("status written", f"{_span(now - updated)} ago"))
        rows.append(("version", str(data.get("version"))))
        rows.append(("config", str(data.get("config"))))
        inotify = stats.get("inotify") or {}
        if "watches" in inotify:
            rows.append(("watches", str(inotify["watches"])))
        if "events_per_s" in stats:
            rows.append(("events/s", str(stats["events_per_s"])))
        rates = stats.get("events_per_s_by_lane") or {}
        for lane, lstats in ((stats.get("pipeline") or {}).get("lanes") or {}).items():
            if isinstance(lstats, dict):
                rows.append(
                    (
                        f"  lane {lane}",
                        f"{rates.get(lane, 0)}/s, processed {lstats.get('processed', 0)}, "
                        f"dropped {lstats.get('dropped_total', 0)}, queued "
                        f"{lstats.get('queued', 0)}",
                    )
                )
        rows.append(("alerts", str(stats.get("alerts", 0))))
        rows.append(("outbox backlog", str((stats.get("outbox") or {}).get("backlog", 0))))
        rules = data.get("rules") or {}
        if rules:
            rows.append(
                (
                    "rules",
                    f"{rules.get('active', 0)} active, {rules.get('inactive', 0)} inactive, "
                    f"{rules.get('rejected', 0)} rejected",
                )
            )
        reload = data.get("last_reload")
        if isinstance(reload, dict):
            outcome = "ok" if reload.get("ok") else f"rejected ({reload.get('reason')})"
            when = reload.get("at")
            ago = f", {_span(now - when)} ago" if isinstance(when, int | float) else ""
            rows.append(("last reload", f"{reload.get('what')}: {outcome}{ago}"))
    for problem in verdict["problems"]:
        rows.append(("problem", problem))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def as_json(verdict: dict[str, Any]) -> str:
    """The verdict as one JSON document (for tools)."""
    return json.dumps(verdict, sort_keys=True, default=str)
