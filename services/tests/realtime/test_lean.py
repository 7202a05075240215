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


def recorder():
    """A dispatch function that records what it gets and stops the loop on "stop"."""
    seen = []

    async def dispatch(message):
        seen.append(message)
        if message == "stop":
            raise StopConsumer

    return seen, dispatch


async def test_dispatch_with_inbox_keeps_channels_order_and_stops_cleanly():
    client: asyncio.Queue = asyncio.Queue()
    inbox = Inbox()
    seen, dispatch = recorder()

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


class FakeTransport:
    """What the protocol asks of its transport in these tests; records what it writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8001), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False


def make_protocol(app=None):
    """`parley realtime`'s WebSocket protocol as uvicorn builds it: (config, instance)."""
    import uvicorn
    from uvicorn.server import ServerState

    from parley.realtime.server import _ws_protocol_class

    async def never_called(scope, receive, send):  # pragma: no cover
        pass

    cls = _ws_protocol_class()
    config = uvicorn.Config(app or never_called, ws=cls, lifespan="off")
    config.load()
    return config, cls(config=config, server_state=ServerState(), app_state={})


async def test_the_uvicorn_protocol_subclass_still_fits_uvicorn():
    config, protocol = make_protocol()
    cls = type(protocol)
    assert config.ws_protocol_class is cls
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
    seen, dispatch = recorder()

    layer.put_nowait("layer-1")
    client.put_nowait("client-1")
    task = asyncio.ensure_future(dispatch_many([client.get, layer.get], dispatch))
    await asyncio.sleep(0.05)
    assert seen == ["client-1", "layer-1"]
    client.put_nowait("stop")
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(task, 1)
    assert seen == ["client-1", "layer-1", "stop"]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_wire_text_is_the_frame_websockets_would_write(size):
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    from parley.realtime.frames import wire_text

    text = "é" * (size // 2) + "x" * (size % 2)  # multi-byte: lengths count bytes
    server = ServerProtocol()
    server.state = State.OPEN
    server.send_text(text.encode())
    assert wire_text(text) == b"".join(server.data_to_send())


async def test_the_protocol_writes_ready_made_frames_only_on_an_open_socket():
    from uvicorn.protocols.utils import ClientDisconnected
    from websockets.protocol import State

    from parley.realtime.frames import WIRE_SEND, wire_text

    _, protocol = make_protocol()
    protocol.transport = FakeTransport()
    wire = wire_text('{"type":"pong"}')
    with pytest.raises(ClientDisconnected):  # no handshake yet
        await protocol.send({"type": WIRE_SEND, "bytes": wire})
    protocol.handshake_complete = True
    protocol.conn.state = State.OPEN
    await protocol.send({"type": WIRE_SEND, "bytes": wire})
    assert protocol.transport.written == [wire]
    protocol.close_sent = True
    with pytest.raises(ClientDisconnected):
        await protocol.send({"type": WIRE_SEND, "bytes": wire})
    assert protocol.transport.written == [wire]


async def test_the_protocol_offers_ready_made_frames_in_the_scope():
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    from parley.realtime.frames import WIRE_EXTENSION

    scopes = []

    async def app(scope, receive, send):
        scopes.append(scope)

    _, protocol = make_protocol(app)
    protocol.connection_made(FakeTransport())
    headers = Headers(
        {
            "Host": "localhost",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
    )
    protocol.handle_connect(Request("/ws/chat/", headers))
    for _ in range(20):
        if scopes:
            break
        await asyncio.sleep(0.01)
    assert scopes and WIRE_EXTENSION in scopes[0]["extensions"]
    assert "websocket.http.response" in scopes[0]["extensions"]  # uvicorn's own stays
