"""The service as systemd runs it: the unit verifies and stays hardened, and the agent speaks
sd_notify (READY, RELOADING, STOPPING, WATCHDOG) on a real notify socket."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.sdnotify import Notifier

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "packaging" / "systemd" / "exfilwatch.service"
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def local_unit(tmp_path: Path) -> Path:
    """The unit with the installed agent's path replaced by this checkout's (verify wants
    the programs it names to exist)."""
    exe = shutil.which("exfilwatch", path=os.path.dirname(sys.executable))
    assert exe is not None, "exfilwatch is installed with the test environment"
    unit = tmp_path / "exfilwatch.service"
    unit.write_text(UNIT.read_text().replace("/opt/exfilwatch/bin/exfilwatch", exe))
    return unit


@needs_analyze
def test_the_unit_verifies_clean(tmp_path: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "exfilwatch.service" not in done.stderr, done.stderr  # no warning about the unit


@needs_analyze
def test_the_unit_stays_hardened(tmp_path: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 252)")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    # 3.8 (root, ptrace, network and the exec reader's real-time priority are the job);
    # never drifting upwards.
    assert float(found.group(1)) <= 4.0, done.stdout
    text = UNIT.read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes"):
        assert setting in text


class NotifySocket:
    """A bound notify socket, as systemd's: the messages in the order they came."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def until(self, wanted: str, after: int = -1, timeout: float = 30) -> int:
        """The index of the first message holding the line `wanted` after index `after`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.messages):
                if i > after and wanted in m.split("\n"):
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(f"no {wanted} after #{after} in {self.messages}")
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue


def test_a_notifier_outside_systemd_is_silent_and_inside_sends_each_message(
    tmp_path: Path,
) -> None:
    assert not Notifier({}).ready()
    listener = NotifySocket(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_s == 4.0
    assert notifier.ready("watching 1 trees")
    at = listener.until("READY=1")
    assert listener.messages[at] == "READY=1\nSTATUS=watching 1 trees"
    assert notifier.watchdog(alive=True)
    listener.until("WATCHDOG=1")
    assert not notifier.watchdog(alive=False)  # a hung agent says nothing: systemd restarts it
    due = notifier.watchdog_due()
    assert due is not None and 1.5 < due <= 2.0
    # WATCHDOG_PID naming another process: the watchdog is not ours.
    other = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None


def test_the_agent_says_ready_keeps_the_watchdog_fed_and_says_reloading_and_stopping(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "rnd"
    tree.mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"watch: [{{path: {tree}, tags: [rnd]}}]\nstate_dir: {tmp_path / 'state'}\n"
        f"sinks: [{{type: file, path: {tmp_path / 'out.jsonl'}}}]\n"
    )
    config.chmod(0o600)
    listener = NotifySocket(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = listener.until("READY=1")
        # Fed every half second (WatchdogSec=1s) while the pipeline turns.
        first = listener.until("WATCHDOG=1", after=ready)
        listener.until("WATCHDOG=1", after=first)
        agent.send_signal(signal.SIGHUP)
        reloading = listener.until("RELOADING=1", after=ready)
        listener.until("READY=1", after=reloading)
    finally:
        agent.send_signal(signal.SIGTERM)
        listener.until("STOPPING=1")
        assert agent.wait(timeout=20) in (0, 1)


def test_the_launchd_plist_runs_the_agent_and_restarts_it_only_on_failure() -> None:
    import plistlib

    plist = plistlib.loads(
        (REPO / "packaging" / "launchd" / "io.exfilwatch.agent.plist").read_bytes()
    )
    assert plist["Label"] == "io.exfilwatch.agent"
    assert plist["ProgramArguments"][:2] == ["/opt/exfilwatch/bin/exfilwatch", "run"]
    config = plist["ProgramArguments"][plist["ProgramArguments"].index("--config") + 1]
    assert config == "/etc/exfilwatch/agent.yaml"
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["Umask"] == 0o77  # files it creates are its own
    # Every argument is one the command takes.
    from agent.cli import _parser

    _parser().parse_args(plist["ProgramArguments"][1:])
