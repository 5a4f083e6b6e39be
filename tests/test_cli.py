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


def test_every_option_and_argument_has_help_text() -> None:
    import argparse

    from agent.cli import _parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(_parser(), "exfilwatch") == []


def test_a_command_without_its_subcommand_prints_its_own_help_and_exits_2() -> None:
    for command in ("rules", "config", "markers", "pseudonym"):
        done = run(command)
        assert done.returncode == 2, command
        assert f"usage: exfilwatch {command}" in done.stderr, (command, done.stderr)


def test_durations_take_units_and_zero_is_refused() -> None:
    from agent.cli import _parser

    parser = _parser()
    assert parser.parse_args(["run", "--duration", "5s"]).duration == 5.0
    assert parser.parse_args(["record", "--duration", "2m"]).duration == 120.0
    assert parser.parse_args(["run", "--duration", "1.5"]).duration == 1.5
    for bad in ("0", "0s", "-3", "soon"):
        done = run("run", "--duration", bad)
        assert done.returncode == 2, bad
        assert "--duration" in done.stderr, done.stderr


def test_a_missing_events_file_for_replay_is_a_located_error_not_a_traceback(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing.jsonl"
    done = run("replay", str(missing), "--rules", str(Path(__file__).parents[1] / "rules"))
    assert done.returncode == 1
    assert f"{missing}:0:0 EVT_UNREADABLE" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_init_writes_a_default_only_its_owner_can_change_and_check_accepts_it(
    tmp_path: Path,
) -> None:
    target = tmp_path / "etc" / "agent.yaml"
    done = run("config", "init", str(target))
    assert done.returncode == 0, done.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    assert "rules: [../rules]" not in target.read_text()  # made absolute: the installed packs
    checked = run("config", "check", str(target))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "rules" in checked.stdout
    again = run("config", "init", str(target))
    assert again.returncode == 1 and "--force" in again.stderr
    assert run("config", "init", str(target), "--force").returncode == 0


def test_config_check_finds_what_run_would_refuse_and_says_how_to_start(tmp_path: Path) -> None:
    tree = tmp_path / "rnd"
    tree.mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"watch: [{{path: {tree}, tags: [rnd]}}]\n"
        f"rules: [{tmp_path / 'no-such-rules'}]\n"
        f"sinks: [{{type: file, path: {tmp_path / 'no-such-dir' / 'alerts.jsonl'}}}]\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    config.chmod(0o600)
    done = run("config", "check", str(config))
    assert done.returncode == 1
    assert "RULE_PATH_MISSING" in done.stdout
    assert not (tmp_path / "no-such-dir").exists()  # nothing created by a check
    missing = run("config", "check", str(tmp_path / "none.yaml"))
    assert missing.returncode == 1 and "exfilwatch config init" in missing.stdout


def complete(script: str, *words: str) -> list[str]:
    """COMPREPLY of the generated bash function for a command line ending in words[-1]."""
    quoted = " ".join(f"'{w}'" for w in ("exfilwatch", *words))
    done = subprocess.run(
        [
            "bash",
            "-c",
            f"source /dev/stdin; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
            '_exfilwatch; printf "%s\\n" "${COMPREPLY[@]}"',
        ],
        input=script,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_bash_completion_is_generated_from_the_parser_and_completes_it() -> None:
    script = run("completion", "bash").stdout
    assert "complete -o filenames -F _exfilwatch exfilwatch" in script
    assert complete(script, "sta") == ["status"]
    assert set(complete(script, "rules", "")) >= {"validate", "test", "coverage"}
    assert complete(script, "run", "--format", "") == ["auto", "json", "pretty"]
    assert "--show" in complete(script, "rules", "validate", "--")
    zsh = run("completion", "zsh").stdout
    assert zsh.startswith("# zsh") and "bashcompinit" in zsh and "_exfilwatch()" in zsh


def test_the_man_page_lists_every_command_and_renders_cleanly() -> None:
    import shutil

    page = run("manpage").stdout
    assert page.startswith(".TH EXFILWATCH 8")
    for command in ("run", "rules validate", "config init", "status", "demo", "watchlist add"):
        assert f".B exfilwatch {command}" in page, command
    if shutil.which("groff"):
        rendered = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", "-z"],
            input=page,
            capture_output=True,
            text=True,
            check=False,
        )
        assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
