"""The `exfilwatch` command."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType

from agent import __version__
from agent.config import SYSTEM_CONFIG, check_file, data_dir, default_config_path
from agent.diagnostics import errors_only, format_problems
from agent.sinks import FileSink, Router, SinkOpenError, StreamSink, UnsafeSinkError
from agent.sinks.logsetup import configure
from agent.units import parse_duration

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


_FORMAT = "text for people (the default), json for tools"


def _duration(text: str) -> float:
    """--duration: a positive duration with or without a unit (0 is not 'forever')."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 (leave it out to run until stopped)")
    return seconds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="exfilwatch",
        description="Insider-risk monitoring agent: watches tagged R&D directories.",
    )
    p.add_argument("--version", action="version", version=f"exfilwatch {__version__}")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe of the agent's own log lines to print (default: info)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--config", help=f"config file (default: {default_config_path()})")
    run.add_argument(
        "--duration", type=_duration, help="stop after this long (e.g. 90, 30s, 5m, 2h)"
    )
    run.add_argument(
        "--format",
        choices=["auto", "json", "pretty"],
        help="stdout sinks: one readable line per alert (pretty), JSON lines (json), or pretty "
        "on a terminal and JSON otherwise (auto, the default)",
    )

    rec = sub.add_parser("record", help="write normalized file events as JSON lines")
    rec.add_argument("--config", help="config file giving the watched trees")
    rec.add_argument("--output", "-o", default="-", help="file to append to (default: stdout)")
    rec.add_argument(
        "--duration", type=_duration, help="stop after this long (e.g. 90, 30s, 5m, 2h)"
    )

    demo = sub.add_parser(
        "demo",
        help="the agent on a temporary workstation of its own, a scripted exfiltration, "
        "its alerts as they arrive (no root needed)",
    )
    demo.add_argument(
        "--timeout", type=_duration, default=60.0, help="wait this long per step (default 60s)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary workstation")
    comp = sub.add_parser(
        "completion", help="print a shell completion script (bash, or zsh via bashcompinit)"
    )
    comp.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete for")
    sub.add_parser("manpage", help="print the exfilwatch(8) man page (roff), from this parser")
    status = sub.add_parser(
        "status",
        help="is the agent running and healthy: exit 0 yes, 1 degraded, 3 not running",
    )
    status.add_argument("--config", help="config whose state_dir the agent writes its status to")
    status.add_argument(
        "--state-dir", help="read the status there instead (when the config does not parse)"
    )
    status.add_argument("--format", choices=["text", "json"], default="text", help=_FORMAT)

    cfg = sub.add_parser("config", help="work with the agent config")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    check = cfg_sub.add_parser("check", help="validate a config file, listing every problem")
    check.add_argument("file", nargs="?", help="config file (default: the one run would use)")
    check.add_argument("--format", choices=["text", "json"], default="text", help=_FORMAT)
    init = cfg_sub.add_parser(
        "init", help="write the shipped default config, commented, to a new file"
    )
    init.add_argument("file", nargs="?", help=f"where to write it (default: {SYSTEM_CONFIG})")
    init.add_argument("--force", action="store_true", help="replace a file that exists")
    rules = sub.add_parser("rules", help="validate and test rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    validate = rules_sub.add_parser("validate", help="check rule files, listing every problem")
    validate.add_argument("paths", nargs="*", help="files or directories (default: config rules)")
    validate.add_argument("--config", help="config whose 'rules' to use when no paths are given")
    validate.add_argument("--format", choices=["text", "json"], default="text", help=_FORMAT)
    validate.add_argument(
        "--show", metavar="RULE_ID", help="print the effective rule (overrides applied)"
    )
    rtest = rules_sub.add_parser("test", help="run the tests embedded in rules")
    rtest.add_argument("paths", nargs="*", help="files or directories (default: config rules)")
    rtest.add_argument("--config", help="config whose 'rules' to use when no paths are given")
    rtest.add_argument(
        "--require-tests",
        action="store_true",
        help="fail when a rule lacks a positive or a negative test",
    )

    cover = rules_sub.add_parser(
        "coverage", help="print the ATT&CK techniques the rules detect, as a Markdown table"
    )
    cover.add_argument("paths", nargs="*", help="files or directories (default: config rules)")
    cover.add_argument("--config", help="config whose 'rules' to use when no paths are given")

    replay = sub.add_parser("replay", help="evaluate recorded events, print alerts as JSON lines")
    replay.add_argument("events", help="a JSON-lines file from `exfilwatch record` (- for stdin)")
    replay.add_argument("--rules", nargs="+", help="rule files or directories (default: config)")
    replay.add_argument("--config", help="config whose 'rules' to use")

    markers = sub.add_parser("markers", help="the marker tags the agent keeps (sticky tags)")
    markers_sub = markers.add_subparsers(dest="markers_command", metavar="SUBCOMMAND")
    mlist = markers_sub.add_parser("list", help="print the stored marker tags, by directory")
    mlist.add_argument("--config", help="config whose state_dir to read")
    mlist.add_argument("--format", choices=["text", "json"], default="text", help=_FORMAT)
    forget = markers_sub.add_parser(
        "forget", help="remove a directory's stored marker tags (then reload the agent)"
    )
    forget.add_argument("directory", help="the directory, as `markers list` prints it")
    forget.add_argument(
        "--recursive", "-r", action="store_true", help="and those of every directory under it"
    )
    forget.add_argument("--config", help="config whose state_dir to change")

    from agent import watchlist_cli

    watchlist_cli.add_parser(sub)
    rep = sub.add_parser("report", help="one person's alerts as an HTML page or JSON")
    rep.add_argument("--user", required=True, help="the user name (as in user.name)")
    rep.add_argument("--since", help="first day, YYYY-MM-DD")
    rep.add_argument("--until", help="last day, YYYY-MM-DD")
    rep.add_argument(
        "--alerts", nargs="+", help="alert logs (default: the config's file sinks and rotations)"
    )
    rep.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML page")
    rep.add_argument("--format", choices=["json"], help="print the report's data as JSON")
    rep.add_argument("--config", help="config whose file sinks hold the alerts")
    pseudo = sub.add_parser("pseudonym", help="who a pseudonymized user name stands for")
    pseudo_sub = pseudo.add_subparsers(dest="pseudonym_command", metavar="SUBCOMMAND")
    reveal = pseudo_sub.add_parser("reveal", help="the user behind u-... (needs the key)")
    reveal.add_argument(
        "pseudonyms", nargs="+", metavar="PSEUDONYM", help="pseudonyms as alerts carry them"
    )
    reveal.add_argument("--config", help="config whose state_dir holds pseudonym.key")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # The demo prints alerts; the agent's own info lines would bury them.
    quiet = args.command == "demo" and args.log_level == "info"
    configure("warning" if quiet else args.log_level)
    if args.command == "run":
        return _run(args.config, args.duration, record_to=None, fmt=args.format)
    if args.command == "record":
        return _run(args.config, args.duration, record_to=args.output)
    if args.command in ("completion", "manpage"):
        from agent import clidoc

        if args.command == "manpage":
            print(clidoc.manpage(parser), end="")
        else:
            print(clidoc.bash(parser) if args.shell == "bash" else clidoc.zsh(parser), end="")
        return EXIT_OK
    if args.command == "demo":
        from agent import demo

        return demo.run(timeout=args.timeout, keep=args.keep)
    if args.command == "status":
        return _status(args.config, args.state_dir, args.format)
    if args.command == "config" and args.config_command == "check":
        return _config_check(args.file or default_config_path(), args.format)
    if args.command == "config" and args.config_command == "init":
        return _config_init(args.file or SYSTEM_CONFIG, args.force)
    if args.command == "rules" and args.rules_command in ("validate", "test", "coverage"):
        from agent import rules_cli

        paths = args.paths or rules_cli.config_rule_paths(args.config)
        if paths is None:
            return EXIT_PROBLEMS
        if args.rules_command == "validate":
            return rules_cli.validate(paths, args.format, args.show)
        if args.rules_command == "coverage":
            return rules_cli.attack_coverage(paths)
        return rules_cli.test(paths, args.require_tests)
    if args.command == "replay":
        from agent import rules_cli

        paths = args.rules or rules_cli.config_rule_paths(args.config)
        if paths is None:
            return EXIT_PROBLEMS
        risk = None
        if args.config:
            config, problems = check_file(args.config)
            if config is None:
                print(format_problems(errors_only(problems)), file=sys.stderr)
                return EXIT_PROBLEMS
            risk = config.risk
        return rules_cli.replay(args.events, paths, risk)
    if args.command == "markers" and args.markers_command in ("list", "forget"):
        return _markers(args)
    if args.command == "report":
        return _report(args)
    if args.command == "pseudonym" and args.pseudonym_command == "reveal":
        return _reveal(args.pseudonyms, args.config)
    if args.command == "watchlist":
        from agent import watchlist_cli

        return watchlist_cli.run(args)
    # A command that needs a subcommand and got none: its own help, as a usage error.
    _subparser(parser, args.command).print_help(sys.stderr)
    return EXIT_USAGE


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of `command` (the top-level one when there is none)."""
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            found: argparse.ArgumentParser = action.choices[command]
            return found
    return parser


def _report(args: argparse.Namespace) -> int:
    """`report --user`: the alert logs, filtered to one person, as HTML or JSON."""
    import datetime as dt
    import json

    from agent import report
    from agent.privacy import KEY_FILE, Pseudonyms

    if not args.html and not args.format:
        print("report: give --html OUT.html or --format json", file=sys.stderr)
        return EXIT_USAGE
    try:
        since = dt.date.fromisoformat(args.since) if args.since else None
        until = dt.date.fromisoformat(args.until) if args.until else None
    except ValueError as exc:
        print(f"report: {exc} (dates are YYYY-MM-DD)", file=sys.stderr)
        return EXIT_USAGE
    aliases: list[str] = []
    paths = args.alerts
    if paths is None or args.config:
        path = args.config or default_config_path()
        config, problems = check_file(path)
        if config is None:
            print(format_problems(errors_only(problems)), file=sys.stderr)
            return EXIT_PROBLEMS
        if paths is None:
            paths = [
                s.path for s in config.sinks if s.type == "file" and s.path and "alert" in s.records
            ]
        key = os.path.join(config.state_dir, KEY_FILE)
        if config.pseudonymize and os.path.exists(key):
            with open(key, encoding="ascii") as fh:
                aliases.append(Pseudonyms(bytes.fromhex(fh.readline().strip()))(args.user))
    files = report.alert_files(paths)
    if not files:
        print(
            f"report: no alert log found in {', '.join(paths) or '(no file sinks)'}",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    data = report.build(
        report.read_alerts(files), args.user, aliases=aliases, since=since, until=until
    )
    data["sources"] = files
    if args.format == "json":
        print(json.dumps(data, indent=2))
    if args.html:
        # The page names a person and what they did: only its owner reads it.
        fd = os.open(args.html, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(report.render_html(data))
        print(f"{args.html}: {data['alerts']} alerts of {args.user}", file=sys.stderr)
    return EXIT_OK


def _reveal(pseudonyms: Sequence[str], config_path: str | None) -> int:
    """Try every account of the host and every watchlist entry against the key."""
    import pwd

    from agent import watchlist
    from agent.privacy import KEY_FILE, Pseudonyms

    path = config_path or default_config_path()
    config, problems = check_file(path)
    if config is None:
        print(format_problems(errors_only(problems)), file=sys.stderr)
        return EXIT_PROBLEMS
    key_path = os.path.join(config.state_dir, KEY_FILE)
    try:
        with open(key_path, encoding="ascii") as fh:
            names = Pseudonyms(bytes.fromhex(fh.readline().strip()))
    except (OSError, ValueError) as exc:
        print(f"{key_path}: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    candidates = {p.pw_name for p in pwd.getpwall()} | {str(p.pw_uid) for p in pwd.getpwall()}
    entries, _ = watchlist.load(watchlist.store_path(config.state_dir))
    candidates |= {e.user for e in entries or []}
    status = EXIT_OK
    for pseudonym in pseudonyms:
        found = names.reveal(pseudonym, candidates)
        if found:
            print(f"{pseudonym}  {', '.join(_shown(f) for f in found)}")
        else:
            print(f"{pseudonym}  (no account of this host or the watchlist)", file=sys.stderr)
            status = EXIT_PROBLEMS
    return status


def _shown(text: str) -> str:
    """A path for a terminal: a directory name is written by the watched user, and escape
    sequences in it must not reach the admin's terminal."""
    return text if text.isprintable() else text.encode("unicode_escape", "replace").decode()


def _markers(args: argparse.Namespace) -> int:
    """`markers list` / `markers forget`: read or change the store under the config's state_dir.

    Works while the agent runs: the store is locked for each change, and the agent re-reads
    it on a reload (SIGHUP), so a forgotten directory loses its tags then, not before."""
    import json

    from agent.enrich import marker_state

    path = args.config or default_config_path()
    config, problems = check_file(path)
    if config is None:
        print(format_problems(errors_only(problems)), file=sys.stderr)
        return EXIT_PROBLEMS
    store = os.path.join(config.state_dir, marker_state.STORE_NAME)
    if args.markers_command == "list":
        entries, bad = marker_state.read_store(store)
        for line in bad:
            print(_shown(line), file=sys.stderr)
        if entries is None:
            return EXIT_PROBLEMS
        if args.format == "json":
            print(json.dumps({d: e.to_dict() for d, e in sorted(entries.items())}, indent=2))
            return EXIT_OK
        if not entries:
            print(f"{store}: no stored markers")
        for directory, e in sorted(entries.items()):
            fields = [
                _shown(directory),
                f"tags={','.join(e.tags) or '-'}",
                f"sensitivity={e.sensitivity or '-'}",
                f"since={e.first_seen}",
            ]
            if e.tampered:
                fields.append(f"tampered={','.join(e.tampered)}")
            if e.moved_from is not None:
                fields.append(f"moved_from={_shown(e.moved_from)}")
            print("  ".join(fields))
        return EXIT_OK
    directory = os.path.normpath(os.path.abspath(args.directory))
    try:
        gone = marker_state.forget(config.state_dir, directory, args.recursive)
    except OSError as exc:
        print(f"{store}: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    if not gone:
        print(
            f"{_shown(directory)}: no stored marker (see `exfilwatch markers list`)",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    for d in gone:
        print(f"forgot {_shown(d)}")
    print(
        "The running agent keeps these tags until it re-reads the store: reload it now "
        "(systemctl reload exfilwatch, or kill -HUP the agent). A marker file still in place "
        "is learnt again: edit or remove it first."
    )
    return EXIT_OK


def _config_check(path: str, fmt: str) -> int:
    """The config (file sinks included: check_sink_path), and what `run` would refuse or
    leave out because of it: its rules (a missing path, a rule with errors). Nothing is
    created."""
    config, problems = check_file(path)
    rules = 0
    if config is not None and not errors_only(problems):
        from agent.rules.compiler import load_rules

        ruleset, rule_problems = load_rules(config.rules, time.time_ns() // 1000)
        problems += rule_problems
        rules = len(ruleset) if ruleset is not None else 0
    if config is None and any(p.code == "CFG_UNREADABLE" for p in problems):
        problems = [
            p if p.code != "CFG_UNREADABLE" or p.hint else replace(p, hint=_INIT_HINT)
            for p in problems
        ]
    if problems:
        print(format_problems(problems, fmt))
    elif fmt == "json":
        print("[]")
    if config is None or errors_only(problems):
        return EXIT_PROBLEMS
    if fmt == "text":
        print(
            f"{path}: ok ({len(config.watch)} watched trees, {rules} rules, "
            f"{len(config.sinks)} sinks)"
        )
    return EXIT_OK


def _status(config_path: str | None, state_dir: str | None, fmt: str) -> int:
    """The running agent's last status (agent/status.py), judged: exit 0, 1 or 3."""
    from agent import status

    if state_dir is None:
        path = config_path or default_config_path()
        config, problems = check_file(path)
        if config is None:
            print(format_problems(errors_only(problems) or problems), file=sys.stderr)
            print(f"{path}: give --state-dir to read the status anyway", file=sys.stderr)
            return EXIT_PROBLEMS
        state_dir = config.state_dir
    verdict = status.assess(*status.read_status(state_dir))
    print(status.as_json(verdict) if fmt == "json" else status.human(verdict))
    exit_code: int = verdict["exit"]
    return exit_code


_INIT_HINT = "write a commented default with `exfilwatch config init FILE`, then edit it"


def _config_init(path: str, force: bool) -> int:
    """The shipped default config, its rules path made absolute (the installed packs), in a
    new file only the owner can write (the agent refuses a config others can change)."""
    shipped = data_dir() / "config" / "agent.yaml"
    rules = data_dir() / "rules"
    try:
        text = shipped.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"{shipped}:0:0 CFG_UNREADABLE {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    text = text.replace("rules: [../rules]", f"rules: [{rules}]", 1)
    text = text.replace("# yaml-language-server: $schema=./agent.schema.json\n", "", 1)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        print(f"{path}: exists; edit it, or give --force to replace it", file=sys.stderr)
        return EXIT_PROBLEMS
    except OSError as exc:
        print(f"{path}:0:0 CFG_UNWRITABLE {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    print(f"{path}: written; edit its watch list, then: exfilwatch config check {path}")
    return EXIT_OK


def _run(
    config_path: str | None,
    duration: float | None,
    record_to: str | None,
    fmt: str | None = None,
) -> int:
    from agent.service import Agent

    path = config_path or default_config_path()
    config, problems = check_file(path)
    for p in problems:
        print(str(p), file=sys.stderr)
    if config is None:
        print(f"{path}: not started, fix the errors above", file=sys.stderr)
        return EXIT_PROBLEMS
    if fmt is not None:
        sinks = tuple(replace(s, format=fmt) if s.type == "stdout" else s for s in config.sinks)
        config = replace(config, sinks=sinks)
    router = None
    if record_to not in (None, "-"):
        target = os.path.abspath(record_to)
        for spec in config.watch:
            if target.startswith(spec.path.rstrip("/") + "/"):
                print(
                    f"{record_to}: inside the watched tree {spec.path}; the agent would record "
                    "its own writes (choose a path outside the watched trees)",
                    file=sys.stderr,
                )
                return EXIT_PROBLEMS
    if record_to is not None:
        kinds = frozenset({"event", "health"})
        try:
            sink = StreamSink(sys.stdout) if record_to == "-" else FileSink(record_to)
        except (UnsafeSinkError, OSError) as exc:
            print(f"{record_to}: not recording: {exc}", file=sys.stderr)
            return EXIT_PROBLEMS
        router = Router([(sink, kinds)])
    stop = threading.Event()
    reload = threading.Event()
    wake = threading.Event()

    reason = ["duration" if duration else "exited"]

    def on_stop(signum: int, frame: FrameType | None) -> None:
        reason[0] = signal.Signals(signum).name
        stop.set()
        wake.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload.set()
        wake.set()

    # Before the agent is made: its sinks start delivering (an outbox left by a killed run)
    # as soon as they open, and a stop asked for then must be a clean stop, not a kill.
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    # `kill -USR1 <pid>`: every thread's stack to stderr (the journal) and the agent runs on:
    # what a slow stop or a stalled pipeline is doing, with no debugger on the machine. Names
    # of functions and lines only, never a value (file names, contents) of the agent's data.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    own = [os.path.abspath(record_to)] if record_to not in (None, "-") else []
    try:
        agent = Agent(config, router=router, own_paths=own)
    except SinkOpenError as exc:
        # The check passed but the open did not (a race, a full disk): refused, no traceback.
        for text in exc.problems:
            print(f"{path}: {text}", file=sys.stderr)
        print(f"{path}: not started, a sink could not be opened", file=sys.stderr)
        return EXIT_PROBLEMS
    if config.rules and not agent.load_rules():
        for p in agent.rule_problems:
            print(str(p), file=sys.stderr)
        print(f"{path}: not started, fix the rule errors above", file=sys.stderr)
        return EXIT_PROBLEMS

    from agent.sdnotify import Notifier

    systemd = Notifier()
    try:
        agent.start()
    except (PermissionError, ValueError) as exc:
        # A key or store the agent refuses (privacy.pseudonymize with a key others can read).
        agent.stop(reason="start_failed")
        print(f"{path}: not started: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    systemd.ready(f"watching {len(config.watch)} trees")
    deadline = time.monotonic() + duration if duration else None
    try:
        while not stop.is_set():
            # A signal's handler sets an event, which ends the wait at once (a lock wait is
            # interrupted by signals): without a deadline or a systemd watchdog the main
            # thread never wakes idle.
            waits = [w for w in (systemd.watchdog_due(),) if w is not None]
            if deadline is not None:
                waits.append(max(0.0, deadline - time.monotonic()))
            wake.wait(min(waits) if waits else None)
            wake.clear()
            if reload.is_set():
                reload.clear()
                systemd.reloading()
                # Reopen first: the reload's own record then lands in the new file (logrotate
                # renamed the old one before sending the signal).
                agent.router.reopen()
                agent.reload()
                systemd.ready()
            due = systemd.watchdog_due()
            if due is not None and due <= 0:
                # A hung pipeline stops these: systemd restarts the agent.
                systemd.watchdog(agent.alive(systemd.watchdog_s or 0.0))
            if deadline is not None and time.monotonic() >= deadline:
                break
    except BaseException as exc:
        reason[0] = type(exc).__name__
        raise
    finally:
        systemd.stopping()
        drained = agent.stop(reason=reason[0])
        if router is not None:
            router.close()
    return EXIT_OK if drained else EXIT_PROBLEMS
