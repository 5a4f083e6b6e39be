"""Prometheus metrics: the agent's stats() as a textfile and a loopback HTTP endpoint."""

from __future__ import annotations

import copy
import os
import socket
import stat
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.metrics import FALLBACK_MAX, Metrics, parse_listen

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# The exfilwatch.health object of a real heartbeat (trimmed), plus the keys the agent is
# about to add (alerts, outbox, per-sink delivered/up, max_user_watches, ruleset, version).
STATS: dict[str, Any] = {
    "uptime_s": 4.5,
    "pipeline": {
        "queued": 3,
        "queue_size": 90000,
        "lanes": {
            "tagged": {
                "queued": 2,
                "queue_size": 50000,
                "high_water": 7,
                "dropped_total": 1,
                "processed": 40,
            },
            "egress": {
                "queued": 1,
                "queue_size": 20000,
                "high_water": 0,
                "dropped_total": 0,
                "processed": 5,
            },
        },
        "queue_waits": 0,
        "dropped_total": 1,
        "processed": 45,
        "batches": 9,
    },
    "enrichment": {"queued": 0, "queue_size": 10000, "submitted": 12, "errors": 0},
    "inotify": {
        "source": "inotify",
        "watches": 111,
        "file_watches": 2,
        "roots": {"/srv/rnd": "watching", "/srv/gone": "missing"},
        "overflows": 1,
        "events_read": 500,
        "rescans": 1,
    },
    "sinks": {
        "file:/var/log/exfilwatch/alerts.jsonl": {
            "pending": 4,
            "pending_by_kind": {"alert": 4},
            "errors": 2,
            "dropped": 1,
            "dropped_by_kind": {"event": 1},
            "delivered": 100,
            "up": False,
        },
        "stdout": {"pending": 0, "errors": 0, "dropped": 0, "delivered": 7, "up": True},
    },
    "engine": {"rules": 20, "correlations": 7, "groups": 3, "matched": 11, "alerts": 2},
    "caps_hit": {"correlation_groups": 5},
    "process": {"rss_bytes": 46088192, "cpu_user_s": 0.69, "cpu_system_s": 0.37, "threads": 10},
    "alerts": 6,
    "outbox": {
        "backlog": 4,
        "oldest_age_s": 2.5,
        "bytes": 900,
        "dropped_total": 0,
        "disk_errors": 1,
    },
    "max_user_watches": 8192,
    "ruleset": {"hash": "fbf870cd", "rules": 27},
    "version": "9.9.9",
}


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def textfile_samples(stats: dict[str, Any], tmp_path: Path) -> Samples:
    path = tmp_path / "exfilwatch.prom"
    Metrics(lambda: stats, textfile=str(path)).write_textfile()
    return parse(path.read_text())


def test_the_textfile_holds_every_mapped_stat_as_a_well_named_metric(tmp_path: Path) -> None:
    s = textfile_samples(STATS, tmp_path)
    expected = {
        ("exfilwatch_up", ()): 1,
        ("exfilwatch_uptime_seconds", ()): 4.5,
        ("exfilwatch_events_processed_total", ()): 45,
        ("exfilwatch_events_dropped_total", ()): 1,
        ("exfilwatch_pipeline_queued", ()): 3,
        ("exfilwatch_lane_queued", (("lane", "tagged"),)): 2,
        ("exfilwatch_lane_queue_size", (("lane", "egress"),)): 20000,
        ("exfilwatch_lane_high_water", (("lane", "tagged"),)): 7,
        ("exfilwatch_lane_dropped_total", (("lane", "tagged"),)): 1,
        ("exfilwatch_lane_processed_total", (("lane", "egress"),)): 5,
        ("exfilwatch_inotify_watches", ()): 111,
        ("exfilwatch_inotify_file_watches", ()): 2,
        ("exfilwatch_inotify_overflows_total", ()): 1,
        ("exfilwatch_inotify_max_user_watches", ()): 8192,
        ("exfilwatch_watch_root", (("root", "/srv/gone"), ("state", "missing"))): 1,
        ("exfilwatch_rss_bytes", ()): 46088192,
        ("exfilwatch_threads", ()): 10,
        ("exfilwatch_cpu_seconds_total", (("mode", "user"),)): 0.69,
        ("exfilwatch_cpu_seconds_total", (("mode", "system"),)): 0.37,
        ("exfilwatch_alerts_total", ()): 6,  # stats["alerts"] wins over engine.alerts
        ("exfilwatch_rules", ()): 27,  # ruleset.rules wins over engine.rules
        ("exfilwatch_correlation_rules", ()): 7,
        ("exfilwatch_correlation_groups", ()): 3,
        ("exfilwatch_rule_matches_total", ()): 11,
        ("exfilwatch_outbox_backlog", ()): 4,
        ("exfilwatch_outbox_oldest_age_seconds", ()): 2.5,
        ("exfilwatch_outbox_bytes", ()): 900,
        ("exfilwatch_outbox_dropped_total", ()): 0,
        ("exfilwatch_outbox_disk_errors_total", ()): 1,
        ("exfilwatch_cap_hits_total", (("cap", "correlation_groups"),)): 5,
        ("exfilwatch_build_info", (("version", "9.9.9"), ("ruleset", "fbf870cd"))): 1,
        ("exfilwatch_stats_errors_total", ()): 0,
    }
    for (name, labels), want in expected.items():
        assert value(s, name, **dict(labels)) == pytest.approx(want), name


def test_sinks_are_labelled_by_name_with_their_backlog_errors_drops_deliveries_and_state(
    tmp_path: Path,
) -> None:
    s = textfile_samples(STATS, tmp_path)
    f = "file:/var/log/exfilwatch/alerts.jsonl"
    assert value(s, "exfilwatch_sink_pending", sink=f) == 4
    assert value(s, "exfilwatch_sink_errors_total", sink=f) == 2
    assert value(s, "exfilwatch_sink_dropped_total", sink=f) == 1
    assert value(s, "exfilwatch_sink_delivered_total", sink=f) == 100
    assert value(s, "exfilwatch_sink_up", sink=f) == 0
    assert value(s, "exfilwatch_sink_up", sink="stdout") == 1
    assert value(s, "exfilwatch_sink_pending_by_kind", sink=f, kind="alert") == 4
    assert value(s, "exfilwatch_sink_dropped_by_kind_total", sink=f, kind="event") == 1


def test_other_numeric_stats_appear_as_component_values_and_mapped_ones_do_not(
    tmp_path: Path,
) -> None:
    s = textfile_samples(STATS, tmp_path)
    cv = "exfilwatch_component_value"
    assert value(s, cv, component="enrichment", key="submitted") == 12
    assert value(s, cv, component="pipeline", key="batches") == 9
    assert value(s, cv, component="inotify", key="rescans") == 1
    fallback = {dict(labels)["component"] + "." + dict(labels)["key"] for n, labels in s if n == cv}
    for mapped in ("pipeline.processed", "pipeline.lanes.tagged.queued", "inotify.watches"):
        assert mapped not in fallback
    assert not any(k.startswith(("sinks.", "agent.")) for k in fallback)


def test_keys_the_agent_does_not_report_yet_are_skipped(tmp_path: Path) -> None:
    old = {k: v for k, v in STATS.items() if k not in ("alerts", "outbox", "ruleset", "version")}
    old["sinks"] = {"stdout": {"pending": 0, "errors": 0, "dropped": 0}}
    s = textfile_samples(old, tmp_path)
    assert not any(n.startswith("exfilwatch_outbox") for n in names(s))
    assert "exfilwatch_sink_up" not in names(s)
    assert value(s, "exfilwatch_alerts_total") == 2  # engine.alerts
    assert value(s, "exfilwatch_rules") == 20  # engine.rules
    assert value(s, "exfilwatch_build_info", version=__version__, ruleset="") == 1


def test_a_failing_stats_call_still_scrapes_with_up_0(tmp_path: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("lock poisoned")

    path = tmp_path / "m.prom"
    metrics = Metrics(broken, textfile=str(path))
    metrics.write_textfile()
    metrics.write_textfile()
    s = parse(path.read_text())
    assert value(s, "exfilwatch_up") == 0
    assert value(s, "exfilwatch_stats_errors_total") == 2
    assert names(s) == {"exfilwatch_up", "exfilwatch_stats_errors_total"}
    assert metrics.stats()["stats_errors"] == 2


def test_stats_of_the_wrong_shape_are_a_failed_scrape_not_a_crash(tmp_path: Path) -> None:
    s = textfile_samples([1, 2], tmp_path)  # type: ignore[arg-type]
    assert value(s, "exfilwatch_up") == 0
    odd = {"uptime_s": "soon", "pipeline": {"lanes": [1]}, "sinks": {"x": 3}, "process": None}
    s = textfile_samples(odd, tmp_path)
    assert value(s, "exfilwatch_up") == 1
    assert "exfilwatch_uptime_seconds" not in names(s)


def test_a_component_whose_counters_failed_is_named(tmp_path: Path) -> None:
    stats = {**STATS, "mounts": {"error": "PermissionError"}}
    s = textfile_samples(stats, tmp_path)
    assert (
        value(s, "exfilwatch_component_stats_failed", component="mounts", error="PermissionError")
        == 1
    )


def test_the_fallback_is_capped_and_says_how_much_it_left_out(tmp_path: Path) -> None:
    stats = {"flood": {f"k{i}": i for i in range(FALLBACK_MAX + 5)}}
    s = textfile_samples(stats, tmp_path)
    assert sum(1 for n, _ in s if n == "exfilwatch_component_value") == FALLBACK_MAX
    assert value(s, "exfilwatch_component_values_omitted") == 5


@pytest.mark.parametrize(
    "name",
    [
        'file:/srv/out/"quoted".jsonl',
        "file:/srv/out/new\nline.jsonl",
        "file:/srv/out/back\\slash\\n.jsonl",
        "file:/srv/out/} fake_metric 1\n# TYPE x counter",
    ],
)
def test_hostile_sink_names_round_trip_through_the_label_escaping(
    name: str, tmp_path: Path
) -> None:
    stats = {"sinks": {name: {"pending": 5, "errors": 1}}}
    s = textfile_samples(stats, tmp_path)
    assert value(s, "exfilwatch_sink_pending", sink=name) == 5
    assert value(s, "exfilwatch_sink_errors_total", sink=name) == 1
    assert all(n.startswith("exfilwatch_") for n in names(s))


def test_other_controls_and_names_that_are_not_utf8_are_exported_visibly_escaped(
    tmp_path: Path,
) -> None:
    stats = {"inotify": {"roots": {"/srv/\udcff\x1b[2J\r\u202edesign": "watching"}}}
    path = tmp_path / "m.prom"
    Metrics(lambda: stats, textfile=str(path)).write_textfile()
    text = path.read_text()
    assert all(c.isprintable() or c == "\n" for c in text)
    root = "/srv/\\udcff\\x1b[2J\\r\\u202edesign"
    assert value(parse(text), "exfilwatch_watch_root", root=root, state="watching") == 1


def test_the_textfile_is_replaced_whole_and_readable_by_node_exporter(tmp_path: Path) -> None:
    path = tmp_path / "exfilwatch.prom"
    path.write_text("old\n")
    stats = dict(STATS)
    metrics = Metrics(lambda: stats, textfile=str(path))
    old_umask = os.umask(0o077)
    try:
        metrics.write_textfile()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["exfilwatch.prom"]  # no temporary file left
    assert value(parse(path.read_text()), "exfilwatch_up") == 1
    assert metrics.stats()["textfile_writes"] == 1


def test_a_textfile_that_cannot_be_written_raises_and_is_counted(tmp_path: Path) -> None:
    metrics = Metrics(lambda: STATS, textfile=str(tmp_path / "missing" / "exfilwatch.prom"))
    with pytest.raises(FileNotFoundError):
        metrics.write_textfile()
    assert metrics.stats()["textfile_errors"] == 1


def test_a_textfile_node_exporter_would_ignore_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\.prom"):
        Metrics(lambda: STATS, textfile="/var/lib/node_exporter/exfilwatch.txt")


def test_stop_leaves_a_textfile_that_says_the_agent_is_down(tmp_path: Path) -> None:
    path = tmp_path / "exfilwatch.prom"
    metrics = Metrics(lambda: STATS, textfile=str(path))
    metrics.write_textfile()
    metrics.stop()
    s = parse(path.read_text())
    assert value(s, "exfilwatch_up") == 0


def test_the_endpoint_serves_the_same_metrics_over_http_on_loopback(tmp_path: Path) -> None:
    stats = copy.deepcopy(STATS)
    metrics = Metrics(lambda: stats, listen="127.0.0.1:0")
    metrics.start()
    try:
        address = metrics.address
        assert address is not None
        host, port = address
        assert host == "127.0.0.1"
        assert port > 0
        assert metrics.stats()["listening"] == f"127.0.0.1:{port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        over_http = parse(body)
        assert over_http == textfile_samples(stats, tmp_path)
        stats["pipeline"]["processed"] = 46  # read at scrape time, not at start
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert value(parse(resp.read().decode()), "exfilwatch_events_processed_total") == 46
    finally:
        metrics.stop()
    assert metrics.stats()["listening"] is None


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_the_endpoint_listens_on_ipv6_loopback_too() -> None:
    metrics = Metrics(lambda: STATS, listen="[::1]:0")
    metrics.start()
    try:
        assert metrics.address is not None
        port = metrics.address[1]
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as resp:
            assert value(parse(resp.read().decode()), "exfilwatch_up") == 1
    finally:
        metrics.stop()


def test_start_without_listen_serves_nothing_and_stop_is_harmless() -> None:
    metrics = Metrics(lambda: STATS)
    metrics.start()
    assert metrics.address is None
    metrics.stop()


@pytest.mark.parametrize(
    "listen",
    [
        "0.0.0.0:9101",
        "[::]:9101",
        "10.1.2.3:9101",
        "192.168.0.10:9101",
        "[2001:db8::1]:9101",
        "[::ffff:10.0.0.1]:9101",
        "metrics.example.com:9101",
        "9101",
        ":9101",
        "127.0.0.1:",
        "127.0.0.1:http",
        "127.0.0.1:70000",
    ],
)
def test_an_address_that_is_not_loopback_or_not_valid_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="metrics listen"):
        Metrics(lambda: STATS, listen=listen)


@pytest.mark.parametrize(
    ("listen", "parsed"),
    [
        ("127.0.0.1:9101", ("127.0.0.1", 9101)),
        ("127.3.2.1:0", ("127.3.2.1", 0)),
        ("[::1]:9101", ("::1", 9101)),
        ("localhost:9101", ("127.0.0.1", 9101)),
    ],
)
def test_loopback_addresses_are_accepted(listen: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(listen) == parsed
