"""Trusted destinations: the config section, and which events the stage marks trusted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import TrustedDestination, check_text
from agent.enrich.trusted import TrustedStage, copy_destination
from agent.events import Event

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_example_is_a_valid_config(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(trusted:\n.*?)```", readme, re.S)
    assert block is not None
    config, problems = check_text(
        f"watch: [{{path: {tmp_path}}}]\n{block.group(1)}", str(tmp_path / "agent.yaml")
    )
    assert problems == [] and config is not None
    assert [t.name for t in config.trusted] == [
        "path:/backup/rnd",
        "label:LAB-BACKUP-01",
        "serial:4C530001230517109113",
        "share://nas.corp.example.com/projects",
        "provider:onedrive",
    ]


@pytest.mark.parametrize(
    ("entry", "code", "message"),
    [
        ("- {path: /b}", "CFG_REQUIRED", "trusted[0] needs a 'reason'"),
        ("- {path: /b, provider: x, reason: r}", "CFG_VALUE", "exactly one of"),
        ("- {device: {label: A, serial: B}, reason: r}", "CFG_VALUE", "label or serial"),
        ("- {device: {colour: red}, reason: r}", "CFG_UNKNOWN_KEY", "colour"),
        ("- {paht: /b, reason: r}", "CFG_UNKNOWN_KEY", "paht"),
        ("{path: /b}", "CFG_TYPE", "trusted must be a list"),
    ],
)
def test_a_bad_trusted_entry_is_located_with_a_code(
    tmp_path: Path, entry: str, code: str, message: str
) -> None:
    config, problems = check_text(
        f"watch: [{{path: {tmp_path}}}]\ntrusted:\n  {entry}\n", str(tmp_path / "a.yaml")
    )
    assert config is None
    assert any(p.code == code and message in p.message and p.line == 3 for p in problems), [
        str(p) for p in problems
    ]


@pytest.mark.parametrize(
    ("args", "cwd", "dest"),
    [
        (["rsync", "-a", "/srv/rnd/", "/backup/rnd/"], None, "/backup/rnd"),
        (["cp", "-r", "src", "../backup"], "/home/a/work", "/home/a/backup"),
        (["cp", "-t", "/backup", "/srv/rnd/a", "/srv/rnd/b"], None, "/backup"),
        (["cp", "--target-directory=/backup", "/srv/rnd/a"], None, "/backup"),
        (["/usr/bin/rsync", "-a", "--", "/srv/rnd", "/backup"], None, "/backup"),
        (["rsync", "-a", "/srv/rnd", "evil.example.com:/backup"], None, None),
        (["rsync", "-a", "/srv/rnd", "rsync://evil/x", "/backup"], None, None),
        (["scp", "/srv/rnd/a", "/backup"], None, None),  # not a local copy tool
        (["cp", "/srv/rnd/a"], None, None),
        (["cp", "a", "b"], None, None),  # relative, no working directory known
    ],
)
def test_the_destination_of_a_copy_tool(args: list[str], cwd: str | None, dest: str | None) -> None:
    assert copy_destination(args, cwd) == dest


def test_the_stage_marks_trusted_places_and_a_copy_tools_reads_only() -> None:
    stage = TrustedStage(
        (
            TrustedDestination("backup", path="/backup"),
            TrustedDestination("stick", label="LAB-01"),
            TrustedDestination("tenant", provider="onedrive"),
        ),
        None,
    )
    rsync = ("rsync", "-a", "/srv/rnd/", "/backup/rnd/")

    def trusted(**kw: object) -> bool | None:
        return stage(Event(1, **kw)).location_trusted  # type: ignore[arg-type]

    assert trusted(action="closed_write", path="/backup/rnd/a.c") is True
    assert trusted(action="closed_write", path="/backupx/a.c") is None
    assert (
        trusted(
            action="closed_write",
            path="/media/u/LAB-01/a",
            location="removable",
            location_provider="LAB-01",
        )
        is True
    )
    assert (
        trusted(
            action="closed_write",
            path="/media/u/KEY/a",
            location="removable",
            location_provider="KEY",
        )
        is None
    )
    assert (
        trusted(
            action="closed_write",
            path="/home/a/OneDrive/x",
            location="cloud_sync",
            location_provider="onedrive",
        )
        is True
    )
    assert (
        trusted(
            action="closed_write",
            path="/home/a/Dropbox/x",
            location="cloud_sync",
            location_provider="dropbox",
        )
        is None
    )
    exe = "/usr/bin/rsync"
    started = {"category": "process", "process_args": rsync, "process_executable": exe}
    assert trusted(action="process_started", path="/srv/rnd", **started) is True
    assert trusted(action="closed_nowrite", path="/srv/rnd/a.c", **started) is True
    # Only argv[0] says rsync (exec -a), or the program is a renamed other tool: not trusted.
    fake = {"process_args": rsync, "process_executable": "/home/u/.x/uploader"}
    assert trusted(action="closed_nowrite", path="/srv/rnd/a.c", **fake) is None
    renamed = {**started, "process_executable": "/home/u/bin/rsync"}
    renamed["masquerade"] = "renamed_binary:curl"
    assert trusted(action="closed_nowrite", path="/srv/rnd/a.c", **renamed) is None
    # The same tool's writes elsewhere are judged where they land, not by its arguments.
    assert (
        trusted(action="closed_write", path="/tmp/x", process_args=rsync, process_executable=exe)
        is None
    )


@pytest.mark.parametrize(
    ("args", "dest"),
    [
        (["rsync", "-a", "host:/upd/", "/srv/rnd/src/"], "/srv/rnd/src"),
        (["scp", "host:x.c", "/srv/rnd/src"], "/srv/rnd/src"),
        (["rclone", "copy", "remote:upd", "/srv/rnd/src"], "/srv/rnd/src"),
        (["rsync", "-a", "/srv/rnd/", "host:/x"], None),  # the destination is remote
        (["scp", "/srv/rnd/a", "host:"], None),
    ],
)
def test_a_copy_into_a_place_may_come_from_a_remote_source(
    args: list[str], dest: str | None
) -> None:
    from agent.enrich.attribution import _INTO_TOOLS

    assert copy_destination(args, None, remote_sources=True, tools=_INTO_TOOLS) == dest
    assert copy_destination(args, None) is None  # never a trusted destination by path


def test_a_device_by_serial_and_a_share_by_mount_source_are_trusted_and_others_not() -> None:
    """The mount table's facts (agent/sources/mounts.py MountInfo) decide: a stick by its
    serial whatever its label says, a share by its mount source (with or without a trailing
    slash), nothing by a label or source that is merely similar."""
    from agent.sources.mounts import Mount, MountInfo

    def info(mountpoint: str, kind: str, source: str, **facts: str) -> MountInfo:
        mount = Mount(1, 8, 1, "/", mountpoint, ("rw",), "vfat", source)
        return MountInfo(mount, kind, "test", **facts)  # type: ignore[arg-type]

    mounts = {
        "/media/u/STICK": info("/media/u/STICK", "removable", "/dev/sdb1", serial="4C53000123"),
        "/media/u/OTHER": info("/media/u/OTHER", "removable", "/dev/sdc1", serial="4C53000999"),
        "/mnt/projects": info("/mnt/projects", "network_share", "//nas.example.com/projects/"),
        "/mnt/private": info("/mnt/private", "network_share", "//nas.example.com/private"),
    }

    def mount_of(path: str) -> MountInfo | None:
        return next((m for top, m in mounts.items() if path.startswith(top + "/")), None)

    stage = TrustedStage(
        (
            TrustedDestination("issued", serial="4C53000123"),
            TrustedDestination("team share", share="//nas.example.com/projects"),
        ),
        mount_of,
    )

    def trusted(path: str, location: str, provider: str | None = None) -> bool | None:
        e = Event(1, "closed_write", path, location=location, location_provider=provider)
        return stage(e).location_trusted

    assert trusted("/media/u/STICK/a.v", "removable", "ANYLABEL") is True
    assert trusted("/media/u/OTHER/a.v", "removable", "ANYLABEL") is None
    assert trusted("/mnt/projects/q3/a.v", "network_share") is True
    assert trusted("/mnt/private/a.v", "network_share") is None
    assert trusted("/srv/rnd/a.v", "tagged") is None
