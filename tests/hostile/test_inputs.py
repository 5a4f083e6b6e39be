"""Inputs the watched user shapes: file names, recordings to replay, rule and config files."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import WatchSpec
from agent.events import Event, event_line
from agent.service import Agent
from tests.conftest import Collector, make_config

T0 = 1_700_000_000_000_000  # 2023-11-14, before the exception below expires

WRITES = """\
id: any-write
title: a file was written
level: low
detection:
  s: {event.action: closed_write}
  condition: s
exceptions:
  - {match: {user.name: build}, reason: nightly build, owner: it@example.com,
     expires: 2025-06-30}
"""


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, input=stdin, check=False
    )
    return subprocess.CompletedProcess(
        res.args, res.returncode, res.stdout.decode(), res.stderr.decode()
    )


def write(i: int, path: str | None = None, **fields: Any) -> str:
    e = Event(T0 + i * 1000, "closed_write", path or f"/rnd/f{i}.v", sequence=i, **fields)
    return event_line(e)


def alerts(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        alert = json.loads(line)
        del alert["event"]["created"]  # when the alert was made: differs between two runs
        out.append(alert)
    return out


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(WRITES)
    return path


# --- file names --------------------------------------------------------------------------

# Pairs a user could make to pass one file off as another: the byte 0xff and the four
# characters `\xff`; a real UTF-8 character and its bytes spelled out; backslashes.
LOOKALIKES = [
    b"\xff.v",
    b"\\xff.v",
    b"\\\\xff.v",
    b"caf\xc3\xa9.v",
    b"caf\\xc3\\xa9.v",
    b"caf\xe9.v",
    b"caf\\xe9.v",
    b"back\\slash.v",
    b"back\\\\slash.v",
    b"trailing\\",
]


def test_files_whose_names_differ_in_bytes_never_print_the_same_path(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    run_agent(make_config([WatchSpec(str(root), ("rnd",))], tmp_path))
    broot = os.fsencode(root)
    for name in LOOKALIKES:
        (Path(os.fsdecode(broot + b"/" + name))).write_bytes(b"x")
    for name in LOOKALIKES:
        collector.wait_event("closed_write", os.fsdecode(broot + b"/" + name))
    lines = [
        line
        for line in collector.lines
        if '"action":"closed_write"' in line and '"dataset":"exfilwatch.file"' in line
    ]
    texts = {json.loads(line)["file"]["path"] for line in lines}
    assert len(texts) == len(LOOKALIKES)
    for line in lines:
        record = json.loads(line)
        assert line.isascii() and "\n" not in line
        path = record["file"]["path"]
        raw = record["exfilwatch"].get("raw", {}).get("file.path")
        # The text is the name itself, or it is escaped and the raw form gives the bytes.
        assert (raw is None) == ("\\" not in path)
        if raw is not None:
            assert os.fsencode(from_line(line).path) == base64.b64decode(raw)
    assert {os.fsencode(from_line(line).path) for line in lines} == {
        broot + b"/" + n for n in LOOKALIKES
    }


def from_line(line: str) -> Event:
    return Event.from_json(line)


# --- replay ------------------------------------------------------------------------------


def hostile_recording(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A recording with bad lines among good ones; the same recording without them; the
    problems the bad lines must give, in order."""
    surrogate_path = json.loads(write(5))
    surrogate_path["file"]["path"] = "/rnd/\ud800"
    surrogate_user = json.loads(write(6, user_name="u"))
    surrogate_user["user"]["name"] = "\ud800"
    wrong_type = json.loads(write(7))
    wrong_type["file"]["size"] = "big"
    health = {"event": {"kind": "metric", "dataset": "exfilwatch.health"}}
    good = [
        write(0),
        write(1, os.fsdecode(b"/rnd/\xff.v")),
        write(2, "/rnd/\\xff.v"),
        write(3, user_name="alice"),
        write(4),
        write(8),
        write(9),
    ]
    rows: list[bytes] = [
        good[0].encode(),
        b"not json",
        good[1].encode(),
        b'{"event": {"kind": "event"',
        b"",
        b'{"file": {"path": "/rnd/caf\xe9"}}',
        good[2].encode(),
        b"[1, 2]",
        json.dumps(surrogate_path).encode(),
        json.dumps(health).encode(),
        good[3].encode(),
        json.dumps(surrogate_user).encode(),
        b"x" * (2 << 20),
        json.dumps(wrong_type).encode(),
        good[4].encode(),
        good[5].encode(),
    ]
    bad = tmp_path / "hostile.jsonl"
    bad.write_bytes(b"\n".join(rows) + b"\n" + good[6].encode())  # no newline at the end
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(line + "\n" for line in good))
    problems = [
        f"{bad}:2:1 EVT_JSON Expecting value",
        f"{bad}:4:27 EVT_JSON Expecting ',' delimiter",
        f"{bad}:6:28 EVT_ENCODING not UTF-8: invalid continuation byte (byte 0xe9)",
        f"{bad}:8:1 EVT_SHAPE a line must hold a JSON object",
        f"{bad}:9:1 EVT_FIELD file.path is not a file name (a lone surrogate)",
        f"{bad}:12:1 EVT_FIELD user.name holds a lone surrogate",
        f"{bad}:13:1048577 EVT_TOO_LONG line longer than 1048576 bytes",
        f"{bad}:14:1 EVT_FIELD file.size has the wrong type",
    ]
    return bad, clean, problems


def test_replay_reports_bad_lines_where_they_are_and_alerts_on_every_good_one(
    tmp_path: Path, rules: Path
) -> None:
    bad, clean, problems = hostile_recording(tmp_path)
    res = cli("replay", str(bad), "--rules", str(rules))
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        *problems,
        f"{bad}: 7 events, 8 bad lines skipped, 7 alerts",
    ]
    expected = cli("replay", str(clean), "--rules", str(rules))
    assert expected.returncode == 0, expected.stderr
    assert expected.stderr.splitlines() == [f"{clean}: 7 events, 0 bad lines skipped, 7 alerts"]
    got = alerts(res.stdout)
    assert got == alerts(expected.stdout)
    assert [a["file"]["path"] for a in got] == [
        "/rnd/f0.v",
        "/rnd/\\xff.v",
        "/rnd/\\\\xff.v",
        "/rnd/f3.v",
        "/rnd/f4.v",
        "/rnd/f8.v",
        "/rnd/f9.v",
    ]
    assert "raw" in got[1]["exfilwatch"] and "raw" in got[2]["exfilwatch"]


def test_replay_reads_a_hostile_recording_from_stdin_the_same_way(
    tmp_path: Path, rules: Path
) -> None:
    bad, _, problems = hostile_recording(tmp_path)
    res = cli("replay", "-", "--rules", str(rules), stdin=bad.read_bytes())
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        *(p.replace(str(bad), "<stdin>") for p in problems),
        "<stdin>: 7 events, 8 bad lines skipped, 7 alerts",
    ]
    assert len(alerts(res.stdout)) == 7


def test_replay_loads_rules_at_the_first_event_even_after_bad_lines(
    tmp_path: Path, rules: Path
) -> None:
    # The exception expires in 2025; the events are from 2023, so it is in force for them
    # (no "expired" warning) even though the file starts with lines that are not events.
    recording = tmp_path / "r.jsonl"
    recording.write_text("garbage\n" + write(0, user_name="build") + "\n" + write(1) + "\n")
    res = cli("replay", str(recording), "--rules", str(rules))
    assert res.returncode == 1
    assert "RULE_EXCEPTION_EXPIRED" not in res.stderr
    assert [a["file"]["path"] for a in alerts(res.stdout)] == ["/rnd/f1.v"]


def test_a_recording_of_only_bad_lines_gives_no_alert_and_fails(
    tmp_path: Path, rules: Path
) -> None:
    recording = tmp_path / "r.jsonl"
    recording.write_bytes(b"\xff\xfe\n{}\n")
    rules.write_text(WRITES.split("exceptions:", maxsplit=1)[0])
    res = cli("replay", str(recording), "--rules", str(rules))
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.splitlines() == [
        f"{recording}:1:1 EVT_ENCODING not UTF-8: invalid start byte (byte 0xff)",
        f"{recording}: 0 events, 1 bad lines skipped, 0 alerts",
    ]


MEASURE = """\
import os, resource, sys
from agent import rules_cli
from agent.rules.compiler import load_rules
events, rules = sys.argv[1:3]
load_rules([rules], 0)  # imports and one compile happen before the measure starts
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.stdout = open(os.devnull, "w")
code = rules_cli.replay(events, [rules])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print("MEASURED", code, grown, file=sys.stderr)
"""


@pytest.mark.slow
def test_replay_of_200000_events_runs_in_bounded_memory(tmp_path: Path) -> None:
    # Holding the file's events in a list (as replay once did) grows the peak by ~165 MB here.
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "id: every-1000th\ntitle: t\nlevel: low\n"
        "detection: {s: {file.name|endswith: 000.v}, condition: s}\n"
    )
    recording = tmp_path / "big.jsonl"
    with recording.open("w") as fh:
        for i in range(200_000):
            fh.write(write(i, f"/rnd/d{i % 100}/f{i}.v", size=i, user_name="alice") + "\n")
    res = subprocess.run(
        [sys.executable, "-c", MEASURE, str(recording), str(rules)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = res.stderr.splitlines()
    assert lines[0] == f"{recording}: 200000 events, 0 bad lines skipped, 199 alerts"
    _, code, grown_kib = lines[1].split()
    assert code == "0"
    assert int(grown_kib) < 50 * 1024, f"peak memory grew by {int(grown_kib) // 1024} MiB"


# --- rule and config files -----------------------------------------------------------------


def test_a_rule_file_that_is_not_utf8_is_refused_at_the_line_of_the_bad_byte(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(WRITES.encode().replace(b"a file was", b"a fil\xe9 was"))
    res = cli("rules", "validate", str(path))
    assert res.returncode == 1
    assert (
        f"{path}:2:13 RULE_ENCODING not UTF-8: byte 0xe9 is not a character "
        "(hint: save the file as UTF-8)" in res.stdout
    )


def test_a_config_that_is_not_utf8_is_refused_at_the_line_of_the_bad_byte(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"watch:\n  - path: /srv\n    tags: [d\xe9sign]\n")
    res = cli("config", "check", str(path))
    assert res.returncode == 1
    assert f"{path}:3:13 CFG_ENCODING not UTF-8" in res.stdout


def test_a_utf16_config_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes("watch: [{path: /srv}]\n".encode("utf-16"))
    res = cli("config", "check", str(path))
    assert res.returncode == 1
    assert f"{path}:1:1 CFG_ENCODING" in res.stdout and "UTF-16" in res.stdout


def test_a_config_with_a_nul_byte_is_located(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"watch:\n  - path: /srv\x00/x\n")
    res = cli("config", "check", str(path))
    assert res.returncode == 1
    assert f"{path}:2:15 CFG_YAML_PARSE character U+0000 is not allowed in YAML" in res.stdout


def test_broken_yaml_in_a_config_points_at_the_line_of_the_mistake(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("watch:\n  - path: /srv\n    tags [chip]\nrules: [r]\n")
    res = cli("config", "check", str(path))
    assert res.returncode == 1
    assert res.stdout.startswith(f"{path}:3:9 CFG_YAML_PARSE ")
    assert "(hint: did you forget a ':' after 'tags'?)" in res.stdout


def test_broken_yaml_in_a_rule_file_points_at_the_line_of_the_mistake(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(WRITES.replace("title: a file was written", 'title: "a file was written'))
    res = cli("rules", "validate", str(path))
    assert res.returncode == 1
    assert res.stdout.startswith(f"{path}:2:8 RULE_YAML_PARSE ")
    assert "(hint: unclosed quote started at line 2; close it with '\"')" in res.stdout
