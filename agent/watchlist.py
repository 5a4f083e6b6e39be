"""The departure watchlist: who is watched more closely, why, and from when to when.

One YAML file under `state_dir` (`watchlist.yaml`, mode 0600), written by `exfilwatch
watchlist` (temporary file, fsync, rename, directory fsync, under a lock so two commands never
interleave) and read by the running agent, which picks up a change within a second or two.
An admin may edit it by hand: every entry is validated with file:line:col, a stable code and
a hint, and a running agent keeps its last good list when an edit is bad.

An entry is *active* from `watch_from` to `last_day + days_after` (inclusive, in the host's
local calendar): Microsoft Purview's departing-user policy looks at up to 90 days before the
resignation and 30 days after the last working day; those are the defaults here."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import yaml

from agent.diagnostics import ERROR, Problem, at, compose_yaml, nearest, node_value
from agent.state import write_private

WATCHLIST_FILE = "watchlist.yaml"
LOCK_FILE = ".watchlist.lock"
TYPES = ("departing", "flight_risk", "high_impact", "contractor", "elevated_access")
# When a user is on the list twice, the status rules see is the first of these that applies.
PRIORITY = {t: i for i, t in enumerate(TYPES)}
DAYS_BEFORE = 90
DAYS_AFTER = 30
MAX_ENTRIES = 10_000
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # a custom type: lowercase identifier
USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,254}$")  # POSIX-ish names, or an e-mail
_KEYS = ("user", "type", "last_day", "watch_from", "days_after", "note", "added_by", "added_at")


@dataclass(frozen=True, slots=True)
class Entry:
    user: str
    type: str
    last_day: dt.date
    watch_from: dt.date
    days_after: int = DAYS_AFTER
    note: str = ""
    added_by: str = ""
    added_at: str = ""  # ISO 8601, UTC

    @property
    def watch_until(self) -> dt.date:
        return self.last_day + dt.timedelta(days=self.days_after)

    def active(self, today: dt.date) -> bool:
        return self.watch_from <= today <= self.watch_until

    def days_to_last_day(self, today: dt.date) -> int:
        """Positive before the last working day, 0 on it, negative after."""
        return (self.last_day - today).days

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "type": self.type,
            "last_day": self.last_day.isoformat(),
            "watch_from": self.watch_from.isoformat(),
            "days_after": self.days_after,
            "note": self.note,
            "added_by": self.added_by,
            "added_at": self.added_at,
        }


def valid_type(name: str) -> bool:
    """A known type, or a lowercase name of one's own that is not one letter off a known one
    (a typo: rules scoped on `departing` would never see the user)."""
    return name in TYPES or (bool(_NAME.match(name)) and not nearest(name, TYPES))


def store_path(state_dir: str) -> str:
    return os.path.join(state_dir, WATCHLIST_FILE)


# Reading ---------------------------------------------------------------------------------------


def parse(text: str, file: str) -> tuple[list[Entry] | None, list[Problem]]:
    """The entries of a watchlist file, or None and every problem found (located)."""
    root, problems = compose_yaml(text, file, "WL")
    if problems:
        return None, problems
    if root is None or (isinstance(root, yaml.ScalarNode) and node_value(root) is None):
        return [], []
    top = root
    if isinstance(root, yaml.MappingNode):
        keys = {k.value: v for k, v in root.value if isinstance(k, yaml.ScalarNode)}
        unknown = [k for k in keys if k != "entries"]
        for k in unknown:
            problems.append(
                at(file, root, "WL_UNKNOWN_KEY", f"unknown key '{k}'", "the file has 'entries:'")
            )
        top = keys.get("entries", yaml.SequenceNode("tag:yaml.org,2002:seq", []))
    if not isinstance(top, yaml.SequenceNode):
        return None, [at(file, top, "WL_TYPE", "'entries' must be a list", "entries: [...]")]
    if len(top.value) > MAX_ENTRIES:
        problems.append(
            at(file, top, "WL_TOO_MANY", f"more than {MAX_ENTRIES} entries", "split the list")
        )
    entries: list[Entry] = []
    seen: dict[str, yaml.Node] = {}
    for node in top.value:
        entry = _entry(node, file, problems)
        if entry is None:
            continue
        if entry.user in seen:
            problems.append(
                at(
                    file,
                    node,
                    "WL_DUPLICATE",
                    f"'{entry.user}' is listed twice",
                    f"keep one entry (the first is at line {seen[entry.user].start_mark.line + 1})",
                )
            )
            continue
        seen[entry.user] = node
        entries.append(entry)
    if any(p.severity == ERROR for p in problems):
        return None, problems
    return entries, problems


def _entry(node: yaml.Node, file: str, problems: list[Problem]) -> Entry | None:
    if not isinstance(node, yaml.MappingNode):
        problems.append(at(file, node, "WL_TYPE", "an entry must be a mapping", "user: alice"))
        return None
    m: dict[str, yaml.Node] = {}
    before = len(problems)
    for k, v in node.value:
        key = k.value if isinstance(k, yaml.ScalarNode) else None
        if key not in _KEYS:
            problems.append(
                at(
                    file,
                    k,
                    "WL_UNKNOWN_KEY",
                    f"unknown key '{key}' in an entry",
                    nearest(str(key), _KEYS) or f"allowed: {', '.join(_KEYS)}",
                )
            )
            continue
        m[key] = v
    for required in ("user", "last_day"):
        if required not in m:
            problems.append(at(file, node, "WL_REQUIRED", f"an entry needs '{required}'"))
    if len(problems) > before:
        return None
    user = _text(m["user"], file, "user", problems)
    if user is not None and not USER_NAME.match(user):
        problems.append(
            at(file, m["user"], "WL_VALUE", f"'{user}' is not a user name", "e.g. alice")
        )
    kind = _text(m["type"], file, "type", problems) if "type" in m else "departing"
    # A custom type one letter off a known one is a typo (rules scoped on `departing` would
    # never see the user).
    if kind is not None and not valid_type(kind):
        problems.append(
            at(
                file,
                m["type"],
                "WL_VALUE",
                f"unknown type '{kind}'",
                nearest(kind, TYPES) or "one of the known types, or a lowercase_name of your own",
            )
        )
    last = _date(m["last_day"], file, "last_day", problems)
    start = _date(m["watch_from"], file, "watch_from", problems) if "watch_from" in m else None
    after = DAYS_AFTER
    if "days_after" in m:
        given = m["days_after"]
        value = node_value(given) if isinstance(given, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 3650:
            problems.append(
                at(file, m["days_after"], "WL_VALUE", "days_after must be 0 to 3650 days")
            )
        else:
            after = value
    texts = {
        k: _text(m[k], file, k, problems) or "" if k in m else ""
        for k in ("note", "added_by", "added_at")
    }
    if len(problems) > before or user is None or kind is None or last is None:
        return None
    watch_from = start if start is not None else last - dt.timedelta(days=DAYS_BEFORE)
    if watch_from > last:
        problems.append(at(file, m.get("watch_from"), "WL_VALUE", "watch_from is after last_day"))
        return None
    return Entry(user, kind, last, watch_from, after, **texts)


def _text(node: yaml.Node, file: str, what: str, problems: list[Problem]) -> str | None:
    value = node_value(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, str):
        problems.append(at(file, node, "WL_TYPE", f"{what} must be text", "quote it"))
        return None
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        problems.append(at(file, node, "WL_VALUE", f"{what} has a control character"))
        return None
    return value


def _date(node: yaml.Node, file: str, what: str, problems: list[Problem]) -> dt.date | None:
    value = node_value(node) if isinstance(node, yaml.ScalarNode) else None
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = dt.date.fromisoformat(value)
    if not isinstance(value, dt.date):
        problems.append(at(file, node, "WL_DATE", f"{what} must be a date", "YYYY-MM-DD"))
        return None
    return value


def load(path: str) -> tuple[list[Entry] | None, list[Problem]]:
    """The store's entries ([] when there is no file yet), or None and why not."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return [], []
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(path, 0, 0, "WL_UNREADABLE", str(exc))]
    return parse(text, path)


# Writing ---------------------------------------------------------------------------------------


def dump(entries: Iterable[Entry]) -> str:
    header = (
        "# exfilwatch watchlist: written by `exfilwatch watchlist`; edits by hand are checked\n"
        "# (exfilwatch watchlist list shows problems). Dates are YYYY-MM-DD, local calendar.\n"
    )
    body = yaml.safe_dump(
        {"entries": [e.to_dict() for e in sorted(entries, key=lambda e: e.user)]},
        sort_keys=False,
        allow_unicode=False,
        width=100,
    )
    return header + body


@contextlib.contextmanager
def locked(state_dir: str) -> Iterator[None]:
    """One writer at a time (two admins, or a cron import beside a manual add)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd = os.open(
        os.path.join(state_dir, LOCK_FILE),
        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save(path: str, entries: Iterable[Entry]) -> None:
    """Atomically, 0600: a temporary file, fsync, rename, directory fsync."""
    write_private(path, dump(entries).encode("ascii"))


# HR connector CSV ------------------------------------------------------------------------------

HR_EMAIL_COLUMNS = ("EmailAddress", "UserPrincipalName")
HR_RESIGNED = "ResignationDate"
HR_LAST_DAY = "LastWorkingDate"


@dataclass(frozen=True, slots=True)
class ImportSettings:
    """How HR's e-mail addresses become local user names."""

    user_map: Mapping[str, str]  # e-mail (lower case) -> user name
    local_part: bool = True  # otherwise: alice@corp.example -> alice
    days_before: int = DAYS_BEFORE
    days_after: int = DAYS_AFTER


def import_csv(
    path: str, settings: ImportSettings, *, added_by: str, added_at: str
) -> tuple[list[Entry], list[Problem]]:
    """Entries from an HR connector CSV (Purview's columns). Every bad row is a line-numbered
    problem; the caller imports nothing when there is any."""
    problems: list[Problem] = []
    try:
        fh = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below
    except OSError as exc:
        return [], [Problem(path, 0, 0, "WL_UNREADABLE", str(exc))]
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        email_col = next((c for c in HR_EMAIL_COLUMNS if c in header), None)
        missing = [c for c in (HR_LAST_DAY,) if c not in header]
        if email_col is None:
            missing.insert(0, " or ".join(HR_EMAIL_COLUMNS))
        if missing:
            return [], [
                Problem(
                    path,
                    1,
                    1,
                    "WL_CSV_COLUMNS",
                    f"missing column {', '.join(missing)}; the header has {', '.join(header)}",
                    "export the HR connector columns: EmailAddress (or UserPrincipalName), "
                    "ResignationDate, LastWorkingDate",
                )
            ]
        assert email_col is not None
        entries: list[Entry] = []
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            email = (row.get(email_col) or "").strip()
            user = _local_user(email, settings)
            if user is None:
                problems.append(
                    Problem(
                        path,
                        line,
                        1,
                        "WL_CSV_USER",
                        f"no local user for {email!r}",
                        "add it to watchlist.user_map in the config",
                    )
                )
                continue
            last = _csv_date(row.get(HR_LAST_DAY), path, line, HR_LAST_DAY, problems)
            resigned = None
            if (row.get(HR_RESIGNED) or "").strip():
                resigned = _csv_date(row.get(HR_RESIGNED), path, line, HR_RESIGNED, problems)
            if last is None:
                continue
            if user in seen:
                problems.append(
                    Problem(
                        path,
                        line,
                        1,
                        "WL_DUPLICATE",
                        f"{user} is on line {seen[user]} too",
                        "keep one row per person",
                    )
                )
                continue
            seen[user] = line
            notice = resigned or last
            start = notice - dt.timedelta(days=settings.days_before)
            entries.append(
                Entry(
                    user,
                    "departing",
                    last,
                    start,
                    settings.days_after,
                    note=f"HR import {os.path.basename(path)} line {line}",
                    added_by=added_by,
                    added_at=added_at,
                )
            )
    return entries, problems


def _local_user(email: str, settings: ImportSettings) -> str | None:
    if not email:
        return None
    mapped = settings.user_map.get(email.lower())
    if mapped is not None:
        return mapped
    if settings.local_part and "@" in email:
        local = email.split("@", 1)[0].lower()
        return local if USER_NAME.match(local) else None
    return None


def _csv_date(
    value: str | None, path: str, line: int, column: str, problems: list[Problem]
) -> dt.date | None:
    text = (value or "").strip()
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%m/%d/%Y"):
        with contextlib.suppress(ValueError):
            return dt.datetime.strptime(text, fmt).date()
    problems.append(
        Problem(
            path,
            line,
            1,
            "WL_CSV_DATE",
            f"{column} {text!r} is not a date",
            "YYYY-MM-DD (or MM/DD/YYYY, as Purview's samples write it)",
        )
    )
    return None


def merge(old: Sequence[Entry], new: Sequence[Entry]) -> list[Entry]:
    """`new` entries replace old ones for the same user; the rest stay."""
    by_user = {e.user: e for e in old}
    for entry in new:
        previous = by_user.get(entry.user)
        if previous is not None and not entry.note:
            entry = replace(entry, note=previous.note)  # noqa: PLW2901 - the merged entry
        by_user[entry.user] = entry
    return list(by_user.values())


# The running agent's view ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """What events of a listed user carry."""

    type: str
    days_to_last_day: int
    last_day: dt.date


def active(entries: Iterable[Entry], today: dt.date) -> dict[str, Status]:
    """User name -> status, for entries whose window includes today."""
    out: dict[str, Status] = {}
    for e in entries:
        if not e.active(today):
            continue
        current = out.get(e.user)
        if current is None or PRIORITY.get(e.type, len(TYPES)) < PRIORITY.get(
            current.type, len(TYPES)
        ):
            out[e.user] = Status(e.type, e.days_to_last_day(today), e.last_day)
    return out
