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
    assert ours == [], [
        (a["rule"]["id"], a["file"]["path"], a["exfilwatch"].get("lineage", {}).get("origin_path"))
        for a in ours
    ]


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
    # (backupskip= : vim skips backups under /tmp by default, where this tree is.)
    for mode in ("no", "yes"):
        ws.sh(
            f"vim -u NONE -i NONE -N -es -c 'set backup writebackup backupcopy={mode} "
            "backupskip=' -c '%s/return/return /' -c 'wq' mod1.c",
            cwd=src,
        )
    ws.wait((src / "mod1.c~").exists, "vim's backup")
    ws.sh("printf 'int x;\\n' > .mod2.c.tmp.4242 && mv .mod2.c.tmp.4242 mod2.c", cwd=src)
    ws.sh("sed -i 's/return/return  /' mod3.c mod4.c mod5.c", cwd=src)
    ws.sh(
        "cp mod6.c mod6.c~ && printf 'x' >> mod6.c && cp mod7.c '#mod7.c#' && rm '#mod7.c#'",
        cwd=src,
    )
    # JetBrains' safe write (old copy aside, temp renamed in, old copy removed), GLib/GIO's
    # (gedit, every GTK app), Syncthing's temp name, cp --backup=numbered.
    ws.sh(
        "cp mod8.c mod8.c___jb_tmp___ && printf 'x' >> mod8.c___jb_tmp___ && "
        "mv mod8.c mod8.c___jb_old___ && mv mod8.c___jb_tmp___ mod8.c && rm mod8.c___jb_old___ && "
        "cp mod9.c .goutputstream-AB12CD && mv .goutputstream-AB12CD mod9.c && "
        "cp mod10.c .syncthing.mod10.c.tmp && mv .syncthing.mod10.c.tmp mod10.c && "
        "cp --backup=numbered mod12.c mod11.c && cp --backup=numbered mod13.c mod11.c",
        cwd=src,
    )
    ws.wait(lambda: ws.events("moved", src / "mod2.c"), "the atomic save")
    ws.wait(lambda: ws.events("moved", src / "mod11.c.~2~"), "the numbered backup")
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
        "PROGS := $(patsubst %.c,bin/%,$(SRCS))\n"
        "all: $(OBJS) $(PROGS)\n"
        "build/%.o: %.c\n\t@mkdir -p build && cp $< $@\n"
        "bin/%: build/%.o\n\t@mkdir -p bin && cp $< $@ && chmod +x $@\n"
        "clean:\n\trm -rf build\n\trm -f bin/*\n"
    )
    ws.sh("make -s -j2 && make -s clean && make -s && make -s clean", cwd=ws.src)
    ws.wait(lambda: ws.events("deleted", ws.src / "build" / "mod39.o"), "the clean")
    ws.wait(lambda: ws.events("deleted", ws.src / "bin" / "mod39"), "the clean of bin/")
    quiet(ws)


def test_a_package_install_and_a_sync_clients_temp_files_stay_quiet(ws: Workstation) -> None:
    # A virtual environment with pip in a hidden directory of the home (a staging place):
    # pip installing itself from its bundled wheel writes about a thousand files that are
    # no one's tagged content.
    venv = ws.home / ".venvs" / "tool"
    ws.sh(f"python3 -m venv {venv}")
    assert len(list(venv.rglob("*.py"))) > 300
    # A sync client downloading: a temp name renamed into place, a partial download.
    ws.sh(
        "printf 'notes' > .dropbox.tmp-1234 && mv .dropbox.tmp-1234 notes.txt && "
        "printf 'pdf' > report.pdf.part && mv report.pdf.part report.pdf",
        cwd=ws.dropbox,
    )
    ws.wait(lambda: ws.events("moved", ws.dropbox / "report.pdf"), "the download")
    quiet(ws)


def test_a_sync_client_and_rsync_pulling_updates_into_the_tree_stay_quiet(
    ws: Workstation,
) -> None:
    need("rsync")
    # Syncthing bringing a peer's edit of a tagged file: its temp name renamed over it.
    ws.sh(
        "cp blk1.v .syncthing.blk1.v.tmp && printf '// peer edit\\n' >> .syncthing.blk1.v.tmp && "
        "mv .syncthing.blk1.v.tmp blk1.v",
        cwd=ws.chip,
    )
    # rsync pulling a newer copy of 52 tagged files from a colleague's export: the tagged
    # tree is only the destination (rsync's .name.XXXXXX temp files renamed over them).
    update = ws.tmp / "update"
    ws.sh(
        f"mkdir -p {update}/src {update}/chip && cp {ws.src}/*.c {update}/src/ && "
        f"cp {ws.chip}/*.v {update}/chip/ && "
        f"for f in {update}/src/*.c {update}/chip/*.v; do echo '// v2' >> $f; done"
    )
    ws.sh(f"rsync -a {update}/src/ {ws.src}/ && rsync -a {update}/chip/ {ws.chip}/")
    ws.wait(lambda: ws.events("moved", ws.chip / "blk11.v"), "the pulled update")
    quiet(ws)


def test_an_unrelated_repository_in_the_sync_folder_stays_quiet(ws: Workstation) -> None:
    need("git")
    # The tagged tree is a repository with a licence; another project, with git's same hook
    # samples and description and the same licence text, is cloned into the sync folder.
    licence = Path("/usr/share/common-licenses/Apache-2.0").read_text()  # Debian base-files
    (ws.rnd / "LICENSE").write_text(licence)
    ws.sh(f"git init -q -b main . && git add -A && {GIT} commit -qm init", cwd=ws.rnd)
    other = ws.tmp / "other"
    other.mkdir()
    (other / "LICENSE").write_text(licence)
    (other / "main.py").write_text("print('hello')\n")
    ws.sh(f"git init -q -b main . && git add -A && {GIT} commit -qm init", cwd=other)
    ws.sh(f"git clone -q {other} {ws.dropbox / 'other'}")
    ws.wait(lambda: ws.events(None, ws.dropbox / "other" / "LICENSE"), "the clone's licence")
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
