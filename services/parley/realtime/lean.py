"""Small stand-ins for asyncio primitives that every open socket holds one of.

An asyncio.Queue allocates four deques up front (its items, getters, putters and the
waiters of its `join` Event), about 3.3 KB measured with tracemalloc
(`python -m loadtests.bench.memprofile`), and an asyncio.Event one deque (0.9 KB). An idle
socket held two queues (uvicorn's receive queue, the channel layer's queue of its
channel) and an Event (uvicorn's `writable`): a fifth of its memory. These keep nothing
until they are used and give it back when they are empty.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Inbox:
    """An unbounded FIFO: the part of asyncio.Queue that uvicorn's WebSocket protocol and
    channels_redis' pub/sub layer use (put_nowait, get, qsize, empty). Any number of
    coroutines may wait in `get`; each item goes to one of them, in the order they came."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque | None = None
        self._waiters: list[asyncio.Future] | None = None

    def qsize(self) -> int:
        items = self._items
        return len(items) if items is not None else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        items = self._items
        if items is None:
            items = self._items = deque()
        items.append(item)
        self._wake_one()

    def get_nowait(self) -> Any:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    def wake_on_put(self, waiter: asyncio.Future) -> None:
        """Have the next put set `waiter`'s result (unless it is done by then): a task can
        wait for this inbox and something else with one future."""
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(waiter)

    def forget(self, waiter: asyncio.Future) -> None:
        waiters = self._waiters
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                self._waiters = None

    async def get(self) -> Any:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self.wake_on_put(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                self.forget(waiter)
                if self._items and not waiter.cancelled():
                    self._wake_one()  # it was woken for an item it will not take
                raise
        items = self._items
        item = items.popleft()
        if not items:
            self._items = None
        return item

    def _wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break
        if not waiters:
            self._waiters = None


class Flag:
    """asyncio.Event (set, clear, is_set, wait) without a waiter deque while nobody waits."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(waiter)
        try:
            return await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if waiters is self._waiters and not waiters:
                self._waiters = None
