"""Shared fixtures: a record collector, an in-process agent, and a thread-leak guard."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    Config,
    LocationSettings,
    ProcessSettings,
    SinkSpec,
    WatchSpec,
    check_text,
)
from agent.events import EVENT_DATASETS, Event, from_dict, read_jsonl
from agent.service import Agent
from agent.sinks import Router

REPO = Path(__file__).resolve().parent.parent
ECS_FIELDS = REPO.parent / "shared" / "ecs" / "fields.csv"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (kernel inotify settings)")
# One user per test session: two sessions at once (a developer's and CI's, or parallel
# helpers) never share, or delete under each other, the user they act as.
TEST_USER = f"exfilwatch-t{os.getpid()}"
USERADD = ("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin")


@pytest.fixture(scope="session")
def test_user() -> Iterator[str]:
    """A dedicated unprivileged user for the run (the watched user, or an attacker), removed
    at the end of the session if this run created it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a test user")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    import pwd

    created = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        for attempt in range(10):  # another session may hold the passwd lock a moment
            made = subprocess.run(
                [*USERADD, TEST_USER],
                capture_output=True,
                text=True,
                check=False,
            )
            if made.returncode == 0:
                break
            if attempt == 9:
                raise AssertionError(f"useradd failed: {made.stderr}") from None
            time.sleep(0.2)
        created = True
    yield TEST_USER
    if created:
        for _ in range(10):
            if subprocess.run(
                ["userdel", TEST_USER], capture_output=True, check=False
            ).returncode in (
                0,
                6,  # no such user
            ):
                break
            time.sleep(0.2)


def as_user(user: str, script: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a shell script as `user` (runuser, no login shell needed); raises on failure."""
    return subprocess.run(
        ["runuser", "-u", user, "--", "sh", "-c", script, "sh", *args],
        capture_output=True,
        text=True,
        check=kw.pop("check", True),
        **kw,
    )


class Collector:
    """A real sink that keeps the JSON lines it was given, for assertions."""

    name = "collector"

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def write(self, lines: Sequence[str]) -> None:
        with self._cond:
            self.lines.extend(lines)
            self._cond.notify_all()

    def close(self) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(line) for line in self.lines]

    def events(self) -> list[Event]:
        return [
            from_dict(r)
            for r in self.records()
            if r["event"]["kind"] == "event" and r["event"]["dataset"] in EVENT_DATASETS
        ]

    def health(self, action: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["event"]["dataset"] not in (*EVENT_DATASETS, "exfilwatch.alert")
            and (action is None or r["event"]["action"] == action)
        ]

    def wait_for(self, predicate: Callable[[Collector], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)

    def has_event(self, action: str, path: Path | str, **fields: Any) -> bool:
        return any(
            e.action == action
            and e.path == str(path)
            and all(getattr(e, k) == v for k, v in fields.items())
            for e in self.events()
        )

    def wait_event(
        self, action: str, path: Path | str, timeout: float = 5.0, **fields: Any
    ) -> None:
        if not self.wait_for(lambda c: c.has_event(action, path, **fields), timeout):
            seen = [(e.action, e.path) for e in self.events()]
            raise AssertionError(f"no {action} event for {path}; saw {seen}")


def make_config(specs: Sequence[WatchSpec], tmp: Path, **overrides: Any) -> Config:
    base = Config(
        source_file=str(tmp / "agent.yaml"),
        watch=tuple(specs),
        sinks=(SinkSpec("stdout", None, frozenset({"event", "health"})),),
        state_dir=str(tmp / "state"),
        heartbeat_interval=3600.0,
        root_check_interval=0.2,
        # Tests watch only their own trees: no discovery of /tmp, homes or mounts.
        locations=LocationSettings(enabled=False),
        processes=ProcessSettings(enabled=False),
    )
    return replace(base, **overrides)


class RunningAgent:
    def __init__(self, agent: Agent, collector: Collector) -> None:
        self.agent = agent
        self.collector = collector


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def run_agent(collector: Collector) -> Iterator[Callable[..., Agent]]:
    """Start an in-process agent on a config; it is stopped at the end of the test."""
    started: list[Agent] = []

    def start(
        config: Config, kinds: frozenset[str] = frozenset({"event", "health", "alert"})
    ) -> Agent:
        agent = Agent(config, router=Router([(collector, kinds)]))
        agent.start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def config_from_yaml(text: str, tmp: Path) -> Config:
    path = tmp / "agent.yaml"
    path.write_text(text)
    config, problems = check_text(text, str(path))
    assert config is not None, [str(p) for p in problems]
    return config


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """A test that leaves a thread running fails: a leaked observer would skew every later test."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("asyncio")
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"


needs_mount = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("mkfs.ext4", "mount", "umount")),
    reason="needs root and mkfs.ext4/mount/umount to mount a loop image",
)


def losetup_for(img: Path) -> str:
    if shutil.which("losetup") is None:
        return ""
    out = subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True, check=False)
    return out.stdout.strip()


@pytest.fixture
def loop_mount(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Mounts a fresh 16 MiB ext4 image (label EXFILTEST) on a directory; always cleans up."""
    img = tmp_path / "img"
    mounted: list[Path] = []
    created: list[Path] = []

    def mount(target: Path) -> Path:
        with open(img, "wb") as fh:
            fh.truncate(16 * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "EXFILTEST", str(img)], check=True)
        for d in reversed([target, *target.parents]):
            if not d.exists():
                d.mkdir()
                created.append(d)
        subprocess.run(["mount", "-o", "loop", str(img), str(target)], check=True)
        mounted.append(target)
        return target

    try:
        yield mount
    finally:
        for target in mounted:
            if not os.path.ismount(target):
                continue
            if subprocess.run(["umount", str(target)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], check=False)
        for d in reversed(created):
            d.rmdir()
        leftover = losetup_for(img)
        if leftover:
            subprocess.run(["losetup", "-d", leftover.split(":", 1)[0]], check=False)
        assert not leftover, f"loop device left attached: {leftover}"


RUN_CONFIG = """\
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
    """A real agent process (`exfilwatch run`) on a tagged tree, writing to a file sink."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "rnd"
        self.root.mkdir()
        self.out = tmp / "log" / "records.jsonl"
        self.config = tmp / "etc" / "agent.yaml"
        self.config.parent.mkdir()
        self.write_config(RUN_CONFIG.format(root=self.root, out=self.out, state=tmp / "state"))
        exe = shutil.which("exfilwatch", path=os.path.dirname(sys.executable))
        cmd = [exe] if exe else [sys.executable, "-m", "agent"]
        self.argv = [*cmd, "run", "--config", str(self.config)]
        self.more: list[subprocess.Popen[str]] = []  # earlier runs of the same agent
        # stderr to a file, not a pipe: a pipe nobody reads fills and blocks the agent's next
        # log line (a stop that never ends); a failure message quotes the file.
        self.stderr_path = tmp / "agent.stderr"
        self.proc = self.spawn()
        self.wait(lambda: self.health("source_ready"), "source_ready")

    def spawn(self) -> subprocess.Popen[str]:
        """Another `exfilwatch run` on the same config and output (not waited for)."""
        with self.stderr_path.open("a") as err:
            return subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=err, text=True)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def write_config(self, text: str) -> None:
        self.config.write_text(text)
        self.config.chmod(0o600)

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        with self.out.open() as fh:
            # A line the agent is still writing has no newline yet: not a record.
            return [json.loads(line) for line in fh if line.strip() and line.endswith("\n")]

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
                raise AssertionError(f"agent exited: {self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self, timeout: float = 30, sig: int = signal.SIGTERM) -> int:
        """Stopped by `sig`; its exit code. An agent still up after `timeout` is asked for its
        threads' stacks (SIGUSR1), killed, and the test fails with them and its stderr."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"agent not stopped {timeout} s after signal {sig}; stderr:\n{self.stderr()}"
            ) from None

    def wait_event(self, action: str, path: Path, **fields: Any) -> None:
        self.wait(lambda: self.has(action, path, **fields), f"{action} {path}")


@pytest.fixture
def agent_run(tmp_path: Path) -> Iterator[Run]:
    """`exfilwatch run` as a real process on a tagged tree; killed at the end if still up."""
    run = Run(tmp_path)
    yield run
    for proc in (run.proc, *run.more):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Gate:
    """A FIFO a child blocks on (`read go < fifo`) until the test opens it, so the child goes
    on exactly when the test has seen what it waits for, however loaded the machine is."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        path.chmod(0o666)  # the test user opens it too
        self.path = path

    def open(self, timeout: float = 20.0) -> None:
        """Let the child through; waits (up to timeout) for it to be at the gate."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:  # ENXIO: no reader yet
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            try:
                os.write(fd, b"go\n")
            finally:
                os.close(fd)
            return
