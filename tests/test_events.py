"""The Event contract: ECS names, dotted access, and an exact JSON-lines round trip."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import WatchSpec
from agent.diagnostics import Problem
from agent.events import (
    FIELDS,
    FILE_ACTIONS,
    Event,
    dumps,
    event_line,
    format_timestamp,
    parse_timestamp,
    read_jsonl,
    text_and_raw,
    to_dict,
)
from agent.service import Agent
from tests.conftest import ECS_FIELDS, Collector, make_config

HOSTILE_NAMES = [
    b"line\nbreak.txt",
    b"\x1b[31mred\x1b[0m.txt",
    b"bad-utf8-\xff\xfe.bin",
    b'quote"and\\backslash',
    b'\r\n{"event":{"kind":"alert"}}',
    "unicode-\u2028-\u202e-\u00e9.txt".encode(),
]


def test_hostile_file_names_survive_the_round_trip_and_never_break_a_line(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    run_agent(make_config([WatchSpec(str(root), ("rnd",))], tmp_path))
    broot = os.fsencode(root)
    for name in HOSTILE_NAMES:
        with open(broot + b"/" + name, "wb") as fh:
            fh.write(b"x")
    for name in HOSTILE_NAMES:
        collector.wait_event("closed_write", os.fsdecode(broot + b"/" + name))
    for line in collector.lines:
        assert line.isascii() and "\n" not in line and "\r" not in line and "\x1b" not in line
    events = collector.events()
    seen = {os.fsencode(e.path) for e in events}
    assert {broot + b"/" + n for n in HOSTILE_NAMES} <= seen
    # Reading the lines back gives identical Event objects.
    stream = io.StringIO("\n".join(collector.lines) + "\n")
    loaded = [e for e in read_jsonl(stream) if isinstance(e, Event)]
    assert loaded == events


def test_a_non_utf8_path_is_readable_text_plus_exact_bytes() -> None:
    e = Event(1_700_000_000_000_000, "created", os.fsdecode(b"/rnd/\xff.v"))
    d = e.to_dict()
    assert d["file"]["path"] == "/rnd/\\xff.v"
    assert d["exfilwatch"]["raw"]["file.path"] == "L3JuZC//LnY="
    assert Event.from_json(e.to_json()) == e


# Pieces that make escapes meet: literal backslashes and "xff" beside bytes that are not UTF-8
# (and halves of a real UTF-8 character).
_PIECES = [b"\\", b"x", b"ff", b"\xff", b"\xc3", b"\xa9", b"a", b"/", b"\\x"]
names = st.binary(min_size=1, max_size=60) | st.lists(
    st.sampled_from(_PIECES), min_size=1, max_size=8
).map(b"".join)
paths = names.map(lambda b: "/" + os.fsdecode(b.replace(b"\x00", b"_")))


def _unescape(text: str) -> bytes:
    """The bytes an escaped path text stands for, by the README's rule: `\\\\` is a backslash,
    `\\xNN` a byte that is not UTF-8, any other character itself."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] != "\\":
            out += text[i].encode("utf-8")
            i += 1
        elif text[i + 1] == "\\":
            out += b"\\"
            i += 2
        else:
            assert text[i + 1] == "x", text
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
    return bytes(out)


def test_a_name_with_a_literal_backslash_never_prints_like_a_byte_that_is_not_utf8() -> None:
    byte = Event(0, "created", os.fsdecode(b"/rnd/\xff.v")).to_dict()
    literal = Event(0, "created", "/rnd/\\xff.v").to_dict()
    assert byte["file"]["path"] == "/rnd/\\xff.v"
    assert literal["file"]["path"] == "/rnd/\\\\xff.v"
    assert literal["file"]["name"] == "\\\\xff.v"
    assert base64.b64decode(literal["exfilwatch"]["raw"]["file.path"]) == b"/rnd/\\xff.v"
    assert Event.from_dict(literal) == Event(0, "created", "/rnd/\\xff.v")


def test_a_utf8_name_without_a_backslash_is_its_own_text_without_a_raw_form() -> None:
    d = Event(0, "created", "/rnd/caf\u00e9 \u2028.v").to_dict()
    assert d["file"]["path"] == "/rnd/caf\u00e9 \u2028.v"
    assert "raw" not in d["exfilwatch"]


@given(name=names)
def test_the_text_of_any_name_gives_back_its_exact_bytes(name: bytes) -> None:
    path = os.fsdecode(b"/" + name.replace(b"\x00", b"_"))
    text, raw = text_and_raw(path)
    assert _unescape(text) == os.fsencode(path) if raw is not None else text == path
    assert raw is None or base64.b64decode(raw) == os.fsencode(path)
    assert raw is not None or "\\" not in text


@given(a=names, b=names)
def test_names_that_differ_in_bytes_never_print_the_same_path(a: bytes, b: bytes) -> None:
    da, db = (Event(0, "created", os.fsdecode(b"/" + n.replace(b"\x00", b"_"))) for n in (a, b))
    if da.path != db.path:
        assert da.to_dict()["file"]["path"] != db.to_dict()["file"]["path"]
        assert event_line(da) != event_line(db)


@given(name=names)
def test_a_file_named_like_another_files_escaped_text_prints_differently(name: bytes) -> None:
    # The attack: name a file with the characters another name's bad bytes print as.
    for spelled in (text_and_raw(os.fsdecode(name))[0], name.decode("utf-8", "backslashreplace")):
        lookalike = spelled.encode("utf-8")
        if lookalike != name:
            assert text_and_raw(os.fsdecode(lookalike))[0] != text_and_raw(os.fsdecode(name))[0]


def test_a_path_text_with_a_lone_surrogate_is_a_bad_line_not_a_crash_later() -> None:
    good = json.loads(Event(0, "created", "/a").to_json())
    bad = json.loads(Event(0, "created", "/a").to_json())
    bad["file"]["path"] = "/x\ud800"
    stream = io.StringIO(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    out = list(read_jsonl(stream, "rec.jsonl"))
    assert out[0] == Event(0, "created", "/a")
    assert out[1] == Problem(
        "rec.jsonl", 2, 1, "EVT_FIELD", "file.path is not a file name (a lone surrogate)"
    )
    # What os.fsdecode gives (an escaped byte) is a file name, raw form or not.
    bad["file"]["path"] = "/x\udcff"
    assert Event.from_dict(bad).path == os.fsdecode(b"/x\xff")


def test_a_path_that_no_file_system_gives_is_still_written() -> None:
    text, raw = text_and_raw("/x\ud800")
    assert text == "/x\\xed\\xa0\\x80" and raw is not None


@given(
    path=paths,
    src=st.none() | paths,
    ts=st.integers(min_value=0, max_value=4_000_000_000_000_000),
    size=st.none() | st.integers(min_value=0, max_value=2**62),
    tags=st.lists(st.text(min_size=1, max_size=10), max_size=3).map(tuple),
    action=st.sampled_from(["created", "moved", "closed_write", "deleted"]),
)
def test_any_event_round_trips_exactly(
    path: str, src: str | None, ts: int, size: int | None, tags: tuple[str, ...], action: str
) -> None:
    e = Event(ts, action, path, size=size, src_path=src, tags=tags, sequence=7, hostname="h")
    line = e.to_json()
    assert line.isascii() and "\n" not in line
    assert Event.from_json(line) == e


def test_timestamps_are_iso_utc_and_exact_to_the_microsecond() -> None:
    assert format_timestamp(1_764_000_000_123_456) == "2025-11-24T16:00:00.123456Z"
    assert parse_timestamp("2025-11-24T16:00:00.123456Z") == 1_764_000_000_123_456


def test_fields_are_addressed_by_their_dotted_ecs_names() -> None:
    e = Event(0, "closed_write", "/rnd/chip/top.V", size=10, tags=("chip",), uid="1000")
    assert e.get("file.name") == "top.V"
    assert e.get("file.extension") == "v"
    assert e.get("file.directory") == "/rnd/chip"
    assert e.get("event.type") == ("change",)
    assert e.get("exfilwatch.tags") == ("chip",)
    with pytest.raises(KeyError):
        e.get("file.nope")


def test_bad_lines_become_located_problems_not_exceptions() -> None:
    good = Event(0, "created", "/a").to_json()
    stream = io.StringIO(f'{good}\n{{"event": \nnot json\n{{"event":{{"kind":"event"}}}}\n')
    out = list(read_jsonl(stream, "rec.jsonl"))
    assert out[0] == Event(0, "created", "/a")
    assert all(isinstance(p, Problem) for p in out[1:])
    assert [(p.line, p.code) for p in out[1:] if isinstance(p, Problem)] == [
        (2, "EVT_JSON"),
        (3, "EVT_JSON"),
        (4, "EVT_FIELD"),
    ]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@pytest.mark.skipif(
    not ECS_FIELDS.exists(), reason="../shared/ecs/fields.csv is not beside the repo"
)
def test_every_field_is_ecs_with_the_right_type_or_in_our_namespace() -> None:
    with ECS_FIELDS.open() as fh:
        ecs = {row["Field"]: row["Type"] for row in csv.DictReader(fh)}
    e = Event(
        1,
        "moved",
        "/r/a.txt",
        file_type="file",
        size=3,
        uid="0",
        gid="0",
        inode="5",
        mode="0644",
        mtime_us=2,
        src_path="/r/b",
        tags=("t",),
        sensitivity="high",
        root="/r",
        hostname="h",
        user_name="u",
        user_id="1",
        process_pid=4,
        process_name="cp",
        process_executable="/bin/cp",
        process_command_line="cp a b",
    )
    flat = _flatten(e.to_dict())
    json_types = {
        "keyword": str,
        "wildcard": str,
        "date": str,
        "long": int,
        "match_only_text": str,
    }
    for name, value in flat.items():
        if name.startswith("exfilwatch."):
            continue
        assert name in ecs, f"{name} is not an ECS field"
        values = value if isinstance(value, list) else [value]
        for v in values:
            assert isinstance(v, json_types[ecs[name]]), (name, ecs[name], v)
    for dotted in FIELDS:
        assert dotted.startswith("exfilwatch.") or dotted in ecs, dotted
    assert json.loads(e.to_json())["event"]["kind"] == "event"


@given(
    path=paths,
    src=st.none() | paths,
    root=st.none() | paths,
    ts=st.integers(min_value=0, max_value=4_000_000_000_000_000),
    mtime=st.none() | st.integers(min_value=0, max_value=4_000_000_000_000_000),
    size=st.none() | st.integers(min_value=0, max_value=2**62),
    text=st.none() | st.text(max_size=8),
    tags=st.lists(st.text(min_size=1, max_size=10), max_size=3).map(tuple),
    action=st.sampled_from([*FILE_ACTIONS, "unknown"]),
    pid=st.none() | st.integers(min_value=1, max_value=2**22),
)
def test_the_fast_serializer_writes_exactly_what_the_general_one_does(
    path: str,
    src: str | None,
    root: str | None,
    ts: int,
    mtime: int | None,
    size: int | None,
    text: str | None,
    tags: tuple[str, ...],
    action: str,
    pid: int | None,
) -> None:
    e = Event(
        ts,
        action,
        path,
        "file",
        text,
        size,
        text,
        text,
        text,
        text,
        mtime,
        src,
        tags,
        text,
        root,
        "inotify",
        3,
        text,
        text,
        None,
        pid,
    )
    assert event_line(e) == dumps(to_dict(e))
    assert Event.from_json(event_line(e)) == e
    enriched = e.evolve(
        location=text,
        watchlist=text,
        lineage_origin=src,
        lineage_tags=tags,
        archive_tagged=size,
        disguise=tags,
        process_parent_name=text,
        location_provider=text,
    )
    assert event_line(enriched) == dumps(to_dict(enriched))
    assert Event.from_json(event_line(enriched)) == enriched
    attributed = e.evolve(
        user_name=text,
        user_id=text,
        process_pid=pid,
        process_name=text,
        process_executable=text,
        process_command_line=text,
        process_working_directory=text,
        process_parent_pid=pid,
        process_parent_name=text,
        attribution=text,
        attribution_method=text,
        user_login_name=text,
        user_login_id=text,
        masquerade=text,
        location=text,
        location_provider=text,
        process_args=tags,
        process_parent_executable=text,
        process_parent_command_line=src,
    )
    assert event_line(attributed) == dumps(to_dict(attributed))
    assert Event.from_json(event_line(attributed)) == attributed


# Values that repeat, so that runs of events share some fields and differ in others: the
# fast serializer reuses the encoded pieces of the previous event where their fields are
# equal, and must never reuse one where a field differs.
_RUN_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "timestamp_us": st.sampled_from([0, 1_796_017_560_970_918, 1_796_017_560_970_919]),
    "action": st.sampled_from(["opened", "closed_write", "moved", "unknown", 'x",\x7f']),
    "category": st.sampled_from(["file", "process"]),
    "path": st.sampled_from(
        ["/srv/a/b.v", "/srv/a/c", "/srv/a/bad-\udcff", "/srv/a/\u00e9", '/srv/a/q"\\', "/x"]
    ),
    "file_type": st.sampled_from([None, "file", "dir"]),
    "size": st.sampled_from([None, 0, 1, 17]),
    "uid": st.sampled_from([None, "0", "1000"]),
    "inode": st.sampled_from([None, "12", "13"]),
    "mode": st.sampled_from([None, "0644"]),
    "mtime_us": st.sampled_from([None, 0, 1_796_017_560_000_000]),
    "src_path": st.sampled_from([None, "/srv/a/b.v", "/tmp/\udcfe"]),
    "tags": st.sampled_from([(), ("a",), ("a", "b"), ("\u00e9",)]),
    "sensitivity": st.sampled_from([None, "high"]),
    "root": st.sampled_from([None, "/srv/a", "/srv/\udcfd"]),
    "source": st.sampled_from(["inotify", "fanotify"]),
    "sequence": st.integers(min_value=0, max_value=10**12),
    "hostname": st.sampled_from([None, "vm", "h\u00e9"]),
    "user_name": st.sampled_from([None, "al", "b\u00e9"]),
    "user_id": st.sampled_from([None, "1000"]),
    "process_pid": st.sampled_from([None, 1, 2]),
    "process_command_line": st.sampled_from([None, "cp a b", "cp \udcff b"]),
    "location": st.sampled_from([None, "tagged", "removable"]),
    "location_trusted": st.sampled_from([None, True, False]),
    "history_ratio": st.sampled_from([None, 1.5, 2.0]),
    "lineage_origin": st.sampled_from([None, "/srv/a/b.v"]),
    "disguise": st.sampled_from([(), ("renamed",)]),
    "nlink": st.sampled_from([None, 2]),
    "process_args": st.sampled_from([(), ("cp", "a")]),
    "enrichment_skipped": st.sampled_from([None, "queue_full"]),
}


@given(st.lists(st.fixed_dictionaries({}, optional=_RUN_FIELDS), min_size=2, max_size=12))
def test_runs_of_events_that_share_some_fields_are_written_as_the_general_serializer_does(
    changes: list[dict[str, Any]],
) -> None:
    e = Event(1_796_017_560_970_918, "opened", "/srv/a/b.v")
    for change in changes:
        e = e.evolve(**change)
        line = event_line(e)
        assert line == dumps(to_dict(e))
        assert Event.from_json(line) == e


@given(
    st.lists(
        st.sampled_from(sorted(_RUN_FIELDS)).flatmap(
            lambda name: st.tuples(st.just(name), _RUN_FIELDS[name])
        ),
        min_size=1,
        max_size=20,
    )
)
def test_one_field_changed_after_its_pieces_were_cut_is_never_written_from_them(
    steps: list[tuple[str, Any]],
) -> None:
    """Each event is written twice (the second time from pieces), then one field changes:
    the next line must show the change, whichever piece the field belongs to."""
    e = Event(1_796_017_560_970_918, "opened", "/srv/a/b.v", tags=("a",), hostname="vm")
    for name, value in steps:
        for _ in range(2):
            line = event_line(e)
            assert line == dumps(to_dict(e))
        e = e.evolve(**{name: value})
    assert event_line(e) == dumps(to_dict(e))
