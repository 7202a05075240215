"""Real processes for the multi-process realtime tests: web (gunicorn), realtime replicas
(uvicorn via parley.realtime.server.serve), a private redis-server, and WebSocket
clients, including one that reconnects and resumes the way docs/protocol.md says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import connect as ws_connect


def child_env(db_name: str, **extra: str) -> dict[str, str]:
    """The environment of every stack process: the test database, this run's Redis."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    url = urlsplit(os.environ["DATABASE_URL"])
    env.update(
        DATABASE_URL=urlunsplit(url._replace(path="/" + db_name)),
        DB_POOL_MAX_SIZE="4",
        DEBUG="true",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        CELERY_TASK_ALWAYS_EAGER="false",
    )
    env.update(extra)
    return env


HERE = Path(__file__).resolve()
SERVICES = HERE.parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, data: dict, token: str, timeout: float = 5.0) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(data).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Proc:
    """A child process in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(SERVICES),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.wait(5)
        self._log.close()

    def wait_http_ok(self, url: str, timeout: float) -> None:
        """Until `url` answers 200; fails at once, with the log, if the process exits."""

        def up():
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.tail()}")
            try:
                return http_get(url)[0] == 200
            except OSError:
                return False

        wait_until(up, timeout, what=f"{self.name} {url}")

    def tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"[{self.name}] {line}" for line in lines[-n:])


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s")


class Realtime(Proc):
    def __init__(self, name: str, env: dict, logdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        code = f"from parley.realtime.server import serve; serve('127.0.0.1', {self.port})"
        super().__init__(name, [sys.executable, "-c", code], env, logdir)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        self.wait_http_ok(self.http_url + "/healthz", timeout)


class Web(Proc):
    def __init__(self, env: dict, logdir: Path) -> None:
        self.port = free_port()
        argv = [
            str(Path(sys.executable).with_name("gunicorn")),
            "parley.config.wsgi:application",
            "-b",
            f"127.0.0.1:{self.port}",
            "-w",
            "2",
            "-k",
            "gthread",
            "--threads",
            "4",
        ]
        super().__init__("web", argv, env, logdir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        self.wait_http_ok(self.url + "/healthz", timeout)


class RedisServer(Proc):
    def __init__(self, logdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        super().__init__(f"redis-{self.port}", argv, dict(os.environ), logdir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_ready(self, timeout: float = 10) -> None:
        import redis

        def up():
            try:
                return redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping()
            except (redis.RedisError, OSError):
                return False

        wait_until(up, timeout, what="redis-server")


# --- WebSocket clients ---------------------------------------------------------------------


def close_code(exc: websockets.ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None


async def open_ws(
    url: str, token: str | None = None, *, origin: str | None = None, compression: str | None = None
):
    headers = [("Authorization", f"Bearer {token}")] if token else []
    return await ws_connect(
        url,
        additional_headers=headers,
        origin=origin,
        open_timeout=5,
        close_timeout=2,
        compression=compression,
        proxy=None,
        max_size=None,
    )


class Simple:
    """One socket, frames sorted by type."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.frames: list[dict] = []
        self.done = False  # the connection ended (closed holds its code, if it had one)
        self.closed: int | None = None
        self._task = asyncio.get_running_loop().create_task(self._read())
        self.hello: dict | None = None

    @classmethod
    async def open(cls, url: str, token: str) -> Simple:
        client = cls(await open_ws(url, token))
        client.hello = await client.wait_for(lambda f: f["type"] == "hello")
        return client

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                self.frames.append(json.loads(text))
        except websockets.ConnectionClosed as exc:
            self.closed = close_code(exc)
        else:
            self.closed = self.ws.close_code
        finally:
            self.done = True

    async def send(self, frame: dict) -> None:
        await self.ws.send(json.dumps(frame))

    def of(self, ftype: str) -> list[dict]:
        return [f for f in self.frames if f["type"] == ftype]

    async def wait_for(self, predicate, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for frame in self.frames:
                if predicate(frame):
                    return frame
            if self.done:
                break
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"no matching frame within {timeout} s (closed={self.closed}): {self.frames[-10:]}"
        )

    async def wait_count(self, ftype: str, n: int, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.of(ftype)
            if len(got) >= n:
                return got
            await asyncio.sleep(0.02)
        raise AssertionError(f"{len(self.of(ftype))}/{n} {ftype} frames within {timeout} s")

    async def wait_closed(self, timeout: float = 10) -> int | None:
        await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self.closed

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 3)


class Resilient:
    """A client that follows docs/protocol.md: on any close it reconnects (exponential
    backoff with full jitter, to the next URL), resumes each conversation from the last
    seq it holds, and sends again every unacknowledged `send` with its client_id."""

    def __init__(self, name: str, urls: list[str], token: str) -> None:
        self.name, self.urls, self.token = name, urls, token
        self.url_index = 0
        self.messages: dict[int, dict[int, dict]] = {}  # conversation -> seq -> frame
        self.acks: dict[str, dict] = {}
        self.unacked: dict[str, dict] = {}  # client_id -> send frame
        self.errors: list[dict] = []
        self.close_codes: list[int | None] = []
        self.connects = 0
        self.presence: list[dict] = []
        self.ws = None
        self._stop = False
        self._connected = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def last_seq(self, conversation_id: int) -> int:
        """The highest seq up to which this client holds every message."""
        held = self.messages.get(conversation_id, {})
        n = 0
        while n + 1 in held:
            n += 1
        return n

    async def _run(self) -> None:
        attempt = 0
        while not self._stop:
            url = self.urls[self.url_index % len(self.urls)]
            try:
                self.ws = await open_ws(url, self.token)
            except (TimeoutError, OSError, websockets.WebSocketException):
                attempt += 1
                self.url_index += 1
                await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))
                continue
            try:
                async for text in self.ws:
                    frame = json.loads(text)
                    await self._on_frame(frame)
                    if frame["type"] == "hello":
                        attempt = 0
                self.close_codes.append(self.ws.close_code)
            except websockets.ConnectionClosed as exc:
                self.close_codes.append(close_code(exc))
            finally:
                self._connected.clear()
            if self._stop:
                return
            if self.close_codes[-1] in (1012, 1006, None):
                self.url_index += 1  # that replica is going away: try another
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))

    async def _on_frame(self, frame: dict) -> None:
        ftype = frame["type"]
        if ftype == "hello":
            self.connects += 1
            for conv in frame["conversations"]:
                if conv["last_seq"] > self.last_seq(conv["id"]):
                    await self.ws.send(
                        json.dumps(
                            {
                                "type": "resume",
                                "conversation": conv["id"],
                                "after": self.last_seq(conv["id"]),
                            }
                        )
                    )
            for send in list(self.unacked.values()):
                await self.ws.send(json.dumps(send))
            self._connected.set()
        elif ftype == "message":
            held = self.messages.setdefault(frame["conversation"], {})
            if frame["seq"] in held:
                assert held[frame["seq"]]["id"] == frame["id"], (held[frame["seq"]], frame)
            held[frame["seq"]] = frame
        elif ftype == "ack":
            self.acks[frame["client_id"]] = frame
            self.unacked.pop(frame["client_id"], None)
        elif ftype == "error":
            self.errors.append(frame)
        elif ftype == "presence":
            self.presence.append({**frame, "at": time.monotonic()})

    async def wait_connected(self, timeout: float = 10) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def send(self, conversation_id: int, body: str, client_id: str) -> None:
        frame = {
            "type": "send",
            "conversation": conversation_id,
            "client_id": client_id,
            "body": body,
        }
        self.unacked[client_id] = frame
        if self._connected.is_set():
            with contextlib.suppress(websockets.ConnectionClosed):
                await self.ws.send(json.dumps(frame))

    def seqs(self, conversation_id: int) -> list[int]:
        return sorted(self.messages.get(conversation_id, {}))

    async def close(self) -> None:
        self._stop = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


async def wait_all(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s")


def stop_all(procs: Iterable[Proc]) -> None:
    for proc in procs:
        if proc.alive():
            proc.signal(signal.SIGTERM)
    for proc in procs:
        proc.stop(timeout=15)
