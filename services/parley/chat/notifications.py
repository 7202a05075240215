"""Offline notifications: one per (user, conversation) burst of unseen messages.

A *burst* is a run of messages that arrive while a member is offline (no live socket in
presence) and has not muted the conversation. It opens with the first such message and
absorbs later ones as long as each comes within PARLEY_NOTIFICATION_BURST_SECONDS
(default 300) of the burst's previous update; it ends (`closed_at`) when the member
comes online (`burst_close_for_user`, called by the realtime service), reads the
conversation (`burst_close`, called where reads are applied), or the conversation was
quiet for longer than the window before a new message (which opens a new burst). Each
burst has one `Notification` row and sends at most one email.

When a message commits, `notify_on_commit` schedules at most one
`parley.notifications.conversation` task per conversation per
PARLEY_NOTIFICATION_DELAY_SECONDS (a Redis `SET NX` key and a countdown), so a burst of
200 messages costs a handful of tasks, not 200 x members. Each process also remembers
until when a pass is known to be pending for a conversation, and skips Redis entirely
before then (see `conversation_changed`): in a busy conversation only the first message
of each delay, and those in the last PENDING_MARGIN_SECONDS before its pass, cost a
Redis round trip.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import timedelta

import redis
from django.db import connection, transaction
from django.db.models import F, Max
from django.utils import timezone

from parley.chat import presence
from parley.chat.models import Conversation, Membership, Notification
from parley.chat.ratelimit import redis_client
from parley.knobs import knob_float

logger = logging.getLogger(__name__)

CONVERSATION_TASK = "parley.notifications.conversation"
EMAIL_TASK = "parley.notifications.email"
KEY_PREFIX = "parley:notify:"
SCHEDULE_GRACE_SECONDS = 60


def burst_seconds() -> float:
    return knob_float("PARLEY_NOTIFICATION_BURST_SECONDS", 300)


def delay_seconds() -> float:
    """How long after a message its conversation's notifications are computed."""
    return knob_float("PARLEY_NOTIFICATION_DELAY_SECONDS", 2)


def schedule_key(conversation_id: int) -> str:
    return f"{KEY_PREFIX}sched:{conversation_id}"


def email_guard_key(notification_id: int) -> str:
    return f"{KEY_PREFIX}email:{notification_id}"


# --- scheduling ---------------------------------------------------------------------------


def notify_on_commit(*, conversation_id: int) -> None:
    """Call inside the transaction that commits a message: schedules the notification pass."""
    transaction.on_commit(
        lambda: conversation_changed(conversation_id=conversation_id), robust=True
    )


def conversation_changed(*, conversation_id: int) -> bool:
    """Schedule one notification pass for the conversation unless one is pending.

    Returns whether a task was enqueued. Best effort: if Redis or the broker is down the
    pass is skipped (the next message schedules one).

    Called after the message committed. A pass reads the conversation after it starts,
    so a message committed before the pass starts needs no pass of its own. Hence the
    in-process memo: when this process scheduled a pass, or found one pending, it knows
    the pass cannot start before `now + remaining` (`remaining` from the key's TTL, which
    is the countdown plus SCHEDULE_GRACE_SECONDS), and skips Redis until
    `now + remaining - margin` (PENDING_MARGIN_SECONDS, or half the delay if that is
    less): a message skipped that way committed before the pass starts, and the pass
    covers it. The memo always ends before the pass
    can start (the margin covers clock skew between the host that computed the task's
    ETA and the worker's), so a message after that goes to Redis and schedules a new pass
    once the pass cleared the key (`schedule_clear`).
    """
    from parley.config.celery import app

    started = time.monotonic()
    if pass_pending(conversation_id):
        return False
    client = redis_client()
    key = schedule_key(conversation_id)
    delay = delay_seconds()
    # One round trip: claim the schedule, and learn how long the pending pass has to go.
    pipe = client.pipeline(transaction=False)
    pipe.set(key, "1", nx=True, px=int((delay + SCHEDULE_GRACE_SECONDS) * 1000))
    pipe.pttl(key)
    created, ttl_ms = pipe.execute()
    if created:
        try:
            app.send_task(CONVERSATION_TASK, args=[conversation_id], countdown=delay)
        except Exception:
            client.delete(key)
            raise
    if ttl_ms > 0:
        # The pass was enqueued with its countdown after the key was set with
        # countdown + grace: it starts no earlier than `ttl - grace` from now.
        remaining = ttl_ms / 1000 - SCHEDULE_GRACE_SECONDS
        _pending_note(conversation_id, started + remaining - min(PENDING_MARGIN_SECONDS, delay / 2))
    return bool(created)


# Per process: conversation id -> time.monotonic() before which a pass is known to be
# pending (see conversation_changed). Bounded; losing an entry only costs a round trip.
PENDING_MARGIN_SECONDS = 0.25
PENDING_MAX = 10_000
_pending_until: dict[int, float] = {}
_pending_lock = threading.Lock()


def _pending_note(conversation_id: int, until: float) -> None:
    now = time.monotonic()
    if until <= now:
        return
    with _pending_lock:
        if len(_pending_until) >= PENDING_MAX:
            for cid, t in list(_pending_until.items()):
                if t <= now:
                    del _pending_until[cid]
            if len(_pending_until) >= PENDING_MAX:
                _pending_until.clear()
        _pending_until[conversation_id] = until


def pass_pending(conversation_id: int) -> bool:
    """Whether this process knows a pass is pending that will cover a message committed
    now (then `conversation_changed` would return at once without Redis)."""
    return _pending_until.get(conversation_id, 0.0) > time.monotonic()


def pending_forget() -> None:
    """Forget every pending pass this process knows of (tests; harmless anywhere)."""
    with _pending_lock:
        _pending_until.clear()


def schedule_clear(*, conversation_id: int) -> None:
    """Called as a pass starts: a message committed from now on schedules a new pass."""
    redis_client().delete(schedule_key(conversation_id))


# --- bursts ---------------------------------------------------------------------------------


def _online(user_ids: list[int]) -> set[int]:
    # presence.online_user_ids answers "nobody" when Redis is down; that would email
    # everyone, so make sure Redis answers first (the task retries if not).
    if user_ids:
        redis_client().ping()
    return presence.online_user_ids(user_ids=user_ids)


def notification_bursts_update(*, conversation_id: int) -> list[int]:
    """Open or extend the bursts of the conversation's offline, unmuted members.

    Also closes the bursts of members who are online now. Idempotent: running it twice
    (or concurrently) leaves the same rows. Returns the ids of open bursts whose email
    is still to be sent (`emailed_at` and `email_failed_at` unset, the user has an
    email address).
    """
    last_seq = (
        Conversation.objects.filter(pk=conversation_id).values_list("last_seq", flat=True).first()
    )
    if not last_seq:
        return []
    # Members some message has not reached: messages delivered to a socket were seen live.
    candidates = dict(
        Membership.objects.filter(
            conversation_id=conversation_id,
            muted=False,
            last_delivered_seq__lt=last_seq,
            user__is_active=True,
        ).values_list("user_id", "last_delivered_seq")
    )
    online = _online(list(candidates))
    offline = {uid: seq for uid, seq in candidates.items() if uid not in online}
    now = timezone.now()
    open_bursts = Notification.objects.filter(conversation_id=conversation_id, closed_at=None)
    with transaction.atomic():
        if online:
            open_bursts.filter(user_id__in=online).update(closed_at=now)
        # New messages after a quiet spell longer than the window: that burst is over.
        open_bursts.filter(
            last_seq__lt=last_seq, updated_at__lt=now - timedelta(seconds=burst_seconds())
        ).update(closed_at=now)
        if offline:
            open_bursts.filter(user_id__in=offline, last_seq__lt=last_seq).update(
                last_seq=last_seq, message_count=last_seq - F("first_seq") + 1, updated_at=now
            )
            _bursts_open(
                conversation_id=conversation_id, last_seq=last_seq, offline=offline, now=now
            )
    return list(
        open_bursts.filter(user_id__in=offline, emailed_at=None, email_failed_at=None)
        .exclude(user__email="")
        .values_list("id", flat=True)
    )


def _bursts_open(*, conversation_id: int, last_seq: int, offline: dict[int, int], now) -> None:
    """Insert a burst for each offline member without an open one and with new messages.

    `offline` maps user id to last delivered seq: a burst starts after what reached the
    user's sockets and after the user's previous burst.
    """
    previous = dict(
        Notification.objects.filter(conversation_id=conversation_id, user_id__in=offline)
        .values("user_id")
        .annotate(seq=Max("last_seq"))
        .values_list("user_id", "seq")
    )
    rows = []
    for user_id, delivered_seq in offline.items():
        first_seq = max(delivered_seq, previous.get(user_id) or 0) + 1
        if first_seq <= last_seq:
            rows.append((user_id, first_seq))
    if not rows:
        return
    table = connection.ops.quote_name(Notification._meta.db_table)
    # ON CONFLICT DO NOTHING: the partial unique index allows one open burst per
    # (user, conversation), so a concurrent pass cannot open a second one.
    with connection.cursor() as cur:
        cur.execute(
            f"""
            INSERT INTO {table} (user_id, conversation_id, first_seq, last_seq, message_count,
                                 created_at, updated_at)
            SELECT u, %s, f, %s, %s - f + 1, %s, %s
            FROM unnest(%s::bigint[], %s::bigint[]) AS r(u, f)
            ON CONFLICT DO NOTHING
            """,  # noqa: S608 - the table name is ours, values are parameters
            [
                conversation_id,
                last_seq,
                last_seq,
                now,
                now,
                [r[0] for r in rows],
                [r[1] for r in rows],
            ],
        )


def burst_close_for_user(*, user_id: int) -> int:
    """End every open burst of a user who came online. Returns how many ended.

    The realtime service calls it when a user's first socket connects (through
    `database_sync_to_async`). One UPDATE through the (user, created_at) index.
    """
    return Notification.objects.filter(user_id=user_id, closed_at=None).update(
        closed_at=timezone.now()
    )


def burst_close(*, user_id: int, conversation_id: int, read_seq: int) -> int:
    """End the user's open burst in a conversation once they read into it."""
    return Notification.objects.filter(
        user_id=user_id,
        conversation_id=conversation_id,
        closed_at=None,
        first_seq__lte=read_seq,
    ).update(closed_at=timezone.now())


def bursts_close_read(*, conversation_id: int, reads: dict[int, int]) -> int:
    """`burst_close` for many users of one conversation: `reads` maps user id to read seq."""
    if not reads:
        return 0
    users = list(reads)
    table = connection.ops.quote_name(Notification._meta.db_table)
    with connection.cursor() as cur:
        cur.execute(
            f"""
            UPDATE {table} AS n SET closed_at = %s
            FROM unnest(%s::bigint[], %s::bigint[]) AS r(u, seq)
            WHERE n.conversation_id = %s AND n.user_id = r.u AND n.closed_at IS NULL
              AND n.first_seq <= r.seq
            """,  # noqa: S608 - the table name is ours, values are parameters
            [timezone.now(), users, [reads[u] for u in users], conversation_id],
        )
        return cur.rowcount


# --- emails ---------------------------------------------------------------------------------


def emails_schedule(*, notification_ids: list[int]) -> list[int]:
    """Enqueue one email task per notification unless one is already under way.

    A Redis guard key per notification (held for the task's whole retry chain) keeps
    repeated notification passes from starting a second chain. Returns the ids enqueued.
    """
    from parley.config.celery import app

    client = redis_client()
    enqueued = []
    for notification_id in notification_ids:
        if not client.set(
            email_guard_key(notification_id), "1", nx=True, ex=email_guard_seconds(0)
        ):
            continue
        try:
            app.send_task(EMAIL_TASK, args=[notification_id])
        except Exception:
            client.delete(email_guard_key(notification_id))
            raise
        enqueued.append(notification_id)
    return enqueued


def email_guard_seconds(countdown: float) -> int:
    # The longest an email task can take (hard limit) plus its countdown and a margin.
    return int(countdown) + 120


def email_guard_extend(*, notification_id: int, countdown: float) -> None:
    try:
        redis_client().set(email_guard_key(notification_id), "1", ex=email_guard_seconds(countdown))
    except redis.RedisError:
        logger.warning("could not extend the email guard of notification %s", notification_id)


def email_guard_release(*, notification_id: int) -> None:
    with contextlib.suppress(redis.RedisError):  # else it expires
        redis_client().delete(email_guard_key(notification_id))


def notification_email_claim(*, notification_id: int) -> Notification | None:
    """Mark the burst's email as sent *before* sending it; None if it must not be sent.

    The mark (`emailed_at`) is committed before the send, so a worker killed during
    the send leaves it set and the redelivered task does not send a second email (at
    most once). Not sent: already emailed or failed, or the burst already ended (the
    user came online or read it).
    """
    if connection.in_atomic_block:
        raise RuntimeError("the email claim must commit before the send")
    claimed = Notification.objects.filter(
        pk=notification_id, emailed_at=None, email_failed_at=None, closed_at=None
    ).update(emailed_at=timezone.now())
    if not claimed:
        return None
    return Notification.objects.select_related("user", "conversation").get(pk=notification_id)


def notification_email_release(*, notification: Notification) -> None:
    """The server did not take the email: clear the mark so a retry may send it."""
    Notification.objects.filter(pk=notification.pk, emailed_at=notification.emailed_at).update(
        emailed_at=None
    )


def notification_email_failed(*, notification_id: int) -> bool:
    """Record that the email could not be sent after every retry."""
    return bool(
        Notification.objects.filter(
            pk=notification_id, emailed_at=None, email_failed_at=None
        ).update(email_failed_at=timezone.now())
    )
