"""Bearer tokens on the WebSocket handshake: a short per-process cache, a batched touch.

A handshake with `Authorization: Bearer` used to cost a SELECT of the token and, on first
use and then once a minute, an UPDATE of its `last_used_at`, both awaited. Now:

- token -> user is cached for `conf.token_cache_seconds()` (REALTIME_TOKEN_CACHE_SECONDS,
  default 5 s), at most `conf.token_cache_size()` entries (least recently used out). The
  key is the token's SHA-256 (what Postgres stores), never the token itself. Only tokens
  that exist are cached. A deleted token, or a user made inactive, stops opening sockets
  within that TTL; sockets already open stay open, as before.
- last_used_at is not written during the handshake. The tokens due for a touch (never
  used, or not within the minute) are collected and written by one UPDATE on the
  database threads TOKEN_TOUCH_FLUSH_SECONDS later, without anyone waiting for it. It is
  bookkeeping: a touch lost with the process (or its event loop) is harmless.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from django.db import close_old_connections
from django.utils import timezone

from parley.accounts.models import User
from parley.accounts.services import token_digest, token_touch_due, tokens_touch
from parley.realtime import conf, pg
from parley.realtime.db import executor

logger = logging.getLogger(__name__)

TOKEN_MAX_CHARS = 200


@dataclass(slots=True)
class _Entry:
    token_id: int
    user: User
    used_at: datetime | None  # last_used_at as last read or written by this process
    expires: float  # time.monotonic()


class TokenCache:
    """digest -> (token id, user), for a few seconds, bounded, least recently used out."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str, now: float) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry.expires <= now:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry

    def put(self, digest: str, entry: _Entry, max_size: int) -> None:
        with self._lock:
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            self._prune(time.monotonic())
            while len(self._entries) > max(max_size, 0):
                self._entries.popitem(last=False)

    def prune(self) -> None:
        """Forget the expired entries at the least recently used end: they are never
        served, but each held a user (about 1 KB) until 10,000 newer ones pushed it out."""
        with self._lock:
            self._prune(time.monotonic())

    def _prune(self, now: float) -> None:
        entries = self._entries
        while len(entries) > 1:
            digest, oldest = next(iter(entries.items()))
            if oldest.expires > now:
                return
            del entries[digest]

    def discard(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries


class TouchBatcher:
    """Collects token ids whose last_used_at is due and writes them in one UPDATE."""

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def add(self, token_id: int) -> None:
        """Called on the event loop: the flush is scheduled there."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._pending.add(token_id)
            # A flush scheduled on another loop (one that is gone, in tests) may never
            # run: schedule one on this loop.
            if self._scheduled_on is loop:
                return
            self._scheduled_on = loop
        loop.call_later(conf.TOKEN_TOUCH_FLUSH_SECONDS, self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            ids, self._pending = self._pending, set()
            self._scheduled_on = None
        if ids:
            fut = loop.run_in_executor(executor(), _touch, ids, timezone.now())
            fut.add_done_callback(_log_failure)

    def pending(self) -> set[int]:
        with self._lock:
            return set(self._pending)


def _touch(token_ids: set[int], now: datetime) -> int:
    # As channels' database_sync_to_async does around ORM work on a thread.
    close_old_connections()
    try:
        return tokens_touch(token_ids=token_ids, now=now)
    finally:
        close_old_connections()


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logger.warning("token last_used_at not written: %r", fut.exception())


cache = TokenCache()
touches = TouchBatcher()


async def user_from_token(token: str) -> User | None:
    """The active user a bearer token belongs to, or None. Call on the event loop.

    Returns a copy of the cached user: sockets do not share one instance.
    """
    if not token or len(token) > TOKEN_MAX_CHARS:
        return None
    digest = token_digest(token)
    ttl = conf.token_cache_seconds()
    now = time.monotonic()
    entry = cache.get(digest, now) if ttl > 0 else None
    if entry is None:
        from parley.realtime.node import get_node  # node imports this module

        found = await pg.token_by_digest(get_node().loop_db, digest)
        if found is None:
            cache.discard(digest)
            return None
        token_id, used_at, user = found
        entry = _Entry(token_id=token_id, user=user, used_at=used_at, expires=now + ttl)
        if ttl > 0:
            cache.put(digest, entry, conf.token_cache_size())
    wall = timezone.now()
    if token_touch_due(entry.used_at, wall):
        entry.used_at = wall
        touches.add(entry.token_id)
    return copy.copy(entry.user)
