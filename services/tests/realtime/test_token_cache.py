"""Bearer tokens on the handshake: cached a few seconds by digest, revocation honoured
within the TTL, last_used_at written after the handshake in a batch."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from channels.db import database_sync_to_async as sync_to_async

from parley.accounts.models import ApiToken, User
from parley.accounts.services import token_create, token_digest
from parley.realtime import tokens

from .conftest import open_socket

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("node_cleanup"),
    pytest.mark.timeout(60),
]


@pytest.fixture(autouse=True)
def _empty_cache():
    tokens.cache.clear()
    yield
    tokens.cache.clear()


async def wait_until_expired(token: str) -> None:
    entry = tokens.cache.get(token_digest(token), time.monotonic())
    assert entry is not None, "the handshake should have cached the token"
    await asyncio.sleep(max(0.0, entry.expires - time.monotonic()) + 0.05)


async def connects(token: str) -> int | None:
    """The user id in `hello`, or None when the socket was closed with 4401."""
    sock = await open_socket(token=token, expect_hello=False)
    assert sock.refused is None
    out = await sock.comm.receive_output(5)
    if out["type"] == "websocket.send":
        frame = orjson.loads(out["text"])
        assert frame["type"] == "hello", frame
        await sock.disconnect()
        return frame["user"]["id"]
    assert out == {"type": "websocket.close", "code": 4401}, out
    return None


async def test_a_deleted_token_stops_opening_sockets_within_the_ttl(alice, settings):
    settings.REALTIME_TOKEN_CACHE_SECONDS = 2.0
    token = await sync_to_async(token_create)(user=alice)
    assert await connects(token) == alice.id
    await sync_to_async(ApiToken.objects.filter(user=alice).delete)()
    # Within the TTL the cached entry still answers (the documented staleness) ...
    assert await connects(token) == alice.id
    # ... and not after it.
    await wait_until_expired(token)
    assert await connects(token) is None
    assert token_digest(token) not in tokens.cache


async def test_a_deactivated_user_is_refused_after_the_ttl(alice, settings):
    settings.REALTIME_TOKEN_CACHE_SECONDS = 1.0
    token = await sync_to_async(token_create)(user=alice)
    assert await connects(token) == alice.id
    await sync_to_async(User.objects.filter(pk=alice.pk).update)(is_active=False)
    await wait_until_expired(token)
    assert await connects(token) is None


async def test_without_the_cache_revocation_is_immediate(alice, settings):
    settings.REALTIME_TOKEN_CACHE_SECONDS = 0
    token = await sync_to_async(token_create)(user=alice)
    assert await connects(token) == alice.id
    assert len(tokens.cache) == 0
    await sync_to_async(ApiToken.objects.filter(user=alice).delete)()
    assert await connects(token) is None


async def test_the_cache_holds_digests_not_tokens_and_is_bounded(user_factory, settings):
    settings.REALTIME_TOKEN_CACHE_SIZE = 3
    users = [await sync_to_async(user_factory)() for _ in range(5)]
    raw = [await sync_to_async(token_create)(user=u) for u in users]
    for u, t in zip(users, raw, strict=True):
        user = await tokens.user_from_token(t)
        assert user is not None and user.id == u.id
    assert len(tokens.cache) == 3
    keys = set(tokens.cache._entries)
    assert keys == {token_digest(t) for t in raw[-3:]}
    assert not keys & set(raw)
    for entry in tokens.cache._entries.values():
        assert not any(t in repr(entry) for t in raw)
    # Every caller gets its own instance.
    a = await tokens.user_from_token(raw[-1])
    b = await tokens.user_from_token(raw[-1])
    assert a is not b and a.pk == b.pk == users[-1].pk
    assert await tokens.user_from_token("plt_nope") is None
    assert await tokens.user_from_token("x" * 201) is None


async def test_last_used_at_is_written_after_the_handshake_once_a_minute(alice, bob):
    token = await sync_to_async(token_create)(user=alice)
    other = await sync_to_async(token_create)(user=bob)

    def used_at(user):
        return ApiToken.objects.get(user=user).last_used_at

    assert await connects(token) == alice.id
    assert await connects(other) == bob.id
    deadline = time.monotonic() + 10
    while await sync_to_async(used_at)(alice) is None or await sync_to_async(used_at)(bob) is None:
        assert time.monotonic() < deadline, "last_used_at was not written"
        await asyncio.sleep(0.1)
    first = await sync_to_async(used_at)(alice)
    # Within the minute, later handshakes (cache hits or not) do not write it again.
    tokens.cache.clear()
    assert await connects(token) == alice.id
    assert tokens.touches.pending() == set()
    await asyncio.sleep(1.5)
    assert await sync_to_async(used_at)(alice) == first


async def test_tokens_touch_skips_tokens_touched_within_the_minute(alice, bob):
    from datetime import timedelta

    from django.utils import timezone

    from parley.accounts.services import tokens_touch

    await sync_to_async(token_create)(user=alice)
    await sync_to_async(token_create)(user=bob)
    ids = await sync_to_async(lambda: list(ApiToken.objects.values_list("id", flat=True)))()
    now = timezone.now()
    assert await sync_to_async(tokens_touch)(token_ids=ids, now=now) == 2
    assert await sync_to_async(tokens_touch)(token_ids=ids, now=now + timedelta(seconds=30)) == 0
    assert await sync_to_async(tokens_touch)(token_ids=ids, now=now + timedelta(seconds=61)) == 2
