"""When a conversation's receipt flush runs: throttled, not delayed (parley.chat.receipts)."""

from __future__ import annotations

import time

import pytest

from parley.chat import receipts
from parley.chat.ratelimit import redis_client

pytestmark = pytest.mark.timeout(30)

CID = 9_200_001  # no fixture creates conversations with ids this high


@pytest.fixture
def enqueued(monkeypatch):
    monkeypatch.setenv("PARLEY_RECEIPT_FLUSH_SECONDS", "0.5")
    monkeypatch.setenv("PARLEY_DELIVERY_BUFFER_SECONDS", "0.25")
    calls: list[tuple[int, float]] = []
    monkeypatch.setattr(
        receipts,
        "_enqueue_flush",
        lambda cid, countdown, client=None: calls.append((cid, countdown)),
    )
    client = redis_client()
    keys = [receipts.pending_key(CID), receipts.schedule_key(CID), receipts.last_flush_key(CID)]
    client.delete(*keys)
    yield calls
    client.delete(*keys)
    client.zrem(receipts.DIRTY_KEY, CID)


def start_flush() -> None:
    """What receipts_flush does first (the rest needs the database)."""
    receipts._run_script(
        redis_client(),
        receipts._FLUSH_STARTS,
        [receipts.schedule_key(CID), receipts.last_flush_key(CID)],
        [1000],
    )


def test_a_quiet_conversation_waits_only_for_the_other_replicas(enqueued):
    assert receipts.stage([(CID, 7, 3, 0)]) == [CID]
    assert enqueued == [(CID, 0.3)]  # the delivery buffer + 50 ms, not the interval
    # While that flush is pending, nothing more is scheduled.
    assert receipts.stage([(CID, 8, 3, 0)]) == []
    assert len(enqueued) == 1


def test_after_a_flush_the_next_waits_for_the_rest_of_the_interval(enqueued):
    receipts.stage([(CID, 7, 3, 0)])
    start_flush()
    time.sleep(0.1)
    receipts.stage([(CID, 7, 4, 0)])
    (_, first), (_, second) = enqueued
    assert first == 0.3
    # 0.5 s after the flush started, 0.1 s ago: about 0.4 s from now, never the full 0.5.
    assert 0.3 <= second <= 0.41, second
    # Long after the last flush, a receipt waits only the short countdown again.
    start_flush()
    redis_client().pexpire(receipts.last_flush_key(CID), 1)
    time.sleep(0.01)
    receipts.stage([(CID, 7, 5, 0)])
    assert enqueued[-1] == (CID, 0.3)


@pytest.fixture
def due_set():
    client = redis_client()
    ids = [CID + i for i in range(1, 4)]
    client.zrem(receipts.DUE_KEY, *ids)
    yield ids
    client.zrem(receipts.DUE_KEY, *ids)


def taken(ids) -> list[int]:
    return [cid for cid, _ in receipts.take_due() if cid in ids]


def test_flushes_are_due_after_their_countdown_and_taken_exactly_once(due_set):
    first, second, third = due_set
    receipts._enqueue_flush(first, 0)
    receipts._enqueue_flush(second, 0.3)
    receipts._enqueue_flush(third, 0)
    receipts._enqueue_flush(third, 5)  # already due sooner: stays due now
    assert sorted(taken(due_set)) == [first, third]
    assert taken(due_set) == []  # a second ticker gets nothing
    time.sleep(0.35)
    assert taken(due_set) == [second]
    assert redis_client().zscore(receipts.DUE_KEY, second) is None


def test_a_flush_is_taken_with_how_late_it_was(due_set):
    first, second, _ = due_set
    receipts._enqueue_flush(first, 0)
    time.sleep(0.25)
    receipts._enqueue_flush(second, 0)
    late = {cid: s for cid, s in receipts.take_due() if cid in due_set}
    assert set(late) == {first, second}
    assert 0.24 <= late[first] < 2, late  # due 0.25 s ago (Redis' clock, ms)
    assert 0 <= late[second] < 0.1, late


def test_staging_puts_the_flush_in_the_due_set_not_the_broker(due_set, monkeypatch):
    client = redis_client()
    cid = due_set[0]
    keys = [receipts.pending_key(cid), receipts.schedule_key(cid), receipts.last_flush_key(cid)]
    client.delete(*keys)
    try:
        assert receipts.stage([(cid, 7, 3, 0)]) == [cid]
        due_in = client.zscore(receipts.DUE_KEY, cid) / 1000 - client.time()[0]
        assert 0 < due_in <= receipts.first_wait_seconds() + 1  # whole seconds from TIME
        assert taken(due_set) == []  # not yet: the other replicas' deliveries may join
        time.sleep(receipts.first_wait_seconds() + 0.05)
        assert taken(due_set) == [cid]
    finally:
        client.delete(*keys)
        client.zrem(receipts.DIRTY_KEY, cid)
