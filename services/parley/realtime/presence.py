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

# One script for every change, for any number of users in one call (the heartbeat of a
# node with 10,000 sockets is a few calls, not 10,000: the per-call client work was the
# cost, not Redis').
# KEYS[1] the online set, KEYS[1 + i] user i's hash.
# ARGV: now, hash ttl, then per user: user id, n, then n (field, expiry) pairs; expiry
# "-" deletes the field.
# Returns one transition per user, in order: 1 (became online), -1 (became offline), 0.
_UPDATE = """
local now = tonumber(ARGV[1])
local ttl = ARGV[2]
local pos = 3
local out = {}
for k = 2, #KEYS do
  local hash = KEYS[k]
  local uid = ARGV[pos]
  local n = tonumber(ARGV[pos + 1])
  pos = pos + 2
  for j = 1, n do
    if ARGV[pos + 1] == '-' then
      redis.call('HDEL', hash, ARGV[pos])
    else
      redis.call('HSET', hash, ARGV[pos], ARGV[pos + 1])
    end
    pos = pos + 2
  end
  local vals = redis.call('HGETALL', hash)
  local live, latest = 0, 0
  for i = 1, #vals, 2 do
    local expiry = tonumber(vals[i + 1])
    if expiry == nil or expiry <= now then
      redis.call('HDEL', hash, vals[i])
    else
      live = live + 1
      if expiry > latest then latest = expiry end
    end
  end
  local was = redis.call('ZSCORE', KEYS[1], uid)
  local change = 0
  if live == 0 then
    redis.call('DEL', hash)
    if was then
      redis.call('ZREM', KEYS[1], uid)
      change = -1
    end
  else
    redis.call('ZADD', KEYS[1], latest, uid)
    redis.call('EXPIRE', hash, ttl)
    if not was then change = 1 end
  end
  out[#out + 1] = change
end
return out
"""
# Users per script call: bounds how long one call holds Redis (about 1-2 ms).
BATCH_USERS = 500

_script_obj = None


def _script(client):
    # The script object only carries the SHA; every call passes its client explicitly
    # (clients are per event loop), and EVALSHA falls back to loading it after a restart.
    global _script_obj
    if _script_obj is None:
        _script_obj = client.register_script(_UPDATE)
    return _script_obj


def expiry(seconds: float | None = None) -> str:
    return f"{time.time() + (seconds or chat_presence.PRESENCE_TTL):.3f}"


async def update(user_id: int, changes: list[tuple[str, str]]) -> int:
    """Apply (field, expiry or "-") changes for one user; return the transition."""
    return (await update_many({user_id: changes}))[user_id]


async def update_many(batch: dict[int, list[tuple[str, str]]]) -> dict[int, int]:
    """`update` for many users, BATCH_USERS per script call (the heartbeat, the sweep)."""
    if not batch:
        return {}
    client = async_redis_client()
    script = _script(client)
    head = [f"{time.time():.3f}", int(chat_presence.PRESENCE_TTL * 4)]
    users = list(batch)
    result: dict[int, int] = {}
    for start in range(0, len(users), BATCH_USERS):
        chunk = users[start : start + BATCH_USERS]
        keys, args = [ONLINE_KEY], list(head)
        for uid in chunk:
            changes = batch[uid]
            keys.append(chat_presence.presence_key(uid))
            args += [uid, len(changes)]
            for field, value in changes:
                args += [field, value]
        changes_out = await script(keys=keys, args=args, client=client)
        result.update(zip(chunk, (int(c) for c in changes_out), strict=True))
    return result


async def sweep(limit: int = 500) -> list[int]:
    """Users whose every socket lapsed, announced offline by this node (and only this one)."""
    client = async_redis_client()
    now = time.time()
    due = await client.zrangebyscore(ONLINE_KEY, "-inf", now, start=0, num=limit)
    if not due:
        return []
    result = await update_many({int(uid): [] for uid in due})
    return [uid for uid, transition in result.items() if transition == -1]
