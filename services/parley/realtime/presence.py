"""The writing side of presence, and the detection of users whose node died.

Key scheme (parley.chat.presence, which the HTTP API reads): the hash
`parley:presence:<user id>` holds one field per open socket (`<node>:<socket>`) whose
value is the epoch second until which its node vouches for it. This module adds the
sorted set `parley:presence:online`: the users announced online, scored by their latest
expiry. Every change goes through one Lua script that applies it, drops lapsed fields,
re-scores the user and returns the transition, so that among all nodes exactly one
announces each change:

- a socket opens: set its field -> "online" if the user was not announced online;
- a socket closes: delete its field -> "offline" if that was the last live one;
- the server closes a socket for drain or resync: shorten its field to a grace period
  (the client reconnects elsewhere within it, and nobody sees a flap);
- every node refreshes its sockets' fields each heartbeat;
- every node sweeps users whose score has passed (a SIGKILLed node stopped refreshing):
  the script removes the lapsed fields and the one node that gets "offline" announces it.
"""

from __future__ import annotations

import logging
import time

import redis

from parley.chat import presence as chat_presence
from parley.chat.ratelimit import async_redis_client

logger = logging.getLogger(__name__)

ONLINE_KEY = f"{chat_presence.KEY_PREFIX}online"
REDIS_ERRORS = (redis.RedisError, OSError, TimeoutError)

# KEYS[1] the user's hash, KEYS[2] the online set.
# ARGV: now, user id, hash ttl, then (field, expiry) pairs; expiry "-" deletes the field.
# Returns 1 (became online), -1 (became offline) or 0.
_UPDATE = """
local now = tonumber(ARGV[1])
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '-' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local vals = redis.call('HGETALL', KEYS[1])
local live, latest = 0, 0
for i = 1, #vals, 2 do
  local expiry = tonumber(vals[i + 1])
  if expiry == nil or expiry <= now then
    redis.call('HDEL', KEYS[1], vals[i])
  else
    live = live + 1
    if expiry > latest then latest = expiry end
  end
end
local was = redis.call('ZSCORE', KEYS[2], ARGV[2])
if live == 0 then
  redis.call('DEL', KEYS[1])
  if was then
    redis.call('ZREM', KEYS[2], ARGV[2])
    return -1
  end
  return 0
end
redis.call('ZADD', KEYS[2], latest, ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if was then return 0 end
return 1
"""

_script_obj = None


def _script(client):
    # The script object only carries the SHA; every call passes its client explicitly
    # (clients are per event loop), and EVALSHA falls back to loading it after a restart.
    global _script_obj
    if _script_obj is None:
        _script_obj = client.register_script(_UPDATE)
    return _script_obj


def _args(user_id: int, changes: list[tuple[str, str]], now: float) -> list:
    args: list = [f"{now:.3f}", user_id, int(chat_presence.PRESENCE_TTL * 4)]
    for field, expiry in changes:
        args += [field, expiry]
    return args


def expiry(seconds: float | None = None) -> str:
    return f"{time.time() + (seconds or chat_presence.PRESENCE_TTL):.3f}"


async def update(user_id: int, changes: list[tuple[str, str]]) -> int:
    """Apply (field, expiry or "-") changes for one user; return the transition."""
    client = async_redis_client()
    keys = [chat_presence.presence_key(user_id), ONLINE_KEY]
    args = _args(user_id, changes, time.time())
    return int(await _script(client)(keys=keys, args=args, client=client))


async def update_many(batch: dict[int, list[tuple[str, str]]]) -> dict[int, int]:
    """`update` for many users in one round trip (the heartbeat)."""
    if not batch:
        return {}
    client = async_redis_client()
    script = _script(client)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    users = list(batch)
    for uid in users:
        await script(
            keys=[chat_presence.presence_key(uid), ONLINE_KEY],
            args=_args(uid, batch[uid], now),
            client=pipe,
        )
    results = await pipe.execute()
    return {uid: int(r) for uid, r in zip(users, results, strict=True)}


async def sweep(limit: int = 500) -> list[int]:
    """Users whose every socket lapsed, announced offline by this node (and only this one)."""
    client = async_redis_client()
    now = time.time()
    due = await client.zrangebyscore(ONLINE_KEY, "-inf", now, start=0, num=limit)
    if not due:
        return []
    result = await update_many({int(uid): [] for uid in due})
    return [uid for uid, transition in result.items() if transition == -1]
