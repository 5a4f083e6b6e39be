"""A real rsyslogd is stopped mid-stream while alerts keep coming, then started again: through
the outbox and the router, every alert arrives, and any duplicate has the same event.id."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.events import dumps
from agent.sinks import FileSink, Router
from agent.sinks.outbox import Outbox
from agent.sinks.syslog import SyslogSink
from tests.sinks.test_syslog import (
    Rsyslog,
    alert,
    certs,
    rsyslog,
    sd_params,
    sink_for,
    wait_until,
)

__all__ = ["certs", "rsyslog"]  # fixtures, used by name

ALERTS = 600


@pytest.mark.parametrize("protocol", ["tcp", "relp"])
def test_rsyslog_stopped_mid_stream_and_restarted_gets_every_alert(
    rsyslog: Rsyslog, tmp_path: Path, protocol: str
) -> None:
    made: list[SyslogSink] = []

    def make(*args: object, **kwargs: object) -> SyslogSink:
        sink = SyslogSink(*args, **kwargs)  # type: ignore[arg-type]
        made.append(sink)
        return sink

    sink = sink_for(make, rsyslog, protocol)
    health = tmp_path / "log" / "health.jsonl"
    router = Router(
        [(sink, frozenset({"alert"})), (FileSink(str(health)), frozenset({"health"}))],
        outbox=Outbox(str(tmp_path / "outbox")),
        threaded=True,
        retry_initial=0.05,
        retry_max=0.5,
    )
    router.start()
    down = threading.Event()
    errors: list[BaseException] = []

    def bounce() -> None:
        try:
            wait_until("the first alerts at the collector", lambda: len(rsyslog.received()) >= 100)
            rsyslog.stop()
            down.set()
            time.sleep(0.5)  # alerts keep coming while the collector is away
            rsyslog.start()
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)
        finally:
            down.set()

    thread = threading.Thread(target=bounce, name="rsyslog-bounce")
    thread.start()
    try:
        for n in range(0, ALERTS, 5):
            router.write("alert", [dumps(alert(i)) for i in range(n, n + 5)], [73] * 5)
            time.sleep(0.005)  # a steady stream, not one burst
        thread.join(60)
        assert not errors, errors
        assert down.is_set()
        got = rsyslog.wait_for(ALERTS)
        ids = Counter(int(sd_params(m)["id"], 16) for m in got)
        assert set(ids) >= set(range(ALERTS)), "every alert arrived"
        assert set(ids) == set(range(ALERTS)), "and nothing else"
        wait_until("an empty outbox", lambda: router.outbox.backlog() == 0)
        # The health file is written by its own sink's thread: the recovery lands a moment
        # after the delivery it reports.
        wait_until(
            "the outage on record",
            lambda: (
                '"sink_error"' in health.read_text() and '"sink_recovered"' in health.read_text()
            ),
        )
    finally:
        router.close()
        for s in made:
            s.close()
