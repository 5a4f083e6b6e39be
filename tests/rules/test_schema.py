"""The editor schemas (rules/rule.schema.json, config/agent.schema.json) agree with the loaders."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator
from functools import cache
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import config, events
from agent.rules import loader
from agent.rules.compiler import load_text
from agent.rules.matchers import MODIFIERS, UNSUPPORTED
from agent.rules.model import ATTACK_TACTICS, CORRELATION_TYPES, LEVELS, STATUSES, Definitions
from agent.rules.testing import TEST_EPOCH_US
from agent.units import parse_duration

REPO = Path(__file__).resolve().parents[2]
RULE_SCHEMA = REPO / "rules" / "rule.schema.json"
AGENT_SCHEMA = REPO / "config" / "agent.schema.json"
AGENT_CONFIG = REPO / "config" / "agent.yaml"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")

# Every key tuple of the loaders, and the schema object (a JSON pointer) that must declare
# exactly those keys. A new `_*_KEYS` tuple in either module fails the test until it is here.
RULE_OBJECTS = {
    "_RULE_KEYS": "/$defs/rule",
    "_CORRELATION_KEYS": "/$defs/correlation",
    "_EXCEPTION_KEYS": "/$defs/exception",
    "_SUPPRESS_KEYS": "/$defs/suppress",
    "_TEST_KEYS": "/$defs/test",
    "_EXPECT_KEYS": "/$defs/expect/anyOf/1",
    "_STEP_KEYS": "/$defs/testStep",
    "_OVERRIDE_KEYS": "/$defs/override",
    "_LIST_KEYS": "/$defs/list",
    "_MACRO_KEYS": "/$defs/macro",
}
CONFIG_OBJECTS = {
    "_TOP_KEYS": "",
    "_WATCH_KEYS": "/$defs/watch",
    "_SINK_KEYS": "/$defs/sink",
    "_INOTIFY_KEYS": "/$defs/inotify",
    "_LOCATION_KEYS": "/$defs/locations",
    "_LINEAGE_KEYS": "/$defs/lineage",
    "_PROCESS_KEYS": "/$defs/processes",
    "_ENRICHMENT_KEYS": "/$defs/enrichment",
    "_OUTBOX_KEYS": "/$defs/outbox",
    "_METRICS_KEYS": "/$defs/metrics",
    "_WATCHLIST_KEYS": "/$defs/watchlist",
    "_WORKING_HOURS_KEYS": "/$defs/working_hours",
    "_RISK_KEYS": "/$defs/risk",
    "_PRIVACY_KEYS": "/$defs/privacy",
    "_TRUSTED_KEYS": "/$defs/trusted",
    "_DEVICE_KEYS": "/$defs/trusted_device",
}
# Maps the loader checks with a literal key tuple inside a method (nothing to import).
RULE_INLINE_OBJECTS = (
    "/$defs/correlation/properties/condition",
    "/$defs/override/properties/correlation",
    "/$defs/override/properties/correlation/properties/condition",
)


@cache
def _schema(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _at(schema: dict[str, Any], pointer: str) -> Any:
    """The schema at a JSON pointer, following a local `$ref` there."""
    node: Any = schema
    for part in pointer.split("/")[1:]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    while isinstance(node, dict) and "$ref" in node and "properties" not in node:
        node = _at(schema, node["$ref"].removeprefix("#"))
    return node


def _keys(module: object) -> dict[str, tuple[str, ...]]:
    return {
        name: value
        for name, value in vars(module).items()
        if re.fullmatch(r"_[A-Z_]+_KEYS", name) and isinstance(value, tuple)
    }


def _subschemas(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    yield pointer, node
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in ("enum", "const", "required", "examples", "default"):
                yield from _subschemas(value, f"{pointer}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _subschemas(value, f"{pointer}/{i}")


def _accepts(pattern: str, text: str) -> bool:
    # JSON Schema patterns are unanchored ECMA-262 searches; ours anchor themselves and use
    # only syntax Python's re reads the same way.
    return re.search(pattern, text) is not None


def _duration_accepts(schema: dict[str, Any], value: object) -> bool:
    duration = _at(schema, "/$defs/duration")
    assert duration["type"] == ["string", "number"]
    if isinstance(value, str):
        return _accepts(duration["pattern"], value)
    if type(value) in (int, float):
        return bool(value > duration["exclusiveMinimum"])
    return False


DISTINGUISHING = ("list", "macro", "override", "detection", "correlation")


def _branches() -> list[dict[str, Any]]:
    return _schema(RULE_SCHEMA)["oneOf"]  # type: ignore[no-any-return]


def _holds(guard: dict[str, Any], keys: set[str]) -> bool:
    """Whether a document with these keys satisfies a guard made of required, not and anyOf."""
    assert set(guard) <= {"required", "not", "anyOf"}, guard
    return (
        set(guard.get("required", ())) <= keys
        and not ("not" in guard and _holds(guard["not"], keys))
        and ("anyOf" not in guard or any(_holds(g, keys) for g in guard["anyOf"]))
    )


def _selected(branch: dict[str, Any], keys: set[str]) -> str | None:
    """The definition a oneOf branch checks a document with these keys against, if any."""
    chosen = branch["then"] if _holds(branch["if"], keys) else branch["else"]
    return chosen["$ref"] if chosen is not False else None


def _loader_kind(keys: set[str]) -> str:
    """The definition matching the loader's reader for a document with these keys."""
    called: list[str] = []

    class Spy(loader._Reader):
        def list_doc(self, node: yaml.Node) -> None:
            called.append("#/$defs/list")

        def macro_doc(self, node: yaml.Node) -> None:
            called.append("#/$defs/macro")

        def override_doc(self, node: yaml.Node) -> None:
            called.append("#/$defs/override")

        def rule_doc(self, node: yaml.Node) -> None:
            rule = "correlationRule" if "correlation" in keys else "detectionRule"
            called.append(f"#/$defs/{rule}")

    problems: list[Any] = []
    Spy(Definitions(), problems, "spy.yaml").document(
        yaml.compose("{" + ", ".join(f"{k}: x" for k in sorted(keys | {"x"})) + "}")
    )
    # A document of no kind is an error that hints "add 'detection:'": checked as a rule.
    return called[0] if called else "#/$defs/detectionRule"


def _problem_codes(text: str) -> list[str]:
    return [p.code for p in loader.read_text(text, "case.yaml")[1]]


# ------------------------------------------------------------------------------------------
# The files themselves


@pytest.mark.parametrize("path", [RULE_SCHEMA, AGENT_SCHEMA], ids=lambda p: p.name)
def test_each_schema_is_json_with_draft_2020_12_and_an_absolute_id(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert schema["$schema"] == DRAFT_2020_12
    assert re.match(r"^[a-z][a-z0-9+.-]*:\S+$", schema["$id"]), schema["$id"]


@pytest.mark.parametrize("path", [RULE_SCHEMA, AGENT_SCHEMA], ids=lambda p: p.name)
def test_every_property_in_a_schema_has_a_description_for_editor_hovers(path: Path) -> None:
    missing = [
        f"{pointer}/properties/{name}"
        for pointer, node in _subschemas(_schema(path))
        # `if` tests a value and `then` narrows a property declared (and described) elsewhere
        if "/if" not in pointer and "/then" not in pointer
        if isinstance(node, dict) and isinstance(node.get("properties"), dict)
        for name, prop in node["properties"].items()
        if prop is not False and not (isinstance(prop, dict) and prop.get("description"))
    ]
    assert missing == []


@pytest.mark.parametrize("path", [RULE_SCHEMA, AGENT_SCHEMA], ids=lambda p: p.name)
def test_every_ref_in_a_schema_points_at_a_definition_in_the_same_file(path: Path) -> None:
    schema = _schema(path)
    refs = [n["$ref"] for _, n in _subschemas(schema) if isinstance(n, dict) and "$ref" in n]
    assert refs
    for ref in refs:
        assert ref.startswith("#/$defs/"), ref
        assert isinstance(_at(schema, ref.removeprefix("#")), dict), ref


def test_every_shipped_rule_file_starts_with_the_modeline_of_the_rule_schema() -> None:
    files, problems = loader.rule_files([str(REPO / "rules")])
    assert files
    assert problems == []
    for file in map(Path, files):
        first = file.read_text(encoding="utf-8").splitlines()[0]
        match = MODELINE.match(first)
        assert match, f"{file.name}: first line is {first!r}"
        assert match[1] == "./rule.schema.json"
        assert (file.parent / match[1]).resolve() == RULE_SCHEMA


def test_the_shipped_agent_config_starts_with_the_modeline_of_the_agent_schema() -> None:
    first = AGENT_CONFIG.read_text(encoding="utf-8").splitlines()[0]
    match = MODELINE.match(first)
    assert match, f"first line is {first!r}"
    assert match[1] == "./agent.schema.json"
    assert (AGENT_CONFIG.parent / match[1]).resolve() == AGENT_SCHEMA


# ------------------------------------------------------------------------------------------
# Keys


def test_every_loader_key_tuple_is_exactly_the_property_set_of_its_schema_object() -> None:
    schema = _schema(RULE_SCHEMA)
    assert set(_keys(loader)) == set(RULE_OBJECTS), "map each loader key tuple to a schema object"
    for name, pointer in RULE_OBJECTS.items():
        node = _at(schema, pointer)
        assert set(node["properties"]) == set(getattr(loader, name)), name
        assert node["additionalProperties"] is False, pointer


def test_every_config_key_tuple_is_exactly_the_property_set_of_its_schema_object() -> None:
    schema = _schema(AGENT_SCHEMA)
    assert set(_keys(config)) == set(CONFIG_OBJECTS), "map each config key tuple to a schema object"
    for name, pointer in CONFIG_OBJECTS.items():
        node = _at(schema, pointer)
        assert set(node["properties"]) == set(getattr(config, name)), name
        assert node["additionalProperties"] is False, pointer


def test_the_maps_the_loader_checks_inline_accept_exactly_the_keys_the_schema_declares() -> None:
    schema = _schema(RULE_SCHEMA)
    declared = [set(_at(schema, p)["properties"]) for p in RULE_INLINE_OBJECTS]
    assert declared == [
        {"gte", "gt", "lt", "lte", "eq", "neq", "field"},
        {"timespan", "condition"},
        {"gte"},
    ]
    base = "id: b\ntitle: base\nlevel: low\ndetection: {s: {event.action: deleted}, condition: s}\n"
    correlation = (
        "id: c\ntitle: corr\nlevel: low\ncorrelation: {type: value_count, rules: [b], "
        "timespan: 5m, condition: {gte: 2, field: file.path%s}}\n"
    )
    override = "override: c\ncorrelation: {timespan: 5m, condition: {gte: 2%s}%s}\n"
    assert "RULE_UNKNOWN_KEY" not in _problem_codes(base + "---\n" + correlation % "")
    assert "RULE_UNKNOWN_KEY" in _problem_codes(base + "---\n" + correlation % ", lt9: 9")
    # The spec's other comparisons: a native correlation cannot use them (a Sigma one loads
    # inactive), an error that says why.
    assert "RULE_VALUE" in _problem_codes(base + "---\n" + correlation % ", lte: 9")
    assert "RULE_UNKNOWN_KEY" not in _problem_codes(override % ("", ""))
    assert "RULE_UNKNOWN_KEY" in _problem_codes(override % (", field: file.path", ""))
    assert "RULE_UNKNOWN_KEY" in _problem_codes(override % ("", ", type: event_count"))


def test_the_schema_requires_the_keys_the_loader_requires() -> None:
    schema = _schema(RULE_SCHEMA)
    rule = {"id", "title", "level"}
    assert set(schema["$defs"]["detectionRule"]["required"]) == rule | {"detection"}
    assert set(schema["$defs"]["correlationRule"]["required"]) == rule | {"correlation"}
    both = _at(schema, "/$defs/rule")["dependentSchemas"]
    assert both == {"detection": {"properties": {"correlation": False}}}
    assert set(_at(schema, "/$defs/list")["required"]) == {"list", "items"}
    assert set(_at(schema, "/$defs/macro")["required"]) == {"macro", "detection"}
    assert _at(schema, "/$defs/override")["required"] == ["override"]
    assert set(_at(schema, "/$defs/exception")["required"]) == {"match", "reason", "owner"}
    assert set(_at(schema, "/$defs/correlation")["required"]) == {"type", "rules", "timespan"}
    assert _at(schema, "/$defs/suppress")["required"] == ["for"]
    assert _at(schema, "/$defs/testStep")["required"] == ["event"]
    assert set(_at(schema, "/$defs/test")["required"]) == {"name", "expect"}
    assert _schema(AGENT_SCHEMA)["required"] == ["watch"]


def test_a_document_is_one_of_the_five_kinds_the_loader_reads() -> None:
    kinds = [c["$ref"] for b in _branches() for c in (b["then"], b["else"]) if c is not False]
    assert all(b["title"] for b in _branches())
    assert set(kinds) == {
        "#/$defs/detectionRule",
        "#/$defs/correlationRule",
        "#/$defs/list",
        "#/$defs/macro",
        "#/$defs/override",
    }


@pytest.mark.parametrize(
    "keys",
    [set(c) for n in range(len(DISTINGUISHING) + 1) for c in combinations(DISTINGUISHING, n)],
    ids=lambda keys: "+".join(sorted(keys)) or "none",
)
def test_the_schema_picks_a_documents_kind_by_the_same_keys_as_the_loader(keys: set[str]) -> None:
    picked = [kind for kind in (_selected(b, keys) for b in _branches()) if kind]
    assert picked == [_loader_kind(keys)]


# ------------------------------------------------------------------------------------------
# Values


def test_the_rule_schema_enums_are_the_models_levels_statuses_and_correlation_types() -> None:
    schema = _schema(RULE_SCHEMA)
    assert _at(schema, "/$defs/level")["enum"] == list(LEVELS)
    assert _at(schema, "/$defs/status")["enum"] == list(STATUSES)
    assert _at(schema, "/$defs/correlation/properties/type")["enum"] == list(CORRELATION_TYPES)


def test_the_config_schema_enums_are_the_configs_sensitivities_sources_sinks_and_records() -> None:
    schema = _schema(AGENT_SCHEMA)
    assert _at(schema, "/$defs/watch/properties/sensitivity")["enum"] == list(
        config.SENSITIVITY_LEVELS
    )
    assert _at(schema, "/properties/source")["enum"] == list(config.SOURCES)
    assert _at(schema, "/$defs/sink/properties/type")["enum"] == list(config.SINK_TYPES)
    records = _at(schema, "/$defs/sink/properties/records/items")
    assert records["enum"] == list(config.RECORD_KINDS)


def test_selections_name_the_event_fields_and_test_events_the_settable_ones() -> None:
    schema = _schema(RULE_SCHEMA)
    assert _at(schema, "/$defs/fieldName")["enum"] == list(events.FIELDS)
    assert list(_at(schema, "/$defs/selectionMap")["properties"]) == list(events.FIELDS)
    assert list(_at(schema, "/$defs/testEvent")["properties"]) == list(events.SETTABLE)


def test_the_modifier_list_is_the_matcher_registry() -> None:
    assert _at(_schema(RULE_SCHEMA), "/$defs/modifier")["enum"] == list(MODIFIERS)


def test_the_selection_key_pattern_is_built_from_exactly_the_fields_and_modifiers() -> None:
    pattern = _at(_schema(RULE_SCHEMA), "/$defs/selectionMap/propertyNames")["pattern"]
    parts = re.fullmatch(r"\^\((.*)\)\(\\\|\((.*)\)\)\*\$", pattern)
    assert parts, pattern
    assert {f.replace("\\", "") for f in parts[1].split("|")} == set(events.FIELDS)
    assert set(parts[2].split("|")) == set(MODIFIERS)


def test_the_selection_key_pattern_accepts_fields_with_modifiers_and_nothing_else() -> None:
    pattern = _at(_schema(RULE_SCHEMA), "/$defs/selectionMap/propertyNames")["pattern"]
    for field in events.FIELDS:
        assert _accepts(pattern, field), field
        for mod in MODIFIERS:
            assert _accepts(pattern, f"{field}|{mod}"), f"{field}|{mod}"
    assert _accepts(pattern, "file.name|re|i")
    assert _accepts(pattern, "process.name|contains|all|cased")
    rejected = [
        "event.acton",
        "file.path|startswth",
        "file.path|",
        "file.path|Contains",
        "file.pathx|contains",
        "xfile.path",
        "file",
        "",
        *(f"file.path|{m}" for m in UNSUPPORTED),
    ]
    assert [k for k in rejected if _accepts(pattern, k)] == []


def test_a_test_event_field_takes_exactly_the_value_types_event_from_fields_accepts() -> None:
    samples: dict[str, object] = {"string": "7", "integer": 7, "null": None, "array": ["a"]}
    for field, prop in _at(_schema(RULE_SCHEMA), "/$defs/testEvent")["properties"].items():
        branches = prop.get("anyOf", [prop])
        allowed = {
            t for b in branches for t in ([b["type"]] if isinstance(b["type"], str) else b["type"])
        }
        for kind, value in samples.items():
            try:
                events.event_from_fields({field: value})
            except ValueError:
                taken = False
            else:
                taken = True
            assert taken == (kind in allowed), f"{field} with a {kind}"


def test_ids_names_and_attack_tags_use_the_loaders_own_patterns() -> None:
    schema = _schema(RULE_SCHEMA)
    assert _at(schema, "/$defs/rule/properties/id")["pattern"] == loader._ID.pattern
    assert _at(schema, "/$defs/ruleId")["pattern"] == loader._ID.pattern
    for pointer in (
        "/$defs/list/properties/list",
        "/$defs/macro/properties/macro",
        "/$defs/detection/propertyNames",
    ):
        assert _at(schema, pointer)["pattern"] == loader._NAME.pattern, pointer
    technique, group, tactic = _at(schema, "/$defs/attackTag")["anyOf"]
    assert technique["pattern"] == loader._ATTACK_TECHNIQUE.pattern
    assert group["pattern"] == loader._ATTACK_GROUP.pattern
    hyphenated = [f"attack.{t.replace('_', '-')}" for t in ATTACK_TACTICS if "_" in t]
    assert tactic["enum"] == [f"attack.{t}" for t in ATTACK_TACTICS] + hyphenated
    assert _at(schema, "/$defs/tag")["if"] == {"pattern": "^attack\\."}


@pytest.mark.parametrize(
    "value",
    [
        *("30", "30s", "250ms", "5m", "2h", "1d", "1w", "1.5h", "0.5s", "0s", "0", "00m", "0.0s"),
        *("5 minutes", "5min", "-1s", "1y", "", "s", ".5s", "1.s", 30, 0.25, 0, -1, True),
    ],
)
def test_a_duration_is_valid_in_the_schema_exactly_when_the_loader_takes_it(value: object) -> None:
    try:
        taken = not isinstance(value, bool) and parse_duration(value) > 0
    except ValueError:
        taken = False
    assert _duration_accepts(_schema(RULE_SCHEMA), value) == taken


def test_both_schemas_describe_durations_the_same_way() -> None:
    assert _at(_schema(RULE_SCHEMA), "/$defs/duration") == _at(
        _schema(AGENT_SCHEMA), "/$defs/duration"
    )


def test_a_test_step_offset_is_zero_as_the_loader_spells_it_or_a_duration() -> None:
    zero = _at(_schema(RULE_SCHEMA), "/$defs/offset")["anyOf"][0]["enum"]
    test = (
        "id: r\ntitle: t\nlevel: low\ndetection: {s: {event.action: deleted}, condition: s}\n"
        "tests: [{name: n, events: [{at: %s, event: {event.action: deleted}}], expect: match}]\n"
    )
    for value in zero:
        assert _problem_codes(test % json.dumps(value)) == [], value
    assert "RULE_DURATION" in _problem_codes(test % "0m")
    assert not _duration_accepts(_schema(RULE_SCHEMA), "0m")


def test_the_repeat_bound_is_the_loaders() -> None:
    repeat = _at(_schema(RULE_SCHEMA), "/$defs/testStep/properties/repeat")
    assert (repeat["minimum"], repeat["maximum"]) == (1, loader.MAX_TEST_REPEAT)


def test_every_integer_minimum_in_the_config_schema_is_the_one_the_config_check_enforces() -> None:
    schema = _schema(AGENT_SCHEMA)
    sections: dict[str, dict[str, int]] = {"": {}}
    for name, prop in schema["properties"].items():
        if "minimum" in prop:
            sections[""][name] = prop["minimum"]
        target = _at(schema, f"/properties/{name}")
        for key, sub in target.get("properties", {}).items():
            if sub.get("type") == "integer":
                sections.setdefault(name, {})[key] = sub["minimum"]
    assert sections[""] and len(sections) > 1

    def check(section: str, values: dict[str, int]) -> list[str]:
        body = "".join(f"{k}: {v}\n" for k, v in values.items())
        if section:
            body = f"{section}: {{{', '.join(f'{k}: {v}' for k, v in values.items())}}}\n"
        problems = config.check_text("watch: []\n" + body, "/tmp/agent.yaml")[1]
        return [p.message for p in problems if p.severity == "error"]

    for section, minimums in sections.items():
        for key, low in minimums.items():
            values = dict(minimums) if section else {key: low}
            assert check(section, values) == [], f"{section}.{key}: {low}"
            values[key] = low - 1
            assert any(key in m for m in check(section, values)), f"{section}.{key}: {low - 1}"


# ------------------------------------------------------------------------------------------
# With a JSON Schema validator, when one happens to be installed (the project does not need one)


def _validator(schema_path: Path) -> Any:
    jsonschema = pytest.importorskip(
        "jsonschema",
        reason="jsonschema (or check-jsonschema) is not installed; the project does not depend "
        "on it, so shipped documents are not validated against the schemas in this run",
    )
    schema = _schema(schema_path)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _as_editor_sees(value: Any) -> Any:
    """YAML as yaml-language-server reads it (YAML 1.2): an unquoted date is a string."""
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _as_editor_sees(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_editor_sees(v) for v in value]
    return value


def _errors(validator: Any, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<document>'}: {e.message}"
        for e in validator.iter_errors(_as_editor_sees(document))
    ]


def test_every_shipped_rule_document_and_the_shipped_config_validate_against_the_schemas() -> None:
    rules, agent = _validator(RULE_SCHEMA), _validator(AGENT_SCHEMA)
    failures = []
    files, _ = loader.rule_files([str(REPO / "rules")])
    for file in files:
        text = Path(file).read_text(encoding="utf-8")
        for i, doc in enumerate(yaml.safe_load_all(text)):
            if doc is not None:
                failures += [f"{Path(file).name} document {i}: {e}" for e in _errors(rules, doc)]
    config_doc = yaml.safe_load(AGENT_CONFIG.read_text(encoding="utf-8"))
    failures += [f"agent.yaml: {e}" for e in _errors(agent, config_doc)]
    assert failures == []


BASE_RULE = (
    "id: r1\ntitle: t\nlevel: high\ndetection:\n  sel: {event.action: deleted}\n  condition: sel\n"
)
BROKEN_RULES = {
    "an unknown key": BASE_RULE + "severity: high\n",
    "a misspelt level": BASE_RULE.replace("level: high", "level: hgih"),
    "an unknown modifier": BASE_RULE.replace("event.action:", "file.path|startswth:"),
    "an unknown field": BASE_RULE.replace("event.action:", "event.acton:"),
    "a malformed ATT&CK tag": BASE_RULE + "tags: [attack.exfiltraton]\n",
    "a zero duration": BASE_RULE + "suppress: {by: [user.name], for: 0s}\n",
    "a value_count without field": "id: c1\ntitle: t\nlevel: high\ncorrelation: "
    "{type: value_count, rules: [r1], timespan: 5m, condition: {gte: 2}}\n",
    "a derived field in a test event": BASE_RULE + "tests: [{name: n, event: {file.name: x}, "
    "expect: match}]\n",
}
BROKEN_CONFIGS = {
    "an unknown key": "watch: [{path: /tmp, tgas: [x]}]\n",
    "an unknown sink type": "watch: []\nsinks: [{type: syslgo}]\n",
    "a queue_size below its minimum": "watch: []\nqueue_size: 999\n",
    "a file sink without a path": "watch: []\nsinks: [{type: file}]\n",
    "a home_depth above its maximum": "watch: []\nlocations: {home_depth: 17}\n",
    "a cpu_budget above one CPU": "watch: []\nenrichment: {cpu_budget: 1.5}\n",
}


@pytest.mark.parametrize("text", BROKEN_RULES.values(), ids=BROKEN_RULES.keys())
def test_a_rule_document_the_loader_rejects_is_rejected_by_the_schema_too(text: str) -> None:
    validator = _validator(RULE_SCHEMA)
    ruleset, problems = load_text(text, TEST_EPOCH_US, "broken.yaml")
    assert ruleset is None and problems
    assert _errors(validator, yaml.safe_load(text))


@pytest.mark.parametrize("text", BROKEN_CONFIGS.values(), ids=BROKEN_CONFIGS.keys())
def test_a_config_the_config_check_rejects_is_rejected_by_the_schema_too(text: str) -> None:
    validator = _validator(AGENT_SCHEMA)
    loaded, _ = config.check_text(text, "/tmp/agent.yaml")
    assert loaded is None
    assert _errors(validator, yaml.safe_load(text))
