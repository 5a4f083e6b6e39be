"""`exfilwatch rules validate|test` and `exfilwatch replay`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from agent.alerts import stamp_created
from agent.config import check_file, default_config_path
from agent.diagnostics import errors_only, format_problems
from agent.events import Event, dumps, read_jsonl
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
    if fmt == "json":
        print(format_problems(problems, "json"))
    elif problems:
        print(format_problems(problems))
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


def replay(events_path: str, paths: Sequence[str]) -> int:
    """Alerts for recorded events: the same the live agent emits for that stream."""
    if events_path == "-":
        events = list(read_jsonl(sys.stdin, "<stdin>"))
    else:
        with open(events_path, encoding="ascii", errors="replace") as stream:
            events = list(read_jsonl(stream, events_path))
    bad = [p for p in events if not isinstance(p, Event)]
    if bad:
        print(format_problems(bad), file=sys.stderr)
        return 1
    first = next((e.timestamp_us for e in events if isinstance(e, Event)), _now_us())
    ruleset, problems = load_rules(paths, first)
    if problems:
        print(format_problems(problems), file=sys.stderr)
    if ruleset is None:
        return 1
    engine = Engine(ruleset)
    out = sys.stdout
    for e in events:
        assert isinstance(e, Event)
        for alert in engine.process(e):
            out.write(dumps(stamp_created(alert)) + "\n")
    out.flush()
    return 0
