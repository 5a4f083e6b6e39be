"""The departure report: one person's alerts from the alert log(s), as one self-contained HTML
page (inline CSS and SVG, no script, no external asset: it opens offline and can be attached
to a case) or as JSON with the same data.

Everything shown comes from the alert records the agent wrote; every string from them (file
names are chosen by the person being watched) is HTML-escaped, so a file named
`<script>...` is text on the page, never markup."""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

LEVEL_ORDER = ("informational", "low", "medium", "high", "critical")
LEVEL_COLOUR = {
    "critical": "#8b0000",
    "high": "#d62728",
    "medium": "#ff7f0e",
    "low": "#1f77b4",
    "informational": "#7f7f7f",
}
TOP = 15
TIMELINE_MAX = 500


def alert_files(paths: Iterable[str], keep: int = 20) -> list[str]:
    """The given alert logs and their rotated copies (`x.jsonl.1` ... `.keep`), oldest first."""
    out: list[str] = []
    for path in paths:
        for n in range(keep, 0, -1):
            rotated = f"{path}.{n}"
            if os.path.isfile(rotated):
                out.append(rotated)
        if os.path.isfile(path):
            out.append(path)
    return out


def read_alerts(files: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Alert records from JSON-lines files, and the `media_mounted` records beside them (what
    the device was: label, vendor, model, serial); other records and lines that do not parse
    are skipped."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if '"alert"' not in line and '"media_mounted"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict):
                    continue
                if _get(rec, "event", "kind") == "alert" or (
                    _get(rec, "event", "action") == "media_mounted"
                ):
                    yield rec


def _device(media: dict[str, dict[str, Any]], path: str) -> dict[str, Any] | None:
    """The mounted medium a path is on (the longest mount point above it)."""
    best = None
    for mountpoint, info in media.items():
        under = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
        if under and (best is None or len(mountpoint) > len(best[0])):
            best = (mountpoint, info)
    return best[1] if best else None


def _get(rec: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(rec, dict):
            return None
        rec = rec.get(k)
    return rec


def _is_user(rec: dict[str, Any], names: set[str]) -> bool:
    return (
        _get(rec, "user", "name") in names
        or _get(rec, "exfilwatch", "attribution", "login_user") in names
    )


def build(
    records: Iterable[dict[str, Any]],
    user: str,
    *,
    aliases: Iterable[str] = (),
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> dict[str, Any]:
    """The report's data: the user's alerts per day, a timeline, top files, destinations and
    removable devices, and the risk factors that came up."""
    names = {user, *aliases}
    days: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    files: Counter[str] = Counter()
    destinations: Counter[str] = Counter()
    devices: Counter[tuple[str, str, str]] = Counter()
    factors: Counter[str] = Counter()
    timeline: list[dict[str, Any]] = []
    media: dict[str, dict[str, Any]] = {}  # mount point -> the media_mounted record's data
    mine: list[dict[str, Any]] = []  # first every record (a mount may be logged after)
    for rec in records:
        if _get(rec, "event", "action") == "media_mounted":
            info = _get(rec, "exfilwatch", "health")
            if isinstance(info, dict) and isinstance(info.get("mountpoint"), str):
                media[info["mountpoint"]] = info
        elif _is_user(rec, names):
            mine.append(rec)
    total = 0
    for rec in mine:
        stamp = str(rec.get("@timestamp", ""))
        day = stamp[:10]
        try:
            when = dt.date.fromisoformat(day)
        except ValueError:
            continue
        if (since is not None and when < since) or (until is not None and when > until):
            continue
        total += 1
        days[day] += 1
        level = str(_get(rec, "exfilwatch", "level") or "medium")
        levels[level] += 1
        path = _get(rec, "file", "path")
        if isinstance(path, str):
            files[path] += 1
        sample = _get(rec, "exfilwatch", "correlation", "sample")
        if isinstance(sample, list):
            for p in sample:
                if isinstance(p, str) and p != path:
                    files[p] += 1
        location = _get(rec, "exfilwatch", "location") or {}
        cls = location.get("class") if isinstance(location, dict) else None
        provider = location.get("provider") if isinstance(location, dict) else None
        if isinstance(cls, str) and cls != "tagged":
            destinations[f"{cls}:{provider}" if provider else cls] += 1
            if cls == "removable":
                seen = _device(media, path) if isinstance(path, str) else None
                label = str(provider or (seen or {}).get("label") or "(no label)")
                serial = str((seen or {}).get("serial") or "")
                model = " ".join(
                    str(x) for x in ((seen or {}).get("vendor"), (seen or {}).get("model")) if x
                )
                devices[(label, serial, model)] += 1
        risk = _get(rec, "exfilwatch", "risk") or {}
        found = risk.get("factors", []) if isinstance(risk, dict) else []
        names_found = [
            f"{f.get('name')} (+{f.get('weight')})" for f in found if isinstance(f, dict)
        ]
        factors.update(str(f.get("name")) for f in found if isinstance(f, dict))
        if len(timeline) < TIMELINE_MAX:
            timeline.append(
                {
                    "time": stamp,
                    "level": level,
                    "rule": str(_get(rec, "rule", "name") or _get(rec, "rule", "id") or ""),
                    "rule_id": str(_get(rec, "rule", "id") or ""),
                    "path": path if isinstance(path, str) else "",
                    "destination": f"{cls}:{provider}" if cls and provider else (cls or ""),
                    "process": str(_get(rec, "process", "name") or ""),
                    "score": risk.get("score") if isinstance(risk, dict) else None,
                    "factors": names_found,
                    "count": _get(rec, "exfilwatch", "correlation", "count"),
                    "id": str(_get(rec, "event", "id") or ""),
                }
            )
    timeline.sort(key=lambda t: t["time"])
    first = min(days) if days else None
    last = max(days) if days else None
    daily: list[dict[str, Any]] = []
    if first and last:
        d, end = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
        if since is not None:
            d = min(d, since)
        while d <= end:
            daily.append({"day": d.isoformat(), "alerts": days.get(d.isoformat(), 0)})
            d += dt.timedelta(days=1)
    return {
        "user": user,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "alerts": total,
        "by_level": {lv: levels[lv] for lv in LEVEL_ORDER if levels[lv]},
        "daily": daily,
        "timeline": timeline,
        "top_files": [{"path": p, "alerts": n} for p, n in files.most_common(TOP)],
        "top_destinations": [
            {"destination": k, "alerts": n} for k, n in destinations.most_common(TOP)
        ],
        "removable_devices": [
            {"label": label, "serial": serial or None, "model": model or None, "alerts": n}
            for (label, serial, model), n in devices.most_common(TOP)
        ],
        "risk_factors": [{"factor": k, "alerts": n} for k, n in factors.most_common()],
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _e(value: Any) -> str:
    """Escaped text; control characters (a file name can hold them) shown as \\xNN."""
    text = str(value)
    if not text.isprintable():
        text = text.encode("unicode_escape", "replace").decode("ascii")
    return html.escape(text, quote=True)


def _chart(daily: list[dict[str, Any]]) -> str:
    """An inline SVG bar chart of alerts per day (one bar per day, labelled)."""
    if not daily:
        return '<p class="muted">No alerts in this period.</p>'
    width, height, pad = max(320, 24 * len(daily) + 60), 180, 40
    top = max(d["alerts"] for d in daily) or 1
    bar = (width - pad - 10) / len(daily)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
        f'role="img" aria-label="alerts per day" id="daily-chart">',
        f'<line x1="{pad}" y1="{height}" x2="{width - 5}" y2="{height}" stroke="#888"/>',
        f'<text x="4" y="14" font-size="11">{top}</text>',
    ]
    for i, d in enumerate(daily):
        h = (height - 20) * d["alerts"] / top
        x = pad + i * bar
        parts.append(
            f'<rect class="day" data-day="{_e(d["day"])}" data-alerts="{d["alerts"]}" '
            f'x="{x + 2:.1f}" y="{height - h:.1f}" width="{max(bar - 4, 1):.1f}" '
            f'height="{h:.1f}" fill="#d62728"><title>{_e(d["day"])}: {d["alerts"]} alerts'
            "</title></rect>"
        )
        if len(daily) <= 31 or i % 7 == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{height + 14}" font-size="9" '
                f'text-anchor="middle">{_e(d["day"][5:])}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_html(data: dict[str, Any]) -> str:
    period = f"{data['since'] or (data['daily'][0]['day'] if data['daily'] else '-')}"
    period += f" to {data['until'] or (data['daily'][-1]['day'] if data['daily'] else '-')}"
    levels = ", ".join(f"{_e(k)}: {v}" for k, v in data["by_level"].items()) or "none"
    timeline = _table(
        ["Time (UTC)", "Level", "Rule", "Risk", "Factors", "File", "Destination", "Process"],
        (
            (
                _e(t["time"][:19].replace("T", " ")),
                f'<span class="lv" style="background:{LEVEL_COLOUR.get(t["level"], "#777")}">'
                f"{_e(t['level'])}</span>",
                _e(t["rule"]) + (f" ({_e(t['count'])} events)" if t["count"] else ""),
                _e(t["score"] if t["score"] is not None else ""),
                _e(", ".join(t["factors"])),
                f'<span class="path">{_e(t["path"])}</span>',
                _e(t["destination"]),
                _e(t["process"]),
            )
            for t in data["timeline"]
        ),
        "timeline",
    )
    files = _table(
        ["File", "Alerts"],
        ((f'<span class="path">{_e(f["path"])}</span>', f["alerts"]) for f in data["top_files"]),
        "top-files",
    )
    dests = _table(
        ["Destination", "Alerts"],
        ((_e(d["destination"]), d["alerts"]) for d in data["top_destinations"]),
        "top-destinations",
    )
    devices = _table(
        ["Removable device (label)", "Serial", "Vendor and model", "Alerts"],
        (
            (_e(d["label"]), _e(d["serial"] or "-"), _e(d["model"] or "-"), d["alerts"])
            for d in data["removable_devices"]
        ),
        "removable-devices",
    )
    factors = _table(
        ["Risk factor", "Alerts"],
        ((_e(f["factor"]), f["alerts"]) for f in data["risk_factors"]),
        "risk-factors",
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>exfilwatch departure report: {_e(data["user"])}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: 0; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
.muted {{ color: #777; }} table {{ border-collapse: collapse; margin: .5em 0; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }} .path {{ font-family: monospace; word-break: break-all; }}
.lv {{ color: #fff; border-radius: 3px; padding: 0 5px; font-size: .85em; }}
.summary td:first-child {{ color: #555; }}
</style></head><body>
<h1>Departure report: <span id="user">{_e(data["user"])}</span></h1>
<p class="muted">Generated {_e(data["generated"])} by exfilwatch from the alert log.
Period {_e(period)}.</p>
<table class="summary" id="summary">
<tr><td>Alerts</td><td id="alert-count">{data["alerts"]}</td></tr>
<tr><td>By level</td><td>{levels}</td></tr>
</table>
<h2>Alerts per day</h2>
{_chart(data["daily"])}
<h2>Timeline</h2>
{timeline}
<h2>Top files</h2>
{files}
<h2>Destinations</h2>
{dests}
<h2>Removable devices</h2>
{devices}
<h2>Risk factors</h2>
{factors}
</body></html>
"""
