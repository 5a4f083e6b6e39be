"""`exfilwatch watchlist add | remove | list | import`: the departure watchlist under the
config's state_dir (docs/offboarding.md). The running agent picks changes up by itself."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from typing import Any

from agent import watchlist
from agent.config import Config, check_file, default_config_path
from agent.diagnostics import errors_only, format_problems
from agent.units import parse_duration

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any) -> None:
    wl = sub.add_parser(
        "watchlist", help="departing employees and others watched more closely (HR notices)"
    )
    wl.add_argument("--config", help=f"config whose state_dir holds it ({default_config_path()})")
    wl_sub = wl.add_subparsers(dest="watchlist_command", metavar="SUBCOMMAND")
    here = {"default": argparse.SUPPRESS, "help": "config (also accepted before the subcommand)"}

    add = wl_sub.add_parser("add", help="put a user on the watchlist (or update their entry)")
    add.add_argument("user", help="local user name")
    add.add_argument("--last-day", required=True, help="last working day, YYYY-MM-DD")
    add.add_argument(
        "--type",
        default="departing",
        help=f"{', '.join(watchlist.TYPES)}, or a lowercase name of your own (default departing)",
    )
    add.add_argument("--notice", help="day of the notice, YYYY-MM-DD (default: today)")
    add.add_argument("--before", help="watch from this long before the notice (default: config)")
    add.add_argument("--after", help="watch until this long after the last day (default: config)")
    add.add_argument("--note", default="", help="free text, e.g. the HR ticket")
    add.add_argument("--config", **here)

    rm = wl_sub.add_parser("remove", help="take a user off the watchlist")
    rm.add_argument("user", help="local user name")
    rm.add_argument("--config", **here)

    ls = wl_sub.add_parser("list", help="the entries, whether each is active, days to last day")
    ls.add_argument(
        "--format", choices=["text", "json"], default="text", help="text for people, json for tools"
    )
    ls.add_argument("--config", **here)

    imp = wl_sub.add_parser(
        "import", help="entries from an HR connector CSV (EmailAddress, LastWorkingDate, ...)"
    )
    imp.add_argument("file", help="the CSV file")
    imp.add_argument("--config", **here)


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "watchlist_command", None)
    if command is None:
        print(
            "usage: exfilwatch watchlist [--config FILE] {add,remove,list,import} ...",
            file=sys.stderr,
        )
        return EXIT_USAGE
    path = args.config or default_config_path()
    config, problems = check_file(path)
    if config is None:
        print(format_problems(errors_only(problems)), file=sys.stderr)
        return EXIT_PROBLEMS
    store = watchlist.store_path(config.state_dir)
    if command == "list":
        return _list(store, args.format)
    try:
        with watchlist.locked(config.state_dir):
            entries, bad = watchlist.load(store)
            if entries is None:
                print(format_problems(bad), file=sys.stderr)
                print(f"{store}: not changed; fix the file first", file=sys.stderr)
                return EXIT_PROBLEMS
            if command == "add":
                return _add(args, config, store, entries)
            if command == "remove":
                return _remove(args.user, store, entries)
            return _import(args.file, config, store, entries)
    except PermissionError as exc:
        print(
            f"{config.state_dir}: {exc.strerror} (run as root or the agent's user)", file=sys.stderr
        )
        return EXIT_PROBLEMS


def _who() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _day(text: str, what: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        print(f"{what} {text!r} is not a date (YYYY-MM-DD)", file=sys.stderr)
        return None


def _days(text: str | None, default: int, what: str) -> int | None:
    if text is None:
        return default
    try:
        seconds = parse_duration(text if not text.isdigit() else f"{text}d")
    except ValueError as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return None
    days = int(seconds // 86400)
    if seconds % 86400 or not 0 <= days <= 3650:
        print(f"{what} must be whole days, 0 to 3650 (e.g. 90d)", file=sys.stderr)
        return None
    return days


def _add(
    args: argparse.Namespace, config: Config, store: str, entries: list[watchlist.Entry]
) -> int:
    last = _day(args.last_day, "--last-day")
    notice = _day(args.notice, "--notice") if args.notice else dt.date.today()
    before = _days(args.before, config.watchlist.days_before, "--before")
    after = _days(args.after, config.watchlist.days_after, "--after")
    if last is None or notice is None or before is None or after is None:
        return EXIT_USAGE
    if not watchlist.valid_type(args.type):
        print(
            f"--type {args.type!r}: one of {', '.join(watchlist.TYPES)}, or a lowercase_name",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not watchlist.USER_NAME.match(args.user):
        print(f"{args.user!r} is not a user name", file=sys.stderr)
        return EXIT_USAGE
    if any(ord(c) < 32 or c == "\x7f" for c in args.note):
        print("--note has a control character", file=sys.stderr)
        return EXIT_USAGE
    start = min(notice - dt.timedelta(days=before), last)
    entry = watchlist.Entry(args.user, args.type, last, start, after, args.note, _who(), _now())
    merged = watchlist.merge(entries, [entry])
    watchlist.save(store, merged)
    state = "active" if entry.active(dt.date.today()) else "not active yet"
    print(
        f"{args.user}: {args.type}, last day {last}, watched {start} to {entry.watch_until} "
        f"({state}); the running agent picks this up within seconds"
    )
    return EXIT_OK


def _remove(user: str, store: str, entries: list[watchlist.Entry]) -> int:
    kept = [e for e in entries if e.user != user]
    if len(kept) == len(entries):
        print(f"{user} is not on the watchlist", file=sys.stderr)
        return EXIT_PROBLEMS
    watchlist.save(store, kept)
    print(f"{user}: removed")
    return EXIT_OK


def _import(file: str, config: Config, store: str, entries: list[watchlist.Entry]) -> int:
    settings = watchlist.ImportSettings(
        dict(config.watchlist.user_map),
        config.watchlist.local_part,
        config.watchlist.days_before,
        config.watchlist.days_after,
    )
    new, problems = watchlist.import_csv(file, settings, added_by=_who(), added_at=_now())
    if problems:
        print(format_problems(problems), file=sys.stderr)
        print(f"{file}: nothing imported; fix the rows above", file=sys.stderr)
        return EXIT_PROBLEMS
    watchlist.save(store, watchlist.merge(entries, new))
    print(f"{file}: {len(new)} entries imported into {store}")
    return EXIT_OK


def _list(store: str, fmt: str) -> int:
    entries, bad = watchlist.load(store)
    if entries is None:
        print(format_problems(bad), file=sys.stderr)
        return EXIT_PROBLEMS
    today = dt.date.today()
    rows: list[dict[str, Any]] = []
    for e in sorted(entries, key=lambda x: (x.last_day, x.user)):
        row = e.to_dict()
        row["active"] = e.active(today)
        row["watch_until"] = e.watch_until.isoformat()
        row["days_to_last_day"] = e.days_to_last_day(today)
        rows.append(row)
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"{store}: no entries")
        return EXIT_OK
    head = ("USER", "TYPE", "LAST DAY", "WATCHED FROM", "UNTIL", "ACTIVE", "DAYS", "NOTE")
    table = [head] + [
        (
            r["user"],
            r["type"],
            r["last_day"],
            r["watch_from"],
            r["watch_until"],
            "yes" if r["active"] else "no",
            str(r["days_to_last_day"]),
            r["note"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_OK
