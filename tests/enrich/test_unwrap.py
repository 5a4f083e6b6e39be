"""Unwrapping transport encodings: real tools' output decodes to the original bytes; anything
malformed decodes to nothing, never to an error."""

from __future__ import annotations

import os
import shutil
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.enrich.unwrap import ChunkSets, decode

ORIGINAL = os.urandom(3000) + b"module top; endmodule\n" * 50


def run(argv: list[str], data: bytes) -> bytes:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize(
    ("argv", "via"),
    [
        (["base64"], "base64"),
        (["base64", "-w", "0"], "base64"),
        (["openssl", "base64"], "base64"),
        (["xxd", "-p"], "hex"),
        (["xxd"], "hex"),
        (["od", "-An", "-tx1", "-v"], "hex"),
        (["hexdump", "-C", "-v"], "hex"),
        (["uuencode", "top.v"], "uuencode"),
        (["uuencode", "-m", "top.v"], "uuencode"),
    ],
)
def test_real_encoders_output_decodes_to_the_original(argv: list[str], via: str) -> None:
    encoded = run(argv, ORIGINAL)
    assert list(decode(encoded, encoded[:8192])) == [(via, ORIGINAL)]


def test_each_attachment_of_a_mail_and_of_an_mbox_spool_is_decoded() -> None:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.com", "b@example.com", "x"
    m.set_content("hello")
    m.add_attachment(ORIGINAL, maintype="application", subtype="octet-stream", filename="a.bin")
    raw = bytes(m)
    assert list(decode(raw, raw[:8192])) == [("mime", ORIGINAL)]
    spool = b"From a@example.com Sat Nov 28 10:00:00 2026\n" + raw + b"\n"
    spool += b"From b@example.com Sat Nov 28 11:00:00 2026\n" + raw
    assert [via for via, _ in decode(spool, spool[:8192])] == ["mime", "mime"]


@given(st.binary(max_size=2000))
def test_any_bytes_decode_to_something_or_nothing_without_raising(data: bytes) -> None:
    for via, out in decode(data, data[:8192]):
        assert via in ("base64", "hex", "uuencode", "mime") and isinstance(out, bytes)


def test_a_chunk_set_is_given_in_order_once_its_first_chunk_is_there(tmp_path: Path) -> None:
    sets = ChunkSets()
    d = str(tmp_path)
    assert sets.add(f"{d}/x_ab", 10) is None  # the first chunk is not there yet
    assert sets.add(f"{d}/x_aa", 10) == [(f"{d}/x_aa", 10), (f"{d}/x_ab", 10)]
    assert sets.add(f"{d}/x_ac", 3) == [(f"{d}/x_aa", 10), (f"{d}/x_ab", 10), (f"{d}/x_ac", 3)]
    assert sets.add(f"{d}/y00", 5) is None
    assert sets.add(f"{d}/y01", 5) == [(f"{d}/y00", 5), (f"{d}/y01", 5)]


def test_decoding_is_bounded_by_decode_max_bytes(tmp_path: Path) -> None:
    """A base64 copy of a tagged file is traced when it fits decode_max_bytes; past that it
    is not decoded at all (no unbounded read of a huge file), and what was read is counted."""
    from agent.enrich.destinations import Destinations, DestinationSettings
    from agent.enrich.lineage import LineageIndex
    from agent.events import Event

    tagged = tmp_path / "rnd" / "top.v"
    tagged.parent.mkdir()
    tagged.write_bytes(os.urandom(30_000))
    index = LineageIndex()
    index.add(str(tagged), tagged.stat().st_size, tagged.stat().st_mtime_ns, ("chip",))
    copy = tmp_path / "stage" / "notes.txt"
    copy.parent.mkdir()
    subprocess.run(["base64", str(tagged)], stdout=copy.open("wb"), check=True)
    size = copy.stat().st_size  # about 40,500 bytes

    def traced(limit: int) -> tuple[str | None, int]:
        stage = Destinations(index, DestinationSettings(decode_max_bytes=limit))
        e = Event(1, "closed_write", str(copy), size=size, file_type="file", location="staging")
        out, read = stage.content(e)
        return out.lineage_origin, read

    origin, read = traced(1 << 20)
    assert origin == str(tagged)
    origin, read = traced(size - 1)
    assert origin is None
    assert read <= 8192 + 30_000  # the sniffed head, and at most the tagged file hashed
