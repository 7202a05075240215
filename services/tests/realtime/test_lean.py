"""The per-socket memory savings (loadtests/bench/memprofile.py measures them): the lean
asyncio stand-ins, the consumer's task-less channel reading, and the uvicorn protocol
subclass, whose assumptions about uvicorn's internals are checked here so that an
upgrade that breaks them fails a test rather than a deployment."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from channels.exceptions import StopConsumer

from parley.realtime.consumers import dispatch_many, dispatch_with_inbox
from parley.realtime.lean import Flag, Inbox

pytestmark = pytest.mark.timeout(30)


async def test_inbox_is_a_fifo_that_waits_and_loses_nothing_to_a_cancelled_getter():
    inbox = Inbox()
    assert inbox.empty() and inbox.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        inbox.get_nowait()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert inbox.qsize() == 2
    assert await inbox.get() == 1
    assert inbox.get_nowait() == 2
    assert inbox.empty() and inbox._items is None  # the deque is given back

    first = asyncio.ensure_future(inbox.get())
    second = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("a")
    first.cancel()  # woken for "a", cancelled before it ran: "a" goes to the other
    assert await asyncio.wait_for(second, 1) == "a"
    assert inbox._waiters is None


async def test_flag_waits_until_set():
    flag = Flag()
    waiter = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    flag.set()
    assert await asyncio.wait_for(waiter, 1) is True
    flag.clear()
    assert not flag.is_set()
    flag.set()
    assert await flag.wait() is True


async def test_dispatch_with_inbox_keeps_channels_order_and_stops_cleanly():
    client: asyncio.Queue = asyncio.Queue()
    inbox = Inbox()
    seen = []

    async def dispatch(message):
        seen.append(message)
        if message == "stop":
            raise StopConsumer

    inbox.put_nowait("layer-1")
    client.put_nowait("client-1")  # both ready: the client's event goes first
    task = asyncio.ensure_future(dispatch_with_inbox(client.get, inbox, str.upper, dispatch))
    await asyncio.sleep(0.05)
    assert seen == ["client-1", "LAYER-1"]
    inbox.put_nowait("layer-2")
    await asyncio.sleep(0.05)
    client.put_nowait("stop")
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(task, 1)
    assert seen == ["client-1", "LAYER-1", "LAYER-2", "stop"]
    assert inbox._waiters is None


async def test_the_uvicorn_protocol_subclass_still_fits_uvicorn():
    import uvicorn
    from uvicorn.server import ServerState

    from parley.realtime.server import _ws_protocol_class

    async def app(scope, receive, send):  # pragma: no cover - never called
        pass

    cls = _ws_protocol_class()
    config = uvicorn.Config(app, ws=cls, lifespan="off")
    config.load()
    assert config.ws_protocol_class is cls
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    # What the subclass replaces or drops must be what uvicorn uses.
    assert isinstance(protocol.queue, Inbox) and isinstance(protocol.writable, Flag)
    assert protocol.writable.is_set()
    source = inspect.getsource(cls.__mro__[1])
    for needle in ("self.request = event", "self.response = self.conn.accept(event)"):
        assert needle in source, f"uvicorn no longer does {needle!r}"
    for uses in ("self.queue.put_nowait(", "await self.queue.get()", "self.queue.empty()"):
        assert uses in source


async def test_dispatch_many_keeps_channels_order_and_stops_cleanly():
    client: asyncio.Queue = asyncio.Queue()
    layer: asyncio.Queue = asyncio.Queue()
    seen = []

    async def dispatch(message):
        seen.append(message)
        if message == "stop":
            raise StopConsumer

    layer.put_nowait("layer-1")
    client.put_nowait("client-1")
    task = asyncio.ensure_future(dispatch_many([client.get, layer.get], dispatch))
    await asyncio.sleep(0.05)
    assert seen == ["client-1", "layer-1"]
    client.put_nowait("stop")
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(task, 1)
    assert seen == ["client-1", "layer-1", "stop"]
