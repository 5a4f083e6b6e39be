"""A live agent (`exfilwatch run` as a subprocess, the shipped rules) on a workstation in a
temp directory: a tagged R&D tree (with a `critical` subtree by marker file), a home with a
sync folder and hidden directories, a staging directory, a trusted backup directory, and a
removable place (a real loop-mounted stick when root). Tests drive it with real commands and
read the alerts it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
watch:
  - path: {rnd}
    tags: [rnd]
    sensitivity: medium
rules: [{rules}]
sinks:
  - type: file
    path: {out}
    records: [alert, health, event]
heartbeat_interval: 1h
state_dir: {state}
locations:
  home_roots: [{homes}]
  staging_dirs: [{stage}{staging}]
  removable_patterns: [{media}/*]
  mount_check_interval: 0.2s
trusted:
  - path: {backup}
    reason: nightly backup of the R&D tree
{extra}"""


def command_exists(name: str) -> bool:
    return shutil.which(name) is not None


def need(*tools: str) -> None:
    """Skip (with the reason) when a tool the test runs for real is not installed."""
    missing = [t for t in tools if not command_exists(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (installed by .ci/run)")


class Workstation:
    """The temp workstation and the agent watching it."""

    def __init__(
        self,
        tmp: Path,
        extra: str = "",
        rules: tuple[Path, ...] = (),
        staging: tuple[Path, ...] = (),
    ) -> None:
        self.tmp = tmp
        self.rnd = tmp / "rnd"
        self.src = self.rnd / "src"
        self.src.mkdir(parents=True)
        for i in range(40):
            (self.src / f"mod{i}.c").write_text(f"int mod{i}(void) {{ return {i}; }}\n" * (40 + i))
        self.chip = self.rnd / "chip"
        self.chip.mkdir()
        (self.chip / ".exfilwatch.yaml").write_text("tags: [chip]\nsensitivity: high\n")
        for i in range(12):
            (self.chip / f"blk{i}.v").write_text(f"module blk{i}; endmodule\n" * (30 + i))
        self.crit = self.rnd / "tapeout"
        self.crit.mkdir()
        (self.crit / ".exfilwatch.yaml").write_text("tags: [tapeout]\nsensitivity: critical\n")
        (self.crit / "top.gds").write_bytes(os.urandom(20_000))
        self.home = tmp / "home" / "alice"
        self.dropbox = self.home / "Dropbox"
        self.dropbox.mkdir(parents=True)
        (self.home / ".config").mkdir()
        self.stage = tmp / "stage"
        self.stage.mkdir()
        self.backup = tmp / "backup"
        self.backup.mkdir()
        self.media = tmp / "media"
        self.media.mkdir()
        self.out = tmp / "log" / "records.jsonl"
        self.config = tmp / "etc" / "agent.yaml"
        self.config.parent.mkdir()
        self.config.write_text(
            CONFIG.format(
                rnd=self.rnd,
                rules=", ".join(str(p) for p in (REPO / "rules", *rules)),
                out=self.out,
                state=tmp / "state",
                homes=tmp / "home",
                stage=self.stage,
                staging="".join(f", {p}" for p in staging),
                media=self.media,
                backup=self.backup,
                extra=extra,
            )
        )
        self.config.chmod(0o600)
        exe = shutil.which("exfilwatch", path=os.path.dirname(sys.executable))
        cmd = [exe] if exe else [sys.executable, "-m", "agent"]
        # stderr to a file: a pipe nobody reads fills and blocks the agent's next log line.
        self.stderr_path = tmp / "agent.stderr"
        with self.stderr_path.open("a") as err:
            self.proc = subprocess.Popen(
                [*cmd, "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
            )
        for ready in ("source_ready", "lineage_index_built", "destinations_watched"):
            self.wait(lambda r=ready: self.health(r), ready, 60)
        self._seen = 0

    # -- reading what the agent wrote --

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        with self.out.open() as fh:
            return [json.loads(line) for line in fh if line.endswith("\n")]

    def health(self, action: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["event"]["kind"] in ("state", "metric") and r["event"]["action"] == action
        ]

    def alerts(self, rule_id: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["event"]["kind"] == "alert" and (rule_id is None or r["rule"]["id"] == rule_id)
        ]

    def events(self, action: str | None = None, path: Path | str | None = None) -> list[Any]:
        return [
            r
            for r in self.records()
            if r["event"]["kind"] == "event"
            and (action is None or r["event"]["action"] == action)
            and (path is None or r.get("file", {}).get("path") == str(path))
        ]

    def alert_ids(self) -> list[str]:
        return sorted({a["rule"]["id"] for a in self.alerts()})

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = predicate()
            if got:
                return got
            if self.proc.poll() is not None:
                err = self.stderr_path.read_text(errors="replace")
                raise AssertionError(f"agent exited: {err}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; alerts: {self.alert_ids()}")

    def wait_alert(self, rule_id: str, timeout: float = 30) -> dict[str, Any]:
        found: list[dict[str, Any]] = self.wait(
            lambda: self.alerts(rule_id), f"an alert of {rule_id}", timeout
        )
        return found[0]

    def settle(self, *places: Path) -> None:
        """Wait until the agent has processed everything done so far in each place: a fresh
        sentinel file is written there and its event awaited (the tagged tree, destinations and
        the enrichment worker each keep their order)."""
        for place in places or (self.rnd,):
            self._seen += 1
            sentinel = place / f".settle-{self._seen}"
            sentinel.write_text("s")
            self.wait(lambda s=sentinel: self.events("closed_write", s), f"sentinel {sentinel}")
            sentinel.unlink()

    def sh(self, script: str, cwd: Path | None = None) -> str:
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=cwd or self.tmp,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "HOME": str(self.home), "GIT_CONFIG_NOSYSTEM": "1"},
        )
        assert out.returncode == 0, f"{script!r} failed: {out.stderr}"
        return out.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workstation]:
    w = Workstation(tmp_path)
    try:
        yield w
    finally:
        w.stop()
