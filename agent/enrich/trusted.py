"""Trusted destinations: events at a sanctioned place carry `exfilwatch.location.trusted`.

A destination is trusted by path (a directory and everything below it), by removable device
(filesystem label or serial), by network share (its mount source) or by sync provider; see
README, "Trusted destinations". A copy tool (`rsync -a /srv/rnd /backup/rnd`, `cp -r`) whose
destination argument is a trusted path is trusted too, and so are the file events attributed to
it (its reads of the tagged tree), so a nightly backup neither alerts nor feeds bulk-read
correlations. The engine counts what rules matched there (the `trusted_activity` record)."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence

from msgspec.structs import replace as evolve

from agent.config import TrustedDestination
from agent.events import Event
from agent.sources.mounts import MountInfo

# Tools whose last operand is where the data goes (`-t DIR` / `--target-directory=DIR` too).
COPY_TOOLS = frozenset({"cp", "rsync", "mv", "install", "ditto"})
_TARGET_OPTIONS = ("-t", "--target-directory")

MountOf = Callable[[str], MountInfo | None]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def copy_destination(
    args: Sequence[str],
    cwd: str | None,
    *,
    remote_sources: bool = False,
    tools: frozenset[str] = COPY_TOOLS,
) -> str | None:
    """The local destination of a copy tool's argument vector (argv[0] first), normalised;
    None when it is not a copy tool, has no destination operand, or names a remote place
    (`host:path`, a URL): those are never trusted by path. With `remote_sources`, remote
    operands before a local destination are allowed (`rsync host:x /srv/rnd/`: a download)."""
    if len(args) < 3 or posixpath.basename(args[0]) not in tools:
        return None
    target = None
    operands: list[str] = []
    it = iter(args[1:])
    for arg in it:
        if arg == "--":
            operands.extend(it)
            break
        if arg in _TARGET_OPTIONS:
            target = next(it, None)
        elif arg.startswith("--target-directory="):
            target = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            operands.append(arg)

    def remote(a: str) -> bool:
        return not a.startswith("/") and ":" in a.split("/", 1)[0]

    dest = target if target is not None else (operands[-1] if len(operands) >= 2 else None)
    if not dest or remote(dest):
        return None  # rsync host:path, scp-style or URL operands: a remote side
    if not remote_sources and any(remote(a) for a in operands):
        return None
    if not dest.startswith("/"):
        if cwd is None:
            return None
        dest = posixpath.join(cwd, dest)
    return posixpath.normpath(dest)


class TrustedStage:
    """An enrichment stage (after attribution: it reads the process's arguments)."""

    name = "trusted"

    def __init__(self, trusted: Sequence[TrustedDestination], mount_of: MountOf | None) -> None:
        self.paths = tuple(t.path for t in trusted if t.path is not None)
        self.labels = frozenset(t.label for t in trusted if t.label is not None)
        self.serials = frozenset(t.serial for t in trusted if t.serial is not None)
        self.shares = frozenset(t.share.rstrip("/") for t in trusted if t.share is not None)
        self.providers = frozenset(t.provider for t in trusted if t.provider is not None)
        self.mount_of = mount_of
        self.enabled = bool(trusted)
        self.trusted = 0

    def __call__(self, e: Event, /) -> Event:
        if not self.enabled or e.location_trusted:
            return e
        if self._place(e) or self._process_destination(e):
            self.trusted += 1
            return evolve(e, location_trusted=True)
        return e

    def _place(self, e: Event) -> bool:
        path = e.path
        if any(_under(path, top) for top in self.paths):
            return True
        location = e.location
        if location == "cloud_sync":
            return e.location_provider is not None and e.location_provider in self.providers
        if location in ("removable", "network_share"):
            if location == "removable" and e.location_provider in self.labels:
                return True
            mount = self.mount_of(path) if self.mount_of is not None else None
            if mount is None:
                return False
            if mount.serial is not None and mount.serial in self.serials:
                return True
            if mount.label is not None and mount.label in self.labels:
                return True
            source = mount.mount.source
            return isinstance(source, str) and source.rstrip("/") in self.shares
        return False

    def _process_destination(self, e: Event) -> bool:
        if not self.paths or not e.process_args:
            return False
        # A copy tool's own start, and its reads of the tree it copies (never its writes
        # outside the trusted place: those are judged by where they land).
        if e.action not in ("process_started", "closed_nowrite", "opened"):
            return False
        # The program, not what it calls itself: `exec -a cp uploader ... /backup` names cp
        # in argv[0] only, and a copy of curl renamed cp is a masquerade the table recognised.
        exe = e.process_executable
        if exe is None or posixpath.basename(exe) not in COPY_TOOLS or e.masquerade is not None:
            return False
        dest = copy_destination(e.process_args, e.process_working_directory)
        return dest is not None and any(_under(dest, top) for top in self.paths)
