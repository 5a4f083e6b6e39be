"""Destinations the agent finds by itself: cloud-sync folders and staging areas in homes."""

from __future__ import annotations

import glob
import os
import pwd
from collections.abc import Iterable, Sequence

from agent.config import LocationSettings, WatchSpec

# Folder names sync clients create in a home directory, per provider (globs, relative).
CLOUD_SYNC_FOLDERS: dict[str, tuple[str, ...]] = {
    "dropbox": ("Dropbox", "Dropbox (*)"),
    "google_drive": ("Google Drive", "GoogleDrive", "google-drive", "My Drive"),
    "onedrive": ("OneDrive", "OneDrive - *"),
    "nextcloud": ("Nextcloud",),
    "owncloud": ("ownCloud",),
    "mega": ("MEGA", "MEGAsync"),
    "pcloud": ("pCloudDrive", "pCloud Drive"),
    "box": ("Box", "Box Sync"),
    "icloud": ("iCloudDrive", "Library/Mobile Documents/com~apple~CloudDocs"),
}
STAGING_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108 (watched, never written to)
STAGING_IN_HOME = ("Downloads", "Desktop")
# Heavy, noisy trees that are never staging worth watching.
STAGING_EXCLUDES = (
    "node_modules",
    ".git",
    "__pycache__",
    ".venv",
    "systemd-private-*",
    ".X11-unix",
    ".ICE-unix",
    "pytest-of-*",
)
HOME_ROOTS = ("/home", "/Users", "/root")
STAGING_MAX_DIRS = 2000
STAGING_MAX_DEPTH = 4
_DEFAULTS = LocationSettings()


def find_homes(roots: Sequence[str] = HOME_ROOTS) -> list[str]:
    """Home directories: each root that is itself a user's home (`/root`), and every
    directory directly inside the other roots (`/home/*`, `/Users/*`)."""
    try:
        user_homes = {os.path.realpath(u.pw_dir) for u in pwd.getpwall() if u.pw_dir}
    except OSError:
        user_homes = set()
    homes: dict[str, None] = {}
    for r in roots:
        real = os.path.realpath(r)
        if not os.path.isdir(real):
            continue
        if real in user_homes and real not in ("/home", "/Users"):
            homes[real] = None
            continue
        for entry in sorted(os.listdir(real)):
            p = os.path.join(real, entry)
            if os.path.isdir(p) and not os.path.islink(p):
                homes.setdefault(p, None)
    return list(homes)


def cloud_sync_places(
    homes: Iterable[str], folders: dict[str, tuple[str, ...]] = CLOUD_SYNC_FOLDERS
) -> list[WatchSpec]:
    specs = []
    for home in homes:
        for provider, patterns in folders.items():
            for pattern in patterns:
                for found in sorted(glob.glob(os.path.join(glob.escape(home), pattern))):
                    if os.path.isdir(found) and not os.path.islink(found):
                        specs.append(
                            WatchSpec(
                                found,
                                location="cloud_sync",
                                provider=provider,
                                exclude=(".dropbox.cache", ".tmp.drivedownload", ".~lock.*"),
                                max_dirs=STAGING_MAX_DIRS * 5,
                            )
                        )
    return specs


def staging_places(
    homes: Iterable[str],
    dirs: Sequence[str] = STAGING_DIRS,
    in_home: Sequence[str] = STAGING_IN_HOME,
    avoid: Sequence[str] = (),
    *,
    home_depth: int = _DEFAULTS.home_depth,
    exclude: Sequence[str] = _DEFAULTS.exclude,
) -> list[WatchSpec]:
    """Temp directories, Downloads and Desktop, and each home itself down `home_depth` levels
    (so a new hidden directory anywhere up there, and files put into it, are seen) at bounded
    cost: a depth limit, a watch budget per tree and excludes for caches and build trees, plus
    `exclude` (locations.exclude). `avoid` lists trees watched otherwise (tagged trees, sync
    folders): they are excluded here."""
    specs = []
    for d in dirs:
        if os.path.isdir(d):
            specs.append(_bounded(d, "staging", avoid, exclude))
    for home in homes:
        for name in in_home:
            p = os.path.join(home, name)
            if os.path.isdir(p):
                specs.append(_bounded(p, "staging", avoid, exclude))
        skip = [f"{_literal(name)}/**" for name in in_home]
        # The whole path of a tree watched otherwise, not its first component: a home is
        # watched several levels deep, and a tagged ~/work/rnd must not hide ~/work/.stash.
        skip += _inside(home, avoid)
        specs.append(
            WatchSpec(
                home,
                location="home",
                exclude=tuple(dict.fromkeys([*skip, *exclude])),
                max_depth=home_depth,
                max_dirs=STAGING_MAX_DIRS,
            )
        )
    return specs


def _bounded(path: str, location: str, avoid: Sequence[str], exclude: Sequence[str]) -> WatchSpec:
    return WatchSpec(
        path,
        location=location,
        exclude=tuple(dict.fromkeys([*STAGING_EXCLUDES, *exclude, *_inside(path, avoid)])),
        max_depth=STAGING_MAX_DEPTH,
        max_dirs=STAGING_MAX_DIRS,
    )


def _inside(path: str, avoid: Sequence[str]) -> list[str]:
    """Anchored excludes for the trees in `avoid` that lie below `path`."""
    prefix = path.rstrip("/") + "/"
    return [
        f"{_literal(other[len(prefix) :].strip('/'))}/**"
        for other in avoid
        if other.startswith(prefix) and other[len(prefix) :].strip("/")
    ]


def _literal(rel: str) -> str:
    """A path as a glob that matches only itself: a folder named `Box [old]` is not a set."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in rel)
