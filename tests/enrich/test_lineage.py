"""Lineage: a copy of a tagged file is recognised by size and content, renamed or not."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.enrich.lineage import LineageIndex, content_digest, indexable
from agent.sources.paths import compile_excludes


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "rnd"
    (root / "chip").mkdir(parents=True)
    (root / "chip" / "top.v").write_text("module top; endmodule\n" * 50)
    (root / "chip" / "alu.v").write_text("module alu; endmodule\n" * 50)
    (root / "node_modules").mkdir()
    (root / "node_modules" / "x.js").write_text("x" * 100)
    return root


def build(index: LineageIndex, root: Path) -> int:
    return index.build([(str(root), compile_excludes(["node_modules"]), lambda d: ("chip",))])


def test_a_renamed_copy_is_traced_to_its_tagged_origin(tmp_path: Path) -> None:
    root = tree(tmp_path)
    index = LineageIndex()
    assert build(index, root) == 2
    usb = tmp_path / "usb"
    usb.mkdir()
    shutil.copy(root / "chip" / "top.v", usb / "holiday-notes.txt")
    origin = index.find_copy(
        str(usb / "holiday-notes.txt"), (usb / "holiday-notes.txt").stat().st_size
    )
    assert origin is not None
    assert origin.path == str(root / "chip" / "top.v")
    assert origin.tags == ("chip",)
    assert origin.method == "content"


def test_a_file_of_the_same_size_but_other_content_is_not_a_copy(tmp_path: Path) -> None:
    root = tree(tmp_path)
    index = LineageIndex()
    build(index, root)
    other = tmp_path / "other.v"
    other.write_text("module xyz; endmodule\n" * 50)  # same length, different bytes
    assert other.stat().st_size == (root / "chip" / "top.v").stat().st_size
    assert index.find_copy(str(other), other.stat().st_size) is None


def test_large_files_are_compared_by_a_sampled_hash(tmp_path: Path) -> None:
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    index = LineageIndex(hash_max_bytes=1024 * 1024)
    index.add(str(big), big.stat().st_size, big.stat().st_mtime_ns, ("models",))
    copy = tmp_path / "w2.bin"
    shutil.copy(big, copy)
    assert index.find_copy(str(copy), copy.stat().st_size) is not None
    changed = bytearray(copy.read_bytes())
    changed[-1] ^= 0xFF  # the tail is sampled
    copy.write_bytes(bytes(changed))
    assert index.find_copy(str(copy), copy.stat().st_size) is None
    assert content_digest(str(big), big.stat().st_size, 1024 * 1024) != content_digest(
        str(copy), copy.stat().st_size, 1024 * 1024
    )


def test_the_io_budget_and_the_index_cap_are_enforced_and_reported(tmp_path: Path) -> None:
    hits: list[tuple[str, int, dict[str, Any]]] = []
    index = LineageIndex(
        max_files=2,
        io_budget=4096,
        hash_max_bytes=4096,
        on_cap=lambda n, c, d: hits.append((n, c, d)),
    )
    for i in range(3):
        f = tmp_path / f"f{i}"
        f.write_bytes(bytes([i]) * 3000)
        index.add(str(f), 3000, f.stat().st_mtime_ns, ("t",))
    assert len(index) == 2
    assert hits[0][0] == "lineage_index"
    copy = tmp_path / "c"
    copy.write_bytes(bytes([0]) * 3000)
    # 3,000 bytes for the copy fit the 4 KiB budget, the origin's 3,000 more do not.
    assert index.find_copy(str(copy), 3000) is None
    assert any(h[0] == "lineage_io_budget" for h in hits)


def test_moves_and_deletes_keep_the_index_current(tmp_path: Path) -> None:
    root = tree(tmp_path)
    index = LineageIndex()
    build(index, root)
    top = root / "chip" / "top.v"
    assert index.lookup(str(top)) is not None
    index.remove(str(top))
    assert index.lookup(str(top)) is None
    index.remove_tree(str(root))
    assert len(index) == 0


def test_archive_members_match_by_name_and_size(tmp_path: Path) -> None:
    root = tree(tmp_path)
    index = LineageIndex()
    build(index, root)
    size = (root / "chip" / "alu.v").stat().st_size
    assert index.match_member("backup/rnd/chip/alu.v", size) is not None
    assert index.match_member("backup/rnd/chip/alu.v", size + 1) is None
    assert index.find_by_name("alu.v") is not None


def test_a_directory_renamed_inside_the_tree_keeps_its_files_traceable(tmp_path: Path) -> None:
    root = tree(tmp_path)
    index = LineageIndex()
    build(index, root)
    (root / "chip").rename(root / "chip-v2")
    index.move_tree(str(root / "chip"), str(root / "chip-v2"))
    assert index.lookup(str(root / "chip" / "top.v")) is None
    moved = root / "chip-v2" / "top.v"
    assert index.lookup(str(moved)) is not None
    copy = tmp_path / "copy.v"
    shutil.copy(moved, copy)
    origin = index.find_copy(str(copy), copy.stat().st_size)
    assert origin is not None and origin.path == str(moved)


def test_an_event_with_microsecond_mtime_does_not_churn_the_entry(tmp_path: Path) -> None:
    root = tree(tmp_path)
    index = LineageIndex()
    build(index, root)
    top = root / "chip" / "top.v"
    st = top.stat()
    entry = index._by_path[str(top)]
    entry.digest = b"cached"
    index.add(str(top), st.st_size, (st.st_mtime_ns // 1000) * 1000, ("chip",))
    assert index._by_path[str(top)] is entry and entry.digest == b"cached"


def test_a_known_digest_is_a_lookup_whatever_the_number_of_same_size_files(
    tmp_path: Path,
) -> None:
    # 2,000 tagged files of one size (a generated tree): a copy of one is found by hashing at
    # most max_candidates of them; once its digest is known, the next copy costs one hash
    # (its own), not another round over the same-size files.
    tree = tmp_path / "rnd"
    tree.mkdir()
    idx = LineageIndex()
    for i in range(2000):
        f = tree / f"f{i:04d}"
        f.write_bytes(b"%016d" % i)
        st = f.stat()
        idx.add(str(f), st.st_size, st.st_mtime_ns, ("chip",))
    first = next(iter(idx._unhashed[16].values())).path
    copy = tmp_path / "copy"
    shutil.copyfile(first, copy)
    origin = idx.find_copy(str(copy), 16)
    assert origin is not None and origin.path == first
    before = idx.stats["hashes"]
    again = tmp_path / "again"
    shutil.copyfile(first, again)
    origin = idx.find_copy(str(again), 16)
    assert origin is not None and origin.path == first
    assert idx.stats["hashes"] == before + 1
    # Not found among the first max_candidates: the cap is counted, nothing else hashed.
    stranger = tmp_path / "stranger"
    stranger.write_bytes(b"x" * 16)
    before = idx.stats["hashes"]
    assert idx.find_copy(str(stranger), 16) is None
    assert idx.stats["hashes"] == before + 1 + idx.max_candidates
    assert idx.stats["candidates_capped"] == 1


def test_churn_of_same_size_files_is_linear() -> None:
    # Rewriting every one of N same-size tagged files (a build) replaces N entries: this took
    # a list removal each (quadratic) when buckets were lists. Compared with the same churn
    # over N distinct sizes, in the same run (no absolute time).
    import time

    def churn(sizes: list[int]) -> float:
        idx = LineageIndex(max_files=100_000)
        for i, size in enumerate(sizes):
            idx.add(f"/t/d{i % 100}/f{i}", size, 1_000, ("t",))
        began = time.perf_counter()
        for i, size in enumerate(sizes):
            idx.add(f"/t/d{i % 100}/f{i}", size, 2_000, ("t",))
        return time.perf_counter() - began

    n = 20_000
    distinct = min(churn(list(range(1, n + 1))) for _ in range(3))
    same = min(churn([17] * n) for _ in range(3))
    assert same < 5 * distinct, (same, distinct)


APACHE = Path("/usr/share/common-licenses/Apache-2.0")


def copies_in(index: LineageIndex, top: Path) -> list[Path]:
    return [
        p
        for p in top.rglob("*")
        if p.is_file() and index.find_copy(str(p), p.stat().st_size) is not None
    ]


def test_git_templates_and_licence_texts_are_not_tagged_content(tmp_path: Path) -> None:
    """Every repository holds git's hook samples and description, and many the same licence
    text: an unrelated clone in a sync folder is not a copy of the tagged repository."""
    if shutil.which("git") is None or not APACHE.exists():
        pytest.skip("needs git (installed by .ci/run) and Debian's common-licenses")
    root = tree(tmp_path)
    git = ["git", "-c", "user.email=d@example.com", "-c", "user.name=d"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    shutil.copy(APACHE, root / "LICENSE")
    subprocess.run([*git, "-C", str(root), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(root), "commit", "-qm", "init"], check=True)
    index = LineageIndex()
    assert build(index, root) > 3  # the sources, the licence, the hook samples, objects
    other = tmp_path / "Dropbox" / "other"
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    shutil.copy(root / "LICENSE", other / "LICENSE")  # the licence and its loose blob
    subprocess.run([*git, "-C", str(other), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(other), "commit", "-qm", "init"], check=True)
    assert copies_in(index, other) == []
    assert index.stats["public"] >= 2
    shutil.copy(root / "chip" / "top.v", other / "top.v")
    assert copies_in(index, other) == [other / "top.v"]


def test_a_design_under_a_licence_name_or_in_git_bookkeeping_is_traced(tmp_path: Path) -> None:
    """Names are the watched user's to choose: content decides. A design copied to LICENSE-x
    or into .git/info/ in the tree, then out, is still a copy of tagged content."""
    root = tree(tmp_path)
    (root / ".git" / "info").mkdir(parents=True)
    shutil.copy(root / "chip" / "top.v", root / "LICENSE-MIT")
    shutil.copy(root / "chip" / "alu.v", root / ".git" / "info" / "exclude")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    index = LineageIndex()
    assert build(index, root) == 4  # not HEAD: git's bookkeeping up to 512 bytes
    out = tmp_path / "usb"
    out.mkdir()
    shutil.copy(root / "LICENSE-MIT", out / "a")
    shutil.copy(root / ".git" / "info" / "exclude", out / "b")
    shutil.copy(root / ".git" / "HEAD", out / "HEAD")
    for name, origin in (("a", root / "LICENSE-MIT"), ("b", root / ".git/info/exclude")):
        found = index.find_copy(str(out / name), (out / name).stat().st_size)
        assert found is not None
        assert found.path in (
            str(origin),
            str(root / "chip" / ("top.v" if name == "a" else "alu.v")),
        )
    assert index.find_copy(str(out / "HEAD"), (out / "HEAD").stat().st_size) is None


@pytest.mark.parametrize(
    ("path", "size", "indexed"),
    [
        ("/r/.git/HEAD", 21, False),
        ("/r/.git/config", 92, False),
        ("/r/.git/description", 73, False),
        ("/r/.git/info/exclude", 240, False),
        ("/r/.git/info/exclude", 4000, True),
        ("/r/.git/hooks/pre-commit.sample", 1643, True),
        ("/r/.git/objects/pack/pack-1.pack", 300, True),
        ("/r/.git/objects/ee/b49a2afa9870efcc9d0cbfd5cc33fc5da81f98", 60, True),
        ("/r/.git/lfs/objects/ab/cd/abcd", 100, True),
        ("/r/.git/refs/heads/main", 41, True),
        ("/r/.git/packed-refs", 100, True),
        ("/r/LICENSE", 11357, True),
        ("/r/COPYING.LESSER", 20, True),
        ("/r/src/.gitignore", 10, True),
        ("/r/git/hooks.c", 10, True),
        ("/r/src/x.c", 0, False),
    ],
)
def test_indexable(path: str, size: int, indexed: bool) -> None:
    assert indexable(path, size) is indexed
