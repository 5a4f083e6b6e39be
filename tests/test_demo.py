"""`exfilwatch demo`: self-contained, cleans up, and every scripted step raises its alert."""

from __future__ import annotations

import glob
import subprocess
import sys
import tempfile


def test_the_demo_raises_an_alert_for_every_step_and_leaves_nothing_behind() -> None:
    before = set(glob.glob(f"{tempfile.gettempdir()}/exfilwatch-demo-*"))
    done = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--timeout", "20s"],
        capture_output=True,
        text=True,
        check=False,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every step raised its alert" in done.stdout
    for step in ("Dropbox", "archive", "holiday photo", "delete the tree"):
        assert step in done.stdout
    assert set(glob.glob(f"{tempfile.gettempdir()}/exfilwatch-demo-*")) == before
