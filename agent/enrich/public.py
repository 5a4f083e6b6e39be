"""Content that every project holds, whoever made it: git's template files, licence texts,
and git's compressed copies of them. A copy of such content says nothing about tagged work
leaving (an unrelated clone in a sync folder holds the same hook samples and, often, the same
licence), so lineage does not trace it.

Decided by content, never by name: a file named LICENSE that holds a design is traced like
any other (a watched user can name a file anything). A licence text is recognised when, with
its copyright notices left out and its whitespace and case folded, it equals a known licence:
the texts in /usr/share/common-licenses plus the short permissive ones projects paste (MIT,
ISC, BSD). The notices left out are bounded (_NOTICE_LINES, _NOTICE_BYTES), so a licence
cannot carry a payload in "copyright" lines.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections.abc import Iterable

PUBLIC_MAX_BYTES = 64 * 1024  # larger files are never public content (licences are ~35 KiB)
TEMPLATE_DIRS = ("/usr/share/git-core/templates",)
LICENCE_DIRS = ("/usr/share/common-licenses",)
_NOTICE_LINES = 6
_NOTICE_BYTES = 600

# A copyright notice: "Copyright (c) 2024 Name", "Copyright 2024 Name", "(C) 2007 ...",
# "© 2020 ...", "Copyright [yyyy] [name of copyright owner]". Not "copyright license to
# reproduce" (the body of a licence).
_NOTICE = re.compile(
    r"\s*(?:portions\s+)?(?:copyright\s*(?:\(c\)|©|\d{4}|\[yyyy\]|\{yyyy\}|<year>)|\(c\)\s*\d{4}|©)",
    re.IGNORECASE,
)
# Titles some copies put above a pasted licence ("MIT License", "The MIT License (MIT)").
_TITLE = re.compile(r"\s*(?:the\s+)?[\w.\- ]{0,30}licen[cs]e(?:\s*\([\w.\- ]{0,20}\))?\s*$", re.I)

_MIT = """Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

_ISC = """Permission to use, copy, modify, and/or distribute this software for any
purpose with or without fee is hereby granted, provided that the above
copyright notice and this permission notice appear in all copies.

THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHOR DISCLAIMS ALL WARRANTIES
WITH REGARD TO THIS SOFTWARE INCLUDING ALL IMPLIED WARRANTIES OF
MERCHANTABILITY AND FITNESS. IN NO EVENT SHALL THE AUTHOR BE LIABLE FOR
ANY SPECIAL, DIRECT, INDIRECT, OR CONSEQUENTIAL DAMAGES OR ANY DAMAGES
WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS, WHETHER IN AN
ACTION OF CONTRACT, NEGLIGENCE OR OTHER TORTIOUS ACTION, ARISING OUT OF
OR IN CONNECTION WITH THE USE OR PERFORMANCE OF THIS SOFTWARE.
"""

_BSD_CLAUSES = """Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.
"""
_BSD_3 = """
3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.
"""
_BSD_DISCLAIMER = """
THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""
EMBEDDED_LICENCES = (
    _MIT,
    _ISC,
    _BSD_CLAUSES + _BSD_DISCLAIMER,
    _BSD_CLAUSES + _BSD_3 + _BSD_DISCLAIMER,
)


def _fingerprint(text: str, *, bounded: bool) -> bytes | None:
    """The licence-comparison digest of `text`: copyright notices and a title line left out,
    case and whitespace folded. With `bounded`, None when more notice text is left out than
    a licence has (the rest would not be what was compared)."""
    kept: list[str] = []
    dropped = dropped_bytes = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        if _NOTICE.match(line) or (not kept and _TITLE.match(line)):
            dropped += 1
            dropped_bytes += len(line)
            if bounded and (dropped > _NOTICE_LINES or dropped_bytes > _NOTICE_BYTES):
                return None
            continue
        kept.append(line)
    folded = " ".join(" ".join(kept).lower().split())
    if not folded:
        return None
    return hashlib.blake2b(folded.encode(), digest_size=20).digest()


def _files(dirs: Iterable[str]) -> Iterable[str]:
    for top in dirs:
        for root, _subdirs, names in os.walk(top):
            for name in names:
                yield os.path.join(root, name)


def read_bounded(path: str) -> bytes | None:
    """A file's whole content if it is at most PUBLIC_MAX_BYTES (no link followed, never
    blocking on a FIFO); None otherwise or when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, PUBLIC_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= PUBLIC_MAX_BYTES else None


def _exact(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=20).digest()


class PublicContent:
    """Is this content public boilerplate? Reference sets are read once, on first use."""

    def __init__(
        self,
        template_dirs: Iterable[str] = TEMPLATE_DIRS,
        licence_dirs: Iterable[str] = LICENCE_DIRS,
        licences: Iterable[str] = EMBEDDED_LICENCES,
    ) -> None:
        self._template_dirs = tuple(template_dirs)
        self._licence_dirs = tuple(licence_dirs)
        self._embedded = tuple(licences)
        self._templates: frozenset[bytes] | None = None
        self._licences: frozenset[bytes] | None = None

    def _load(self) -> tuple[frozenset[bytes], frozenset[bytes]]:
        if self._templates is None or self._licences is None:
            templates = set()
            for path in _files(self._template_dirs):
                data = read_bounded(path)
                if data:
                    templates.add(_exact(data))
            licences = set()
            texts = list(self._embedded)
            for path in _files(self._licence_dirs):
                data = read_bounded(path)
                if data:
                    texts.append(data.decode("utf-8", "replace"))
            for text in texts:
                fp = _fingerprint(text, bounded=False)
                if fp is not None:
                    licences.add(fp)
            self._templates, self._licences = frozenset(templates), frozenset(licences)
        return self._templates, self._licences

    def is_public(self, data: bytes, *, unwrap: bool = True) -> bool:
        """Whether `data` (a whole file) is public boilerplate: empty, a git template file, a
        licence text, or git's loose object of one of those."""
        if len(data) > PUBLIC_MAX_BYTES:
            return False
        if not data.strip():
            return True
        inner = _loose_blob(data) if unwrap else None
        if inner is not None:
            return self.is_public(inner, unwrap=False)
        templates, licences = self._load()
        if _exact(data) in templates:
            return True
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        fp = _fingerprint(text, bounded=True)
        return fp is not None and fp in licences


def _loose_blob(data: bytes) -> bytes | None:
    """The content of a git loose blob object (zlib of b"blob <size>\\0<content>"), or None
    when `data` is not one, or is one larger than public content can be."""
    if data[:1] != b"x":  # a zlib header's first byte (deflate, 32 KiB window)
        return None
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, PUBLIC_MAX_BYTES + 32)
    except zlib.error:
        return None
    if not inflater.eof or inflater.unused_data or not raw.startswith(b"blob "):
        return None
    header, sep, content = raw.partition(b"\0")
    if not sep or header[5:] != str(len(content)).encode():
        return None
    return content
