"""The durable outbox: every alert and health record is stored here before any sink is tried,
and leaves only when every sink that takes it has acknowledged it.

An append-only log under `state_dir/outbox/` (directory 0700, files 0600): segment files
`<first id>.log` of at most SEGMENT_BYTES, one record per line (`ID KIND SEVERITY CREATED
JSON`), and `cursors.json`, each sink's cursor (Filebeat's registry idea: a sink has
everything up to its cursor that it takes). A segment goes when every record in it is below
every cursor. Sinks deliver in order, so a cursor is all the acknowledgement state there is.

Why a log and not SQLite: the same 2 KB alert cost 10-15 us in SQLite (WAL pages, then the
checkpoint writes them again) against 2-4 us appended to a file (bench/delivery.py); a log is
one write per batch, the same as the file sink's own.

Fsync policy (`outbox.sync`): `full` (the default) fdatasyncs each batch before any sink is
tried, so a stored record survives a power loss; `normal` leaves it to the page cache, so it
survives a crash or `kill -9` of the agent, but a power loss may take the last seconds.
Cursors are written (temporary file, fsync, rename) at most every PRUNE_INTERVAL: a crash in
between means some records are delivered twice, which at-least-once allows.

When the disk refuses a write (full, read-only, I/O error), the batch is cut back off the file
and kept in memory (capped), the disk is tried again at the next append or tick, and both the
failure and the recovery are reported. Without a path the outbox lives in memory only (tests,
`outbox: {enabled: false}`)."""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.health import record
from agent.state import fsync_dir, write_private

log = structlog.get_logger(__name__)

OUTBOX_DIR = "outbox"
CURSORS_FILE = "cursors.json"
SEGMENT_BYTES = 8 * 1024 * 1024
MAX_ROWS = 1_000_000
MAX_BYTES = 512 * 1024 * 1024
MEMORY_ROWS = 100_000  # records kept in memory while the disk refuses them
TAIL_ROWS = 20_000  # recent records also kept in memory, so a sink that keeps up reads no disk
ERROR_INTERVAL = 10.0
PRUNE_INTERVAL = 0.5  # at most one cursor write per this many seconds
SYNC_MODES = ("full", "normal")
_DROPPED = "\x00dropped"  # the cursor below which records were dropped at the cap


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    kind: str
    severity: int
    created: float  # wall clock, seconds
    line: str


@dataclass(eq=False, slots=True)
class _Segment:
    first: int  # id of its first record
    path: str
    last: int = 0  # id of its last record (0: none yet)
    size: int = 0


@dataclass(slots=True)
class _Scan:
    """What reading a segment found: records, and where a torn or bad line was."""

    rows: list[Row] = field(default_factory=list)
    good_bytes: int = 0  # up to the end of the last good line
    bad_lines: int = 0


def _encode(row: Row) -> str:
    # The line is one JSON object on one line (the agent's records escape every control
    # character); a stray newline would split the record, so it is escaped here too.
    line = row.line if "\n" not in row.line else row.line.replace("\n", "\\n")
    return f"{row.id} {row.kind} {row.severity} {row.created:.6f} {line}\n"


def _decode(text: str) -> Row | None:
    parts = text.split(" ", 4)
    if len(parts) != 5:
        return None
    try:
        return Row(int(parts[0]), parts[1], int(parts[2]), float(parts[3]), parts[4])
    except ValueError:
        return None


def _scan(path: str, after: int = 0) -> _Scan:
    """Every record after id `after` in a segment; stops at a torn last line."""
    out = _Scan()
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # torn: the agent died mid-write
        row = _decode(data[pos:end].decode("ascii", "replace"))
        pos = end + 1
        out.good_bytes = pos
        if row is None:
            out.bad_lines += 1
        elif row.id > after:
            out.rows.append(row)
    return out


Report = dict[str, Any]


class Outbox:
    """Append, read after a cursor, acknowledge. Thread-safe: one lock; the work under it is
    one write (and fdatasync) per batch, or reading at most one batch."""

    def __init__(
        self,
        path: str | None,
        *,
        max_rows: int = MAX_ROWS,
        max_bytes: int = MAX_BYTES,
        memory_rows: int = MEMORY_ROWS,
        sync: str = "full",
        segment_bytes: int = SEGMENT_BYTES,
        error_interval: float = ERROR_INTERVAL,
    ) -> None:
        self.path = path  # the outbox directory
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.memory_rows = memory_rows
        self.sync = sync
        self.segment_bytes = segment_bytes
        self._error_interval = error_interval
        self._lock = threading.Lock()  # the state below
        self._write_lock = threading.Lock()  # one append at a time, in id order
        self._writing = False  # a write to the last segment is in flight
        self._visible = 0  # records up to this id are stored (on disk or kept in memory)
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # the last segment, open for appending
        # Records the disk has not taken, and recent ones it has (both oldest first).
        self._unsaved: deque[Row] = deque()
        self._tail: deque[Row] = deque()
        self._next_id = 1
        self._cursors: dict[str, int] = {}
        self._saved_cursors: dict[str, int] = {}
        self._dropped_upto = 0  # records up to this id were dropped at a cap
        self._counted = 0  # records up to this id are acknowledged by every sink (or dropped)
        self._rows = 0  # not yet acknowledged by every sink
        self._bytes = 0
        self._oldest: float | None = None
        self._disk_failing_since: float | None = None
        self._disk_error_reported = 0.0
        self._disk_failures = 0
        self._unreported_drops = 0
        self._drop_reported: dict[str, float] = {}
        self._flushed_at = 0.0
        self._notes: list[Report] = []
        self._read_at: dict[int, tuple[int, int]] = {}  # after id -> (segment first, offset)
        self.appended = 0
        self.acked_rows = 0
        self.dropped_total = 0
        self.disk_errors = 0
        self.damaged_lines = 0
        self.recovered_at_start = 0  # records a previous run left undelivered
        if path is not None:
            self._open(path)

    # set-up ------------------------------------------------------------------------------

    def _open(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        self._load_cursors()
        names = sorted(
            (int(n[:-4]), n) for n in os.listdir(path) if n.endswith(".log") and n[:-4].isdigit()
        )
        low = self._counted
        for first, name in names:
            seg = _Segment(first, os.path.join(path, name))
            found = _scan(seg.path)
            if found.bad_lines:
                self.damaged_lines += found.bad_lines
                self._notes.append(
                    record(
                        "outbox_error",
                        "damaged",
                        segment=seg.path,
                        bad_lines=found.bad_lines,
                        hint="lines of the outbox that do not parse were skipped",
                    )
                )
            seg.size = os.path.getsize(seg.path)
            if found.good_bytes < seg.size:  # a torn last line: the agent died mid-write
                os.truncate(seg.path, found.good_bytes)
                seg.size = found.good_bytes
            if found.rows:
                seg.last = found.rows[-1].id
                self._next_id = max(self._next_id, seg.last + 1)
            for row in found.rows:
                if row.id > low:
                    self._rows += 1
                    self._bytes += len(row.line)
                    if self._oldest is None:
                        self._oldest = row.created
            self._segments.append(seg)
        # Ids never go back: a cursor may be past every record left.
        self._next_id = max([self._next_id, self._counted + 1, *self._cursors.values()])
        self._visible = self._next_id - 1
        self.recovered_at_start = self._rows
        self._remove_done_segments()
        if self._rows:
            log.info("outbox_loaded", records=self._rows, segments=len(self._segments))

    def _load_cursors(self) -> None:
        assert self.path is not None
        try:
            with open(os.path.join(self.path, CURSORS_FILE), encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self._notes.append(
                record(
                    "outbox_error",
                    "damaged",
                    file=CURSORS_FILE,
                    error=str(exc),
                    hint="sink cursors were lost: records still in the outbox are sent to "
                    "every sink again (duplicates, never a loss)",
                )
            )
            return
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool):
                    self._cursors[k] = v
        self._saved_cursors = dict(self._cursors)
        self._dropped_upto = self._cursors.pop(_DROPPED, 0)
        self._counted = max(min(self._cursors.values(), default=0), self._dropped_upto)

    def close(self) -> None:
        with self._write_lock, self._lock:
            self._flush_cursors()
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    # writing -----------------------------------------------------------------------------

    def append(self, kind: str, items: Iterable[tuple[int, str]]) -> int:
        """Store (severity, line) records of one kind; the id of the last one. On disk (one
        write, and an fdatasync with sync=full) when the disk takes it, else in memory. Sinks
        see them only once stored: in the outbox before any sink is tried."""
        now = time.time()
        with self._write_lock:
            with self._lock:
                first = self._next_id
                rows = [Row(first + i, kind, s, now, line) for i, (s, line) in enumerate(items)]
                self._next_id += len(rows)
                self.appended += len(rows)
                self._rows += len(rows)
                self._bytes += sum(len(r.line) for r in rows)
                if self._oldest is None and rows:
                    self._oldest = now
            self._store(rows)
            return self._next_id - 1

    def _store(self, rows: list[Row]) -> None:
        """Write what the disk refused before and `rows`, oldest first, in one write. Called
        with the write lock held; the state lock is held only around it, not during the
        write and fdatasync, so sinks read and acknowledge meanwhile."""
        with self._lock:
            if self.path is None:
                self._tail.extend(rows)
                self._trim_tail()
                self._visible = self._next_id - 1
                self._enforce_caps()
                return
            batch = [*self._unsaved, *rows]
            if not batch:
                return
            try:
                if self._fd is None or self._segments[-1].size >= self.segment_bytes:
                    self._new_segment(batch[0].id)
                error: OSError | None = None
            except OSError as exc:
                error = exc
            self._writing = True
        if error is None:
            data = "".join(_encode(r) for r in batch).encode("ascii", "backslashreplace")
            try:
                self._write(data)
            except OSError as exc:
                error = exc
        with self._lock:
            self._writing = False
            live = [r for r in batch if r.id > self._counted]  # acked meanwhile: gone
            if error is None:
                self._segments[-1].last = batch[-1].id
                self._unsaved.clear()
                self._tail.extend(live)
                self._trim_tail()
                self._recovered()
            else:
                self._unsaved = deque(live)
                self._disk_failed(error)
                if len(self._unsaved) > self.memory_rows:
                    excess = len(self._unsaved) - self.memory_rows
                    for _ in range(excess):
                        self._forget(self._unsaved.popleft())
                    self._dropped(excess, "outbox_memory_full", cap=self.memory_rows)
            self._visible = self._next_id - 1
            self._enforce_caps()

    def _recovered(self) -> None:
        if self._disk_failing_since is None:
            return
        self._notes.append(
            record(
                "outbox_recovered",
                None,
                outage_s=round(time.monotonic() - self._disk_failing_since, 3),
                failures=self._disk_failures,
            )
        )
        log.info("outbox_recovered", failures=self._disk_failures)
        self._disk_failing_since = None
        self._disk_failures = 0

    def _write(self, data: bytes) -> None:
        """Append to the last segment, all or nothing (the write lock is held)."""
        assert self._fd is not None
        seg = self._segments[-1]
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            if self.sync == "full":
                os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)  # no half batch left for the next start
            raise
        seg.size += len(data)

    def _new_segment(self, first: int) -> None:
        assert self.path is not None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._segments and self._segments[-1].last == 0:
            seg = self._segments[-1]  # an empty segment left by a failed write: reuse it
        else:
            seg = _Segment(first, os.path.join(self.path, f"{first:016d}.log"))
            self._segments.append(seg)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(seg.path, flags, 0o600)
        seg.size = os.fstat(self._fd).st_size
        if self.sync == "full":
            fsync_dir(self.path)

    def _disk_failed(self, exc: OSError) -> None:
        self.disk_errors += 1
        self._disk_failures += 1
        now = time.monotonic()
        if self._disk_failing_since is None:
            self._disk_failing_since = now
        elif now - self._disk_error_reported < self._error_interval:
            return
        self._disk_error_reported = now
        reason = _reason(exc)
        log.error("outbox_error", reason=reason, error=str(exc))
        self._notes.append(
            record(
                "outbox_error",
                reason,
                error=exc.strerror or str(exc),
                in_memory=len(self._unsaved),
                memory_cap=self.memory_rows,
                failures=self._disk_failures,
                hint="records are kept in memory and written to disk when it takes them again; "
                "free space in the state directory",
            )
        )

    def _trim_tail(self) -> None:
        while len(self._tail) > TAIL_ROWS:
            self._tail.popleft()

    def _forget(self, row: Row) -> None:
        self._rows -= 1
        self._bytes -= len(row.line)

    def _enforce_caps(self) -> None:
        """Only at the cap are the oldest records dropped, counted and reported."""
        dropped = 0
        while self._rows > self.max_rows or self._bytes > self.max_bytes:
            need = max(self._rows - self.max_rows, 1)
            rows = self._rows_after(self._counted, min(need, 10_000), frozenset(), 0)
            if not rows:
                break
            for row in rows:
                if self._rows <= self.max_rows and self._bytes <= self.max_bytes:
                    break
                self._forget(row)
                self._dropped_upto = self._counted = row.id
                dropped += 1
        if not dropped:
            return
        for source in (self._tail, self._unsaved):
            while source and source[0].id <= self._counted:
                source.popleft()
        self._oldest = self._first_created()
        self._remove_done_segments()
        self._dropped(dropped, "outbox_full", cap=self.max_rows, cap_bytes=self.max_bytes)

    def _oldest_row(self) -> Row | None:
        """The oldest record not yet acknowledged by every sink."""
        found = self._rows_after(self._counted, 1, frozenset(), 0)
        return found[0] if found else None

    def _dropped(self, n: int, reason: str, **data: Any) -> None:
        """Count a drop; report it at most once per interval per reason, with what was
        dropped since the last report and the running total."""
        self.dropped_total += n
        self._unreported_drops += n
        now = time.monotonic()
        last = self._drop_reported.get(reason)
        if last is not None and now - last < self._error_interval:
            return
        self._drop_reported[reason] = now
        dropped, self._unreported_drops = self._unreported_drops, 0
        log.error("outbox_dropped", reason=reason, dropped=dropped)
        self._notes.append(
            record(
                "event_loss",
                reason,
                dropped=dropped,
                dropped_total=self.dropped_total,
                **data,
                hint="sinks have been failing for long; the oldest undelivered records were "
                "dropped",
            )
        )

    # reading and acknowledging -------------------------------------------------------------

    def last_id(self) -> int:
        """The last record a sink may read (stored, on disk or in memory)."""
        with self._lock:
            return self._visible

    def read(
        self, after: int, kinds: Iterable[str], min_severity: int, limit: int
    ) -> tuple[list[Row], int]:
        """Up to `limit` records after id `after` of the given kinds and severity, and the id up
        to which this answer covers every record (the cursor to ack when all of them are
        delivered)."""
        wanted = frozenset(kinds)
        with self._lock:
            last = self._visible
            after = max(after, self._dropped_upto)
            if after >= last:
                return [], last
            rows = self._rows_after(after, limit, wanted, min_severity)
            if len(rows) >= limit:
                return rows, rows[-1].id
            return rows, last

    def _rows_after(
        self, after: int, limit: int, wanted: frozenset[str], min_severity: int
    ) -> list[Row]:
        """Records after `after` (of `wanted` kinds and severity; any when `wanted` is empty),
        from disk for what memory no longer holds, then from memory."""
        out: list[Row] = []
        memory = self._memory_start()
        if after + 1 < memory and self.path is not None:
            out = self._read_disk(after, memory, limit, wanted, min_severity)
            if len(out) >= limit:
                return out
        for source in (self._tail, self._unsaved):
            if not source or source[-1].id <= after:
                continue
            # Ids in memory are consecutive: skip to the first one after `after` in C.
            skip = max(after + 1 - source[0].id, 0)
            for row in itertools.islice(source, skip, None):
                if not wanted or (row.kind in wanted and row.severity >= min_severity):
                    out.append(row)
                    if len(out) >= limit:
                        return out
        return out

    def _read_disk(
        self, after: int, before: int, limit: int, wanted: frozenset[str], min_severity: int
    ) -> list[Row]:
        """Records with after < id < before from the segments (a sink catching up after an
        outage, or records a previous run left)."""
        out: list[Row] = []
        firsts = [s.first for s in self._segments]
        i = max(bisect.bisect_right(firsts, after + 1) - 1, 0)
        for seg in self._segments[i:]:
            if seg.first >= before or len(out) >= limit:
                break
            if seg.last and seg.last <= after:
                continue
            try:
                found = self._scan_from(seg, after)
            except OSError as exc:
                self._disk_failed(exc)
                break
            for row in found:
                if row.id >= before:
                    return out
                if not wanted or (row.kind in wanted and row.severity >= min_severity):
                    out.append(row)
                    if len(out) >= limit:
                        return out
        return out

    def _scan_from(self, seg: _Segment, after: int) -> list[Row]:
        """A segment's records after `after`, from where the last read of it ended when it
        ended at `after` (a sink reading on from its cursor rescans nothing)."""
        start = self._read_at.get(after)
        offset = start[1] if start is not None and start[0] == seg.first else 0
        with open(seg.path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        rows: list[Row] = []
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break
            row = _decode(data[pos:end].decode("ascii", "replace"))
            pos = end + 1
            if row is not None and row.id > after:
                rows.append(row)
                if len(self._read_at) > 64:
                    self._read_at.clear()
                self._read_at[row.id] = (seg.first, offset + pos)
        return rows

    def cursor(self, sink: str) -> int | None:
        with self._lock:
            return self._cursors.get(sink)

    def register(self, sinks: Iterable[str]) -> dict[str, int]:
        """The configured sinks: each keeps its cursor; a new one starts before the oldest
        record still here (it gets what the others still owe). Cursors of sinks no longer
        configured are forgotten; the records only they owed, by sink, are returned."""
        with self._lock:
            names = set(sinks)
            lost: dict[str, int] = {}
            for name in list(self._cursors):
                if name not in names:
                    left = self._next_id - 1 - self._cursors.pop(name)
                    if left > 0:
                        lost[name] = left
            for name in names:
                self._cursors.setdefault(name, self._counted)
            self._prune()
            self._flush_cursors()
            return lost

    def ack(self, sink: str, upto: int) -> None:
        """`sink` has every record up to id `upto` it takes."""
        with self._lock:
            if upto <= self._cursors.get(sink, 0):
                return
            self._cursors[sink] = upto
            self._prune()

    def _prune(self) -> None:
        """Let go of what every sink has: counted and dropped from memory at once; the
        cursors written and whole segments deleted at most every PRUNE_INTERVAL."""
        if not self._cursors:
            return
        low = min(self._cursors.values())
        if low <= self._counted:
            return
        gone = size = 0
        memory = self._memory_start()
        if self._counted + 1 < memory and self.path is not None:
            upto = min(low, memory - 1) + 1
            for row in self._read_disk(self._counted, upto, 1 << 62, frozenset(), 0):
                gone, size = gone + 1, size + len(row.line)
        for source in (self._tail, self._unsaved):
            while source and source[0].id <= low:
                row = source.popleft()
                gone, size = gone + 1, size + len(row.line)
        self._counted = low
        self.acked_rows += gone
        self._rows = max(self._rows - gone, 0)
        self._bytes = max(self._bytes - size, 0)
        self._oldest = self._first_created() if self._rows else None
        if time.monotonic() - self._flushed_at >= PRUNE_INTERVAL:
            self._flush_cursors()

    def _memory_start(self) -> int:
        for source in (self._tail, self._unsaved):
            if source:
                return source[0].id
        return self._next_id

    def _first_created(self) -> float | None:
        row = self._oldest_row()
        return row.created if row is not None else None

    def _flush_cursors(self) -> None:
        """Write the cursors (atomically) and delete the segments every sink is done with."""
        self._flushed_at = time.monotonic()
        if self.path is None:
            return
        cursors = dict(self._cursors)
        if self._dropped_upto:
            cursors[_DROPPED] = self._dropped_upto
        if cursors != self._saved_cursors:
            try:
                write_private(os.path.join(self.path, CURSORS_FILE), json.dumps(cursors).encode())
            except OSError as exc:
                self._disk_failed(exc)
                return
            self._saved_cursors = cursors
        self._remove_done_segments()

    def _remove_done_segments(self) -> None:
        """Segments whose every record is at or below `_counted` (all but the one being
        written, unless it is done too and the next write may start a new one)."""
        keep: list[_Segment] = []
        for seg in self._segments:
            done = 0 < seg.last <= self._counted
            active = seg is self._segments[-1] and self._fd is not None
            if active and self._writing:
                keep.append(seg)
                continue
            if done and (not active or seg.size >= self.segment_bytes // 8):
                if active and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(seg.path)
                self._read_at.clear()
                continue
            keep.append(seg)
        self._segments = keep

    # health --------------------------------------------------------------------------------

    def retry(self) -> None:
        """Try the disk again for records kept in memory, and write due cursors (a tick)."""
        with self._write_lock:
            self._store([])
        with self._lock:
            if time.monotonic() - self._flushed_at >= PRUNE_INTERVAL:
                self._flush_cursors()

    def take_notes(self) -> list[Report]:
        """Health records the outbox has to say (disk failures, recoveries, drops)."""
        with self._lock:
            notes, self._notes = self._notes, []
            return notes

    def unsaved(self) -> int:
        """Records kept in memory because the disk refused them."""
        with self._lock:
            return len(self._unsaved)

    def backlog(self) -> int:
        with self._lock:
            return self._rows

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "path": self.path,
                "backlog": self._rows,
                "bytes": self._bytes,
                "oldest_age_s": round(time.time() - self._oldest, 3) if self._oldest else 0.0,
                "segments": len(self._segments),
                "in_memory_unsaved": len(self._unsaved),
                "appended": self.appended,
                "acked": self.acked_rows,
                "dropped_total": self.dropped_total,
                "disk_errors": self.disk_errors,
                "disk_failing": self._disk_failing_since is not None,
                "cap_rows": self.max_rows,
                "cap_bytes": self.max_bytes,
                "recovered_at_start": self.recovered_at_start,
                "sync": self.sync,
            }


def _reason(exc: OSError) -> str:
    """A stable short code: disk_full, readonly, io_error, or the errno name."""
    return {
        errno.ENOSPC: "disk_full",
        errno.EDQUOT: "disk_full",
        errno.EROFS: "readonly",
        errno.EIO: "io_error",
    }.get(exc.errno or 0, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
