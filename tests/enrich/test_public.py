"""Public boilerplate is recognised by content, never by name, and carries no payload."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from agent.enrich.public import EMBEDDED_LICENCES, PublicContent

LICENCES = Path("/usr/share/common-licenses")
TEMPLATES = Path("/usr/share/git-core/templates")
MIT = EMBEDDED_LICENCES[0].encode()


@pytest.fixture(scope="module")
def public() -> PublicContent:
    return PublicContent()


def loose(data: bytes) -> bytes:
    return zlib.compress(b"blob %d\0" % len(data) + data, 1)


def test_licence_texts_with_their_own_notices_and_layout_are_public(public: PublicContent) -> None:
    mit = b"MIT License\n\nCopyright (c) 2026 Acme Chips Ltd.\n\n" + MIT
    assert public.is_public(mit)
    assert public.is_public(b"The MIT License (MIT)\nCopyright 2019-2026 A. Person\n" + MIT)
    reflowed = b" ".join(MIT.split())  # one long line: whitespace is folded
    assert public.is_public(reflowed)
    if not (LICENCES / "Apache-2.0").exists():
        pytest.skip("needs Debian's /usr/share/common-licenses")
    for name in ("Apache-2.0", "GPL-3", "GPL-2", "LGPL-2.1", "MPL-2.0"):
        text = (LICENCES / name).read_bytes()
        assert public.is_public(text), name
        assert public.is_public(b"\n".join(line.strip() for line in text.splitlines())), name


def test_a_licence_with_anything_added_is_not_public(public: PublicContent) -> None:
    assert not public.is_public(MIT + b"\nmodule alu(input a, output y); endmodule\n")
    assert not public.is_public(b"module alu; endmodule\n" + MIT)
    # A payload in "copyright" lines: the notices left out are bounded.
    notices = b"".join(b"Copyright 2026 " + b"QUJD" * 25 + b"\n" for _ in range(8))
    assert not public.is_public(notices + MIT)
    assert not public.is_public(MIT.replace(b"merge", b"merge, exfiltrate"))
    assert not public.is_public(b"MIT License\n")  # a title is not a licence


def test_git_templates_and_their_loose_objects_are_public(public: PublicContent) -> None:
    samples = sorted(TEMPLATES.rglob("*.sample"))
    if not samples:
        pytest.skip("needs git's templates (git is installed by .ci/run)")
    for sample in samples:
        assert public.is_public(sample.read_bytes()), sample.name
    assert public.is_public(loose(samples[0].read_bytes()))
    assert public.is_public(loose(MIT))
    assert public.is_public(loose(b""))  # the empty blob
    assert not public.is_public(samples[0].read_bytes() + b"# x\n")


def test_designs_and_their_loose_objects_are_not_public(public: PublicContent) -> None:
    design = b"module top(input clk, output [7:0] q); endmodule\n" * 20
    assert not public.is_public(design)
    assert not public.is_public(loose(design))
    assert not public.is_public(zlib.compress(b"tree 40\0" + b"x" * 40))  # not a blob
    assert not public.is_public(loose(MIT)[:-3])  # cut short
    assert not public.is_public(loose(MIT) + b"trailing")
    assert not public.is_public(b"x" + design)  # looks like zlib's first byte, is not
    assert public.is_public(b" \n\t\n")  # nothing but whitespace
