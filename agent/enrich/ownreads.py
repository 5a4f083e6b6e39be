"""The agent's own reads of watched files, so the events they cause are never a user's."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

# inotify cannot tell who opened a file. The agent opens tagged files itself (hashing lineage
# candidates); left alone, those opens would count as a user's bulk read, and anyone could
# make the agent fake (and then, by suppression, mask) such alerts by dropping same-size
# files into /tmp. Each own read is announced here before the open; the pipeline takes one
# `opened` and one `closed_nowrite` event of that path off the ledger instead of reporting it.
TTL_SECONDS = 10.0
CAP = 10_000


class OwnReads:
    """A bounded ledger of the agent's pending reads: path -> [opens, closes, deadline]."""

    name = "own_reads"

    def __init__(
        self,
        ttl: float = TTL_SECONDS,
        cap: int = CAP,
        clock: Callable[[], float] = time.monotonic,
        on_cap: Callable[[str, int], None] | None = None,
    ) -> None:
        self._on_cap = on_cap
        self._ttl = ttl
        self._cap = cap
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, list[float]] = OrderedDict()
        self.counters = {"announced": 0, "taken": 0, "expired": 0, "over_cap": 0}
        # Which of its events the source reports (set_delivered): one not reported is
        # never waited for.
        self._opens = self._closes = 1.0

    def set_delivered(self, actions: frozenset[str] | None) -> None:
        """The actions the file source reports now (None: all)."""
        self._opens = 1.0 if actions is None or "opened" in actions else 0.0
        self._closes = 1.0 if actions is None or "closed_nowrite" in actions else 0.0

    def __bool__(self) -> bool:
        return bool(self._pending)

    def expect(self, path: str) -> None:
        """The agent is about to open `path` for reading (one open, one close)."""
        if not self._opens and not self._closes:
            return  # neither event is reported: nothing of ours to take off
        now = self._clock()
        with self._lock:
            self._expire(now)
            entry = self._pending.pop(path, None)
            if entry is None:
                if len(self._pending) >= self._cap:
                    self._pending.popitem(last=False)
                    self.counters["over_cap"] += 1
                    if self._on_cap is not None:
                        self._on_cap("own_reads", self._cap)
                entry = [0.0, 0.0, 0.0]
            entry[0] += self._opens
            entry[1] += self._closes
            entry[2] = now + self._ttl
            self._pending[path] = entry
            self.counters["announced"] += 1

    def take(self, path: str, action: str) -> bool:
        """True when this `opened` / `closed_nowrite` event of `path` was the agent's own."""
        slot = 0 if action == "opened" else 1 if action == "closed_nowrite" else -1
        if slot < 0:
            return False
        with self._lock:
            entry = self._pending.get(path)
            if entry is None:
                return False
            if entry[2] <= self._clock():  # our own event never came: a user's is not ours
                del self._pending[path]
                self.counters["expired"] += 1
                return False
            if entry[slot] <= 0:
                return False
            entry[slot] -= 1
            if entry[0] <= 0 and entry[1] <= 0:
                del self._pending[path]
            self.counters["taken"] += 1
            return True

    def _expire(self, now: float) -> None:
        while self._pending:
            path, entry = next(iter(self._pending.items()))
            if entry[2] > now:
                break
            del self._pending[path]
            self.counters["expired"] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"pending": len(self._pending), **self.counters}
