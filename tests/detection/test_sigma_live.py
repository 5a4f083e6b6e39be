"""SigmaHQ's Linux rules, unmodified, in a live agent beside the shipped packs: real commands
(shred, base64 -d, curl -T, a shell history shredded, wget into /tmp) raise the alerts of the
Sigma rules written for them.

Process rules see every process on the machine (other tests, other sessions), so each alert
is judged by the command line or path of this test's own workstation. The commands wait on a
FIFO (or a slow local web server) until the agent has seen them start: a process that ends
within a millisecond can be gone before its arguments are read (the exec-telemetry issue
counts those as losses), and this test is about the rules, not that race."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.detection.conftest import REPO, Workstation, need

SIGMA = REPO.parent / "shared" / "sigma" / "rules" / "linux"

BASE64_DECODE = "e2072cab-8c9a-459b-b63c-40ae79e27031"  # Decode Base64 Encoded Text
CURL_UPLOAD = "00b90cc1-17ec-402c-96ad-3a8117d7a582"  # Suspicious Curl File Upload - Linux
HISTORY_DELETED = "1182f3b3-e716-4efa-99ab-d2685d04360f"  # History File Deletion
FILE_DELETION = "30aed7b6-d2c1-4eaf-9382-b6bc43e50c57"  # File Deletion (rm, shred, unlink)
WGET_TO_TMP = "cf610c15-ed71-46e1-bdf8-2bd1a99de6c4"  # Download ... Via Wget (-O /tmp/)
WGET_FILE_IN_TMP = "35a05c60-9012-49b6-a11f-6bab741c9f74"  # Wget Creating Files in Tmp

pytestmark = [
    pytest.mark.skipif(not SIGMA.is_dir(), reason=f"SigmaHQ's rules are not at {SIGMA}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the kernel's process events)"),
]


class _Slow(http.server.BaseHTTPRequestHandler):
    """Answers every GET after a pause: wget is still running when the agent reads it."""

    def do_GET(self) -> None:
        time.sleep(0.5)
        body = b"payload\n" * 64
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def tmp_drop() -> Iterator[Path]:
    """A directory in the real /tmp (the wget rules name /tmp/), removed afterwards."""
    path = Path(f"/tmp/exfilwatch-sigma-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sigma_ws(tmp_path: Path, tmp_drop: Path) -> Iterator[Workstation]:
    w = Workstation(tmp_path, rules=(SIGMA,), staging=(tmp_drop,))
    try:
        yield w
    finally:
        w.stop()


def _mine(ws: Workstation, rule_id: str, mark: str) -> list[dict[str, Any]]:
    """Alerts of `rule_id` whose command line or path holds `mark` (this test's own)."""
    return [
        a
        for a in ws.alerts(rule_id)
        if mark in (a.get("process", {}).get("command_line") or "")
        or mark in (a.get("file", {}).get("path") or "")
    ]


def _wait_mine(ws: Workstation, rule_id: str, mark: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = ws.wait(
        lambda: _mine(ws, rule_id, mark), f"an alert of {rule_id} about {mark}", 30
    )
    return found[0]


def test_sigmahq_rules_alert_on_the_commands_they_were_written_for(
    sigma_ws: Workstation, server: str, tmp_drop: Path
) -> None:
    ws = sigma_ws
    need("shred", "base64", "curl", "wget")
    loaded = ws.health("rules_loaded")[-1]["exfilwatch"]["health"]
    assert loaded["rules"] > 100, loaded  # the shipped packs and the active SigmaHQ rules
    work = ws.tmp / "work"
    work.mkdir()

    # base64 -d of a file that is a FIFO: it waits for the writer, so it is read alive.
    ws.sh(
        f"mkfifo {work}/enc.b64; (sleep 0.5; echo c2VjcmV0Cg== > {work}/enc.b64) & "
        f"base64 -d {work}/enc.b64 > {work}/dec.txt; wait"
    )
    alert = _wait_mine(ws, BASE64_DECODE, str(work))
    assert alert["process"]["executable"].endswith("/base64")
    assert alert["rule"]["name"] == "Decode Base64 Encoded Text"

    # curl -T uploading (to a file: URL; the rule leaves out only localhost uploads).
    ws.sh(
        f"mkfifo {work}/up.fifo; (sleep 0.5; echo data > {work}/up.fifo) & "
        f"curl -s -T {work}/up.fifo file://{work}/uploaded.bin; wait"
    )
    alert = _wait_mine(ws, CURL_UPLOAD, str(work))
    assert " -T " in alert["process"]["command_line"]

    # A shell history shredded away: History File Deletion and File Deletion.
    history = ws.home / ".bash_history"
    history.write_bytes(os.urandom(8 << 20))  # big enough that shred runs for a while
    ws.sh(f"shred -u {history}")
    alert = _wait_mine(ws, HISTORY_DELETED, str(history))
    assert alert["process"]["executable"].endswith("/shred")
    _wait_mine(ws, FILE_DELETION, str(history))

    # wget -O into /tmp: the process rule, and the file rule on the file it wrote.
    target = tmp_drop / "dl.bin"
    ws.sh(f"wget -q -O {target} {server}/payload")
    _wait_mine(ws, WGET_TO_TMP, str(target))
    alert = _wait_mine(ws, WGET_FILE_IN_TMP, str(target))
    assert alert["file"]["path"] == str(target)
    assert alert["process"]["executable"].endswith("/wget")
