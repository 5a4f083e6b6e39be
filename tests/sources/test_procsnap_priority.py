"""The exec reader runs at real-time priority, within a share of a core a second."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import pytest

from agent.sources import procsnap
from agent.sources.procsnap import READER_RT_SHARE, ReaderPriority

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling policies"),
    pytest.mark.skipif(os.geteuid() != 0, reason="real-time priority needs root"),
]


def _in_thread(body: Any) -> None:
    """Runs `body` on a thread of its own: a policy is per thread, and the test's own thread
    must keep its priority."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:  # handed to the test's thread
            failure.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    if failure:
        raise failure[0]


def test_the_reader_thread_inherits_real_time_and_the_main_thread_gives_it_up() -> None:
    reports: list[dict[str, Any]] = []
    policies: dict[str, int] = {}

    def body() -> None:
        priority = ReaderPriority(reports.append)
        assert priority.mode == "realtime"
        reader = threading.Thread(target=lambda: policies.update(reader=os.sched_getscheduler(0)))
        reader.start()
        reader.join()
        priority.main_done()
        policies["main"] = os.sched_getscheduler(0)
        policies["main_nice"] = os.getpriority(os.PRIO_PROCESS, 0)

    _in_thread(body)
    assert policies["reader"] == os.SCHED_FIFO
    assert policies["main"] == os.SCHED_OTHER
    assert policies["main_nice"] == procsnap.READER_NICE
    assert reports == []


def test_past_its_share_of_a_second_the_reader_drops_to_nice_and_says_so() -> None:
    reports: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}

    def body() -> None:
        priority = ReaderPriority(reports.append)
        priority.check()  # the second starts on this thread
        # Busy past the share, within the same second: the next check gives up real-time.
        start_cpu = time.thread_time()
        while time.thread_time() - start_cpu <= READER_RT_SHARE * 1.2:
            pass
        priority.check()
        seen["after_share"] = os.sched_getscheduler(0)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
        seen["throttled"] = priority.throttled
        # A second later it is real-time again.
        deadline = time.monotonic() + 5
        while os.sched_getscheduler(0) != os.SCHED_FIFO and time.monotonic() < deadline:
            priority.check()
            time.sleep(0.05)
        seen["later"] = os.sched_getscheduler(0)

    _in_thread(body)
    assert seen["after_share"] == os.SCHED_OTHER
    assert seen["nice"] == procsnap.READER_NICE
    assert seen["throttled"] == 1
    assert seen["later"] == os.SCHED_FIFO
    assert len(reports) == 1
    rec = reports[0]
    assert rec["event"]["action"] == "cap_reached"
    assert rec["event"]["reason"] == "exec_reader_realtime_share"
    assert rec["exfilwatch"]["health"]["cap"] == int(READER_RT_SHARE * 1000)
