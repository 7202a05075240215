"""The notification pass is scheduled once per conversation per delay, and each process
skips Redis while it knows a pass is pending, without ever suppressing a needed pass."""

from __future__ import annotations

import itertools
import time
from datetime import datetime

import orjson
import pytest
import redis
from django.conf import settings as django_settings

from parley.chat import notifications, services
from parley.chat.ratelimit import redis_client

pytestmark = pytest.mark.django_db(transaction=True)

_ids = itertools.count(10_000_000)


@pytest.fixture(autouse=True)
def _fresh(settings):
    settings.PARLEY_NOTIFICATION_DELAY_SECONDS = 2.0
    notifications.pending_forget()
    yield
    notifications.pending_forget()


def broker() -> redis.Redis:
    return redis.Redis.from_url(django_settings.CELERY_BROKER_URL)


def queued_passes(conversation_id: int, *, remove: bool = True) -> list[float]:
    """ETAs (epoch seconds) of the notification passes queued for a conversation."""
    r = broker()
    etas = []
    for raw in r.lrange("notifications", 0, -1):
        msg = orjson.loads(raw)
        headers = msg.get("headers", {})
        if (
            headers.get("task") == notifications.CONVERSATION_TASK
            and headers.get("argsrepr") == f"[{conversation_id}]"
        ):
            eta = headers.get("eta")
            etas.append(datetime.fromisoformat(eta).timestamp() if eta else time.time())
            if remove:
                r.lrem("notifications", 1, raw)
    return etas


def memo_deadline_wall(conversation_id: int) -> float | None:
    until = notifications._pending_until.get(conversation_id)
    return None if until is None else time.time() + (until - time.monotonic())


def fresh_conversation_id(cid: int | None = None) -> int:
    """An id with no schedule key and no queued pass (left by an earlier run, say)."""
    cid = next(_ids) if cid is None else cid
    redis_client().delete(notifications.schedule_key(cid))
    queued_passes(cid)
    return cid


def test_a_burst_of_sends_touches_redis_once(room, alice):
    key = notifications.schedule_key(fresh_conversation_id(room.id))
    services.message_create(sender=alice, conversation_id=room.id, body="first")
    assert redis_client().exists(key)
    assert len(queued_passes(room.id, remove=False)) == 1
    # A probe: with the key gone, a send that asked Redis would set it again.
    redis_client().delete(key)
    for i in range(20):
        services.message_create(sender=alice, conversation_id=room.id, body=f"more {i}")
    assert not redis_client().exists(key)
    assert len(queued_passes(room.id)) == 1


def test_the_memo_ends_before_the_pass_can_start_and_a_later_message_schedules_again(
    settings,
):
    settings.PARLEY_NOTIFICATION_DELAY_SECONDS = 0.6
    cid = fresh_conversation_id()
    key = notifications.schedule_key(cid)
    assert notifications.conversation_changed(conversation_id=cid) is True
    (eta,) = queued_passes(cid)
    deadline = memo_deadline_wall(cid)
    assert deadline is not None
    # The memo covers the countdown but its last margin: it ends before the pass's ETA.
    margin = notifications.PENDING_MARGIN_SECONDS
    assert eta - margin - 0.1 < deadline <= eta - margin + 0.01
    assert notifications.conversation_changed(conversation_id=cid) is False

    # The pass starts (at its ETA, on a worker: another process) and clears the key.
    time.sleep(max(0.0, eta - time.time()) + 0.01)
    redis_client().delete(key)
    # A message committed now is not covered by that pass: it must schedule another.
    assert notifications.conversation_changed(conversation_id=cid) is True
    assert len(queued_passes(cid)) == 1


def test_a_pass_scheduled_by_another_process_is_remembered_until_its_eta(settings):
    cid = fresh_conversation_id()
    key = notifications.schedule_key(cid)
    grace = notifications.SCHEDULE_GRACE_SECONDS
    # Another replica scheduled a pass 0.5 s ago with the 2 s countdown.
    redis_client().set(key, "1", px=int((2.0 + grace - 0.5) * 1000))
    before = time.time()
    assert notifications.conversation_changed(conversation_id=cid) is False
    deadline = memo_deadline_wall(cid)
    assert deadline is not None
    expected = before + 1.5 - notifications.PENDING_MARGIN_SECONDS
    assert expected - 0.1 < deadline < expected + 0.05
    redis_client().delete(key)  # the probe again: no round trip inside the window
    assert notifications.conversation_changed(conversation_id=cid) is False
    assert not redis_client().exists(key) and queued_passes(cid) == []


def test_a_late_pass_is_not_remembered(settings):
    """A key whose pass is past its ETA (the worker is behind) gives no memo: the pass
    may start any moment, so the next message asks Redis again."""
    cid = fresh_conversation_id()
    key = notifications.schedule_key(cid)
    redis_client().set(key, "1", px=int((notifications.SCHEDULE_GRACE_SECONDS - 1) * 1000))
    assert notifications.conversation_changed(conversation_id=cid) is False
    assert memo_deadline_wall(cid) is None
    redis_client().delete(key)
    assert notifications.conversation_changed(conversation_id=cid) is True
    assert len(queued_passes(cid)) == 1


def test_no_delay_means_no_memo(settings):
    settings.PARLEY_NOTIFICATION_DELAY_SECONDS = 0
    cid = fresh_conversation_id()
    assert notifications.conversation_changed(conversation_id=cid) is True
    assert memo_deadline_wall(cid) is None
    queued_passes(cid)


def test_the_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(notifications, "PENDING_MAX", 5)
    for _ in range(12):
        cid = fresh_conversation_id()
        notifications.conversation_changed(conversation_id=cid)
        queued_passes(cid)
        assert len(notifications._pending_until) <= 5
