"""Idle wake-ups on one beat: every timed wake-up of an idle agent falls on the same instant.

Waking an idle CPU is what costs: measured on a 2-vCPU VM (schedstat, the exact CPU time of
each thread), the thread that wakes an idle CPU is charged 8-16 ms whatever it then does,
and a thread that wakes while the CPU is awake already well under 1 ms. The agent's idle
safety nets (the consumer, enrichment, the sinks, the file checks, the root checks, the
scheduled jobs) each used to wake on its own phase; on one beat of the wall clock they wake
the CPU once. Work that has to happen (an event, a submit, a stop, a retry) does not wait
for the beat: it wakes its thread as before.
"""

from __future__ import annotations

import datetime as dt
import time

BEAT = 30.0  # seconds; every idle interval of the agent is a multiple of it or divides it
_EARLY = 0.05  # a wake-up this close before a beat waits for the next one, not for nothing


def until_beat(period: float = BEAT, now: float | None = None) -> float:
    """Seconds from now to the next multiple of `period` on the wall clock."""
    t = time.time() if now is None else now
    left = period - (t % period)
    return left if left > _EARLY else left + period


def next_beat(period: float = BEAT) -> dt.datetime:
    """The next multiple of `period` on the wall clock, as an aware datetime (a start date
    for the scheduler's interval jobs, so that they fall on the beat too)."""
    return dt.datetime.fromtimestamp(time.time() + until_beat(period), dt.UTC)
