"""The benchmark's `naive` configuration works: two realtime replicas started exactly as
the bench starts them (loadtests.bench.topology.naive_realtime_argv: plain uvicorn on
asyncio/h11 serving loadtests.bench.naive_consumer, with NAIVE_ENV and the core
RedisChannelLayer) on the test database and Redis. What the load generator relies on:
hello, an ack with a seq after each send, every member's `message` frames (across
replicas) in seq order, and bad input answered with an error frame."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import pytest

from parley.accounts.services import token_create
from parley.chat.models import Message
from tests.realtime.cluster import Proc, Simple, child_env, free_port

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loadtests.bench.topology import NAIVE_ENV, naive_realtime_argv  # noqa: E402

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(120),
]


class NaiveReplica(Proc):
    def __init__(self, name: str, db_name: str, logdir: Path) -> None:
        self.port = free_port()
        env = child_env(
            db_name,
            **NAIVE_ENV,
            PARLEY_NODE_ID=f"naive-{name}",
            PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "services")]),
        )
        super().__init__(f"naive-{name}", naive_realtime_argv("127.0.0.1", self.port), env, logdir)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/"

    def wait_ready(self, timeout: float = 40) -> None:
        self.wait_http_ok(f"http://127.0.0.1:{self.port}/readyz", timeout)


@pytest.fixture
def naive(tmp_path, request):
    from django.db import connection

    db_name = connection.settings_dict["NAME"]
    replicas = [NaiveReplica(n, db_name, tmp_path) for n in ("A", "B")]
    try:
        for proc in replicas:
            proc.wait_ready()
        yield replicas
    finally:
        if request.session.testsfailed:
            print("\n".join(p.tail(40) for p in replicas))
        for proc in replicas:
            with contextlib.suppress(Exception):
                proc.stop()


def test_naive_replicas_speak_what_the_generator_needs(naive, room, alice, bob, carol):
    from parley.chat import services

    services.room_join(user=carol, slug=room.slug)
    a, b = naive
    ta, tb, tc = token_create(user=alice), token_create(user=bob), token_create(user=carol)
    n = 5

    async def scenario():
        sender = await Simple.open(a.ws_url, ta)
        bob_b = await Simple.open(b.ws_url, tb)  # the other replica
        carol_a = await Simple.open(a.ws_url, tc)
        for sock, user in ((sender, alice), (bob_b, bob), (carol_a, carol)):
            assert sock.hello["user"]["id"] == user.id
            assert {"id": room.id, "last_seq": 0} in sock.hello["conversations"]
        assert sender.hello["node"] == "naive-A" and bob_b.hello["node"] == "naive-B"

        for i in range(n):
            await sender.send(
                {"type": "send", "conversation": room.id, "client_id": f"c{i}", "body": f"m{i}"}
            )
        acks = await sender.wait_count("ack", n)
        assert [(x["client_id"], x["seq"]) for x in acks] == [(f"c{i}", i + 1) for i in range(n)]
        assert all(x["conversation"] == room.id and x["id"] for x in acks)

        for sock in (sender, bob_b, carol_a):
            await sock.wait_count("message", n)
        # A send from the other replica reaches the first one too. (Sent only once the
        # first ones arrived: this consumer, as the tutorial's, does not order messages
        # that two replicas publish at the same time.)
        await bob_b.send({"type": "send", "conversation": room.id, "client_id": "b0", "body": "hi"})
        ack = await bob_b.wait_for(lambda f: f["type"] == "ack")
        assert ack["seq"] == n + 1

        for sock in (sender, bob_b, carol_a):
            got = await sock.wait_count("message", n + 1)
            assert [m["seq"] for m in got] == list(range(1, n + 2))
            assert [m["client_id"] for m in got] == [*(f"c{i}" for i in range(n)), "b0"]
            assert got[0]["body"] == "m0" and got[0]["conversation"] == room.id
            assert got[0]["sender"]["id"] == alice.id and got[-1]["sender"]["id"] == bob.id

        # A retried client_id: the same message again, no second broadcast.
        await sender.send(
            {"type": "send", "conversation": room.id, "client_id": "c0", "body": "m0"}
        )
        retry = await sender.wait_count("ack", n + 1)
        assert retry[-1]["seq"] == 1

        # Bad input gets an error frame; the socket stays usable.
        await sender.ws.send("not json")
        await sender.send({"type": "typing", "conversation": room.id})
        await sender.send({"type": "send", "conversation": 999999, "client_id": "x", "body": "x"})
        await sender.send({"type": "ping"})
        await sender.wait_for(lambda f: f["type"] == "pong")
        codes = [e["code"] for e in sender.of("error")]
        assert codes == ["bad_request", "bad_request", "not_found"], sender.of("error")

        await asyncio.sleep(0.3)
        for sock in (sender, bob_b, carol_a):
            assert len(sock.of("message")) == n + 1, sock.of("message")
            await sock.close()

        # No credentials: accepted, then closed with 4401.
        from tests.realtime.cluster import open_ws

        anon = Simple(await open_ws(a.ws_url))
        assert await anon.wait_closed() == 4401

    asyncio.run(scenario())
    seqs = list(
        Message.objects.filter(conversation=room).order_by("seq").values_list("seq", flat=True)
    )
    assert seqs == list(range(1, n + 2))
