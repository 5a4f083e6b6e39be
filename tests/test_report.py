"""The departure report: one person's alerts from the alert log, as a self-contained HTML page
that a real browser (headless Chromium) renders as expected, and as JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.events import dumps

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = "/media/jo/USB/<script>document.title='pwned'</script>.v"


def alert(day: str, n: int, user: str, **extra: Any) -> str:
    rec: dict[str, Any] = {
        "@timestamp": f"{day}T1{n % 10}:00:00.000000Z",
        "event": {"kind": "alert", "id": f"{day}-{n}", "severity": 73},
        "rule": {"id": "exfil-removable-tagged-copy", "name": "Tagged copy to removable media"},
        "user": {"name": user},
        "file": {"path": f"/media/{user}/USB/f{n}.v"},
        "process": {"name": "cp"},
        "exfilwatch": {
            "level": "high",
            "location": {"class": "removable", "provider": "KINGSTON"},
            "risk": {
                "score": 7,
                "factors": [
                    {"name": "watchlist.departing", "weight": 4},
                    {"name": "location.removable", "weight": 3},
                ],
                "raised": 1,
            },
        },
    }
    rec.update(extra)
    return dumps(rec)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("exfilwatch", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "agent"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, check=False)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "alerts.jsonl"
    lines = [alert("2026-12-01", n, "jo") for n in range(3)]
    lines += [alert("2026-12-03", n, "jo") for n in range(5)]
    lines += [alert("2026-12-02", n, "kim") for n in range(4)]  # someone else
    lines.append(
        alert("2026-12-03", 9, "jo", file={"path": EVIL}, rule={"id": "x", "name": "<b>bold</b>"})
    )
    lines.append('{"event":{"kind":"metric","action":"heartbeat"}}')  # health: skipped
    lines.append(
        dumps(
            {
                "@timestamp": "2026-11-30T09:00:00Z",
                "event": {"kind": "event", "action": "media_mounted"},
                "exfilwatch": {
                    "health": {
                        "mountpoint": "/media/jo/USB",
                        "label": "KINGSTON",
                        "serial": "E0D55EA574D1F4B0",
                        "vendor": "Kingston",
                        "model": "DataTraveler 3.0",
                    }
                },
            }
        )
    )
    lines.append("not json at all")
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "alerts.jsonl.1").write_text(alert("2026-11-30", 1, "jo") + "\n")  # rotated
    return path


def test_the_json_report_has_the_users_alerts_per_day_files_and_devices(log: Path) -> None:
    done = cli("report", "--user", "jo", "--alerts", str(log), "--format", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["alerts"] == 10, "3 + 6 on the log, 1 in the rotated file; none of kim's"
    assert [d["alerts"] for d in data["daily"]] == [1, 3, 0, 6]
    assert data["removable_devices"] == [
        {
            "label": "KINGSTON",
            "serial": "E0D55EA574D1F4B0",
            "model": "Kingston DataTraveler 3.0",
            "alerts": 10,
        }
    ]
    assert {"factor": "watchlist.departing", "alerts": 10} in data["risk_factors"]
    assert data["top_files"][0]["alerts"] >= 1
    since = cli("report", "--user", "jo", "--alerts", str(log), "--format", "json",
                "--since", "2026-12-02")  # fmt: skip
    assert json.loads(since.stdout)["alerts"] == 6


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_html_page_renders_offline_in_chromium_with_the_chart_and_escaped_names(
    log: Path, tmp_path: Path
) -> None:
    page = tmp_path / "jo.html"
    done = cli("report", "--user", "jo", "--alerts", str(log), "--html", str(page))
    assert done.returncode == 0, done.stderr
    assert oct(page.stat().st_mode & 0o777) == oct(0o600)
    text = page.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<script" not in text
    assert CHROMIUM is not None
    rendered = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-extensions",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=2000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    dom = rendered.stdout
    assert "Departure report" in dom, rendered.stderr[-2000:]
    assert '<span id="user">jo</span>' in dom
    assert '<td id="alert-count">10</td>' in dom
    assert dom.count('class="day"') == 4, "one bar per day, the empty day included"
    assert 'data-day="2026-12-03" data-alerts="6"' in dom
    assert "Tagged copy to removable media" in dom and "watchlist.departing (+4)" in dom
    assert "KINGSTON" in dom and "E0D55EA574D1F4B0" in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom, "the name is text"
    assert "&lt;b&gt;bold&lt;/b&gt;" in dom
    assert "<title>exfilwatch departure report: jo</title>" in dom, "no script ran"
    assert "kim" not in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium2'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.exists() and shot.stat().st_size > 10_000, "a page with content, not blank"
