"""Mounts: removable media and network shares as they come and go, from the kernel mount table."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import os
import re
import select
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from agent.events import text_and_raw as _text_and_raw
from agent.health import CapReporter, Reporter, record

log = structlog.get_logger(__name__)

DEFAULT_REMOVABLE_PATTERNS: tuple[str, ...] = (
    "/media/*",
    "/media/*/*",
    "/run/media/*/*",
    "/mnt/*",
    "/Volumes/*",
)

# Filesystems whose data lives on another machine. Known FUSE network clients are listed so they
# get the precise reason; any other FUSE filesystem is a network share too (see _fuse_kind).
NETWORK_FSTYPES: frozenset[str] = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "ceph",
        "fuse.ceph-fuse",
        "glusterfs",
        "fuse.glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "orangefs",
        "pvfs2",
        "davfs",
        "fuse.davfs",
        "fuse.davfs2",
        "sshfs",
        "fuse.sshfs",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.goofys",
        "fuse.juicefs",
        "fuse.curlftpfs",
        "fuse.smbnetfs",
        "fuse.onedriver",
        "fuse.google-drive-ocamlfuse",
    }
)

# Folders the hypervisor or the Windows host shares into this machine: a copy there leaves the
# machine as surely as a copy to an NFS server, so they are network shares (reason host_share).
HOST_SHARE_FSTYPES: frozenset[str] = frozenset(
    {"9p", "virtiofs", "vboxsf", "vmhgfs", "fuse.vmhgfs-fuse", "prl_fs", "drvfs"}
)

# FUSE drivers for phones and cameras over MTP: removable media without a block device.
MTP_FSTYPES: frozenset[str] = frozenset(
    {"fuse.jmtpfs", "fuse.simple-mtpfs", "fuse.go-mtpfs", "fuse.aft-mtp-mount", "fuse.mtpfs"}
)

# FUSE filesystems that only re-present local data. gvfsd-fuse is mounted for every desktop
# session whether or not anything is attached; the gvfs backends behind it (smb, sftp, mtp) are
# not separate mounts, so they need a gvfs monitor, not this table.
LOCAL_FUSE_FSTYPES: frozenset[str] = frozenset(
    {
        "fuse.gvfsd-fuse",
        "fuse.gvfs-fuse-daemon",
        "fuse.portal",
        "fuse.bindfs",
        "fuse.mergerfs",
        "fuse.unionfs",
        "fuse.encfs",
        "fuse.gocryptfs",
        "fuse.cryfs",
        "fuse.securefs",
        "fuse.squashfuse",
        "fuse.archivemount",
        "fuse.fuse-zip",
    }
)

# Kernel and container plumbing: never media, never a share. Reported as "other" and ignorable.
PSEUDO_FSTYPES: frozenset[str] = frozenset(
    {
        "proc",
        "sysfs",
        "tmpfs",
        "devtmpfs",
        "cgroup",
        "cgroup2",
        "cpuset",
        "overlay",
        "aufs",
        "nsfs",
        "bpf",
        "tracefs",
        "debugfs",
        "securityfs",
        "pstore",
        "mqueue",
        "hugetlbfs",
        "autofs",
        "binfmt_misc",
        "configfs",
        "fusectl",
        "efivarfs",
        "ramfs",
        "devpts",
        "rpc_pipefs",
        "nfsd",
        "selinuxfs",
        "sockfs",
        "pipefs",
        "anon_inodefs",
        "rootfs",
        "fuse.lxcfs",
        "fuse.snapfuse",
        "fuse.fuse-overlayfs",
    }
)

# squashfs is a snap (plumbing) only where snapd mounts it; elsewhere it is an image like any other.
_SNAP_PREFIXES = ("/snap/", "/var/lib/snapd/")

# Tracked (reported) mounts are capped so a pathological table (thousands of bind mounts on a
# Kubernetes node with include_other) cannot grow the watcher's reports without bound.
MAX_TRACKED = 4096

FS_IOC_GETFSLABEL = 0x81009431  # _IOR(0x94, 49, char[256])
_LABEL_MAX = 256
_SLAVE_DEPTH = 4
_SLAVES_MAX = 16
_ATTR_MAX = 4096
_OCTAL = re.compile(rb"\\([0-3][0-7]{2})")
_UDEV_HEX = re.compile(rb"\\x([0-9a-fA-F]{2})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/<pid>/mountinfo, unescaped."""

    mount_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MountInfo:
    """A mount and what it is: removable media, a network share, or other."""

    mount: Mount
    kind: str  # "removable" | "network_share" | "other"
    reason: str
    label: str | None = None
    size_bytes: int | None = None
    device: str | None = None
    vendor: str | None = None
    model: str | None = None
    serial: str | None = None
    bus: str | None = None
    usb_id: str | None = None  # "idVendor:idProduct", the key device allowlists use
    backing: str | None = None  # loop backing file, or the devices under a dm/md device
    ignorable: bool = False  # kernel or container plumbing (proc, tmpfs, overlay, snaps, ...)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe and ECS-friendly: absent values left out, non-UTF-8 paths escaped."""
        m = self.mount
        out: dict[str, Any] = {"kind": self.kind, "reason": self.reason}
        text, raw = _text_and_raw(m.mountpoint)
        out["mountpoint"] = text
        if raw is not None:
            out["mountpoint_raw"] = raw
        out["source"] = _text_and_raw(m.source)[0]
        out["fstype"] = _text_and_raw(m.fstype)[0]
        out["root"] = _text_and_raw(m.root)[0]
        out["options"] = [_text_and_raw(o)[0] for o in m.options]
        out["mount_id"] = m.mount_id
        out["device_number"] = f"{m.major}:{m.minor}"
        for key in ("label", "device", "vendor", "model", "serial", "bus", "usb_id", "backing"):
            value = getattr(self, key)
            if value is not None:
                out[key] = _text_and_raw(value)[0]
        if self.size_bytes is not None:
            out["size_bytes"] = self.size_bytes
        if self.ignorable:
            out["ignorable"] = True
        return out


# --- the mount table ---------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes (space, tab, newline, backslash) byte-exactly."""
    if "\\" not in field:
        return field
    data = _OCTAL.sub(lambda m: bytes((int(m.group(1), 8),)), os.fsencode(field))
    return os.fsdecode(data)


def _parse_line(line: str) -> Mount | None:
    # id parent maj:min root mountpoint options [optional fields...] - fstype source superoptions
    parts = line.split(" ")
    if len(parts) < 9:
        return None
    try:
        sep = parts.index("-", 6)
    except ValueError:
        return None
    if len(parts) < sep + 3:
        return None
    major_text, colon, minor_text = parts[2].partition(":")
    if not colon:
        return None
    try:
        mount_id = int(parts[0])
        int(parts[1])
        major, minor = int(major_text), int(minor_text)
    except ValueError:
        return None
    root, mountpoint = parts[3], parts[4]
    fstype = parts[sep + 1]
    if not root.startswith("/") or not mountpoint.startswith("/") or not fstype:
        return None
    return Mount(
        mount_id=mount_id,
        major=major,
        minor=minor,
        root=_unescape(root),
        mountpoint=_unescape(mountpoint),
        options=tuple(parts[5].split(",")) if parts[5] else (),
        fstype=_unescape(fstype),
        source=_unescape(parts[sep + 2]),
        super_options=tuple(_unescape(parts[sep + 3]).split(","))
        if len(parts) > sep + 3 and parts[sep + 3]
        else (),
    )


def parse_mountinfo(text: str) -> list[Mount]:
    """Every well-formed mountinfo line, in table order; malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.split("\n"):
        if not line:
            continue
        try:
            mount = _parse_line(line)
        except (ValueError, IndexError, UnicodeError):
            continue
        if mount is not None:
            mounts.append(mount)
    return mounts


def _read_table(path: str) -> str:
    with open(path, "rb") as fh:
        return os.fsdecode(fh.read())


def read_mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    """The mount table of this process's mount namespace; OSError when it cannot be read."""
    return parse_mountinfo(_read_table(path))


# --- classification ----------------------------------------------------------------------------


def mountpoint_matches(mountpoint: str, patterns: Iterable[str]) -> bool:
    """Whether a pattern matches the mountpoint component by component ('*' never crosses '/')."""
    parts = mountpoint.rstrip("/").split("/")
    for pattern in patterns:
        pattern_parts = pattern.rstrip("/").split("/")
        if len(pattern_parts) == len(parts) and all(
            fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts, strict=True)
        ):
            return True
    return False


def _read_attr(path: str) -> str | None:
    """A sysfs attribute, stripped; None when missing, unreadable or empty."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_ATTR_MAX)
    except (OSError, ValueError):
        return None
    text = data.decode("utf-8", "replace").strip().strip("\0").strip()
    return text or None


@dataclass(frozen=True, slots=True)
class _Block:
    """What sysfs says about one block device."""

    device: str
    bus: str | None = None
    removable: str | None = None  # the reason it is removable media, if it is
    network: bool = False
    vendor: str | None = None
    model: str | None = None
    serial: str | None = None
    usb_id: str | None = None
    backing: str | None = None


_BUS_COMPONENTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"usb\d+"), "usb"),
    (re.compile(r"mmc\d+"), "mmc"),
    (re.compile(r"nvme\d*"), "nvme"),
    (re.compile(r"session\d+"), "iscsi"),
    (re.compile(r"ata\d+"), "ata"),
    (re.compile(r"virtio\d+"), "virtio"),
)
_BUS_NAMES: tuple[tuple[str, str], ...] = (
    ("loop", "loop"),
    ("dm-", "dm"),
    ("md", "md"),
    ("nbd", "nbd"),
    ("rbd", "rbd"),
    ("zram", "zram"),
)
_NETWORK_BUSES = frozenset({"nbd", "rbd", "iscsi"})


def _bus(name: str, components: Sequence[str]) -> str | None:
    for prefix, bus in _BUS_NAMES:
        if name.startswith(prefix) and "virtual" in components:
            return bus
    for pattern, bus in _BUS_COMPONENTS:
        if any(pattern.fullmatch(c) for c in components):
            return bus
    return None


def _usb_device(start: str, sysfs: str) -> str | None:
    """The USB device directory (the one with idVendor) above a sysfs path."""
    path = start
    while path.startswith(sysfs + "/") and path != sysfs:
        if os.path.exists(os.path.join(path, "idVendor")):
            return path
        path = os.path.dirname(path)
    return None


def _block_facts(resolved: str, sysfs: str, depth: int = 0) -> _Block | None:
    """Facts about the block device at a resolved /sys/devices path (partition or whole disk)."""
    if not os.path.isdir(resolved):
        return None
    name = os.path.basename(resolved)
    disk = (
        os.path.dirname(resolved)
        if os.path.exists(os.path.join(resolved, "partition"))
        else resolved
    )
    components = os.path.relpath(resolved, sysfs).split("/")
    bus = _bus(os.path.basename(disk), components)
    dev = os.path.join(disk, "device")
    vendor = _read_attr(os.path.join(dev, "vendor"))
    model = _read_attr(os.path.join(dev, "model")) or _read_attr(os.path.join(dev, "name"))
    serial = _read_attr(os.path.join(dev, "serial"))
    usb_id = None
    removable = None
    if _read_attr(os.path.join(disk, "removable")) == "1":
        removable = "sysfs_removable"
    if bus == "usb":
        usb = _usb_device(resolved, sysfs)
        if usb is not None:
            # The USB descriptors are what the device says it is and what allowlists key on; the
            # SCSI inquiry strings of a usb-storage bridge are often generic.
            vid = _read_attr(os.path.join(usb, "idVendor"))
            pid = _read_attr(os.path.join(usb, "idProduct"))
            usb_id = f"{vid}:{pid}" if vid and pid else None
            vendor = _read_attr(os.path.join(usb, "manufacturer")) or vendor or vid
            model = _read_attr(os.path.join(usb, "product")) or model or pid
            serial = _read_attr(os.path.join(usb, "serial")) or serial
        removable = removable or "usb_bus"
    elif bus == "mmc" and _read_attr(os.path.join(dev, "type")) == "SD":
        # An SD card in a reader; eMMC soldered to the board reports type MMC.
        removable = removable or "sd_card"
    backing = None
    network = bus in _NETWORK_BUSES
    if bus == "loop":
        backing = _read_attr(os.path.join(disk, "loop", "backing_file"))
    elif depth < _SLAVE_DEPTH:
        # dm (LUKS, LVM) and md sit on other devices: an encrypted USB stick is still a USB stick.
        slaves_dir = os.path.join(disk, "slaves")
        try:
            slaves = sorted(os.listdir(slaves_dir))[:_SLAVES_MAX]
        except OSError:
            slaves = []
        under = [
            f
            for s in slaves
            if (f := _block_facts(os.path.realpath(os.path.join(slaves_dir, s)), sysfs, depth + 1))
        ]
        if under:
            backing = ",".join(f.device for f in under)
            hit = next((f for f in under if f.removable), None) or next(
                (f for f in under if f.network), None
            )
            if hit is not None:
                return _Block(
                    device=name,
                    bus=hit.bus,
                    removable=hit.removable,
                    network=hit.network,
                    vendor=hit.vendor,
                    model=hit.model,
                    serial=hit.serial,
                    usb_id=hit.usb_id,
                    backing=backing,
                )
            network = any(f.network for f in under)
    return _Block(
        device=name,
        bus=bus,
        removable=removable,
        network=network,
        vendor=vendor,
        model=model,
        serial=serial,
        usb_id=usb_id,
        backing=backing,
    )


def _device_number(mount: Mount) -> tuple[int, int] | None:
    """The block device under a mount: its own dev_t, or the source node's for anonymous devs."""
    if mount.major != 0:
        return mount.major, mount.minor
    # btrfs and fuseblk (ntfs-3g, exfat-fuse) show an anonymous 0:N; the source names the disk.
    if mount.source.startswith("/dev/"):
        try:
            st = os.stat(mount.source)
        except (OSError, ValueError):
            return None
        if stat.S_ISBLK(st.st_mode):
            return os.major(st.st_rdev), os.minor(st.st_rdev)
    return None


def _udev_unescape(name: str) -> str:
    data = _UDEV_HEX.sub(lambda m: bytes((int(m.group(1), 16),)), os.fsencode(name))
    return data.decode("utf-8", "replace")


def read_fs_label(path: str) -> str | None:
    """The label in an ext2/3/4, FAT or ISO 9660 superblock of a device or image, without blkid."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        head = os.pread(fd, 2048, 0)
        iso = os.pread(fd, 80, 32768) if len(head) == 2048 else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    raw: bytes | None = None
    if len(head) >= 1160 and head[1080:1082] == b"\x53\xef":
        raw = head[1144:1160]
    elif len(head) >= 512 and head[510:512] == b"\x55\xaa":
        if head[82:87] == b"FAT32":
            raw = head[71:82]
        elif head[54:57] == b"FAT":
            raw = head[43:54]
        if raw is not None and raw.strip() == b"NO NAME":
            raw = None
    if raw is None and len(iso) >= 72 and iso[0:6] == b"\x01CD001":
        raw = iso[40:72]
    if raw is None:
        return None
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return text or None


def _label(mount: Mount, device: str | None, dev_disk: str) -> str | None:
    if device is not None:
        by_label = os.path.join(dev_disk, "by-label")
        try:
            names = os.listdir(by_label)
        except OSError:
            names = []
        for name in names:
            try:
                target = os.readlink(os.path.join(by_label, name))
            except OSError:
                continue
            if os.path.basename(os.path.normpath(os.path.join(by_label, target))) == device:
                return _udev_unescape(name)
    # Without udev there are no by-label links: ask the mounted filesystem (ext4, xfs, btrfs, f2fs
    # and more answer FS_IOC_GETFSLABEL without privilege), then read the superblock ourselves.
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(mount.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            buf = bytearray(_LABEL_MAX)
            fcntl.ioctl(fd, FS_IOC_GETFSLABEL, buf)
            text = bytes(buf).split(b"\0", 1)[0].decode("utf-8", "replace").strip()
            if text:
                return text
        finally:
            os.close(fd)
    if device is not None:
        return read_fs_label(os.path.join(os.path.dirname(dev_disk), device))
    return None


def _size(mountpoint: str) -> int | None:
    try:
        st = os.statvfs(mountpoint)
    except (OSError, ValueError):
        return None
    return st.f_blocks * st.f_frsize


def _is_pseudo(mount: Mount) -> bool:
    if mount.fstype in PSEUDO_FSTYPES:
        return True
    return mount.fstype == "squashfs" and mount.mountpoint.startswith(_SNAP_PREFIXES)


def _is_fuse(fstype: str) -> bool:
    return fstype in ("fuse", "fuseblk") or fstype.startswith("fuse.")


def classify(
    mount: Mount,
    *,
    removable_patterns: Sequence[str] = DEFAULT_REMOVABLE_PATTERNS,
    sysfs: str = "/sys",
    dev_disk: str = "/dev/disk",
) -> MountInfo:
    """What a mount is, from its fstype, the block device's sysfs entries and the mountpoint.

    Never raises on missing or unreadable sysfs/dev entries; those facts are just None. The raw
    superblock fallback for the label reads the node under dirname(dev_disk) ("/dev")."""
    fstype = mount.fstype
    if _is_pseudo(mount):
        return MountInfo(mount, "other", "pseudo", ignorable=True)
    if mount.mountpoint == "/":
        # The root filesystem is the machine itself, even when it boots from USB or NFS; calling
        # it media or a share would make every path on the host look like an exfil destination.
        if fstype in NETWORK_FSTYPES or fstype in HOST_SHARE_FSTYPES or _is_fuse(fstype):
            return MountInfo(mount, "other", "root_filesystem")
        return _block_info(mount, "other", "root_filesystem", sysfs, dev_disk)
    if fstype in NETWORK_FSTYPES:
        # No statvfs or label: a dead server would block the poll in the kernel (hard mounts).
        return MountInfo(mount, "network_share", "network_fstype")
    if fstype in HOST_SHARE_FSTYPES:
        return MountInfo(mount, "network_share", "host_share")
    if fstype in MTP_FSTYPES:
        return MountInfo(mount, "removable", "mtp", bus="usb")
    if _is_fuse(fstype):
        if mount.major == 0 and _device_number(mount) is not None:
            # fuseblk (ntfs-3g, exfat-fuse): a userspace driver over a real disk; judge the disk.
            # No statvfs: the request goes to the daemon, which may hang.
            return _block_info(mount, None, None, sysfs, dev_disk, patterns=removable_patterns)
        if fstype in LOCAL_FUSE_FSTYPES or os.path.basename(mount.mountpoint).startswith(".mount_"):
            # AppImages mount themselves at /tmp/.mount_XXXX with an fstype named after the app.
            return MountInfo(mount, "other", "fuse_local")
        # An unknown FUSE filesystem is most often a cloud or remote client (s3, drive, ftp):
        # report it as a share rather than miss one.
        return MountInfo(mount, "network_share", "fuse")
    return _block_info(mount, None, None, sysfs, dev_disk, patterns=removable_patterns)


def _block_info(
    mount: Mount,
    kind: str | None,
    reason: str | None,
    sysfs: str,
    dev_disk: str,
    *,
    patterns: Sequence[str] = (),
) -> MountInfo:
    number = _device_number(mount)
    block = None
    if number is not None:
        link = os.path.join(sysfs, "dev", "block", f"{number[0]}:{number[1]}")
        block = _block_facts(os.path.realpath(link), os.path.realpath(sysfs))
    if kind is None:
        if block is not None and block.removable:
            kind, reason = "removable", block.removable
        elif block is not None and block.network:
            kind, reason = "network_share", "network_block_device"
        elif mountpoint_matches(mount.mountpoint, patterns):
            # How a loop-mounted image under /media/<user>/<label> counts: a loop device alone
            # is not media, but a mount where the desktop puts media is treated as media.
            kind, reason = "removable", "mountpoint_pattern"
        else:
            kind, reason = "other", "local"
    assert reason is not None
    device = block.device if block is not None else None
    fuse = _is_fuse(mount.fstype)
    return MountInfo(
        mount,
        kind,
        reason,
        label=None if fuse else _label(mount, device, dev_disk),
        size_bytes=None if fuse else _size(mount.mountpoint),
        device=device,
        vendor=block.vendor if block else None,
        model=block.model if block else None,
        serial=block.serial if block else None,
        bus=block.bus if block else None,
        usb_id=block.usb_id if block else None,
        backing=block.backing if block else None,
    )


# --- the watcher -------------------------------------------------------------------------------

_Key = tuple[int, int, int, str, str, str, str]


def _key(m: Mount) -> _Key:
    # Mount ids are reused after an unmount; with the device, place and source in the key a new
    # mount that reuses an id is still seen as new. Options are left out: a remount is no new mount.
    return (m.mount_id, m.major, m.minor, m.root, m.mountpoint, m.fstype, m.source)


class MountWatcher:
    """Polls the mount table; reports mounts and unmounts since the last poll.

    start() reads the table once: current() is then what is mounted, and each poll() returns
    (added, removed) since the poll before. Cheap when nothing changed: for /proc/<pid>/mountinfo
    the kernel flags the open file with POLLPRI on every mount change in the namespace, so an
    unchanged poll is one poll(2) call; for other paths (tests, replays) the text is re-read and
    compared. Only new mounts are classified. At most max_tracked removable/network mounts are
    tracked (earlier ones kept, later ones counted in over_cap and reported as cap_reached). A
    table that cannot be read is reported as source_error once per distinct error. kind_of() may
    be called from any thread: poll() swaps in new dicts and never mutates the ones readers hold.
    stop() (or close()) releases the notification fd."""

    name = "mounts"

    def __init__(
        self,
        *,
        report: Reporter,
        path: str = "/proc/self/mountinfo",
        removable_patterns: Sequence[str] = DEFAULT_REMOVABLE_PATTERNS,
        sysfs: str = "/sys",
        dev_disk: str = "/dev/disk",
        include_other: bool = False,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self._report = report
        self._caps = CapReporter(report)
        self._path = path
        self._patterns = tuple(removable_patterns)
        self._sysfs = sysfs
        self._dev_disk = dev_disk
        self._include_other = include_other
        self._max = max_tracked
        self._text: str | None = None
        self._stale = True
        self._known: dict[_Key, MountInfo] = {}
        self._tracked: dict[_Key, MountInfo] = {}
        self._by_mountpoint: dict[str, MountInfo | None] = {}
        self._fd: int | None = None
        self._notify: select.poll | None = None
        self.over_cap = 0
        self.last_error: str | None = None
        self.errors = 0
        self.polls = 0
        self.reads = 0

    def start(self) -> None:
        """Read the table: current() is then what is mounted now. A watcher polled before
        start() has read it already and only re-arms its notification. An unreadable table is
        reported, not raised; the next poll() tries again and reports what it finds as added."""
        if self.polls == 0:
            self.poll()
        else:
            self._arm()

    def stop(self) -> None:
        """Release the notification fd; safe twice and before start(). poll() re-arms it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._notify = None
        # A new fd is not flagged for what changed while there was none: read at the next poll.
        self._stale = True

    close = stop

    def stats(self) -> dict[str, Any]:
        return {
            "polls": self.polls,
            "reads": self.reads,
            "mounts_known": len(self._known),
            "mounts_tracked": len(self._tracked),
            "tracked_cap": self._max,
            "over_cap": self.over_cap,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def __enter__(self) -> MountWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _arm(self) -> None:
        # Only the kernel's mount table files signal changes; a regular file never would.
        if self._fd is not None or not self._path.startswith("/proc/"):
            return
        if os.path.basename(self._path) not in ("mountinfo", "mounts"):
            return
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        self._notify = select.poll()
        self._notify.register(self._fd, select.POLLPRI | select.POLLERR)

    def poll(self) -> tuple[list[MountInfo], list[MountInfo]]:
        """(added, removed) since the last call; the first call reports what is mounted now."""
        self.polls += 1
        if self._notify is not None and not self._stale and not self._notify.poll(0):
            return [], []
        # Armed before the read, so a change during the read is flagged for the next poll.
        self._arm()
        try:
            text = _read_table(self._path)
        except OSError as exc:
            self._stale = True
            self.errors += 1
            error = f"{type(exc).__name__}: {exc.strerror or exc}"
            # Polled every second or so: the same failure again says nothing new.
            if error != self.last_error:
                reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                self._report(
                    record(
                        "source_error",
                        reason,
                        source=self.name,
                        path=self._path,
                        message=error,
                        hint="mounts and unmounts are not seen until the table can be read",
                    )
                )
            self.last_error = error
            return [], []
        self.reads += 1
        self._stale = False
        self.last_error = None
        if text == self._text:
            return [], []
        self._text = text
        return self._update(parse_mountinfo(text))

    def _update(self, mounts: list[Mount]) -> tuple[list[MountInfo], list[MountInfo]]:
        known: dict[_Key, MountInfo] = {}
        for m in mounts:
            key = _key(m)
            info = self._known.get(key)
            if info is None:
                info = classify(
                    m,
                    removable_patterns=self._patterns,
                    sysfs=self._sysfs,
                    dev_disk=self._dev_disk,
                )
            elif info.mount != m:
                info = replace(info, mount=m)  # remounted with other options
            known[key] = info
        wanted = [(k, i) for k, i in known.items() if self._include_other or i.kind != "other"]
        # Mounts already tracked keep their place, so hitting the cap never fakes an unmount.
        tracked: dict[_Key, MountInfo] = {k: i for k, i in wanted if k in self._tracked}
        over = 0
        for k, i in wanted:
            if k in tracked or len(tracked) < self._max:
                tracked[k] = i
            else:
                over += 1
        if over:
            self._caps.hit("tracked_mounts", self._max, untracked=over)
        self.over_cap = over
        # The last mount on a mountpoint is the one on top: paths there are on it.
        by_mountpoint: dict[str, MountInfo | None] = {}
        for m in mounts:
            info = tracked.get(_key(m))
            by_mountpoint[m.mountpoint] = (
                info if info is not None and info.kind != "other" else None
            )
        added = [i for k, i in tracked.items() if k not in self._tracked]
        removed = [i for k, i in self._tracked.items() if k not in tracked]
        self._known, self._tracked, self._by_mountpoint = known, tracked, by_mountpoint
        for info in added:
            log.debug("mount_added", mountpoint=info.mount.mountpoint, kind=info.kind)
        for info in removed:
            log.debug("mount_removed", mountpoint=info.mount.mountpoint, kind=info.kind)
        return added, removed

    def current(self) -> list[MountInfo]:
        """The tracked mounts as of the last poll, in table order."""
        return list(self._tracked.values())

    def kind_of(self, path: str) -> MountInfo | None:
        """The removable/network mount an absolute path is on, or None.

        The mount is the deepest mountpoint that is a component-wise prefix of the path; if that
        mount is not removable or a share (a tmpfs over part of a stick, say), the answer is None.
        No filesystem access: symlinks in the path are not resolved."""
        if not path.startswith("/"):
            return None
        index = self._by_mountpoint
        p = "/" + os.path.normpath(path).lstrip("/")
        while True:
            if p in index:
                return index[p]
            if p == "/":
                return None
            p = os.path.dirname(p)
