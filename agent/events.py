"""The Event model: ECS field names, dotted-name access, lossless JSON-lines round trip."""

from __future__ import annotations

import base64
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import msgspec
from msgspec.structs import astuple as _astuple
from msgspec.structs import replace as _struct_replace

from agent.diagnostics import Problem

# Actions a file source produces. "moved" has both ends inside watched trees; "moved_out"
# and "moved_in" have one end outside (the other end is unknown to inotify).
FILE_ACTIONS = (
    "created",
    "modified",
    "deleted",
    "moved",
    "moved_in",
    "moved_out",
    "opened",
    "closed_write",
    "closed_nowrite",
    "attributes_changed",
    "rescanned",
)

# ECS event.type per action (allowed values of the ECS event.type field).
_EVENT_TYPES: dict[str, tuple[str, ...]] = {
    "created": ("creation",),
    "modified": ("change",),
    "deleted": ("deletion",),
    "moved": ("change",),
    "moved_in": ("creation",),
    "moved_out": ("deletion",),
    "opened": ("access",),
    "closed_write": ("change",),
    "closed_nowrite": ("access",),
    "attributes_changed": ("change",),
    "rescanned": ("info",),
}

EVENT_DATASETS = frozenset({"exfilwatch.file", "exfilwatch.process"})
SOURCES = (
    "inotify",
    "watchdog",
    "polling",
    "scan",
    "rescan",
    "process_poll",
    "proc_connector",
    "test",
)


class Event(msgspec.Struct, frozen=True, gc=False):
    """One normalized file event. Attribute names are short; `FIELDS` maps them to ECS names.

    A frozen msgspec Struct: as immutable and typed as a NamedTuple, but built in a sixth of
    the time, and `evolve` (msgspec.structs.replace) copies it in an eighth of a NamedTuple's
    `_replace`, which the stages call for most events. Not tracked by the garbage collector:
    an event holds only strings, numbers and tuples of strings, never a cycle."""

    timestamp_us: int
    action: str
    path: str
    category: str = "file"
    file_type: str | None = None
    size: int | None = None
    uid: str | None = None
    gid: str | None = None
    inode: str | None = None
    mode: str | None = None
    mtime_us: int | None = None
    src_path: str | None = None
    tags: tuple[str, ...] = ()
    sensitivity: str | None = None
    root: str | None = None
    source: str = "inotify"
    sequence: int = 0
    hostname: str | None = None
    user_name: str | None = None
    user_id: str | None = None
    process_pid: int | None = None
    process_name: str | None = None
    process_executable: str | None = None
    process_command_line: str | None = None
    process_parent_name: str | None = None
    # Filled by enrichment (destinations, lineage, watchlist); rules address them already.
    location: str | None = None
    location_provider: str | None = None
    watchlist: str | None = None
    # Days to the listed user's last working day (0 on it, negative after).
    watchlist_days: int | None = None
    off_hours: bool | None = None  # outside the configured working hours
    # Per-user egress memory (enrich/history.py): a destination the user never used before,
    # and today's copies against the user's usual.
    history_first_use: bool | None = None
    history_ratio: float | None = None
    lineage_origin: str | None = None
    lineage_tags: tuple[str, ...] = ()
    archive_tagged: int | None = None
    disguise: tuple[str, ...] = ()
    # Who did it (attribution): see agent/enrich/attribution.py.
    process_parent_pid: int | None = None
    process_working_directory: str | None = None
    user_login_name: str | None = None
    user_login_id: str | None = None
    attribution: str | None = None  # exact | inferred | none
    attribution_method: str | None = None
    masquerade: str | None = None
    # Content checks (hashing, sniffing, archives) left out, and why: over_budget, queue_full.
    enrichment_skipped: str | None = None
    # Hard links to the file (from lstat): a tagged file linked from elsewhere can be read
    # there without an event in the tree.
    nlink: int | None = None
    # An archive listing cut short by a limit (members past it unknown).
    archive_truncated: bool | None = None
    # The process as exec gave it (process connector): its argument vector, and its parent's
    # executable and command line (an archiver started by a script names the script).
    process_args: tuple[str, ...] = ()
    process_parent_executable: str | None = None
    process_parent_command_line: str | None = None
    # A sanctioned destination (config `trusted:`): shipped rules skip it, a summary counts it.
    location_trusted: bool | None = None
    # The tagged origin's sensitivity, and how the copy was made when it is not a plain copy
    # (decoded base64/hex/uuencode, a MIME attachment, split chunks, a git bundle or clone).
    lineage_sensitivity: str | None = None
    lineage_via: str | None = None
    # A tagged file written over: same_size (dd conv=notrunc, shred), rewritten (in place,
    # another size), replaced (a new file renamed over it).
    overwrite: str | None = None
    # A delete in a tagged tree: files of its directory deleted by then (10-minute window),
    # and their share of the directory's files.
    dir_deleted: int | None = None
    dir_deleted_share: float | None = None

    @property
    def time(self) -> float:
        """Seconds since the epoch (for engines that take `now` as a float)."""
        return self.timestamp_us / 1_000_000

    @property
    def name(self) -> str:
        path = self.path  # posixpath.basename without its fspath and type checks (hot)
        return path[path.rfind("/") + 1 :]

    @property
    def directory(self) -> str:
        return posixpath.dirname(self.path)

    @property
    def extension(self) -> str | None:
        path = self.path
        name = path[path.rfind("/") + 1 :]
        dot = name.rfind(".")
        return name[dot + 1 :].lower() if dot > 0 and dot < len(name) - 1 else None

    @property
    def event_type(self) -> tuple[str, ...]:
        return _EVENT_TYPES.get(self.action, ("info",))

    def get(self, dotted: str) -> Any:
        """The value of an ECS dotted field name (KeyError for a name we do not know)."""
        return FIELDS[dotted](self)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return event_line(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        return from_dict(data)

    @classmethod
    def from_json(cls, line: str) -> Event:
        value = json.loads(line)
        if not isinstance(value, dict):
            raise ValueError("an event line must hold a JSON object")
        return from_dict(value)

    def evolve(self, **changes: Any) -> Event:
        return _struct_replace(self, **changes)


# dotted ECS / custom name -> getter. This table is the contract rules address.
FIELDS: dict[str, Callable[[Event], Any]] = {
    "@timestamp": lambda e: e.timestamp_us,
    "event.action": lambda e: e.action,
    "event.category": lambda e: e.category,
    "event.type": lambda e: e.event_type,
    "event.sequence": lambda e: e.sequence,
    "file.path": lambda e: e.path,
    "file.name": lambda e: e.name,
    "file.directory": lambda e: e.directory,
    "file.extension": lambda e: e.extension,
    "file.type": lambda e: e.file_type,
    "file.size": lambda e: e.size,
    "file.uid": lambda e: e.uid,
    "file.gid": lambda e: e.gid,
    "file.inode": lambda e: e.inode,
    "file.mode": lambda e: e.mode,
    "file.mtime": lambda e: e.mtime_us,
    "host.hostname": lambda e: e.hostname,
    "user.name": lambda e: e.user_name,
    "user.id": lambda e: e.user_id,
    "process.pid": lambda e: e.process_pid,
    "process.name": lambda e: e.process_name,
    "process.executable": lambda e: e.process_executable,
    "process.command_line": lambda e: e.process_command_line,
    "process.parent.name": lambda e: e.process_parent_name,
    "process.parent.pid": lambda e: e.process_parent_pid,
    "process.working_directory": lambda e: e.process_working_directory,
    "exfilwatch.attribution.confidence": lambda e: e.attribution,
    "exfilwatch.attribution.method": lambda e: e.attribution_method,
    "exfilwatch.attribution.login_user": lambda e: e.user_login_name,
    "exfilwatch.attribution.login_uid": lambda e: e.user_login_id,
    "exfilwatch.attribution.masquerade": lambda e: e.masquerade,
    "exfilwatch.src_path": lambda e: e.src_path,
    "exfilwatch.tags": lambda e: e.tags,
    "exfilwatch.sensitivity": lambda e: e.sensitivity,
    "exfilwatch.root": lambda e: e.root,
    "exfilwatch.source": lambda e: e.source,
    "exfilwatch.location.class": lambda e: e.location,
    "exfilwatch.location.provider": lambda e: e.location_provider,
    "exfilwatch.watchlist.status": lambda e: e.watchlist,
    "exfilwatch.watchlist.days_to_last_day": lambda e: e.watchlist_days,
    "exfilwatch.off_hours": lambda e: e.off_hours,
    "exfilwatch.history.first_use": lambda e: e.history_first_use,
    "exfilwatch.history.ratio": lambda e: e.history_ratio,
    "exfilwatch.lineage.origin_path": lambda e: e.lineage_origin,
    "exfilwatch.lineage.origin_tags": lambda e: e.lineage_tags,
    "exfilwatch.archive.tagged_members": lambda e: e.archive_tagged,
    "exfilwatch.disguise": lambda e: e.disguise,
    "exfilwatch.enrichment.skipped": lambda e: e.enrichment_skipped,
    "exfilwatch.file.nlink": lambda e: e.nlink,
    "exfilwatch.archive.truncated": lambda e: e.archive_truncated,
    "process.args": lambda e: e.process_args,
    "process.parent.executable": lambda e: e.process_parent_executable,
    "process.parent.command_line": lambda e: e.process_parent_command_line,
    "exfilwatch.location.trusted": lambda e: e.location_trusted,
    "exfilwatch.lineage.origin_sensitivity": lambda e: e.lineage_sensitivity,
    "exfilwatch.lineage.via": lambda e: e.lineage_via,
    "exfilwatch.file.overwrite": lambda e: e.overwrite,
    "exfilwatch.directory.deleted": lambda e: e.dir_deleted,
    "exfilwatch.directory.deleted_share": lambda e: e.dir_deleted_share,
}

# Fields that hold a path: may carry bytes that are not UTF-8 (kept as surrogate escapes).
_PATH_FIELDS = ("path", "src_path", "root")
_PATH_NAMES = {"path": "file.path", "src_path": "exfilwatch.src_path", "root": "exfilwatch.root"}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _second(sec: int) -> str:
    d = _EPOCH + timedelta(seconds=sec)
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}."


_MIN_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z
_MAX_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_SECONDS: dict[int, str] = {}  # second -> its text; cleared at 4,096 entries
_SECONDS_CAP = 4096


def format_timestamp(us: int) -> str:
    """ISO 8601 UTC with microseconds, exact for integer microseconds. A time outside the
    years 1-9999 (a forged mtime) is clamped: it must never stop an event from being written."""
    if not _MIN_US <= us <= _MAX_US:
        us = min(max(us, _MIN_US), _MAX_US)
    sec, frac = divmod(us, 1_000_000)
    prefix = _SECONDS.get(sec)
    if prefix is None:
        if len(_SECONDS) >= _SECONDS_CAP:
            _SECONDS.clear()
        prefix = _SECONDS[sec] = _second(sec)
    return prefix + str(frac + 1_000_000)[1:] + "Z"


def parse_timestamp(text: str) -> int:
    if not isinstance(text, str) or not text.endswith("Z"):
        raise ValueError(f"timestamp must be ISO 8601 UTC ending in Z: {text!r}")
    main, _, frac = text[:-1].partition(".")
    dt = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    digits = (frac + "000000")[:6] if frac else "000000"
    if not digits.isdigit():
        raise ValueError(f"bad fractional seconds in {text!r}")
    return int(dt.timestamp()) * 1_000_000 + int(digits)


def text_and_raw(value: str) -> tuple[str, str | None]:
    """Printable text for SIEMs, plus base64 of the exact bytes when the text is not the name.

    A UTF-8 name without a backslash is its own text. Any other name is escaped: each
    backslash doubled, each byte that is not UTF-8 written `\\xNN`, and the raw form added.
    Escaping backslashes too makes the text one-to-one: the byte 0xff prints `\\xff`, a name
    holding the four characters `\\xff` prints `\\\\xff`, so two names that differ in bytes
    never print the same text, whether or not a reader looks at the raw form."""
    if "\\" not in value:
        if value.isascii():
            return value, None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return value, None
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        # A lone surrogate no file system gives (a hand-written event); never refuse to write.
        raw = value.encode("utf-8", "surrogatepass")
    text = raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return text, base64.b64encode(raw).decode("ascii")


def _user(e: Event) -> dict[str, Any]:
    return {k: v for k, v in (("name", e.user_name), ("id", e.user_id)) if v is not None}


def _process(e: Event) -> dict[str, Any]:
    process: dict[str, Any] = {
        k: v
        for k, v in (
            ("pid", e.process_pid),
            ("name", e.process_name),
            ("executable", e.process_executable),
            ("command_line", e.process_command_line),
            ("working_directory", e.process_working_directory),
        )
        if v is not None
    }
    if e.process_args:
        process["args"] = list(e.process_args)
    parent = {
        k: v
        for k, v in (
            ("pid", e.process_parent_pid),
            ("name", e.process_parent_name),
            ("executable", e.process_parent_executable),
            ("command_line", e.process_parent_command_line),
        )
        if v is not None
    }
    if parent:
        process["parent"] = parent
    return process


def _attribution(e: Event) -> dict[str, Any]:
    return {
        k: v
        for k, v in (
            ("confidence", e.attribution),
            ("method", e.attribution_method),
            ("login_user", e.user_login_name),
            ("login_uid", e.user_login_id),
            ("masquerade", e.masquerade),
        )
        if v is not None
    }


def to_dict(e: Event) -> dict[str, Any]:
    """Nested ECS-shaped dict; absent values are left out."""
    raw: dict[str, str] = {}
    path_text, path_raw = text_and_raw(e.path)
    if path_raw is not None:
        raw["file.path"] = path_raw
    directory, name = _split(path_text)
    file: dict[str, Any] = {"path": path_text, "name": name, "directory": directory}
    ext = e.extension
    if ext is not None:
        file["extension"] = text_and_raw(ext)[0]
    for key, value in (
        ("type", e.file_type),
        ("size", e.size),
        ("uid", e.uid),
        ("gid", e.gid),
        ("inode", e.inode),
        ("mode", e.mode),
    ):
        if value is not None:
            file[key] = value
    if e.mtime_us is not None:
        file["mtime"] = format_timestamp(e.mtime_us)
    custom: dict[str, Any] = {"source": e.source}
    if e.tags:
        custom["tags"] = list(e.tags)
    if e.sensitivity is not None:
        custom["sensitivity"] = e.sensitivity
    for attr in ("src_path", "root"):
        value = getattr(e, attr)
        if value is not None:
            text, r = text_and_raw(value)
            custom[attr] = text
            if r is not None:
                raw[_PATH_NAMES[attr]] = r
    location = {
        k: v
        for k, v in (
            ("class", e.location),
            ("provider", e.location_provider),
            ("trusted", e.location_trusted),
        )
        if v is not None
    }
    if location:
        custom["location"] = location
    attribution = _attribution(e)
    if attribution:
        custom["attribution"] = attribution
    if e.watchlist is not None or e.watchlist_days is not None:
        custom["watchlist"] = {
            k: v
            for k, v in (("status", e.watchlist), ("days_to_last_day", e.watchlist_days))
            if v is not None
        }
    if e.off_hours is not None:
        custom["off_hours"] = e.off_hours
    if e.history_first_use is not None or e.history_ratio is not None:
        custom["history"] = {
            k: v
            for k, v in (("first_use", e.history_first_use), ("ratio", e.history_ratio))
            if v is not None
        }
    lineage: dict[str, Any] = {}
    if e.lineage_origin is not None:
        text, r = text_and_raw(e.lineage_origin)
        lineage["origin_path"] = text
        if r is not None:
            raw["exfilwatch.lineage.origin_path"] = r
    if e.lineage_tags:
        lineage["origin_tags"] = list(e.lineage_tags)
    if e.lineage_sensitivity is not None:
        lineage["origin_sensitivity"] = e.lineage_sensitivity
    if e.lineage_via is not None:
        lineage["via"] = e.lineage_via
    if lineage:
        custom["lineage"] = lineage
    archive: dict[str, Any] = {}
    if e.archive_tagged is not None:
        archive["tagged_members"] = e.archive_tagged
    if e.archive_truncated is not None:
        archive["truncated"] = e.archive_truncated
    if archive:
        custom["archive"] = archive
    if e.nlink is not None or e.overwrite is not None:
        custom["file"] = {
            k: v for k, v in (("nlink", e.nlink), ("overwrite", e.overwrite)) if v is not None
        }
    if e.disguise:
        custom["disguise"] = list(e.disguise)
    if e.dir_deleted is not None or e.dir_deleted_share is not None:
        custom["directory"] = {
            k: v
            for k, v in (("deleted", e.dir_deleted), ("deleted_share", e.dir_deleted_share))
            if v is not None
        }
    if e.enrichment_skipped is not None:
        custom["enrichment"] = {"skipped": e.enrichment_skipped}
    if raw:
        custom["raw"] = raw
    out: dict[str, Any] = {
        "@timestamp": format_timestamp(e.timestamp_us),
        "event": {
            "kind": "event",
            "category": [e.category],
            "type": list(e.event_type),
            "action": e.action,
            "sequence": e.sequence,
            "module": "exfilwatch",
            "dataset": f"exfilwatch.{e.category}",
        },
        "file": file,
        "exfilwatch": custom,
    }
    if e.hostname is not None:
        out["host"] = {"hostname": e.hostname}
    user = _user(e)
    if user:
        out["user"] = user
    process = _process(e)
    if process:
        out["process"] = process
    return out


def _split(path: str) -> tuple[str, str]:
    """(dirname, basename) as posixpath gives them, without its cost on ordinary paths."""
    slash = path.rfind("/")
    if slash > 0 and path[slash - 1] != "/" and "//" not in path:
        return path[:slash], path[slash + 1 :]
    return posixpath.dirname(path), posixpath.basename(path)


# The ECS shape of an event line as msgspec Structs: encoded in C, absent values left out
# (omit_defaults), keys in the order `to_dict` gives them, so both write the same line.
class _Ecs(msgspec.Struct, omit_defaults=True, gc=False):
    pass


class _EcsEvent(_Ecs):
    kind: str
    category: tuple[str]
    type: tuple[str, ...]
    action: str
    sequence: int
    module: str
    dataset: str


class _EcsFile(_Ecs):
    path: str
    name: str
    directory: str
    extension: str | None = None
    type: str | None = None
    size: int | None = None
    uid: str | None = None
    gid: str | None = None
    inode: str | None = None
    mode: str | None = None
    mtime: str | None = None


class _Location(_Ecs):
    class_: str | None = msgspec.field(default=None, name="class")
    provider: str | None = None
    trusted: bool | None = None


class _Attribution(_Ecs):
    confidence: str | None = None
    method: str | None = None
    login_user: str | None = None
    login_uid: str | None = None
    masquerade: str | None = None


class _Watchlist(_Ecs):
    status: str | None = None
    days_to_last_day: int | None = None


class _History(_Ecs):
    first_use: bool | None = None
    ratio: float | None = None


class _Lineage(_Ecs):
    origin_path: str | None = None
    origin_tags: tuple[str, ...] = ()
    origin_sensitivity: str | None = None
    via: str | None = None


class _Archive(_Ecs):
    tagged_members: int | None = None
    truncated: bool | None = None


class _Nlink(_Ecs):
    nlink: int | None = None
    overwrite: str | None = None


class _Enrichment(_Ecs):
    skipped: str


class _Directory(_Ecs):
    deleted: int | None = None
    deleted_share: float | None = None


class _Custom(_Ecs):
    source: str
    tags: tuple[str, ...] = ()
    sensitivity: str | None = None
    src_path: str | None = None
    root: str | None = None
    location: _Location | None = None
    attribution: _Attribution | None = None
    watchlist: _Watchlist | None = None
    off_hours: bool | None = None
    history: _History | None = None
    lineage: _Lineage | None = None
    archive: _Archive | None = None
    file: _Nlink | None = None
    disguise: tuple[str, ...] = ()
    directory: _Directory | None = None
    enrichment: _Enrichment | None = None
    raw: dict[str, str] | None = None


class _Host(_Ecs):
    hostname: str


class _User(_Ecs):
    name: str | None = None
    id: str | None = None


class _Parent(_Ecs):
    pid: int | None = None
    name: str | None = None
    executable: str | None = None
    command_line: str | None = None


class _Process(_Ecs):
    pid: int | None = None
    name: str | None = None
    executable: str | None = None
    command_line: str | None = None
    working_directory: str | None = None
    args: tuple[str, ...] = ()
    parent: _Parent | None = None


class _Line(_Ecs):
    timestamp: str = msgspec.field(name="@timestamp")
    event: _EcsEvent
    file: _EcsFile
    exfilwatch: _Custom
    host: _Host | None = None
    user: _User | None = None
    process: _Process | None = None


_encode = msgspec.json.Encoder().encode
_DATASETS: dict[str, str] = {}
_CATEGORIES: dict[str, tuple[str]] = {}


# The file part of the last path seen: a write is opened, modified and closed_write events
# for one path in a row, so two of three events reuse it.
# One tuple, replaced whole: threads that serialize at once never see half of another's.
_last_path: tuple[str, tuple[str, str | None, str, str, str | None]] | None = None


def _file_part(path: str) -> tuple[str, str | None, str, str, str | None]:
    """(text, raw, directory, name, extension) of a path."""
    global _last_path
    last = _last_path
    if last is not None and last[0] == path:
        return last[1]
    path_text, path_raw = text_and_raw(path)
    directory, name = _split(path_text)
    if path_raw is None:  # the text is the name: its extension as `Event.extension` gives it
        dot = name.rfind(".")
        ext = name[dot + 1 :].lower() if 0 < dot < len(name) - 1 else None
    else:
        base = posixpath.basename(path)
        bdot = base.rfind(".")
        ext = base[bdot + 1 :].lower() if 0 < bdot < len(base) - 1 else None
        ext = text_and_raw(ext)[0] if ext is not None else None
    part = (path_text, path_raw, directory, name, ext)
    _last_path = (path, part)
    return part


def _ecs_file(e: Event, path: str, directory: str, name: str, ext: str | None) -> _EcsFile:
    """The file object of a line (the whole-line encoder and the file piece both use it, so
    a piece is always what the whole line holds)."""
    mtime = e.mtime_us
    return _EcsFile(
        path,
        name,
        directory,
        ext,
        e.file_type,
        e.size,
        e.uid,
        e.gid,
        e.inode,
        e.mode,
        format_timestamp(mtime) if mtime is not None else None,
    )


def _ecs_line(e: Event) -> _Line:
    raw: dict[str, str] | None = None
    path_text, path_raw, directory, name, ext = _file_part(e.path)
    if path_raw is not None:
        raw = {"file.path": path_raw}
    src = e.src_path
    if src is not None:
        src, r = text_and_raw(src)
        if r is not None:
            raw = raw or {}
            raw["exfilwatch.src_path"] = r
    root = e.root
    if root is not None:
        root, r = text_and_raw(root)
        if r is not None:
            raw = raw or {}
            raw["exfilwatch.root"] = r
    lineage = None
    if (
        e.lineage_origin is not None
        or e.lineage_tags
        or e.lineage_sensitivity is not None
        or e.lineage_via is not None
    ):
        origin = e.lineage_origin
        if origin is not None:
            origin, r = text_and_raw(origin)
            if r is not None:
                raw = raw or {}
                raw["exfilwatch.lineage.origin_path"] = r
        lineage = _Lineage(origin, e.lineage_tags, e.lineage_sensitivity, e.lineage_via)
    category = e.category
    dataset = _DATASETS.get(category)
    if dataset is None:
        dataset = _DATASETS.setdefault(category, f"exfilwatch.{category}")
        _CATEGORIES[category] = (category,)
    user = process = None
    if e.user_name is not None or e.user_id is not None:
        user = _User(e.user_name, e.user_id)
    if (
        e.process_pid is not None
        or e.process_name is not None
        or e.process_executable is not None
        or e.process_command_line is not None
        or e.process_working_directory is not None
        or e.process_args
        or e.process_parent_pid is not None
        or e.process_parent_name is not None
        or e.process_parent_executable is not None
        or e.process_parent_command_line is not None
    ):
        parent = None
        if (
            e.process_parent_pid is not None
            or e.process_parent_name is not None
            or e.process_parent_executable is not None
            or e.process_parent_command_line is not None
        ):
            parent = _Parent(
                e.process_parent_pid,
                e.process_parent_name,
                e.process_parent_executable,
                e.process_parent_command_line,
            )
        process = _Process(
            e.process_pid,
            e.process_name,
            e.process_executable,
            e.process_command_line,
            e.process_working_directory,
            e.process_args,
            parent,
        )
    return _Line(
        format_timestamp(e.timestamp_us),
        _EcsEvent(
            "event",
            _CATEGORIES[category],
            _EVENT_TYPES.get(e.action, _INFO),
            e.action,
            e.sequence,
            "exfilwatch",
            dataset,
        ),
        _ecs_file(e, path_text, directory, name, ext),
        _Custom(
            e.source,
            e.tags,
            e.sensitivity,
            src,
            root,
            _Location(e.location, e.location_provider, e.location_trusted)
            if e.location is not None
            or e.location_provider is not None
            or e.location_trusted is not None
            else None,
            _Attribution(
                e.attribution,
                e.attribution_method,
                e.user_login_name,
                e.user_login_id,
                e.masquerade,
            )
            if e.attribution is not None
            or e.attribution_method is not None
            or e.user_login_name is not None
            or e.user_login_id is not None
            or e.masquerade is not None
            else None,
            _Watchlist(e.watchlist, e.watchlist_days)
            if e.watchlist is not None or e.watchlist_days is not None
            else None,
            e.off_hours,
            _History(e.history_first_use, e.history_ratio)
            if e.history_first_use is not None or e.history_ratio is not None
            else None,
            lineage,
            _Archive(e.archive_tagged, e.archive_truncated)
            if e.archive_tagged is not None or e.archive_truncated is not None
            else None,
            _Nlink(e.nlink, e.overwrite)
            if e.nlink is not None or e.overwrite is not None
            else None,
            e.disguise,
            _Directory(e.dir_deleted, e.dir_deleted_share)
            if e.dir_deleted is not None or e.dir_deleted_share is not None
            else None,
            _Enrichment(e.enrichment_skipped) if e.enrichment_skipped is not None else None,
            raw,
        ),
        _Host(e.hostname) if e.hostname is not None else None,
        user,
        process,
    )


_INFO = ("info",)


def _whole_line(e: Event) -> tuple[bytes, bool]:
    """The line encoded in one piece, and whether msgspec wrote it (in C). json.dumps writes
    what msgspec would write as other than plain ASCII (non-ASCII characters as UTF-8, DEL as
    itself) or refuses (a lone surrogate in a process command line)."""
    try:
        out = _encode(_ecs_line(e))
    except UnicodeEncodeError:
        return dumps(to_dict(e)).encode("ascii"), False
    if out.isascii() and b"\x7f" not in out:
        return out, True
    return dumps(to_dict(e)).encode("ascii"), False


# A line is `{"@timestamp":"T","event":{E},"file":{F},...the rest...}`. In a burst the parts
# repeat: every event of a batch has the reader's time, a write is opened, modified and
# closed_write events with one stat, and every event of a tree has the same tags, root,
# place and (one process's burst) the same process. The pieces are kept as encoded bytes
# and joined, which takes a third of encoding the whole line; a piece is reused only when
# every field it was made of is equal, and it is cut from a line msgspec wrote whole (plain
# ASCII), so the bytes are the same; a line json.dumps wrote is never cut. The keys are
# slices of the event's fields in order (`astuple`): [2:11] path to mtime (the file
# object), [11:16] and [17:] everything after it but the sequence (fields are compared by
# value; each field holds one type, so equal values encode alike). One tuple per cache,
# replaced whole: threads never mix pieces.
_F_FILE = slice(2, 11)
_F_REST_A, _F_REST_B = slice(11, 16), slice(17, None)
_SEQUENCE_AT = 16
_HEAD_OPEN = b'{"@timestamp":"'
_REST_OPEN = b',"exfilwatch":{'
_SEQUENCE_MARK = b',"sequence":0,'
_EVENT_PIECES: dict[tuple[str, str], tuple[bytes, bytes]] = {}  # (action, category)
_EVENT_PIECES_CAP = 256
_last_ts: tuple[int, bytes] = (-1, b"")
_last_file: tuple[tuple[Any, ...], bytes] | None = None
_last_rest: tuple[tuple[Any, ...], tuple[Any, ...], bytes] | None = None
# The last line msgspec wrote whole, with its event's rest keys and fields: cut into pieces
# when the next event shares its rest.
_last_line: tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...], bytes] | None = None


def _event_pieces(action: str, category: str) -> tuple[bytes, bytes]:
    """The event object's bytes before and after its sequence number, with the keys and
    separators around it: `","event":{...,"sequence":` and `,"module":...},"file":`."""
    got = _EVENT_PIECES.get((action, category))
    if got is None:
        encoded = _encode(
            _EcsEvent(
                "event",
                (category,),
                _EVENT_TYPES.get(action, _INFO),
                action,
                0,
                "exfilwatch",
                f"exfilwatch.{category}",
            )
        )
        # `,"` never occurs inside a JSON string (a quote there is escaped): the mark is the
        # sequence's own place.
        at = encoded.find(_SEQUENCE_MARK)
        if at < 0 or not encoded.isascii() or b"\x7f" in encoded:
            raise _NoPieces
        cut = at + len(_SEQUENCE_MARK) - 2
        got = (b'","event":' + encoded[:cut], encoded[cut + 1 :] + b',"file":')
        if len(_EVENT_PIECES) >= _EVENT_PIECES_CAP:
            _EVENT_PIECES.clear()
        _EVENT_PIECES[(action, category)] = got
    return got


class _NoPieces(Exception):
    """This line is not made of pieces (bytes the whole-line encoder would escape)."""


def _timestamp_piece(us: int) -> bytes:
    global _last_ts
    last = _last_ts
    if last[0] == us:
        return last[1]
    text = format_timestamp(us).encode("ascii")
    _last_ts = (us, text)
    return text


def event_line_bytes(e: Event) -> bytes:
    """`dumps(to_dict(e))` as ASCII bytes: the event hot path. Property tests keep it
    identical to the general serializer, for single events and for runs of events that
    differ in one field at a time (the pieces reused)."""
    global _last_file, _last_line
    vals = _astuple(e)
    rest_a, rest_b = vals[_F_REST_A], vals[_F_REST_B]
    rest = _last_rest
    if rest is None or rest[1] != rest_b or rest[0] != rest_a:
        # Pieces are cut only once a second event shares the rest: a stream where every
        # event differs there (many processes at once) pays a comparison, not a cut.
        before = _last_line
        rest = None
        if before is not None and before[1] == rest_b and before[0] == rest_a:
            rest = _cut(before[2], before[3])
    if rest is not None:
        try:
            head, tail = _event_pieces(vals[1], vals[3])
        except _NoPieces:
            return _whole_line(e)[0]
        last_file = _last_file
        file_key = vals[_F_FILE]
        if last_file is not None and last_file[0] == file_key:
            file_bytes = last_file[1]
        else:
            got = _file_bytes(e)
            if got is None:
                return _whole_line(e)[0]
            file_bytes = got
            _last_file = (file_key, file_bytes)
        return b"".join(
            (
                _HEAD_OPEN,
                _timestamp_piece(vals[0]),
                head,
                str(vals[_SEQUENCE_AT]).encode("ascii"),
                tail,
                file_bytes,
                rest[2],
            )
        )
    line, plain = _whole_line(e)
    _last_line = (rest_a, rest_b, vals, line) if plain else None
    return line


def _cut(
    vals: tuple[Any, ...], line: bytes
) -> tuple[tuple[Any, ...], tuple[Any, ...], bytes] | None:
    """The file and rest pieces of a line msgspec wrote whole for the event with `vals`,
    remembered (None when its path has a raw form, which the rest then holds, or the line is
    not where the pieces say)."""
    global _last_file, _last_rest
    if _file_part(vals[2])[1] is not None:
        return None
    try:
        ts = _timestamp_piece(vals[0])
        head, tail = _event_pieces(vals[1], vals[3])
    except _NoPieces:
        return None
    start = len(_HEAD_OPEN) + len(ts) + len(head) + len(str(vals[_SEQUENCE_AT])) + len(tail)
    # The file object ends where the rest begins: `,"` never occurs inside a JSON string.
    end = line.find(_REST_OPEN, start)
    if (
        end <= start
        or line[start - len(tail) : start] != tail
        or not line.startswith(_HEAD_OPEN + ts + head)
    ):
        return None
    _last_file = (vals[_F_FILE], line[start:end])
    rest = _last_rest = (vals[_F_REST_A], vals[_F_REST_B], line[end:])
    return rest


def _file_bytes(e: Event) -> bytes | None:
    """The file object's bytes when its path is plain text (no raw form: a path with one also
    adds a raw part to the rest of the line) and nothing in it needs escaping beyond ASCII."""
    path_text, path_raw, directory, name, ext = _file_part(e.path)
    if path_raw is not None:
        return None
    out = _encode(_ecs_file(e, path_text, directory, name, ext))
    if not out.isascii() or b"\x7f" in out:
        return None
    return out


def event_line(e: Event) -> str:
    """The event's JSON line (see `event_line_bytes`)."""
    return event_line_bytes(e).decode("ascii")


def dumps(record: dict[str, Any]) -> str:
    """One JSON line. Every control or non-ASCII character is escaped (json.dumps's
    ensure_ascii), so a file name can never break or forge a line, whatever reads it
    (terminal, syslog, SIEM). Encoded by msgspec in C when the result is plain ASCII (it
    writes other characters as UTF-8, and DEL as itself); json.dumps otherwise."""
    try:
        out = _encode(record)
    except (UnicodeEncodeError, TypeError, ValueError, OverflowError):
        out = b"\x80"  # a lone surrogate, a type msgspec does not know: the general path
    if out.isascii() and b"\x7f" not in out:
        return out.decode("ascii")
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def _number(value: Any, where: str) -> float | None:
    """A JSON number as a float (an integral ratio may have been written as 3)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} has the wrong type")
    return float(value)


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where} has the wrong type")
    if not isinstance(value, kind):
        raise ValueError(f"{where} has the wrong type")
    return value


def _obj(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object")
    return value


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of strings")
    return tuple(value)


def from_dict(data: dict[str, Any]) -> Event:
    """The Event a `to_dict` produced (ValueError on anything malformed)."""
    ev = data.get("event")
    file = data.get("file")
    custom = data.get("exfilwatch", {})
    if not isinstance(ev, dict) or not isinstance(file, dict) or not isinstance(custom, dict):
        raise ValueError("an event needs 'event' and 'file' objects")
    raw = custom.get("raw", {})
    if not isinstance(raw, dict):
        raise ValueError("exfilwatch.raw must be an object")

    def path_value(dotted: str, text: Any) -> str | None:
        if dotted in raw:
            return os.fsdecode(base64.b64decode(raw[dotted], validate=True))
        value: str | None = _expect(text, str, dotted)
        if value is None or value.isascii():
            return value
        # Only what os.fsdecode can give is a file name: a lone surrogate (JSON "\\ud800")
        # would stop the event from being written again, or an alert about it being built.
        try:
            if os.fsdecode(os.fsencode(value)) == value:
                return value
        except UnicodeEncodeError:
            pass
        raise ValueError(f"{dotted} is not a file name (a lone surrogate)")

    path = path_value("file.path", file.get("path"))
    if path is None:
        raise ValueError("file.path is required")
    action = _expect(ev.get("action"), str, "event.action")
    if action is None:
        raise ValueError("event.action is required")
    category = ev.get("category", ["file"])
    if not (isinstance(category, list) and len(category) == 1 and isinstance(category[0], str)):
        raise ValueError("event.category must be a one-element list")
    tags = custom.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("exfilwatch.tags must be a list of strings")
    mtime = file.get("mtime")
    host = data.get("host", {})
    user = data.get("user", {})
    process = data.get("process", {})
    if not all(isinstance(x, dict) for x in (host, user, process)):
        raise ValueError("host, user and process must be objects")
    return Event(
        timestamp_us=parse_timestamp(data.get("@timestamp", "")),
        action=action,
        path=path,
        category=category[0],
        file_type=_expect(file.get("type"), str, "file.type"),
        size=_expect(file.get("size"), int, "file.size"),
        uid=_expect(file.get("uid"), str, "file.uid"),
        gid=_expect(file.get("gid"), str, "file.gid"),
        inode=_expect(file.get("inode"), str, "file.inode"),
        mode=_expect(file.get("mode"), str, "file.mode"),
        mtime_us=parse_timestamp(mtime) if mtime is not None else None,
        src_path=path_value("exfilwatch.src_path", custom.get("src_path")),
        tags=tuple(tags),
        sensitivity=_expect(custom.get("sensitivity"), str, "exfilwatch.sensitivity"),
        root=path_value("exfilwatch.root", custom.get("root")),
        source=_expect(custom.get("source", "inotify"), str, "exfilwatch.source"),
        sequence=_expect(ev.get("sequence", 0), int, "event.sequence"),
        hostname=_expect(host.get("hostname"), str, "host.hostname"),
        user_name=_expect(user.get("name"), str, "user.name"),
        user_id=_expect(user.get("id"), str, "user.id"),
        process_pid=_expect(process.get("pid"), int, "process.pid"),
        process_name=_expect(process.get("name"), str, "process.name"),
        process_executable=_expect(process.get("executable"), str, "process.executable"),
        process_command_line=_expect(process.get("command_line"), str, "process.command_line"),
        process_parent_name=_expect(
            _obj(process, "parent").get("name"), str, "process.parent.name"
        ),
        location=_expect(_obj(custom, "location").get("class"), str, "exfilwatch.location.class"),
        location_provider=_expect(
            _obj(custom, "location").get("provider"), str, "exfilwatch.location.provider"
        ),
        watchlist=_expect(
            _obj(custom, "watchlist").get("status"), str, "exfilwatch.watchlist.status"
        ),
        watchlist_days=_expect(
            _obj(custom, "watchlist").get("days_to_last_day"),
            int,
            "exfilwatch.watchlist.days_to_last_day",
        ),
        off_hours=_expect(custom.get("off_hours"), bool, "exfilwatch.off_hours"),
        history_first_use=_expect(
            _obj(custom, "history").get("first_use"), bool, "exfilwatch.history.first_use"
        ),
        history_ratio=_number(_obj(custom, "history").get("ratio"), "exfilwatch.history.ratio"),
        lineage_origin=path_value(
            "exfilwatch.lineage.origin_path", _obj(custom, "lineage").get("origin_path")
        ),
        lineage_tags=_str_tuple(_obj(custom, "lineage").get("origin_tags", []), "origin_tags"),
        archive_tagged=_expect(
            _obj(custom, "archive").get("tagged_members"), int, "exfilwatch.archive.tagged_members"
        ),
        disguise=_str_tuple(custom.get("disguise", []), "exfilwatch.disguise"),
        process_parent_pid=_expect(_obj(process, "parent").get("pid"), int, "process.parent.pid"),
        process_working_directory=_expect(
            process.get("working_directory"), str, "process.working_directory"
        ),
        user_login_name=_expect(_obj(custom, "attribution").get("login_user"), str, "login_user"),
        user_login_id=_expect(_obj(custom, "attribution").get("login_uid"), str, "login_uid"),
        attribution=_expect(_obj(custom, "attribution").get("confidence"), str, "confidence"),
        attribution_method=_expect(_obj(custom, "attribution").get("method"), str, "method"),
        masquerade=_expect(_obj(custom, "attribution").get("masquerade"), str, "masquerade"),
        enrichment_skipped=_expect(
            _obj(custom, "enrichment").get("skipped"), str, "exfilwatch.enrichment.skipped"
        ),
        nlink=_expect(_obj(custom, "file").get("nlink"), int, "exfilwatch.file.nlink"),
        archive_truncated=_expect(
            _obj(custom, "archive").get("truncated"), bool, "exfilwatch.archive.truncated"
        ),
        process_args=_str_tuple(process.get("args", []), "process.args"),
        process_parent_executable=_expect(
            _obj(process, "parent").get("executable"), str, "process.parent.executable"
        ),
        process_parent_command_line=_expect(
            _obj(process, "parent").get("command_line"), str, "process.parent.command_line"
        ),
        location_trusted=_expect(
            _obj(custom, "location").get("trusted"), bool, "exfilwatch.location.trusted"
        ),
        lineage_sensitivity=_expect(
            _obj(custom, "lineage").get("origin_sensitivity"),
            str,
            "exfilwatch.lineage.origin_sensitivity",
        ),
        lineage_via=_expect(_obj(custom, "lineage").get("via"), str, "exfilwatch.lineage.via"),
        overwrite=_expect(_obj(custom, "file").get("overwrite"), str, "exfilwatch.file.overwrite"),
        dir_deleted=_expect(
            _obj(custom, "directory").get("deleted"), int, "exfilwatch.directory.deleted"
        ),
        dir_deleted_share=_number(
            _obj(custom, "directory").get("deleted_share"), "exfilwatch.directory.deleted_share"
        ),
    )


def read_jsonl(stream: IO[str], file: str = "<stream>") -> Iterator[Event | Problem]:
    """Events from a JSON-lines stream; a bad line yields a located Problem, not an exception.
    Lines that are not events (health records, alerts) are skipped."""
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Problem(file, lineno, exc.colno, "EVT_JSON", exc.msg)
            continue
        if not isinstance(data, dict):
            yield Problem(file, lineno, 1, "EVT_SHAPE", "a line must hold a JSON object")
            continue
        ev = data.get("event")
        if not isinstance(ev, dict) or ev.get("kind") != "event":
            continue
        if ev.get("dataset", "exfilwatch.file") not in EVENT_DATASETS:
            continue  # host events (media mounted) are not file or process events
        try:
            yield from_dict(data)
        except (ValueError, TypeError, KeyError) as exc:
            yield Problem(file, lineno, 1, "EVT_FIELD", str(exc))


EVENT_ATTRS: tuple[str, ...] = Event.__struct_fields__


# Dotted names a test or a replay may set directly (derived ones: file.name, file.directory,
# file.extension and event.type follow from file.path and event.action).
SETTABLE: dict[str, str] = {
    "@timestamp": "timestamp_us",
    "event.action": "action",
    "event.category": "category",
    "event.sequence": "sequence",
    "file.path": "path",
    "file.type": "file_type",
    "file.size": "size",
    "file.uid": "uid",
    "file.gid": "gid",
    "file.inode": "inode",
    "file.mode": "mode",
    "file.mtime": "mtime_us",
    "host.hostname": "hostname",
    "user.name": "user_name",
    "user.id": "user_id",
    "process.pid": "process_pid",
    "process.name": "process_name",
    "process.executable": "process_executable",
    "process.command_line": "process_command_line",
    "process.parent.name": "process_parent_name",
    "exfilwatch.src_path": "src_path",
    "exfilwatch.tags": "tags",
    "exfilwatch.sensitivity": "sensitivity",
    "exfilwatch.root": "root",
    "exfilwatch.source": "source",
    "exfilwatch.location.class": "location",
    "exfilwatch.location.provider": "location_provider",
    "exfilwatch.watchlist.status": "watchlist",
    "exfilwatch.watchlist.days_to_last_day": "watchlist_days",
    "exfilwatch.off_hours": "off_hours",
    "exfilwatch.history.first_use": "history_first_use",
    "exfilwatch.history.ratio": "history_ratio",
    "exfilwatch.lineage.origin_path": "lineage_origin",
    "exfilwatch.lineage.origin_tags": "lineage_tags",
    "exfilwatch.archive.tagged_members": "archive_tagged",
    "exfilwatch.disguise": "disguise",
    "process.parent.pid": "process_parent_pid",
    "process.working_directory": "process_working_directory",
    "exfilwatch.attribution.confidence": "attribution",
    "exfilwatch.attribution.method": "attribution_method",
    "exfilwatch.attribution.login_user": "user_login_name",
    "exfilwatch.attribution.login_uid": "user_login_id",
    "exfilwatch.attribution.masquerade": "masquerade",
    "exfilwatch.enrichment.skipped": "enrichment_skipped",
    "exfilwatch.file.nlink": "nlink",
    "exfilwatch.archive.truncated": "archive_truncated",
    "process.args": "process_args",
    "process.parent.executable": "process_parent_executable",
    "process.parent.command_line": "process_parent_command_line",
    "exfilwatch.location.trusted": "location_trusted",
    "exfilwatch.lineage.origin_sensitivity": "lineage_sensitivity",
    "exfilwatch.lineage.via": "lineage_via",
    "exfilwatch.file.overwrite": "overwrite",
    "exfilwatch.directory.deleted": "dir_deleted",
    "exfilwatch.directory.deleted_share": "dir_deleted_share",
}
_TUPLE_ATTRS = frozenset({"tags", "lineage_tags", "disguise", "process_args"})
_BOOL_ATTRS = frozenset({"archive_truncated", "off_hours", "history_first_use", "location_trusted"})
_FLOAT_ATTRS = frozenset({"history_ratio", "dir_deleted_share"})
_INT_ATTRS = frozenset(
    {
        "timestamp_us",
        "sequence",
        "size",
        "mtime_us",
        "process_pid",
        "archive_tagged",
        "process_parent_pid",
        "nlink",
        "watchlist_days",
        "dir_deleted",
    }
)


def event_from_fields(values: dict[str, Any], timestamp_us: int = 0) -> Event:
    """An Event from flat dotted names (`{"event.action": "created", "file.path": "/x"}`).
    ValueError names the first unknown or mistyped field."""
    kwargs: dict[str, Any] = {"timestamp_us": timestamp_us, "action": "created", "path": "/"}
    for dotted, given in values.items():
        value = given
        attr = SETTABLE.get(dotted)
        if attr is None:
            if dotted in FIELDS:
                raise ValueError(f"{dotted} is derived from other fields and cannot be set")
            raise ValueError(f"unknown field {dotted}")
        if attr in _TUPLE_ATTRS:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{dotted} must be a list of strings")
            value = tuple(value)
        elif attr in _BOOL_ATTRS:
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{dotted} must be true or false")
        elif attr in _INT_ATTRS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{dotted} must be an integer")
        elif attr in _FLOAT_ATTRS:
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{dotted} must be a number")
                value = float(value)
        elif value is not None and not isinstance(value, str):
            if attr in ("uid", "gid", "inode", "user_id", "user_login_id") and isinstance(
                value, int
            ):
                value = str(value)
            else:
                raise ValueError(f"{dotted} must be a string")
        kwargs[attr] = value
    return Event(**kwargs)
