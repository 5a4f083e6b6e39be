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
    agent_run.proc.send_signal(signal.SIGTERM)
    assert agent_run.proc.wait(timeout=5) == 0
    assert records_in(out)[-1]["event"]["action"] == "agent_stopped"
    assert len(records_in(rotated)) == len(old), "nothing written to the rotated file after HUP"
