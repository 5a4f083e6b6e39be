"""Insider techniques (adapted from Atomic Red Team and the CERT insider-threat scenarios) done
for real on a temp workstation while the live agent runs the shipped rules; for each, the
nearest benign activity stays quiet, and every alert carries the technique it detected
(issue: detection content, items 3 to 9)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_mount
from tests.detection.conftest import Workstation, command_exists, need

GIT = "git -c user.email=dev@example.com -c user.name=dev"


def technique(alert: dict[str, Any]) -> list[str]:
    ids: list[str] = alert["threat"]["technique"]["id"]
    return ids


def lineage(alert: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = alert["exfilwatch"]["lineage"]
    return found


# -- 3. sensitivity drives detection ----------------------------------------------------------


def test_one_critical_file_in_a_sync_folder_alerts_critical_and_a_medium_one_does_not(
    ws: Workstation,
) -> None:
    # The reader waits on a FIFO first, so its start is read from /proc and its read is
    # attributed to its user however loaded the machine is (the test is about the label).
    gate = ws.tmp / "gate"
    ws.sh(f"mkfifo {gate}; (sleep 0.5; echo > {gate}) & cat {gate} {ws.src / 'mod2.c'} >/dev/null")
    ws.wait(lambda: ws.events("closed_nowrite", ws.src / "mod2.c"), "the read")
    ws.sh(f"cp {ws.src / 'mod1.c'} {ws.dropbox / 'mod1.c'}")
    ws.wait_alert("exfil-cloud-sync-tagged-copy")
    # A tagged file read, then a copy reached the sync folder: the way out is named.
    assert technique(ws.wait_alert("exfil-read-then-egress")) == ["T1567.002"]
    ws.settle(ws.dropbox)
    assert not ws.alerts("exfil-critical-cloud-sync-copy")
    ws.sh(f"cp {ws.crit / 'top.gds'} {ws.dropbox / 'holiday.gds'}")
    alert = ws.wait_alert("exfil-critical-cloud-sync-copy")
    assert alert["exfilwatch"]["level"] == "critical"
    assert lineage(alert)["origin_sensitivity"] == "critical"
    assert lineage(alert)["origin_path"] == str(ws.crit / "top.gds")
    assert technique(alert) == ["T1567.002"]


@needs_mount
def test_bulk_thresholds_scale_with_sensitivity_on_a_usb_stick(
    ws: Workstation, loop_mount: Callable[[Path], Path]
) -> None:
    stick = loop_mount(ws.media / "STICK")
    ws.wait(lambda: ws.events("media_mounted"), "media_mounted")
    # Five medium files: under the bulk threshold of 20.
    ws.sh(f"mkdir {stick / 'src'} && cp {ws.src}/mod1?.c {stick / 'src'}/ && sync")
    ws.settle(ws.rnd, stick)
    assert not ws.alerts("exfil-removable-bulk-copy")
    assert not ws.alerts("exfil-removable-bulk-sensitive")
    # Five high-sensitivity files: the scaled threshold.
    ws.sh(f"mkdir {stick / 'chip'} && cp {ws.chip}/blk[0-4].v {stick / 'chip'}/")
    alert = ws.wait_alert("exfil-removable-bulk-sensitive")
    assert alert["exfilwatch"]["correlation"]["distinct_files"] == 5
    assert technique(alert) == ["T1052.001"]
    ws.settle(ws.rnd, stick)
    assert not ws.alerts("exfil-removable-crown-jewel")
    # One critical file: alone.
    ws.sh(f"cp {ws.crit / 'top.gds'} {stick / 'top.gds'}")
    alert = ws.wait_alert("exfil-removable-crown-jewel")
    assert alert["exfilwatch"]["level"] == "critical"


# -- 4. encoded and wrapped copies keep their origin ------------------------------------------


def test_encoded_copies_are_traced_to_the_tagged_file(ws: Workstation) -> None:
    ws.sh(f"base64 {ws.src / 'mod5.c'} > {ws.stage / 'notes.txt'}")
    ws.sh(f"od -An -tx1 {ws.src / 'mod6.c'} > {ws.stage / 'dump.txt'}")
    if command_exists("xxd"):
        ws.sh(f"xxd {ws.src / 'mod9.c'} > {ws.stage / 'xxd.txt'}")
    if command_exists("uuencode"):
        ws.sh(f"uuencode {ws.src / 'mod7.c'} mod7.c > {ws.stage / 'mod7.uu'}")
    # The nearest benign: an encoded file that is no one's tagged content.
    ws.sh(f"head -c 3000 /dev/urandom | base64 > {ws.stage / 'random.txt'}")
    expected = {
        ws.stage / "notes.txt": ("base64", ws.src / "mod5.c"),
        ws.stage / "dump.txt": ("hex", ws.src / "mod6.c"),
    }
    if command_exists("xxd"):
        expected[ws.stage / "xxd.txt"] = ("hex", ws.src / "mod9.c")
    if command_exists("uuencode"):
        expected[ws.stage / "mod7.uu"] = ("uuencode", ws.src / "mod7.c")

    def found() -> dict[str, dict[str, Any]]:
        return {a["file"]["path"]: a for a in ws.alerts("exfil-encoded-tagged")}

    ws.wait(lambda: len(found()) >= len(expected), f"{len(expected)} encoded-copy alerts")
    ws.settle(ws.stage)
    alerts = found()
    assert set(alerts) == {str(p) for p in expected}
    for path, (via, origin) in expected.items():
        got = lineage(alerts[str(path)])
        assert (got["via"], got["origin_path"]) == (via, str(origin))
        assert technique(alerts[str(path)]) == ["T1027", "T1132.001"]


def test_a_mail_with_a_tagged_attachment_and_split_chunks_are_traced(ws: Workstation) -> None:
    script = (
        "import sys\n"
        "from email.message import EmailMessage\n"
        "m = EmailMessage()\n"
        "m['From'] = 'dev@example.com'\nm['To'] = 'me@personal.example'\nm['Subject'] = 'x'\n"
        "m.set_content('see attached')\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "m.add_attachment(data, maintype='application', subtype='octet-stream',"
        " filename='notes.bin')\n"
        "open(sys.argv[2], 'wb').write(bytes(m))\n"
    )
    maker = ws.tmp / "mkmail.py"
    maker.write_text(script)
    mail = ws.stage / "draft.eml"
    ws.sh(f"python3 {maker} {ws.chip / 'blk3.v'} {mail}")
    alert = ws.wait_alert("exfil-mailed-tagged")
    assert (lineage(alert)["via"], lineage(alert)["origin_path"]) == (
        "mime",
        str(ws.chip / "blk3.v"),
    )
    assert technique(alert) == ["T1048.003"]
    ws.sh(f"split -b 600 {ws.src / 'mod30.c'} {ws.stage / 'part_'}")
    alert = ws.wait_alert("exfil-split-tagged")
    assert lineage(alert) == {
        "origin_path": str(ws.src / "mod30.c"),
        "origin_tags": ["rnd"],
        "origin_sensitivity": "medium",
        "via": "split",
    }
    assert technique(alert) == ["T1030"]
    # Benign: chunks of an untagged file.
    blob = ws.stage / "blob"
    ws.sh(f"head -c 5000 /dev/urandom > {blob} && split -b 600 {blob} {ws.stage / 'rnd_'}")
    ws.settle(ws.stage)
    assert len(ws.alerts("exfil-split-tagged")) == 1


def test_a_copy_staged_in_a_hidden_place_then_moved_keeps_its_origin(ws: Workstation) -> None:
    hidden = ws.home / ".local" / "share" / ".x"
    ws.sh(f"mkdir -p {hidden} && base64 {ws.crit / 'top.gds'} > {hidden / 'x.txt'}")
    # Written right after its directory was made: seen closed, or found by the directory's
    # scan (created), depending on how fast the agent watched the new directory.
    ws.wait(lambda: ws.events(None, hidden / "x.txt"), "the staged copy")
    ws.sh(f"mv {hidden / 'x.txt'} {ws.dropbox / 'x.txt'}")
    alert = ws.wait_alert("exfil-critical-cloud-sync-copy")
    assert alert["file"]["path"] == str(ws.dropbox / "x.txt")
    assert (lineage(alert)["via"], lineage(alert)["origin_path"]) == (
        "base64",
        str(ws.crit / "top.gds"),
    )


def test_a_design_renamed_to_a_licence_or_hidden_in_git_bookkeeping_is_traced(
    ws: Workstation,
) -> None:
    # Names are the watched user's to choose: a copy made in the tree under a licence's name
    # or in .git/info/ (content found nowhere else in the tree), then copied out, is still
    # tagged content: lineage decides by content.
    git_info = ws.rnd / ".git" / "info"
    ws.sh(
        f"mkdir -p {git_info} && cat mod3.c mod5.c > {ws.rnd / 'LICENSE-MIT'} && "
        f"cat mod4.c mod6.c > {git_info / 'exclude'}",
        cwd=ws.src,
    )
    ws.wait(lambda: ws.events(None, git_info / "exclude"), "the copy in .git/info")
    ws.settle(ws.rnd)
    ws.sh(
        f"cp {ws.rnd / 'LICENSE-MIT'} {ws.dropbox / 'a.txt'} && "
        f"cp {git_info / 'exclude'} {ws.dropbox / 'b.txt'}"
    )
    ws.wait_alert("exfil-cloud-sync-tagged-copy")  # one alert: a second copy is suppressed

    def origin(name: str) -> str | None:
        traced = [e for e in ws.events(None, ws.dropbox / name) if e["exfilwatch"].get("lineage")]
        return traced[0]["exfilwatch"]["lineage"]["origin_path"] if traced else None

    origins = {
        name: ws.wait(lambda n=name: origin(n), f"{name} traced") for name in ("a.txt", "b.txt")
    }
    assert origins["a.txt"] == str(ws.rnd / "LICENSE-MIT")
    assert origins["b.txt"] == str(git_info / "exclude")


# -- 5. repositories are data too -------------------------------------------------------------


def test_a_bundle_and_a_bare_clone_of_a_tagged_repository_are_recognised(ws: Workstation) -> None:
    need("git")
    ws.sh(f"git init -q -b main . && git add -A && {GIT} commit -qm init", cwd=ws.rnd)
    other = ws.tmp / "other"
    other.mkdir()
    ws.sh(f"git init -q -b main . && echo x > a && git add a && {GIT} commit -qm o", cwd=other)
    # Benign: a bundle of a repository that is not tagged.
    ws.sh(f"git bundle create -q {ws.stage / 'other.bundle'} --all", cwd=other)
    ws.sh(f"git bundle create -q {ws.stage / 'rnd.bundle'} --all", cwd=ws.rnd)
    alert = ws.wait_alert("exfil-repository-bundle")
    # git writes rnd.bundle.lock and renames it: the alert names whichever was checked first.
    assert alert["file"]["path"] in (
        str(ws.stage / "rnd.bundle"),
        str(ws.stage / "rnd.bundle.lock"),
    )
    assert lineage(alert)["origin_path"] == str(ws.rnd)
    assert technique(alert) == ["T1560", "T1213.003"]
    read = ws.wait_alert("exfil-repository-read")  # git bundle on the tagged repository
    assert read["process"]["args"][:2] == ["git", "bundle"]
    ws.sh(f"git clone -q --bare --no-local {ws.rnd} {ws.stage / 'rnd.git'}")
    alert = ws.wait_alert("exfil-repository-clone")
    assert lineage(alert)["origin_path"] == str(ws.rnd)
    assert technique(alert) == ["T1213.003"]
    ws.settle(ws.stage)
    assert len(ws.alerts("exfil-repository-bundle")) == 1  # none for other.bundle


# -- 6. slow and low ---------------------------------------------------------------------------


@needs_mount
def test_a_drip_of_copies_to_one_stick_alerts_under_the_bulk_threshold(
    ws: Workstation, loop_mount: Callable[[Path], Path]
) -> None:
    stick = loop_mount(ws.media / "DRIP")
    ws.wait(lambda: ws.events("media_mounted"), "media_mounted")
    # Nine medium files, one at a time: under the bulk threshold (20) and the drip's (10).
    for i in range(20, 29):
        ws.sh(f"cp {ws.src / f'mod{i}.c'} {stick}/ && sleep 0.2")
    ws.wait(
        lambda: [
            e
            for e in ws.events("closed_write", stick / "mod28.c")
            if e["exfilwatch"].get("lineage")
        ],
        "the ninth copy traced",
    )
    ws.settle(ws.rnd, stick)
    assert not ws.alerts("exfil-egress-drip")
    assert not ws.alerts("exfil-removable-bulk-copy")
    # The tenth distinct file to the same stick within the day: the drip.
    ws.sh(f"cp {ws.src / 'mod29.c'} {stick}/")
    alert = ws.wait_alert("exfil-egress-drip")
    assert technique(alert) == ["T1029"]
    assert alert["exfilwatch"]["correlation"]["distinct_files"] == 10
    assert not ws.alerts("exfil-removable-bulk-copy")


# -- 7. sabotage --------------------------------------------------------------------------------


def test_a_deleted_subtree_and_a_deleted_critical_file_alert(ws: Workstation) -> None:
    # Benign first: a handful of deletes (a refactoring) stays under the subtree threshold.
    ws.sh("rm mod1.c mod2.c mod3.c", cwd=ws.src)
    ws.settle(ws.rnd)
    assert not ws.alerts("destroy-subtree-delete")
    assert not ws.alerts("destroy-directory-emptied")
    # Most of a small directory: 8 of the files of chip/ (under the subtree count). First:
    # the rule alerts once per user for a while, and the rm -rf below empties many more.
    ws.sh("rm blk0.v blk1.v blk2.v blk3.v blk4.v blk5.v blk6.v blk7.v", cwd=ws.chip)
    alert = ws.wait(
        lambda: [
            a
            for a in ws.alerts("destroy-directory-emptied")
            if a["file"]["directory"] == str(ws.chip)
        ],
        "the emptied chip directory",
    )[0]
    # 8 of 13: the twelve designs and the marker file.
    assert alert["exfilwatch"]["directory"] == {"deleted": 8, "deleted_share": 0.615}
    assert technique(alert) == ["T1485"]
    ws.sh(f"rm -rf {ws.src}")
    alert = ws.wait_alert("destroy-subtree-delete")
    assert alert["exfilwatch"]["correlation"]["distinct_files"] == 30
    assert technique(alert) == ["T1485"]
    ws.sh(f"rm {ws.crit / 'top.gds'}")
    alert = ws.wait_alert("destroy-critical-delete")
    assert technique(alert) == ["T1485"]


def test_git_clean_of_untracked_tagged_files_alerts_and_of_build_outputs_does_not(
    ws: Workstation,
) -> None:
    need("git")
    git = "git -c user.email=dev@example.com -c user.name=dev"
    ws.sh(f"git init -q -b main . && git add -A && {git} commit -qm init", cwd=ws.rnd)
    # Benign: git clean removing 40 untracked object files (build outputs).
    objs = ws.src / "objs"
    objs.mkdir()
    for i in range(40):
        (objs / f"o{i}.o").write_bytes(b"\x7fELF" + bytes(60))
    ws.wait(lambda: ws.events(None, objs / "o39.o"), "the objects")
    ws.sh("(sleep 0.5; echo c) | git clean -i -dx >/dev/null", cwd=ws.rnd)
    ws.wait(lambda: ws.events("deleted", objs / "o39.o"), "the clean of the objects")
    ws.settle(ws.rnd)
    assert not ws.alerts("destroy-subtree-delete"), ws.alert_ids()
    # 40 untracked source files (work never committed) removed by git clean: nothing keeps
    # them, unlike the files a checkout removes.
    wip = ws.src / "wip"
    wip.mkdir()
    for i in range(40):
        (wip / f"w{i}.c").write_text(f"int w{i};\n")
    ws.wait(lambda: ws.events(None, wip / "w39.c"), "the untracked work")
    # Interactively (its menu answered after a while), so git's start is read before its
    # deletes however loaded the machine is: the test is about the rule, not the exec race.
    ws.sh("(sleep 0.5; echo c) | git clean -i -dx >/dev/null", cwd=ws.rnd)
    alert = ws.wait_alert("destroy-subtree-delete")
    assert technique(alert) == ["T1485"]


def test_overwrites_in_place_and_encryption_in_bulk_alert(ws: Workstation) -> None:
    # Benign: ten files edited (their sizes change).
    ws.sh("for i in $(seq 10 19); do echo '// edit' >> mod$i.c; done", cwd=ws.src)
    ws.settle(ws.rnd)
    assert not ws.alerts("destroy-mass-overwrite-in-place")
    # dd conv=notrunc over ten files: sizes unchanged, content destroyed.
    ws.sh(
        "for i in $(seq 20 29); do "
        "dd if=/dev/urandom of=mod$i.c bs=64 count=1 conv=notrunc status=none; done",
        cwd=ws.src,
    )
    alert = ws.wait_alert("destroy-mass-overwrite-in-place")
    assert technique(alert) == ["T1565.001", "T1485"]
    ws.sh(f"dd if=/dev/zero of={ws.crit / 'top.gds'} bs=512 count=1 conv=notrunc status=none")
    ws.wait_alert("destroy-critical-overwrite-in-place")
    if not command_exists("gpg"):
        pytest.skip("gpg is not installed")
    try:
        ws.sh(
            "for i in $(seq 30 39); do gpg --batch --yes --quiet --pinentry-mode loopback "
            "--passphrase hostage -c mod$i.c && rm mod$i.c; done",
            cwd=ws.src,
        )
    finally:  # gpg leaves an agent running for the home it used
        ws.sh("gpgconf --kill gpg-agent || true")
    alert = ws.wait_alert("destroy-mass-encryption")
    assert technique(alert) == ["T1486"]


def test_encryption_in_place_under_the_same_names_is_destruction_not_disguise(
    ws: Workstation,
) -> None:
    need("openssl")
    # Every name kept: each file encrypted to a temp name renamed over the original. No
    # extension says "encrypted"; the content does.
    # The renames are made by one process that lives long enough to be read at its start, so
    # every rename is attributed to its user however loaded the machine is (the test is about
    # the rule; a rename by a short `mv` can lose its user under load: issue 11).
    ws.sh(
        "for i in $(seq 10 21); do openssl enc -aes-256-cbc -pbkdf2 -pass pass:hostage "
        "-in mod$i.c -out mod$i.c.t; done && python3 -c 'import os, time; time.sleep(0.5); "
        '[os.replace(f"mod{i}.c.t", f"mod{i}.c") for i in range(10, 22)]\'',
        cwd=ws.src,
    )
    alert = ws.wait_alert("destroy-mass-encryption")
    assert technique(alert) == ["T1486"]
    replaced = ws.wait(
        lambda: [
            e
            for e in ws.events("moved", ws.src / "mod21.c")
            if "encrypted" in e["exfilwatch"].get("disguise", [])
        ],
        "mod21.c replaced by encrypted content",
    )
    assert replaced[0]["exfilwatch"]["file"]["overwrite"] == "replaced"
    ws.settle(ws.rnd)
    assert not ws.alerts("exfil-rename-disguise"), ws.alert_ids()


def test_a_scripted_rewrite_of_the_tree_alerts_and_a_formatter_like_edit_does_not(
    ws: Workstation,
) -> None:
    # Benign: ten files edited (fewer than the mass threshold).
    ws.sh("sed -i 's/return/return /' mod1.c mod2.c mod3.c mod4.c mod5.c", cwd=ws.src)
    ws.settle(ws.rnd)
    assert not ws.alerts("destroy-mass-rewrite")
    # sed over the whole tree: 52 existing tagged files replaced by sed's temp files.
    ws.sh(f"sed -i 's/[0-9]/0/g' {ws.src}/*.c {ws.chip}/*.v")
    alert = ws.wait_alert("destroy-mass-rewrite")
    assert alert["process"]["name"] == "sed"
    assert technique(alert) == ["T1565.001"]


# -- 8. anti-forensics and masquerading ---------------------------------------------------------


def test_history_clearing_and_a_shredded_archive_alert(ws: Workstation) -> None:
    need("zip", "shred")
    history = ws.home / ".bash_history"
    # Benign: the shell appending to its history.
    ws.sh(f"echo 'ls -la' >> {history} && echo 'make' >> {history}")
    ws.wait(lambda: ws.events("closed_write", history), "the history write")
    ws.settle(ws.rnd)
    assert not ws.alerts("antiforensics-shell-history-cleared")
    ws.sh(f": > {history}")
    alert = ws.wait_alert("antiforensics-shell-history-cleared")
    assert technique(alert) == ["T1070.003"]
    # A zip of tagged files written to /tmp-like staging, then removed: by rm, then shred -u.
    ws.sh(f"cd {ws.src} && zip -q {ws.stage / 'a.zip'} mod1.c mod2.c mod3.c")
    ws.wait_alert("exfil-archive-of-tagged")
    ws.sh(f"rm {ws.stage / 'a.zip'}")
    alert = ws.wait_alert("antiforensics-tagged-archive-removed")
    assert technique(alert) == ["T1070.004"]
    ws.sh(
        f"cd {ws.src} && zip -q {ws.stage / 'b.zip'} mod4.c mod5.c && shred -u {ws.stage / 'b.zip'}"
    )
    alert = ws.wait_alert("antiforensics-archive-then-shred")
    assert technique(alert) == ["T1070.004"]


@pytest.mark.parametrize(
    ("name", "clear"),
    [(".zsh_history", "rm -f {h}"), (".bash_history", "ln -sf /dev/null {h}")],
    ids=["deleted", "linked_to_dev_null"],
)
def test_history_deleted_or_linked_to_dev_null_alerts(
    ws: Workstation, name: str, clear: str
) -> None:
    history = ws.home / name
    ws.sh(f"echo 'scp -r /srv/rnd x:' >> {history}")
    ws.wait(lambda: ws.events("closed_write", history), "the history write")
    ws.sh(clear.format(h=history))
    alert = ws.wait_alert("antiforensics-shell-history-cleared")
    assert alert["file"]["path"] == str(history)
    assert technique(alert) == ["T1070.003"]


def test_deceptive_staging_directories_alert_and_an_ordinary_one_does_not(
    ws: Workstation,
) -> None:
    ws.sh(f"mkdir -p '{ws.stage}/... ' && cp {ws.src / 'mod8.c'} '{ws.stage}/... /a.c'")
    alert = ws.wait_alert("exfil-deceptive-directory-name")
    assert technique(alert) == ["T1036.006"]
    trash = ws.stage / ".Trash-1000" / "files"
    ws.sh(f"mkdir -p {trash} && cp {ws.src / 'mod9.c'} {trash}/")
    alert = ws.wait_alert("exfil-deceptive-directory-location")
    assert technique(alert) == ["T1036.005"]
    ws.sh(f"mkdir -p {ws.stage}/work && cp {ws.src / 'mod10.c'} {ws.stage}/work/")
    ws.settle(ws.stage)
    paths = {
        a["file"]["path"]
        for rule in ("exfil-deceptive-directory-name", "exfil-deceptive-directory-location")
        for a in ws.alerts(rule)
    }
    assert paths == {f"{ws.stage}/... /a.c", f"{ws.stage}/.Trash-1000/files/mod9.c"}


def test_a_renamed_archiver_and_a_fake_kernel_thread_on_tagged_files_alert(
    ws: Workstation,
) -> None:
    need("zip")
    hidden = ws.home / ".local" / "bin"
    hidden.mkdir(parents=True)
    ws.sh(f"cp /usr/bin/zip {hidden / 'crond'}")
    # Each disguised tool runs for a while (as an exfiltration job does): its start is read
    # from /proc however loaded the machine is.
    ws.sh(f"(sleep 1; echo mod1.c) | {hidden / 'crond'} -q -@ {ws.stage / 'c.zip'}", cwd=ws.src)
    alert = ws.wait(
        lambda: [
            a
            for a in ws.alerts("exfil-masquerading-process")
            if a["exfilwatch"]["attribution"]["masquerade"] == "renamed_binary:zip"
        ],
        "the renamed zip",
    )[0]
    assert "T1036.003" in technique(alert)
    ws.sh(
        f"(sleep 1; echo) | bash -c 'exec -a \"[kworker/0:1]\" cat - {ws.src / 'mod2.c'}' "
        ">/dev/null"
    )
    thread = ws.wait_alert("exfil-kernel-thread-name")
    assert thread["exfilwatch"]["attribution"]["masquerade"] == "kernel_thread_name"
    assert technique(thread) == ["T1036.004"]
    # Benign: the real zip and cat.
    n = len(ws.alerts("exfil-masquerading-process")) + len(ws.alerts("exfil-kernel-thread-name"))
    ws.sh(f"zip -q {ws.stage / 'd.zip'} {ws.src / 'mod3.c'} && cat {ws.src / 'mod3.c'} >/dev/null")
    ws.settle(ws.rnd, ws.stage)
    assert (
        len(ws.alerts("exfil-masquerading-process")) + len(ws.alerts("exfil-kernel-thread-name"))
        == n
    )


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("the live agent's process and attribution sources need root")
