"""Per-user message rate limit, shared by every replica through Redis."""

from __future__ import annotations

import time

import redis
from django.conf import settings

from parley.chat.errors import RateLimited

WINDOW_SECONDS = 10
_client: redis.Redis | None = None


def redis_client() -> redis.Redis:
    """One pooled client per process for presence, rate limits and other small keys."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5,
            health_check_interval=30,
        )
    return _client


def rate_key(user_id: int, now: float) -> str:
    return f"parley:rl:msg:{user_id}:{int(now // WINDOW_SECONDS)}"


def message_rate_check(*, user_id: int) -> None:
    """Count one message for `user_id`; raise RateLimited past the limit per 10 s window.

    A fixed window: one INCR and one EXPIRE in a pipeline. If Redis is unreachable the
    send is allowed (the limit protects the service; it must not take it down).
    """
    limit = settings.PARLEY_RATE_MESSAGES_PER_10S
    if limit <= 0:
        return
    key = rate_key(user_id, time.time())
    try:
        pipe = redis_client().pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, WINDOW_SECONDS + 1)
        count, _ = pipe.execute()
    except redis.RedisError:
        return
    if count > limit:
        raise RateLimited(f"At most {limit} messages per {WINDOW_SECONDS} s; slow down.")
