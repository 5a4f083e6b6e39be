"""The CPython floor of ``exfilwatch record``: the least a Python process can do and still
write exfilwatch's record line for every file event of a burst. bench/capture.py runs it
beside inotifywait and exfilwatch (``--floor``) to show how much of exfilwatch's cost is
Python itself and how much is exfilwatch. Not a product: no rescans, no overflow handling,
no moves, no excludes, no health records, one tagged tree, names that are not UTF-8 are
replaced.

    python bench/floor.py OUTPUT TREE [TREE...]

Watches every directory under each TREE (open, modify, close, attributes), prints
"Watches established." on stderr (as inotifywait does), then per read of the kernel queue:
one lstat per path, one line per event with the fields and key order of exfilwatch's record
line for a file event (@timestamp, event, file with its stat fields, exfilwatch, host),
encoded by msgspec in C as one newline-separated batch, and one write. Ends on SIGTERM.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import termios
import time

import msgspec
from inotify_simple import INotify
from inotify_simple import flags as F

MASK = F.OPEN | F.MODIFY | F.CLOSE_WRITE | F.CLOSE_NOWRITE | F.ATTRIB | F.ONLYDIR
ACTIONS = {
    int(F.OPEN): ("opened", ("access",)),
    int(F.MODIFY): ("modified", ("change",)),
    int(F.CLOSE_WRITE): ("closed_write", ("change",)),
    int(F.CLOSE_NOWRITE): ("closed_nowrite", ("access",)),
    int(F.ATTRIB): ("attributes_changed", ("change",)),
}
HEADER = struct.Struct("iIII")
READ_MAX = 1 << 20  # bytes per read, as exfilwatch reads
CATEGORY = ("file",)


class Event(msgspec.Struct, gc=False):
    kind: str
    category: tuple[str, ...]
    type: tuple[str, ...]
    action: str
    sequence: int
    module: str
    dataset: str


class File(msgspec.Struct, gc=False):
    path: str
    name: str
    directory: str
    type: str
    size: int
    uid: str
    gid: str
    inode: str
    mode: str
    mtime: str


class Location(msgspec.Struct, gc=False, rename={"klass": "class"}):
    klass: str


class Ext(msgspec.Struct, gc=False):
    source: str
    tags: tuple[str, ...]
    root: str
    location: Location


class Host(msgspec.Struct, gc=False):
    hostname: str


class Line(msgspec.Struct, gc=False, rename={"timestamp": "@timestamp"}):
    timestamp: str
    event: Event
    file: File
    exfilwatch: Ext
    host: Host


def stamp(us: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 1_000_000)) + (
        f".{us % 1_000_000:06d}Z"
    )


def watch(ino: INotify, trees: list[str]) -> dict[int, tuple[str, Ext]]:
    dirs: dict[int, tuple[str, Ext]] = {}
    for tree in trees:
        ext = Ext("inotify", ("bench",), tree, Location("tagged"))
        stack = [tree]
        while stack:
            d = stack.pop()
            dirs[ino.add_watch(d, MASK)] = (d, ext)
            with os.scandir(d) as it:
                stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
    return dirs


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = os.open(argv[0], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    ino = INotify()
    dirs = watch(ino, argv[1:])
    print("Watches established.", file=sys.stderr, flush=True)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    host = Host(socket.gethostname())
    encode_lines = msgspec.json.Encoder().encode_lines
    poller = select.poll()
    poller.register(ino.fileno(), select.POLLIN)
    avail = array.array("i", [0])
    unpack = HEADER.unpack_from
    sequence = 0
    modes = {m: f"{m:04o}" for m in range(0o10000)}
    while not stop:
        if not poller.poll(500):  # SIGTERM is seen within half a second
            continue
        fcntl.ioctl(ino.fileno(), termios.FIONREAD, avail, True)
        data = os.read(ino.fileno(), min(max(avail[0], 4096), READ_MAX))
        ts = stamp(time.time_ns() // 1000)
        files: dict[str, File | None] = {}
        lines: list[Line] = []
        pos, end = 0, len(data)
        while pos < end:
            wd, mask, _, size = unpack(data, pos)
            pos += 16
            name = data[pos : pos + size].rstrip(b"\0").decode("utf-8", "replace")
            pos += size
            got = ACTIONS.get(mask)  # one plain action on a file: ISDIR and the rest are not
            if got is None or not name:
                continue
            where = dirs.get(wd)
            if where is None:
                continue
            directory, ext = where
            path = f"{directory}/{name}"
            if path in files:
                f = files[path]
            else:
                try:
                    st = os.lstat(path)
                except OSError:
                    f = None
                else:
                    f = File(
                        path,
                        name,
                        directory,
                        "file",
                        st.st_size,
                        str(st.st_uid),
                        str(st.st_gid),
                        str(st.st_ino),
                        modes[st.st_mode & 0o7777],
                        stamp(st.st_mtime_ns // 1000),
                    )
                files[path] = f
            if f is None:
                continue
            sequence += 1
            event = Event(
                "event", CATEGORY, got[1], got[0], sequence, "exfilwatch", "exfilwatch.file"
            )
            lines.append(Line(ts, event, f, ext, host))
        if lines:
            os.write(out, encode_lines(lines))
    os.close(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
