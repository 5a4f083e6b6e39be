"""The ledger of the agent's own reads: one open and one close per announced read, bounded."""

from __future__ import annotations

from agent.enrich.ownreads import OwnReads


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_announced_read_takes_exactly_one_open_and_one_close() -> None:
    ledger = OwnReads()
    ledger.expect("/r/a.v")
    ledger.expect("/r/a.v")
    assert [ledger.take("/r/a.v", "opened") for _ in range(3)] == [True, True, False]
    assert ledger.take("/r/a.v", "modified") is False  # writes are never ours
    assert [ledger.take("/r/a.v", "closed_nowrite") for _ in range(3)] == [True, True, False]
    assert not ledger
    assert ledger.take("/r/b.v", "opened") is False


def test_an_announced_read_that_never_happened_expires() -> None:
    clock = Clock()
    ledger = OwnReads(ttl=10.0, clock=clock)
    ledger.expect("/r/gone.v")  # the file vanished before the agent could open it
    clock.now += 11
    ledger.expect("/r/other.v")
    assert ledger.take("/r/gone.v", "opened") is False
    assert ledger.stats()["expired"] == 1


def test_the_ledger_is_capped_and_counts_what_it_let_go() -> None:
    ledger = OwnReads(cap=3)
    for i in range(5):
        ledger.expect(f"/r/{i}")
    assert ledger.stats()["pending"] == 3
    assert ledger.stats()["over_cap"] == 2
    assert ledger.take("/r/0", "opened") is False
    assert ledger.take("/r/4", "opened") is True


def test_an_entry_past_its_time_never_takes_a_users_event() -> None:
    clock = Clock()
    ledger = OwnReads(ttl=10.0, clock=clock)
    ledger.expect("/r/a.v")  # our open was lost (a cut lane): the entry must not linger
    clock.now += 11
    assert ledger.take("/r/a.v", "opened") is False
    assert not ledger
