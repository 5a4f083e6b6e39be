"""End to end: `exfilwatch run` as a real process, real file operations, recorded events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.events import Event, read_jsonl
from tests.conftest import Run


def test_real_operations_are_recorded_as_normalized_events(agent_run: Run, tmp_path: Path) -> None:
    root = agent_run.root
    design = root / "top.v"
    design.write_text("module top; endmodule\n")
    design.read_text()
    design.rename(root / "top_v2.v")
    (root / "editor.swp").write_text("x")
    (root / "top_v2.v").unlink()
    subprocess.run(["mkdir", "-p", str(root / "a/b/c")], check=True)
    (root / "a/b/c/deep.txt").write_text("deep")
    staged = tmp_path / "staging" / "proj"
    staged.mkdir(parents=True)
    (staged / "notes.md").write_text("notes")
    staged.rename(root / "proj")
    (root / "proj" / ".exfilwatch.yaml").write_text("tags: [crown-jewels]\nsensitivity: critical\n")
    agent_run.wait(lambda: agent_run.health("marker_loaded"), "marker_loaded")
    (root / "proj" / "weights.bin").write_bytes(b"\0" * 4096)

    agent_run.wait_event("closed_write", root / "proj" / "weights.bin")
    for action, path in [
        ("created", design),
        ("closed_write", design),
        ("opened", design),
        ("closed_nowrite", design),
        ("moved", root / "top_v2.v"),
        ("deleted", root / "top_v2.v"),
        ("created", root / "a"),
        ("created", root / "a/b/c"),
        ("created", root / "a/b/c/deep.txt"),  # by the kernel or, if it raced the watch, the scan
        ("moved_in", root / "proj"),
        ("created", root / "proj" / "notes.md"),
    ]:
        assert agent_run.has(action, path), (action, path)
    weights = next(
        e
        for e in agent_run.events()
        if e.path.endswith("weights.bin") and e.action == "closed_write"
    )
    assert weights.tags == ("rnd", "crown-jewels")
    assert weights.sensitivity == "critical"
    assert weights.size == 4096
    assert not any(e.path.endswith(".swp") for e in agent_run.events())

    began = time.monotonic()
    assert agent_run.stop() == 0
    assert time.monotonic() - began < 2.0
    assert agent_run.records()[-1]["event"]["action"] == "agent_stopped"
    assert agent_run.records()[-1]["exfilwatch"]["health"]["drained"] is True


def test_sigusr1_writes_every_threads_stack_and_the_agent_runs_on(agent_run: Run) -> None:
    agent_run.proc.send_signal(signal.SIGUSR1)
    agent_run.wait(lambda: "most recent call first" in agent_run.stderr(), "a stack dump")
    # Every thread: the main one waiting for signals and the pipeline's consumer among them.
    agent_run.wait(lambda: agent_run.stderr().count("Thread 0x") >= 3, "every thread's stack")
    assert "in _run" in agent_run.stderr()
    (agent_run.root / "after.txt").write_text("x")
    agent_run.wait_event("closed_write", agent_run.root / "after.txt")
    assert agent_run.stop() == 0
    stopped = agent_run.records()[-1]
    assert stopped["event"]["action"] == "agent_stopped"
    took = stopped["exfilwatch"]["health"]["stop_ms"]
    assert {"ticker", "pipeline"} <= set(took), took
    assert all(isinstance(ms, int | float) and ms >= 0 for ms in took.values()), took


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(agent_run: Run, tmp_path: Path) -> None:
    good = agent_run.config.read_text()
    agent_run.write_config(good + "watch_typo: 1\n")
    agent_run.proc.send_signal(signal.SIGHUP)
    agent_run.wait(lambda: agent_run.health("config_reload_rejected"), "reload rejected")
    rejected = agent_run.health("config_reload_rejected")[0]
    assert rejected["event"]["reason"] == "CFG_UNKNOWN_KEY"
    assert rejected["exfilwatch"]["health"]["problems"][0].startswith(f"{agent_run.config}:14:1 ")
    (agent_run.root / "still.txt").write_text("x")
    agent_run.wait_event("closed_write", agent_run.root / "still.txt")

    second = tmp_path / "models"
    second.mkdir()
    agent_run.write_config(
        good.replace("sinks:", f"  - path: {second}\n    tags: [weights]\nsinks:")
    )
    agent_run.proc.send_signal(signal.SIGHUP)
    agent_run.wait(lambda: agent_run.health("config_reloaded"), "reloaded")
    (second / "w.bin").write_text("x")
    agent_run.wait_event("closed_write", second / "w.bin", tags=("weights",))
    assert agent_run.stop(sig=signal.SIGINT) == 0


def test_record_writes_events_that_load_back(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"watch: [{{path: {root}}}]\nlocations: {{enabled: false}}\nprocesses: {{enabled: false}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    out = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "record", "--config", str(cfg), "-o", str(out)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            not out.exists() or "source_ready" not in out.read_text()
        ):
            time.sleep(0.05)
        name = os.fsdecode(b"odd\n\xffname")
        (root / name).write_text("x")
        while time.monotonic() < deadline and "closed_write" not in out.read_text():
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    with out.open() as fh:
        events = [e for e in read_jsonl(fh) if isinstance(e, Event)]
    assert [e.action for e in events] == ["created", "opened", "modified", "closed_write"]
    assert all(e.path == str(root / name) for e in events)
