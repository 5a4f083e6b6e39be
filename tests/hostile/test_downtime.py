"""Downtime is a record: a killed agent says so when it comes back, and finds what changed."""

from __future__ import annotations

import os
import signal

from tests.conftest import Run


def restart(run: Run) -> None:
    """Another `exfilwatch run` on the same config and output, as the service would be."""
    run.more.append(run.proc)
    run.proc = run.spawn()


def test_after_kill_9_the_next_start_says_so_and_reports_what_was_written_meanwhile(
    agent_run: Run,
) -> None:
    root = agent_run.root
    agent_run.wait(lambda: agent_run.health("agent_previous_stop"), "first start record")
    first = agent_run.health("agent_previous_stop")[0]
    assert first["event"]["reason"] == "first_start"
    os.kill(agent_run.proc.pid, signal.SIGKILL)
    agent_run.proc.wait()
    # Written while nobody watched: the insider's window.
    (root / "while-down").mkdir()
    for i in range(25):
        (root / "while-down" / f"copy{i}.v").write_text(f"module m{i}; endmodule\n")
    restart(agent_run)
    agent_run.wait(lambda: agent_run.health("agent_unclean_stop"), "unclean stop record")
    record = agent_run.health("agent_unclean_stop")[0]
    assert record["event"]["reason"] == "unclean"
    assert record["log"]["level"] == "warning"
    data = record["exfilwatch"]["health"]
    assert data["down_since"] and data["down_seconds"] >= 0
    wanted = {str(root / "while-down" / f"copy{i}.v") for i in range(25)}
    agent_run.wait(
        lambda: wanted <= {e.path for e in agent_run.events() if e.action == "rescanned"},
        "the files written while the agent was down, as rescanned events",
        timeout=20,
    )
    assert any(r["event"]["reason"] == "downtime" for r in agent_run.health("rescan_completed"))


def test_after_a_clean_stop_the_next_start_says_when(agent_run: Run) -> None:
    agent_run.wait(lambda: agent_run.health("agent_previous_stop"), "first start record")
    assert agent_run.stop() == 0
    restart(agent_run)
    agent_run.wait(lambda: len(agent_run.health("agent_previous_stop")) == 2, "second start")
    record = agent_run.health("agent_previous_stop")[1]
    assert record["event"]["reason"] == "clean"
    assert record["exfilwatch"]["health"]["down_since"]
    assert agent_run.health("agent_unclean_stop") == []
