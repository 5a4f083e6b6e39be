"""The watched user cannot aim the agent's sinks at another file, read them, or stall them."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import SinkSpec
from agent.sinks import (
    SINK_UNWRITABLE,
    UNSAFE_SINK,
    FileSink,
    Router,
    SinkOpenError,
    UnsafeSinkError,
    check_sink_path,
    open_sink_file,
)
from tests.conftest import Collector, Run, as_user, needs_root

HEALTH = frozenset({"health"})
CONFIG = """\
watch:
  - path: {root}
sinks:
  - type: file
    path: {sink}
locations: {{enabled: false}}
processes: {{enabled: false}}
state_dir: {state}
"""
PATH_AT = "5:11"  # line:col of the sink's path in CONFIG


def write_config(tmp_path: Path, sink: Path) -> Path:
    (tmp_path / "rnd").mkdir(exist_ok=True)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(CONFIG.format(root=tmp_path / "rnd", sink=sink, state=tmp_path / "state"))
    cfg.chmod(0o600)
    return cfg


def exfilwatch(*args: str) -> subprocess.CompletedProcess[str]:
    # The timeout turns a hang (a FIFO opened for writing with no reader) into a failure.
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def check_refuses(cfg: Path, sink: Path) -> list[str]:
    """`config check` fails; its lines about the sink, each located at the sink's path."""
    done = exfilwatch("config", "check", str(cfg))
    assert done.returncode == 1, done.stdout
    lines = [line for line in done.stdout.splitlines() if " sinks[0].path: " in line]
    assert lines, done.stdout
    for line in lines:
        assert line.startswith(f"{cfg}:{PATH_AT} {UNSAFE_SINK} sinks[0].path: "), line
    return lines


def run_refuses(cfg: Path, sink: Path) -> None:
    """`exfilwatch run` does not start, and says which file is wrong."""
    done = exfilwatch("run", "--config", str(cfg), "--duration", "5")
    assert done.returncode == 1
    assert str(sink) in done.stderr
    assert f"{cfg}: not started" in done.stderr
    assert "Traceback" not in done.stderr


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, stat.S_IMODE(st.st_mode)


def ids(user: str) -> tuple[int, int]:
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


@pytest.fixture
def outside() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp that other users can reach (pytest's tmp_path is
    private to root: the watched user could not get at anything in it)."""
    base = Path(tempfile.mkdtemp(prefix="exfilwatch-sinks-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base)


def users_dir(base: Path, user: str, name: str = "log") -> Path:
    """A directory the watched user owns: where they can plant whatever they like."""
    d = base / name
    d.mkdir()
    os.chown(d, *ids(user))
    return d


def lock_down(d: Path) -> None:
    """What an administrator does after the fact: chown root: DIR && chmod go-w DIR."""
    os.chown(d, 0, 0)
    d.chmod(0o755)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-only file an attacker would like the agent to append to."""
    d = tmp_path / "root-only"
    d.mkdir(mode=0o700)
    target = d / "backup.sh"
    target.write_text("#!/bin/sh\nexit 0\n")
    target.chmod(0o700)
    return target


# Symlinks --------------------------------------------------------------------------------------


@needs_root
def test_a_symlink_the_user_plants_at_the_sink_path_is_refused_and_its_target_is_untouched(
    tmp_path: Path, outside: Path, test_user: str, secret: Path
) -> None:
    log = users_dir(outside, test_user)
    sink = log / "alerts.jsonl"
    as_user(test_user, 'ln -s "$1" "$2"', str(secret), str(sink))
    before = snapshot(secret)
    cfg = write_config(tmp_path, sink)

    lines = check_refuses(cfg, sink)
    assert any(f"directory {log} on the way to {sink} belongs to {test_user}" in x for x in lines)
    assert any(f"{sink} is a symbolic link to {secret}" in x for x in lines)
    as_json = json.loads(exfilwatch("config", "check", str(cfg), "--format", "json").stdout)
    assert {(p["code"], p["line"], p["col"]) for p in as_json} == {(UNSAFE_SINK, 5, 11)}
    run_refuses(cfg, sink)
    with pytest.raises(UnsafeSinkError):
        FileSink(str(sink))

    assert snapshot(secret) == before
    assert os.readlink(sink) == str(secret)


@needs_root
def test_a_symlink_left_behind_after_the_directory_was_locked_down_is_still_refused(
    tmp_path: Path, outside: Path, test_user: str, secret: Path
) -> None:
    log = users_dir(outside, test_user)
    sink = log / "alerts.jsonl"
    as_user(test_user, 'ln -s "$1" "$2"', str(secret), str(sink))
    lock_down(log)
    before = snapshot(secret)
    cfg = write_config(tmp_path, sink)

    (line,) = check_refuses(cfg, sink)
    assert f"{sink} is a symbolic link to {secret}" in line
    assert f"(hint: rm {sink}, find out who made it" in line
    run_refuses(cfg, sink)
    with pytest.raises(UnsafeSinkError, match="symbolic link"):
        open_sink_file(str(sink))
    assert snapshot(secret) == before


@needs_root
def test_a_symlink_the_user_made_in_tmp_on_the_way_to_the_sink_is_refused(
    tmp_path: Path, test_user: str
) -> None:
    # /tmp is sticky: anyone may add a name there, so a link in it counts only if it is root's
    # or the agent's. The target is a directory the agent would otherwise accept.
    real = tmp_path / "real-log"
    real.mkdir()
    link = Path("/tmp") / f"exfilwatch-link-{uuid.uuid4().hex}"
    as_user(test_user, 'ln -s "$1" "$2"', str(real), str(link))
    try:
        sink = link / "alerts.jsonl"
        cfg = write_config(tmp_path, sink)
        (line,) = check_refuses(cfg, sink)
        assert f"{link} on the way to {sink} is a symbolic link that {test_user} made" in line
        with pytest.raises(UnsafeSinkError):
            open_sink_file(str(sink))
        assert list(real.iterdir()) == []
    finally:
        link.unlink()


# The file itself -------------------------------------------------------------------------------


@needs_root
def test_a_world_writable_sink_file_the_user_owns_is_refused_and_left_as_it_is(
    tmp_path: Path, outside: Path, test_user: str
) -> None:
    log = users_dir(outside, test_user)
    sink = log / "alerts.jsonl"
    as_user(test_user, 'umask 0; echo planted > "$1"', str(sink))
    lock_down(log)  # the directory is fine now; the file is still theirs, 0666
    before = snapshot(sink)
    cfg = write_config(tmp_path, sink)

    lines = check_refuses(cfg, sink)
    assert any(f"{sink} belongs to {test_user}, not to root" in x for x in lines)
    assert any(
        f"{sink} has mode 0666: writable by its group and everyone, readable by everyone" in x
        and "(hint: chmod 0640 " in x
        for x in lines
    )
    run_refuses(cfg, sink)
    assert snapshot(sink) == before, "nothing is fixed silently"


@needs_root
@pytest.mark.parametrize("mode", [0o666, 0o644, 0o660, 0o604, 0o4640, 0o740])
def test_a_root_sink_file_with_any_bit_outside_0640_is_refused(tmp_path: Path, mode: int) -> None:
    sink = tmp_path / "log" / "alerts.jsonl"
    sink.parent.mkdir()
    sink.write_text("")
    sink.chmod(mode)
    (problem,) = check_sink_path(str(sink))
    assert problem.code == UNSAFE_SINK
    assert f"has mode {mode:04o}" in problem.message
    with pytest.raises(UnsafeSinkError):
        open_sink_file(str(sink))
    assert stat.S_IMODE(sink.stat().st_mode) == mode


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_the_agents_own_0600_or_0640_file_is_accepted(tmp_path: Path, mode: int) -> None:
    sink = tmp_path / "log" / "alerts.jsonl"
    sink.parent.mkdir()
    sink.write_text("kept\n")
    sink.chmod(mode)
    assert check_sink_path(str(sink)) == []
    s = FileSink(str(sink))
    try:
        s.write(["{}"])
    finally:
        s.close()
    assert sink.read_text() == "kept\n{}\n"


@needs_root
@pytest.mark.parametrize("who", ["user", "root"])
def test_a_fifo_at_the_sink_path_is_refused_without_hanging(
    tmp_path: Path, outside: Path, test_user: str, who: str
) -> None:
    # The user's FIFO has a reader waiting (so a plain non-blocking open would succeed and the
    # agent would write alerts into their pipe); root's has none (a blocking open would hang).
    log = users_dir(outside, test_user) if who == "user" else outside / "log"
    log.mkdir(exist_ok=True)
    sink = log / "alerts.jsonl"
    reader = None
    if who == "user":
        as_user(test_user, 'mkfifo -m 0666 "$1"', str(sink))
        reader = subprocess.Popen(
            ["runuser", "-u", test_user, "--", "cat", str(sink)], stdout=subprocess.DEVNULL
        )
    else:
        os.mkfifo(sink, 0o600)
    try:
        cfg = write_config(tmp_path, sink)
        lines = check_refuses(cfg, sink)
        assert any(f"{sink} is a named pipe (FIFO), not a regular file" in x for x in lines)
        run_refuses(cfg, sink)
        with pytest.raises(UnsafeSinkError, match="named pipe"):
            open_sink_file(str(sink))
    finally:
        if reader is not None:
            end_of_file_for(reader, sink)
    assert stat.S_ISFIFO(os.lstat(sink).st_mode)


def end_of_file_for(reader: subprocess.Popen[bytes], fifo: Path) -> None:
    """A writer that opens and closes the FIFO gives its waiting reader end of file."""
    deadline = time.monotonic() + 10
    while reader.poll() is None and time.monotonic() < deadline:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: the reader has not opened its end yet
            time.sleep(0.05)
    reader.wait(timeout=10)


# Directories -----------------------------------------------------------------------------------


@needs_root
def test_a_sink_directory_writable_by_the_users_group_is_refused(
    tmp_path: Path, outside: Path, test_user: str
) -> None:
    log = outside / "log"
    log.mkdir()
    os.chown(log, 0, ids(test_user)[1])
    log.chmod(0o770)
    sink = log / "alerts.jsonl"
    cfg = write_config(tmp_path, sink)

    (line,) = check_refuses(cfg, sink)
    assert f"directory {log} on the way to {sink} is writable by its group" in line
    assert f"(hint: chmod go-w {log})" in line
    run_refuses(cfg, sink)
    assert not sink.exists(), "a refused sink is not created"


@needs_root
def test_a_group_writable_directory_above_the_sink_directory_is_refused(
    tmp_path: Path, outside: Path, test_user: str
) -> None:
    # From var/ the group can rename log/ away and put their own log/ (with a link) in its place.
    var = outside / "var"
    var.mkdir()
    os.chown(var, 0, ids(test_user)[1])
    var.chmod(0o775)
    (var / "log").mkdir()
    sink = var / "log" / "alerts.jsonl"
    cfg = write_config(tmp_path, sink)

    (line,) = check_refuses(cfg, sink)
    assert f"directory {var} on the way to {sink} is writable by its group" in line
    with pytest.raises(UnsafeSinkError):
        open_sink_file(str(sink))
    # And nothing is made below a refused directory.
    with pytest.raises(UnsafeSinkError):
        open_sink_file(str(var / "new" / "alerts.jsonl"))
    assert not (var / "new").exists()


@needs_root
def test_a_directory_on_the_way_that_the_user_owns_is_refused_even_when_not_writable(
    tmp_path: Path, outside: Path, test_user: str
) -> None:
    mine = users_dir(outside, test_user, "srv")
    mine.chmod(0o755)
    (mine / "log").mkdir()
    sink = mine / "log" / "alerts.jsonl"
    cfg = write_config(tmp_path, sink)
    (line,) = check_refuses(cfg, sink)
    assert f"directory {mine} on the way to {sink} belongs to {test_user}" in line
    assert f"(hint: chown root: {mine} && chmod go-w {mine})" in line


@needs_root
def test_a_sink_directly_in_sticky_tmp_is_refused_and_not_created(tmp_path: Path) -> None:
    sink = Path("/tmp") / f"exfilwatch-{uuid.uuid4().hex}.jsonl"
    cfg = write_config(tmp_path, sink)
    (line,) = check_refuses(cfg, sink)
    assert f"/tmp, the directory of {sink}, is writable by its group and everyone" in line
    with pytest.raises(UnsafeSinkError):
        open_sink_file(str(sink))
    assert not sink.exists()


@needs_root
def test_a_sink_in_the_agents_own_0700_directory_under_tmp_is_accepted(tmp_path: Path) -> None:
    own = Path(tempfile.mkdtemp(prefix="exfilwatch-own-", dir="/tmp"))  # 0700, root's
    try:
        sink = own / "new" / "alerts.jsonl"
        cfg = write_config(tmp_path, sink)
        done = exfilwatch("config", "check", str(cfg))
        assert done.returncode == 0, done.stdout
        assert not sink.parent.exists(), "config check only looks"
        s = FileSink(str(sink))
        s.close()
        assert stat.S_IMODE(sink.stat().st_mode) == 0o640
        assert stat.S_IMODE(sink.parent.stat().st_mode) == 0o750
    finally:
        shutil.rmtree(own)


@needs_root
def test_an_unprivileged_agent_applies_the_same_rules_to_its_own_user(
    outside: Path, test_user: str
) -> None:
    home = users_dir(outside, test_user, "home")
    home.chmod(0o700)
    (home / "roots.jsonl").write_text("")
    (home / "roots.jsonl").chmod(0o640)
    (outside / "rootdir").mkdir()
    found = checked_as(
        test_user,
        [home / "alerts.jsonl", home / "roots.jsonl", outside / "rootdir" / "alerts.jsonl"],
    )
    assert found[0] == []
    assert [code for code, _ in found[1]] == [UNSAFE_SINK]
    assert f"belongs to root, not to {test_user}" in found[1][0][1]
    assert [code for code, _ in found[2]] == [SINK_UNWRITABLE]


def checked_as(user: str, paths: list[Path]) -> list[list[tuple[str, str]]]:
    """check_sink_path in a child process that has become `user` (the agent as that user)."""
    uid, gid = ids(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = [[(p.code, p.message) for p in check_sink_path(str(x))] for x in paths]
            os.write(w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return [[(c, m) for c, m in item] for item in json.loads(data)]


@pytest.mark.parametrize(
    "path",
    [
        "/tmp/\ud800.jsonl",  # a lone surrogate from a YAML escape
        "/tmp/a\x00b",
        "/" + "a" * 5000,
        "/",
        "/etc/passwd/alerts.jsonl",  # through a file
        "/proc/self/fd/0/x",
    ],
)
def test_checking_an_odd_sink_path_reports_a_problem_and_never_raises(path: str) -> None:
    problems = check_sink_path(path)
    assert problems
    assert all(p.code in (UNSAFE_SINK, SINK_UNWRITABLE) for p in problems)
    str(problems[0]).encode("utf-8")  # printable as it is


# Reopen and reload -----------------------------------------------------------------------------


def test_a_reopen_that_finds_a_symlink_keeps_writing_the_file_it_had(
    tmp_path: Path, secret: Path
) -> None:
    collector = Collector()
    out = tmp_path / "log" / "alerts.jsonl"
    router = Router([(FileSink(str(out)), frozenset({"alert"})), (collector, HEALTH)])
    try:
        router.write("alert", ['{"n":0}'])
        out.rename(out.with_name("alerts.jsonl.1"))
        out.symlink_to(secret)  # a name the agent did not make, at rotation time
        before = snapshot(secret)
        router.reopen()
        (error,) = collector.health("sink_error")
        assert error["event"]["reason"] == UNSAFE_SINK
        assert error["exfilwatch"]["health"]["op"] == "reopen"
        assert "symbolic link" in error["exfilwatch"]["health"]["error"]
        router.write("alert", ['{"n":1}'])
        assert out.with_name("alerts.jsonl.1").read_text() == '{"n":0}\n{"n":1}\n'
        assert snapshot(secret) == before
    finally:
        router.close()


def test_replacing_sinks_with_one_that_cannot_open_keeps_the_old_ones(
    tmp_path: Path, secret: Path
) -> None:
    old = tmp_path / "old" / "alerts.jsonl"
    router = Router([(FileSink(str(old)), frozenset({"alert"}))])
    link = tmp_path / "new" / "alerts.jsonl"
    link.parent.mkdir()
    link.symlink_to(secret)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(SinkOpenError) as caught:
            router.replace(
                [SinkSpec("file", str(tmp_path / "good.jsonl")), SinkSpec("file", str(link))]
            )
        assert caught.value.reason == UNSAFE_SINK
        assert caught.value.problems[0].startswith(f"file:{link}: {UNSAFE_SINK} {link} is a")
        assert len(os.listdir("/proc/self/fd")) == fds, "the sink that did open was closed"
        router.write("alert", ['{"n":0}'])
        assert old.read_text() == '{"n":0}\n'
    finally:
        router.close()


def with_second_sink(run: Run, sink: Path) -> tuple[str, str]:
    """The running config plus a file sink at `sink`, and where its path is (line:col)."""
    text = run.config.read_text().replace("sinks:\n", f"sinks:\n  - type: file\n    path: {sink}\n")
    for n, line in enumerate(text.splitlines(), 1):
        if line.endswith(f"path: {sink}"):
            return text, f"{n}:{line.index(str(sink)) + 1}"
    raise AssertionError("sink not in the config")


def still_running(run: Run, name: str) -> None:
    """Events still reach the old sink, and the agent stops cleanly when asked."""
    probe = run.root / name
    probe.write_text("x")
    run.wait_event("closed_write", probe)
    assert run.stop() == 0
    last = run.records()[-1]
    assert last["event"]["action"] == "agent_stopped"
    assert last["exfilwatch"]["health"]["drained"] is True


@needs_root
def test_sighup_with_a_sink_the_user_planted_keeps_the_running_config(
    agent_run: Run, outside: Path, test_user: str, secret: Path
) -> None:
    log = users_dir(outside, test_user)
    sink = log / "alerts.jsonl"
    as_user(test_user, 'ln -s "$1" "$2"', str(secret), str(sink))
    before = snapshot(secret)
    text, at = with_second_sink(agent_run, sink)
    agent_run.write_config(text)
    agent_run.proc.send_signal(signal.SIGHUP)
    agent_run.wait(lambda: agent_run.health("config_reload_rejected"), "reload rejected")

    (rejected,) = agent_run.health("config_reload_rejected")
    assert rejected["event"]["reason"] == UNSAFE_SINK
    health: dict[str, Any] = rejected["exfilwatch"]["health"]
    assert health["kept"] == "previous configuration"
    assert all(p.startswith(f"{agent_run.config}:{at} {UNSAFE_SINK} ") for p in health["problems"])
    still_running(agent_run, "after-unsafe-reload.txt")
    assert snapshot(secret) == before


@needs_root
def test_sighup_with_a_sink_that_passes_the_check_but_cannot_open_keeps_the_agent_running(
    agent_run: Run, tmp_path: Path
) -> None:
    # An immutable file: regular, root's, 0640, in a root directory -- and even root gets EPERM.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o750)
    sink = locked / "alerts.jsonl"
    sink.write_text("")
    sink.chmod(0o640)
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    chattr = subprocess.run(["chattr", "+i", str(sink)], capture_output=True, check=False)
    if chattr.returncode != 0:
        pytest.skip("this filesystem has no immutable attribute")
    try:
        assert check_sink_path(str(sink)) == []
        text, _ = with_second_sink(agent_run, sink)
        agent_run.write_config(text)
        agent_run.proc.send_signal(signal.SIGHUP)
        agent_run.wait(lambda: agent_run.health("config_reload_rejected"), "reload rejected")

        (rejected,) = agent_run.health("config_reload_rejected")
        assert rejected["event"]["reason"] == "EPERM"
        health: dict[str, Any] = rejected["exfilwatch"]["health"]
        assert health["kept"] == "previous configuration"
        assert health["problems"] == [f"file:{sink}: EPERM {os.strerror(1)}"]
        assert not agent_run.health("config_reloaded")
        still_running(agent_run, "after-failed-open.txt")
    finally:
        subprocess.run(["chattr", "-i", str(sink)], check=True)
