"""The real stack for the browser tests, and what the tests do with it.

Web (gunicorn), realtime replicas (uvicorn) and a Celery worker run as processes, started
with the helpers of the realtime and worker tests. Browsers reach the replicas through a
front door: a layer-4 balancer like the Kubernetes Service or the nginx in front of
realtime in production. `REALTIME_PUBLIC_URL` names the front door, so the page, its CSP
and its cookie are exactly as deployed; the test chooses which replica new connections go
to (`FrontDoor.order`), and a replica killed with -9 cuts its connections, as it does
behind a real balancer, after which reconnects go to a replica that is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

from tests.realtime.cluster import child_env as cluster_child_env
from tests.realtime.cluster import free_port

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - conftest skips the suite
    expect = None

# Debian's Chromium (apt-get install chromium); never a browser downloaded by Playwright.
CHROMIUM = os.environ.get("PARLEY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
PASSWORD = "correct-horse-battery-staple"
TIMEOUT_MS = 10_000
_names = itertools.count(1)


def child_env(db_name: str, **extra: str) -> dict[str, str]:
    """The stack's environment, with drains short enough for a test to wait out."""
    return cluster_child_env(
        db_name, **{"REALTIME_DRAIN_SECONDS": "1", "REALTIME_GRACE_SECONDS": "5", **extra}
    )


def clear_stale_redis_state(redis_url: str) -> None:
    """Forget what an earlier run left in this Redis database under keys named by ids.

    The test database is new each session, so conversation and user ids start at 1
    again; a receipt staged or a flush scheduled for "conversation 1" a minute ago must
    not apply to (or hold back) the new conversation 1.
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        patterns = (
            "parley:rcpt*",
            "parley:notify:*",
            "parley:presence:*",
            "parley:rl:*",
            "receipts",
            "notifications",
            "unacked*",
        )
        keys = [k for p in patterns for k in client.scan_iter(p, count=500)]
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class FrontDoor:
    """A TCP balancer on a thread: each connection goes to the first replica port in
    `order` that accepts it, bytes are copied both ways, and when either side ends the
    other is closed (a browser whose replica died sees its socket drop, code 1006).
    While `accepting` is off it refuses every connection, like a balancer that has no
    healthy backend for a moment."""

    def __init__(self) -> None:
        self.port = free_port()
        self.order: list[int] = []
        self.accepting = True
        self.routed: list[int] = []  # the replica port of every connection, in order
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/"

    def start(self) -> FrontDoor:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop
        ).result(5)
        return self

    async def _handle(self, reader, writer) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        for port in list(self.order):
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 2
                )
            except (OSError, TimeoutError):
                continue
            break
        else:
            writer.transport.abort()
            return
        self.routed.append(port)
        self._writers.update((writer, up_writer))

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))
            writer.close()
            up_writer.close()

    def stop(self) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@dataclass
class Account:
    id: int
    username: str
    display_name: str
    token: str
    password: str = PASSWORD


class Api:
    """The web service's JSON API, with bearer tokens (what a test sets up through it)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def call(
        self, method: str, path: str, data: dict | None = None, token: str | None = None
    ) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            f"{self.base}/api/v1{path}",
            data=json.dumps(data).encode() if data is not None else None,
            headers=headers,
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def ok(
        self, method: str, path: str, data: dict | None = None, token: str | None = None
    ) -> dict:
        status, body = self.call(method, path, data, token)
        assert 200 <= status < 300, (method, path, status, body)
        return body

    def account(self, name: str, display_name: str) -> Account:
        username = f"{name}-{next(_names)}-{uuid.uuid4().hex[:6]}"
        body = self.ok(
            "POST",
            "/accounts",
            {
                "username": username,
                "password": PASSWORD,
                "display_name": display_name,
            },
        )
        return Account(body["user"]["id"], username, display_name, body["token"])

    def direct(self, a: Account, b: Account) -> int:
        return self.ok("POST", "/direct", {"username": b.username}, a.token)["id"]

    def room(self, owner: Account, name: str, *members: Account, topic: str = "") -> dict:
        room = self.ok("POST", "/rooms", {"name": name, "topic": topic}, owner.token)
        for member in members:
            self.ok("POST", f"/rooms/{room['slug']}/join", {}, member.token)
        return room

    def send(self, who: Account, conversation_id: int, body: str) -> dict:
        return self.ok(
            "POST",
            f"/conversations/{conversation_id}/messages",
            {"body": body, "client_id": uuid.uuid4().hex},
            who.token,
        )

    def seqs_and_bodies(self, who: Account, conversation_id: int) -> list[tuple[int, str]]:
        page = self.ok(
            "GET", f"/conversations/{conversation_id}/messages?limit=200", token=who.token
        )
        return [(m["seq"], m["body"]) for m in page["messages"]]


# --- pages ---------------------------------------------------------------------------------


def login(page, account: Account) -> None:
    page.goto("/login/")
    page.get_by_label("Username").fill(account.username)
    page.get_by_label("Password").fill(account.password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/conversations/$"))


def wait_live(page, node: str | None = None) -> None:
    """The page's socket is open and has had its hello (on replica `node`)."""
    html = page.locator("html")
    expect(html).to_have_attribute("data-connection", "live", timeout=TIMEOUT_MS)
    if node is not None:
        expect(html).to_have_attribute("data-realtime-node", node)


def composer(page):
    return page.locator("#composer textarea")


def message_seqs(page) -> list[int]:
    return page.eval_on_selector_all(
        "#message-list > li.message", "els => els.map(e => Number(e.dataset.seq || 0))"
    )


def message_bodies(page) -> list[str]:
    return page.eval_on_selector_all(
        "#message-list > li.message .message-body", "els => els.map(e => e.textContent)"
    )


def wait_for(predicate, timeout: float = 10, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout} s")
