"""Delivery bench: alerts through the durable outbox and a file sink against plain appends of
the same JSON lines (measured in the same run), and the lag after a collector outage.

    python bench/delivery.py                    # 20,000 alerts, a 60 s outage
    python bench/delivery.py --outage 600       # the issue's 10-minute outage
    python bench/delivery.py --json out.json

Part 1 (throughput): N alerts of about 2 KB, written in batches as the pipeline writes them.
  - append:        os.write of each batch to a file (no fsync) - the floor
  - append+fsync:  the same with fdatasync after each batch - what "durable" costs anyway
  - outbox(full):  Router + Outbox(sync=full) + FileSink(fsync per batch), until every alert
                   is acknowledged and gone from the outbox
  - outbox(normal): the same with the outbox fsyncing only at checkpoints
Ratios are alerts/s against the two baselines.

Part 2 (outage): an HTTP collector (in-process, http.server) refuses everything (503) for
--outage seconds while alerts keep coming at --rate per second, then answers 200: the time to
drain, the outbox's size on disk at the end of the outage, and the agent's RSS growth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common import MB, emit, machine, print_header, ratio, rss_bytes, table

from agent.events import dumps
from agent.sinks import FileSink, Router
from agent.sinks.http import HttpSink
from agent.sinks.outbox import Outbox

ALERT = frozenset({"alert"})


def alert_lines(n: int) -> list[str]:
    """Alert-shaped lines of about 2 KB (a correlation with a sample of paths)."""
    out = []
    for i in range(n):
        out.append(
            dumps(
                {
                    "@timestamp": "2026-11-29T12:00:00.000000Z",
                    "event": {"kind": "alert", "id": f"{i:064x}", "severity": 73},
                    "rule": {"id": "exfil-usb-bulk-copy", "name": "Bulk copy to removable media"},
                    "user": {"name": "alice", "id": "1000"},
                    "process": {"name": "cp", "pid": 4242, "command_line": "cp -r src /media"},
                    "file": {"path": f"/srv/rnd/chip/rtl/block{i}/top.v"},
                    "exfilwatch": {
                        "correlation": {
                            "count": 120,
                            "sample": [f"/srv/rnd/chip/rtl/b{i}/f{j}.v" for j in range(40)],
                        }
                    },
                }
            )
        )
    return out


def batches(lines: list[str], size: int) -> list[list[str]]:
    return [lines[i : i + size] for i in range(0, len(lines), size)]


def plain(path: str, parts: list[list[str]], sync: bool) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    began = time.perf_counter()
    for part in parts:
        os.write(fd, ("\n".join(part) + "\n").encode("ascii"))
        if sync:
            os.fdatasync(fd)
    elapsed = time.perf_counter() - began
    os.close(fd)
    return elapsed


def through_outbox(work: str, parts: list[list[str]], sync: str) -> float:
    out = os.path.join(work, f"sink-{sync}", "alerts.jsonl")
    os.makedirs(os.path.dirname(out), mode=0o700)
    router = Router(
        [(FileSink(out), ALERT)],
        outbox=Outbox(os.path.join(work, f"outbox-{sync}"), sync=sync),
        threaded=True,
    )
    router.start()
    began = time.perf_counter()
    for part in parts:
        router.write("alert", part, [73] * len(part))
    while router.outbox.backlog():
        time.sleep(0.001)
    elapsed = time.perf_counter() - began
    router.close()
    return elapsed


class Collector:
    """An HTTP endpoint that answers 503 while down and 200 while up, counting records."""

    def __init__(self) -> None:
        self.up = False
        self.records = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 200 if collector.up else 503
                if collector.up:
                    collector.records += body.count(b'"kind":"alert"')
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/ingest"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def outage(work: str, seconds: float, rate: float) -> dict[str, Any]:
    collector = Collector()
    db = os.path.join(work, "outage-outbox")
    router = Router(
        [(HttpSink(collector.url, "json", timeout=5.0), ALERT)],
        outbox=Outbox(db),
        threaded=True,
        retry_max=30.0,
    )
    router.start()
    rss_before = rss_bytes()
    pool = alert_lines(1000)
    sent = 0
    began = time.monotonic()
    try:
        while time.monotonic() - began < seconds:
            due = int((time.monotonic() - began) * rate)
            while sent < due:
                router.write("alert", [pool[sent % len(pool)]], [73])
                sent += 1
            time.sleep(0.01)
        disk = sum(os.path.getsize(os.path.join(db, n)) for n in os.listdir(db))
        rss_growth = rss_bytes() - rss_before
        backlog = router.outbox.backlog()
        collector.up = True
        up_at = time.monotonic()
        while collector.records < sent:
            if time.monotonic() - up_at > 120 + seconds:
                break
            time.sleep(0.01)
        drain = time.monotonic() - up_at
    finally:
        router.close()
        collector.stop()
    return {
        "outage_s": seconds,
        "rate_per_s": rate,
        "alerts": sent,
        "backlog_at_end": backlog,
        "outbox_disk_mb": round(disk / MB, 2),
        "rss_growth_mb": round(rss_growth / MB, 2),
        "time_to_drain_s": round(drain, 2),
        "delivered": collector.records,
        "note": "includes the wait for the backoff to end (at most retry_max, 30 s)",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--alerts", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=100, help="alerts per write (a pipeline batch)")
    p.add_argument("--outage", type=float, default=60.0, help="seconds the collector is down")
    p.add_argument("--rate", type=float, default=20.0, help="alerts per second during it")
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir in /var/tmp)")
    p.add_argument("--json", nargs="?", const="-", default=None)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="exfilwatch-delivery-", dir=args.dir or "/var/tmp")
    try:
        lines = alert_lines(args.alerts)
        parts = batches(lines, args.batch)
        size = sum(len(x) + 1 for x in lines)
        t_plain = plain(os.path.join(work, "plain.jsonl"), parts, sync=False)
        t_sync = plain(os.path.join(work, "plain-sync.jsonl"), parts, sync=True)
        t_full = through_outbox(work, parts, "full")
        t_normal = through_outbox(work, parts, "normal")
        rate = {
            k: args.alerts / v
            for k, v in {
                "append": t_plain,
                "append+fsync": t_sync,
                "outbox(full)": t_full,
                "outbox(normal)": t_normal,
            }.items()
        }
        lag = outage(work, args.outage, args.rate) if args.outage > 0 else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": machine(),
        "alerts": args.alerts,
        "batch": args.batch,
        "bytes_per_alert": round(size / args.alerts),
        "alerts_per_s": {k: round(v) for k, v in rate.items()},
        "ratio_vs_append": {k: ratio(v, rate["append"], 3) for k, v in rate.items()},
        "ratio_vs_append_fsync": {k: ratio(v, rate["append+fsync"], 3) for k, v in rate.items()},
        "outage": lag,
    }

    def report() -> None:
        print_header("delivery", result["machine"], sys.executable, f"{args.alerts} alerts")
        print(
            table(
                ["path", "alerts/s", "vs append", "vs append+fsync"],
                [
                    [k, round(v), result["ratio_vs_append"][k], result["ratio_vs_append_fsync"][k]]
                    for k, v in rate.items()
                ],
            )
        )
        if lag:
            print("\noutage:")
            print(table(["measure", "value"], [[k, v] for k, v in lag.items()]))

    emit(result, args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
