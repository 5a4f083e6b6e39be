"""A terminal sink: one readable line per alert or health record, for whoever watches a console."""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import IO, Any

# Each rendered value (title, user, path, a health key...) is cut to this many characters,
# keeping its head and tail around a "…": the file name at the end of a deep path and the
# tree at its start are what a reader needs; the middle is what an attacker pads.
FIELD_MAX = 120
RAW_MAX = 2 * FIELD_MAX  # a line that is not a JSON object is shown (escaped) up to this
ELLIPSIS = "…"

RESET = "\x1b[0m"
# (lowest event.severity, label, SGR prefix), highest first. The numbers are Elastic's risk
# scores the rules' levels map to (agent/rules/model.py SEVERITY); a value in between takes
# the band below it, so a SIEM-side re-score still renders.
SEVERITY_BANDS: tuple[tuple[int, str, str], ...] = (
    (99, "CRITICAL", "\x1b[1;31m"),
    (73, "HIGH", "\x1b[31m"),
    (47, "MEDIUM", "\x1b[33m"),
    (21, "LOW", "\x1b[36m"),
    (0, "INFO", "\x1b[2m"),
)
_LEVEL_BY_NAME = {"critical": 99, "high": 73, "medium": 47, "low": 21, "informational": 1}
# Health records by log.level: (label, SGR prefix).
HEALTH_LEVELS: Mapping[str, tuple[str, str]] = {
    "error": ("ERROR", "\x1b[31m"),
    "warning": ("WARNING", "\x1b[33m"),
    "info": ("INFO", "\x1b[2m"),
}
_DIM = "\x1b[2m"
LABEL_WIDTH = 8  # len("CRITICAL")

# The heartbeat repeats every counter every interval: on a console it would bury the alerts,
# and its numbers are better read from the metrics endpoint (agent/metrics.py).
SKIPPED_ACTIONS = frozenset({"heartbeat"})

# The 2-4 keys of a health record's data worth a glance, per action; other actions take the
# first keys of HEALTH_KEYS they have, then any other keys in record order.
ACTION_KEYS: Mapping[str, tuple[str, ...]] = {
    "sink_error": ("sink", "error", "pending", "failures"),
    "sink_recovered": ("sink", "delivered_late", "dropped", "outage_s"),
    "event_loss": ("sink", "source", "root", "kind", "dropped", "unwritten", "count"),
    "rules_reload_rejected": ("errors", "problems"),
    "rules_rejected": ("errors", "problems"),
    "config_reload_rejected": ("config", "problems"),
    "rules_loaded": ("rules", "correlations", "disabled", "files"),
    "rules_reloaded": ("rules", "correlations", "disabled", "files"),
    "agent_started": ("version", "pid", "config"),
    "agent_stopped": ("drained", "unwritten"),
    "cap_reached": ("cap", "hits", "rule"),
    "watch_limit_reached": ("root", "count", "watches", "max_user_watches"),
    "kernel_settings_low": ("settings",),
    "enrichment_skipped": ("skipped",),
}
HEALTH_KEYS = (
    "sink",
    "source",
    "component",
    "stage",
    "root",
    "path",
    "directory",
    "kind",
    "error",
    "message",
    "count",
    "sample",
    "dropped",
    "cap",
    "hits",
    "problems",
)
MAX_KEYS = 4
_NOT_SHOWN = frozenset({"hint"})  # the hint is appended last, on warnings and errors only

_TIME = re.compile(r"\d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d)")
_NEEDS_QUOTES = re.compile(r'[\s"]')


def _escape_char(c: str) -> str:
    """`c` as Python's repr writes a character it will not print: \\n, \\x1b, \\u202e, \\udcff."""
    return repr(c)[1:-1]


def clean(text: str, limit: int = FIELD_MAX) -> str:
    """`text` with every character that is not printable (controls, bidi and other format
    characters, line and paragraph separators, spaces other than ' ', lone surrogates)
    escaped, then cut to `limit` characters in the middle. An escape is never cut in two."""
    if text.isprintable() and len(text) <= limit:
        return text  # the common case, in C
    parts = [c if c.isprintable() else _escape_char(c) for c in text]
    total = sum(len(p) for p in parts)
    if total <= limit:
        return "".join(parts)
    room = max(limit - len(ELLIPSIS), 2)
    head_room = (room + 1) // 2
    tail_room = room - head_room
    head: list[str] = []
    used = 0
    for p in parts:
        if used + len(p) > head_room:
            break
        head.append(p)
        used += len(p)
    tail: list[str] = []
    used = 0
    for p in reversed(parts):
        if used + len(p) > tail_room:
            break
        tail.append(p)
        used += len(p)
    return "".join(head) + ELLIPSIS + "".join(reversed(tail))


def _empty(value: Any) -> bool:
    return value is None or value in ([], {}, "")


def _value(value: Any, limit: int = FIELD_MAX) -> str | None:
    """One value for `key=value`: None for nothing to show. A list shows its first item and
    how many more; a mapping its scalar items. Quoted when it holds a space or a quote, so a
    file named 'x  user=root' cannot pass for another field."""
    if _empty(value):
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, str | int):
        text = str(value)
    elif isinstance(value, list):
        first = _value(value[0], limit)
        more = f" (+{len(value) - 1} more)" if len(value) > 1 else ""
        return None if first is None else first + more
    elif isinstance(value, dict):
        items = [
            f"{k}:{v}"
            for k, v in value.items()
            if isinstance(v, str | int | float) and not isinstance(v, bool)
        ]
        text = ",".join(items)
        if not text:
            return None
    else:
        text = str(value)
    text = clean(text, limit)
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _get(record: Mapping[str, Any], *path: str) -> Any:
    node: Any = record
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _time(record: Mapping[str, Any]) -> str:
    """HH:MM:SS in UTC, as `@timestamp` has it: the same clock the SIEM and the JSON lines
    use, so a console line is found there by its time without converting."""
    ts = record.get("@timestamp")
    m = _TIME.match(ts) if isinstance(ts, str) else None
    return m.group(1) if m else "--:--:--"


def _severity(record: Mapping[str, Any]) -> tuple[str, str]:
    sev = _get(record, "event", "severity")
    if not isinstance(sev, int | float) or isinstance(sev, bool):
        level = _get(record, "exfilwatch", "level")
        sev = _LEVEL_BY_NAME.get(level, 0) if isinstance(level, str) else 0
    for floor, label, sgr in SEVERITY_BANDS:
        if sev >= floor:
            return label, sgr
    return SEVERITY_BANDS[-1][1], SEVERITY_BANDS[-1][2]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _pairs(pairs: Sequence[tuple[str, Any]]) -> list[str]:
    out = []
    for key, value in pairs:
        text = _value(value)
        if text is not None:
            out.append(f"{key}={text}")
    return out


def _process(record: Mapping[str, Any]) -> str | None:
    name, pid = _get(record, "process", "name"), _get(record, "process", "pid")
    if name is None and pid is None:
        return None
    text = clean(str(name) if name is not None else "?")
    if isinstance(pid, int) and not isinstance(pid, bool):
        text += f"[{pid}]"
    return '"' + text.replace('"', '\\"') + '"' if _NEEDS_QUOTES.search(text) else text


def _actor(record: Mapping[str, Any]) -> list[str]:
    user = _get(record, "user", "name")
    if user is None:
        user = _get(record, "user", "id")
    login = _get(record, "exfilwatch", "attribution", "login_user")
    fields = _pairs([("user", user)])
    if login is not None and login != user:
        fields += _pairs([("login", login)])
    process = _process(record)
    if process is not None:
        fields.append(f"process={process}")
    return fields


def _destination(record: Mapping[str, Any]) -> str | None:
    location = _get(record, "exfilwatch", "location", "class")
    if not isinstance(location, str):
        return None
    provider = _get(record, "exfilwatch", "location", "provider")
    return f"{location}/{provider}" if isinstance(provider, str) else location


def _alert(record: Mapping[str, Any]) -> tuple[str, str]:
    label, sgr = _severity(record)
    title = _get(record, "rule", "name") or _get(record, "event", "reason")
    title = title or _get(record, "rule", "id") or "alert"
    fields = [clean(str(title))]
    reason = _get(record, "event", "reason")
    if reason != title:  # build_alert's reason is the title; marker_tampered's says what
        fields += _pairs([("reason", reason)])
    fields += _actor(record)
    fields += _pairs(
        [
            ("path", _get(record, "file", "path")),
            ("from", _get(record, "exfilwatch", "src_path")),
            ("origin", _get(record, "exfilwatch", "lineage", "origin_path")),
            ("dest", _destination(record)),
        ]
    )
    corr = _get(record, "exfilwatch", "correlation")
    if isinstance(corr, dict):
        nbytes = corr.get("bytes")
        fields += _pairs(
            [
                ("count", corr.get("count")),
                ("files", corr.get("distinct_files")),
                ("bytes", _size(nbytes) if isinstance(nbytes, int) and nbytes > 0 else None),
            ]
        )
    fields += _pairs([("suppressed", _get(record, "exfilwatch", "suppressed_count"))])
    return f"{_time(record)}  {label:<{LABEL_WIDTH}}  " + "  ".join(fields), sgr


def _health_keys(action: str, data: Mapping[str, Any]) -> list[str]:
    wanted = ACTION_KEYS.get(action, HEALTH_KEYS)
    keys = [k for k in wanted if not _empty(data.get(k))][:MAX_KEYS]
    for k in data:
        if len(keys) >= MAX_KEYS:
            break
        if k not in keys and k not in _NOT_SHOWN and not _empty(data[k]):
            keys.append(k)
    return keys


def _health(record: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[str, str] | None:
    action = _get(record, "event", "action")
    action = action if isinstance(action, str) else "health"
    if action in SKIPPED_ACTIONS:
        return None
    level = _get(record, "log", "level")
    label, sgr = HEALTH_LEVELS.get(level if isinstance(level, str) else "", ("INFO", _DIM))
    fields = [clean(action)]
    fields += _pairs([("reason", _get(record, "event", "reason"))])
    fields += _pairs([(k, data[k]) for k in _health_keys(action, data)])
    if level in ("warning", "error"):
        fields += _pairs([("hint", data.get("hint"))])
    return f"{_time(record)}  {label:<{LABEL_WIDTH}}  " + "  ".join(fields), sgr


def _event(record: Mapping[str, Any]) -> tuple[str, str]:
    action = _get(record, "event", "action")
    fields = [clean(str(action) if action is not None else "event")]
    fields += _actor(record)
    fields += _pairs([("path", _get(record, "file", "path")), ("dest", _destination(record))])
    return f"{_time(record)}  {'EVENT':<{LABEL_WIDTH}}  " + "  ".join(fields), _DIM


def _raw(line: str) -> tuple[str, str]:
    return f"--:--:--  {'RAW':<{LABEL_WIDTH}}  {clean(line, RAW_MAX)}", _DIM


def pretty_line(line: str, *, colour: bool) -> str | None:
    """One readable line for one JSON record line, or None for a record not worth a line
    (the heartbeat). Never raises, and never returns a newline or any control character
    other than the SGR colour codes it adds itself when `colour`.

    Alerts (event.kind "alert", including marker_tampered):
      `HH:MM:SS  HIGH      <rule title>  user=  login=  process=name[pid]  path=  from=
      origin=  dest=class/provider  count=  files=  bytes=  suppressed=`, each field only
      when the record has it. Health records: `HH:MM:SS  ERROR     <action>  reason=  <2-4
      keys>  hint=` (hint on warnings and errors only). Other events: a dim EVENT line. A
      line that is not a JSON object: a dim RAW line with the line escaped. Times are UTC.
      Each value is escaped (see `clean`) and cut to FIELD_MAX characters in the middle."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        record = None
    try:
        if not isinstance(record, dict):
            out: tuple[str, str] | None = _raw(line)
        elif _get(record, "event", "kind") == "alert":
            out = _alert(record)
        elif isinstance(_get(record, "exfilwatch", "health"), dict):
            out = _health(record, record["exfilwatch"]["health"])
        else:
            out = _event(record)
    except Exception:  # a record of an unforeseen shape still prints, as what it is
        out = _raw(line)
    if out is None:
        return None
    text, sgr = out
    return f"{sgr}{text}{RESET}" if colour else text


def colour_wanted(stream: IO[str]) -> bool:
    """Colour on a terminal, unless NO_COLOR is set to anything but "" (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # a closed or detached stream
        return False


class PrettySink:
    """Writes `pretty_line` of each record to a text stream and flushes. A write to the stream
    that fails raises OSError, which the router counts and retries like any sink's."""

    def __init__(
        self, stream: IO[str], *, colour: bool | None = None, name: str = "pretty"
    ) -> None:
        self.name = name
        self._stream = stream
        self.colour = colour_wanted(stream) if colour is None else colour
        # On a stream that cannot encode every character (LANG=C on an old Python, a pipe
        # opened as ASCII) a printable non-ASCII name is written \xe9-escaped: a
        # UnicodeEncodeError would otherwise fail every later batch too.
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            self._encoding: str | None = (
                None if codecs.lookup(encoding).name == "utf-8" else encoding
            )
        except LookupError:
            self._encoding = "ascii"

    def write(self, lines: Sequence[str]) -> None:
        out = [
            p for p in (pretty_line(line, colour=self.colour) for line in lines) if p is not None
        ]
        if not out:
            return
        text = "\n".join(out) + "\n"
        if self._encoding is not None:
            text = text.encode(self._encoding, "backslashreplace").decode(self._encoding)
        self._stream.write(text)
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()
