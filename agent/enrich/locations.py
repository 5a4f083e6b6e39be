"""Destinations the agent finds by itself: cloud-sync folders and staging areas in homes."""

from __future__ import annotations

import glob
import os
import pwd
from collections.abc import Iterable, Sequence

from agent.config import WatchSpec

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
) -> list[WatchSpec]:
    """Temp directories, Downloads and Desktop, and each home itself down one level (so a new
    hidden directory in a home, and files put straight into it, are seen) at bounded cost:
    a depth limit, a watch budget per tree and excludes for caches and build trees. `avoid`
    lists trees watched otherwise (tagged trees, sync folders): they are excluded here."""
    specs = []
    for d in dirs:
        if os.path.isdir(d):
            specs.append(_bounded(d, "staging", avoid))
    for home in homes:
        for name in in_home:
            p = os.path.join(home, name)
            if os.path.isdir(p):
                specs.append(_bounded(p, "staging", avoid))
        skip = [*in_home]
        for other in avoid:
            if other.startswith(home.rstrip("/") + "/"):
                skip.append(other[len(home) :].strip("/").split("/")[0])
        specs.append(
            WatchSpec(
                home,
                location="home",
                exclude=tuple(f"{name}/**" for name in dict.fromkeys(skip)),
                max_depth=1,
                max_dirs=STAGING_MAX_DIRS,
            )
        )
    return specs


def _bounded(path: str, location: str, avoid: Sequence[str]) -> WatchSpec:
    inner = [
        other[len(path) :].strip("/") + "/**"
        for other in avoid
        if other.startswith(path.rstrip("/") + "/")
    ]
    return WatchSpec(
        path,
        location=location,
        exclude=(*STAGING_EXCLUDES, *inner),
        max_depth=STAGING_MAX_DEPTH,
        max_dirs=STAGING_MAX_DIRS,
    )
