"""The tagged-repository index reads refs from disk without following a watched user's
symlinks, and announces its own reads of tagged files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.enrich.repos import RepoIndex, find_repos

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
GIT = ["git", "-c", "user.email=a@example.com", "-c", "user.name=a"]


def repo(path: Path) -> str:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "a").write_text("x")
    subprocess.run([*GIT, "-C", str(path), "add", "a"], check=True)
    subprocess.run([*GIT, "-C", str(path), "commit", "-qm", "m"], check=True)
    out = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_a_symlinked_git_directory_or_refs_tree_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "secret"
    repo(secret)
    rnd = tmp_path / "rnd"
    (rnd / "linked").mkdir(parents=True)
    os.symlink(secret / ".git", rnd / "linked" / ".git")  # planted by the watched user
    real = rnd / "real"
    tip = repo(real)
    found = find_repos([str(rnd)])
    assert [r.path for r in found] == [str(real)]
    # refs/ replaced by a link to a big tree: the repository is not one any more.
    moved = real / ".git" / "refs.orig"
    (real / ".git" / "refs").rename(moved)
    os.symlink("/", real / ".git" / "refs")
    assert find_repos([str(rnd)]) == []
    os.unlink(real / ".git" / "refs")
    moved.rename(real / ".git" / "refs")
    announced: list[str] = []
    index = RepoIndex(lambda: [str(rnd)], announce=announced.append)
    bundle = f"# v2 git bundle\n{tip} refs/heads/main\n\n".encode()
    assert index.origin(str(tmp_path / "x.bundle"), bundle) == (str(real), "git_bundle")
    assert str(real / ".git" / "HEAD") in announced  # the agent's own reads, announced
