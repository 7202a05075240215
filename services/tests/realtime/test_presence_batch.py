"""The presence script applied to many users in one call (heartbeat and sweep)."""

from __future__ import annotations

import time

import pytest

from parley.chat import presence as chat_presence
from parley.chat.ratelimit import async_redis_client
from parley.realtime import presence

pytestmark = pytest.mark.timeout(30)

BASE = 9_100_000  # user ids no fixture creates


async def _online(uid: int) -> bool:
    return await async_redis_client().zscore(presence.ONLINE_KEY, uid) is not None


async def test_many_users_in_chunks_get_each_their_own_transition(monkeypatch):
    monkeypatch.setattr(presence, "BATCH_USERS", 3)  # 8 users: three script calls
    client = async_redis_client()
    users = [BASE + i for i in range(8)]
    try:
        live = f"{time.time() + 30:.3f}"
        # all come online (two sockets for the first user)
        first = await presence.update_many(
            {u: [("n1:1", live)] + ([("n1:2", live)] if u == users[0] else []) for u in users}
        )
        assert first == dict.fromkeys(users, 1)
        assert all([await _online(u) for u in users])
        # a heartbeat: nobody changes
        assert await presence.update_many({u: [("n1:1", live)] for u in users}) == dict.fromkeys(
            users, 0
        )
        # one closes its only socket, the first closes one of two, one gets a second socket,
        # one has a lapsed entry (a dead node): offline, still online, unchanged, offline
        lapsed = f"{time.time() - 1:.3f}"
        changes = {
            users[1]: [("n1:1", "-")],
            users[0]: [("n1:2", "-")],
            users[2]: [("n2:1", live)],
            users[3]: [("n1:1", lapsed)],
        }
        assert await presence.update_many(changes) == {
            users[1]: -1,
            users[0]: 0,
            users[2]: 0,
            users[3]: -1,
        }
        assert not await _online(users[1]) and not await _online(users[3])
        assert await _online(users[0])
        fields = await client.hkeys(chat_presence.presence_key(users[2]))
        assert sorted(fields) == [b"n1:1", b"n2:1"]
        assert not await client.exists(chat_presence.presence_key(users[1]))
        # the one-user form is the same script
        assert await presence.update(users[1], [("n3:1", live)]) == 1
    finally:
        await client.delete(*(chat_presence.presence_key(u) for u in users))
        await client.zrem(presence.ONLINE_KEY, *users)


async def test_empty_batch_costs_nothing():
    assert await presence.update_many({}) == {}
