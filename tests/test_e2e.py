"""End to end: `exfilwatch run` as a real process, real file operations, recorded events."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.events import Event, read_jsonl

CONFIG = """\
watch:
  - path: {root}
    tags: [rnd]
    exclude: ["*.swp"]
sinks:
  - type: file
    path: {out}
    records: [alert, health, event]
heartbeat_interval: 1h
state_dir: {state}
locations: {{enabled: false}}
processes: {{enabled: false}}
root_check_interval: 0.2s
"""


class Run:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "rnd"
        self.root.mkdir()
        self.out = tmp / "log" / "records.jsonl"
        self.config = tmp / "etc" / "agent.yaml"
        self.config.parent.mkdir()
        self.write_config(CONFIG.format(root=self.root, out=self.out, state=tmp / "state"))
        exe = shutil.which("exfilwatch", path=os.path.dirname(sys.executable))
        cmd = [exe] if exe else [sys.executable, "-m", "agent"]
        self.argv = [*cmd, "run", "--config", str(self.config)]
        self.more: list[subprocess.Popen[str]] = []  # earlier runs of the same agent
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.wait(lambda: self.health("source_ready"), "source_ready")

    def write_config(self, text: str) -> None:
        self.config.write_text(text)
        self.config.chmod(0o600)

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        with self.out.open() as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def events(self) -> list[Event]:
        with self.out.open() as fh:
            return [e for e in read_jsonl(fh) if isinstance(e, Event)]

    def health(self, action: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["event"]["action"] == action and r["event"]["kind"] != "event"
        ]

    def has(self, action: str, path: Path, **fields: Any) -> bool:
        return any(
            e.action == action
            and e.path == str(path)
            and all(getattr(e, k) == v for k, v in fields.items())
            for e in self.events()
        )

    def wait(self, predicate: Any, what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_event(self, action: str, path: Path, **fields: Any) -> None:
        self.wait(lambda: self.has(action, path, **fields), f"{action} {path}")


@pytest.fixture
def agent_run(tmp_path: Path) -> Iterator[Run]:
    run = Run(tmp_path)
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()
    if run.proc.stderr:
        run.proc.stderr.close()


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
    agent_run.proc.send_signal(signal.SIGTERM)
    assert agent_run.proc.wait(timeout=5) == 0
    assert time.monotonic() - began < 2.0
    assert agent_run.records()[-1]["event"]["action"] == "agent_stopped"
    assert agent_run.records()[-1]["exfilwatch"]["health"]["drained"] is True


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
    agent_run.proc.send_signal(signal.SIGINT)
    assert agent_run.proc.wait(timeout=5) == 0


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
