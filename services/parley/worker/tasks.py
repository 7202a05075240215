"""The worker's tasks. Each one: an explicit name and queue, a time limit, ids as
arguments, and idempotent (redelivery after a crash does no harm), because the app
acknowledges late (parley.config.celery). The work itself lives in parley.chat."""

from __future__ import annotations

import logging
import random

import redis
from celery import shared_task
from django.db import InterfaceError, OperationalError

from parley.chat import notifications, receipts
from parley.worker import emails, metrics
from parley.worker.conf import email_max_retries, email_retry_backoff, email_retry_backoff_max

logger = logging.getLogger(__name__)

# Worth retrying: the database or Redis went away for a moment (restart, failover,
# a deadlock victim). Exponential backoff with jitter, capped.
TRANSIENT = (OperationalError, InterfaceError, redis.ConnectionError, redis.TimeoutError)
RETRY = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": 1,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 10,
}


@shared_task(
    name="parley.receipts.flush", queue="receipts", soft_time_limit=20, time_limit=30, **RETRY
)
def receipts_flush(conversation_id: int) -> int:
    """Write a conversation's staged receipts to Postgres (see parley.chat.receipts)."""
    applied = receipts.receipts_flush(conversation_id=conversation_id)
    metrics.metrics().receipts_applied.inc(applied)
    return applied


@shared_task(
    name=receipts.FLUSH_MANY_TASK, queue="receipts", soft_time_limit=20, time_limit=30, **RETRY
)
def receipts_flush_many(conversation_ids: list[int]) -> int:
    """The flushes a worker's ticker found due (parley.chat.receipts.take_due), in one
    task: one broker round trip and one task's overhead for all of them. A transient
    error retries the whole batch, which is safe: each flush is idempotent."""
    applied = 0
    for conversation_id in conversation_ids:
        applied += receipts.receipts_flush(conversation_id=int(conversation_id))
    metrics.metrics().receipts_applied.inc(applied)
    return applied


@shared_task(
    name="parley.notifications.conversation",
    queue="notifications",
    soft_time_limit=45,
    time_limit=60,
    **RETRY,
)
def notifications_conversation(conversation_id: int) -> int:
    """Open or extend bursts for offline members; enqueue the emails of new bursts."""
    notifications.schedule_clear(conversation_id=conversation_id)
    pending = notifications.notification_bursts_update(conversation_id=conversation_id)
    return len(notifications.emails_schedule(notification_ids=pending))


def _email_backoff(retries: int) -> float:
    base = min(email_retry_backoff_max(), email_retry_backoff() * 2**retries)
    return base * random.uniform(1.0, 1.25)


@shared_task(
    name="parley.notifications.email",
    bind=True,
    queue="notifications",
    soft_time_limit=45,
    time_limit=60,
    max_retries=10,  # for database errors; SMTP retries are counted below
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=60,
    retry_jitter=True,
)
def notifications_email(self, notification_id: int) -> str:
    """Send a burst's email at most once; retry a refusing mail server with backoff,
    then record the failure (email_failed_at). Retries wait as countdowns in the broker,
    not in a pool process, so other tasks keep flowing."""
    m = metrics.metrics()
    try:
        result = emails.notification_email_send(notification_id=notification_id)
    except emails.SEND_ERRORS as exc:
        if self.request.retries >= email_max_retries():
            notifications.notification_email_failed(notification_id=notification_id)
            notifications.email_guard_release(notification_id=notification_id)
            m.emails.labels("failed").inc()
            logger.warning(
                "notification %s: email failed after %s retries: %r",
                notification_id,
                self.request.retries,
                exc,
            )
            return "failed"
        countdown = _email_backoff(self.request.retries)
        notifications.email_guard_extend(notification_id=notification_id, countdown=countdown)
        m.emails.labels("retry").inc()
        logger.info(
            "notification %s: email not sent (%r); retry in %.1f s", notification_id, exc, countdown
        )
        raise self.retry(exc=exc, countdown=countdown, max_retries=None) from exc
    notifications.email_guard_release(notification_id=notification_id)
    m.emails.labels(result).inc()
    return result


@shared_task(name="parley.worker.heartbeat", soft_time_limit=5, time_limit=10, ignore_result=True)
def worker_heartbeat(hostname: str) -> None:
    """Sent by each worker to its own queue every few seconds; see runtime.py."""
    from parley.worker import runtime

    runtime.heartbeat_write(hostname=hostname)
