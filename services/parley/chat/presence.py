"""Presence in Redis, shared by every replica.

Each open socket is a field of the hash `parley:presence:<user id>` whose value is the
time (epoch seconds) until which its realtime node vouches for it. Nodes refresh their
sockets' entries on a heartbeat; a node that dies stops refreshing, so its entries
lapse within PRESENCE_TTL seconds and the others announce those users offline. A user is
online while any entry is unexpired, so several sockets and several replicas are fine.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from parley.chat.ratelimit import redis_client

PRESENCE_TTL = 25  # seconds an entry lives without a heartbeat (SPEC: offline within 30 s)
KEY_PREFIX = "parley:presence:"


def presence_key(user_id: int) -> str:
    return f"{KEY_PREFIX}{user_id}"


def online_user_ids(*, user_ids: Iterable[int]) -> set[int]:
    """Which of `user_ids` have at least one live socket. Unknown if Redis is down: none."""
    ids = list(user_ids)
    if not ids:
        return set()
    now = time.time()
    try:
        pipe = redis_client().pipeline(transaction=False)
        for uid in ids:
            pipe.hvals(presence_key(uid))
        results = pipe.execute()
    except redis.RedisError:
        return set()
    return {
        uid for uid, values in zip(ids, results, strict=True) if any(float(v) > now for v in values)
    }
