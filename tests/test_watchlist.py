"""The departure watchlist: a store validated with located errors, the CLI (add, remove, list,
an all-or-nothing HR CSV import), and a running agent that picks changes up within 2 s and
marks the listed user's events."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import watchlist
from agent.config import ProcessSettings, SinkSpec, WatchSpec
from agent.service import Agent
from tests.conftest import Collector, as_user, make_config, needs_root
from tests.enrich.test_attribution import tree

__all__ = ["tree"]  # the fixture, used by name

TODAY = dt.date.today()


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("exfilwatch", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "agent"]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def config_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"watch: []\nstate_dir: {tmp_path / 'state'}\n{extra}")
    path.chmod(0o600)
    return path


def test_a_hand_edited_store_is_checked_with_located_errors(tmp_path: Path) -> None:
    text = """\
entries:
  - user: alice
    type: departng
    last_day: 2026-12-18
  - user: bob
    last_day: next week
  - {user: carol, last_day: 2026-12-01, watch_from: 2027-01-01}
  - {user: erin, last_day: 2026-12-18}
  - {user: erin, last_day: 2026-12-19}
  - user: dave
    last_day: 2026-12-18
    colour: red
"""
    entries, problems = watchlist.parse(text, "wl.yaml")
    assert entries is None
    got = [str(p) for p in problems]
    assert (
        got[0] == "wl.yaml:3:11 WL_VALUE unknown type 'departng' (hint: did you mean 'departing'?)"
    )
    assert any(g.startswith("wl.yaml:6:15 WL_DATE last_day must be a date") for g in got)
    assert any("WL_VALUE watch_from is after last_day" in g for g in got)
    assert any(g.startswith("wl.yaml:9:5 WL_DUPLICATE 'erin' is listed twice") for g in got)
    assert any(g.startswith("wl.yaml:12:5 WL_UNKNOWN_KEY unknown key 'colour'") for g in got)


def test_an_entry_is_active_from_its_start_to_days_after_its_last_day() -> None:
    e = watchlist.Entry("jo", "departing", TODAY, TODAY - dt.timedelta(days=90), 30)
    assert e.active(TODAY - dt.timedelta(days=90)) and e.active(TODAY + dt.timedelta(days=30))
    assert not e.active(TODAY - dt.timedelta(days=91))
    assert not e.active(TODAY + dt.timedelta(days=31))
    assert e.days_to_last_day(TODAY + dt.timedelta(days=3)) == -3
    status = watchlist.active([e], TODAY + dt.timedelta(days=1))["jo"]
    assert (status.type, status.days_to_last_day) == ("departing", -1)


def test_add_list_remove_with_config_before_or_after_the_subcommand(tmp_path: Path) -> None:
    cfg = config_file(tmp_path)
    last = TODAY + dt.timedelta(days=20)
    cli("watchlist", "--config", str(cfg), "add", "alice", "--last-day", str(last),
        "--note", "HR-4711")  # fmt: skip
    cli("watchlist", "add", "bob", "--last-day", str(last), "--type", "flight_risk",
        "--before", "10d", "--after", "5d", "--config", str(cfg))  # fmt: skip
    store = tmp_path / "state" / "watchlist.yaml"
    assert oct(store.stat().st_mode & 0o777) == oct(0o600)
    rows = json.loads(cli("watchlist", "list", "--format", "json", "--config", str(cfg)).stdout)
    by_user = {r["user"]: r for r in rows}
    assert by_user["alice"]["type"] == "departing" and by_user["alice"]["note"] == "HR-4711"
    assert by_user["alice"]["watch_from"] == str(TODAY - dt.timedelta(days=90))
    assert by_user["alice"]["active"] is True and by_user["alice"]["days_to_last_day"] == 20
    assert by_user["bob"]["watch_from"] == str(TODAY - dt.timedelta(days=10))
    assert by_user["bob"]["watch_until"] == str(last + dt.timedelta(days=5))
    assert by_user["alice"]["added_by"]
    table = cli("watchlist", "--config", str(cfg), "list").stdout
    assert table.splitlines()[0].split()[:3] == ["USER", "TYPE", "LAST"]
    cli("watchlist", "--config", str(cfg), "remove", "alice")
    rows = json.loads(cli("watchlist", "--config", str(cfg), "list", "--format", "json").stdout)
    assert [r["user"] for r in rows] == ["bob"]
    bad = cli("watchlist", "--config", str(cfg), "add", "x", "--last-day", "soon", check=False)
    assert bad.returncode == 2 and "not a date" in bad.stderr


def test_an_hr_csv_imports_all_rows_or_none_with_line_numbers(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, "watchlist:\n  user_map: {Kim.Lee@corp.example: kim}\n")
    good = tmp_path / "hr.csv"
    good.write_text(
        "\ufeffEmailAddress,ResignationDate,LastWorkingDate\n"
        "alice@corp.example,2026-11-20,2026-12-18\n"
        "KIM.LEE@corp.example,,12/31/2026\n"
    )
    cli("watchlist", "--config", str(cfg), "import", str(good))
    rows = json.loads(cli("watchlist", "--config", str(cfg), "list", "--format", "json").stdout)
    by_user = {r["user"]: r for r in rows}
    assert by_user["alice"]["watch_from"] == "2026-08-22", "90 days before the resignation"
    assert by_user["kim"]["last_day"] == "2026-12-31"
    before = (tmp_path / "state" / "watchlist.yaml").read_bytes()

    bad = tmp_path / "bad.csv"
    bad.write_text(
        "UserPrincipalName,ResignationDate,LastWorkingDate\n"
        "carol@corp.example,2026-11-20,2026-12-18\n"
        "@corp.example,2026-11-20,2026-12-18\n"
        "dave@corp.example,2026-11-20,someday\n"
    )
    done = cli("watchlist", "--config", str(cfg), "import", str(bad), check=False)
    assert done.returncode == 1
    assert f"{bad}:3:1 WL_CSV_USER" in done.stderr
    assert f"{bad}:4:1 WL_CSV_DATE LastWorkingDate 'someday' is not a date" in done.stderr
    assert "nothing imported" in done.stderr
    assert (tmp_path / "state" / "watchlist.yaml").read_bytes() == before, "no half import"
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("Name,Date\nx,y\n")
    done = cli("watchlist", "--config", str(cfg), "import", str(nocol), check=False)
    assert "WL_CSV_COLUMNS" in done.stderr


@needs_root
def test_the_running_agent_marks_a_listed_users_events_within_two_seconds(
    tree: Path,
    tmp_path: Path,
    run_agent: Callable[..., Agent],
    collector: Collector,
    test_user: str,
) -> None:
    config = make_config(
        [WatchSpec(str(tree), ("rnd",))],
        tmp_path,
        sinks=(SinkSpec("stdout", None, frozenset({"event", "health", "alert"})),),
        processes=ProcessSettings(enabled=True, interval=0.05, fanotify="off"),
    )
    run_agent(config)
    cfg = config_file(tmp_path)
    last = TODAY + dt.timedelta(days=14)
    cli("watchlist", "--config", str(cfg), "add", test_user, "--last-day", str(last))
    assert collector.wait_for(lambda c: bool(c.health("watchlist_entered")), timeout=5)
    (entered,) = collector.health("watchlist_entered")
    assert entered["exfilwatch"]["health"]["user"] == test_user
    assert entered["event"]["reason"] == "departing"

    mine = tree / "chip" / "by-listed-user.v"
    as_user(test_user, 'echo x > "$1"', str(mine))
    theirs = tree / "chip" / "by-root.v"
    theirs.write_text("x")

    def marked() -> bool:
        return any(
            e.path == str(mine) and e.user_name == test_user and e.watchlist == "departing"
            for e in collector.events()
        )

    assert collector.wait_for(lambda c: marked(), timeout=20), "the listed user's event"
    event = next(e for e in collector.events() if e.path == str(mine) and e.watchlist)
    assert event.watchlist_days == 14
    assert collector.wait_for(lambda c: any(e.path == str(theirs) for e in c.events()))
    assert all(e.watchlist is None for e in collector.events() if e.path == str(theirs))

    store = tmp_path / "state" / "watchlist.yaml"
    store.write_text("entries: [{user: x, last_day: never}]\n")
    assert collector.wait_for(lambda c: bool(c.health("watchlist_rejected")), timeout=5)
    (rejected,) = collector.health("watchlist_rejected")
    assert rejected["event"]["reason"] == "WL_DATE"
    assert rejected["exfilwatch"]["health"]["kept_entries"] == 1, "the last good list stays"

    store.unlink()
    cli("watchlist", "--config", str(cfg), "add", "nobody-else", "--last-day", str(last))
    assert collector.wait_for(lambda c: bool(c.health("watchlist_left")), timeout=5)
    assert collector.health("watchlist_left")[0]["exfilwatch"]["health"]["user"] == test_user


@pytest.mark.parametrize("mode", [0o622, 0o660])
@needs_root
def test_a_store_others_can_write_is_refused_by_the_running_agent(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector, mode: int
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    (tmp_path / "state").mkdir(mode=0o700)
    store = tmp_path / "state" / "watchlist.yaml"
    store.write_text(f"entries: [{{user: eve, last_day: {TODAY}}}]\n")
    store.chmod(mode)
    run_agent(make_config([WatchSpec(str(root), ("rnd",))], tmp_path))
    assert collector.wait_for(lambda c: bool(c.health("watchlist_rejected")), timeout=5)
    assert not collector.health("watchlist_entered")
