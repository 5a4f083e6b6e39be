"""Git repositories in the tagged trees, and copies of them that land elsewhere.

A `git bundle`, a bare or plain clone, or a copied pack of a tagged repository holds the
whole history, yet none of its files is a byte-for-byte copy of a tagged working-tree file.
This index knows each tagged repository by its ref tips (commit ids of branches and tags)
and pack names, read from disk (refs are tiny files; no git process is run), and recognises:

- a bundle (`# v2 git bundle` / `# v3 git bundle` header listing refs and their commits);
- a clone's `packed-refs` or loose ref file (`refs/heads/main` holding a commit id);
- a pack file named after, or ending with the checksum of, a tagged repository's pack.

Bounded: repositories found at most MAX_REPOS (at most MAX_DEPTH levels below a watch root),
refs read at most MAX_REFS per repository, refreshed at most every REFRESH_SECONDS."""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.enrich.disguise import open_regular

Announce = Callable[[str], None]

MAX_REPOS = 200
MAX_DEPTH = 3
MAX_REFS = 10_000
REFRESH_SECONDS = 30.0
MAX_REF_FILE = 4 * 1024 * 1024
MAX_REF_FILES = 20_000  # files read under one repository's refs/ (a planted tree stops here)

_SHA = re.compile(rb"[0-9a-f]{40}(?:[0-9a-f]{24})?")
_BUNDLE = re.compile(rb"# v[23] git bundle\n")
_PACK_NAME = re.compile(r"pack-([0-9a-f]{40}(?:[0-9a-f]{24})?)\.pack$")


@dataclass(frozen=True, slots=True)
class Repo:
    path: str  # the working tree (or the bare repository's directory)
    git_dir: str


def _lstat_is(path: str, kind: Callable[[int], bool]) -> bool:
    try:
        return kind(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_git_dir(path: str) -> bool:
    """A git directory, with no symlink on the way: a watched user could point `.git` or
    `refs` at any tree, and the agent (root) would walk and read it."""
    return (
        _lstat_is(path, stat.S_ISDIR)
        and _lstat_is(os.path.join(path, "HEAD"), stat.S_ISREG)
        and _lstat_is(os.path.join(path, "objects"), stat.S_ISDIR)
        and _lstat_is(os.path.join(path, "refs"), stat.S_ISDIR)
    )


def find_repos(roots: Sequence[str], max_depth: int = MAX_DEPTH) -> list[Repo]:
    """Repositories at or below each root (a `.git` directory, or a bare repository)."""
    found: list[Repo] = []
    for root in roots:
        stack = [(root, 0)]
        while stack and len(found) < MAX_REPOS:
            d, depth = stack.pop()
            dot = os.path.join(d, ".git")
            if _is_git_dir(dot):
                found.append(Repo(d, dot))
            elif _is_git_dir(d):
                found.append(Repo(d, d))
                continue
            if depth >= max_depth:
                continue
            try:
                with os.scandir(d) as it:
                    for entry in it:
                        if entry.name == ".git" or not entry.is_dir(follow_symlinks=False):
                            continue
                        stack.append((entry.path, depth + 1))
            except OSError:
                continue
    return found


def _read_small(path: str, announce: Announce | None = None) -> bytes | None:
    """A regular file's first MAX_REF_FILE bytes (no symlink, no FIFO, atime untouched);
    `announce` is told first when the file is in a tagged tree (the agent's own read)."""
    if announce is not None:
        announce(path)
    fd = open_regular(path)
    if isinstance(fd, str):
        return None
    try:
        return os.read(fd, MAX_REF_FILE)
    except OSError:
        return None
    finally:
        os.close(fd)


def ref_tips(git_dir: str, announce: Announce | None = None) -> set[bytes]:
    """Commit ids the repository's refs point at (packed and loose), at most MAX_REFS, from
    at most MAX_REF_FILES files (symlinked directories are not followed)."""
    tips: set[bytes] = set()
    packed = _read_small(os.path.join(git_dir, "packed-refs"), announce)
    if packed:
        for line in packed.splitlines():
            m = _SHA.match(line.lstrip(b"^"))
            if m is not None:
                tips.add(m.group())
                if len(tips) >= MAX_REFS:
                    return tips
    read = 0
    for top, _dirs, files in os.walk(os.path.join(git_dir, "refs")):
        for name in files:
            read += 1
            if read > MAX_REF_FILES:
                return tips
            data = _read_small(os.path.join(top, name), announce)
            m = _SHA.match(data.strip()) if data else None
            if m is not None:
                tips.add(m.group())
                if len(tips) >= MAX_REFS:
                    return tips
    head = _read_small(os.path.join(git_dir, "HEAD"), announce)
    m = _SHA.match(head.strip()) if head else None  # a detached HEAD
    if m is not None:
        tips.add(m.group())
    return tips


def pack_names(git_dir: str) -> set[str]:
    try:
        names = os.listdir(os.path.join(git_dir, "objects", "pack"))
    except OSError:
        return set()
    return {m.group(1) for n in names if (m := _PACK_NAME.match(n)) is not None}


class RepoIndex:
    """Tagged repositories by ref tip and pack name; thread-safe, refreshed lazily."""

    def __init__(
        self,
        roots: Callable[[], Sequence[str]],
        announce: Announce | None = None,
        on_cap: Callable[..., Any] | None = None,
    ) -> None:
        self._roots = roots
        self._on_cap = on_cap  # CapReporter.hit: a cap_reached record
        self._announce = announce  # the agent's reads of tagged refs are not a user's
        self._lock = threading.Lock()
        self._tips: dict[bytes, str] = {}
        self._packs: dict[str, str] = {}
        self._loaded = -REFRESH_SECONDS
        self.repos = 0

    def _refresh(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._loaded < REFRESH_SECONDS:
                return
            self._loaded = now
        tips: dict[bytes, str] = {}
        packs: dict[str, str] = {}
        repos = find_repos(self._roots())
        if len(repos) >= MAX_REPOS and self._on_cap is not None:
            self._on_cap("tagged_repositories", MAX_REPOS)
        for repo in repos:
            for sha in ref_tips(repo.git_dir, self._announce):
                tips.setdefault(sha, repo.path)
            for name in pack_names(repo.git_dir):
                packs.setdefault(name, repo.path)
        with self._lock:
            self._tips, self._packs, self.repos = tips, packs, len(repos)

    @staticmethod
    def candidate(path: str, head: bytes | None) -> bool:
        """Could this landed file be part of a repository copy (cheap, by name and head)?"""
        name = path.rsplit("/", 1)[-1]
        if head is not None and _BUNDLE.match(head):
            return True
        if name == "packed-refs" or "/refs/heads/" in path or "/refs/tags/" in path:
            return True
        return name.endswith(".pack") and head is not None and head.startswith(b"PACK")

    def origin(self, path: str, head: bytes | None) -> tuple[str, str] | None:
        """(tagged repository path, via) when the file copies a tagged repository's refs or
        pack: via "git_bundle" or "git_repository"."""
        if not self.candidate(path, head):
            return None
        self._refresh()
        with self._lock:
            tips, packs = self._tips, self._packs
        if not tips and not packs:
            return None
        if head is not None and _BUNDLE.match(head):
            for line in head.split(b"\n")[1:]:
                if not line:
                    break
                m = _SHA.match(line.lstrip(b"-"))
                if m is not None and m.group() in tips:
                    return tips[m.group()], "git_bundle"
            return None
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".pack"):
            named = _PACK_NAME.match(name)
            if named is not None and named.group(1) in packs:
                return packs[named.group(1)], "git_repository"
            checksum = _pack_checksum(path)
            if checksum is not None and checksum in packs:
                return packs[checksum], "git_repository"
            return None
        data = _read_small(path)
        if not data:
            return None
        for line in data.splitlines()[:MAX_REFS]:
            m = _SHA.match(line.lstrip(b"^"))
            if m is not None and m.group() in tips:
                return tips[m.group()], "git_repository"
        return None


def _pack_checksum(path: str) -> str | None:
    """A pack's trailing SHA-1 checksum, which names the pack in its repository."""
    fd = open_regular(path)
    if isinstance(fd, str):
        return None
    try:
        size = os.fstat(fd).st_size
        if size < 32:
            return None
        return os.pread(fd, 20, size - 20).hex()
    except OSError:
        return None
    finally:
        os.close(fd)
