"""Locust scenarios for any Parley deployment: HTTP API plus the WebSocket protocol.

    locust -f loadtests/locustfile.py --headless --host https://chat.example.com \\
        --scenario chat -u 200 -r 20 -t 5m [--ws-url wss://chat.example.com/ws/chat/] \\
        [--users-file loadtests/.users.json] [--results-dir loadtests/results]

Scenarios (`--scenario`, or name user classes on the command line as usual):
- `chat`: people who sign in, list conversations, read history, chat in rooms and
  direct conversations, type, mark read, ping, and now and then reconnect and resume
  (ChatUser 9 : HistoryReader 1);
- `storm`: a connection storm: sockets opened as fast as the spawn rate, held idle with
  pings, reopened (StormUser; use a high -r, e.g. 1000);
- `large-room`: one room (--large-room, default lt-large) with every user in it; a few
  send (--large-senders), everyone receives (LargeRoomUser);
- `history`: HTTP history readers paging through conversations (HistoryReader).

Besides Locust's own statistics (HTTP requests; "WS connect" is the time to `hello`,
"WS send->ack" and "WS send->delivery" the chat latencies, failures per error code), each
run prints and saves chat figures to --results-dir: sends, acks, deliveries/s, error
frames by code, reconnects, close codes, and lost and duplicated messages checked
against history at the end (sending stops, in-flight frames drain, then every socket's
stream is compared with the conversation's history over the API). In distributed mode
(--master / --worker) each worker checks its own sockets and the master adds them up.

Users: with --users-file (python -m loadtests.seed), each simulated user takes an account
from the file; without, each signs up through the API (the server hashes a password
per sign-up: slow on purpose, fine for small runs). Latencies across machines use the
wall clock carried in message bodies: keep load generators NTP-synchronized.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import secrets
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import gevent
import gevent.event
from locust import HttpUser, between, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect as ws_connect

from loadtests.common import (
    HistoryCheck,
    Stream,
    body_sent_at,
    check_history,
    fmt_ms,
    git_revision,
    machine,
    make_body,
    stamp,
)

logger = logging.getLogger("parley.loadtest")
logging.getLogger("httpx").setLevel(logging.WARNING)
API = "/api/v1"
SCENARIOS = {
    "chat": ["ChatUser", "HistoryReader"],
    "storm": ["StormUser"],
    "large-room": ["LargeRoomUser"],
    "history": ["HistoryReader"],
}


# --- options ---------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("Parley")
    g.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="chat",
        help="which users to run (ignored when user classes are named)",
    )
    g.add_argument("--ws-url", default="", help="WebSocket URL (default: the host, path /ws/chat/)")
    g.add_argument(
        "--http-header",
        action="append",
        type=_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="a header sent with every HTTP request (repeatable), e.g. 'X-Forwarded-Proto: "
        "https' for the web Service itself, behind the proxy where TLS ends",
    )
    g.add_argument("--users-file", default="", help="accounts from python -m loadtests.seed")
    g.add_argument("--rooms", type=int, default=20, help="rooms lt-room-0..N-1 chat users share")
    g.add_argument("--rooms-per-user", type=int, default=3)
    g.add_argument(
        "--think-time", type=float, default=5.0, help="mean seconds between a chat user's actions"
    )
    g.add_argument("--large-room", default="lt-large")
    g.add_argument(
        "--large-senders", type=float, default=0.02, help="share of large-room users who send"
    )
    g.add_argument(
        "--send-interval",
        type=float,
        default=5.0,
        help="seconds between a large-room sender's messages",
    )
    g.add_argument("--hold", type=float, default=60.0, help="seconds a storm socket stays open")
    g.add_argument(
        "--signin-ratio",
        type=float,
        default=0.1,
        help="share of users who exchange a password for a new token on start",
    )
    g.add_argument(
        "--drain-seconds",
        type=float,
        default=3.0,
        help="wait for in-flight frames before the history check",
    )
    g.add_argument("--no-history-check", action="store_true")
    g.add_argument(
        "--results-dir",
        default=str(Path(__file__).resolve().parent / "results"),
        # The load-test image sets it to /tmp/...: its root file system is read-only.
        env_var="LOCUST_RESULTS_DIR",
        help="where the chat figures are saved ('' to not save)",
    )
    g.add_argument("--run-tag", default="", help="a name for the results file")


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'NAME: VALUE', got {text!r}")
    return name.strip(), value.strip()


def http_headers(options) -> dict[str, str]:
    """--http-header as a dict (workers get the master's options as lists, not tuples)."""
    return {name: value for name, value in (getattr(options, "http_header", None) or [])}


def ws_url_for(options, host: str) -> str:
    if options.ws_url:
        return options.ws_url
    parts = urlsplit(host)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, "/ws/chat/", "", ""))


@events.init.add_listener
def _init(environment, **_kw) -> None:
    options = environment.parsed_options
    if options is None:
        return
    # Pick the scenario's classes unless the command line named some. Workers keep them
    # all: the master tells them which to start.
    if not getattr(options, "user_classes", None) and not isinstance(
        environment.runner, WorkerRunner
    ):
        wanted = SCENARIOS[options.scenario]
        chosen = [u for u in environment.user_classes if u.__name__ in wanted]
        if chosen:
            environment.user_classes[:] = chosen
    if isinstance(environment.runner, MasterRunner):
        environment.runner.register_message("parley_chat", _on_worker_report)
    elif isinstance(environment.runner, WorkerRunner):
        environment.runner.register_message(
            "parley_finish", lambda environment, msg, **_: gevent.spawn(_finish, environment)
        )
    CHAT.environment = environment


# --- accounts --------------------------------------------------------------------------------


class Accounts:
    """The user pool: from --users-file, or signed up on demand."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: list[dict] | None = None
        self.counter = itertools.count()
        self.known: list[dict] = []  # accounts in use here (partners for direct chats)

    def load(self, options) -> None:
        if self.pool is None:
            self.pool = []
            if options.users_file:
                self.pool = json.loads(Path(options.users_file).read_text())["users"]
                random.Random(os.getpid()).shuffle(self.pool)

    def take(self, user: HttpUser) -> dict:
        options = user.environment.parsed_options
        self.load(options)
        if self.pool:
            account = dict(self.pool[next(self.counter) % len(self.pool)])
        else:
            username = f"lt-{uuid.uuid4().hex[:12]}"
            password = secrets.token_urlsafe(12)
            with user.client.post(
                f"{API}/accounts",
                json={"username": username, "password": password, "display_name": username},
                name="POST /accounts (sign up)",
                catch_response=True,
            ) as r:
                if r.status_code != 201:
                    r.failure(f"sign-up: HTTP {r.status_code}")
                    raise RuntimeError(f"sign-up failed: HTTP {r.status_code} {r.text[:200]}")
                body = r.json()
            account = {
                "username": username,
                "password": password,
                "id": body["user"]["id"],
                "token": body["token"],
            }
        if account.get("password") and random.random() < options.signin_ratio:
            with user.client.post(
                f"{API}/auth/token",
                json={"username": account["username"], "password": account["password"]},
                name="POST /auth/token (sign in)",
                catch_response=True,
            ) as r:
                if r.status_code == 200:
                    account["token"] = r.json()["token"]
                else:
                    r.failure(f"sign-in: HTTP {r.status_code}")
        with self.lock:
            self.known.append(account)
        return account

    def partner(self, me: dict) -> dict | None:
        with self.lock:
            others = [a for a in (self.pool or self.known) if a["username"] != me["username"]]
        return random.choice(others) if others else None


ACCOUNTS = Accounts()


# --- chat figures of this process ------------------------------------------------------------


class ChatFigures:
    """Counters and per-socket streams of this process, checked against history at the end."""

    def __init__(self) -> None:
        self.environment = None
        self.http_user = None  # any HttpUser, for paging history after a resume
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.quiet = False  # set at the end: no new sends, let the frames drain
        self.finished = False
        self.started = time.time()
        self.counters: Counter = Counter()
        self.errors: Counter = Counter()
        self.closes: Counter = Counter()
        self.sockets: list[ParleySocket] = []
        self.history_tokens: dict[int, str] = {}  # conversation -> a member's token
        self.check: HistoryCheck | None = None
        self.workers: dict[str, dict] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def snapshot(self) -> dict:
        return {
            "counters": dict(self.counters),
            "errors": dict(self.errors),
            "closes": {str(k): v for k, v in self.closes.items()},
            "history": self.check.__dict__ if self.check else None,
            "seconds": round(time.time() - self.started, 1),
        }


CHAT = ChatFigures()


def _fire(name: str, seconds: float, length: int = 0, exc: Exception | None = None) -> None:
    env = CHAT.environment
    if env is not None:
        env.events.request.fire(
            request_type="WS",
            name=name,
            response_time=seconds * 1000,
            response_length=length,
            exception=exc,
            context={},
        )


class ErrorFrame(Exception):
    pass


# --- the WebSocket client --------------------------------------------------------------------


class ParleySocket:
    """One socket following docs/protocol.md's client algorithm: resume after reconnects
    and gaps, resend unacknowledged sends with their client_id, deduplicate by seq."""

    def __init__(self, url: str, account: dict, host_header: str | None = None) -> None:
        self.url, self.account = url, account
        self.ws = None
        self.reader: gevent.Greenlet | None = None
        self.hello: dict | None = None
        self.hello_event = gevent.event.Event()
        self.streams: dict[int, Stream] = {}
        self.unacked: dict[str, tuple[float, dict]] = {}  # client_id -> (sent_at, frame)
        self.acked: list[tuple[int, str]] = []
        self.resuming: set[int] = set()
        self.closing = False
        with CHAT.lock:
            CHAT.sockets.append(self)

    @property
    def conversations(self) -> list[int]:
        return list(self.streams)

    def connect(self, timeout: float = 15.0) -> bool:
        started = time.time()
        self.hello_event.clear()
        try:
            self.ws = ws_connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self.account['token']}"},
                open_timeout=timeout,
                close_timeout=2,
                compression=None,
                max_size=2**22,
                proxy=None,
            )
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            _fire("connect (hello)", time.time() - started, exc=exc)
            CHAT.add("connect_failures")
            return False
        self.reader = gevent.spawn(self._read)
        if not self.hello_event.wait(timeout):
            _fire("connect (hello)", time.time() - started, exc=TimeoutError("no hello"))
            self.close()
            return False
        _fire("connect (hello)", time.time() - started)
        CHAT.add("connects")
        return True

    def _read(self) -> None:
        ws = self.ws
        code = None
        try:
            for text in ws:
                self._on_frame(json.loads(text), len(text))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
        except Exception as exc:  # a bug here must not kill the greenlet silently
            logger.exception("socket reader failed: %r", exc)
            code = -1
        else:
            code = ws.close_code
        finally:
            with CHAT.lock:
                CHAT.closes[code] += 1

    def _send(self, frame: dict) -> bool:
        try:
            self.ws.send(json.dumps(frame))
            return True
        except (ConnectionClosed, OSError, AttributeError):
            return False

    def _on_frame(self, frame: dict, length: int) -> None:
        now = time.time()
        ftype = frame.get("type")
        if ftype == "message":
            cid = frame["conversation"]
            stream = self.streams.get(cid)
            if stream is None:  # joined while connected
                stream = self.streams[cid] = Stream(start=frame["seq"] - 1)
            replay = cid in self.resuming
            last_before = stream.last
            new = stream.add(frame["seq"], replay=replay)
            if new and not replay:
                CHAT.add("deliveries")
                sent_at = body_sent_at(frame.get("body") or "")
                if sent_at is not None:
                    _fire("send->delivery", max(0.0, now - sent_at), length)
                if frame["seq"] > last_before + 1:  # a gap: ask for what is missing
                    CHAT.add("gaps_resumed")
                    self._resume(cid, after=self._contiguous(stream))
        elif ftype == "ack":
            sent = self.unacked.pop(frame["client_id"], None)
            if sent is not None:
                _fire("send->ack", now - sent[0], length)
                CHAT.add("acks")
                self.acked.append((frame["conversation"], frame["client_id"]))
        elif ftype == "hello":
            self.hello = frame
            for conv in frame["conversations"]:
                stream = self.streams.get(conv["id"])
                if stream is None:
                    self.streams[conv["id"]] = Stream(start=conv["last_seq"])
                elif conv["last_seq"] > self._contiguous(stream):
                    self._resume(conv["id"], after=self._contiguous(stream))
            for _, frame_ in list(self.unacked.values()):  # resend with the same client_id
                self._send(frame_)
            self.hello_event.set()
        elif ftype == "resumed":
            self.resuming.discard(frame["conversation"])
            if frame.get("more"):
                CHAT.add("resume_paged")
                gevent.spawn(self._page_history, frame["conversation"])
        elif ftype == "error":
            code = frame.get("code")
            with CHAT.lock:
                CHAT.errors[code] += 1
            _fire(f"error frame: {code}", 0, length, exc=ErrorFrame(code))
            client_id = frame.get("client_id")
            if client_id and code not in ("rate_limited", "unavailable"):
                self.unacked.pop(client_id, None)
        elif ftype == "membership":
            cid = frame["conversation"]
            if frame["event"] == "joined" and cid not in self.streams:
                self.streams[cid] = Stream(start=0)
                self._resume(cid, after=0)
        elif ftype:
            CHAT.add(f"frames_{ftype}")

    @staticmethod
    def _contiguous(stream: Stream) -> int:
        n = stream.start
        while n + 1 in stream.seen:
            n += 1
        return n

    def _resume(self, cid: int, after: int) -> None:
        self.resuming.add(cid)
        CHAT.add("resumes")
        self._send({"type": "resume", "conversation": cid, "after": after})

    def _page_history(self, cid: int) -> None:
        """After `resumed` with more: page the rest over HTTP (protocol.md)."""
        stream = self.streams.get(cid)
        user = CHAT.http_user
        if stream is None or user is None:
            return
        after = self._contiguous(stream)
        for _ in range(100):
            r = user.client.get(
                f"{API}/conversations/{cid}/messages",
                params={"after": after, "limit": 200},
                headers={"Authorization": f"Bearer {self.account['token']}"},
                name="GET /conversations/[id]/messages (resume)",
            )
            if r.status_code != 200:
                return
            page = r.json()
            for m in page["messages"]:
                stream.add(m["seq"], replay=True)
                after = max(after, m["seq"])
            if page.get("after") is None:
                return

    def send_message(self, cid: int, body_size: int = 80) -> bool:
        if CHAT.quiet:
            return False
        client_id = uuid.uuid4().hex
        frame = {
            "type": "send",
            "conversation": cid,
            "client_id": client_id,
            "body": make_body(time.time(), self.account["username"], body_size),
        }
        self.unacked[client_id] = (time.time(), frame)
        if self._send(frame):
            CHAT.add("sends")
            return True
        return False

    def typing(self, cid: int) -> None:
        if self._send({"type": "typing", "conversation": cid}):
            CHAT.add("typing")

    def read(self, cid: int) -> None:
        stream = self.streams.get(cid)
        if stream is not None and self._send(
            {"type": "read", "conversation": cid, "seq": stream.last}
        ):
            CHAT.add("reads")

    def ping(self) -> None:
        self._send({"type": "ping"})

    def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            with contextlib.suppress(Exception):  # already gone
                self.ws.close()
        if self.reader is not None:
            self.reader.join(timeout=3)

    def reconnect(self) -> bool:
        self.close()
        self.closing = False
        CHAT.add("reconnects")
        return self.connect()


# --- users ---------------------------------------------------------------------------------


class ParleyUser(HttpUser):
    """Shared by the WebSocket users: an account, its conversations, one socket."""

    abstract = True
    socket: ParleySocket | None = None

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.account['token']}"}

    def on_start(self) -> None:
        if CHAT.http_user is None:
            CHAT.http_user = self
        self.client.headers.update(http_headers(self.environment.parsed_options))
        self.account = ACCOUNTS.take(self)
        self.conversations: list[int] = []

    def join(self, slug: str) -> int | None:
        with self.client.post(
            f"{API}/rooms/{slug}/join",
            headers=self.auth(),
            name="POST /rooms/[slug]/join",
            catch_response=True,
        ) as r:
            if r.status_code == 200:
                return r.json()["id"]
            if r.status_code != 404:
                r.failure(f"HTTP {r.status_code}")
                return None
            r.success()  # not there yet: create it
        with self.client.post(
            f"{API}/rooms",
            headers=self.auth(),
            json={"name": slug, "slug": slug},
            name="POST /rooms",
            catch_response=True,
        ) as r:
            if r.status_code == 201:
                return r.json()["id"]
            if r.status_code == 409:
                r.success()
            else:
                r.failure(f"HTTP {r.status_code}")
                return None
        r = self.client.post(
            f"{API}/rooms/{slug}/join", headers=self.auth(), name="POST /rooms/[slug]/join"
        )
        return r.json()["id"] if r.status_code == 200 else None

    def open_socket(self) -> bool:
        self.socket = ParleySocket(
            ws_url_for(self.environment.parsed_options, self.host), self.account
        )
        return self.socket.connect()

    def on_stop(self) -> None:
        if self.socket is not None:
            self.socket.close()


class ChatUser(ParleyUser):
    """Signs in, lists conversations, reads history, chats in rooms and a direct
    conversation, types, marks read, pings, and reconnects now and then."""

    weight = 9

    def wait_time(self):
        return random.expovariate(1 / max(0.1, self.environment.parsed_options.think_time))

    def on_start(self) -> None:
        super().on_start()
        o = self.environment.parsed_options
        self.client.get(f"{API}/me", headers=self.auth(), name="GET /me")
        slugs = [
            f"lt-room-{k}" for k in random.sample(range(o.rooms), min(o.rooms_per_user, o.rooms))
        ]
        for slug in slugs:
            cid = self.join(slug)
            if cid:
                self.conversations.append(cid)
        partner = ACCOUNTS.partner(self.account)
        if partner is not None:
            r = self.client.post(
                f"{API}/direct",
                json={"username": partner["username"]},
                headers=self.auth(),
                name="POST /direct",
            )
            if r.status_code in (200, 201):
                self.conversations.append(r.json()["id"])
        self.list_conversations()
        if not self.open_socket():
            return
        for cid in self.conversations:
            CHAT.history_tokens.setdefault(cid, self.account["token"])

    def _cid(self) -> int | None:
        convs = self.socket.conversations if self.socket else self.conversations
        return random.choice(convs) if convs else None

    @task(6)
    def send(self) -> None:
        cid = self._cid()
        if cid and self.socket:
            self.socket.send_message(cid, body_size=random.choice((20, 40, 80, 160, 400)))

    @task(2)
    def type_then_send(self) -> None:
        cid = self._cid()
        if cid and self.socket:
            self.socket.typing(cid)
            gevent.sleep(random.uniform(1, 3))
            self.socket.send_message(cid)

    @task(2)
    def read(self) -> None:
        cid = self._cid()
        if cid and self.socket:
            self.socket.read(cid)

    @task(2)
    def history(self) -> None:
        cid = self._cid()
        if cid:
            self.client.get(
                f"{API}/conversations/{cid}/messages",
                params={"limit": 50},
                headers=self.auth(),
                name="GET /conversations/[id]/messages",
            )

    @task(1)
    def list_conversations(self) -> None:
        self.client.get(f"{API}/conversations", headers=self.auth(), name="GET /conversations")

    @task(1)
    def ping(self) -> None:
        if self.socket:
            self.socket.ping()

    @task(1)
    def reconnect(self) -> None:
        # A phone changing networks: about one action in 15 is a reconnect with resume.
        if self.socket and random.random() < 0.3:
            self.socket.reconnect()


class LargeRoomUser(ParleyUser):
    """Everyone joins one room; a few send, everyone receives."""

    weight = 1

    def wait_time(self):
        return self.environment.parsed_options.send_interval * random.uniform(0.5, 1.5)

    def on_start(self) -> None:
        super().on_start()
        o = self.environment.parsed_options
        cid = self.join(o.large_room)
        self.room = cid
        self.sender = random.random() < o.large_senders
        if cid and self.open_socket():
            CHAT.history_tokens.setdefault(cid, self.account["token"])

    @task
    def maybe_send(self) -> None:
        if self.sender and self.socket and self.room:
            self.socket.send_message(self.room)
        elif self.socket:
            self.socket.ping()


class StormUser(ParleyUser):
    """Opens a socket as soon as it spawns, holds it idle, then reopens it."""

    weight = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        self.open_socket()

    @task
    def hold_then_reconnect(self) -> None:
        hold = self.environment.parsed_options.hold * random.uniform(0.8, 1.2)
        deadline = time.time() + hold
        while time.time() < deadline:
            gevent.sleep(min(20, max(0.1, deadline - time.time())))
            if self.socket:
                self.socket.ping()
        if self.socket:
            self.socket.reconnect()


class HistoryReader(ParleyUser):
    """HTTP only: lists conversations and pages back through their history."""

    weight = 1
    wait_time = between(1, 3)

    def on_start(self) -> None:
        super().on_start()
        o = self.environment.parsed_options
        for slug in {f"lt-room-{random.randrange(o.rooms)}", o.large_room}:
            cid = self.join(slug)
            if cid:
                self.conversations.append(cid)

    @task
    def page_back(self) -> None:
        if not self.conversations:
            return
        cid = random.choice(self.conversations)
        params = {"limit": 50}
        for _ in range(random.randint(1, 5)):
            r = self.client.get(
                f"{API}/conversations/{cid}/messages",
                params=params,
                headers=self.auth(),
                name="GET /conversations/[id]/messages (page back)",
            )
            if r.status_code != 200 or r.json().get("before") is None:
                return
            params = {"limit": 50, "before": r.json()["before"]}

    @task
    def conversations_list(self) -> None:
        self.client.get(f"{API}/conversations", headers=self.auth(), name="GET /conversations")


# --- the end of a run: drain, check against history, report ----------------------------------


def _history(environment, cid: int, token: str, after: int) -> list[tuple[int, str | None]] | None:
    import httpx

    rows = []
    headers = http_headers(environment.parsed_options)
    with httpx.Client(base_url=environment.host, timeout=30, headers=headers) as client:
        for _ in range(10_000):
            r = client.get(
                f"{API}/conversations/{cid}/messages",
                params={"after": after, "limit": 200},
                headers={"Authorization": f"Bearer {token}"},
            )
            if r.status_code != 200:
                return None
            page = r.json()
            rows += [(m["seq"], m["client_id"]) for m in page["messages"]]
            if page.get("after") is None or not page["messages"]:
                return rows
            after = page["messages"][-1]["seq"]
    return rows


def verify(environment) -> HistoryCheck:
    """Compare every socket's stream with the conversation's history."""
    streams = [(cid, s) for sock in CHAT.sockets for cid, s in sock.streams.items()]
    starts: dict[int, int] = defaultdict(lambda: 1 << 62)
    for cid, s in streams:
        starts[cid] = min(starts[cid], s.start)
    tokens = dict(CHAT.history_tokens)
    for sock in CHAT.sockets:
        for cid in sock.streams:
            tokens.setdefault(cid, sock.account["token"])
    history = {}
    for cid, start in starts.items():
        rows = _history(environment, cid, tokens[cid], start)
        if rows is not None:
            history[cid] = rows
    checked = [(cid, s) for cid, s in streams if cid in history]
    acked = [a for sock in CHAT.sockets for a in sock.acked if a[0] in history]
    unacked = [
        (f["conversation"], cid_)
        for sock in CHAT.sockets
        for cid_, (_, f) in sock.unacked.items()
        if f["conversation"] in history
    ]
    return check_history(history=history, streams=checked, acked=acked, unacked=unacked)


@events.test_start.add_listener
def _on_start(environment, **_kw) -> None:
    CHAT.reset()


def _finish(environment) -> None:
    """Stop sending, let in-flight frames arrive, check the streams against history; a
    worker then reports to the master."""
    if CHAT.finished:
        return
    CHAT.finished = True
    CHAT.quiet = True
    options = environment.parsed_options
    gevent.sleep(options.drain_seconds if options else 3)
    if options is None or not options.no_history_check:
        try:
            CHAT.check = verify(environment)
        except Exception as exc:
            logger.warning("history check failed: %r", exc)
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.send_message("parley_chat", CHAT.snapshot())


@events.test_stopping.add_listener
def _on_stopping(environment, **_kw) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        # Workers check their own sockets; wait for every report before stopping them
        # (in headless runs the master quits half a second after telling them).
        expected = len(runner.clients.all)
        runner.send_message("parley_finish", {})
        options = environment.parsed_options
        deadline = time.time() + (options.drain_seconds if options else 3) + 120
        while len(CHAT.workers) < expected and time.time() < deadline:
            gevent.sleep(0.2)
        if len(CHAT.workers) < expected:
            logger.warning("%d of %d workers reported chat figures", len(CHAT.workers), expected)
        return
    _finish(environment)


def _on_worker_report(environment, msg, **_kw) -> None:
    CHAT.workers[msg.node_id] = msg.data


@events.quitting.add_listener
def _on_quit(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    report = combined(environment)
    print(text_report(report), flush=True)
    options = environment.parsed_options
    if options.results_dir:
        tag = f"-{options.run_tag}" if options.run_tag else ""
        path = Path(options.results_dir) / f"{stamp()}-locust-{options.scenario}{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"chat figures saved to {path}", flush=True)


def combined(environment) -> dict:
    parts = list(CHAT.workers.values()) if CHAT.workers else [CHAT.snapshot()]
    counters, errors, closes = Counter(), Counter(), Counter()
    check = HistoryCheck()
    checked = False
    seconds = max((p["seconds"] for p in parts), default=0)
    for p in parts:
        counters.update(p["counters"])
        errors.update(p["errors"])
        closes.update(p["closes"])
        if p.get("history"):
            check.merge(HistoryCheck(**p["history"]))
            checked = True
    stats = environment.runner.stats
    latency = {}
    for name in ("send->ack", "send->delivery", "connect (hello)"):
        entry = stats.entries.get((name, "WS"))
        if entry and entry.num_requests:
            latency[name] = {
                "count": entry.num_requests,
                "failures": entry.num_failures,
                **{
                    f"p{int(q * 100) if q < 0.999 else 999}": entry.get_response_time_percentile(q)
                    for q in (0.5, 0.9, 0.95, 0.99, 0.999)
                },
                "max": entry.max_response_time,
            }
    o = environment.parsed_options
    return {
        "scenario": o.scenario,
        "host": environment.host,
        "ws_url": ws_url_for(o, environment.host or ""),
        "users": environment.runner.target_user_count
        if hasattr(environment.runner, "target_user_count")
        else None,
        "workers": len(CHAT.workers) or None,
        "seconds": seconds,
        "machine": machine(),
        "revision": git_revision(),
        "latency_ms": latency,
        "deliveries_per_s": round(counters["deliveries"] / seconds, 1) if seconds else None,
        "sends_per_s": round(counters["sends"] / seconds, 1) if seconds else None,
        "counters": dict(counters),
        "error_frames": dict(errors),
        "close_codes": dict(closes),
        "history_check": check.__dict__ if checked else None,
        "http": {
            f"{e.method} {e.name}": {
                "count": e.num_requests,
                "failures": e.num_failures,
                "p50": e.get_response_time_percentile(0.5),
                "p99": e.get_response_time_percentile(0.99),
            }
            for e in stats.entries.values()
            if e.method != "WS"
        },
    }


def text_report(report: dict) -> str:
    c = report["counters"]
    lines = ["", "Parley chat figures", "-------------------"]
    for name, v in report["latency_ms"].items():
        lines.append(
            f"{name:>16}: n={v['count']} p50 {fmt_ms(v['p50'])} p90 {fmt_ms(v['p90'])} "
            f"p99 {fmt_ms(v['p99'])} max {fmt_ms(v['max'])} ms"
        )
    lines.append(
        f"sends {c.get('sends', 0)} ({report['sends_per_s']}/s), acks {c.get('acks', 0)}, "
        f"deliveries {c.get('deliveries', 0)} ({report['deliveries_per_s']}/s)"
    )
    lines.append(
        f"connects {c.get('connects', 0)}, connect failures {c.get('connect_failures', 0)}, "
        f"reconnects {c.get('reconnects', 0)}, resumes {c.get('resumes', 0)} "
        f"(after gaps {c.get('gaps_resumed', 0)})"
    )
    lines.append(
        f"error frames by code: {report['error_frames'] or 'none'}; "
        f"close codes: {report['close_codes']}"
    )
    h = report["history_check"]
    if h:
        lines.append(
            f"history check ({h['conversations']} conversations, {h['committed']} messages): "
            f"lost deliveries {h['lost_deliveries']} of {h['expected_deliveries']}, "
            f"duplicate frames {h['duplicate_frames']}, order violations {h['order_violations']}, "
            f"acked but missing {h['acked_missing']}, committed twice {h['duplicate_messages']}, "
            f"unacked sends {h['unacked_sends']} ({h['unacked_but_committed']} committed)"
        )
    else:
        lines.append("history check: not run")
    return "\n".join(lines)
