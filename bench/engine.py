"""Rule-engine benchmark: events/s of the shipped packs against ``json.loads`` of the same lines.

Usage, with the interpreter of the environment exfilwatch is installed in (``.venv/bin/python``
in a checkout)::

    python bench/engine.py --quick        # 100,000 events
    python bench/engine.py                # 1,000,000 events, 500 generated rules
    python bench/engine.py --json         # JSON on stdout instead of tables
    python bench/engine.py --profile      # also cProfile the shipped-packs run
    python bench/engine.py --per-action   # also engine vs json.loads per action
    python bench/engine.py --repeat 3 --generated 0 --no-memory   # steadier ratio

Progress goes to stderr; the result tables (or ``--json``) go to stdout.

Goals (from the issues): evaluating all shipped rules on an event costs no more than parsing
it, i.e. engine events/s / json.loads events/s >= 1.0, and memory stays under the configured
caps; shipped packs + every loadable SigmaHQ Linux rule (``--sigma DIR``) >= 0.8; shipped
packs + 1,000 generated rules (``--generated 1000``) >= 0.5. Rules are indexed by event.action
and location class, and within those by their gates (agent/rules/prefilter.py).

Event stream
    A seeded, deterministic mix (``--seed``), built once in memory as Event objects and
    serialized once to JSON lines with ``Event.to_json`` (each line checked to parse back to
    the same Event on a sample). 2,000 users on 400 hosts, picked with a Zipf weight (a few
    users do most of the work, as on a real file server), 1% of them on the departure
    watchlist; timestamps advance by an exponential gap of mean 500 us (2,000 events/s).
    About 84% is activity in five tagged trees (opened, closed_nowrite, closed_write,
    modified, created, deleted, moved, ...), with stat fields (size, uid, gid, inode, mode,
    mtime) as the pipeline fills them; 8% egress writes (removable media, cloud-sync folders,
    staging areas, network shares; half of them copies of tagged files with lineage, a few
    archives with tagged members or encrypted copies); 7% untagged home-directory activity;
    1% process_started (mostly ordinary programs, some upload, packing and shredding tools).
    File events carry attribution as agent.enrich.attribution fills it (where the Event has
    those fields): 70% with the process (50% exact, 20% inferred), 20% owner, 10% none.

Figures (each loop is a plain ``for`` over a pre-built list; gc stays enabled, the pre-built
data is frozen out of the collector with ``gc.freeze()`` so it does not tax either side)
    json.loads          ``json.loads(line)`` over the JSON lines: the baseline. It runs
                        before and after every other measurement; a row's ratio uses the
                        mean of the two runs around it, and the largest difference between
                        two neighbouring runs is shown as drift (the machine is noisy: read
                        ratios, and distrust a run with a large drift).
    engine, packs       ``Engine.process(event)`` over the pre-built Events, shipped packs.
    engine, packs+N     the same with N generated rules added (``--generated``, default 500:
                        varied single-event rules over many event.action values and the
                        modifiers contains/startswith/endswith/re/path/glob/expand/exists/gt,
                        some unindexed by action, and one correlation in 25), written to a
                        temporary directory and loaded with ``load_rules([rules/, tmp])``.
    from_json           ``Event.from_json(line)`` alone (to split the full path).
    full path           ``engine.process(Event.from_json(line))`` with the shipped packs.
    ratio               events/s of the row / events/s of json.loads (>= 1.0: the goal).

Memory (each case in a fresh child process, so the 1,000,000 pre-built events are not in it)
    groups              ``--groups`` distinct users (default 100,000) each read one tagged
                        file: exfil-tagged-read feeds exfil-bulk-read-tagged (value_count)
                        and exfil-read-then-egress (temporal_ordered), so each user opens one
                        group in each. Run with the default Caps (max_groups 100,000 per
                        correlation), with ``--small-cap`` (default 10,000), and with 1.5x the
                        groups under the default cap. Reported: groups held (total and per
                        correlation, read from the engine) against the cap, on_cap calls,
                        RSS before/after and the process's peak RSS (VmHWM), and in a
                        second child the tracemalloc bytes the engine retains and its peak.
    window              a few groups each fed max_events + 1 reads of one file (a build
                        tool re-reading a header): the per-group max_events cap and the
                        bytes one window item costs, extrapolated to the worst case the
                        default caps allow (max_groups x max_events per counting correlation).

Standard library and psutil only.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any

from common import MB, PYTHON, REPO, RULES_DIR, peak_rss_bytes, progress, rss_bytes

from agent.events import Event
from agent.rules.compiler import RuleSet, load_rules
from agent.rules.engine import Caps, Engine

T0_US = int(datetime(2025, 1, 6, 9, 0, tzinfo=UTC).timestamp()) * 1_000_000
MEAN_GAP_US = 500  # 2,000 events/s
N_USERS = 2_000
N_HOSTS = 400
FILES_PER_TREE = 4_000
BLOCKS = 50  # blk00 .. blk49 under each tagged tree


# ---------------------------------------------------------------------------------------------
# The event mix


@dataclass(frozen=True)
class Tree:
    root: str
    tags: tuple[str, ...]
    sensitivity: str
    extensions: tuple[str, ...]
    weight: int


TREES = (
    Tree("/srv/rnd/chip", ("chip-design",), "high", ("v", "sv", "vh", "sdc", "tcl"), 35),
    Tree("/srv/rnd/ml", ("model-weights", "crown-jewels"), "critical", ("py", "yaml", "pt"), 25),
    Tree("/srv/rnd/firmware", ("firmware",), "high", ("c", "h", "S", "ld", "bin"), 20),
    Tree("/srv/rnd/cad", ("mech-cad",), "medium", ("step", "stl", "dwg", "pdf"), 12),
    Tree("/srv/legal/patents", ("patents", "legal"), "high", ("docx", "pdf", "md"), 8),
)
TREE_CUM = list(accumulate(t.weight for t in TREES))

# (action, weight) inside tagged and home trees: reads are open + close_nowrite, writes are
# open + modify (often several) + close_write.
TREE_ACTIONS = (
    ("opened", 30),
    ("closed_nowrite", 26),
    ("modified", 14),
    ("closed_write", 11),
    ("created", 5),
    ("deleted", 5),
    ("moved", 3),
    ("attributes_changed", 3),
    ("moved_out", 1),
    ("moved_in", 2),
)
TREE_ACTION_NAMES = [a for a, _ in TREE_ACTIONS]
TREE_ACTION_CUM = list(accumulate(w for _, w in TREE_ACTIONS))
NO_STAT = frozenset({"deleted", "moved_out"})  # as agent.pipeline: no lstat for these

EGRESS = (("removable", 25), ("cloud_sync", 25), ("staging", 35), ("network_share", 15))
EGRESS_NAMES = [c for c, _ in EGRESS]
EGRESS_CUM = list(accumulate(w for _, w in EGRESS))
EGRESS_ACTIONS = ("closed_write",) * 14 + ("moved_in",) * 2 + ("moved", "opened", "modified")
PROVIDERS = (("dropbox", "Dropbox"), ("gdrive", "Google Drive"), ("onedrive", "OneDrive"))

PROCESSES = (
    ("bash", 20),
    ("python3", 15),
    ("make", 10),
    ("gcc", 10),
    ("git", 10),
    ("vim", 8),
    ("cp", 6),
    ("less", 6),
    ("rsync", 3),
    ("scp", 2),
    ("rclone", 1),
    ("curl", 2),
    ("tar", 3),
    ("zip", 1),
    ("gpg", 1),
    ("7z", 1),
    ("shred", 1),
)
PROCESS_NAMES = [p for p, _ in PROCESSES]
PROCESS_CUM = list(accumulate(w for _, w in PROCESSES))
# Programs a file event is attributed to (fanotify or the process table).
FILE_TOOLS = ("vim", "python3", "cp", "rsync", "make", "gcc", "code", "cat", "git", "tar")
# Attribution fields exist from the attribution commit on; older trees run without them.
ATTRIBUTION = "attribution" in Event.__struct_fields__


class Population:
    """Users, hosts and file pools, fixed by the seed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.hosts = [f"ws-{h:03d}.corp.example" for h in range(N_HOSTS)]
        self.users = [f"u{u:04d}" for u in range(N_USERS)]
        self.user_ids = {u: str(10_000 + i) for i, u in enumerate(self.users)}
        self.home_host = {u: self.hosts[rng.randrange(N_HOSTS)] for u in self.users}
        self.departing = frozenset(rng.sample(self.users, N_USERS // 100))
        order = self.users[:]
        rng.shuffle(order)  # Zipf rank independent of the name
        self.user_order = order
        self.user_cum = list(accumulate(1.0 / (rank + 1) for rank in range(N_USERS)))
        self.files: list[list[str]] = []
        self.inodes: dict[str, str] = {}
        inode = 4_000_000
        for tree in TREES:
            paths = []
            for n in range(FILES_PER_TREE):
                ext = tree.extensions[n % len(tree.extensions)]
                path = f"{tree.root}/blk{n % BLOCKS:02d}/unit{n // BLOCKS}/f{n}.{ext}"
                paths.append(path)
                inode += 1
                self.inodes[path] = str(inode)
            self.files.append(paths)

    def user(self) -> str:
        return self.rng.choices(self.user_order, cum_weights=self.user_cum)[0]

    def tree(self) -> int:
        return self.rng.choices(range(len(TREES)), cum_weights=TREE_CUM)[0]


def make_events(n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    pop = Population(rng)
    choices = rng.choices
    ts = T0_US
    out: list[Event] = []
    for seq in range(1, n + 1):
        ts += 1 + int(rng.expovariate(1.0 / MEAN_GAP_US))
        user = pop.user()
        common: dict[str, Any] = {
            "timestamp_us": ts,
            "sequence": seq,
            "hostname": pop.home_host[user],
            "user_name": user,
            "user_id": pop.user_ids[user],
            "watchlist": "departing" if user in pop.departing else None,
        }
        r = rng.random()
        if r < 0.84:
            ti = pop.tree()
            tree = TREES[ti]
            path = rng.choice(pop.files[ti])
            action = choices(TREE_ACTION_NAMES, cum_weights=TREE_ACTION_CUM)[0]
            fields: dict[str, Any] = {
                "action": action,
                "path": path,
                "tags": tree.tags,
                "sensitivity": tree.sensitivity,
                "root": tree.root,
            }
            if action == "moved":
                stem = path.rsplit(".", 1)[0]
                fields["src_path"] = path
                if rng.random() < 0.05:  # renamed to hide what it is
                    fields["path"] = stem + ".jpg"
                    fields["disguise"] = ("extension_changed",)
                else:
                    fields["path"] = stem + "_v2." + path.rsplit(".", 1)[1]
            size_zero = action == "closed_write" and rng.random() < 0.005
            _stat(fields, pop, rng, ts, zero=size_zero)
        elif r < 0.92:
            fields = _egress(pop, rng, user, ts)
        elif r < 0.99:
            action = choices(TREE_ACTION_NAMES, cum_weights=TREE_ACTION_CUM)[0]
            kind = rng.choice(("notes", "src", "work", ".config/app"))
            name = f"{rng.choice(('todo', 'main', 'draft', 'cfg'))}{rng.randrange(300)}"
            ext = rng.choice(("txt", "py", "md", "json", "log"))
            fields = {"action": action, "path": f"/home/{user}/{kind}/{name}.{ext}"}
            _stat(fields, pop, rng, ts, zero=False)
        else:
            fields = _process(pop, rng, user)
        if ATTRIBUTION and fields["action"] != "process_started":
            _attribute(fields, rng, user, common["user_id"])
        out.append(Event(**common, **fields))
    return out


def _stat(fields: dict[str, Any], pop: Population, rng: random.Random, ts: int, zero: bool) -> None:
    if fields["action"] in NO_STAT:
        return
    path = fields["path"]
    fields["file_type"] = "file"
    fields["size"] = 0 if zero else int(rng.lognormvariate(10, 2))
    fields["uid"] = "10042"
    fields["gid"] = "5000"
    fields["inode"] = pop.inodes.get(path) or str(9_000_000 + (zlib.crc32(path.encode()) & 0xFFFFF))
    fields["mode"] = "0640"
    fields["mtime_us"] = ts - rng.randrange(1_000_000)


def _egress(pop: Population, rng: random.Random, user: str, ts: int) -> dict[str, Any]:
    cls = rng.choices(EGRESS_NAMES, cum_weights=EGRESS_CUM)[0]
    action = rng.choice(EGRESS_ACTIONS)
    fields: dict[str, Any] = {"action": action, "location": cls}
    copy = rng.random() < 0.5
    if copy:
        ti = pop.tree()
        origin = rng.choice(pop.files[ti])
        name = origin.rsplit("/", 1)[1]
        fields["lineage_origin"] = origin
        fields["lineage_tags"] = TREES[ti].tags
    else:
        name = f"{rng.choice(('report', 'photo', 'invoice', 'slides'))}{rng.randrange(500)}.pdf"
    special = rng.random()
    if special < 0.03:
        name = f"backup{rng.randrange(100)}.zip"
        fields["archive_tagged"] = rng.randrange(400) if copy else 0
    elif special < 0.05:
        name += ".gpg"
        fields["disguise"] = ("encrypted",)
    if cls == "removable":
        path = f"/media/{user}/KINGSTON/{rng.choice(('rtl', 'docs', 'x'))}/{name}"
    elif cls == "cloud_sync":
        provider, folder = rng.choice(PROVIDERS)
        fields["location_provider"] = provider
        path = f"/home/{user}/{folder}/{name}"
    elif cls == "staging":
        path = rng.choice((f"/tmp/{name}", f"/home/{user}/Downloads/{name}"))
        if rng.random() < 0.2:
            path = f"/home/{user}/.cache/x{rng.randrange(9)}/{name}"
    else:
        path = f"/mnt/share/{rng.choice(('eng', 'ops', 'sales'))}/{name}"
    fields["path"] = path
    if action == "moved":
        fields["src_path"] = f"/home/{user}/{name}"
    _stat(fields, pop, rng, ts, zero=False)
    return fields


def _attribute(fields: dict[str, Any], rng: random.Random, user: str, uid: str) -> None:
    """Who did it, as agent.enrich.attribution fills it: most events carry the process (exact
    from fanotify, or inferred from the process table), some only an owner or console user."""
    r = rng.random()
    if r < 0.7:
        name = rng.choice(FILE_TOOLS)
        pid = 100_000 + (int(uid) * 7 + FILE_TOOLS.index(name)) % 900_000
        fields.update(
            process_pid=pid,
            process_name=name,
            process_executable=f"/usr/bin/{name}",
            process_command_line=f"{name} {fields['path']}",
            process_working_directory=f"/home/{user}",
            process_parent_pid=pid - 1,
            process_parent_name="bash",
            user_login_name=user,
            user_login_id=uid,
            attribution="exact" if r < 0.5 else "inferred",
            attribution_method="fanotify" if r < 0.5 else "cmdline",
        )
    elif r < 0.9:
        fields.update(attribution="inferred", attribution_method="owner")
    else:
        fields["attribution"] = "none"


def _process(pop: Population, rng: random.Random, user: str) -> dict[str, Any]:
    name = rng.choices(PROCESS_NAMES, cum_weights=PROCESS_CUM)[0]
    fields: dict[str, Any] = {
        "action": "process_started",
        "category": "process",
        "process_pid": rng.randrange(1_000, 4_000_000),
        "process_name": name,
        "process_executable": f"/usr/bin/{name}",
        "process_parent_name": "bash",
    }
    if rng.random() < 0.7:
        ti = pop.tree()
        tree = TREES[ti]
        target = rng.choice(pop.files[ti]).rsplit("/", 2)[0]
        fields.update(tags=tree.tags, sensitivity=tree.sensitivity, root=tree.root)
    else:
        target = f"/home/{user}/src"
    fields["path"] = target
    fields["process_command_line"] = f"{name} -v {target}"
    return fields


def describe_mix(events: Sequence[Event]) -> dict[str, Any]:
    actions: dict[str, int] = {}
    tagged = egress = lineage = 0
    for e in events:
        actions[e.action] = actions.get(e.action, 0) + 1
        tagged += bool(e.tags)
        egress += e.location is not None
        lineage += bool(e.lineage_tags)
    n = len(events) or 1
    return {
        "actions": dict(sorted(actions.items(), key=lambda kv: -kv[1])),
        "tagged_pct": round(100 * tagged / n, 1),
        "egress_pct": round(100 * egress / n, 1),
        "lineage_pct": round(100 * lineage / n, 1),
        "users": len({e.user_name for e in events}),
        "hosts": len({e.hostname for e in events}),
        "seconds_of_activity": round((events[-1].timestamp_us - events[0].timestamp_us) / 1e6, 1)
        if events
        else 0,
    }


# ---------------------------------------------------------------------------------------------
# Generated rules

GEN_ACTIONS = (
    "created",
    "modified",
    "deleted",
    "moved",
    "moved_in",
    "moved_out",
    "opened",
    "closed_write",
    "closed_nowrite",
    "attributes_changed",
    "process_started",
)
LEVELS = ("informational", "low", "medium", "high", "critical")
CORRELATION_EVERY = 25  # one generated rule in 25 is a correlation over the two before it


def generated_rules(n: int, seed: int) -> str:
    """`n` rule documents as YAML text (JSON flow documents are YAML)."""
    rng = random.Random(seed * 7919 + 1)
    docs: list[dict[str, Any]] = []
    for i in range(n):
        rid = f"gen-{i:04d}"
        doc: dict[str, Any] = {
            "id": rid,
            "title": f"Generated rule {i}",
            "level": rng.choice(LEVELS),
            "status": "experimental",
            "author": "bench",
            "tags": ["attack.exfiltration"],
        }
        if i % CORRELATION_EVERY == CORRELATION_EVERY - 1 and i >= 2:
            doc["correlation"] = _gen_correlation(i, rng)
        else:
            doc["detection"] = _gen_detection(i, rng)
            if rng.random() < 0.5:
                doc["suppress"] = {"by": ["user.name"], "for": "10m"}
        docs.append(doc)
    return "\n---\n".join(json.dumps(d) for d in docs) + "\n"


def _gen_correlation(i: int, rng: random.Random) -> dict[str, Any]:
    rules = [f"gen-{i - 2:04d}", f"gen-{i - 1:04d}"]
    kind = ("event_count", "value_count", "temporal_ordered")[(i // CORRELATION_EVERY) % 3]
    corr: dict[str, Any] = {
        "type": kind,
        "rules": rules,
        "group-by": ["host.hostname", "user.name"],
        "timespan": f"{rng.choice((5, 10, 30))}m",
    }
    if kind == "event_count":
        corr["condition"] = {"gte": rng.choice((20, 50, 100))}
    elif kind == "value_count":
        corr["condition"] = {"gte": rng.choice((10, 30)), "field": "file.path"}
    return corr


def _gen_detection(i: int, rng: random.Random) -> dict[str, Any]:
    k = rng.randrange(BLOCKS)
    action = rng.choice(GEN_ACTIONS)
    tree = rng.choice(TREES)
    kind = i % 12
    sel: dict[str, Any]
    if kind == 0:
        sel = {"event.action": action, "file.path|startswith": f"{tree.root}/blk{k:02d}/"}
        return {"selection": sel, "condition": "selection"}
    if kind == 1:
        sel = {"event.action": action, "file.name|contains": [f"secret{k}", f"passw{k}"]}
        return {"selection": sel, "condition": "selection"}
    if kind == 2:
        sufs = [".key", ".pem", ".p12", ".kdbx", f"{k:02d}.{rng.choice(tree.extensions)}"]
        sel = {"event.action": [action, rng.choice(GEN_ACTIONS)], "file.path|endswith": sufs}
        return {"selection": sel, "condition": "selection and tagged_content"}
    if kind == 3:
        sel = {"file.path|re": f"^/srv/rnd/[a-z]+/blk{k:02d}/unit[0-9]*7/.*\\.(v|sv|py)$"}
        if rng.random() < 0.5:
            sel["event.action"] = action
        return {"selection": sel, "condition": "selection"}
    if kind == 4:
        sel = {"event.action": action, "file.path|path": f"{tree.root}/blk{k:02d}/unit{k}"}
        return {"selection": sel, "condition": "selection"}
    if kind == 5:
        ext = rng.choice(("zip", "tgz", "7z", "tar", "rar"))
        sel = {
            "event.action": ["closed_write", "moved_in"],
            "file.path|glob": [f"/home/*/Downloads/*{k}.{ext}", f"/media/*/*/**/*.{ext}"],
        }
        return {"selection": sel, "condition": "file_landed and selection"}
    if kind == 6:
        lst = rng.choice(("upload_tools", "packing_tools", "shred_tools"))
        sel = {
            "event.action": "process_started",
            "process.name|expand": f"%{lst}%",
            "process.command_line|contains": f"blk{k:02d}",
        }
        return {"selection": sel, "condition": "selection"}
    if kind == 7:
        sel = {
            "event.action": ["closed_write", "moved_in"],
            "exfilwatch.lineage.origin_tags|exists": True,
            "exfilwatch.location.class": rng.choice(EGRESS_NAMES),
            "file.extension": rng.choice(tree.extensions),
        }
        flt = {"user.name|startswith": ["svc-", f"u{k:02d}"]}
        return {"selection": sel, "filter": flt, "condition": "selection and not filter"}
    if kind == 8:
        sel = {
            "event.action": "closed_write",
            "file.size|gt": rng.choice((1, 10, 100)) * 1_000_000,
            "exfilwatch.location.class": ["removable", "cloud_sync"],
        }
        return {"selection": sel, "condition": "selection"}
    if kind == 9:
        return {
            "sel_ext": {"event.action": action, "file.extension": ["orig", "bak", "swp"]},
            "sel_name": {"event.action": action, "file.name|startswith": f"f{k}{k}."},
            "condition": "1 of sel_* and tagged_content",
        }
    if kind == 10:
        # No event.action: evaluated on every event, as many third-party rules are.
        sel = {
            "host.hostname|endswith": f"-{k:03d}.corp.example",
            "file.path|contains": ["/.ssh/", "/.gnupg/", f"/unit{k}/"],
        }
        return {"selection": sel, "condition": "selection"}
    sel = {
        "event.action": action,
        "user.name": [f"u{rng.randrange(N_USERS):04d}" for _ in range(5)],
        "exfilwatch.sensitivity": rng.choice(("high", "critical")),
    }
    return {"selection": sel, "condition": "selection"}


def load(
    generated: int, seed: int, tmp: str | None, extra: Sequence[str] = ()
) -> tuple[RuleSet, int]:
    """The shipped packs, plus `generated` rules in a file under `tmp` (written once), plus
    `extra` rule files or directories (SigmaHQ's, `--sigma`)."""
    paths = [RULES_DIR, *extra]
    if generated:
        assert tmp is not None
        path = os.path.join(tmp, "generated.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(generated_rules(generated, seed))
        paths.append(path)
    t = time.perf_counter()
    ruleset, problems = load_rules(paths, T0_US)
    elapsed = time.perf_counter() - t
    if ruleset is None:
        for p in problems[:20]:
            progress(f"  {p}")
        raise SystemExit("rules did not load")
    return ruleset, round(elapsed * 1000)


def ruleset_info(ruleset: RuleSet) -> dict[str, int]:
    unindexed = sum(1 for r in ruleset.rules.values() if r.actions is None)
    return {
        "rules": len(ruleset.rules),
        "correlations": len(ruleset.correlations),
        "unindexed": unindexed,
    }


# ---------------------------------------------------------------------------------------------
# Timed loops


def time_json(lines: Sequence[str]) -> float:
    loads = json.loads
    gc.collect()
    t = time.perf_counter()
    for line in lines:
        loads(line)
    return time.perf_counter() - t


def time_from_json(lines: Sequence[str]) -> float:
    from_json = Event.from_json
    gc.collect()
    t = time.perf_counter()
    for line in lines:
        from_json(line)
    return time.perf_counter() - t


def time_engine(ruleset: RuleSet, events: Sequence[Event]) -> tuple[float, dict[str, Any]]:
    engine = Engine(ruleset)
    process = engine.process
    gc.collect()
    t = time.perf_counter()
    for e in events:
        process(e)
    elapsed = time.perf_counter() - t
    return elapsed, engine.stats()


def time_full(ruleset: RuleSet, lines: Sequence[str]) -> tuple[float, dict[str, Any]]:
    engine = Engine(ruleset)
    process = engine.process
    from_json = Event.from_json
    gc.collect()
    t = time.perf_counter()
    for line in lines:
        process(from_json(line))
    elapsed = time.perf_counter() - t
    return elapsed, engine.stats()


@dataclass
class Row:
    name: str
    seconds: list[float]
    stats: dict[str, Any] | None = None

    def rate(self, n: int) -> float:
        return n / statistics.median(self.seconds)


def throughput(
    events: list[Event],
    lines: list[str],
    shipped: RuleSet,
    combined: RuleSet | None,
    generated: int,
    repeat: int,
    sigma: RuleSet | None = None,
) -> dict[str, Any]:
    rows = {
        "json": Row("json.loads (baseline)", []),
        "packs": Row("engine, shipped packs", []),
        "gen": Row(f"engine, packs + {generated} generated", []),
        "sigma": Row("engine, packs + Sigma rules", []),
        "from_json": Row("Event.from_json only", []),
        "full": Row("from_json -> engine (packs)", []),
    }
    ratios: dict[str, list[float]] = {k: [] for k in rows if k != "json"}
    drift: list[float] = []
    n = len(events)
    runs: list[tuple[str, Callable[[], tuple[float, dict[str, Any] | None]]]] = [
        ("packs", lambda: time_engine(shipped, events)),
    ]
    if combined is not None:
        gen = combined
        runs.append(("gen", lambda: time_engine(gen, events)))
    if sigma is not None:
        with_sigma = sigma
        runs.append(("sigma", lambda: time_engine(with_sigma, events)))
    runs += [
        ("from_json", lambda: (time_from_json(lines), None)),
        ("full", lambda: time_full(shipped, lines)),
    ]
    for rep in range(repeat):
        progress(f"repetition {rep + 1}/{repeat}")
        # json.loads before and after every measurement: each row's ratio uses the two
        # baseline runs next to it, so a burst of load from elsewhere skews one row at most.
        before = time_json(lines)
        progress(f"  {'json.loads':<36}{n / before:12,.0f} events/s")
        rows["json"].seconds.append(before)
        for key, run in runs:
            seconds, stats = run()
            after = time_json(lines)
            rows[key].seconds.append(seconds)
            if stats is not None:
                rows[key].stats = stats
            baseline = (before + after) / 2
            ratios[key].append(baseline / seconds)
            drift.append(abs(before - after) / baseline)
            ratio = baseline / seconds
            progress(f"  {rows[key].name:<36}{n / seconds:12,.0f} events/s  ratio {ratio:.2f}")
            progress(f"  {'json.loads':<36}{n / after:12,.0f} events/s")
            rows["json"].seconds.append(after)
            before = after
    out_rows = []
    for key, row in rows.items():
        if not row.seconds:
            continue
        rate = row.rate(n)
        ratio = 1.0 if key == "json" else statistics.median(ratios[key])
        entry: dict[str, Any] = {
            "key": key,
            "name": row.name,
            "events_per_s": round(rate),
            "us_per_event": round(1e6 / rate, 3),
            "ratio": round(ratio, 3),
            "seconds": [round(s, 3) for s in row.seconds],
            "ratios": [] if key == "json" else [round(r, 3) for r in ratios[key]],
        }
        if row.stats is not None:
            entry["alerts"] = row.stats["alerts"]
            entry["matched"] = row.stats["matched"]
            entry["groups"] = row.stats["groups"]
        out_rows.append(entry)
    return {"rows": out_rows, "baseline_drift_pct": round(100 * max(drift), 1)}


def profile(ruleset: RuleSet, events: Sequence[Event], top: int) -> str:
    engine = Engine(ruleset)
    process = engine.process
    prof = cProfile.Profile()
    prof.enable()
    for e in events:
        process(e)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def per_action(ruleset: RuleSet, events: Sequence[Event]) -> list[dict[str, Any]]:
    """Engine and json.loads time per event, by event.action (reads the engine's index)."""
    engine = Engine(ruleset)
    process = engine.process
    by: dict[str, list[Event]] = {}
    for e in events:
        by.setdefault(e.action, []).append(e)
    # Replay the stream in order so correlation state is as in the real run, but time each
    # event's process() in a batch per action: an event's cost does not depend on batching.
    loads = json.loads
    out = []
    spent: dict[str, float] = dict.fromkeys(by, 0.0)
    parse: dict[str, float] = dict.fromkeys(by, 0.0)
    clock = time.perf_counter
    for e in events:
        t = clock()
        process(e)
        spent[e.action] += clock() - t
    for action, evs in by.items():
        lines = [e.to_json() for e in evs]
        t = clock()
        for line in lines:
            loads(line)
        parse[action] = clock() - t
    total = sum(spent.values())
    for action, evs in sorted(by.items(), key=lambda kv: -spent[kv[0]]):
        out.append(
            {
                "action": action,
                "events": len(evs),
                "engine_us": round(1e6 * spent[action] / len(evs), 2),
                "json_us": round(1e6 * parse[action] / len(evs), 2),
                "share_of_engine_time_pct": round(100 * spent[action] / total, 1),
                "rules_indexed": len(engine._by_action.get(action, engine._any)),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Memory (child processes)


def memory_child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="engine.py _memory")
    ap.add_argument("--mode", choices=("groups", "window"), required=True)
    ap.add_argument("--groups", type=int, required=True)
    ap.add_argument("--max-groups", type=int, required=True)
    ap.add_argument("--max-events", type=int, default=Caps().max_events)
    ap.add_argument("--trace", action="store_true")
    a = ap.parse_args(argv)
    ruleset, _ = load(0, 0, None)
    hits: dict[str, int] = {}
    first_hit: dict[str, Any] = {}

    def on_cap(name: str, cap: int, data: dict[str, Any]) -> None:
        hits[name] = hits.get(name, 0) + 1
        first_hit.setdefault(name, {"cap": cap, **data})

    caps = Caps(max_groups=a.max_groups, max_events=a.max_events)
    engine = Engine(ruleset, caps=caps, on_cap=on_cap)
    tree = TREES[0]
    gc.collect()
    if a.trace:
        tracemalloc.start()
    rss0 = rss_bytes()
    traced0 = tracemalloc.get_traced_memory()[0] if a.trace else 0
    t = time.perf_counter()
    # Events are built in the loop and dropped after process(), as in the pipeline: whatever
    # stays allocated afterwards is held by the engine (paths, keys, windows, sequences).
    if a.mode == "groups":
        for i in range(a.groups):
            engine.process(
                Event(
                    timestamp_us=T0_US + i * 1_000,
                    action="closed_nowrite",
                    path=f"{tree.root}/blk{i % BLOCKS:02d}/unit{i // BLOCKS}/f{i}.v",
                    file_type="file",
                    size=4096 + i,
                    tags=tree.tags,
                    sensitivity=tree.sensitivity,
                    root=tree.root,
                    sequence=i + 1,
                    hostname=f"ws-{i % N_HOSTS:03d}.corp.example",
                    user_name=f"user{i:06d}",
                )
            )
        fed = a.groups
    else:
        per_group = a.max_events + 1
        fed = 0
        for g in range(a.groups):
            path = f"{tree.root}/include/common{g}.vh"
            for j in range(per_group):
                fed += 1
                engine.process(
                    Event(
                        timestamp_us=T0_US + j * 10_000,  # 10 ms apart: all inside 5 minutes
                        action="closed_nowrite",
                        path=path,
                        size=4096,
                        tags=tree.tags,
                        root=tree.root,
                        sequence=fed,
                        hostname="build-01.corp.example",
                        user_name=f"builder{g}",
                    )
                )
    elapsed = time.perf_counter() - t
    gc.collect()
    result: dict[str, Any] = {
        "mode": a.mode,
        "requested_groups": a.groups,
        "fed": fed,
        "max_groups": a.max_groups,
        "max_events": a.max_events,
        "seconds": round(elapsed, 2),
        "groups": engine.stats()["groups"],
        # stats() gives only the total; the per-correlation split shows the per-rule cap.
        "groups_by_correlation": {c: len(g) for c, g in engine._windows.items() if g},
        "cap_hits": hits,
        "first_hit": first_hit,
        "alerts": engine.stats()["alerts"],
        "rss_before": rss0,
        "rss_after": rss_bytes(),
        "peak_rss": peak_rss_bytes(),
    }
    if a.mode == "window":
        windows = engine._windows.get("exfil-bulk-read-tagged", {})
        result["items_per_group"] = sorted({len(w.items) for w in windows.values()})
    if a.trace:
        current, peak = tracemalloc.get_traced_memory()
        result["traced_retained"] = current - traced0
        result["traced_peak"] = peak - traced0
        tracemalloc.stop()
    print(json.dumps(result))
    return 0


def run_child(args: list[str]) -> dict[str, Any]:
    cmd = [PYTHON, os.path.abspath(__file__), "_memory", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"memory child failed: {' '.join(args)}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def memory(groups: int, small_cap: int, window_groups: int) -> dict[str, Any]:
    default = Caps()
    cases = [
        ("default caps", groups, default.max_groups),
        ("small cap", groups, small_cap),
        ("default caps, 1.5x groups", groups * 3 // 2, default.max_groups),
    ]
    out: list[dict[str, Any]] = []
    for name, n, cap in cases:
        progress(f"memory: {name}: {n:,} users, max_groups {cap:,}")
        base = ["--mode", "groups", "--groups", str(n), "--max-groups", str(cap)]
        plain = run_child(base)
        traced = run_child([*base, "--trace"])
        plain["case"] = name
        plain["traced_retained"] = traced["traced_retained"]
        plain["traced_peak"] = traced["traced_peak"]
        out.append(plain)
    progress(
        f"memory: window: {window_groups} groups x {default.max_events + 1:,} reads of one file"
    )
    win_args = [
        "--mode",
        "window",
        "--groups",
        str(window_groups),
        "--max-groups",
        str(default.max_groups),
    ]
    window = run_child(win_args)
    window_traced = run_child([*win_args, "--trace"])
    window["traced_retained"] = window_traced["traced_retained"]
    window["traced_peak"] = window_traced["traced_peak"]
    items = window_groups * default.max_events
    per_item = window["traced_retained"] / items if items else 0.0
    shipped, _ = load(0, 0, None)
    counting = sorted(
        cid
        for cid, c in shipped.correlations.items()
        if c.rule.correlation is not None
        and c.rule.correlation.type in ("value_count", "value_sum")
    )
    worst = per_item * default.max_events * default.max_groups * len(counting)
    window["bytes_per_item"] = round(per_item, 1)
    window["unbounded_counting_correlations"] = counting
    window["worst_case_bytes"] = round(worst)
    return {"groups": out, "window": window}


# ---------------------------------------------------------------------------------------------
# Output


def print_tables(result: dict[str, Any]) -> None:
    env = result["environment"]
    print(
        f"exfilwatch rule engine: {result['events']:,} events, seed {result['seed']}, "
        f"Python {env['python']}, {env['cpus']} CPUs, repeat {result['repeat']}, "
        f"load average {env['loadavg_start'][0]} at start, {env['loadavg_end'][0]} at end"
    )
    mix = result["mix"]
    top = ", ".join(f"{a} {100 * c / result['events']:.0f}%" for a, c in mix["actions"].items())
    print(
        f"mix: {mix['tagged_pct']}% tagged, {mix['egress_pct']}% egress "
        f"({mix['lineage_pct']}% with lineage), {mix['users']} users, {mix['hosts']} hosts, "
        f"{mix['seconds_of_activity']:,} s of activity"
    )
    print(f"     {top}")
    print(f"JSON line: mean {result['mean_line_bytes']:.0f} bytes")
    for key, info in result["rulesets"].items():
        print(
            f"rules ({key}): {info['rules']} single-event + {info['correlations']} correlations, "
            f"{info['unindexed']} not indexed by event.action; loaded in {info['load_ms']} ms"
        )
    print()
    head = (
        f"{'measure':<36}{'events/s':>12}{'us/event':>10}{'ratio':>8}"
        f"{'alerts':>9}{'matched':>10}{'groups':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in result["throughput"]["rows"]:
        extra = f"{r['alerts']:>9,}{r['matched']:>10,}{r['groups']:>9,}" if "alerts" in r else ""
        print(
            f"{r['name']:<36}{r['events_per_s']:>12,}{r['us_per_event']:>10.2f}"
            f"{r['ratio']:>8.2f}{extra}"
        )
    print(
        f"ratio = row events/s / events/s of the json.loads runs just before and after it "
        f"(median over repetitions); json.loads: median of all its runs, largest drift "
        f"between neighbouring runs {result['throughput']['baseline_drift_pct']}%"
    )
    if "per_action" in result:
        print()
        print("shipped packs, per event.action (one in-order pass timed per event):")
        head = (
            f"{'action':<20}{'events':>10}{'engine us':>11}{'json us':>9}{'share':>8}{'rules':>7}"
        )
        print(head)
        print("-" * len(head))
        for p in result["per_action"]:
            print(
                f"{p['action']:<20}{p['events']:>10,}{p['engine_us']:>11.2f}{p['json_us']:>9.2f}"
                f"{p['share_of_engine_time_pct']:>7.1f}%{p['rules_indexed']:>7}"
            )
        print("(per-event timing adds ~0.1 us of clock overhead to each engine figure)")
    mem = result.get("memory")
    if mem:
        print()
        print("memory, shipped packs: distinct users each read one tagged file")
        head = (
            f"{'case':<27}{'users':>9}{'cap/corr':>10}{'groups':>9}{'cap hits':>10}"
            f"{'RSS +MB':>9}{'peak MB':>9}{'traced MB':>11}{'t.peak MB':>11}{'B/group':>9}"
        )
        print(head)
        print("-" * len(head))
        for m in mem["groups"]:
            hits = sum(m["cap_hits"].values())
            per_group = m["traced_retained"] / m["groups"] if m["groups"] else 0
            print(
                f"{m['case']:<27}{m['fed']:>9,}{m['max_groups']:>10,}{m['groups']:>9,}"
                f"{hits:>10,}{(m['rss_after'] - m['rss_before']) / MB:>9.1f}"
                f"{m['peak_rss'] / MB:>9.1f}{m['traced_retained'] / MB:>11.1f}"
                f"{m['traced_peak'] / MB:>11.1f}{per_group:>9.0f}"
            )
            split = ", ".join(f"{c} {n:,}" for c, n in m["groups_by_correlation"].items())
            print(
                f"  per correlation: {split}; on_cap: {m['cap_hits'] or 'none'}; RSS before "
                f"(imports + shipped packs) {m['rss_before'] / MB:.1f} MB, {m['seconds']} s"
            )
        w = mem["window"]
        print(
            f"window cap: {w['requested_groups']} users fed {w['fed']:,} reads of one file: "
            f"items held per group {w['items_per_group']} (max_events {w['max_events']:,}), "
            f"on_cap {w['cap_hits']}"
        )
        print(
            f"  retained {w['traced_retained'] / MB:.1f} MB (tracemalloc) = "
            f"{w['bytes_per_item']:.0f} B per window item; worst case the default caps allow "
            f"({w['max_groups']:,} groups x {w['max_events']:,} items x "
            f"{len(w['unbounded_counting_correlations'])} value_count correlations): "
            f"{w['worst_case_bytes'] / 1024**3:,.0f} GiB"
        )
    if "profile" in result:
        print()
        print(result["profile"])


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_memory"]:
        return memory_child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the stream")
    ap.add_argument("--quick", action="store_true", help="100,000 events")
    ap.add_argument("--generated", type=int, default=500, help="generated rules to add")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="repetitions (medians are reported)")
    ap.add_argument("--groups", type=int, default=100_000, help="correlation groups to drive")
    ap.add_argument("--small-cap", type=int, default=10_000, help="max_groups of the cap run")
    ap.add_argument("--window-groups", type=int, default=20, help="groups of the window run")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    ap.add_argument("--per-action", action="store_true", help="engine cost per event.action")
    ap.add_argument("--profile", action="store_true", help="cProfile the shipped-packs run")
    ap.add_argument("--profile-events", type=int, default=200_000)
    ap.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    ap.add_argument(
        "--sigma",
        metavar="DIR",
        help="also time the shipped packs plus the Sigma rules in DIR (e.g. SigmaHQ's "
        "rules/linux; inactive ones are loaded and never run)",
    )
    a = ap.parse_args(argv)
    n = 100_000 if a.quick else a.events

    progress(f"building {n:,} events (seed {a.seed})")
    t = time.perf_counter()
    events = make_events(n, a.seed)
    lines = [e.to_json() for e in events]
    progress(f"  built and serialized in {time.perf_counter() - t:.1f} s")
    step = max(1, n // 2_000)
    for e, line in zip(events[::step], lines[::step], strict=True):
        if Event.from_json(line) != e:
            raise SystemExit(f"round trip mismatch: {line}")

    with tempfile.TemporaryDirectory(prefix="exfilwatch-bench-") as tmp:
        shipped, shipped_ms = load(0, a.seed, None)
        combined: RuleSet | None = None
        rulesets = {"shipped": {**ruleset_info(shipped), "load_ms": shipped_ms}}
        if a.generated:
            combined, combined_ms = load(a.generated, a.seed, tmp)
            rulesets[f"shipped + {a.generated} generated"] = {
                **ruleset_info(combined),
                "load_ms": combined_ms,
            }
        sigma: RuleSet | None = None
        if a.sigma:
            sigma, sigma_ms = load(0, a.seed, None, [a.sigma])
            rulesets["shipped + Sigma"] = {
                **ruleset_info(sigma),
                "inactive": len(sigma.inactive),
                "load_ms": sigma_ms,
            }

    gc.collect()
    gc.freeze()  # the pre-built data is long-lived: keep it out of every collection
    result: dict[str, Any] = {
        "events": n,
        "seed": a.seed,
        "repeat": a.repeat,
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "mix": describe_mix(events),
        "mean_line_bytes": sum(map(len, lines)) / n,
        "rulesets": rulesets,
    }
    result["throughput"] = throughput(
        events, lines, shipped, combined, a.generated, a.repeat, sigma
    )
    full, packs = (
        next(r for r in result["throughput"]["rows"] if r["key"] == k) for k in ("full", "packs")
    )
    if full["alerts"] != packs["alerts"]:
        progress(f"WARNING: alerts differ: pre-built {packs['alerts']}, from JSON {full['alerts']}")
    result["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if a.per_action:
        progress("per-action timing")
        result["per_action"] = per_action(shipped, events)
    if a.profile:
        progress(f"profiling the shipped packs over {min(n, a.profile_events):,} events")
        result["profile"] = profile(shipped, events[: a.profile_events], 25)
    if not a.no_memory:
        del events, lines
        gc.unfreeze()
        gc.collect()
        result["memory"] = memory(a.groups, a.small_cap, a.window_groups)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
