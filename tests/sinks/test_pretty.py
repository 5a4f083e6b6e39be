"""The terminal sink: one readable, escaped line per alert or health record."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.events import Event, dumps
from agent.health import record
from agent.rules.compiler import load_text
from agent.rules.engine import Engine
from agent.rules.testing import TEST_EPOCH_US
from agent.sinks.pretty import FIELD_MAX, PrettySink, clean, pretty_line

S = 1_000_000
SGR = re.compile(r"\x1b\[[0-9;]*m")

RULES = """
id: t-crown-jewel
title: Crown-jewel file copied to removable media
level: critical
detection:
  selection:
    exfilwatch.location.class: removable
    exfilwatch.lineage.origin_tags: crown-jewels
  condition: selection
---
id: t-usb-copy
title: Tagged content copied to removable media
level: medium
generate: false
detection:
  selection: {exfilwatch.location.class: removable, exfilwatch.lineage.origin_tags: chip}
  condition: selection
---
id: t-usb-bulk
title: Bulk copy of tagged files to removable media
level: high
correlation:
  type: value_count
  rules: [t-usb-copy]
  group-by: [user.name]
  timespan: 10m
  condition: {gte: 3, field: file.path}
"""


def copy_event(i: int, path: str, tags: tuple[str, ...] = ("chip",)) -> Event:
    return Event(
        timestamp_us=TEST_EPOCH_US + i * S,
        action="closed_write",
        path=path,
        location="removable",
        lineage_tags=tags,
        lineage_origin=f"/srv/rnd/x{i}.c",
        user_name="alice",
        size=1000,
        hostname="ws1",
        process_pid=123,
        process_name="cp",
        process_command_line="cp -r /srv/rnd /media/usb",
    )


def alert_lines(*events: Event) -> list[str]:
    """Alert lines as the agent writes them: the real engine, build_alert and dumps."""
    rs, problems = load_text(RULES, TEST_EPOCH_US, "t.yaml")
    assert rs is not None, [str(p) for p in problems]
    engine = Engine(rs)
    return [dumps(a) for e in events for a in engine.process(e)]


def bulk_alert() -> str:
    (line,) = alert_lines(*(copy_event(i, f"/media/usb/x{i}.c") for i in range(3)))
    return line


def health_line(action: str, reason: str | None = None, **data: Any) -> str:
    return dumps(record(action, reason, **data))


def assert_safe(text: str) -> None:
    """One line, and nothing a terminal acts on but the colour codes."""
    bare = SGR.sub("", text)
    assert "\n" not in text
    assert all(c.isprintable() for c in bare), repr(bare)


def test_a_correlation_alert_shows_time_severity_title_actor_path_destination_and_counts() -> None:
    line = pretty_line(bulk_alert(), colour=False)
    ts = json.loads(bulk_alert())["@timestamp"]
    assert line == (
        f"{ts[11:19]}  HIGH      Bulk copy of tagged files to removable media  user=alice  "
        "process=cp[123]  path=/media/usb/x2.c  origin=/srv/rnd/x2.c  dest=removable  "
        "count=3  files=3  bytes=2.9KiB"
    )


def test_a_single_event_alert_has_no_counts_and_takes_its_rules_severity() -> None:
    (raw,) = alert_lines(copy_event(0, "/media/usb/w.bin", tags=("crown-jewels",)))
    line = pretty_line(raw, colour=False)
    assert line is not None
    assert line[10:].startswith("CRITICAL  Crown-jewel file copied to removable media  ")
    assert "count=" not in line
    assert "bytes=" not in line


@pytest.mark.parametrize(
    ("severity", "label"),
    [(1, "INFO"), (21, "LOW"), (47, "MEDIUM"), (73, "HIGH"), (99, "CRITICAL"), (60, "MEDIUM")],
)
def test_severity_numbers_map_to_padded_labels(severity: int, label: str) -> None:
    alert = json.loads(bulk_alert())
    alert["event"]["severity"] = severity
    line = pretty_line(json.dumps(alert), colour=False)
    assert line is not None
    assert line[10:20] == f"{label:<8}  "


def test_a_sink_error_shows_action_reason_and_the_keys_that_matter() -> None:
    line = pretty_line(
        health_line(
            "sink_error",
            "ENOSPC",
            sink="file:/var/log/exfilwatch/alerts.jsonl",
            op="write",
            kind="alert",
            error="No space left on device",
            pending=12,
            failures=3,
            errors_total=9,
        ),
        colour=False,
    )
    assert line is not None
    assert line[8:] == (
        "  ERROR     sink_error  reason=ENOSPC  sink=file:/var/log/exfilwatch/alerts.jsonl  "
        'error="No space left on device"  pending=12  failures=3'
    )


def test_a_warning_carries_its_hint_and_a_list_shows_its_first_item_and_how_many_more() -> None:
    line = pretty_line(
        health_line(
            "watch_permission_denied",
            "permission",
            root="/srv/rnd",
            count=3,
            sample=["/srv/rnd/a", "/srv/rnd/b", "/srv/rnd/c"],
            hint="run as root",
        ),
        colour=False,
    )
    assert line is not None
    assert line[8:] == (
        "  WARNING   watch_permission_denied  reason=permission  root=/srv/rnd  count=3  "
        'sample=/srv/rnd/a (+2 more)  hint="run as root"'
    )


def test_the_heartbeat_prints_nothing_and_other_info_records_a_short_line() -> None:
    assert pretty_line(health_line("heartbeat", None, uptime_s=4.5), colour=False) is None
    line = pretty_line(
        health_line("agent_started", None, version="0.1.0", pid=42, config="/etc/x.yaml"),
        colour=False,
    )
    assert line is not None
    assert line[8:] == "  INFO      agent_started  version=0.1.0  pid=42  config=/etc/x.yaml"


def test_a_tampered_marker_is_shown_as_the_alert_it_is() -> None:
    rec = record("marker_tampered", "deleted", directory="/srv/rnd", marker="/srv/rnd/.tag")
    rec["event"]["severity"] = 73
    rec["rule"] = {"id": "exfilwatch-marker-tampered", "name": "Marker file removed or weakened"}
    rec["file"] = {"path": "/srv/rnd/.tag"}
    rec["user"] = {"name": "mallory"}
    line = pretty_line(dumps(rec), colour=False)
    assert line is not None
    assert line[8:] == (
        "  HIGH      Marker file removed or weakened  reason=deleted  user=mallory  "
        "path=/srv/rnd/.tag"
    )


HOSTILE = [
    "/srv/rnd/a\nb.c",
    "/srv/rnd/\x1b[2J\x1b]0;pwned\x07.c",
    "/srv/rnd/over\rwrite.c",
    "/srv/rnd/\udcff\udcfe.c",  # invalid UTF-8 as os.fsdecode gives it
    "/srv/rnd/\u202egnp.exe",  # right-to-left override: shows as exe.png
    "/srv/rnd/a\u2028b\u2029c\u200bd\ufeffe\x85f\u3000g",
    "/srv/rnd/x.c  user=root  path=/tmp/innocent",
]


@pytest.mark.parametrize("path", HOSTILE)
def test_a_hostile_file_name_gives_one_line_with_every_control_escaped(path: str) -> None:
    line = pretty_line(bulk_alert().replace("/media/usb/x2.c", json.dumps(path)[1:-1]), colour=True)
    assert line is not None
    assert_safe(line)


def test_escapes_are_visible_and_a_spoofed_field_stays_inside_quotes() -> None:
    alert = json.loads(bulk_alert())
    alert["file"]["path"] = "/r/\n\x1b[2J\r\udcff\u202ex  user=root"
    line = pretty_line(json.dumps(alert), colour=False)
    assert line is not None
    assert 'path="/r/\\n\\x1b[2J\\r\\udcff\\u202ex  user=root"' in line
    assert line.count("user=") == 2  # the real one and the one in quotes


def test_a_line_that_is_not_json_prints_escaped_and_never_raises() -> None:
    assert pretty_line("oops \x1b[2J\n", colour=False) == "--:--:--  RAW       oops \\x1b[2J\\n"
    for odd in ("", "[]", "null", '"x"', "{", '{"event": 3}', '{"event":{"kind":"alert"}}'):
        line = pretty_line(odd, colour=False)
        assert line is not None
        assert_safe(line)


def test_records_of_an_unexpected_shape_still_print_one_line() -> None:
    weird = {
        "@timestamp": 5,
        "event": {"kind": "alert", "severity": "high"},
        "rule": {"name": ["x"]},
        "user": "alice",
        "process": {"pid": True, "name": {"a": 1}},
        "exfilwatch": {"correlation": {"count": "many", "bytes": -1}, "health": []},
    }
    line = pretty_line(json.dumps(weird), colour=False)
    assert line is not None
    assert line.startswith("--:--:--  INFO      ")


def test_a_long_path_is_cut_in_the_middle_at_the_field_limit() -> None:
    alert = json.loads(bulk_alert())
    alert["file"]["path"] = "/srv/rnd/" + "deep/" * 200 + "design.v"
    line = pretty_line(json.dumps(alert), colour=False)
    assert line is not None
    path = line.split("path=", 1)[1].split("  ", 1)[0]
    assert len(path) == FIELD_MAX
    assert path.startswith("/srv/rnd/deep/")
    assert path.endswith("/design.v")
    assert "…" in path
    assert line.endswith("count=3  files=3  bytes=2.9KiB")


def test_eliding_never_cuts_an_escape_in_two() -> None:
    text = clean("\x1b" * 100, limit=21)
    assert text == "\\x1b" * 2 + "…" + "\\x1b" * 2
    assert clean("abc") == "abc"


def test_colour_wraps_the_line_in_the_severity_colour_and_resets() -> None:
    alert = json.loads(bulk_alert())
    for severity, sgr in ((99, "\x1b[1;31m"), (73, "\x1b[31m"), (47, "\x1b[33m"), (21, "\x1b[36m")):
        alert["event"]["severity"] = severity
        line = pretty_line(json.dumps(alert), colour=True)
        assert line is not None
        assert line.startswith(sgr)
        assert line.endswith("\x1b[0m")
        assert "\x1b" not in line[len(sgr) : -len("\x1b[0m")]
    plain = pretty_line(json.dumps(alert), colour=False)
    assert plain is not None
    assert "\x1b" not in plain


@settings(max_examples=300, deadline=None)
@given(name=st.text(), user=st.text(max_size=50), colour=st.booleans())
def test_any_name_renders_as_exactly_one_safe_line(name: str, user: str, colour: bool) -> None:
    alert = json.loads(bulk_alert())
    alert["file"]["path"] = name
    alert["user"]["name"] = user
    alert["process"]["name"] = name
    line = pretty_line(json.dumps(alert), colour=colour)
    assert line is not None
    assert_safe(line)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_input_line_renders_without_raising(text: str) -> None:
    line = pretty_line(text, colour=True)
    if line is not None:
        assert_safe(line)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_sink_writes_one_line_per_record_skips_heartbeats_and_flushes() -> None:
    out = io.StringIO()
    sink = PrettySink(out)
    sink.write(
        [bulk_alert(), health_line("heartbeat"), "garbage", health_line("sink_error", "EIO")]
    )
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "HIGH" in lines[0]
    assert "RAW       garbage" in lines[1]
    assert "sink_error  reason=EIO" in lines[2]
    sink.write([health_line("heartbeat")])
    assert len(out.getvalue().splitlines()) == 3
    assert sink.name == "pretty"
    sink.close()


def test_colour_follows_the_terminal_and_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert PrettySink(_Tty()).colour
    assert not PrettySink(io.StringIO()).colour
    monkeypatch.setenv("NO_COLOR", "1")
    assert not PrettySink(_Tty()).colour
    assert PrettySink(_Tty(), colour=True).colour  # an explicit choice wins
    monkeypatch.setenv("NO_COLOR", "")  # no-color.org: set but empty means colour
    assert PrettySink(_Tty()).colour


def test_a_stream_that_cannot_encode_a_name_gets_it_escaped() -> None:
    buf = io.BytesIO()
    stream = io.TextIOWrapper(buf, encoding="ascii")
    alert = json.loads(bulk_alert())
    alert["file"]["path"] = "/srv/rnd/café.c"
    PrettySink(stream, colour=False).write([json.dumps(alert)])
    assert b"path=/srv/rnd/caf\\xe9.c" in buf.getvalue()


def test_a_closed_stream_fails_the_write_for_the_router_to_retry() -> None:
    out = io.StringIO()
    sink = PrettySink(out, colour=False)
    out.close()
    with pytest.raises(ValueError):
        sink.write([bulk_alert()])
