"""Daily engineering work on a tagged tree stays quiet; trusted destinations stay quiet but
counted. Real editors, git, make, a venv, a sync client's temp-then-rename, rsync, through the
live agent with the shipped rules (issue: detection content, items 1 and 2)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import needs_mount
from tests.detection.conftest import Workstation, need

GIT = "git -c user.email=dev@example.com -c user.name=dev"


def quiet(ws: Workstation) -> None:
    ws.settle(ws.rnd, ws.stage, ws.dropbox)
    # Process rules see every process on the machine: another test session's tools (a
    # renamed zip in a parallel run) are not this workstation's work.
    ours = [a for a in ws.alerts() if about(ws, a)]
    assert ours == [], [a["rule"]["id"] for a in ours]


def about(ws: Workstation, alert: dict[str, object]) -> bool:
    process = alert.get("process") or {}
    file = alert.get("file") or {}
    assert isinstance(process, dict) and isinstance(file, dict)
    places = (file.get("path"), process.get("working_directory"), process.get("command_line"))
    return any(str(ws.tmp) in str(v) for v in places if v)


def test_editor_saves_and_atomic_renames_stay_quiet(ws: Workstation) -> None:
    need("vim")
    src = ws.src
    # vim writing a backup by renaming (backupcopy=no: mod1.c -> mod1.c~, then a new mod1.c)
    # and by copying (backupcopy=yes), with its swap file; an atomic save through a hidden
    # temp name; sed -i (a temp file renamed over the original); an emacs-style backup.
    for mode in ("no", "yes"):
        ws.sh(
            f"vim -u NONE -i NONE -N -es -c 'set backup writebackup backupcopy={mode}' "
            "-c '%s/return/return /' -c 'wq' mod1.c",
            cwd=src,
        )
    ws.sh("printf 'int x;\\n' > .mod2.c.tmp.4242 && mv .mod2.c.tmp.4242 mod2.c", cwd=src)
    ws.sh("sed -i 's/return/return  /' mod3.c mod4.c mod5.c", cwd=src)
    ws.sh(
        "cp mod6.c mod6.c~ && printf 'x' >> mod6.c && cp mod7.c '#mod7.c#' && rm '#mod7.c#'",
        cwd=src,
    )
    ws.wait(lambda: ws.events("moved", src / "mod2.c"), "the atomic save")
    quiet(ws)


def test_git_work_on_a_tagged_repository_stays_quiet(ws: Workstation) -> None:
    need("git")
    ws.sh(f"git init -q -b main . && git add -A && {GIT} commit -qm init", cwd=ws.rnd)
    # A branch that adds 40 files: checking out main again deletes them (git's deletes).
    ws.sh(
        "git checkout -qb feature && mkdir -p src/new && "
        'for i in $(seq 1 40); do echo "int n$i;" > src/new/n$i.c; done && '
        f"git add -A && {GIT} commit -qm feature && git checkout -q main && "
        f"echo '// note' >> src/mod3.c && {GIT} commit -qam note && "
        f"{GIT} merge -q --no-edit feature && git gc -q && git log --oneline >/dev/null",
        cwd=ws.rnd,
    )
    ws.wait(lambda: ws.events("moved", ws.rnd / ".git" / "ORIG_HEAD"), "the merge's ORIG_HEAD")
    quiet(ws)


def test_a_build_and_make_clean_stay_quiet(ws: Workstation) -> None:
    need("make")
    (ws.src / "Makefile").write_text(
        "SRCS := $(wildcard *.c)\n"
        "OBJS := $(patsubst %.c,build/%.o,$(SRCS))\n"
        "all: $(OBJS)\n"
        "build/%.o: %.c\n\t@mkdir -p build && cp $< $@\n"
        "clean:\n\trm -rf build\n"
    )
    ws.sh("make -s -j2 && make -s clean && make -s && make -s clean", cwd=ws.src)
    ws.wait(lambda: ws.events("deleted", ws.src / "build" / "mod39.o"), "the clean")
    quiet(ws)


def test_a_package_install_and_a_sync_clients_temp_files_stay_quiet(ws: Workstation) -> None:
    # A virtual environment in a hidden directory of the home (a staging place): hundreds of
    # files that are no one's tagged content.
    ws.sh(f"python3 -m venv --without-pip {ws.home / '.venvs' / 'tool'}")
    # A sync client downloading: a temp name renamed into place, a partial download.
    ws.sh(
        "printf 'notes' > .dropbox.tmp-1234 && mv .dropbox.tmp-1234 notes.txt && "
        "printf 'pdf' > report.pdf.part && mv report.pdf.part report.pdf",
        cwd=ws.dropbox,
    )
    ws.wait(lambda: ws.events("moved", ws.dropbox / "report.pdf"), "the download")
    quiet(ws)


def test_a_backup_to_a_trusted_directory_is_quiet_but_counted(ws: Workstation) -> None:
    need("rsync")
    ws.sh(f"rsync -a {ws.rnd}/ {ws.backup}/rnd/")
    started = ws.wait(
        lambda: [
            e for e in ws.events("process_started") if e.get("process", {}).get("name") == "rsync"
        ],
        "rsync's process_started",
    )
    assert started[0]["exfilwatch"]["location"]["trusted"] is True
    quiet(ws)
    ws.stop()
    (summary,) = ws.health("trusted_activity")
    rules = {row["rule"] for row in summary["exfilwatch"]["health"]["by"]}
    assert "exfil-upload-tool-on-tagged" in rules
    assert summary["exfilwatch"]["health"]["matches"] >= 1


def test_the_same_rsync_to_an_untrusted_place_alerts(ws: Workstation) -> None:
    need("rsync")
    ws.sh(f"rsync -a {ws.rnd}/ {ws.stage}/rnd/")
    alert = ws.wait_alert("exfil-upload-tool-on-tagged")
    assert alert["threat"]["technique"]["id"] == ["T1048", "T1567"]
    assert "trusted" not in alert["exfilwatch"].get("location", {})


@needs_mount
def test_a_trusted_stick_is_quiet_but_counted(
    tmp_path: Path, loop_mount: Callable[[Path], Path]
) -> None:
    extra = "  - device: {label: EXFILTEST}\n    reason: the lab's backup stick\n"
    ws = Workstation(tmp_path / "w", extra=extra)
    try:
        stick = loop_mount(ws.media / "BACKUP")
        ws.wait(lambda: ws.events("media_mounted"), "media_mounted")
        ws.sh(f"cp {ws.crit / 'top.gds'} {stick / 'top.gds'}")
        copy = ws.wait(
            lambda: [
                e
                for e in ws.events("closed_write", stick / "top.gds")
                if e["exfilwatch"].get("lineage")
            ],
            "the traced copy",
        )[0]
        assert copy["exfilwatch"]["location"] == {
            "class": "removable",
            "provider": "EXFILTEST",
            "trusted": True,
        }
        ws.settle(ws.rnd, stick)
        assert ws.alerts() == [], ws.alert_ids()
    finally:
        ws.stop()
        subprocess.run(["umount", str(ws.media / "BACKUP")], check=False)
    (summary,) = ws.health("trusted_activity")
    assert {r["rule"] for r in summary["exfilwatch"]["health"]["by"]} >= {
        "exfil-removable-crown-jewel"
    }


def test_a_tree_copied_in_read_and_removed_alerts_once_per_kind(ws: Workstation) -> None:
    # The README's demo: cp -r creates files a scan finds while they are written (not
    # overwrites of anything), and rm -rf empties many directories (one alert, not one a
    # directory).
    ws.sh(f"cp -r /usr/share/doc {ws.rnd / 'demo'} && rm -rf {ws.rnd / 'demo'}")
    ws.wait_alert("destroy-subtree-delete")
    ws.settle(ws.rnd)
    ids = [a["rule"]["id"] for a in ws.alerts()]
    assert "destroy-mass-overwrite-in-place" not in ids
    assert "destroy-mass-rewrite" not in ids
    assert ids.count("destroy-directory-emptied") <= 1
