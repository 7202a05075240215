"""Real processes: gunicorn web, realtime replicas A and B (and more per test), real
Postgres and Redis. What a user would notice across replicas: delivery, order, resume,
failover after kill -9, a Redis restart, drain, limits, and idle sockets kept open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from django.conf import settings as django_settings

from parley.accounts.models import User
from parley.accounts.services import token_create
from parley.chat import events, services
from parley.chat.models import Message

from .cluster import (
    Realtime,
    RedisServer,
    Resilient,
    Simple,
    Web,
    child_env,
    close_code,
    http_get,
    http_post,
    open_ws,
    stop_all,
    wait_all,
    wait_until,
)

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(120),
]

IDLE_SECONDS = 62  # longer than a minute: past every 5 s read timeout many times over


class LoopThread:
    """An event loop in a thread, for sockets that must outlive one test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Cluster:
    def __init__(self, db_name: str, logdir) -> None:
        self.db_name, self.logdir = db_name, logdir
        self.procs = []

    def env(self, **extra) -> dict[str, str]:
        return child_env(self.db_name, **extra)

    def realtime(self, name: str, **extra) -> Realtime:
        proc = Realtime(name, self.env(PARLEY_NODE_ID=name, **extra), self.logdir)
        self.procs.append(proc)
        return proc

    def tails(self) -> str:
        return "\n".join(p.tail(40) for p in self.procs)


@pytest.fixture(scope="module")
def cluster(django_db_setup, django_db_blocker, tmp_path_factory, request):
    from django.db import connection

    cluster = Cluster(connection.settings_dict["NAME"], tmp_path_factory.mktemp("rt-cluster"))
    web = Web(cluster.env(), cluster.logdir)
    cluster.procs.append(web)
    a, b = cluster.realtime("A"), cluster.realtime("B")
    # Two quiet replicas hold idle sockets for the last tests, one per channel layer (the
    # core layer, kept as the naive benchmark configuration, blocks 5 s per read). Their
    # layer probe is off: its traffic would wake the reads and hide the trap.
    no_probe = {"REALTIME_PROBE_INTERVAL_SECONDS": "3600", "REALTIME_PROBE_TIMEOUT_SECONDS": "7200"}
    quiet = cluster.realtime("I-pubsub", **no_probe)
    # A core-layer node cannot reach pub/sub nodes' sockets: it must not win presence
    # sweeps for them (one deployment never mixes layers).
    core = cluster.realtime(
        "I-core", CHANNEL_LAYER_BACKEND="core", REALTIME_PRESENCE_SWEEP_SECONDS="3600", **no_probe
    )
    idle = LoopThread()
    try:
        for proc in (web, a, b, quiet, core):
            proc.wait_ready()
        cluster.web, cluster.a, cluster.b = web, a, b
        # Idle sockets opened now and checked by the last test of the module.
        with django_db_blocker.unblock():
            idler = User.objects.create_user(username="idler", password="x" * 12)
            token = token_create(user=idler)

        async def open_idle():
            return {
                "pubsub": await Simple.open(quiet.ws_url, token),
                "core": await Simple.open(core.ws_url, token),
            }

        cluster.idle = idle
        cluster.idle_user_id = idler.id
        cluster.idle_sockets = idle.run(open_idle())
        cluster.idle_since = time.monotonic()
        yield cluster
    finally:
        if request.session.testsfailed:
            print(cluster.tails())
        for sock in getattr(cluster, "idle_sockets", {}).values():
            with contextlib.suppress(Exception):  # best effort at teardown
                idle.run(sock.close(), timeout=5)
        idle.stop()
        stop_all(cluster.procs)


def token_for(user) -> str:
    return token_create(user=user)


def db_seqs(room) -> list[tuple[int, str]]:
    return list(
        Message.objects.filter(conversation=room).order_by("seq").values_list("seq", "client_id")
    )


# --- delivery across replicas ---------------------------------------------------------------


def test_message_reaches_members_on_both_replicas_and_http_sends_too(cluster, room, alice, bob):
    ta, tb = token_for(alice), token_for(bob)

    async def scenario():
        socks = [
            await Simple.open(cluster.a.ws_url, ta),
            await Simple.open(cluster.b.ws_url, ta),
            await Simple.open(cluster.a.ws_url, tb),
            await Simple.open(cluster.b.ws_url, tb),
        ]
        await socks[0].send(
            {"type": "send", "conversation": room.id, "client_id": "x1", "body": "from A"}
        )
        ack = await socks[0].wait_for(lambda f: f["type"] == "ack")
        assert ack["seq"] == 1
        status, body = http_post(
            f"{cluster.web.url}/api/v1/conversations/{room.id}/messages", {"body": "from web"}, tb
        )
        assert status == 201, body
        for sock in socks:
            got = await sock.wait_count("message", 2)
            assert [(m["seq"], m["body"]) for m in got] == [(1, "from A"), (2, "from web")]
        for sock in socks:
            await sock.close()

    asyncio.run(scenario())


def test_broadcasts_framed_once_per_node_parse_as_frames_on_both_replicas(
    cluster, room, alice, bob
):
    """`parley realtime` writes a broadcast's ready-made frames (frames.wire_text), a
    flush's receipt frames in one write: a standard client reads each frame, in order,
    whatever its length (7-bit, 16-bit and 64-bit length headers)."""
    from channels.layers import get_channel_layer

    ta, tb = token_for(alice), token_for(bob)
    moved = [(alice.id, 0, 3, 0, 2), (bob.id, 1, 4, 0, 0), (alice.id + bob.id, 0, 1, 0, 1)]
    sizes = {"short": 10, "medium": 300, "long": 70_000}

    async def scenario():
        socks = [
            await Simple.open(url, t) for url, t in ((cluster.a.ws_url, ta), (cluster.b.ws_url, tb))
        ]
        layer = get_channel_layer()
        group = events.conversation_group(room.id)
        await layer.group_send(
            group, events.receipts_event(conversation_id=room.id, moved=moved, everyone=True)
        )
        for name, size in sizes.items():
            frame = {
                "type": "typing",
                "conversation": room.id,
                "user": {"id": 0},
                "pad": name * size,
            }
            await layer.group_send(
                group, {"type": "chat.frame", "kind": "typing", "frame": events.dumps(frame)}
            )
        for sock in socks:
            got = await sock.wait_count("receipt", 3)
            assert [(f["user"], f["delivered_seq"], f["read_seq"]) for f in got] == [
                (user, d, r) for user, _, d, _, r in moved
            ]
            padded = await sock.wait_count("typing", 3)
            assert [len(f["pad"]) for f in padded] == [len(n) * s for n, s in sizes.items()]
            await sock.send({"type": "ping"})  # and the socket is still in step
            await sock.wait_for(lambda f: f["type"] == "pong", 5)
        for sock in socks:
            await sock.close()

    asyncio.run(scenario())


def test_order_holds_with_concurrent_senders_on_both_replicas(cluster, room, user_factory):
    senders = [user_factory() for _ in range(4)]
    http_sender = user_factory()
    for user in [*senders, http_sender]:
        services.room_join(user=user, slug=room.slug)
    tokens = [token_for(u) for u in senders]
    http_token = token_for(http_sender)
    per_socket, over_http = 30, 20
    total = per_socket * len(senders) + over_http

    async def scenario():
        urls = [cluster.a.ws_url, cluster.b.ws_url]
        observers = [await Simple.open(urls[i % 2], tokens[i]) for i in range(4)]
        sockets = [await Simple.open(urls[i % 2], tokens[i]) for i in range(4)]

        async def blast(sock, i):
            for n in range(per_socket):
                await sock.send(
                    {
                        "type": "send",
                        "conversation": room.id,
                        "client_id": f"s{i}-{n}",
                        "body": f"{i}/{n}",
                    }
                )

        def over_web():
            for n in range(over_http):
                status, body = http_post(
                    f"{cluster.web.url}/api/v1/conversations/{room.id}/messages",
                    {"body": f"web/{n}", "client_id": f"w-{n}"},
                    http_token,
                )
                assert status == 201, body

        web_sends = asyncio.get_running_loop().run_in_executor(None, over_web)
        await asyncio.gather(*(blast(s, i) for i, s in enumerate(sockets)))
        await web_sends
        for sock in sockets:
            acks = await sock.wait_count("ack", per_socket, timeout=20)
            assert len({a["seq"] for a in acks}) == per_socket
        for sock in observers + sockets:
            got = await sock.wait_count("message", total, timeout=20)
            # Every socket sees every message once, in seq order, with no gap.
            assert [m["seq"] for m in got] == list(range(1, total + 1))
            assert not sock.of("error"), sock.of("error")
        for sock in observers + sockets:
            await sock.close()

    asyncio.run(scenario())
    assert [s for s, _ in db_seqs(room)] == list(range(1, total + 1))


def test_resume_after_a_disconnect_returns_exactly_the_missed_messages(cluster, room, alice, bob):
    ta, tb = token_for(alice), token_for(bob)

    async def scenario():
        sender = await Simple.open(cluster.a.ws_url, ta)
        reader = await Simple.open(cluster.b.ws_url, tb)
        for n in range(3):
            await sender.send(
                {"type": "send", "conversation": room.id, "client_id": f"a{n}", "body": f"m{n + 1}"}
            )
        await reader.wait_count("message", 3)
        await reader.close()
        for n in range(3, 10):
            await sender.send(
                {"type": "send", "conversation": room.id, "client_id": f"a{n}", "body": f"m{n + 1}"}
            )
        await sender.wait_count("ack", 10)
        again = await Simple.open(cluster.a.ws_url, tb)  # the other replica this time
        assert {"id": room.id, "last_seq": 10} in again.hello["conversations"]
        await again.send({"type": "resume", "conversation": room.id, "after": 3})
        resumed = await again.wait_for(lambda f: f["type"] == "resumed")
        assert resumed == {
            "type": "resumed",
            "conversation": room.id,
            "last_seq": 10,
            "more": False,
        }
        assert [(m["seq"], m["body"]) for m in again.of("message")] == [
            (n, f"m{n}") for n in range(4, 11)
        ]
        await sender.close()
        await again.close()

    asyncio.run(scenario())


# --- limits and handshakes --------------------------------------------------------------------


def test_rate_limit_holds_across_two_replicas(cluster, room, alice):
    token = token_for(alice)
    limit = django_settings.PARLEY_RATE_MESSAGES_PER_10S

    async def scenario():
        on_a = await Simple.open(cluster.a.ws_url, token)
        on_b = await Simple.open(cluster.b.ws_url, token)
        if time.time() % 10 > 6:  # one fixed window for the whole burst
            await asyncio.sleep(10.05 - time.time() % 10)

        async def burst(sock, tag):
            for n in range(30):
                await sock.send(
                    {"type": "send", "conversation": room.id, "client_id": f"{tag}{n}", "body": "x"}
                )

        await asyncio.gather(burst(on_a, "a"), burst(on_b, "b"))

        def answered():
            return sum(len(s.of("ack")) + len(s.of("error")) for s in (on_a, on_b)) >= 60

        await wait_all(answered, 15, "60 answers")
        acks = on_a.of("ack") + on_b.of("ack")
        errors = on_a.of("error") + on_b.of("error")
        assert len(acks) == limit
        assert len(errors) == 60 - limit
        assert {e["code"] for e in errors} == {"rate_limited"}
        await on_a.close()
        await on_b.close()

    asyncio.run(scenario())
    assert Message.objects.filter(conversation=room).count() == limit


def test_handshake_and_frame_limits_on_a_real_server(cluster, room, alice):
    token = token_for(alice)

    async def closed_with(ws) -> int | None:
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        except Exception as exc:
            import websockets

            assert isinstance(exc, websockets.ConnectionClosed), exc
            return close_code(exc)

    async def scenario():
        url = cluster.a.ws_url
        assert await closed_with(await open_ws(url)) == 4401
        assert await closed_with(await open_ws(url, "plt_wrong")) == 4401
        assert await closed_with(await open_ws(url, token, origin="https://evil.example")) == 4403
        # The client offers permessage-deflate; the server declines it.
        ws = await open_ws(url, token, compression="deflate")
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        sock = Simple(ws)
        await sock.wait_for(lambda f: f["type"] == "hello")
        # Under the frame limit but over the body limit: an error, the socket lives.
        await sock.send(
            {"type": "send", "conversation": room.id, "client_id": "big", "body": "x" * 60_000}
        )
        error = await sock.wait_for(lambda f: f["type"] == "error")
        assert (error["code"], error["client_id"]) == ("too_long", "big")
        await sock.send({"type": "ping"})
        await sock.wait_for(lambda f: f["type"] == "pong")
        # Over 64 KiB: closed with 1009.
        await ws.send("{" + " " * 70_000 + "}")
        assert await sock.wait_closed() == 1009

    asyncio.run(scenario())
    status, body = http_get(cluster.a.http_url + "/metrics")
    assert status == 200
    assert b'parley_ws_handshakes_total{outcome="unauthenticated"}' in body
    assert b'parley_ws_errors_total{code="too_long"}' in body
    assert http_get(cluster.a.http_url + "/readyz")[0] == 200


# --- failures ---------------------------------------------------------------------------------


def _exactly_once(clients, room, senders_cids):
    """Every committed message reached every client once (by seq), nothing acked is missing."""
    rows = db_seqs(room)
    committed = [s for s, _ in rows]
    assert committed == list(range(1, len(rows) + 1))
    in_db = {cid for _, cid in rows}
    for client in clients:
        for cid, ack in client.acks.items():
            assert cid in in_db, f"{client.name}: acked {cid} is not in Postgres"
            assert ack["seq"] in committed
        assert client.seqs(room.id) == committed, (
            client.name,
            sorted(set(committed) - set(client.seqs(room.id)))[:20],
        )
    assert in_db == set(senders_cids), sorted(set(senders_cids) ^ in_db)[:20]


def test_kill_9_of_a_replica_loses_nothing_and_its_users_go_offline(
    cluster, room, user_factory, bob
):
    victim = cluster.realtime("K")
    victim.wait_ready()
    senders = [user_factory() for _ in range(3)]
    ghost = user_factory()  # only ever connected to the victim
    for user in [*senders, ghost]:
        services.room_join(user=user, slug=room.slug)
    tokens = [token_for(u) for u in senders]
    per_sender = 40
    cids = [f"k{i}-{n}" for i in range(3) for n in range(per_sender)]

    async def scenario():
        urls = [victim.ws_url, cluster.b.ws_url]
        clients = [Resilient(f"sender{i}", urls, t) for i, t in enumerate(tokens)]
        clients.append(Resilient("observer-K", urls, observer_tokens[0]))
        clients.append(Resilient("observer-B", [cluster.b.ws_url], observer_tokens[1]))
        await Simple.open(victim.ws_url, observer_tokens[2])  # the ghost
        for client in clients:
            await client.wait_connected()
        observer_b = clients[-1]

        async def sends(i, client):
            for n in range(per_sender):
                await client.send(room.id, f"{i}/{n}", f"k{i}-{n}")
                await asyncio.sleep(0.04)

        sending = asyncio.gather(*(sends(i, c) for i, c in enumerate(clients[:3])))
        await asyncio.sleep(0.6)
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await sending
        await wait_all(
            lambda: all(len(c.acks) == per_sender for c in clients[:3]),
            30,
            "every send acknowledged",
        )
        total = len(cids)
        await wait_all(
            lambda: all(c.seqs(room.id) == list(range(1, total + 1)) for c in clients),
            20,
            "every client holds every message",
        )
        assert all(c.connects >= 2 for c in clients[:3]), [c.connects for c in clients]
        # The ghost's only socket died with K: B announces it offline within 30 s.
        await wait_all(
            lambda: any(
                p["user"] == ghost.id and p["status"] == "offline" for p in observer_b.presence
            ),
            32 - (time.monotonic() - killed_at),
            "the ghost announced offline",
        )
        offline = [
            p for p in observer_b.presence if p["status"] == "offline" and p["user"] == ghost.id
        ]
        assert offline[0]["at"] - killed_at <= 30
        # The senders reconnected at once: they never went offline.
        assert not [
            p
            for p in observer_b.presence
            if p["status"] == "offline" and p["user"] in {u.id for u in senders}
        ]
        for client in clients:
            await client.close()
        return clients

    observer_tokens = [token_for(bob), token_for(bob), token_for(ghost)]
    clients = asyncio.run(scenario())
    _exactly_once(clients, room, cids)
    assert victim.wait(1) == -signal.SIGKILL


def test_redis_restart_under_load_recovers_and_loses_nothing(cluster, room, user_factory, bob):
    redis_server = RedisServer(cluster.logdir)
    cluster.procs.append(redis_server)
    redis_server.wait_ready()
    extra = {"REDIS_URL": redis_server.url, "REALTIME_RESYNC_SECONDS": "0.5"}
    r1, r2 = cluster.realtime("R1", **extra), cluster.realtime("R2", **extra)
    r1.wait_ready()
    r2.wait_ready()
    senders = [user_factory() for _ in range(2)]
    for user in senders:
        services.room_join(user=user, slug=room.slug)
    tokens = [token_for(u) for u in senders] + [token_for(bob), token_for(bob)]
    per_sender = 60
    cids = [f"r{i}-{n}" for i in range(2) for n in range(per_sender)]

    async def scenario():
        clients = [
            Resilient("sender-R1", [r1.ws_url, r2.ws_url], tokens[0]),
            Resilient("sender-R2", [r2.ws_url, r1.ws_url], tokens[1]),
            Resilient("observer-R1", [r1.ws_url, r2.ws_url], tokens[2]),
            Resilient("observer-R2", [r2.ws_url, r1.ws_url], tokens[3]),
        ]
        for client in clients:
            await client.wait_connected()

        async def sends(i, client):
            for n in range(per_sender):
                await client.send(room.id, f"{i}/{n}", f"r{i}-{n}")
                await asyncio.sleep(0.04)

        sending = asyncio.gather(*(sends(i, c) for i, c in enumerate(clients[:2])))
        await asyncio.sleep(0.8)
        redis_server.signal(signal.SIGKILL)
        redis_server.wait(5)
        await asyncio.sleep(1.0)
        restarted = RedisServer(cluster.logdir, port=redis_server.port)
        cluster.procs.append(restarted)
        await asyncio.get_running_loop().run_in_executor(None, restarted.wait_ready)
        await sending
        await wait_all(
            lambda: all(len(c.acks) == per_sender for c in clients[:2]),
            40,
            "every send acknowledged",
        )
        total = len(cids)
        await wait_all(
            lambda: all(c.seqs(room.id) == list(range(1, total + 1)) for c in clients),
            30,
            "every client holds every message",
        )
        # The replicas told their sockets (1011) instead of leaving silent holes.
        assert any(1011 in c.close_codes for c in clients), [c.close_codes for c in clients]
        # Both replicas are ready again, and the live path works across them without
        # another reconnect.
        for proc in (r1, r2):
            await asyncio.get_running_loop().run_in_executor(
                None,
                lambda p=proc: wait_until(
                    lambda: http_get(p.http_url + "/readyz")[0] == 200, 15, what="readyz"
                ),
            )
        connects = [c.connects for c in clients]
        await clients[0].send(room.id, "after", "r-after")
        await wait_all(
            lambda: all(total + 1 in c.messages.get(room.id, {}) for c in clients),
            10,
            "a live message after recovery",
        )
        assert [c.connects for c in clients] == connects
        for client in clients:
            await client.close()
        return clients

    clients = asyncio.run(scenario())
    _exactly_once(clients, room, [*cids, "r-after"])
    stop_all([r1, r2])


def test_sigterm_drains_with_1012_spread_over_the_window_and_exits(cluster, room, alice):
    proc = cluster.realtime("D", REALTIME_DRAIN_SECONDS="2", REALTIME_GRACE_SECONDS="10")
    proc.wait_ready()
    token = token_for(alice)

    async def scenario():
        socks = [await Simple.open(proc.ws_url, token) for _ in range(12)]
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        closed_at = []

        async def watch(sock):
            code = await sock.wait_closed(timeout=8)
            closed_at.append(time.monotonic() - started)
            return code

        watching = asyncio.gather(*(watch(s) for s in socks))
        # While it drains, the replica takes no new socket (and /readyz is down with it).
        await asyncio.sleep(0.3)
        assert not all(s.done for s in socks)  # still draining
        with pytest.raises(OSError):
            await open_ws(proc.ws_url, token)
        codes = await watching
        assert codes == [1012] * 12
        # Spread over the window, not all at once.
        assert max(closed_at) - min(closed_at) >= 1.0, closed_at
        assert max(closed_at) <= 4.0, closed_at
        return started

    started = asyncio.run(scenario())
    code = proc.wait(10)
    assert code == 0, proc.tail()
    assert time.monotonic() - started < 8


# --- last: the idle sockets opened when the module started ---------------------------------


def _core_layer_config() -> dict:
    """The core layer's CONFIG as settings.py builds it for CHANNEL_LAYER_BACKEND=core."""
    code = (
        "import json, os; os.environ['CHANNEL_LAYER_BACKEND'] = 'core'; "
        "from parley.config import settings; "
        "print(json.dumps(settings.CHANNEL_LAYERS['default']['CONFIG']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _check_idle(cluster, which: str, layer_factory) -> None:
    """The socket opened at module start is still open after IDLE_SECONDS, answers, and
    its channel-layer subscription still delivers."""
    remaining = IDLE_SECONDS - (time.monotonic() - cluster.idle_since)
    if remaining > 0:
        time.sleep(remaining)
    sock = cluster.idle_sockets[which]
    frame = {  # a frame for the user's own group, relayed as is
        "type": "chat.frame",
        "kind": "receipt",
        "frame": events.dumps(
            events.receipt_frame(
                conversation_id=0, user_id=cluster.idle_user_id, delivered_seq=7, read_seq=7
            )
        ),
    }

    async def check():
        assert not sock.done, f"idle {which} socket dropped (close code {sock.closed})"
        await sock.send({"type": "ping"})
        await sock.wait_for(lambda f: f["type"] == "pong", 5)
        await layer_factory().group_send(events.user_group(cluster.idle_user_id), frame)
        got = await sock.wait_for(lambda f: f["type"] == "receipt", 5)
        assert got["delivered_seq"] == 7

    cluster.idle.run(check(), timeout=30)


def test_zz_idle_socket_stays_open_for_more_than_a_minute(cluster):
    """redis-py 8.1's 5 s socket timeout equals channels_redis' 5 s blocking read: a layer
    configured without a longer socket_timeout crashes idle consumers (1006)."""
    from channels.layers import get_channel_layer

    _check_idle(cluster, "pubsub", get_channel_layer)


def test_zz_idle_socket_on_the_core_layer_stays_open_for_more_than_a_minute(cluster):
    from channels_redis.core import RedisChannelLayer

    config = _core_layer_config()
    try:
        _check_idle(cluster, "core", lambda: RedisChannelLayer(**config))
    except AssertionError:
        if not all(
            isinstance(h, dict) and (h.get("socket_timeout") or 0) > 5 for h in config["hosts"]
        ):
            pytest.xfail(
                "settings.py gives the core layer plain URLs, hence redis-py's 5 s socket "
                "timeout (#4091): give it the host dicts with socket_timeout too"
            )
        raise


def test_sigterm_while_redis_hangs_still_drains_and_exits_0_in_time(cluster, room, alice):
    """`podman-compose down` (and a namespace deletion) stop Redis and Postgres at the same
    moment as the replicas: a replica whose Redis stopped answering mid-drain must still
    close its sockets with 1012 and exit 0 within its grace, not hang in Redis calls
    until it is killed."""
    redis_server = RedisServer(cluster.logdir)
    cluster.procs.append(redis_server)
    redis_server.wait_ready()
    proc = cluster.realtime(
        "H", REDIS_URL=redis_server.url, REALTIME_DRAIN_SECONDS="2", REALTIME_GRACE_SECONDS="20"
    )
    proc.wait_ready()
    token = token_for(alice)

    async def scenario():
        socks = [await Simple.open(proc.ws_url, token) for _ in range(12)]
        for n, sock in enumerate(socks):  # deliveries and reads pending for the flush
            await sock.send(
                {
                    "type": "send",
                    "conversation": room.id,
                    "client_id": f"h-{n}",
                    "body": f"before {n}",
                }
            )
        await asyncio.sleep(0.5)
        redis_server.signal(signal.SIGSTOP)  # accepts connections, answers nothing
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(s.wait_closed(timeout=10) for s in socks))
        return started, codes

    try:
        started, codes = asyncio.run(scenario())
        code = proc.wait(25)
        took = time.monotonic() - started
    finally:
        redis_server.signal(signal.SIGCONT)
    assert codes == [1012] * 12, codes
    assert code == 0, proc.tail(60)
    # drain window 2 s + bounded flushes; far below the 20 s grace
    assert took < 12, (took, proc.tail(60))


@pytest.mark.parametrize("send_connections", ["4", "0"], ids=["on-the-loop", "on-a-thread"])
def test_sigterm_while_a_send_waits_on_a_row_lock_exits_0_in_time(
    cluster, room, alice, send_connections
):
    """A send blocked in the database (here: another session holds the conversation's
    row lock) must not hold the exit: the drain closes the socket with 1012 and the
    process exits 0 long before its grace, whether the send waits on the event loop's
    connection (cancelled with its task) or in a database thread, which is still
    waiting (asyncio.run and the interpreter both wait for every thread)."""
    import psycopg
    from django.db import connection

    proc = cluster.realtime(
        "L",
        REALTIME_DRAIN_SECONDS="1",
        REALTIME_GRACE_SECONDS="30",
        REALTIME_ASYNC_DB_CONNECTIONS=send_connections,
    )
    proc.wait_ready()
    token = token_for(alice)
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    locker = psycopg.connect(**{k: v for k, v in params.items() if k != "pool"})
    try:
        locker.execute("SELECT id FROM chat_conversation WHERE id = %s FOR UPDATE", [room.id])

        async def scenario():
            sock = await Simple.open(proc.ws_url, token)
            await sock.send(
                {"type": "send", "conversation": room.id, "client_id": "locked", "body": "x"}
            )
            await asyncio.sleep(0.5)  # the send now waits for the lock
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            return started, await sock.wait_closed(timeout=10)

        started, code = asyncio.run(scenario())
        exit_code = proc.wait(25)
        took = time.monotonic() - started
    finally:
        locker.rollback()
        locker.close()
    assert code == 1012
    assert exit_code == 0, proc.tail(60)
    # drain 1 s + uvicorn's 5 s for running handlers + 3 s for stuck threads
    assert took < 14, (took, proc.tail(60))
    if send_connections == "0":
        assert "still busy" in proc.tail(60)
