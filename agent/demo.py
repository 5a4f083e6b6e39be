"""`exfilwatch demo`: the agent on a workstation of its own, a scripted exfiltration, the
alerts as they arrive.

Everything lives in one temporary directory (a tagged R&D tree, a home with a sync folder, a
staging directory, the agent's config, state and logs), so the demo needs no root and is not
disturbed by a busy machine's /tmp: the agent watches only its own places. The steps are what
an engineer about to leave might do: copy the tree to a personal sync folder, pack it into an
archive in a staging place, disguise a design file as a holiday photo, and delete the tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from agent.config import data_dir, load

# What each step should raise (any one of its rules counts for the step).
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "copy the tagged tree to a personal Dropbox folder",
        ("exfil-cloud-sync-tagged-copy", "exfil-critical-cloud-sync-copy"),
    ),
    ("pack the tree into an archive in a staging directory", ("exfil-archive-of-tagged",)),
    ("disguise a chip design as a holiday photo", ("exfil-rename-disguise",)),
    ("delete the tree", ("destroy-mass-delete", "destroy-subtree-delete", "destroy-tagged-delete")),
)

CONFIG = """\
# The demo's own workstation (exfilwatch demo): every path is inside {base}.
watch:
  - path: {rnd}
    tags: [rnd, demo]
    sensitivity: high
rules: [{rules}]
sinks:
  - type: file
    path: {log}
    records: [alert, health]
state_dir: {state}
heartbeat_interval: 1h
locations:
  home_roots: [{homes}]
  staging_dirs: [{stage}]
  removable_patterns: []
processes:
  fanotify_dirs: "off"
"""


def _workstation(base: Path) -> dict[str, Path]:
    places = {
        "rnd": base / "rnd",
        "home": base / "home" / "alice",
        "stage": base / "stage",
        "state": base / "state",
        "log": base / "log" / "alerts.jsonl",
    }
    src = places["rnd"] / "src"
    chip = places["rnd"] / "chip"
    for d in (src, chip, places["home"] / "Dropbox", places["stage"], places["log"].parent):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        (src / f"mod{i:02d}.c").write_text(f"int mod{i}(void) {{ return {i}; }}\n" * (20 + i))
    for i in range(10):
        (chip / f"blk{i}.v").write_text(f"module blk{i}(input clk); endmodule\n" * (40 + i))
    config = base / "agent.yaml"
    config.write_text(
        CONFIG.format(
            base=base,
            rnd=places["rnd"],
            rules=data_dir() / "rules",
            log=places["log"],
            state=places["state"],
            homes=base / "home",
            stage=places["stage"],
        )
    )
    config.chmod(0o600)
    places["config"] = config
    return places


def _steps(places: dict[str, Path]) -> list[Callable[[], None]]:
    rnd, home, stage = places["rnd"], places["home"], places["stage"]

    def sync_copy() -> None:
        shutil.copytree(rnd / "src", home / "Dropbox" / "work-src")

    def archive() -> None:
        with tarfile.open(stage / "backup.tgz", "w:gz") as tar:
            tar.add(rnd / "chip", arcname="chip")

    def disguise() -> None:
        shutil.copy2(rnd / "chip" / "blk3.v", stage / "blk3.v")
        os.rename(stage / "blk3.v", stage / "holiday.jpg")

    def delete() -> None:
        shutil.rmtree(rnd / "src")

    return [sync_copy, archive, disguise, delete]


def run(out: IO[str] | None = None, timeout: float = 60.0, keep: bool = False) -> int:
    """The demo: 0 when every step raised its alert within `timeout`, else 1."""
    from agent.service import Agent
    from agent.sinks.pretty import colour_wanted, pretty_line

    out = out or sys.stdout
    colour = colour_wanted(out)
    base = Path(tempfile.mkdtemp(prefix="exfilwatch-demo-"))
    places = _workstation(base)
    print(f"exfilwatch demo: a workstation of its own in {base}", file=out)
    agent = Agent(load(str(places["config"])))
    seen: set[str] = set()
    offset = 0

    def show_new() -> None:
        nonlocal offset
        log = places["log"]
        if not log.exists():
            return
        with log.open(encoding="utf-8") as fh:
            fh.seek(offset)
            while True:
                line = fh.readline()
                if not line.endswith("\n"):
                    break  # a line still being written: read it next time
                offset = fh.tell()
                record = json.loads(line)
                if record.get("event", {}).get("kind") != "alert":
                    continue
                seen.add(record["rule"]["id"])
                shown = pretty_line(line.rstrip("\n"), colour=colour)
                if shown:
                    print(f"   {shown}", file=out)
        out.flush()

    ok = True
    try:
        if not agent.load_rules():
            for problem in agent.rule_problems:
                print(str(problem), file=out)
            return 1
        agent.start()
        for (what, rules), step in zip(STEPS, _steps(places), strict=True):
            print(f"\n-> {what}", file=out)
            step()
            deadline = time.monotonic() + timeout
            while not seen.intersection(rules) and time.monotonic() < deadline:
                show_new()
                time.sleep(0.1)
            show_new()
            if not seen.intersection(rules):
                ok = False
                print(f"   (no {' or '.join(rules)} alert within {timeout:.0f} s)", file=out)
    finally:
        with contextlib.suppress(Exception):
            agent.stop()
        show_new()
        if keep:
            print(f"\nkept: {base} (config, state, {places['log']})", file=out)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(
        "\n" + ("every step raised its alert" if ok else "some steps raised no alert"),
        file=out,
    )
    return 0 if ok else 1
