"""Fixtures for the worker tests: real `celery worker` processes on the test database,
the real Redis (the broker database of REDIS_URL) and an SMTP sink."""

from __future__ import annotations

import os
import time

import pytest
from django.conf import settings
from django.db import connection

from parley.chat.models import Conversation, Message
from parley.chat.presence import presence_key
from parley.chat.ratelimit import redis_client
from tests.worker.support import SmtpSink, Worker, database_url

PUBLIC_URL = "https://chat.example.test"

# Short windows, so that the suite is quick; read at call time by the test process (which
# enqueues, as web and realtime do) and passed to every worker.
FAST = {
    "PARLEY_NOTIFICATION_DELAY_SECONDS": "0.5",
    "PARLEY_RECEIPT_FLUSH_SECONDS": "0.5",
    "PARLEY_DELIVERY_BUFFER_SECONDS": "0.1",
    "PARLEY_RECEIPT_SWEEP_SECONDS": "2",
    "WORKER_HEARTBEAT_SECONDS": "1",
    "PARLEY_PUBLIC_URL": PUBLIC_URL,
}

FLUSH = "parley.receipts.flush"
FLUSH_MANY = "parley.receipts.flush_many"  # what the tickers enqueue
CONVERSATION = "parley.notifications.conversation"
EMAIL = "parley.notifications.email"


@pytest.fixture(scope="package", autouse=True)
def _fast_settings():
    old = {k: os.environ.get(k) for k in FAST}
    os.environ.update(FAST)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _clear_broker_and_keys() -> None:
    """Queues, unacknowledged messages and staged state left by an earlier test or run.
    The broker is the Redis database of REDIS_URL (ours alone in the test setup)."""
    import redis

    for url in {settings.CELERY_BROKER_URL, settings.REDIS_URL}:
        r = redis.Redis.from_url(url)
        keys = [
            k
            for pattern in (
                "parley:rcpt*",
                "parley:notify:*",
                "receipts*",
                "notifications*",
                "unacked*",
                "*.dq2*",
            )
            for k in r.scan_iter(pattern, count=500)
        ]
        if keys:
            r.delete(*keys)
        r.close()


@pytest.fixture(autouse=True)
def _clean_state():
    _clear_broker_and_keys()
    yield


@pytest.fixture(scope="package")
def worker_env(django_db_setup) -> dict[str, str]:
    """Environment of a worker process: the test database, this process' Redis."""
    return {"DATABASE_URL": database_url(connection.settings_dict), **FAST}


@pytest.fixture(scope="module")
def smtp():
    sink = SmtpSink()
    yield sink
    sink.stop()


@pytest.fixture
def mailbox(smtp):
    smtp.messages.clear()
    smtp.attempts.clear()
    return smtp


@pytest.fixture(scope="module")
def pair(worker_env, smtp):
    """Two workers, as in a deployment with two replicas."""
    _clear_broker_and_keys()
    env = {**worker_env, "EMAIL_URL": smtp.url}
    workers = []
    try:
        workers = [Worker("w1", env), Worker("w2", env)]
        for w in workers:
            w.wait_ready()
        yield workers
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.stop()


def room_with_messages(creator, members, n: int, name: str = "General") -> Conversation:
    """A room whose history already holds n messages (inserted without notifications)."""
    from parley.chat import services

    room = services.room_create(creator=creator, name=name)
    for user in members:
        services.room_join(user=user, slug=room.slug)
    Message.objects.bulk_create(
        [Message(conversation=room, seq=i, sender=creator, body=f"m{i}") for i in range(1, n + 1)]
    )
    Conversation.objects.filter(pk=room.pk).update(last_seq=n)
    room.memberships.filter(user=creator).update(last_delivered_seq=n, last_read_seq=n)
    room.refresh_from_db()
    return room


def set_online(user_id: int, online: bool = True) -> None:
    """Write presence as the realtime service does (one field per socket)."""
    if online:
        redis_client().hset(presence_key(user_id), "test-socket", time.time() + 300)
    else:
        redis_client().delete(presence_key(user_id))
