"""Content lineage: is a file written outside the tagged trees a copy of a tagged file?"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.enrich.ownreads import OwnReads
from agent.enrich.public import PUBLIC_MAX_BYTES, PublicContent, read_bounded
from agent.sources.paths import Excludes

# Below this size the whole file is hashed; above it, a sample (head, middle, tail) plus the
# size: copies of large files (model weights, disk images) are still told apart from files
# that merely share a size, at a cost that does not grow with the file.
DEFAULT_HASH_MAX_BYTES = 16 * 1024 * 1024
SAMPLE_BYTES = 64 * 1024
DEFAULT_IO_BUDGET = 64 * 1024 * 1024  # bytes hashed per second, all files together
DEFAULT_MAX_FILES = 200_000
# Tagged files moved out of the trees, remembered briefly so the other end of the move (seen
# in another lane, without the source path) is still traced to them.
DEPARTED_CAP = 10_000
# Tagged files hashed at most per landed file: a file dropped in /tmp with the size of 600
# tagged files must not make the agent read 600 tagged files.
MAX_CANDIDATES = 16
DEPARTED_SECONDS = 300.0

CapHit = Callable[[str, int, dict[str, Any]], None]

# Content every project holds (git's templates, licence texts, git's loose objects of them)
# is recognised by content when a copy matches it (agent/enrich/public.py), never by name: a
# file named LICENSE that holds a design is traced. Left out by place and size only: git's
# own small bookkeeping (HEAD, config, ORIG_HEAD, COMMIT_EDITMSG, description, info/exclude:
# the same few bytes in many repositories), up to GIT_BOOKKEEPING_BYTES, outside its objects,
# refs and LFS store (a repository itself is traced by its refs and packs, agent/enrich/
# repos.py). What a watched user can hide there is that many bytes (README: blind spots).
GIT_BOOKKEEPING_BYTES = 512
_PUBLIC_CACHE = 4096
_GIT_CONTENT = ("objects/", "refs/", "packed-refs", "lfs/")


def indexable(path: str, size: int) -> bool:
    """Is the file at `path` (in a tagged tree), of `size` bytes, content to trace copies of?"""
    if size <= 0:
        return False
    if size > GIT_BOOKKEEPING_BYTES:
        return True
    git = path.find("/.git/")
    return git < 0 or path.startswith(_GIT_CONTENT, git + 6)


class _Entry:
    """One tagged file. Slots keep 100,000 of them in a few tens of MB."""

    __slots__ = ("digest", "mtime_ns", "path", "size", "tags")

    def __init__(self, path: str, size: int, mtime_ns: int, tags: tuple[str, ...]) -> None:
        self.path = path
        self.size = size
        self.mtime_ns = mtime_ns
        self.tags = tags
        self.digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class Origin:
    path: str
    tags: tuple[str, ...]
    method: str  # "content" (hash) | "name" (an encrypted/encoded wrapper of a tagged name)


class _Budget:
    """A token bucket of bytes per second for hashing."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.last = time.monotonic()

    def take(self, n: int) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True


def content_digest(path: str, size: int, hash_max_bytes: int) -> bytes | None:
    """blake2b of the file (or of its sample when larger than `hash_max_bytes`); None when the
    file is not a regular file any more or changed size while we read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return None
        h = hashlib.blake2b(digest_size=20)
        h.update(size.to_bytes(8, "little"))
        if size <= hash_max_bytes:
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                h.update(chunk)
        else:
            for offset in (0, size // 2, max(0, size - SAMPLE_BYTES)):
                h.update(os.pread(fd, SAMPLE_BYTES, offset))
        return h.digest()
    except OSError:
        return None
    finally:
        os.close(fd)


def bytes_digest(data: bytes, hash_max_bytes: int) -> bytes:
    """`content_digest` of a file holding `data` (decoded or joined content, in memory)."""
    size = len(data)
    h = hashlib.blake2b(digest_size=20)
    h.update(size.to_bytes(8, "little"))
    if size <= hash_max_bytes:
        h.update(data)
    else:
        for offset in (0, size // 2, max(0, size - SAMPLE_BYTES)):
            h.update(data[offset : offset + SAMPLE_BYTES])
    return h.digest()


def hashed_bytes(size: int, hash_max_bytes: int) -> int:
    return size if size <= hash_max_bytes else 3 * SAMPLE_BYTES


class LineageIndex:
    """Tagged files by size and by name; content hashes computed lazily and throttled.

    Built by walking the tagged trees once (in the background) and kept current from the
    tagged trees' own events. Bounded by `max_files`; reaching it is reported."""

    def __init__(
        self,
        *,
        max_files: int = DEFAULT_MAX_FILES,
        hash_max_bytes: int = DEFAULT_HASH_MAX_BYTES,
        io_budget: int = DEFAULT_IO_BUDGET,
        on_cap: CapHit | None = None,
    ) -> None:
        self.max_files = max_files
        self.hash_max_bytes = hash_max_bytes
        self._budget = _Budget(io_budget)
        self._on_cap = on_cap
        self._by_path: dict[str, _Entry] = {}
        # Buckets are dicts keyed by path, never lists: 100,000 tagged files of one size (a
        # generated tree) made every change of one of them a linear list removal.
        self._unhashed: dict[int, dict[str, _Entry]] = {}  # by size, digest not known yet
        self._by_digest: dict[tuple[int, bytes], dict[str, _Entry]] = {}  # by (size, digest)
        self._by_name: dict[str, dict[str, _Entry]] = {}
        self._sizes: dict[int, int] = {}  # entries per size
        self._tags: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._dirs: dict[str, set[str]] = {}
        self._departed: OrderedDict[tuple[str, int], tuple[float, Origin]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {
            "hashes": 0,
            "hashed_bytes": 0,
            "budget_denied": 0,
            "full": 0,
            "candidates_capped": 0,
            "public": 0,
        }
        # The agent's reads of tagged files are announced here (see agent/enrich/ownreads.py).
        self.own_reads: OwnReads | None = None
        self.max_candidates = MAX_CANDIDATES
        self.public = PublicContent()
        # (size, digest) -> public boilerplate or not: a speed cache (cleared when full).
        self._public: dict[tuple[int, bytes], bool] = {}

    def __len__(self) -> int:
        return len(self._by_path)

    # maintenance -----------------------------------------------------------------------

    def add(self, path: str, size: int, mtime_ns: int, tags: tuple[str, ...]) -> bool:
        """Index a tagged file (or bring its entry up to date); False when it is not content
        to trace (indexable(): empty, or git's small bookkeeping)."""
        if not indexable(path, size):
            return False
        # Events carry microseconds, a walk nanoseconds: compare at the coarser one, or every
        # event would look like a change and drop the cached digest.
        mtime_ns -= mtime_ns % 1000
        with self._lock:
            old = self._by_path.get(path)
            if old is not None:
                if old.size == size and old.mtime_ns == mtime_ns:
                    return True
                self._remove(old)
            elif len(self._by_path) >= self.max_files:
                self.stats["full"] += 1
                if self._on_cap is not None:
                    self._on_cap("lineage_index", self.max_files, {"path_dropped": True})
                return True  # content, not indexed: reported as a cap hit
            self._insert(_Entry(path, size, mtime_ns, self._tags.setdefault(tags, tags)))
        return True

    def remove(self, path: str) -> None:
        with self._lock:
            entry = self._by_path.get(path)
            if entry is not None:
                self._remove(entry)

    def depart(self, path: str) -> None:
        """A tagged file was moved out of the trees: drop it, but remember it by name and size
        for a while (the move's other end may be processed later, or before)."""
        with self._lock:
            entry = self._by_path.get(path)
            if entry is None:
                return
            self._remove(entry)
            key = (os.path.basename(path), entry.size)
            self._departed.pop(key, None)
            self._departed[key] = (time.monotonic(), Origin(entry.path, entry.tags, "move"))
            while len(self._departed) > DEPARTED_CAP:
                self._departed.popitem(last=False)

    def moved_away(self, name: str, size: int) -> Origin | None:
        """The tagged file a file moved in from elsewhere was, by name and size: one that
        departed lately, or an indexed one whose path is gone (its departure not yet seen)."""
        with self._lock:
            found = self._departed.pop((name, size), None)
            if found is not None and time.monotonic() - found[0] <= DEPARTED_SECONDS:
                return found[1]
            candidates = [e for e in self._by_name.get(name, {}).values() if e.size == size]
        for entry in candidates:
            if not os.path.lexists(entry.path):
                return Origin(entry.path, entry.tags, "move")
        return None

    def _under(self, top: str) -> list[_Entry]:
        """Entries below `top`: a scan of directories, not of files (a tree removed file by
        file, as `rm -rf` does, leaves nothing here by the time its directory goes)."""
        prefix = top.rstrip("/") + "/"
        out: list[_Entry] = []
        for d in [d for d in self._dirs if d == top or d.startswith(prefix)]:
            out.extend(self._by_path[p] for p in self._dirs[d])
        return out

    def remove_tree(self, top: str) -> None:
        with self._lock:
            for entry in self._under(top):
                self._remove(entry)

    def move_tree(self, src: str, dst: str) -> None:
        """A directory renamed inside the tagged trees: its files keep their digests."""
        with self._lock:
            moved = self._under(src)
            for entry in moved:
                self._remove(entry)
            for entry in moved:
                entry.path = dst + entry.path[len(src) :]
                self._insert(entry)

    def _bucket(self, entry: _Entry) -> dict[str, _Entry]:
        if entry.digest is None:
            return self._unhashed.setdefault(entry.size, {})
        return self._by_digest.setdefault((entry.size, entry.digest), {})

    def _insert(self, entry: _Entry) -> None:
        path = entry.path
        self._by_path[path] = entry
        self._sizes[entry.size] = self._sizes.get(entry.size, 0) + 1
        self._bucket(entry)[path] = entry
        slash = path.rfind("/")
        self._by_name.setdefault(path[slash + 1 :], {})[path] = entry
        self._dirs.setdefault(path[:slash] or "/", set()).add(path)

    def _remove(self, entry: _Entry) -> None:
        path = entry.path
        del self._by_path[path]
        slash = path.rfind("/")
        left = self._sizes.get(entry.size, 1) - 1
        if left:
            self._sizes[entry.size] = left
        else:
            self._sizes.pop(entry.size, None)
        d = path[:slash] or "/"
        paths = self._dirs.get(d)
        if paths is not None:
            paths.discard(path)
            if not paths:
                del self._dirs[d]
        if entry.digest is None:
            sized = self._unhashed.get(entry.size)
            if sized is not None:
                sized.pop(path, None)
                if not sized:
                    del self._unhashed[entry.size]
        else:
            same = self._by_digest.get((entry.size, entry.digest))
            if same is not None:
                same.pop(path, None)
                if not same:
                    del self._by_digest[(entry.size, entry.digest)]
        name = path[slash + 1 :]
        named = self._by_name.get(name)
        if named is not None:
            named.pop(path, None)
            if not named:
                del self._by_name[name]

    def _hashed(self, entry: _Entry, digest: bytes | None) -> None:
        """Record a tagged file's digest, if the entry is still the indexed one for its path
        (it may have changed or gone while it was hashed outside the lock)."""
        if digest is None:
            return
        with self._lock:
            if self._by_path.get(entry.path) is not entry or entry.digest is not None:
                return
            bucket = self._unhashed.get(entry.size)
            if bucket is not None:
                bucket.pop(entry.path, None)
                if not bucket:
                    del self._unhashed[entry.size]
            entry.digest = digest
            self._bucket(entry)[entry.path] = entry

    def build(
        self,
        roots: Iterable[tuple[str, Excludes, Callable[[str], tuple[str, ...]]]],
        cancel: threading.Event | None = None,
    ) -> int:
        """Walk tagged trees (no symlinks followed); `tags_of(dir)` gives a directory's tags.
        A set `cancel` ends the walk early (the agent is stopping)."""
        added = 0
        for top, excludes, tags_of in roots:
            stack = [top]
            while stack:
                if cancel is not None and cancel.is_set():
                    return added
                d = stack.pop()
                tags = tags_of(d)
                try:
                    with os.scandir(d) as it:
                        for entry in it:
                            p = f"{d}/{entry.name}"
                            rel = p[len(top) :].lstrip("/")
                            if excludes and excludes.leaf_excluded(rel, entry.name):
                                continue
                            try:
                                if entry.is_dir(follow_symlinks=False):
                                    stack.append(p)
                                elif entry.is_file(follow_symlinks=False):
                                    st = entry.stat(follow_symlinks=False)
                                    added += self.add(p, st.st_size, st.st_mtime_ns, tags)
                            except OSError:
                                continue
                except OSError:
                    continue
        return added

    # questions -------------------------------------------------------------------------

    def find_copy(self, path: str, size: int) -> Origin | None:
        """The tagged file `path` is a copy of, by size then content hash; None if none."""
        if not self.has_size(size):
            return None
        digest = self._digest(path, size)
        if digest is None:
            return None
        entry = self._same_content(size, digest, name=os.path.basename(path), exclude=path)
        return Origin(entry.path, entry.tags, "content") if entry is not None else None

    def has_size(self, size: int) -> bool:
        """Whether a tagged file of this size is indexed (a dict lookup, no lock needed)."""
        return self._sizes.get(size, 0) > 0

    def _same_content(
        self, size: int, digest: bytes, *, name: str | None = None, exclude: str | None = None
    ) -> _Entry | None:
        """The tagged file whose content digest is `digest`, unless that content is public
        boilerplate (a licence text, a git template: agent/enrich/public.py)."""
        entry = self._same_digest(size, digest, name=name, exclude=exclude)
        if entry is None or size > PUBLIC_MAX_BYTES:
            return entry
        key = (size, digest)
        public = self._public.get(key)
        if public is None:
            public = self._is_public(entry, digest)
            if public is None:
                return entry  # could not read it now: traced (and asked again next time)
            if len(self._public) >= _PUBLIC_CACHE:
                self._public.clear()
            self._public[key] = public
        if public:
            self.stats["public"] += 1
            return None
        return entry

    def _is_public(self, entry: _Entry, digest: bytes) -> bool | None:
        """Read the tagged file (as the agent's own read, within the hashing budget) and
        judge its content; None if it could not be read as the content that matched."""
        if not self._take_budget(entry.size):
            return None
        if self.own_reads is not None:
            self.own_reads.expect(entry.path)
        data = read_bounded(entry.path)
        if data is None or bytes_digest(data, self.hash_max_bytes) != digest:
            return None  # changed since it was hashed
        return self.public.is_public(data)

    def _same_digest(
        self, size: int, digest: bytes, *, name: str | None = None, exclude: str | None = None
    ) -> _Entry | None:
        """The tagged file whose content digest is `digest`: one already hashed (a lookup),
        else the first match among those not hashed yet, same-name ones first, hashing (as the
        agent's own reads, throttled) at most `max_candidates` of them. Constant work per
        question whatever the number of tagged files of that size."""
        limit = self.max_candidates
        with self._lock:
            for entry in self._by_digest.get((size, digest), {}).values():
                if entry.path != exclude:
                    return entry
            picks: list[_Entry] = []
            seen: set[str] = set()
            if name is not None:
                for entry in self._by_name.get(name, {}).values():
                    if len(picks) > limit:
                        break
                    if entry.size == size and entry.digest is None and entry.path != exclude:
                        picks.append(entry)
                        seen.add(entry.path)
            for entry in self._unhashed.get(size, {}).values():
                if len(picks) > limit:
                    break
                if entry.path not in seen and entry.path != exclude:
                    picks.append(entry)
        for hashed, entry in enumerate(picks):
            if hashed >= limit:
                self.stats["candidates_capped"] += 1
                if self._on_cap is not None:
                    self._on_cap("lineage_candidates", limit, {"size": size})
                break
            found = self._digest(entry.path, entry.size, tagged=True)
            self._hashed(entry, found)
            if found is not None and found == digest:
                return entry
        return None

    def files_in(self, directory: str) -> int:
        """Indexed tagged files directly in `directory`."""
        paths = self._dirs.get(directory)
        return len(paths) if paths else 0

    def size_of(self, path: str) -> int | None:
        """The indexed size of the tagged file at `path` (before the event being handled)."""
        entry = self._by_path.get(path)
        return entry.size if entry is not None else None

    def lookup(self, path: str) -> Origin | None:
        """The indexed tagged file at `path`, if any."""
        with self._lock:
            entry = self._by_path.get(path)
        return Origin(entry.path, entry.tags, "move") if entry is not None else None

    def find_by_name(self, name: str) -> Origin | None:
        """A tagged file with this base name (for encrypted or encoded wrappers)."""
        with self._lock:
            bucket = self._by_name.get(name)
            entry = next(iter(bucket.values())) if bucket else None
        return Origin(entry.path, entry.tags, "name") if entry is not None else None

    def match_member(self, name: str, size: int) -> _Entry | None:
        """A tagged file an archive member looks like: same base name and size."""
        base = name.rstrip("/").rsplit("/", 1)[-1]
        with self._lock:
            for entry in self._by_name.get(base, {}).values():
                if entry.size == size:
                    return entry
        return None

    def match_member_content(self, size: int, digest: Callable[[], bytes | None]) -> _Entry | None:
        """A tagged file an archive member is a copy of, whatever its name: same size, then
        same content digest. `digest()` hashes the member as `content_digest` hashes a file of
        that size; it is called only when a tagged file has that size, and may give None (not
        hashed). Tagged files' digests are computed as for `find_copy`, cached, throttled."""
        if not self.has_size(size):
            return None
        member = digest()
        if member is None:
            return None
        return self._same_content(size, member)

    def _take_budget(self, cost: int) -> bool:
        """Bytes of tagged content the agent may read now; a refusal is a cap hit (health)."""
        if self._budget.take(cost):
            return True
        self.stats["budget_denied"] += 1
        if self._on_cap is not None:
            self._on_cap("lineage_io_budget", self._budget.rate, {"bytes": cost})
        return False

    def _digest(self, path: str, size: int, *, tagged: bool = False) -> bytes | None:
        cost = hashed_bytes(size, self.hash_max_bytes)
        if not self._take_budget(cost):
            return None
        if tagged and self.own_reads is not None:
            self.own_reads.expect(path)  # our open of a tagged file is not a user's read
        digest = content_digest(path, size, self.hash_max_bytes)
        if digest is not None:
            self.stats["hashes"] += 1
            self.stats["hashed_bytes"] += cost
        return digest
