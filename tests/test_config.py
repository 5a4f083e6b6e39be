"""Config validation: every problem in one pass, located, coded, with a hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import REPO_CONFIG, check_file, check_text, default_config_path, load
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
        f"{path}:8:11 CFG_UNKNOWN_SINK unknown sink type 'syslgo' (hint: one of stdout, file)",
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
    assert problems[0].line == 3


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


def test_agent_output_inside_a_watched_tree_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rnd").mkdir()
    text = "watch: [{path: rnd}]\nsinks: [{type: file, path: rnd/alerts.jsonl}]\nstate_dir: rnd/s\n"
    config, problems = check_text(text, str(tmp_path / "a.yaml"))
    assert config is None
    assert [p.code for p in problems] == ["CFG_WRITES_INTO_WATCHED_TREE"] * 2


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
