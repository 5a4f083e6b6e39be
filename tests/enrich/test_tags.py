"""Tags from the config and from marker files: merging, live changes, bad markers, and
sticky tags (the store under state_dir that keeps them when a marker goes)."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msgspec.structs import replace as evolve

from agent.config import WatchSpec
from agent.enrich.marker_state import MAX_TAGS, STORE_NAME, forget, read_store
from agent.enrich.tags import MAX_RESOLVED_TAGS, TagResolver, parse_marker, read_marker
from agent.events import Event
from agent.health import CapReporter
from agent.service import Agent
from tests.conftest import Collector, make_config

MARKER = ".exfilwatch.yaml"


def resolver(
    specs: list[WatchSpec], reports: list[dict[str, Any]], state: Path | None = None, **kw: Any
) -> TagResolver:
    return TagResolver(
        specs,
        MARKER,
        reports.append,
        CapReporter(reports.append),
        state_dir=str(state) if state is not None else None,
        **kw,
    )


def of(reports: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [r for r in reports if r["event"]["action"] == action]


def attempted(reports: list[dict[str, Any]]) -> list[list[str]]:
    return [r["exfilwatch"]["health"]["attempted"] for r in of(reports, "marker_tampered")]


class Tree:
    """A tagged tree with a marker in `proj`, looked at once (so the store knows it)."""

    def __init__(self, tmp: Path, text: str = "tags: [crown-jewels]\nsensitivity: critical\n"):
        self.root = tmp / "rnd"
        self.proj = self.root / "proj"
        self.proj.mkdir(parents=True)
        self.marker = self.proj / MARKER
        self.marker.write_text(text)
        self.state = tmp / "state"
        self.reports: list[dict[str, Any]] = []
        self.r = self.start()
        assert "crown-jewels" in self.tags()

    def start(self) -> TagResolver:
        """A new resolver on the same state_dir: what an agent restart does."""
        self.r = resolver([WatchSpec(str(self.root), ("rnd",))], self.reports, self.state)
        return self.r

    def tags(self, directory: Path | None = None) -> tuple[str, ...]:
        return self.r.resolve_dir(str(directory or self.proj)).tags

    def sensitivity(self) -> str | None:
        return self.r.resolve_dir(str(self.proj)).sensitivity

    def changed(self, by: Event | None = None) -> None:
        self.r.marker_changed(str(self.proj), by)


def test_markers_add_tags_down_the_tree_and_sensitivity_is_the_highest(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    (root / "chip" / "rtl").mkdir(parents=True)
    (root / "chip" / ".exfilwatch.yaml").write_text("tags: [chip-design]\nsensitivity: high\n")
    (root / "chip" / "rtl" / ".exfilwatch.yaml").write_text("tags: [rtl]\nsensitivity: low\n")
    r = resolver([WatchSpec(str(root), ("rnd",), "medium")], [])
    assert r.resolve_dir(str(root)).tags == ("rnd",)
    deep = r.resolve_dir(str(root / "chip" / "rtl"))
    assert deep.tags == ("rnd", "chip-design", "rtl")
    assert deep.sensitivity == "high"  # a lower marker can never lower it
    assert deep.root == str(root)


def test_nested_watch_entries_merge_and_the_deepest_is_the_root(tmp_path: Path) -> None:
    outer = tmp_path / "rnd"
    inner = outer / "models"
    inner.mkdir(parents=True)
    r = resolver(
        [WatchSpec(str(inner), ("weights",), "critical"), WatchSpec(str(outer), ("rnd",))], []
    )
    got = r.resolve_dir(str(inner / "v2"))
    assert got.tags == ("rnd", "weights")
    assert got.sensitivity == "critical"
    assert got.root == str(inner)
    assert r.resolve_dir(str(tmp_path / "elsewhere")).tags == ()


def test_a_bad_marker_edit_keeps_the_last_good_one_and_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    root.mkdir()
    marker = root / ".exfilwatch.yaml"
    marker.write_text("tags: [secret]\n")
    reports: list[dict[str, Any]] = []
    r = resolver([WatchSpec(str(root))], reports)
    assert r.resolve_dir(str(root)).tags == ("secret",)
    marker.write_text("tags: [secret\nsensitivity: hgih\n")
    r.marker_changed(str(root))
    assert r.resolve_dir(str(root)).tags == ("secret",)
    rejected = [x for x in reports if x["event"]["action"] == "marker_rejected"]
    assert rejected and rejected[0]["exfilwatch"]["health"]["kept_previous"] is True
    problem = rejected[0]["exfilwatch"]["health"]["problems"][0]
    assert problem.startswith(f"{marker}:") and "MRK_YAML_PARSE" in problem


def test_marker_problems_are_located_with_a_hint() -> None:
    marker, problems = parse_marker("tags: [a]\nsensitivty: high\n", "m.yaml")
    assert marker is None
    assert str(problems[0]) == (
        "m.yaml:2:1 MRK_UNKNOWN_KEY unknown key 'sensitivty' in marker "
        "(hint: did you mean 'sensitivity'?)"
    )


def test_marker_symlinks_and_fifos_are_refused_without_blocking(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:x:0:0\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(secret)
    marker, problems = read_marker(str(link))
    assert marker is None and problems[0].code == "MRK_NOT_FILE"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    marker, problems = read_marker(str(fifo))
    assert marker is None and problems[0].code == "MRK_NOT_FILE"


def test_adding_editing_and_removing_a_marker_takes_effect_live(
    tmp_path: Path, run_agent: Callable[..., Agent], collector: Collector
) -> None:
    root = tmp_path / "rnd"
    (root / "proj").mkdir(parents=True)
    run_agent(make_config([WatchSpec(str(root), ("rnd",))], tmp_path))
    marker = root / "proj" / ".exfilwatch.yaml"
    marker.write_text("tags: [crown-jewels]\nsensitivity: critical\n")
    assert collector.wait_for(lambda c: bool(c.health("marker_loaded")))
    (root / "proj" / "a.txt").write_text("x")
    collector.wait_event("closed_write", root / "proj" / "a.txt", tags=("rnd", "crown-jewels"))
    # An atomic replace (write elsewhere, rename into place), as editors and config tools do:
    # the new tags are added at once; the old ones stay (sticky), and that is an attempt.
    tmp = root / "proj" / ".marker.new"
    tmp.write_text("tags: [export-controlled]\n")
    tmp.rename(marker)
    both = ("rnd", "crown-jewels", "export-controlled")
    (root / "proj" / "b.txt").write_text("x")
    collector.wait_event("closed_write", root / "proj" / "b.txt", tags=both, sensitivity="critical")
    marker.unlink()
    assert collector.wait_for(
        lambda c: any(
            r["exfilwatch"]["health"]["attempted"] == ["deleted"]
            for r in c.health("marker_tampered")
        )
    )
    (root / "proj" / "c.txt").write_text("x")
    collector.wait_event("closed_write", root / "proj" / "c.txt", tags=both, sensitivity="critical")
    replaced = collector.health("marker_tampered")[0]
    assert replaced["event"]["kind"] == "alert" and replaced["log"]["level"] == "error"
    assert replaced["exfilwatch"]["health"]["attempted"] == ["tags_removed", "sensitivity_lowered"]
    assert not collector.health("marker_removed")
    stored, _ = read_store(str(tmp_path / "state" / STORE_NAME))
    assert stored is not None and stored[str(root / "proj")].tags == both[1:]


# --- sticky tags -----------------------------------------------------------------------------


def test_deleting_a_marker_keeps_its_tags_and_names_who_did_it(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t.marker.unlink()
    by = Event(0, "deleted", str(t.marker), user_name="mallory", user_id="1001")
    t.changed(evolve(by, process_pid=4242, process_name="rm", attribution="inferred"))
    assert t.tags() == ("rnd", "crown-jewels") and t.sensitivity() == "critical"
    [rec] = of(t.reports, "marker_tampered")
    assert rec["event"]["reason"] == "deleted" and rec["event"]["type"] == ["deletion"]
    assert rec["user"] == {"name": "mallory", "id": "1001"}
    assert rec["process"] == {"pid": 4242, "name": "rm"}
    assert rec["exfilwatch"]["attribution"] == {"confidence": "inferred"}
    health = rec["exfilwatch"]["health"]
    assert health["kept_tags"] == ["crown-jewels"] and health["kept_sensitivity"] == "critical"
    assert health["directory"] == str(t.proj) and health["noticed"] == "change"
    assert rec["file"]["path"] == str(t.marker)


def test_stored_tags_survive_a_restart_and_a_removal_while_stopped_is_reported_once(
    tmp_path: Path,
) -> None:
    t = Tree(tmp_path)
    t.marker.unlink()  # while "the agent is down": no marker_changed
    t.start()
    assert t.tags() == ("rnd", "crown-jewels") and t.sensitivity() == "critical"
    [rec] = of(t.reports, "marker_tampered")
    assert rec["exfilwatch"]["health"]["noticed"] == "lookup" and "user" not in rec
    t.start()  # the store says this attempt was reported: not again at the next start
    assert t.tags() == ("rnd", "crown-jewels")
    assert len(of(t.reports, "marker_tampered")) == 1


def test_an_invalid_edit_keeps_the_tags_and_is_an_attempt(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t.marker.write_text("tags: [crown-jewels\n")
    t.changed()
    assert t.tags() == ("rnd", "crown-jewels") and t.sensitivity() == "critical"
    assert attempted(t.reports) == [["invalid"]]
    assert of(t.reports, "marker_rejected")[0]["exfilwatch"]["health"]["kept_tags"] == [
        "crown-jewels"
    ]


def test_a_marker_swapped_for_a_symlink_or_a_fifo_keeps_the_tags_without_blocking(
    tmp_path: Path,
) -> None:
    t = Tree(tmp_path)
    fake = tmp_path / "fake.yaml"
    fake.write_text("tags: []\n")
    t.marker.unlink()
    t.marker.symlink_to(fake)
    t.changed()
    assert t.tags() == ("rnd", "crown-jewels")
    t.marker.unlink()
    os.mkfifo(t.marker)
    done = threading.Event()

    def look() -> None:
        t.changed(Event(0, "created", str(t.marker)))  # a FIFO is never "still being written"
        done.set()

    worker = threading.Thread(target=look)
    worker.start()
    worker.join(5)
    assert done.is_set(), "reading a FIFO marker blocked"
    assert t.tags() == ("rnd", "crown-jewels")
    assert attempted(t.reports) == [["not_a_regular_file"], ["not_a_regular_file"]]


def test_fewer_tags_or_a_lower_sensitivity_keep_what_was_stored_and_new_tags_still_add(
    tmp_path: Path,
) -> None:
    t = Tree(tmp_path, "tags: [crown-jewels, tapeout]\nsensitivity: critical\n")
    t.marker.write_text("tags: [tapeout, q3]\nsensitivity: low\n")
    t.changed()
    assert t.tags() == ("rnd", "crown-jewels", "tapeout", "q3") and t.sensitivity() == "critical"
    [rec] = of(t.reports, "marker_tampered")
    health = rec["exfilwatch"]["health"]
    assert health["attempted"] == ["tags_removed", "sensitivity_lowered"]
    assert health["removed_tags"] == ["crown-jewels"] and health["marker_sensitivity"] == "low"
    # The tag added by the weaker marker is sticky too.
    t.marker.write_text("tags: [crown-jewels, tapeout]\nsensitivity: critical\n")
    t.changed()
    assert t.tags() == ("rnd", "crown-jewels", "tapeout", "q3")
    assert attempted(t.reports) == [["tags_removed", "sensitivity_lowered"], ["tags_removed"]]


def test_the_same_attempt_is_one_record_and_a_new_one_is_another(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t.marker.write_text("")  # created, then written: only the finished file is judged
    t.changed(Event(0, "created", str(t.marker)))
    assert not of(t.reports, "marker_tampered")
    t.changed(Event(0, "closed_write", str(t.marker)))
    t.changed(Event(0, "closed_write", str(t.marker)))  # the same content again
    assert attempted(t.reports) == [["tags_removed", "sensitivity_lowered"]]
    t.marker.write_text("owner: me\n")  # different content, same attempt: a new record
    t.changed()
    assert len(of(t.reports, "marker_tampered")) == 2
    t.marker.write_text("tags: [crown-jewels]\nsensitivity: critical\n")
    t.changed()  # restored: no record, and the next removal is reported again
    t.marker.unlink()
    t.changed()
    assert attempted(t.reports)[-1] == ["deleted"] and len(attempted(t.reports)) == 3


def test_a_bad_marker_then_mkdir_and_rmdir_keeps_the_tags(tmp_path: Path) -> None:
    """The cache is cleared when any directory goes; the store is not."""
    t = Tree(tmp_path)
    t.marker.write_text("tags: [\n")
    t.changed()
    (t.proj / "x").mkdir()
    (t.proj / "x").rmdir()
    t.r.tree_changed(str(t.proj / "x"))
    assert t.tags() == ("rnd", "crown-jewels") and t.sensitivity() == "critical"
    assert t.tags(t.proj / "deeper") == ("rnd", "crown-jewels")
    for _ in range(3):  # a loop of mkdir/rmdir floods nothing
        t.r.tree_changed(str(t.proj / "x"))
        assert t.tags() == ("rnd", "crown-jewels")
    assert attempted(t.reports) == [["invalid"]]  # looking again is not a new attempt
    assert len(of(t.reports, "marker_rejected")) == 1


def test_cache_caps_never_drop_stored_tags(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    dirs = [root / f"d{i}" for i in range(4)]
    for d in dirs:
        d.mkdir(parents=True)
        (d / MARKER).write_text(f"tags: [{d.name}]\n")
    reports: list[dict[str, Any]] = []
    r = resolver([WatchSpec(str(root), ("rnd",))], reports, tmp_path / "state", cache_cap=2)
    assert [r.resolve_dir(str(d)).tags for d in dirs] == [("rnd", d.name) for d in dirs]
    for d in dirs:
        (d / MARKER).unlink()
    for d in reversed(dirs):  # every look misses a cache of two
        assert r.resolve_dir(str(d / "sub")).tags == ("rnd", d.name)
    assert of(reports, "cap_reached")


def test_the_store_is_a_private_file_written_atomically(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    assert stat.S_IMODE(t.state.stat().st_mode) == 0o700
    path = t.state / STORE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["markers"][str(t.proj)]["tags"] == ["crown-jewels"]
    assert sorted(p.name for p in t.state.iterdir()) == [STORE_NAME, STORE_NAME + ".lock"]


def test_an_admin_forgets_a_stored_marker_and_a_reload_drops_it(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    other = t.root / "other"
    other.mkdir()
    (other / MARKER).write_text("tags: [keep-me]\n")
    assert t.tags(other) == ("rnd", "keep-me")
    t.marker.unlink()
    t.changed()
    assert forget(str(t.state), str(t.proj)) == [str(t.proj)]
    # Until the reload the agent keeps it, and its own writes do not bring it back.
    (other / MARKER).write_text("tags: [keep-me, more]\n")
    t.r.marker_changed(str(other))
    assert str(t.proj) not in (read_store(str(t.state / STORE_NAME))[0] or {})
    t.r.set_specs([WatchSpec(str(t.root), ("rnd",))])  # what SIGHUP does
    assert t.tags() == ("rnd",) and t.tags(other) == ("rnd", "keep-me", "more")
    [gone] = of(t.reports, "marker_forgotten")
    assert gone["exfilwatch"]["health"]["directory"] == str(t.proj)
    assert gone["exfilwatch"]["health"]["tags"] == ["crown-jewels"]


def test_a_moved_directory_keeps_its_stored_tags(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    moved = t.root / "renamed"
    t.proj.rename(moved)
    t.r.tree_changed(str(moved))
    t.r.tree_changed(str(t.proj))
    (moved / MARKER).unlink()
    t.r.marker_changed(str(moved))
    assert t.tags(moved) == ("rnd", "crown-jewels")
    assert attempted(t.reports) == [["deleted"]]
    stored, _ = read_store(str(t.state / STORE_NAME))
    assert stored is not None and stored[str(moved)].moved_from == str(t.proj)


def test_a_full_store_is_reported_and_the_marker_still_applies_while_present(
    tmp_path: Path,
) -> None:
    root = tmp_path / "rnd"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / MARKER).write_text(f"tags: [{name}]\n")
    reports: list[dict[str, Any]] = []
    r = resolver([WatchSpec(str(root))], reports, tmp_path / "state", store_cap=1)
    assert r.resolve_dir(str(root / "a")).tags == ("a",)
    assert r.resolve_dir(str(root / "b")).tags == ("b",)
    [cap] = of(reports, "cap_reached")
    assert cap["event"]["reason"] == "marker_store"
    assert cap["exfilwatch"]["health"]["directory"] == str(root / "b")


def test_a_corrupt_store_is_set_aside_and_reported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / STORE_NAME).write_text("{not json")
    reports: list[dict[str, Any]] = []
    resolver([WatchSpec(str(tmp_path))], reports, state)
    [rec] = of(reports, "source_error")
    assert rec["event"]["reason"] == "marker_store_invalid"
    assert rec["exfilwatch"]["health"]["moved_to"].startswith(str(state / STORE_NAME))
    assert not (state / STORE_NAME).exists()


def test_a_tampered_store_entry_is_left_out_not_turned_into_tags(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    entry = {"tags": ["ok"], "sensitivity": None, "first_seen": "t", "updated": "t"}
    bad = {**entry, "tags": ["\x1b[31mred"]}
    markers = {str(tmp_path / "a"): entry, str(tmp_path / "b"): bad, "relative": entry}
    (state / STORE_NAME).write_text(json.dumps({"version": 1, "markers": markers}))
    entries, problems = read_store(str(state / STORE_NAME))
    assert entries is not None and list(entries) == [str(tmp_path / "a")]
    assert len(problems) == 2


def test_markers_tag_tagged_trees_only_and_are_not_stored_elsewhere(tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    (usb / MARKER).write_text("tags: [secret]\n")
    reports: list[dict[str, Any]] = []
    r = resolver([WatchSpec(str(usb), location="removable")], reports, tmp_path / "state")
    r.marker_changed(str(usb))
    assert r.resolve_dir(str(usb)).tags == ()
    assert len(r.store) == 0


# --- caps ------------------------------------------------------------------------------------


def test_too_many_tags_is_a_located_problem() -> None:
    text = "tags:\n" + "".join(f"  - t{i}\n" for i in range(MAX_TAGS + 1))
    marker, problems = parse_marker(text, "m.yaml")
    assert marker is None
    assert str(problems[0]).startswith(f"m.yaml:{MAX_TAGS + 2}:5 MRK_TOO_MANY_TAGS")


def test_long_tags_and_odd_characters_are_located_problems() -> None:
    text = f"tags: [ok, {'x' * 65}, 'two words', 'caf\u00e9', 'a:b/c-d_e.f']\n"
    marker, problems = parse_marker(text, "m.yaml")
    assert marker is None
    assert [(p.line, p.col, p.code) for p in problems] == [
        (1, 12, "MRK_TAG_TOO_LONG"),
        (1, 79, "MRK_TAG_CHARS"),
        (1, 92, "MRK_TAG_CHARS"),
    ]
    ok, none = parse_marker("tags: ['a:b/c-d_e.f', Q3]\n", "m.yaml")
    assert ok is not None and ok.tags == ("a:b/c-d_e.f", "Q3") and not none


def test_a_marker_of_thousands_of_bad_tags_is_a_short_list_of_problems() -> None:
    text = "tags: [" + ", ".join(f"'bad tag {i}'" for i in range(9_500)) + "]\n"
    marker, problems = parse_marker(text, "m.yaml")
    assert marker is None
    assert problems[0].code == "MRK_TOO_MANY_TAGS" and len(problems) == 12
    assert "9490 more tags" in problems[-1].message


def test_nested_markers_cannot_make_a_huge_event(tmp_path: Path) -> None:
    root = tmp_path / "rnd"
    d = root
    for level in range(6):
        d = d / f"l{level}"
        d.mkdir(parents=True)
        tags = ", ".join(f"l{level}-{i}" for i in range(MAX_TAGS))
        (d / MARKER).write_text(f"tags: [{tags}]\n")
    reports: list[dict[str, Any]] = []
    r = resolver([WatchSpec(str(root), ("rnd",))], reports, tmp_path / "state")
    got = r.resolve_dir(str(d)).tags
    assert len(got) == MAX_RESOLVED_TAGS and got[:2] == ("rnd", "l0-0")
    assert of(reports, "cap_reached")[0]["event"]["reason"] == "resolved_tags"
