"""Enrichment benchmark: the lineage index's build time and memory, and what destination
enrichment (lineage, archives, disguise) costs the pipeline per event.

Usage, with the interpreter of the environment exfilwatch is installed in (``.venv/bin/python``
in a checkout)::

    python bench/enrich.py --quick          # 20,000 files, 50,000 events
    python bench/enrich.py                  # 100,000 files, 200,000 events
    python bench/enrich.py --json           # JSON on stdout instead of tables
    python bench/enrich.py --json r.json    # tables, and JSON in r.json
    python bench/enrich.py --profile        # also cProfile one enriched pass

Progress goes to stderr; the result tables (or ``--json``) go to stdout.

Goal (from the issue): an index of 100,000 files in under 60 MB of memory; the pipeline with
enrichment keeps >= 0.7 of the bare pipeline's event rate. MB here is 10^6 bytes.

Trees (``--dir``, default /var/tmp/exfilwatch-bench-enrich), built once and reused, never
deleted (on ext4, creating files right after deleting a large tree is very slow for minutes).
A tree is complete when its file count matches; otherwise missing or wrong-sized files are
(re)written, so an interrupted build resumes.
    tree-N/     the tagged tree: N files in directories of 500 (200 x 500 for 100,000).
                Sizes are log-normal (median 2 KiB, sigma 1.4, 1 B .. 256 KiB), so size
                buckets are realistic (many files share a size below 1 KiB, few above).
                Names are unique but for 4 common names in every directory (__init__.py,
                README.md, Makefile, index.json); text files hold word text with a unique
                first line, .bin/.dat files random bytes. A marker (.exfilwatch.yaml, tags
                [export-controlled]) in every 25th directory varies the tag tuples.
    staging-N/  a staging area outside the tree (location "staging"):
                copies/   500 exact copies of tagged files (half under their own name, half
                          renamed): lineage must find them by content hash
                near/     500 files of the same size as some tagged file but other content:
                          hashing happens (the file and every candidate of that size), no match
                unique/   200 files whose size no tagged file has: no hashing
                encoded/  20 base64 copies of tagged files named NAME.b64 (disguise signal,
                          lineage by name)
                zips/     20 zip files of 30 members, 20 of them tagged files by name and size

Index (each run in a fresh child process, so the RSS is the index's, not this script's)
    build s             wall time of ``LineageIndex.build`` over the tagged tree, with
                        ``tags_of`` from a TagResolver as the service does it. Run
                        ``--index-runs`` times (the first may meet a cold dentry cache).
    peak RSS delta      VmHWM after the build - VmHWM before it (ru_maxrss)
    RSS retained        RSS after the build and a gc.collect() - RSS before
    tracemalloc         in one more child, with tracemalloc on during the build: bytes the
                        build left allocated and the peak; plus the top allocating lines
    structures          sys.getsizeof over the index's dicts, lists, entries and strings (what
                        the retained bytes are made of), and what the 20-byte digests add
                        once every entry has been hashed
    remove_tree         one ``remove_tree`` of a directory that holds nothing: the linear scan
                        a directory delete/move-out in a tagged tree costs

Events (seeded, deterministic, built once in memory as RawEvent batches of ``--batch``)
    (1 - ``--staging-share``) tagged-tree activity on tree files, 80% of it on a hot 10% of
    the files: opened 38%, closed_nowrite 38%, modified 12%, closed_write 12%.
    ``--staging-share`` (default 8%) events on staging files: copies 35%, near 35%, unique
    20%, encoded 5%, zips 5%; closed_write 50%, moved_in 10%, modified 25%, opened 15% (only
    closed_write and moved_in "land" a file and get lineage/archive/disguise work).

Pipeline (in this process; one Pipeline, its TagResolver warmed by an untimed pass first)
    bare                ``Pipeline._process`` over all batches with ``destinations = None``
    enriched            the same with ``Destinations(index, DestinationSettings())`` and a
                        LineageIndex freshly built before each repetition (untimed), so every
                        repetition starts with no cached digests (the conservative case)
    Repetitions interleave bare, enriched, bare, enriched, ... (``--repeat``, default 3) and
    the best of each is kept: the machine is noisy, read the ratio. events/s is by wall time
    and, as a cross-check less sensitive to other load, by this thread's CPU time.
    Events go to FileSink("/dev/null"): the JSON line is built, the write costs nothing.
    No rules engine is set (the bare pipeline is then as cheap as it gets: the ratio is the
    harshest one).
    ratio               enriched events/s / bare events/s (goal >= 0.7)

Breakdown (one more enriched pass with a fresh index, untimed as a whole: each
``Destinations`` call is timed and the index's hash counters are read around it)
    per event class: events, mean microseconds in Destinations, events that hashed, hashes,
    bytes hashed, lineage origins found, archive listings and disguise signals.

Standard library and psutil only.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import functools
import gc
import io
import json
import math
import os
import pstats
import random
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
from common import PYTHON, emit, peak_rss_bytes, progress, table

from agent.config import WatchSpec
from agent.enrich.destinations import Destinations, DestinationSettings
from agent.enrich.lineage import LineageIndex
from agent.enrich.tags import TagResolver
from agent.events import Event
from agent.health import CapReporter
from agent.pipeline import Pipeline
from agent.rules.compiler import RuleSet, load_rules
from agent.rules.engine import Engine
from agent.sinks import FileSink, Router
from agent.sources.base import RawEvent
from agent.sources.paths import compile_excludes

DEFAULT_DIR = "/var/tmp/exfilwatch-bench-enrich"
MARKER = ".exfilwatch.yaml"
MARKER_TEXT = b"tags: [export-controlled]\n"
MARKER_EVERY = 25
TREE_TAGS = ("rnd", "source")
FILES_PER_DIR = 500
COMMON_NAMES = ("__init__.py", "README.md", "Makefile", "index.json")
TEXT_EXTS = ("py", "c", "h", "v", "sv", "md", "txt", "json", "csv", "yaml")
BINARY_EXTS = ("bin", "dat")
WORDS = (
    "alpha",
    "beta",
    "gamma",
    "delta",
    "clock",
    "reset",
    "data",
    "valid",
    "ready",
    "enable",
    "width",
    "depth",
    "buffer",
    "register",
    "module",
    "input",
    "output",
    "wire",
    "logic",
    "signal",
    "counter",
    "state",
    "next",
    "value",
    "mask",
    "offset",
    "address",
    "fifo",
    "cache",
    "line",
    "block",
    "return",
    "static",
    "const",
    "struct",
    "void",
    "int",
    "float",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "that",
    "by",
    "this",
    "from",
    "be",
    "are",
    "at",
    "or",
    "as",
)
MAX_SIZE = 256 * 1024
GOAL_MB = 60.0
GOAL_RATIO = 0.7
MB = 1_000_000

TAGGED_ACTIONS = (("opened", 38), ("closed_nowrite", 38), ("modified", 12), ("closed_write", 12))
STAGING_ACTIONS = (("closed_write", 50), ("moved_in", 10), ("modified", 25), ("opened", 15))
STAGING_KINDS = (("copy", 35), ("near", 35), ("unique", 20), ("encoded", 5), ("zip", 5))
STAGING_COUNTS = {"copy": 500, "near": 500, "unique": 200, "encoded": 20, "zip": 20}
LANDED = frozenset({"closed_write", "moved_in", "moved"})


# trees -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedFile:
    rel: str  # relative to the tree root
    size: int
    text: bool
    seed: int


def tree_plan(n_files: int, seed: int) -> list[PlannedFile]:
    """The tagged tree's files: names, sizes and content kinds, deterministic in `seed`."""
    rng = random.Random(seed)
    plan: list[PlannedFile] = []
    for i in range(n_files):
        d, k = divmod(i, FILES_PER_DIR)
        if k < len(COMMON_NAMES):
            name = COMMON_NAMES[k]
        else:
            ext = rng.choice(BINARY_EXTS) if rng.random() < 0.2 else rng.choice(TEXT_EXTS)
            name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{d:03d}_{k:03d}.{ext}"
        size = int(min(MAX_SIZE, max(1.0, rng.lognormvariate(math.log(2048), 1.4))))
        text = not name.endswith((".bin", ".dat"))
        plan.append(PlannedFile(f"d{d:03d}/{name}", size, text, seed * 1_000_003 + i))
    return plan


@functools.cache
def text_blob() -> bytes:
    """Word text that file contents are cut from (built once)."""
    rng = random.Random(7)
    lines = []
    total = 0
    while total < MAX_SIZE * 2:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode("ascii")


def file_content(p: PlannedFile, label: str) -> bytes:
    rng = random.Random(p.seed)
    if not p.text:
        return rng.randbytes(p.size)
    header = f"# {label} {p.seed}\n".encode()
    blob = text_blob()
    body_len = max(0, p.size - len(header))
    off = rng.randrange(0, len(blob) - body_len)
    return (header + blob[off : off + body_len])[: p.size]


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def count_files(top: str) -> int:
    n = 0
    for _dirpath, _dirs, files in os.walk(top):
        n += len(files)
    return n


def ensure_tree(root: str, plan: list[PlannedFile]) -> bool:
    """Create what is missing; True when the tree was already complete."""
    n_dirs = len({p.rel.split("/", 1)[0] for p in plan})
    markers = len(range(0, n_dirs, MARKER_EVERY))
    expected = len(plan) + markers
    if os.path.isdir(root) and count_files(root) == expected:
        return True
    progress(f"building tagged tree {root} ({len(plan):,} files); done once, then reused")
    began = time.monotonic()
    os.makedirs(root, exist_ok=True)
    for d in range(n_dirs):
        path = f"{root}/d{d:03d}"
        os.makedirs(path, exist_ok=True)
        if d % MARKER_EVERY == 0 and not os.path.exists(f"{path}/{MARKER}"):
            write_file(f"{path}/{MARKER}", MARKER_TEXT)
    written = 0
    for i, p in enumerate(plan):
        path = f"{root}/{p.rel}"
        try:
            if os.lstat(path).st_size == p.size:
                continue
        except FileNotFoundError:
            pass
        write_file(path, file_content(p, p.rel))
        written += 1
        if written % 20_000 == 0:
            progress(f"  {i + 1:,}/{len(plan):,} files ({time.monotonic() - began:.0f} s)")
    progress(f"  wrote {written:,} files in {time.monotonic() - began:.1f} s")
    return False


@dataclass(slots=True)
class Staging:
    root: str
    files: dict[str, list[str]] = field(default_factory=dict)  # kind -> paths


def staging_plan(tree_root: str, plan: list[PlannedFile], seed: int) -> dict[str, Any]:
    """Which staging files exist and what they are made of (deterministic in `seed`)."""
    rng = random.Random(seed + 1)
    unique_names = [p for p in plan if os.path.basename(p.rel) not in COMMON_NAMES]
    sizes = {p.size for p in plan}
    copies = rng.sample(unique_names, STAGING_COUNTS["copy"])
    near = rng.sample(plan, STAGING_COUNTS["near"])
    unique_sizes: list[int] = []
    while len(unique_sizes) < STAGING_COUNTS["unique"]:
        s = int(min(MAX_SIZE * 4, max(1.0, rng.lognormvariate(math.log(2048), 1.4))))
        while s in sizes:
            s += 1
        unique_sizes.append(s)
    big = [p for p in unique_names if 400 <= p.size <= 16 * 1024]
    encoded = rng.sample(big, STAGING_COUNTS["encoded"])
    zips = [
        (rng.sample(unique_names, 20), [rng.randint(10, 8000) for _ in range(10)])
        for _ in range(STAGING_COUNTS["zip"])
    ]
    return {
        "tree": tree_root,
        "copies": copies,
        "near": near,
        "unique_sizes": unique_sizes,
        "encoded": encoded,
        "zips": zips,
    }


def ensure_staging(root: str, sp: dict[str, Any]) -> Staging:
    tree: str = sp["tree"]
    st = Staging(root)
    for sub in ("copies", "near", "unique", "encoded", "zips"):
        os.makedirs(f"{root}/{sub}", exist_ok=True)

    def need(path: str, size: int | None) -> bool:
        """Missing, or (when `size` is given) of another size."""
        try:
            actual = os.lstat(path).st_size
        except FileNotFoundError:
            return True
        return size is not None and actual != size

    made = 0
    copy_paths: list[str] = []
    for i, p in enumerate(sp["copies"]):
        base = os.path.basename(p.rel)
        ext = base.rsplit(".", 1)[-1]
        name = base if i % 2 == 0 else f"copy_{i:04d}.{ext}"
        path = f"{root}/copies/{name}"
        if need(path, p.size):
            shutil.copyfile(f"{tree}/{p.rel}", path)
            made += 1
        copy_paths.append(path)
    st.files["copy"] = copy_paths
    near_paths: list[str] = []
    for i, p in enumerate(sp["near"]):
        ext = os.path.basename(p.rel).rsplit(".", 1)[-1]
        path = f"{root}/near/near_{i:04d}.{ext}"
        if need(path, p.size):
            other = PlannedFile(p.rel, p.size, p.text, p.seed + 77)
            data = file_content(other, f"near {i}")
            with open(f"{tree}/{p.rel}", "rb") as fh:
                content = fh.read()
            if data == content:
                data = bytes(b ^ 1 for b in content)  # tiny files: make sure it differs
            write_file(path, data)
            made += 1
        near_paths.append(path)
    st.files["near"] = near_paths
    unique_paths: list[str] = []
    for i, size in enumerate(sp["unique_sizes"]):
        path = f"{root}/unique/other_{i:04d}.txt"
        if need(path, size):
            write_file(path, file_content(PlannedFile("", size, True, 900_000 + i), "other"))
            made += 1
        unique_paths.append(path)
    st.files["unique"] = unique_paths
    enc_paths: list[str] = []
    for p in sp["encoded"]:
        path = f"{root}/encoded/{os.path.basename(p.rel)}.b64"
        if need(path, None):
            with open(f"{tree}/{p.rel}", "rb") as fh:
                write_file(path, base64.encodebytes(fh.read()))
            made += 1
        enc_paths.append(path)
    st.files["encoded"] = enc_paths
    zip_paths: list[str] = []
    for i, (members, others) in enumerate(sp["zips"]):
        path = f"{root}/zips/bundle_{i:03d}.zip"
        if need(path, None):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for p in members:
                    zf.write(f"{tree}/{p.rel}", f"src/{os.path.basename(p.rel)}")
                for j, size in enumerate(others):
                    zf.writestr(
                        f"misc/note_{j:02d}.txt", random.Random(i * 100 + j).randbytes(size)
                    )
            write_file(path, buf.getvalue())
            made += 1
        zip_paths.append(path)
    st.files["zip"] = zip_paths
    if made:
        progress(f"staging {root}: wrote {made} files")
    return st


# events ----------------------------------------------------------------------------------


def weighted(rng: random.Random, table: Sequence[tuple[str, int]]) -> Callable[[], str]:
    names = [n for n, _ in table]
    weights = [w for _, w in table]
    return lambda: rng.choices(names, weights)[0]


def make_events(
    tree: str, plan: list[PlannedFile], staging: Staging, n: int, share: float, seed: int
) -> tuple[list[RawEvent], dict[str, str]]:
    """The event stream, and the staging kind of each staging path."""
    rng = random.Random(seed + 2)
    paths = [f"{tree}/{p.rel}" for p in plan]
    hot = rng.sample(paths, max(1, len(paths) // 10))
    tagged_action = weighted(rng, TAGGED_ACTIONS)
    staging_action = weighted(rng, STAGING_ACTIONS)
    staging_kind = weighted(rng, STAGING_KINDS)
    kind_of = {p: k for k, ps in staging.files.items() for p in ps}
    ts = 1_700_000_000_000_000
    out: list[RawEvent] = []
    for _ in range(n):
        ts += rng.randint(1, 400)
        if rng.random() < share:
            path = rng.choice(staging.files[staging_kind()])
            out.append(RawEvent(ts, staging_action(), path, None, False, "inotify"))
        else:
            path = rng.choice(hot) if rng.random() < 0.8 else rng.choice(paths)
            out.append(RawEvent(ts, tagged_action(), path, None, False, "inotify"))
    return out, kind_of


# index child -----------------------------------------------------------------------------


def make_resolver(specs: Sequence[WatchSpec], records: list[dict[str, Any]]) -> TagResolver:
    return TagResolver(specs, MARKER, records.append, CapReporter(records.append))


def build_index(resolver: TagResolver, tree: str) -> tuple[LineageIndex, int]:
    index = LineageIndex()
    roots = [(tree, compile_excludes(()), lambda d: resolver.resolve_dir(d).tags)]
    return index, index.build(roots)


def reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def structure_sizes(index: LineageIndex) -> dict[str, int]:
    size = sys.getsizeof
    entries = list(index._by_path.values())
    out = {
        "by_path dict": size(index._by_path),
        "entries (_Entry)": sum(size(e) for e in entries),
        "path strings": sum(size(e.path) for e in entries),
        "by_size dicts": size(index._unhashed)
        + sum(size(v) for v in index._unhashed.values())
        + size(index._by_digest)
        + sum(size(v) for v in index._by_digest.values()),
        "by_name dicts": size(index._by_name) + sum(size(v) for v in index._by_name.values()),
        "name strings (keys)": sum(size(k) for k in index._by_name),
        "size + mtime_ns ints": sum(
            (size(e.size) if e.size > 256 else 0) + size(e.mtime_ns) for e in entries
        ),
        "tag tuples": sum(size(t) for t in index._tags),
    }
    out["total"] = sum(out.values())
    out["digests once all hashed"] = len(entries) * size(b"\0" * 20)
    return out


def index_child(tree: str, trace: bool) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    resolver = make_resolver([WatchSpec(tree, tags=TREE_TAGS, location="tagged")], records)
    proc = psutil.Process()
    gc.collect()
    hwm_reset = reset_hwm()
    rss0, hwm0 = proc.memory_info().rss, peak_rss_bytes() or 0
    if trace:
        tracemalloc.start(1)
    began = time.perf_counter()
    index, files = build_index(resolver, tree)
    seconds = time.perf_counter() - began
    out: dict[str, Any] = {"files": files, "indexed": len(index), "build_s": seconds}
    if trace:
        current, peak = tracemalloc.get_traced_memory()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        out["traced_bytes"] = current
        out["traced_peak_bytes"] = peak
        top = []
        for stat in snap.statistics("lineno")[:8]:
            frame = stat.traceback[0]
            top.append(
                {
                    "where": f"{os.path.basename(frame.filename)}:{frame.lineno}",
                    "bytes": stat.size,
                    "blocks": stat.count,
                }
            )
        out["top_lines"] = top
        return out
    hwm1 = peak_rss_bytes() or 0
    gc.collect()
    rss1 = proc.memory_info().rss
    out["rss_before"] = rss0
    out["hwm_reset"] = hwm_reset
    out["peak_rss_delta"] = hwm1 - (rss0 if hwm_reset else hwm0)
    out["rss_retained"] = rss1 - rss0
    out["hwm_after"] = hwm1
    out["structures"] = structure_sizes(index)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        index.remove_tree(f"{tree}/no-such-directory")
        best = min(best, time.perf_counter() - t0)
    out["remove_tree_s"] = best
    return out


def run_index_child(tree: str, trace: bool) -> dict[str, Any]:
    cmd = [PYTHON, os.path.abspath(__file__), "_index", tree]
    if trace:
        cmd.append("--trace")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"index child failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# pipeline --------------------------------------------------------------------------------


class Probe:
    """Wraps Destinations: times each call and reads the index's hash counters around it."""

    name = "probe"

    def __init__(self, dest: Destinations, index: LineageIndex, kind_of: dict[str, str]) -> None:
        self.dest = dest
        self.index = index
        self.kind_of = kind_of
        self.rows: dict[str, dict[str, float]] = {}

    def __call__(self, e: Event) -> Event:
        stats = self.index.stats
        h0, b0 = stats["hashes"], stats["hashed_bytes"]
        c0 = dict(self.dest.counters)
        t0 = time.perf_counter()
        out = self.dest(e)
        if self.dest.wants(out):  # the worker's part, timed inline here
            out = self.dest.content(out)[0]
        dt = time.perf_counter() - t0
        kind = self.kind_of.get(e.path)
        if kind is None:
            cls = "tagged tree"
        elif e.action in LANDED:
            cls = f"staging {kind}, landed"
        else:
            cls = "staging, not landed"
        row = self.rows.setdefault(
            cls,
            dict.fromkeys(
                ("events", "seconds", "hashing_events", "hashes", "bytes", "origins"), 0.0
            )
            | {"archives": 0.0, "disguised": 0.0},
        )
        hashes = stats["hashes"] - h0
        row["events"] += 1
        row["seconds"] += dt
        row["hashing_events"] += 1 if hashes else 0
        row["hashes"] += hashes
        row["bytes"] += stats["hashed_bytes"] - b0
        row["origins"] += 1 if out.lineage_origin is not None else 0
        row["archives"] += self.dest.counters["archives"] - c0["archives"]
        row["disguised"] += self.dest.counters["disguised"] - c0["disguised"]
        return out


@dataclass(frozen=True, slots=True)
class Timing:
    wall: float
    cpu: float  # this thread's CPU time
    voluntary: int  # context switches where the thread blocked (I/O, locks)
    involuntary: int  # where it was preempted (other load on the machine)


def timed_pass(
    pipeline: Pipeline, batches: list[list[RawEvent]], ruleset: RuleSet | None = None
) -> Timing:
    if ruleset is not None:
        pipeline.engine = Engine(ruleset)  # fresh correlation state for every pass
    gc.collect()
    r0 = resource.getrusage(resource.RUSAGE_THREAD)
    w0, c0 = time.perf_counter(), time.thread_time()
    for batch in batches:
        pipeline._process("tagged", batch)
    wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
    r1 = resource.getrusage(resource.RUSAGE_THREAD)
    return Timing(wall, cpu, r1.ru_nvcsw - r0.ru_nvcsw, r1.ru_nivcsw - r0.ru_nivcsw)


@dataclass(slots=True)
class Rep:
    variant: str
    wall: float
    cpu: float
    voluntary: int
    involuntary: int
    stats: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


def run_pipeline(
    args: argparse.Namespace,
    tree: str,
    staging: Staging,
    events: list[RawEvent],
    kind_of: dict[str, str],
) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    specs = [
        WatchSpec(tree, tags=TREE_TAGS, location="tagged"),
        WatchSpec(staging.root, location="staging"),
    ]
    resolver = make_resolver(specs, records)
    ruleset: RuleSet | None = None
    if args.rules:
        ruleset, problems = load_rules(args.rules, events[0].timestamp_us)
        if ruleset is None:
            raise SystemExit(f"rules failed to load: {problems[:3]}")
    router = Router([(FileSink("/dev/null"), frozenset({"event", "alert"}))])
    pipeline = Pipeline(router, resolver, queue_size=1_000_000)
    batches = [events[i : i + args.batch] for i in range(0, len(events), args.batch)]
    gc.collect()
    gc.freeze()  # the pre-built events are the benchmark's, not the agent's: keep them out of gc
    progress("warm-up pass (bare, untimed)")
    timed_pass(pipeline, batches[: max(1, len(batches) // 5)], ruleset)
    reps: list[Rep] = []
    build_s: list[float] = []
    index: LineageIndex | None = None
    dest: Destinations | None = None
    for r in range(args.repeat):
        pipeline.stages, pipeline.content = (), None
        index = dest = None  # the bare pass runs without an index in memory, as in the agent
        t = timed_pass(pipeline, batches, ruleset)
        reps.append(Rep("bare", t.wall, t.cpu, t.voluntary, t.involuntary))
        progress(f"rep {r + 1}/{args.repeat} bare: {len(events) / t.wall:,.0f} events/s")
        t0 = time.perf_counter()
        index, _ = build_index(resolver, tree)
        build_s.append(time.perf_counter() - t0)
        dest = Destinations(index, DestinationSettings())
        # Content checks inline (no worker): the cost of enrichment, not its scheduling.
        pipeline.stages, pipeline.content = (dest,), dest
        t = timed_pass(pipeline, batches, ruleset)
        reps.append(
            Rep(
                "enriched",
                t.wall,
                t.cpu,
                t.voluntary,
                t.involuntary,
                dict(index.stats),
                dict(dest.counters),
            )
        )
        progress(f"rep {r + 1}/{args.repeat} enriched: {len(events) / t.wall:,.0f} events/s")
    index = dest = None
    profile_text = None
    if args.profile:
        progress("profiled enriched pass")
        index, _ = build_index(resolver, tree)
        full = Destinations(index, DestinationSettings())
        pipeline.stages, pipeline.content = (full,), full
        prof = cProfile.Profile()
        prof.enable()
        timed_pass(pipeline, batches, ruleset)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        profile_text = buf.getvalue()
    progress("breakdown pass (enriched, each Destinations call timed)")
    index, _ = build_index(resolver, tree)
    probe = Probe(Destinations(index, DestinationSettings()), index, kind_of)
    pipeline.stages, pipeline.content = (probe,), None
    timed_pass(pipeline, batches, ruleset)
    pipeline.stages = ()
    gc.unfreeze()
    n = len(events)
    bare = [x for x in reps if x.variant == "bare"]
    enriched = [x for x in reps if x.variant == "enriched"]
    best_bare = min(bare, key=lambda x: x.wall)
    best_enr = min(enriched, key=lambda x: x.wall)
    best_bare_cpu = min(x.cpu for x in bare)
    best_enr_cpu = min(x.cpu for x in enriched)
    rows = probe.rows
    hashing_events = sum(int(v["hashing_events"]) for v in rows.values())
    return {
        "events": n,
        "batch": args.batch,
        "staging_share": args.staging_share,
        "rules": args.rules,
        "reps": [
            {
                "variant": x.variant,
                "wall_s": x.wall,
                "cpu_s": x.cpu,
                "voluntary_switches": x.voluntary,
                "involuntary_switches": x.involuntary,
                "events_per_s": n / x.wall,
                "cpu_events_per_s": n / x.cpu,
                **({"index_stats": x.stats, "counters": x.counters} if x.stats else {}),
            }
            for x in reps
        ],
        "bare_events_per_s": n / best_bare.wall,
        "enriched_events_per_s": n / best_enr.wall,
        "ratio": best_bare.wall / best_enr.wall,
        "bare_cpu_events_per_s": n / best_bare_cpu,
        "enriched_cpu_events_per_s": n / best_enr_cpu,
        "cpu_ratio": best_bare_cpu / best_enr_cpu,
        "enrichment_us_per_event": (best_enr.wall - best_bare.wall) / n * 1e6,
        "index_build_in_process_s": build_s,
        "enriched_index_stats": best_enr.stats,
        "enriched_counters": best_enr.counters,
        "hashing_events": hashing_events,
        "hashing_share": hashing_events / n,
        "breakdown": rows,
        "health_records": [r["event"]["action"] for r in records],
        "profile": profile_text,
    }


# report ----------------------------------------------------------------------------------


def mb(n: float) -> str:
    return f"{n / MB:.1f}"


def report(result: dict[str, Any]) -> str:
    out: list[str] = []
    meta = result["meta"]
    out.append(
        f"exfilwatch enrichment benchmark: {meta['files']:,} tagged files, "
        f"{meta['events']:,} events, {meta['cpus']} CPUs, load1 {meta['load1']:.2f}, "
        f"Python {meta['python']}"
    )
    idx = result["index"]
    out.append("")
    out.append("Lineage index build (each run in a fresh child process; MB = 10^6 bytes)")
    rows = []
    for i, run in enumerate(idx["runs"], 1):
        rows.append(
            [
                f"run {i}",
                f"{run['files']:,}",
                f"{run['indexed']:,}",
                f"{run['build_s']:.2f}",
                f"{run['files'] / run['build_s']:,.0f}",
                mb(run["peak_rss_delta"]),
                mb(run["rss_retained"]),
                f"{run['remove_tree_s'] * 1000:.1f}",
            ]
        )
    tr = idx["traced"]
    rows.append(
        [
            "tracemalloc",
            f"{tr['files']:,}",
            f"{tr['indexed']:,}",
            f"{tr['build_s']:.2f}",
            "",
            f"peak {mb(tr['traced_peak_bytes'])}",
            mb(tr["traced_bytes"]),
            "",
        ]
    )
    out.append(
        table(
            [
                "",
                "files",
                "indexed",
                "build s",
                "files/s",
                "peak RSS delta MB",
                "retained MB",
                "remove_tree ms",
            ],
            rows,
        )
    )
    worst = max([r["peak_rss_delta"] for r in idx["runs"]] + [tr["traced_peak_bytes"]])
    mem_verdict = "OK" if worst < GOAL_MB * MB else "OVER"
    out.append(
        f"goal: < {GOAL_MB:.0f} MB for the index -> worst measured {mb(worst)} MB: {mem_verdict}"
    )
    out.append("")
    out.append("Index structures (sys.getsizeof, after the build)")
    st = idx["runs"][0]["structures"]
    per = idx["runs"][0]["indexed"] or 1
    out.append(
        table(
            ["structure", "MB", "bytes/file"],
            [[k, mb(v), f"{v / per:.0f}"] for k, v in st.items()],
        )
    )
    out.append("")
    out.append("Top allocating lines during the build (tracemalloc)")
    out.append(
        table(
            ["where", "MB", "blocks"],
            [[t["where"], mb(t["bytes"]), f"{t['blocks']:,}"] for t in tr["top_lines"]],
        )
    )
    p = result["pipeline"]
    out.append("")
    out.append(
        f"Pipeline._process, {p['events']:,} events in batches of {p['batch']}, "
        f"{p['staging_share']:.0%} staging, "
        + (f"rules engine on ({', '.join(p['rules'])})" if p["rules"] else "no rules engine")
        + " (interleaved repetitions)"
    )
    rows = []
    for rep in p["reps"]:
        s = rep.get("index_stats", {})
        rows.append(
            [
                rep["variant"],
                f"{rep['wall_s']:.2f}",
                f"{rep['events_per_s']:,.0f}",
                f"{rep['cpu_events_per_s']:,.0f}",
                f"{rep['voluntary_switches']:,}",
                f"{rep['involuntary_switches']:,}",
                f"{s['hashes']:,}" if s else "",
                mb(s["hashed_bytes"]) if s else "",
                f"{s['budget_denied']:,}" if s else "",
            ]
        )
    out.append(
        table(
            [
                "variant",
                "wall s",
                "events/s",
                "CPU events/s",
                "vol cs",
                "invol cs",
                "hashes",
                "hashed MB",
                "denied",
            ],
            rows,
        )
    )

    def verdict(ratio: float) -> str:
        return "OK" if ratio >= GOAL_RATIO else "UNDER"

    out.append(
        f"wall: best bare {p['bare_events_per_s']:,.0f} events/s, best enriched "
        f"{p['enriched_events_per_s']:,.0f} events/s, ratio {p['ratio']:.3f} "
        f"(goal >= {GOAL_RATIO}): {verdict(p['ratio'])}; "
        f"enrichment costs {p['enrichment_us_per_event']:.2f} us/event"
    )
    cpu_cost = (1 / p["enriched_cpu_events_per_s"] - 1 / p["bare_cpu_events_per_s"]) * 1e6
    out.append(
        f"CPU:  best bare {p['bare_cpu_events_per_s']:,.0f} events/s, best enriched "
        f"{p['enriched_cpu_events_per_s']:,.0f} events/s, ratio {p['cpu_ratio']:.3f}: "
        f"{verdict(p['cpu_ratio'])}; enrichment costs {cpu_cost:.2f} us/event "
        "(steadier when the machine is loaded: see invol cs)"
    )
    c = p["enriched_counters"]
    out.append(
        f"events that triggered hashing: {p['hashing_events']:,} ({p['hashing_share']:.2%}); "
        f"copies {c.get('copies', 0):,}, archives {c.get('archives', 0):,}, "
        f"disguised {c.get('disguised', 0):,} per enriched pass"
    )
    out.append("")
    out.append("Breakdown per event class (one enriched pass, each Destinations call timed)")
    rows = []
    for cls, r in sorted(p["breakdown"].items()):
        ev = int(r["events"])
        rows.append(
            [
                cls,
                f"{ev:,}",
                f"{r['seconds'] / ev * 1e6:.1f}",
                f"{r['seconds']:.3f}",
                f"{int(r['hashing_events']):,}",
                f"{int(r['hashes']):,}",
                mb(r["bytes"]),
                f"{int(r['origins']):,}",
                f"{int(r['archives']):,}",
                f"{int(r['disguised']):,}",
            ]
        )
    out.append(
        table(
            [
                "class",
                "events",
                "us/event",
                "total s",
                "hashing ev",
                "hashes",
                "hashed MB",
                "origins",
                "archives",
                "disguised",
            ],
            rows,
        )
    )
    out.append(
        "in-process index builds before the enriched repetitions: "
        + ", ".join(f"{s:.2f} s" for s in p["index_build_in_process_s"])
    )
    if p["health_records"]:
        out.append(f"health records: {', '.join(sorted(set(p['health_records'])))}")
    if p.get("profile"):
        out.append("")
        out.append("Profile of one enriched pass (cProfile, by tottime)")
        out.append(p["profile"].rstrip())
    return "\n".join(out)


# main ------------------------------------------------------------------------------------


def parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    ap.add_argument("--dir", default=DEFAULT_DIR, help="persistent directory for the trees")
    ap.add_argument("--files", type=int, default=None, help="tagged files (default 100,000)")
    ap.add_argument("--events", type=int, default=None, help="events (default 200,000)")
    ap.add_argument("--quick", action="store_true", help="20,000 files, 50,000 events")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of each variant")
    ap.add_argument("--index-runs", type=int, default=2, help="index build child processes")
    ap.add_argument("--batch", type=int, default=256, help="raw events per batch")
    ap.add_argument("--staging-share", type=float, default=0.08)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile one enriched pass")
    ap.add_argument(
        "--rules",
        action="append",
        default=None,
        metavar="PATH",
        help="also run the rules engine with these rules in both variants (e.g. rules/)",
    )
    ap.add_argument("--json", nargs="?", const="-", default=None, help="JSON to stdout, or to FILE")
    args = ap.parse_args(argv)
    if args.files is None:
        args.files = 20_000 if args.quick else 100_000
    if args.events is None:
        args.events = 50_000 if args.quick else 200_000
    return args


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "_index":
        print(json.dumps(index_child(argv[1], "--trace" in argv[2:])))
        return 0
    args = parse(argv)
    base = os.path.abspath(args.dir)
    tree = f"{base}/tree-{args.files}"
    plan = tree_plan(args.files, args.seed)
    reused = ensure_tree(tree, plan)
    progress(f"tagged tree {tree}: {'reused' if reused else 'built'}")
    staging = ensure_staging(f"{base}/staging-{args.files}", staging_plan(tree, plan, args.seed))
    load1 = os.getloadavg()[0]
    runs = []
    for i in range(args.index_runs):
        progress(f"index build, child {i + 1}/{args.index_runs}")
        runs.append(run_index_child(tree, trace=False))
    progress("index build with tracemalloc, child")
    traced = run_index_child(tree, trace=True)
    progress(f"building {args.events:,} events")
    events, kind_of = make_events(tree, plan, staging, args.events, args.staging_share, args.seed)
    del plan
    pipe = run_pipeline(args, tree, staging, events, kind_of)
    result: dict[str, Any] = {
        "meta": {
            "files": args.files,
            "events": args.events,
            "dir": base,
            "tree_reused": reused,
            "cpus": os.cpu_count(),
            "load1": load1,
            "load1_end": os.getloadavg()[0],
            "python": sys.version.split()[0],
        },
        "index": {"runs": runs, "traced": traced},
        "pipeline": pipe,
    }
    emit(result, args.json, lambda: print(report(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
