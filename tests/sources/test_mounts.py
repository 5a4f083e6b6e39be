"""Mount watching: the table parser, classification on real and built sysfs trees, real mounts."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sources.mounts import (
    Mount,
    MountInfo,
    MountWatcher,
    classify,
    mountpoint_matches,
    parse_mountinfo,
    read_fs_label,
    read_mounts,
)
from tests.conftest import losetup_for, needs_mount

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mountinfo is Linux")

USB_DISK = "devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb"
SCSI_DEV = "devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0/host6/target6:0:0/6:0:0:0"
USB_DEV = "devices/pci0000:00/0000:00:14.0/usb1/1-1"


def net(fstype: str, source: str = "server:/export", mountpoint: str = "/srv/share") -> Mount:
    return Mount(40, 0, 55, "/", mountpoint, ("rw",), fstype, source)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


@pytest.fixture
def usb_sysfs(tmp_path: Path) -> Path:
    """A sysfs tree for a USB stick (sdb, partition sdb1) as the kernel lays it out."""
    sysfs = tmp_path / "sys"
    usb = sysfs / USB_DEV
    for name, value in {
        "idVendor": "0781",
        "idProduct": "5567",
        "manufacturer": "SanDisk",
        "product": "Cruzer Blade",
        "serial": "4C530001180830117033",
    }.items():
        write(usb / name, value + "\n")
    write(usb / "1-1:1.0" / "bInterfaceClass", "08\n")
    write(sysfs / SCSI_DEV / "vendor", "SanDisk \n")
    write(sysfs / SCSI_DEV / "model", "Cruzer Blade    \n")
    disk = sysfs / USB_DISK
    write(disk / "removable", "0\n")  # USB hard disks and many sticks say 0; the bus tells
    link(disk / "device", "../../../6:0:0:0")
    write(disk / "sdb1" / "partition", "1\n")
    link(sysfs / "dev/block/8:16", "../../" + USB_DISK)
    link(sysfs / "dev/block/8:17", "../../" + USB_DISK + "/sdb1")
    return sysfs


# --- parse_mountinfo ---------------------------------------------------------------------------


def test_mountinfo_lines_parse_with_octal_escapes_optional_fields_and_separator() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=c\n"
        "40 27 8:17 / /media/u/My\\011Tab\\012Line\\134Slash rw,nosuid shared:1 master:2 - vfat "
        "/dev/sdb1 rw,uid=1000\n"
        "41 27 0:50 / /srv/share rw - nfs4 server:/export rw,vers=4.2,addr=10.0.0.5\n"
    )
    a, b, c = parse_mountinfo(text)
    assert a == Mount(36, 98, 0, "/mnt1", "/mnt/parent dir", ("rw", "noatime"), "ext3",
                      "/dev/root", ("rw", "errors=c"))  # fmt: skip
    assert b.mountpoint == "/media/u/My\tTab\nLine\\Slash"
    assert (b.major, b.minor, b.fstype, b.source) == (8, 17, "vfat", "/dev/sdb1")
    assert b.options == ("rw", "nosuid")
    assert c.super_options == ("rw", "vers=4.2", "addr=10.0.0.5")


def test_mountinfo_keeps_undecodable_bytes_of_a_mountpoint_as_surrogate_escapes() -> None:
    raw = b"50 27 8:17 / /media/u/caf\xe9\\040x rw - vfat /dev/sdb1 rw\n"
    (m,) = parse_mountinfo(os.fsdecode(raw))
    assert os.fsencode(m.mountpoint) == b"/media/u/caf\xe9 x"
    record = MountInfo(m, "removable", "usb_bus").to_dict()
    json.dumps(record, ensure_ascii=False).encode("utf-8")  # JSON-safe even as UTF-8
    assert record["mountpoint"] == "/media/u/caf\\xe9 x"
    assert record["mountpoint_raw"] == "L21lZGlhL3UvY2Fm6SB4"


def test_garbage_and_truncated_lines_are_skipped_without_raising() -> None:
    good = "22 27 0:21 / /proc rw,relatime - proc proc rw"
    garbage = [
        "",
        "hello world",
        "1 2 3",
        "x 27 0:21 / /proc rw,relatime - proc proc rw",
        "22 27 021 / /proc rw,relatime - proc proc rw",
        "22 27 a:b / /proc rw,relatime - proc proc rw",
        "22 27 0:21 / /proc rw,relatime proc proc rw no separator",
        "22 27 0:21 / /proc rw,relatime shared:1 -",
        "22 27 0:21 relative /proc rw - proc proc rw",
        "\x00\xff\\999 - - - - - - - - -",
        "22 27 0:21 / /proc rw,relatime - proc",
    ]
    mounts = parse_mountinfo("\n".join([*garbage, good, *garbage]))
    assert [m.mountpoint for m in mounts] == ["/proc"]


def test_a_mount_with_an_empty_source_still_parses() -> None:
    (m,) = parse_mountinfo("60 27 0:70 / /run/x rw - tmpfs  rw,size=4k\n")
    assert (m.fstype, m.source, m.super_options) == ("tmpfs", "", ("rw", "size=4k"))


def test_the_real_mount_table_parses_completely() -> None:
    text = Path("/proc/self/mountinfo").read_text()
    mounts = read_mounts()
    assert len(mounts) == len(text.splitlines())
    assert any(m.mountpoint == "/" for m in mounts)


# --- classify ----------------------------------------------------------------------------------


def test_the_real_root_filesystem_is_other_and_not_ignorable() -> None:
    root = next(m for m in read_mounts() if m.mountpoint == "/")
    info = classify(root)
    assert (info.kind, info.reason, info.ignorable) == ("other", "root_filesystem", False)
    if root.major != 0:
        assert info.device is not None
    assert info.size_bytes is not None and info.size_bytes > 0


def test_real_pseudo_filesystems_are_other_and_flagged_ignorable() -> None:
    pseudo = [m for m in read_mounts() if m.fstype in ("proc", "sysfs", "tmpfs", "devpts")]
    assert any(m.mountpoint == "/proc" for m in pseudo)
    for m in pseudo:
        info = classify(m)
        assert (info.kind, info.reason, info.ignorable) == ("other", "pseudo", True), m


@pytest.mark.parametrize(
    "fstype", ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "fuse.rclone", "ceph", "davfs"]
)
def test_network_filesystems_are_network_shares_without_touching_the_server(fstype: str) -> None:
    info = classify(net(fstype, mountpoint="/nonexistent/share"))
    assert (info.kind, info.reason) == ("network_share", "network_fstype")
    assert info.size_bytes is None  # no statvfs: a dead server would hang the poll


def test_a_network_share_under_a_media_pattern_is_still_a_network_share() -> None:
    info = classify(net("cifs", "//host/share", "/mnt/share"))
    assert (info.kind, info.reason) == ("network_share", "network_fstype")


def test_an_unknown_fuse_filesystem_counts_as_a_network_share() -> None:
    info = classify(net("fuse.mycloudfs", "mycloudfs"))
    assert (info.kind, info.reason) == ("network_share", "fuse")


def test_local_fuse_filesystems_and_appimages_are_other() -> None:
    gvfs = classify(net("fuse.gvfsd-fuse", "gvfsd-fuse", "/run/user/1000/gvfs"))
    appimage = classify(net("fuse.Obsidian", "Obsidian.AppImage", "/tmp/.mount_ObsidiXYZ"))
    assert (gvfs.kind, gvfs.reason) == ("other", "fuse_local")
    assert (appimage.kind, appimage.reason) == ("other", "fuse_local")
    lxcfs = classify(net("fuse.lxcfs", "lxcfs", "/var/lib/lxcfs"))
    assert lxcfs.ignorable


def test_mtp_phones_are_removable_media() -> None:
    info = classify(net("fuse.jmtpfs", "jmtpfs", "/media/u/phone"))
    assert (info.kind, info.reason, info.bus) == ("removable", "mtp", "usb")


def test_hypervisor_and_host_shares_are_network_shares() -> None:
    for fstype in ("9p", "virtiofs", "vboxsf", "fuse.vmhgfs-fuse"):
        info = classify(net(fstype, "hostshare", "/mnt/hgfs"))
        assert (info.kind, info.reason) == ("network_share", "host_share"), fstype


def test_a_root_filesystem_on_nfs_is_other_so_every_path_is_not_a_share() -> None:
    info = classify(net("nfs", "server:/roots/host1", "/"))
    assert (info.kind, info.reason) == ("other", "root_filesystem")


def test_snap_squashfs_is_ignorable_but_squashfs_elsewhere_is_classified() -> None:
    snap = classify(Mount(70, 7, 3, "/", "/snap/core22/1380", ("ro",), "squashfs", "/dev/loop3"))
    other = Mount(71, 7, 4, "/", "/media/u/LIVE", ("ro",), "squashfs", "/dev/loop4")
    assert snap.ignorable
    media = classify(other, sysfs="/nonexistent")
    assert (media.kind, media.reason, media.ignorable) == ("removable", "mountpoint_pattern", False)


def test_a_usb_disk_is_removable_by_bus_with_its_usb_identity(
    usb_sysfs: Path, tmp_path: Path
) -> None:
    dev_disk = tmp_path / "dev" / "disk"
    link(dev_disk / "by-label" / "MY\\x20STICK", "../../sdb1")
    link(dev_disk / "by-label" / "OTHER", "../../sda1")
    m = Mount(80, 8, 17, "/", "/srv/stick", ("rw",), "vfat", "/dev/sdb1")
    info = classify(m, sysfs=str(usb_sysfs), dev_disk=str(dev_disk))
    assert (info.kind, info.reason, info.bus) == ("removable", "usb_bus", "usb")
    assert (info.device, info.label) == ("sdb1", "MY STICK")
    assert (info.vendor, info.model) == ("SanDisk", "Cruzer Blade")
    assert (info.serial, info.usb_id) == ("4C530001180830117033", "0781:5567")
    assert info.size_bytes is None  # /srv/stick does not exist here
    record = info.to_dict()
    assert record["usb_id"] == "0781:5567" and record["device_number"] == "8:17"
    assert "size_bytes" not in record
    json.dumps(record)


def test_usb_facts_fall_back_to_the_scsi_inquiry_strings(usb_sysfs: Path) -> None:
    for name in ("manufacturer", "product", "serial"):
        (usb_sysfs / USB_DEV / name).unlink()
    m = Mount(81, 8, 16, "/", "/srv/stick", ("rw",), "ext4", "/dev/sdb")
    info = classify(m, sysfs=str(usb_sysfs), dev_disk="/nonexistent/disk")
    assert (info.device, info.vendor, info.model, info.serial) == (
        "sdb",
        "SanDisk",
        "Cruzer Blade",
        None,
    )


def test_a_disk_whose_removable_attribute_is_1_is_removable(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    disk = "devices/pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sr0"
    write(sysfs / disk / "removable", "1\n")
    write(sysfs / disk / "device" / "vendor", "HL-DT-ST\n")
    write(sysfs / disk / "device" / "model", "DVDRAM GP57EB40 \n")
    link(sysfs / "dev/block/11:0", "../../" + disk)
    m = Mount(90, 11, 0, "/", "/srv/dvd", ("ro",), "iso9660", "/dev/sr0")
    info = classify(m, sysfs=str(sysfs), dev_disk=str(tmp_path / "nodisk"))
    assert (info.kind, info.reason, info.bus, info.device) == (
        "removable",
        "sysfs_removable",
        "ata",
        "sr0",
    )
    assert (info.vendor, info.model) == ("HL-DT-ST", "DVDRAM GP57EB40")


def test_an_sd_card_is_removable_but_soldered_emmc_is_not(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    host = "devices/platform/soc/mmc_host/mmc0/mmc0:0001"
    for minor, card_type in ((0, "SD"), (8, "MMC")):
        disk = f"{host}-{minor}/block/mmcblk{minor}"
        write(sysfs / disk / "removable", "0\n")
        write(sysfs / disk / "device" / "type", card_type + "\n")
        write(sysfs / disk / "device" / "name", "SC64G\n")
        link(sysfs / f"dev/block/179:{minor}", "../../" + disk)
    sd = classify(Mount(1, 179, 0, "/", "/srv/sd", (), "exfat", "/dev/mmcblk0"), sysfs=str(sysfs))
    emmc = classify(Mount(2, 179, 8, "/", "/srv/e", (), "ext4", "/dev/mmcblk8"), sysfs=str(sysfs))
    assert (sd.kind, sd.reason, sd.bus, sd.model) == ("removable", "sd_card", "mmc", "SC64G")
    assert (emmc.kind, emmc.reason, emmc.bus) == ("other", "local", "mmc")


def test_an_encrypted_usb_stick_behind_device_mapper_is_removable(usb_sysfs: Path) -> None:
    dm = usb_sysfs / "devices/virtual/block/dm-0"
    write(dm / "removable", "0\n")
    link(dm / "slaves" / "sdb1", "../../../../" + USB_DISK.removeprefix("devices/") + "/sdb1")
    link(usb_sysfs / "dev/block/253:0", "../../devices/virtual/block/dm-0")
    m = Mount(95, 253, 0, "/", "/srv/secret", ("rw",), "ext4", "/dev/mapper/luks-1")
    info = classify(m, sysfs=str(usb_sysfs))
    assert (info.kind, info.reason, info.device, info.backing) == (
        "removable",
        "usb_bus",
        "dm-0",
        "sdb1",
    )
    assert info.usb_id == "0781:5567"


def test_a_network_block_device_is_a_network_share(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    write(sysfs / "devices/virtual/block/nbd0/removable", "0\n")
    link(sysfs / "dev/block/43:0", "../../devices/virtual/block/nbd0")
    info = classify(Mount(3, 43, 0, "/", "/srv/nbd", (), "ext4", "/dev/nbd0"), sysfs=str(sysfs))
    assert (info.kind, info.reason, info.bus) == ("network_share", "network_block_device", "nbd")


def test_a_loop_device_reports_its_backing_file_and_is_not_media_by_itself(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    write(sysfs / "devices/virtual/block/loop3/removable", "0\n")
    write(sysfs / "devices/virtual/block/loop3/loop/backing_file", "/home/u/disk.img\n")
    link(sysfs / "dev/block/7:3", "../../devices/virtual/block/loop3")
    outside = Mount(4, 7, 3, "/", "/srv/img", (), "ext4", "/dev/loop3")
    inside = Mount(5, 7, 3, "/", "/media/u/IMG", (), "ext4", "/dev/loop3")
    a = classify(outside, sysfs=str(sysfs))
    b = classify(inside, sysfs=str(sysfs))
    assert (a.kind, a.reason, a.bus, a.backing) == ("other", "local", "loop", "/home/u/disk.img")
    assert (b.kind, b.reason, b.bus) == ("removable", "mountpoint_pattern", "loop")


def test_missing_or_unreadable_sysfs_entries_give_none_not_exceptions(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    disk = sysfs / "devices/pci0000:00/0000:00:02.0/virtio1/block/vdb"
    (disk / "removable").mkdir(parents=True)  # a directory where a file belongs: EISDIR
    (disk / "device" / "vendor").mkdir(parents=True)
    link(sysfs / "dev/block/252:16", "../../devices/pci0000:00/0000:00:02.0/virtio1/block/vdb")
    link(sysfs / "dev/block/252:32", "../../devices/gone")
    a = classify(Mount(6, 252, 16, "/", "/srv/a", (), "xfs", "/dev/vdb"), sysfs=str(sysfs))
    b = classify(Mount(7, 252, 32, "/", "/srv/b", (), "xfs", "/dev/vdc"), sysfs=str(sysfs))
    c = classify(Mount(8, 252, 48, "/", "/srv/c", (), "xfs", "/dev/vdd"), sysfs="/nonexistent")
    assert (a.kind, a.device, a.bus, a.vendor) == ("other", "vdb", "virtio", None)
    assert (b.kind, b.device) == ("other", None)
    assert (c.kind, c.device) == ("other", None)


def test_removable_patterns_match_component_by_component() -> None:
    patterns = ("/media/*", "/media/*/*", "/run/media/*/*", "/mnt/*")
    assert mountpoint_matches("/media/usb", patterns)
    assert mountpoint_matches("/media/alice/STICK", patterns)
    assert mountpoint_matches("/run/media/alice/STICK", patterns)
    assert mountpoint_matches("/mnt/backup", patterns)
    assert not mountpoint_matches("/media/alice/STICK/sub", patterns)
    assert not mountpoint_matches("/run/media/alice", patterns)
    assert not mountpoint_matches("/mnt/sandboxing/model_tools_env/v1/python", patterns)
    assert not mountpoint_matches("/home/alice/media/x", patterns)
    assert not mountpoint_matches("/mnt/a/b", ("/mnt/*",))


# --- labels without blkid ----------------------------------------------------------------------


def test_labels_are_read_from_ext_fat_and_iso9660_superblocks(tmp_path: Path) -> None:
    fat32 = bytearray(4096)
    fat32[71:82] = b"CAMERA     "
    fat32[82:90] = b"FAT32   "
    fat32[510:512] = b"\x55\xaa"
    fat16 = bytearray(4096)
    fat16[43:54] = b"OLDSTICK   "
    fat16[54:62] = b"FAT16   "
    fat16[510:512] = b"\x55\xaa"
    unnamed = bytearray(fat16)
    unnamed[43:54] = b"NO NAME    "
    iso = bytearray(36 * 1024)
    iso[32768:32774] = b"\x01CD001"
    iso[32768 + 40 : 32768 + 72] = b"UBUNTU_24_04".ljust(32)
    for name, data, label in [
        ("fat32", fat32, "CAMERA"),
        ("fat16", fat16, "OLDSTICK"),
        ("unnamed", unnamed, None),
        ("iso", iso, "UBUNTU_24_04"),
        ("zeros", bytearray(40000), None),
        ("short", bytearray(b"x" * 10), None),
    ]:
        (tmp_path / name).write_bytes(bytes(data))
        assert read_fs_label(str(tmp_path / name)) == label, name
    assert read_fs_label(str(tmp_path / "missing")) is None


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 not installed")
def test_an_ext4_image_label_is_read_from_its_superblock(tmp_path: Path) -> None:
    img = tmp_path / "img"
    with open(img, "wb") as fh:
        fh.truncate(4 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "EXFILTEST", str(img)], check=True)
    assert read_fs_label(str(img)) == "EXFILTEST"
    assert struct.unpack_from("<H", img.read_bytes()[:2048], 1080)[0] == 0xEF53


# --- MountWatcher on a mount table file --------------------------------------------------------

ROOT_LINE = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw"
PROC_LINE = "22 27 0:21 / /proc rw,relatime - proc proc rw"


def nfs_line(mount_id: int, mountpoint: str, opts: str = "rw") -> str:
    return f"{mount_id} 27 0:{mount_id} / {mountpoint} {opts} - nfs4 srv:/x rw,addr=10.0.0.5"


def table(path: Path, *lines: str) -> None:
    path.write_text("\n".join(lines) + "\n")


def no_report(rec: dict[str, Any]) -> None:
    """The reporter of a watcher that must have nothing to report."""
    raise AssertionError(f"unexpected health record: {rec}")


def watcher(path: Path, **kw: object) -> MountWatcher:
    kw.setdefault("sysfs", "/nonexistent")
    kw.setdefault("dev_disk", "/nonexistent/disk")
    kw.setdefault("report", no_report)
    return MountWatcher(path=str(path), **kw)  # type: ignore[arg-type]


def health(records: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"]["action"] == action]


def points(infos: list[MountInfo]) -> list[str]:
    return [i.mount.mountpoint for i in infos]


def test_start_reads_the_table_once_and_polls_report_only_changes_after_it(
    tmp_path: Path,
) -> None:
    mi = tmp_path / "mountinfo"
    table(mi, PROC_LINE, ROOT_LINE, nfs_line(40, "/srv/a"))
    w = watcher(mi)
    w.start()
    assert points(w.current()) == ["/srv/a"]
    assert w.poll() == ([], [])
    table(mi, PROC_LINE, ROOT_LINE, nfs_line(40, "/srv/a"), nfs_line(41, "/srv/b"))
    added, removed = w.poll()
    assert (points(added), removed) == (["/srv/b"], [])
    stats = w.stats()
    assert (stats["mounts_tracked"], stats["mounts_known"], stats["errors"]) == (2, 4, 0)
    w.stop()
    w.stop()


def test_the_watcher_keeps_the_component_contract() -> None:
    from agent.components import Component

    w = MountWatcher(report=no_report)
    assert isinstance(w, Component) and w.name == "mounts"
    w.stop()  # before start: harmless
    w.start()
    assert w.stats()["reads"] == 1 and w.stats()["last_error"] is None
    w.stop()
    w.stop()


def test_the_first_poll_reports_current_shares_and_later_polls_only_changes(
    tmp_path: Path,
) -> None:
    mi = tmp_path / "mountinfo"
    table(mi, PROC_LINE, ROOT_LINE, nfs_line(40, "/srv/a"))
    w = watcher(mi)
    added, removed = w.poll()
    assert (points(added), removed) == (["/srv/a"], [])
    assert w.poll() == ([], [])
    table(mi, PROC_LINE, ROOT_LINE, nfs_line(41, "/srv/b"))
    added, removed = w.poll()
    assert (points(added), points(removed)) == (["/srv/b"], ["/srv/a"])
    assert points(w.current()) == ["/srv/b"]


def test_a_remount_with_other_options_is_not_a_new_mount(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    table(mi, ROOT_LINE, nfs_line(40, "/srv/a", "rw"))
    w = watcher(mi)
    w.poll()
    table(mi, ROOT_LINE, nfs_line(40, "/srv/a", "ro"))
    assert w.poll() == ([], [])
    assert w.current()[0].mount.options == ("ro",)


def test_a_reused_mount_id_on_another_mountpoint_is_an_unmount_and_a_mount(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    table(mi, ROOT_LINE, nfs_line(40, "/srv/a"))
    w = watcher(mi)
    w.poll()
    table(mi, ROOT_LINE, nfs_line(40, "/srv/b"))
    added, removed = w.poll()
    assert (points(added), points(removed)) == (["/srv/b"], ["/srv/a"])


def test_other_mounts_are_reported_only_when_asked_for(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    table(mi, PROC_LINE, ROOT_LINE, nfs_line(40, "/srv/a"))
    assert points(watcher(mi).poll()[0]) == ["/srv/a"]
    everything = watcher(mi, include_other=True).poll()[0]
    assert points(everything) == ["/proc", "/", "/srv/a"]


def test_kind_of_gives_the_deepest_mount_a_path_is_on(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    table(
        mi,
        ROOT_LINE,
        nfs_line(40, "/srv/a"),
        nfs_line(41, "/srv/a/inner"),
        "42 40 0:90 / /srv/a/tmp rw - tmpfs tmpfs rw",
        nfs_line(43, "/srv/space\\040dir"),
    )
    w = watcher(mi)
    w.poll()
    a = w.kind_of("/srv/a/x/y.txt")
    assert a is not None and a.mount.mountpoint == "/srv/a"
    inner = w.kind_of("/srv/a/inner/deep/file")
    assert inner is not None and inner.mount.mountpoint == "/srv/a/inner"
    assert w.kind_of("/srv/a") is a
    assert w.kind_of("/srv/a/tmp/f") is None  # on the tmpfs over the share, not the share
    assert w.kind_of("/srv/ab/f") is None  # component-wise, not a string prefix
    assert w.kind_of("/home/u/f") is None
    assert w.kind_of("relative/f") is None
    spaced = w.kind_of("/srv/space dir/f")
    assert spaced is not None and spaced.mount.mountpoint == "/srv/space dir"
    assert w.kind_of("/srv/a/../b/f") is None


def test_the_number_of_tracked_mounts_is_capped_and_earlier_mounts_keep_their_place(
    tmp_path: Path,
) -> None:
    mi = tmp_path / "mountinfo"
    table(mi, ROOT_LINE, nfs_line(40, "/srv/a"), nfs_line(41, "/srv/b"))
    records: list[dict[str, Any]] = []
    w = watcher(mi, max_tracked=2, report=records.append)
    assert points(w.poll()[0]) == ["/srv/a", "/srv/b"]
    assert records == []
    table(mi, ROOT_LINE, nfs_line(39, "/srv/new"), nfs_line(40, "/srv/a"), nfs_line(41, "/srv/b"))
    assert w.poll() == ([], [])
    assert w.over_cap == 1
    assert points(w.current()) == ["/srv/a", "/srv/b"]
    (cap,) = health(records, "cap_reached")
    assert cap["event"]["reason"] == "tracked_mounts"
    assert cap["exfilwatch"]["health"] == {"cap": 2, "hits": 1, "untracked": 1}
    table(mi, ROOT_LINE, nfs_line(39, "/srv/new"), nfs_line(41, "/srv/b"))
    added, removed = w.poll()
    assert (points(added), points(removed), w.over_cap) == (["/srv/new"], ["/srv/a"], 0)
    assert len(records) == 1


def test_an_unreadable_mount_table_changes_nothing_keeps_state_and_is_a_source_error(
    tmp_path: Path,
) -> None:
    mi = tmp_path / "mountinfo"
    table(mi, ROOT_LINE, nfs_line(40, "/srv/a"))
    records: list[dict[str, Any]] = []
    w = watcher(mi, report=records.append)
    w.poll()
    mi.unlink()
    assert w.poll() == ([], [])
    assert w.last_error is not None and "FileNotFoundError" in w.last_error
    assert points(w.current()) == ["/srv/a"]
    (error,) = health(records, "source_error")
    assert error["event"]["reason"] == "ENOENT"
    assert error["exfilwatch"]["health"]["source"] == "mounts"
    table(mi, ROOT_LINE)
    assert points(w.poll()[1]) == ["/srv/a"]
    assert w.last_error is None
    assert len(records) == 1


def test_a_mount_table_that_stays_unreadable_is_reported_once_per_distinct_error(
    tmp_path: Path,
) -> None:
    mi = tmp_path / "mountinfo"
    mi.mkdir()  # a directory where the table belongs: EISDIR on every read
    records: list[dict[str, Any]] = []
    w = watcher(mi, report=records.append)
    w.start()
    for _ in range(20):
        assert w.poll() == ([], [])
    (error,) = records
    assert (error["event"]["action"], error["event"]["reason"]) == ("source_error", "EISDIR")
    data = error["exfilwatch"]["health"]
    assert (data["source"], data["path"]) == ("mounts", str(mi))
    assert "IsADirectoryError" in data["message"]
    mi.rmdir()
    w.poll()
    w.poll()
    assert [r["event"]["reason"] for r in records] == ["EISDIR", "ENOENT"]
    # Readable again: what is mounted is reported as added; a later failure is news again.
    table(mi, ROOT_LINE, nfs_line(40, "/srv/a"))
    assert points(w.poll()[0]) == ["/srv/a"]
    mi.unlink()
    w.poll()
    assert [r["event"]["reason"] for r in records] == ["EISDIR", "ENOENT", "ENOENT"]
    assert w.stats()["errors"] == 24


def test_the_real_mount_table_is_read_only_when_the_kernel_flags_a_change() -> None:
    with MountWatcher(report=no_report) as w:
        w.poll()
        reads = w.reads
        for _ in range(50):
            assert w.poll() == ([], [])
        assert w.reads == reads  # POLLPRI said nothing changed: no read at all


# --- real mounts -------------------------------------------------------------------------------


@pytest.fixture
def tmpfs_at(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Mounts a small tmpfs on a directory; always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mounted: list[Path] = []

    def mount(target: Path) -> None:
        target.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "mnttest", str(target)], check=True
        )
        mounted.append(target)

    try:
        yield mount
    finally:
        for target in mounted:
            subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.root
def test_a_mount_made_while_the_watcher_was_stopped_is_reported_after_start(
    tmp_path: Path, tmpfs_at: Callable[[Path], None]
) -> None:
    w = MountWatcher(report=no_report, include_other=True)
    w.start()
    w.stop()
    target = tmp_path / "while-stopped"
    tmpfs_at(target)
    w.start()
    try:
        added, _ = w.poll()
        assert str(target) in points(added)
    finally:
        w.stop()


@pytest.mark.root
def test_start_after_a_poll_leaves_changes_since_that_poll_to_the_next_poll(
    tmp_path: Path, tmpfs_at: Callable[[Path], None]
) -> None:
    w = MountWatcher(report=no_report, include_other=True)
    w.poll()
    target = tmp_path / "before-start"
    tmpfs_at(target)
    w.start()
    try:
        assert str(target) in points(w.poll()[0])
    finally:
        w.stop()


def poll_until(
    w: MountWatcher, done: Callable[[list[MountInfo], list[MountInfo]], bool], timeout: float
) -> tuple[list[MountInfo], list[MountInfo]]:
    deadline = time.monotonic() + timeout
    seen_added: list[MountInfo] = []
    seen_removed: list[MountInfo] = []
    while True:
        added, removed = w.poll()
        seen_added += added
        seen_removed += removed
        if done(seen_added, seen_removed) or time.monotonic() > deadline:
            return seen_added, seen_removed
        time.sleep(0.05)


@needs_mount
@pytest.mark.root
def test_a_loop_image_mounted_under_media_is_reported_as_removable_at_the_next_poll(
    loop_mount: Callable[[Path], Path], tmp_path: Path
) -> None:
    # The first poll after mount(8) returns reports it (the agent polls when the kernel says
    # the mount table changed): no wall-clock bound, which a loaded machine would break.
    user = f"exfiltest-{uuid.uuid4().hex[:12]}"
    target = Path("/media") / user / "EXFILTEST"
    with MountWatcher(report=no_report) as w:
        assert all(i.mount.mountpoint != str(target) for i in w.poll()[0])
        loop_mount(target)
        added, _ = w.poll()
        (info,) = [i for i in added if i.mount.mountpoint == str(target)]
        assert info.kind == "removable"
        assert info.reason in ("mountpoint_pattern", "sysfs_removable")
        assert (info.label, info.bus, info.backing) == ("EXFILTEST", "loop", str(tmp_path / "img"))
        assert info.device is not None and info.device.startswith("loop")
        assert info.size_bytes is not None and 8 * 1024 * 1024 < info.size_bytes <= 16 * 1024**2
        secret = target / "design.v"
        secret.write_text("module top; endmodule\n")
        on = w.kind_of(str(secret))
        assert on is not None and on.mount.mountpoint == str(target)
        assert w.kind_of(str(tmp_path / "x")) is None

        subprocess.run(["umount", str(target)], check=True)
        _, removed = w.poll()
        assert [i.mount.mountpoint for i in removed] == [str(target)]
        assert w.kind_of(str(secret)) is None
        # mount -o loop sets autoclear; the kernel may detach the device a moment later.
        deadline = time.monotonic() + 30
        while losetup_for(tmp_path / "img") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert losetup_for(tmp_path / "img") == ""


@needs_mount
@pytest.mark.root
def test_a_loop_image_mounted_outside_the_patterns_is_other(
    loop_mount: Callable[[Path], Path], tmp_path: Path
) -> None:
    target = tmp_path / "mnt"
    with (
        MountWatcher(report=no_report) as interesting,
        MountWatcher(report=no_report, include_other=True) as everything,
    ):
        interesting.poll()
        everything.poll()
        loop_mount(target)
        assert poll_until(interesting, lambda a, r: bool(a), 0.5) == ([], [])
        added, _ = poll_until(everything, lambda a, r: bool(a), 2.0)
        (info,) = [i for i in added if i.mount.mountpoint == str(target)]
        assert (info.kind, info.reason, info.bus, info.label) == (
            "other",
            "local",
            "loop",
            "EXFILTEST",
        )
        assert interesting.kind_of(str(target / "f")) is None
        assert everything.kind_of(str(target / "f")) is None  # tracked, but not media

        subprocess.run(["umount", str(target)], check=True)
        _, removed = poll_until(everything, lambda a, r: bool(r), 2.0)
        assert [i.mount.mountpoint for i in removed] == [str(target)]
