"""Wire shapes of events, and their publication to the channel layer on commit.

Every frame a client can receive is built here (docs/protocol.md is the catalogue).
A broadcast is serialized once: the channel-layer event carries the frame as JSON text
and each socket sends that text as is.

Groups: `conv.<id>` reaches every socket of a conversation's members; `user.<id>` reaches
every socket of one user (so a socket can follow conversations it joins or leaves).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import orjson
import redis
from django.db import transaction

logger = logging.getLogger(__name__)


def conversation_group(conversation_id: int) -> str:
    return f"conv.{conversation_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def dumps(frame: Mapping[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def iso(ts) -> str | None:
    if ts is None:
        return None
    return ts.isoformat().replace("+00:00", "Z")


# --- frame shapes ---------------------------------------------------------------


def user_json(user) -> dict[str, Any]:
    return {"id": user.id, "username": user.username, "display_name": user.display_name}


def message_json(message, sender=None) -> dict[str, Any]:
    sender = sender or message.sender
    return {
        "id": message.id,
        "conversation": message.conversation_id,
        "seq": message.seq,
        "sender": user_json(sender),
        "body": message.body,
        "client_id": message.client_id,
        "created_at": iso(message.created_at),
    }


def message_frame(message, sender=None) -> dict[str, Any]:
    return {"type": "message", **message_json(message, sender)}


def receipt_frame(
    *, conversation_id: int, user_id: int, delivered_seq: int, read_seq: int
) -> dict[str, Any]:
    return {
        "type": "receipt",
        "conversation": conversation_id,
        "user": user_id,
        "delivered_seq": delivered_seq,
        "read_seq": read_seq,
    }


def membership_frame(*, conversation_id: int, event: str) -> dict[str, Any]:
    return {"type": "membership", "conversation": conversation_id, "event": event}


# --- channel-layer events ---------------------------------------------------------
# The consumer method that handles an event is named by its "type" ("chat.frame" ->
# chat_frame). Extra keys let the consumer act without parsing the frame.


def message_event(message, sender=None) -> dict[str, Any]:
    return {
        "type": "chat.frame",
        "kind": "message",
        "conversation": message.conversation_id,
        "seq": message.seq,
        "sender": message.sender_id,
        "frame": dumps(message_frame(message, sender)),
    }


def receipts_event(
    *, conversation_id: int, moved: list[tuple[int, int, int, int, int]], everyone: bool
) -> dict[str, Any]:
    """One flush's receipts: each moved row is (user, old_delivered, delivered, old_read,
    read) with its `receipt` frame serialized once. `everyone`: small conversation, every
    socket writes every frame; else each socket picks (see ChatConsumer.chat_receipts)."""
    return {
        "type": "chat.receipts",
        "conversation": conversation_id,
        "everyone": everyone,
        "rows": [
            [
                user,
                old_d,
                d,
                old_r,
                r,
                dumps(
                    receipt_frame(
                        conversation_id=conversation_id,
                        user_id=user,
                        delivered_seq=d,
                        read_seq=r,
                    )
                ),
            ]
            for user, old_d, d, old_r, r in moved
        ],
    }


def membership_event(*, conversation_id: int, event: str) -> dict[str, Any]:
    return {
        "type": "chat.membership",
        "conversation": conversation_id,
        "event": event,
        "frame": dumps(membership_frame(conversation_id=conversation_id, event=event)),
    }


# --- publication ------------------------------------------------------------------


SYNC_BACKOFF_SECONDS = 1.0


class _Publisher:
    """Sends channel-layer events from synchronous code.

    With Parley's layer (parley.realtime.layers), a thread without an event loop (a
    gunicorn request, a Celery task, the realtime process' database threads) publishes
    at once with one synchronous PUBLISH (about 0.1 ms; at most a 1 s timeout, after
    which the loop path is used for SYNC_BACKOFF_SECONDS). Otherwise events go through an
    event loop: the one an async process binds (`bind_loop`), else one daemon thread per
    process running a loop for publishing. Publishing never fails the caller's request:
    the live path is at-most-once, and clients recover by `seq`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._sync_down_until = 0.0

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop, self._pid = loop, os.getpid()

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid() or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="parley-event-publisher", daemon=True
                )
                thread.start()
                self._loop, self._pid = loop, os.getpid()
            return self._loop

    def submit(self, group: str, event: dict[str, Any]):
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return None
        send_sync = getattr(layer, "group_send_sync", None)
        if send_sync is not None and time.monotonic() >= self._sync_down_until:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                # No event loop in this thread (a request, a task, a database thread):
                # publish now, in commit order (parley.realtime.layers).
                try:
                    send_sync(group, event)
                    return None
                except Exception as exc:  # never fail the committed request
                    # Redis is slow or away: stop trying synchronously for a while so
                    # that requests do not each wait for the timeout; the loop path
                    # below retries once and logs.
                    self._sync_down_until = time.monotonic() + SYNC_BACKOFF_SECONDS
                    logger.warning("event publish failed: %r", exc)
        fut = asyncio.run_coroutine_threadsafe(_send(layer, group, event), self._get_loop())
        fut.add_done_callback(_log_failure)
        return fut


async def _send(layer, group: str, event: dict[str, Any]) -> None:
    # After a Redis restart the first command on a pooled connection fails with
    # ConnectionError while the pool reconnects; one retry gets it through.
    try:
        await layer.group_send(group, event)
    except (ConnectionError, OSError, redis.ConnectionError):
        await asyncio.sleep(0.05)
        await layer.group_send(group, event)


def _log_failure(fut) -> None:
    exc = fut.exception()
    if exc is not None:
        logger.warning("event publish failed: %r", exc)


publisher = _Publisher()


async def publish_now(group: str, event: dict[str, Any]) -> None:
    """Publish from an event loop, after the commit that made `event`; never raises (the
    live path is at-most-once, as for `publish_on_commit`)."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await _send(layer, group, {**event, "ts": time.time()})
    except Exception as exc:
        logger.warning("event publish failed: %r", exc)


def publish_on_commit(group: str, event: dict[str, Any]) -> None:
    """Publish `event` to `group` once the current transaction commits (never before)."""
    # "ts" (the commit time) lets receivers measure publish-to-delivery latency.
    transaction.on_commit(
        lambda: publisher.submit(group, {**event, "ts": time.time()}), robust=True
    )
