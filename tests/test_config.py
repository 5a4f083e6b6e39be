"""Config validation: every problem in one pass, located, coded, with a hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import (
    LOCATION_EXCLUDES,
    REPO_CONFIG,
    EnrichmentSettings,
    check_file,
    check_text,
    default_config_path,
    load,
)
from agent.diagnostics import ProblemsError

BAD = """\
watch:
  - path: rnd
    tgas: [chip]
  - path: rnd2
    sensitivity: secret
    recursive: maybe
sinks:
  - type: syslgo
  - type: file
queue_size: 10
heartbeat_interval: soon
colour: blue
"""


def test_every_problem_is_reported_in_one_pass_with_location_code_and_hint(
    tmp_path: Path,
) -> None:
    (tmp_path / "rnd").mkdir()
    (tmp_path / "rnd2").mkdir()
    path = tmp_path / "agent.yaml"
    config, problems = check_text(BAD, str(path))
    assert config is None
    got = [str(p) for p in problems]
    assert got == [
        f"{path}:3:5 CFG_UNKNOWN_KEY unknown key 'tgas' in watch[0] (hint: did you mean 'tags'?)",
        f"{path}:5:18 CFG_VALUE unknown sensitivity 'secret' "
        "(hint: one of low, medium, high, critical)",
        f"{path}:6:16 CFG_TYPE watch[1].recursive must be true or false, not 'maybe'",
        f"{path}:8:11 CFG_UNKNOWN_SINK unknown sink type 'syslgo' (hint: did you mean 'syslog'?)",
        f"{path}:9:5 CFG_REQUIRED sinks[1] (file) needs a 'path'",
        f"{path}:10:13 CFG_VALUE queue_size must be at least 1000",
        f"{path}:11:21 CFG_DURATION heartbeat_interval: not a duration: 'soon' "
        "(use e.g. 30s, 5m, 2h, 1d)",
        f"{path}:12:1 CFG_UNKNOWN_KEY unknown key 'colour' in the config "
        f"(hint: allowed: {_allowed()})",
    ]


def _allowed() -> str:
    from agent.config import _TOP_KEYS

    return ", ".join(_TOP_KEYS)


def test_yaml_syntax_errors_point_at_the_line(tmp_path: Path) -> None:
    config, problems = check_text("watch:\n  - path: [unclosed\n", str(tmp_path / "a.yaml"))
    assert config is None
    assert problems[0].code == "CFG_YAML_PARSE"
    assert (problems[0].line, problems[0].col) == (2, 11)  # the '[' never closed


# (config, line:col of the mistake, hint): PyYAML notices each of these a line or more later.
BROKEN_CONFIGS = [
    (
        "watch:\n  - path: /srv\n    tags [chip]\nrules: [r]\n",
        "3:9",
        "did you forget a ':' after 'tags'?",
    ),
    (
        'watch:\n  - path: "/srv/rnd\nrules: [r]\n',
        "2:11",
        "unclosed quote started at line 2; close it with '\"'",
    ),
    (
        "watch: [{path: /srv}\nqueue_size: 5\n",
        "1:8",
        "unclosed '[' started here; close it with ']'",
    ),
    (
        "watch:\n  - path: /srv\n\t  tags: [a]\n",
        "3:1",
        "indent with spaces: YAML does not allow tabs",
    ),
    (
        "watch:\n  - path: /a\n - path: /b\n",
        "3:2",
        "check the indentation: this line lines up with no key or item above it",
    ),
    ("watch:\n  - path /srv\n    tags: [a]\n", "2:9", "did you forget a ':' after 'path'?"),
]


@pytest.mark.parametrize(("text", "where", "hint"), BROKEN_CONFIGS)
def test_yaml_syntax_errors_point_at_the_mistake_with_a_hint(
    tmp_path: Path, text: str, where: str, hint: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    config, problems = check_file(str(path))
    assert config is None
    assert [(p.code, f"{p.line}:{p.col}", p.hint) for p in problems] == [
        ("CFG_YAML_PARSE", where, hint)
    ]


def test_a_config_that_is_not_utf8_is_located_at_its_first_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"# Caf\xc3\xa9\nwatch:\n  - path: /srv/caf\xe9\n")
    config, problems = check_file(str(path))
    assert config is None
    assert [str(p) for p in problems] == [
        f"{path}:3:19 CFG_ENCODING not UTF-8: byte 0xe9 is not a character "
        "(hint: save the file as UTF-8)"
    ]


def test_duplicate_keys_are_errors_not_silently_last_wins(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    config, problems = check_text(
        "watch: [{path: r}]\nqueue_size: 5000\nqueue_size: 9000\n", str(tmp_path / "a.yaml")
    )
    assert config is None
    assert [(p.code, p.line) for p in problems] == [("CFG_DUPLICATE_KEY", 3)]


def test_a_missing_watch_path_is_a_warning_and_relative_paths_follow_the_file(
    tmp_path: Path,
) -> None:
    config, problems = check_text("watch: [{path: not/yet}]\n", str(tmp_path / "a.yaml"))
    assert config is not None
    assert config.watch[0].path == str(tmp_path / "not" / "yet")
    assert [(p.code, p.severity) for p in problems] == [("CFG_WATCH_PATH_MISSING", "warning")]


@pytest.mark.parametrize(
    ("sinks", "line"),
    [
        ("  - {type: stdout, records: [alert]}\n  - {type: stdout, records: [event]}\n", 3),
        ("  - {type: stdout, records: [alert, health], min_severity: critical}\n", 3),
    ],
)
def test_sinks_that_would_report_no_loss_are_a_warning(
    tmp_path: Path, sinks: str, line: int
) -> None:
    config, problems = check_text(f"watch: []\nsinks:\n{sinks}", str(tmp_path / "a.yaml"))
    assert config is not None
    assert [(p.code, p.severity, p.line) for p in problems] == [
        ("CFG_NO_HEALTH_SINK", "warning", line)
    ]
    assert problems[0].hint


@pytest.mark.parametrize(
    "sinks",
    [
        "[{type: stdout}]",  # records default to alert and health
        "[{type: stdout, records: [alert]}, {type: stdout, records: [health]}]",
        "[{type: stdout, records: [health, alert], min_severity: high}]",  # error still passes
    ],
)
def test_a_sink_that_takes_error_health_records_is_enough(tmp_path: Path, sinks: str) -> None:
    config, problems = check_text(f"watch: []\nsinks: {sinks}\n", str(tmp_path / "a.yaml"))
    assert config is not None and problems == []


def test_agent_output_inside_a_watched_tree_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rnd").mkdir()
    text = "watch: [{path: rnd}]\nsinks: [{type: file, path: rnd/alerts.jsonl}]\nstate_dir: rnd/s\n"
    config, problems = check_text(text, str(tmp_path / "a.yaml"))
    assert config is None
    assert [p.code for p in problems] == ["CFG_WRITES_INTO_WATCHED_TREE"] * 2


def test_the_lanes_enrichment_and_home_discovery_have_their_documented_defaults(
    tmp_path: Path,
) -> None:
    config, problems = check_text("watch: []\n", str(tmp_path / "a.yaml"))
    assert config is not None and problems == []
    assert (config.queue_size, config.egress_queue_size, config.staging_queue_size) == (
        50_000,
        20_000,
        20_000,
    )
    assert config.enrichment == EnrichmentSettings(
        queue_size=10_000,
        per_user_queue=2_000,
        max_delay=1.0,
        io_budget_bytes=64 * 1024 * 1024,
        cpu_budget=0.25,
    )
    assert config.locations.home_depth == 4
    assert config.locations.exclude == LOCATION_EXCLUDES
    assert ".cache" in LOCATION_EXCLUDES and ".config/google-chrome" in LOCATION_EXCLUDES


def test_lane_caps_enrichment_bounds_and_home_discovery_are_read_as_written(
    tmp_path: Path,
) -> None:
    text = """\
watch: []
queue_size: 1000
egress_queue_size: 100
staging_queue_size: 5000
locations:
  home_depth: 16
  exclude: [.cache, "projects/*/scratch", "build/**"]
enrichment:
  queue_size: 1
  per_user_queue: 1
  max_delay: 250ms
  io_budget_bytes: 1
  cpu_budget: 1
"""
    config, problems = check_text(text, str(tmp_path / "a.yaml"))
    assert config is not None, [str(p) for p in problems]
    assert (config.queue_size, config.egress_queue_size, config.staging_queue_size) == (
        1000,
        100,
        5000,
    )
    assert config.locations.home_depth == 16
    assert config.locations.exclude == (".cache", "projects/*/scratch", "build/**")
    assert config.enrichment == EnrichmentSettings(1, 1, 0.25, 1, 1.0)
    assert isinstance(config.enrichment.cpu_budget, float)


def test_an_empty_locations_exclude_watches_every_subtree(tmp_path: Path) -> None:
    config, _ = check_text("watch: []\nlocations: {exclude: []}\n", str(tmp_path / "a.yaml"))
    assert config is not None and config.locations.exclude == ()


BAD_NEW_KEYS = """\
watch: []
egress_queue_size: 99
staging_queue_size: many
locations:
  home_depth: 17
  exclude: [.cache, a/../b, "", /]
enrichment:
  queue_size: 0
  per_user_queue: true
  max_delay: 0s
  io_budget_bytes: 0
  cpu_budget: 1.5
  colour: x
"""


def test_every_bad_lane_cap_enrichment_bound_and_home_setting_is_located_in_one_pass(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    config, problems = check_text(BAD_NEW_KEYS, str(path))
    assert config is None
    assert [str(p) for p in problems] == [
        f"{path}:2:20 CFG_VALUE egress_queue_size must be at least 100",
        f"{path}:3:21 CFG_TYPE staging_queue_size must be an integer, not 'many'",
        f"{path}:5:15 CFG_VALUE locations.home_depth must be at most 16",
        f"{path}:6:21 CFG_GLOB locations.exclude: pattern 'a/../b' has an empty, '.' or '..' "
        "component",
        f"{path}:6:29 CFG_VALUE an entry of locations.exclude is empty",
        f"{path}:6:33 CFG_GLOB locations.exclude: pattern '/' matches nothing",
        f"{path}:8:15 CFG_VALUE enrichment.queue_size must be at least 1",
        f"{path}:9:19 CFG_TYPE enrichment.per_user_queue must be an integer, not True",
        f"{path}:10:14 CFG_VALUE enrichment.max_delay must be longer than zero",
        f"{path}:11:20 CFG_VALUE enrichment.io_budget_bytes must be at least 1",
        f"{path}:12:15 CFG_VALUE enrichment.cpu_budget must be more than 0 and at most 1",
        f"{path}:13:3 CFG_UNKNOWN_KEY unknown key 'colour' in enrichment "
        "(hint: allowed: queue_size, per_user_queue, max_delay, io_budget_bytes, cpu_budget, "
        "decode_max_bytes)",
    ]


@pytest.mark.parametrize(
    ("body", "col", "code", "message"),
    [
        ("staging_queue_size: 99", 21, "CFG_VALUE", "staging_queue_size must be at least 100"),
        ("egress_queue_size: 1e5", 20, "CFG_TYPE", "egress_queue_size must be an integer"),
        ("locations: {home_depth: 0}", 25, "CFG_VALUE", "locations.home_depth must be at least 1"),
        ("locations: {home_depth: 2.5}", 25, "CFG_TYPE", "locations.home_depth must be an integer"),
        ("locations: {exclude: .cache}", 22, "CFG_TYPE", "locations.exclude must be a list"),
        ("locations: {exclude: [[.x]]}", 23, "CFG_TYPE", "each entry of locations.exclude must"),
        ("enrichment: []", 13, "CFG_TYPE", "enrichment must be a mapping"),
        ("enrichment: {per_user_queue: 0}", 30, "CFG_VALUE", "enrichment.per_user_queue must be"),
        ("enrichment: {max_delay: soon}", 25, "CFG_DURATION", "enrichment.max_delay: not a dur"),
        ("enrichment: {max_delay: [1s]}", 25, "CFG_TYPE", "enrichment.max_delay must be a dur"),
        ("enrichment: {cpu_budget: 0}", 26, "CFG_VALUE", "enrichment.cpu_budget must be more"),
        ("enrichment: {cpu_budget: -0.5}", 26, "CFG_VALUE", "enrichment.cpu_budget must be more"),
        ("enrichment: {cpu_budget: .nan}", 26, "CFG_VALUE", "enrichment.cpu_budget must be more"),
        ("enrichment: {cpu_budget: lots}", 26, "CFG_TYPE", "enrichment.cpu_budget must be a num"),
        ("enrichment: {cpu_budget: yes}", 26, "CFG_TYPE", "enrichment.cpu_budget must be a num"),
        ("enrichment: {cpu_budget: [1]}", 26, "CFG_TYPE", "enrichment.cpu_budget must be a sin"),
    ],
)
def test_each_bad_new_value_is_one_located_problem_with_its_code(
    tmp_path: Path, body: str, col: int, code: str, message: str
) -> None:
    config, problems = check_text(f"watch: []\n{body}\n", str(tmp_path / "a.yaml"))
    assert config is None
    assert [(p.line, p.col, p.code) for p in problems] == [(2, col, code)]
    assert problems[0].message.startswith(message), problems[0].message


def test_an_exclude_glob_problem_in_a_watch_entry_points_at_the_pattern(tmp_path: Path) -> None:
    (tmp_path / "rnd").mkdir()
    text = "watch:\n  - path: rnd\n    exclude: [ok, ../up]\n"
    config, problems = check_text(text, str(tmp_path / "a.yaml"))
    assert config is None
    assert [(p.line, p.col, p.code) for p in problems] == [(3, 19, "CFG_GLOB")]


@pytest.mark.skipif(os.geteuid() != 0, reason="the permission check applies when run as root")
def test_a_config_others_can_write_is_refused_when_root(tmp_path: Path) -> None:
    (tmp_path / "rnd").mkdir()
    path = tmp_path / "agent.yaml"
    path.write_text("watch: [{path: rnd}]\n")
    path.chmod(0o666)
    config, problems = check_file(str(path))
    assert config is None
    assert problems[0].code == "CFG_UNSAFE_PERMISSIONS"
    assert problems[0].hint == f"chmod go-w {path}"
    with pytest.raises(ProblemsError):
        load(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="the permission check applies when run as root")
def test_a_config_in_a_directory_others_can_change_is_refused_unless_sticky(
    tmp_path: Path,
) -> None:
    # Others could replace or delete the file there (sshd's StrictModes); /tmp-like sticky
    # directories only let them remove their own files.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "rnd").mkdir()
    path = shared / "agent.yaml"
    path.write_text("watch: [{path: rnd}]\n")
    path.chmod(0o600)
    shared.chmod(0o777)
    config, problems = check_file(str(path))
    assert config is None
    (problem,) = [p for p in problems if p.code == "CFG_UNSAFE_DIRECTORY"]
    assert problem.hint == f"chmod go-w {shared}"
    shared.chmod(0o1777)
    config, problems = check_file(str(path))
    assert config is not None, [str(p) for p in problems]
    shared.chmod(0o755)
    os.chown(shared, 65534, 65534)  # a directory another user owns
    config, problems = check_file(str(path))
    assert config is None
    (problem,) = [p for p in problems if p.code == "CFG_UNSAFE_DIRECTORY"]
    assert problem.hint == f"chown root {shared}"


def test_the_shipped_config_is_valid() -> None:
    config, problems = check_file(str(REPO_CONFIG))
    assert config is not None, [str(p) for p in problems]
    assert all(p.severity == "warning" for p in problems)


def test_without_etc_config_the_repository_config_is_the_default() -> None:
    if Path("/etc/exfilwatch/agent.yaml").exists():
        assert default_config_path() == "/etc/exfilwatch/agent.yaml"
    else:
        assert default_config_path() == str(REPO_CONFIG)


def test_config_check_command_exits_nonzero_and_prints_json(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(BAD)
    (tmp_path / "rnd").mkdir()
    (tmp_path / "rnd2").mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "agent", "config", "check", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1
    problems = json.loads(res.stdout)
    assert problems[0]["code"] == "CFG_UNKNOWN_KEY" and problems[0]["line"] == 3
    good = tmp_path / "good.yaml"
    good.write_text("watch: [{path: rnd}]\n")
    res = subprocess.run(
        [sys.executable, "-m", "agent", "config", "check", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok (1 watched trees" in res.stdout


def test_the_process_source_is_one_of_auto_kernel_poll(tmp_path: Path) -> None:
    good, problems = check_text(
        "watch:\n  - path: /tmp\nprocesses:\n  source: kernel\n", str(tmp_path / "a.yaml")
    )
    assert good is not None and good.processes.source == "kernel", problems
    default, _ = check_text("watch:\n  - path: /tmp\n", str(tmp_path / "a.yaml"))
    assert default is not None and default.processes.source == "auto"
    bad, problems = check_text(
        "watch:\n  - path: /tmp\nprocesses:\n  source: audit\n", str(tmp_path / "a.yaml")
    )
    assert bad is None
    assert [(p.line, p.col, p.code) for p in problems] == [(4, 11, "CFG_VALUE")]


def test_fanotify_dirs_takes_auto_on_off_and_yaml_booleans(tmp_path: Path) -> None:
    for text, want in (("auto", "auto"), ("on", "on"), ("off", "off"), ('"off"', "off")):
        config, problems = check_text(
            f"watch:\n  - path: /tmp\nprocesses:\n  fanotify_dirs: {text}\n",
            str(tmp_path / "a.yaml"),
        )
        assert config is not None and config.processes.fanotify_dirs == want, problems
