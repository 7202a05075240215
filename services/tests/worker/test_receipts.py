"""Receipts through real worker processes: coalesced, broadcast, never backwards."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from parley.chat import events, receipts, services
from parley.chat.models import Membership
from parley.chat.ratelimit import redis_client
from parley.config.celery import app
from tests.conftest import ApiClient
from tests.worker.conftest import FLUSH, FLUSH_MANY, room_with_messages
from tests.worker.support import Realtime, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.multiprocess]


def positions(conversation_id: int, user_id: int) -> tuple[int, int]:
    m = Membership.objects.get(conversation_id=conversation_id, user_id=user_id)
    return m.last_delivered_seq, m.last_read_seq


def flushes_done(pair) -> float:
    return sum(w.tasks_done(FLUSH) + w.tasks_done(FLUSH_MANY) for w in pair)


class ReceiptFrames:
    """Listens to a conversation's group as a realtime node would."""

    def __init__(self, conversation_id: int) -> None:
        self.group = events.conversation_group(conversation_id)
        self.frames: list[dict] = []
        self.events = 0

    async def __aenter__(self):
        self.layer = get_channel_layer()
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.layer.group_discard(self.group, self.channel)

    async def until(self, predicate, timeout: float) -> list[dict]:
        import orjson

        async def loop():
            while not any(predicate(f) for f in self.frames):
                event = await self.layer.receive(self.channel)
                if event.get("type") == "chat.receipts":
                    self.events += 1
                    self.frames += [orjson.loads(row[-1]) for row in event["rows"]]

        await asyncio.wait_for(loop(), timeout)
        return self.frames


@pytest.fixture
async def close_thread_connections():
    # The ORM runs in asgiref's thread here; its connection must not outlive the test.
    yield
    from django.db import connections

    await sync_to_async(connections.close_all)()


async def test_deliveries_and_reads_are_coalesced_broadcast_and_visible(
    pair, user_factory, close_thread_connections
):
    alice = await sync_to_async(user_factory)("alice")
    bob = await sync_to_async(user_factory)("bob")
    room = await sync_to_async(room_with_messages)(alice, [bob], 300)
    before = await asyncio.to_thread(flushes_done, pair)

    async with ReceiptFrames(room.id) as frames:
        # What a realtime node reports while writing 300 messages to bob's socket over ~1.5 s.
        for seq in range(1, 301):
            await receipts.record_delivery(conversation_id=room.id, user_id=bob.id, seq=seq)
            await asyncio.sleep(0.005)
        await receipts.record_read(conversation_id=room.id, user_id=bob.id, seq=120)
        await frames.until(
            lambda f: f["user"] == bob.id and (f["delivered_seq"], f["read_seq"]) == (300, 120),
            timeout=20,
        )

    assert await sync_to_async(positions)(room.id, bob.id) == (300, 120)
    bob_frames = [(f["delivered_seq"], f["read_seq"]) for f in frames.frames if f["user"] == bob.id]
    assert bob_frames == sorted(bob_frames), "a receipt frame went backwards"
    # 300 deliveries in ~1.5 s with a 0.5 s flush window: a handful of database writes.
    await asyncio.sleep(1.0)
    flushes = await asyncio.to_thread(flushes_done, pair) - before
    assert 1 <= flushes <= 10, flushes
    assert len(bob_frames) <= flushes
    # Every flush was taken off the due set by a ticker, which says how late it was.
    taken = await asyncio.to_thread(
        lambda: sum(w.metric("parley_receipts_flush_late_seconds_count") for w in pair)
    )
    assert taken >= flushes, (taken, flushes)
    assert frames.events <= flushes, "one receipts event per flush"

    # The members endpoint shows it to the sender.
    resp = await sync_to_async(
        lambda: ApiClient(alice).get(f"/api/v1/conversations/{room.id}/members")
    )()
    assert resp.status_code == 200
    row = next(m for m in resp.json() if m["user"]["id"] == bob.id)
    assert (row["last_delivered_seq"], row["last_read_seq"]) == (300, 120)
    # Applied receipts are forgotten in Redis.
    assert not redis_client().exists(receipts.pending_key(room.id))


def test_receipts_never_move_backwards_when_tasks_repeat_or_arrive_out_of_order(pair, user_factory):
    alice, bob = user_factory("alice"), user_factory("bob")
    others = [user_factory(f"member{i}") for i in range(20)]
    room = room_with_messages(alice, [bob, *others], 100)
    samples: list[tuple[int, int]] = []

    def sample_until(expected, timeout=15):
        def check():
            samples.append(positions(room.id, bob.id))
            return samples[-1] == expected

        wait_for(check, timeout=timeout, interval=0.02, what=f"receipts {expected}")

    def flush_many(n=4):
        # Duplicates of the same task, taken by both workers at once.
        for _ in range(n):
            app.send_task(FLUSH, args=[room.id])

    # Many users per flush: concurrent flushes lock rows in the same order.
    receipts.stage([(room.id, bob.id, 60, 50)] + [(room.id, u.id, 90, 80) for u in others])
    flush_many()
    sample_until((60, 50))
    receipts.stage([(room.id, u.id, 30, 20) for u in others])
    flush_many()

    # A read frame from before, delivered late; its flushes run after the newer ones.
    receipts.stage([(room.id, bob.id, 20, 10)])
    flush_many()
    # Meanwhile the HTTP read endpoint moves bob further.
    services.membership_mark_read(user=bob, conversation_id=room.id, seq=70)
    receipts.stage([(room.id, bob.id, 65, 55)])
    done = flushes_done(pair)  # before: the last four may finish before it is read
    flush_many()
    wait_for(lambda: flushes_done(pair) >= done + 4, timeout=15, what="the last flushes")
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        samples.append(positions(room.id, bob.id))
        time.sleep(0.02)

    assert samples[-1] == (70, 70)
    assert {positions(room.id, u.id) for u in others} == {(90, 80)}
    delivered = [d for d, _ in samples]
    read = [r for _, r in samples]
    assert delivered == sorted(delivered) and read == sorted(read), samples
    assert not redis_client().exists(receipts.pending_key(room.id))


def test_staged_receipts_whose_flush_was_never_enqueued_are_swept(pair, user_factory, monkeypatch):
    alice, bob = user_factory("alice"), user_factory("bob")
    room = room_with_messages(alice, [bob], 40)

    def broker_down(conversation_id, countdown=None, client=None):
        raise ConnectionError("broker unreachable")

    # The read reaches Redis, then the realtime node cannot enqueue (or dies).
    monkeypatch.setattr(receipts, "_enqueue_flush", broker_down)
    with pytest.raises(ConnectionError):
        receipts.stage([(room.id, bob.id, 30, 30)])
    monkeypatch.undo()
    assert redis_client().exists(receipts.pending_key(room.id))

    # A worker's sweeper (every 2 s here) schedules the flush.
    wait_for(lambda: positions(room.id, bob.id) == (30, 30), timeout=20, what="swept receipts")


async def test_a_read_over_websocket_reaches_the_sender_as_a_receipt_frame(
    pair, worker_env, user_factory, close_thread_connections
):
    import json

    from websockets.asyncio.client import connect

    from parley.accounts.services import token_create

    def setup():
        alice, bob = user_factory("alice"), user_factory("bob")
        room = room_with_messages(alice, [bob], 0)
        return alice, bob, room, token_create(user=alice), token_create(user=bob)

    alice, bob, room, alice_token, bob_token = await sync_to_async(setup)()
    realtime = await asyncio.to_thread(lambda: Realtime(worker_env).wait_ready())

    async def frame(ws, predicate, timeout=15):
        async def loop():
            while True:
                f = json.loads(await ws.recv())
                if predicate(f):
                    return f

        return await asyncio.wait_for(loop(), timeout)

    try:
        async with (
            connect(
                realtime.ws_url, additional_headers={"Authorization": f"Bearer {alice_token}"}
            ) as a,
            connect(
                realtime.ws_url, additional_headers={"Authorization": f"Bearer {bob_token}"}
            ) as b,
        ):
            for ws in (a, b):
                await frame(ws, lambda f: f["type"] == "hello")
            await a.send(
                json.dumps(
                    {"type": "send", "conversation": room.id, "client_id": "c-1", "body": "hi bob"}
                )
            )
            await frame(a, lambda f: f["type"] == "ack" and f["client_id"] == "c-1")
            message = await frame(b, lambda f: f["type"] == "message")
            assert message["seq"] == 1

            await b.send(json.dumps({"type": "read", "conversation": room.id, "seq": 1}))
            receipt = await frame(
                a, lambda f: f["type"] == "receipt" and f["user"] == bob.id and f["read_seq"] == 1
            )
            assert receipt["conversation"] == room.id and receipt["delivered_seq"] == 1
    finally:
        await asyncio.to_thread(realtime.stop)

    resp = await sync_to_async(
        lambda: ApiClient(alice).get(f"/api/v1/conversations/{room.id}/members")
    )()
    row = next(m for m in resp.json() if m["user"]["id"] == bob.id)
    assert (row["last_delivered_seq"], row["last_read_seq"]) == (1, 1)
