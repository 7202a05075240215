"""Helpers for the realtime tests: in-process sockets through channels' WebsocketCommunicator."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
from channels.db import database_sync_to_async

if importlib.util.find_spec("daphne") is None:
    # channels.testing imports its live-server test case, which needs daphne (not a
    # dependency of ours). Nothing here uses it: stand in an empty module for it.
    _live = types.ModuleType("channels.testing.live")
    _live.ChannelsLiveServerTestCase = None
    sys.modules.setdefault("channels.testing.live", _live)

from channels.testing import WebsocketCommunicator

from parley.accounts.services import token_create
from parley.realtime.node import current_node
from parley.realtime.routing import build_application

application = build_application()
ORIGIN = "http://localhost:8000"


class Socket:
    """A client socket with frame helpers. Frames a test does not wait for are kept."""

    def __init__(self, comm: WebsocketCommunicator) -> None:
        self.comm = comm
        self.seen: list[dict] = []  # every frame received, for failure messages
        self.backlog: list[dict] = []  # received, not yet taken by expect()
        self.hello: dict | None = None
        self.refused: int | None = None  # close code of a handshake refused before accept

    async def send(self, frame: dict) -> None:
        await self.comm.send_json_to(frame)

    async def send_text(self, text: str) -> None:
        await self.comm.send_to(text_data=text)

    async def recv(self, timeout: float = 3) -> dict:
        frame = await self.comm.receive_json_from(timeout)
        self.seen.append(frame)
        return frame

    async def expect(self, ftype: str, timeout: float = 3, **match) -> dict:
        """The first frame of `ftype` (matching `match`) not taken yet; others wait in
        the backlog for a later expect()."""
        import asyncio

        def matches(frame):
            return frame.get("type") == ftype and all(frame.get(k) == v for k, v in match.items())

        for i, frame in enumerate(self.backlog):
            if matches(frame):
                return self.backlog.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {ftype} {match} within {timeout} s; saw {self.seen}")
            try:
                frame = await self.recv(remaining)
            except TimeoutError:
                continue
            if matches(frame):
                return frame
            self.backlog.append(frame)

    async def nothing(self, ftype: str, timeout: float = 0.5, **match) -> None:
        """No frame of `ftype` (matching `match`) is waiting or arrives within `timeout`."""
        import asyncio

        def matches(frame):
            return frame.get("type") == ftype and all(frame.get(k) == v for k, v in match.items())

        assert not any(matches(f) for f in self.backlog), self.backlog
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            if await self.comm.receive_nothing(min(remaining, 0.05)):
                continue
            frame = await self.recv()
            assert not matches(frame), frame
            self.backlog.append(frame)

    async def messages(self, n: int, timeout: float = 5) -> list[dict]:
        return [await self.expect("message", timeout) for _ in range(n)]

    async def close_code(self, timeout: float = 3) -> int:
        while True:
            out = await self.comm.receive_output(timeout)
            if out["type"] == "websocket.close":
                return out.get("code", 1000)

    async def disconnect(self) -> None:
        await self.comm.disconnect()


async def open_socket(
    user=None,
    *,
    token: str | None = None,
    origin: str | None = None,
    cookie: str | None = None,
    path: str = "/ws/chat/",
    expect_hello: bool = True,
    headers: list | None = None,
) -> Socket:
    headers = list(headers or [])
    if user is not None and token is None:
        token = await database_sync_to_async(token_create)(user=user)
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if origin:
        headers.append((b"origin", origin.encode()))
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    comm = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await comm.connect(timeout=5)
    sock = Socket(comm)
    sock.refused = None if connected else code
    if connected and expect_hello:
        sock.hello = await sock.expect("hello")
    return sock


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    """Users are made with a password; PBKDF2 would cost ~0.3 s per user per test."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
async def node_cleanup():
    """Stop this test loop's realtime node (heartbeat, sweeps, probe) after the test."""
    yield
    node = current_node()
    if node is not None:
        await node.stop()


@pytest.fixture(scope="session", autouse=True)
def _close_db_pool(django_db_setup):
    """Return the database threads' pooled connections, so that the test database can be
    dropped at the end of the session (the pool closes checked-in connections only
    asynchronously; whatever is left after a moment is ended)."""
    yield
    import time

    import psycopg
    from django.db import connection, connections

    name = connection.settings_dict["NAME"]
    for conn in connections.all():
        close_pool = getattr(conn, "close_pool", None)
        if close_pool is not None:
            close_pool()
    connections.close_all()
    params = connection.get_connection_params()
    params.update(dbname="postgres", autocommit=True)
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**params) as admin:
        query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        deadline = time.monotonic() + 0.5
        while admin.execute(query, [name]).fetchall() and time.monotonic() < deadline:
            time.sleep(0.1)
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND pid <> pg_backend_pid()",
            [name],
        )
