"""Idle wake-ups fall on one beat of the wall clock (agent/beat.py)."""

from __future__ import annotations

import datetime as dt
import time

from agent.beat import BEAT, next_beat, until_beat


def test_every_wait_ends_on_a_multiple_of_its_period() -> None:
    for now in (0.0, 1.0, 29.9, 30.0, 30.01, 1_764_470_000.123, 1_764_470_029.97):
        for period in (0.5, 5.0, BEAT, 2 * BEAT):
            left = until_beat(period, now)
            end = now + left
            assert abs(end / period - round(end / period)) < 1e-6, (now, period, left)
            # Never a wait of next to nothing (a wake-up just before a beat waits for the next).
            assert 0.05 < left <= period + 0.05, (now, period, left)


def test_periods_that_are_multiples_of_the_beat_land_on_it() -> None:
    now = 1_764_470_011.5
    assert (now + until_beat(2 * BEAT, now)) % BEAT == 0
    assert (now + until_beat(6 * 5.0, now)) % BEAT == 0


def test_the_scheduler_start_date_is_the_next_beat() -> None:
    before = time.time()
    start = next_beat()
    assert start.tzinfo is dt.UTC
    ts = start.timestamp()
    assert before < ts <= before + BEAT + 0.1
    assert abs(ts / BEAT - round(ts / BEAT)) < 1e-6
