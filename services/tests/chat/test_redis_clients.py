"""The shared asyncio Redis client under a burst (a reconnect storm's presence updates)."""

from __future__ import annotations

import asyncio

import pytest

from parley.chat.ratelimit import ASYNC_MAX_CONNECTIONS, async_redis_client

pytestmark = pytest.mark.timeout(30)


async def test_more_concurrent_commands_than_connections_wait_instead_of_failing():
    client = async_redis_client()
    n = ASYNC_MAX_CONNECTIONS * 5
    script = "redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]"
    results = await asyncio.gather(
        *(client.eval(script, 1, f"parley:test:burst:{i}", i) for i in range(n)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    await client.delete(*(f"parley:test:burst:{i}" for i in range(n)))
