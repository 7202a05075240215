"""Per-user message rate limit, shared by every replica through Redis."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from parley.chat.errors import RateLimited

WINDOW_SECONDS = 10
ASYNC_MAX_CONNECTIONS = 64  # per realtime process (event loop)
_client: redis.Redis | None = None


def redis_client() -> redis.Redis:
    """One pooled client per process for presence, rate limits and other small keys."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
    return _client


_async_clients: dict[int, tuple[asyncio.AbstractEventLoop, aioredis.Redis]] = {}


def async_redis_client() -> aioredis.Redis:
    """The asyncio twin of `redis_client`, one per event loop (connections belong to a loop).

    Short timeouts and a single retry (a pooled connection may be stale after a Redis
    restart): callers on a socket's path fail fast rather than wait on a sick Redis.
    """
    loop = asyncio.get_running_loop()
    entry = _async_clients.get(id(loop))
    if entry is not None and entry[0] is loop:
        return entry[1]
    for key, (other, _) in list(_async_clients.items()):
        if other.is_closed():
            del _async_clients[key]
    # A blocking pool: when a reconnect storm of 2,000 sockets has more presence updates
    # in flight than there are connections, the next one waits for a free connection
    # (up to 5 s) instead of failing with MaxConnectionsError (the default pool's
    # behaviour, which left users "online" after they had gone).
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.REDIS_URL,
        max_connections=ASYNC_MAX_CONNECTIONS,
        timeout=5,
        socket_timeout=2,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
    )
    client = aioredis.Redis(connection_pool=pool)
    _async_clients[id(loop)] = (loop, client)
    return client


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


async def message_rate_check_async(*, user_id: int) -> None:
    """`message_rate_check` for async callers (the realtime service): same keys, so one
    limit per user holds across HTTP and WebSocket sends on every replica."""
    limit = settings.PARLEY_RATE_MESSAGES_PER_10S
    if limit <= 0:
        return
    key = rate_key(user_id, time.time())
    try:
        pipe = async_redis_client().pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, WINDOW_SECONDS + 1)
        count, _ = await pipe.execute()
    except (TimeoutError, redis.RedisError, OSError):
        return
    if count > limit:
        raise RateLimited(f"At most {limit} messages per {WINDOW_SECONDS} s; slow down.")
