"""SIGHUP after logrotate: the running agent writes to a new file at the configured path."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from tests.conftest import Run


def records_in(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_a_renamed_records_file_is_replaced_by_a_new_one_on_sighup(agent_run: Run) -> None:
    out = agent_run.out
    rotated = out.with_name(out.name + ".1")
    out.rename(rotated)  # what logrotate does before its postrotate script
    agent_run.proc.send_signal(signal.SIGHUP)
    agent_run.wait(lambda: agent_run.health("config_reloaded"), "config_reloaded in a new file")
    after = agent_run.root / "after-rotation.txt"
    after.write_text("x")
    agent_run.wait_event("closed_write", after)

    assert os.stat(out).st_ino != os.stat(rotated).st_ino
    old = records_in(rotated)
    assert any(r["event"]["action"] == "source_ready" for r in old)
    assert not any(r["event"]["action"] == "config_reloaded" for r in old)
    assert not any(r.get("file", {}).get("path") == str(after) for r in old)
    assert agent_run.stop() == 0
    assert records_in(out)[-1]["event"]["action"] == "agent_stopped"
    assert len(records_in(rotated)) == len(old), "nothing written to the rotated file after HUP"


def test_a_file_sink_with_max_bytes_rotates_keeping_n_files_and_loses_no_line(
    tmp_path: Path,
) -> None:
    """For hosts without logrotate: alerts.jsonl -> .1 -> ... -> .<keep>, the oldest deleted;
    every file holds whole lines and the kept ones hold the newest records in order."""
    from agent.events import dumps
    from agent.sinks import FileSink

    path = tmp_path / "log" / "alerts.jsonl"
    sink = FileSink(str(path), max_bytes=4096, keep=3)
    lines = [
        dumps({"event": {"kind": "alert", "id": f"a{n}"}, "n": n, "pad": "x" * 100})
        for n in range(400)
    ]
    try:
        for n in range(0, 400, 7):
            sink.write(lines[n : n + 7])
    finally:
        sink.close()
    files = [path.with_name(f"alerts.jsonl.{i}") for i in (3, 2, 1)] + [path]
    assert all(f.exists() for f in files)
    assert not path.with_name("alerts.jsonl.4").exists(), "only `keep` rotated files"
    assert sink.rotations > 3
    numbers = [r["n"] for f in files for r in records_in(f)]
    assert numbers == list(range(numbers[0], 400)), "the newest lines, in order, none twice"
    for f in files:
        assert f.stat().st_size <= 4096
        assert f.read_text().endswith("\n")
        assert oct(f.stat().st_mode & 0o777) == oct(0o640)
