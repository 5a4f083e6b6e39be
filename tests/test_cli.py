"""The command itself: version, help, and a clear refusal to start on a bad config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent import __version__


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=False
    )


def test_version_and_help() -> None:
    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"exfilwatch {__version__}"
    res = run("--help")
    assert res.returncode == 0
    for command in ("run", "record", "config"):
        assert command in res.stdout


def test_no_command_prints_usage_and_exits_2() -> None:
    res = run()
    assert res.returncode == 2
    assert "usage: exfilwatch" in res.stderr


def test_run_refuses_to_start_on_a_bad_config_and_says_where(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("watch:\n  - pth: /srv\n")
    res = run("run", "--config", str(cfg))
    assert res.returncode == 1
    assert f"{cfg}:2:5 CFG_UNKNOWN_KEY unknown key 'pth' in watch[0]" in res.stderr
    assert "not started" in res.stderr


def test_record_refuses_an_output_inside_a_watched_tree(tmp_path: Path) -> None:
    (tmp_path / "rnd").mkdir()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("watch: [{path: rnd}]\n")
    res = run("record", "--config", str(cfg), "-o", str(tmp_path / "rnd" / "events.jsonl"))
    assert res.returncode == 1
    assert "inside the watched tree" in res.stderr
    assert not (tmp_path / "rnd" / "events.jsonl").exists()


def test_run_refuses_to_start_on_bad_rules_when_errors_are_fatal_and_says_where(
    tmp_path: Path,
) -> None:
    (tmp_path / "rnd").mkdir()
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(
        "id: r\ntitle: t\nlevel: low\ndetection: {s: {file.pth: x}, condition: s}\n"
    )
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("watch: [{path: rnd}]\nrules: [rules]\nrule_errors: fatal\n")
    res = run("run", "--config", str(cfg))
    assert res.returncode == 1
    assert f"{tmp_path / 'rules' / 'r.yaml'}:4:17 RULE_UNKNOWN_FIELD" in res.stderr
    assert "fix the rule errors" in res.stderr
