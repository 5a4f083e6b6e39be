"""`exfilwatch rules validate|test|coverage` and `exfilwatch replay`."""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import IO, Any

from msgspec.structs import astuple

from agent.alerts import stamp_created
from agent.config import check_file, default_config_path
from agent.diagnostics import Problem, errors_only, format_problems
from agent.events import SETTABLE, Event, dumps, read_jsonl
from agent.risk import RiskSettings, score_alert
from agent.rules.compiler import fingerprint, load_rules
from agent.rules.engine import Engine
from agent.rules.testing import coverage, run_all


def config_rule_paths(config_path: str | None) -> list[str] | None:
    path = config_path or default_config_path()
    config, problems = check_file(path)
    if config is None:
        print(format_problems(errors_only(problems)), file=sys.stderr)
        return None
    if not config.rules:
        print(f"{path}: no 'rules' configured; give rule paths", file=sys.stderr)
        return None
    return list(config.rules)


def _now_us() -> int:
    return time.time_ns() // 1000


def validate(paths: Sequence[str], fmt: str, show: str | None) -> int:
    ruleset, problems = load_rules(paths, _now_us())
    # With --show, stdout holds the one rule document; the problems go to stderr.
    listing = sys.stderr if show is not None else sys.stdout
    if fmt == "json" and (show is None or problems):
        print(format_problems(problems, "json"), file=listing)
    elif problems:
        print(format_problems(problems), file=listing)
    if ruleset is None:
        if fmt == "text":
            errors = len(errors_only(problems))
            print(f"{errors} error(s), {len(problems) - errors} warning(s)", file=sys.stderr)
        return 1
    if show is not None:
        compiled = ruleset.rules.get(show) or ruleset.correlations.get(show)
        rule = compiled.rule if compiled is not None else ruleset.disabled.get(show)
        if rule is None:
            print(f"no rule with id {show!r}", file=sys.stderr)
            return 1
        print(json.dumps(effective(rule, compiled.condition_text if compiled else ""), indent=2))
        return 0
    if fmt == "text":
        print(
            f"ok: {len(ruleset.rules)} rules, {len(ruleset.correlations)} correlations, "
            f"{len(ruleset.disabled)} disabled, from {len(ruleset.files)} files"
        )
    return 0


def attack_coverage(paths: Sequence[str]) -> int:
    """The ATT&CK coverage table of the rules (docs/rules.md holds the shipped packs')."""
    from agent.rules.coverage import markdown

    ruleset, problems = load_rules(paths, _now_us())
    if ruleset is None:
        print(format_problems(problems), file=sys.stderr)
        return 1
    print(markdown(ruleset), end="")
    return 0


def effective(rule: Any, condition: str) -> dict[str, Any]:
    """The rule as the engine runs it: overrides applied, condition expanded."""
    from agent.diagnostics import node_value

    out: dict[str, Any] = {
        "id": rule.id,
        "title": rule.title,
        "level": rule.level,
        "enabled": rule.enabled,
        "status": rule.status,
        "tags": list(rule.tags),
        "defined_at": f"{rule.where.file}:{rule.where.line}",
        "overridden_by": list(rule.overridden_by),
        "fingerprint": fingerprint(rule),
    }
    if rule.detection is not None:
        out["detection"] = {k: node_value(v) for k, v in rule.detection.items()}
        out["condition"] = rule.condition
        out["condition_expanded"] = condition
    if rule.correlation is not None:
        c = rule.correlation
        out["correlation"] = {
            "type": c.type,
            "rules": list(c.rules),
            "group-by": list(c.group_by),
            "timespan_s": c.timespan,
            "gte": c.gte,
            "field": c.field,
        }
    if rule.scope:
        out["scope"] = list(rule.scope)
    if rule.suppress is not None:
        out["suppress"] = {"by": list(rule.suppress.by), "for_s": rule.suppress.seconds}
    out["exceptions"] = [
        {
            "match": node_value(e.match),
            "reason": e.reason,
            "owner": e.owner,
            "expires_us": e.expires_us,
            "at": f"{e.where.file}:{e.where.line}",
        }
        for e in rule.exceptions
    ]
    return out


def test(paths: Sequence[str], require_tests: bool) -> int:
    ruleset, problems = load_rules(paths, _now_us())
    if problems:
        print(format_problems(problems))
    if ruleset is None:
        return 1
    results = run_all(ruleset)
    failed = [r for r in results if not r.passed]
    for r in results:
        if not r.passed:
            print(r)
    missing = coverage(ruleset) if require_tests else []
    for line in missing:
        print(f"MISSING {line}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or missing else 0


def replay(events_path: str, paths: Sequence[str], risk: RiskSettings | None = None) -> int:
    """Alerts for recorded events: the same the live agent emits for that stream.

    The file is read a line at a time and each alert written when it is made, so memory stays
    flat however long the recording. A bad line is reported where it is and skipped; the
    other lines still alert, and the exit code (1) says that some line was bad."""
    risk = risk or RiskSettings()
    if events_path == "-":
        return _replay(sys.stdin.buffer, "<stdin>", paths, risk)
    try:
        stream = open(events_path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        problem = Problem(events_path, 0, 0, "EVT_UNREADABLE", exc.strerror or str(exc))
        print(problem, file=sys.stderr)
        return 1
    with stream:
        return _replay(stream, events_path, paths, risk)


# An event line is a few KiB (a 4 KiB path, escaped, beside its raw form). A longer line is
# not an event, and reading it whole would let one line take all the memory there is.
MAX_EVENT_LINE = 1 << 20


def _lines(stream: IO[bytes], file: str) -> Iterator[tuple[int, str | Problem]]:
    """Numbered lines as text; one that is too long or not UTF-8 is a located problem."""
    lineno = 0
    while line := stream.readline(MAX_EVENT_LINE + 1):
        lineno += 1
        if len(line) > MAX_EVENT_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(MAX_EVENT_LINE + 1)  # the rest of it, skipped
            message = f"line longer than {MAX_EVENT_LINE} bytes"
            yield lineno, Problem(file, lineno, MAX_EVENT_LINE + 1, "EVT_TOO_LONG", message)
            continue
        try:
            yield lineno, line.decode("utf-8")
        except UnicodeDecodeError as exc:
            col = len(line[: exc.start].decode("utf-8")) + 1
            message = f"not UTF-8: {exc.reason} (byte 0x{line[exc.start]:02x})"
            yield lineno, Problem(file, lineno, col, "EVT_ENCODING", message)


_DOTTED = {attr: dotted for dotted, attr in SETTABLE.items()}


def _lone_surrogate(e: Event) -> str | None:
    """The first field holding a character no system text can (JSON "\\ud800"): alert ids
    hash every value as bytes, so such an event would stop the replay, not just itself."""
    for attr, value in zip(Event.__struct_fields__, astuple(e), strict=True):
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str) and not v.isascii():
                try:
                    v.encode("utf-8", "surrogateescape")
                except UnicodeEncodeError:
                    return _DOTTED.get(attr, attr)
    return None


def _records(stream: IO[bytes], file: str) -> Iterator[Event | Problem]:
    """The events of a JSON-lines stream and its bad lines, located; other lines (health
    records, alerts) are left out."""
    for lineno, text in _lines(stream, file):
        if isinstance(text, Problem):
            yield text
            continue
        # Without its newline, a line's JSON errors are located on that line.
        item = next(read_jsonl(io.StringIO(text.rstrip("\n")), file), None)
        if isinstance(item, Problem):
            yield replace(item, line=lineno)
        elif item is not None:
            # Strict UTF-8 gives no surrogates: only a JSON escape can (most lines have none).
            field = _lone_surrogate(item) if "\\ud" in text or "\\uD" in text else None
            if field is None:
                yield item
            else:
                yield Problem(file, lineno, 1, "EVT_FIELD", f"{field} holds a lone surrogate")


def _replay(stream: IO[bytes], file: str, paths: Sequence[str], risk: RiskSettings) -> int:
    records = _records(stream, file)
    bad = events = alerts = 0
    # Rules are loaded at the first event's time (list and exception expiry): peek at it,
    # reporting the bad lines before it, without reading further.
    first: Event | None = None
    for item in records:
        if isinstance(item, Event):
            first = item
            break
        bad += 1
        print(item, file=sys.stderr)
    ruleset, problems = load_rules(paths, first.timestamp_us if first else _now_us())
    if problems:
        print(format_problems(problems), file=sys.stderr)
    if ruleset is None:
        return 1
    engine = Engine(ruleset)
    out = sys.stdout
    try:
        for item in itertools.chain([first] if first else [], records):
            if isinstance(item, Problem):
                bad += 1
                print(item, file=sys.stderr)
                continue
            events += 1
            for alert in engine.process(item):
                alerts += 1
                score_alert(alert, item, risk)
                out.write(dumps(stamp_created(alert)) + "\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (`replay ... | head`): stop, and keep the interpreter from
        # failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 1
    print(f"{file}: {events} events, {bad} bad lines skipped, {alerts} alerts", file=sys.stderr)
    return 1 if bad else 0
