"""The portable watchdog source on real observers: events, exclusions, and survival."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import WatchSpec
from agent.health import record
from agent.service import Agent
from agent.sources.base import RawEvent
from agent.sources.watch import WatchdogSource
from tests.conftest import Collector, make_config

BACKENDS = ["watchdog", "polling"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_operations_are_reported_through_watchdog(
    backend: str, tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    spec = WatchSpec(str(root), ("rnd",), exclude=("*.tmp",))
    run_agent(make_config([spec], tmp_path, source=backend))
    f = root / "a.txt"
    f.write_text("hello")
    (root / "skip.tmp").write_text("x")
    collector.wait_event("created", f, timeout=8, tags=("rnd",))
    f.rename(root / "b.txt")
    collector.wait_event("moved", root / "b.txt", timeout=8, src_path=str(f))
    (root / "b.txt").unlink()
    collector.wait_event("deleted", root / "b.txt", timeout=8)
    assert not any(e.path.endswith(".tmp") for e in collector.events())
    assert {e.source for e in collector.events()} == {backend}


def test_an_exception_downstream_does_not_kill_the_observer(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    got: list[RawEvent] = []
    reports: list[dict[str, object]] = []
    failed = []

    def emit(batch: list[RawEvent]) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("downstream bug")
        got.extend(batch)

    source = WatchdogSource([WatchSpec(str(root))], emit, reports.append)
    source.start()
    try:
        (root / "first").write_text("x")
        _wait(lambda: bool(failed))
        (root / "second").write_text("x")
        _wait(lambda: any(e.path.endswith("/second") for e in got))
    finally:
        source.stop()
    assert any(e.path.endswith("/second") for e in got)
    assert source.counters["handler_errors"] >= 1
    assert any(r["event"]["action"] == "source_error" for r in reports)  # type: ignore[index]


def test_watchdog_root_deleted_and_recreated_is_watched_again(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    got: list[RawEvent] = []
    reports: list[dict[str, object]] = []
    source = WatchdogSource(
        [WatchSpec(str(root))], got.extend, reports.append, root_check_interval=0.1
    )
    source.start()
    try:
        shutil.rmtree(root)
        _wait(lambda: _actions(reports) >= {"watch_root_vanished"})
        root.mkdir()
        _wait(lambda: "watch_root_restored" in _actions(reports))
        (root / "again").write_text("x")
        _wait(lambda: any(e.path.endswith("/again") for e in got))
    finally:
        source.stop()
    assert any(e.path.endswith("/again") for e in got)


def _actions(reports: list[dict[str, object]]) -> set[str]:
    return {r["event"]["action"] for r in reports}  # type: ignore[index]


def _wait(predicate: Callable[[], bool], timeout: float = 8.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)


def test_health_actions_are_a_closed_set() -> None:
    with pytest.raises(KeyError):
        record("not_an_action")
