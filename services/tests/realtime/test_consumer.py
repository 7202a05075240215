"""The chat socket, in process (channels' WebsocketCommunicator), against real Postgres
and Redis: handshake and auth, every frame type, bad input, ordering, presence, drain."""

from __future__ import annotations

import asyncio
import time

import pytest
from channels.db import database_sync_to_async as sync_to_async
from channels.layers import get_channel_layer
from channels.testing import HttpCommunicator
from django.db import connection
from django.test import Client

from parley.chat import events, presence, receipts, services
from parley.chat.models import Conversation, Message
from parley.realtime import conf
from parley.realtime import presence as rt_presence
from parley.realtime.node import get_node

from .conftest import ORIGIN, application, open_socket

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("node_cleanup"),
    pytest.mark.timeout(60),
]

send_message = sync_to_async(services.message_create)


def quiet_messages(conversation, sender, n, start=1):
    """Commit n messages without publishing their events (as if their events were lost)."""
    rows = [
        Message(conversation=conversation, seq=start + i, sender=sender, body=f"m{start + i}")
        for i in range(n)
    ]
    Message.objects.bulk_create(rows)
    Conversation.objects.filter(pk=conversation.pk).update(last_seq=start + n - 1)
    return list(
        Message.objects.filter(conversation=conversation, seq__gte=start)
        .select_related("sender")
        .order_by("seq")
    )


# --- handshake -----------------------------------------------------------------------------


async def test_hello_lists_the_users_conversations_with_their_last_seq(room, alice, bob):
    await send_message(sender=alice, conversation_id=room.id, body="one")
    direct, _ = await sync_to_async(services.direct_get_or_create)(user=alice, username="bob")
    sock = await open_socket(alice)
    hello = sock.hello
    assert hello["user"] == {"id": alice.id, "username": "alice", "display_name": "Alice A."}
    assert hello["node"] == conf.node_id()
    assert sorted(hello["conversations"], key=lambda c: c["id"]) == sorted(
        [{"id": room.id, "last_seq": 1}, {"id": direct.id, "last_seq": 0}], key=lambda c: c["id"]
    )
    await sock.disconnect()


@pytest.mark.parametrize("how", ["nothing", "bad token", "not bearer", "cookie without origin"])
async def test_unauthenticated_socket_is_closed_with_4401(alice, how):
    kwargs = {}
    if how == "bad token":
        kwargs["token"] = "plt_nope"
    elif how == "not bearer":
        kwargs["headers"] = [(b"authorization", b"Basic YWxpY2U6eA==")]
    elif how == "cookie without origin":
        client = Client()
        await sync_to_async(client.force_login)(alice)
        kwargs["cookie"] = f"sessionid={client.cookies['sessionid'].value}"
    sock = await open_socket(**kwargs, expect_hello=False)
    assert await sock.close_code() == 4401


async def test_foreign_origin_is_closed_with_4403_even_with_a_token(alice):
    sock = await open_socket(alice, origin="https://evil.example", expect_hello=False)
    assert await sock.close_code() == 4403
    sock = await open_socket(alice, origin="null", expect_hello=False)
    assert await sock.close_code() == 4403


async def test_session_cookie_with_allowed_origin_authenticates(alice):
    client = Client()
    await sync_to_async(client.force_login)(alice)
    sock = await open_socket(origin=ORIGIN, cookie=f"sessionid={client.cookies['sessionid'].value}")
    assert sock.hello["user"]["id"] == alice.id
    await sock.disconnect()


async def test_other_paths_are_refused(alice):
    sock = await open_socket(alice, path="/ws/other/", expect_hello=False)
    assert sock.refused == 1008


# --- send ----------------------------------------------------------------------------------


async def test_send_is_acked_after_commit_and_reaches_every_members_socket(room, alice, bob):
    a1, a2, b = await open_socket(alice), await open_socket(alice), await open_socket(bob)
    await a1.send({"type": "send", "conversation": room.id, "client_id": "c1", "body": "hi"})
    ack = await a1.expect("ack")
    msg = await sync_to_async(Message.objects.get)(conversation=room, client_id="c1")
    assert ack == {
        "type": "ack",
        "client_id": "c1",
        "conversation": room.id,
        "seq": 1,
        "id": msg.id,
    }
    for sock in (a1, a2, b):
        frame = await sock.expect("message")
        assert frame == {
            "type": "message",
            "id": msg.id,
            "conversation": room.id,
            "seq": 1,
            "sender": {"id": alice.id, "username": "alice", "display_name": "Alice A."},
            "body": "hi",
            "client_id": "c1",
            "created_at": events.iso(msg.created_at),
        }
    # A retry with the same client_id: the same ack, and no second message anywhere.
    await a1.send({"type": "send", "conversation": room.id, "client_id": "c1", "body": "hi"})
    assert await a1.expect("ack") == ack
    await b.nothing("message", 0.5)
    assert await sync_to_async(Message.objects.filter(conversation=room).count)() == 1
    for sock in (a1, a2, b):
        await sock.disconnect()


async def test_http_send_reaches_the_socket(room, alice, bob, api_for):
    sock = await open_socket(bob)
    api = await sync_to_async(api_for)(alice)
    resp = await sync_to_async(api.post)(
        f"/api/v1/conversations/{room.id}/messages", {"body": "over http"}
    )
    assert resp.status_code == 201, resp.content
    frame = await sock.expect("message")
    assert (frame["seq"], frame["body"]) == (1, "over http")
    await sock.disconnect()


# --- bad input -----------------------------------------------------------------------------

BAD_FRAMES = [  # (frame, code, client_id in the error)
    ("{not json", "bad_request", None),
    ("[1, 2]", "bad_request", None),
    ('"send"', "bad_request", None),
    ("{}", "bad_request", None),
    ('{"type": 5}', "bad_request", None),
    ('{"type": "shout"}', "bad_request", None),
    ('{"type": "shout", "client_id": "x1"}', "bad_request", "x1"),
    ('{"type": "send", "client_id": "x2", "body": "hi"}', "bad_request", "x2"),
    ('{"type": "send", "conversation": "1", "client_id": "x3", "body": "hi"}', "bad_request", "x3"),
    ('{"type": "send", "conversation": true, "client_id": "x4", "body": "."}', "bad_request", "x4"),
    ('{"type": "send", "conversation": ROOM, "body": "no client id"}', "bad_request", None),
    ('{"type": "send", "conversation": ROOM, "client_id": 7, "body": "hi"}', "bad_request", None),
    ('{"type": "send", "conversation": ROOM, "client_id": "x5"}', "bad_request", "x5"),
    ('{"type": "send", "conversation": ROOM, "client_id": "x6", "body": 5}', "bad_request", "x6"),
    ('{"type": "send", "conversation": ROOM, "client_id": "x7", "body": " "}', "bad_request", "x7"),
    ('{"type": "send", "conversation": ROOM, "client_id": "x8", "body": "LONG"}', "too_long", "x8"),
    ('{"type": "send", "conversation": OTHER, "client_id": "x9", "body": "hi"}', "not_found", "x9"),
    ('{"type": "send", "conversation": 99999, "client_id": "x", "body": "x"}', "not_found", "x"),
    ('{"type": "resume", "conversation": ROOM}', "bad_request", None),
    ('{"type": "resume", "conversation": ROOM, "after": -1}', "bad_request", None),
    ('{"type": "resume", "conversation": OTHER, "after": 0}', "not_found", None),
    ('{"type": "read", "conversation": ROOM, "seq": "3"}', "bad_request", None),
    ('{"type": "read", "conversation": OTHER, "seq": 1}', "not_found", None),
    ('{"type": "typing"}', "bad_request", None),
    ('{"type": "typing", "conversation": OTHER}', "not_found", None),
]


async def test_bad_input_gets_an_error_frame_and_the_socket_stays_usable(room, alice, bob, carol):
    other = await sync_to_async(services.room_create)(creator=carol, name="Elsewhere")
    sock = await open_socket(alice)
    for raw, code, client_id in BAD_FRAMES:
        text = (
            raw.replace("ROOM", str(room.id))
            .replace("OTHER", str(other.id))
            .replace("LONG", "x" * 4001)
        )
        await sock.send_text(text)
        frame = await sock.expect("error")
        assert frame["code"] == code, (raw, frame)
        assert frame.get("client_id") == client_id, (raw, frame)
        assert isinstance(frame["detail"], str) and frame["detail"]
    await sock.comm.send_to(bytes_data=b"\x00\x01")
    assert (await sock.expect("error"))["code"] == "bad_request"
    # Still usable: ping, and a valid send goes through.
    await sock.send({"type": "ping"})
    await sock.expect("pong")
    await sock.send({"type": "send", "conversation": room.id, "client_id": "ok", "body": "fine"})
    assert (await sock.expect("ack"))["seq"] == 1
    assert await sync_to_async(Message.objects.count)() == 1
    await sock.disconnect()


async def test_send_rate_limit_gives_rate_limited_and_keeps_the_socket(room, alice, settings):
    settings.PARLEY_RATE_MESSAGES_PER_10S = 3
    sock = await open_socket(alice)
    # Stay inside one 10 s window.
    if time.time() % 10 > 8:
        await asyncio.sleep(10 - time.time() % 10 + 0.05)
    for i in range(5):
        await sock.send(
            {"type": "send", "conversation": room.id, "client_id": f"r{i}", "body": "x"}
        )
    acks, errors = [], []
    for _ in range(5):
        frame = await sock.recv()
        while frame["type"] not in ("ack", "error"):
            frame = await sock.recv()
        (acks if frame["type"] == "ack" else errors).append(frame)
    # A socket's sends are committed in the order they came.
    assert [(a["client_id"], a["seq"]) for a in acks] == [("r0", 1), ("r1", 2), ("r2", 3)]
    assert [(e["code"], e["client_id"]) for e in errors] == [
        ("rate_limited", "r3"),
        ("rate_limited", "r4"),
    ]
    await sock.send({"type": "ping"})
    await sock.expect("pong")
    await sock.disconnect()


# --- resume --------------------------------------------------------------------------------


async def test_resume_returns_exactly_the_missed_messages(room, alice, bob):
    for i in range(10):
        await send_message(sender=alice, conversation_id=room.id, body=f"m{i + 1}")
    sock = await open_socket(bob)
    assert {"id": room.id, "last_seq": 10} in sock.hello["conversations"]
    await sock.send({"type": "resume", "conversation": room.id, "after": 3})
    frames = await sock.messages(7)
    assert [f["seq"] for f in frames] == list(range(4, 11))
    assert [f["body"] for f in frames] == [f"m{i}" for i in range(4, 11)]
    assert await sock.expect("resumed") == {
        "type": "resumed",
        "conversation": room.id,
        "last_seq": 10,
        "more": False,
    }
    # A resume from beyond the end replays nothing and does not derail the live stream.
    await sock.send({"type": "resume", "conversation": room.id, "after": 1000})
    assert (await sock.expect("resumed"))["last_seq"] == 10
    # Live messages continue after what was resumed, without duplicates.
    await send_message(sender=alice, conversation_id=room.id, body="m11")
    assert (await sock.expect("message"))["seq"] == 11
    await sock.nothing("message", 0.3)
    await sock.disconnect()


async def test_resume_is_bounded_to_500_messages(room, alice, bob):
    await sync_to_async(quiet_messages)(room, alice, 520)
    sock = await open_socket(bob)
    await sock.send({"type": "resume", "conversation": room.id, "after": 0})
    frames = await sock.messages(500)
    assert [f["seq"] for f in frames] == list(range(1, 501))
    assert await sock.expect("resumed") == {
        "type": "resumed",
        "conversation": room.id,
        "last_seq": 520,
        "more": True,
    }
    await sock.nothing("message", 0.3)
    await sock.disconnect()


# --- ordering ------------------------------------------------------------------------------


async def test_events_arriving_out_of_order_are_written_in_seq_order(room, alice, bob):
    sock = await open_socket(bob)
    m1, m2, m3 = await sync_to_async(quiet_messages)(room, alice, 3)
    layer = get_channel_layer()
    group = events.conversation_group(room.id)
    for m in (m3, m2, m1):
        await layer.group_send(group, events.message_event(m))
    frames = await sock.messages(3)
    assert [f["seq"] for f in frames] == [1, 2, 3]
    await sock.nothing("message", 0.5)  # the late duplicates are dropped
    await sock.disconnect()


async def test_a_lost_event_is_filled_from_postgres(room, alice, bob):
    sock = await open_socket(bob)
    messages = await sync_to_async(quiet_messages)(room, alice, 4)
    # Only seq 4's event arrives: 1..3 are read from Postgres after the gap wait.
    await get_channel_layer().group_send(
        events.conversation_group(room.id), events.message_event(messages[3])
    )
    frames = await sock.messages(4)
    assert [f["seq"] for f in frames] == [1, 2, 3, 4]
    assert [f["body"] for f in frames] == ["m1", "m2", "m3", "m4"]
    await sock.disconnect()


async def test_a_gap_fill_that_returns_after_the_stream_moved_does_not_skip_the_next_gap(
    room, alice, bob, monkeypatch
):
    # Seen at 200 msg/s: a fill read for an old gap came back after the live path had
    # closed that gap and a new one had opened; the socket gave up on the new one and
    # wrote past it (a gap for the client, a message it never got live).
    monkeypatch.setattr(conf, "GAP_WAIT_SECONDS", 0.05)
    node = get_node()
    original = node.message_frames_between
    release, first_call = asyncio.Event(), asyncio.Event()
    calls = []

    async def slow_first(conversation_id, after, before):
        calls.append((after, before))
        rows = await original(conversation_id, after, before)
        if len(calls) == 1:
            first_call.set()
            await release.wait()
        return rows

    monkeypatch.setattr(node, "message_frames_between", slow_first)
    sock = await open_socket(bob)
    m1, m2, _m3, m4 = await sync_to_async(quiet_messages)(room, alice, 4)
    layer, group = get_channel_layer(), events.conversation_group(room.id)
    await layer.group_send(group, events.message_event(m2))  # gap at 1: a fill starts
    await asyncio.wait_for(first_call.wait(), 5)
    await layer.group_send(group, events.message_event(m1))  # the live path closes it
    assert [f["seq"] for f in await sock.messages(2)] == [1, 2]
    await layer.group_send(group, events.message_event(m4))  # a new gap, at 3
    await asyncio.sleep(0.01)
    release.set()  # the old fill returns [1]: nothing for the gap at 3
    frames = await sock.messages(2)
    assert [f["seq"] for f in frames] == [3, 4]
    assert calls == [(0, 2), (2, 4)]
    await sock.disconnect()


# --- typing, read, deliveries ----------------------------------------------------------------


async def test_typing_reaches_the_other_members_throttled(room, alice, bob):
    a, a2, b = await open_socket(alice), await open_socket(alice), await open_socket(bob)
    await a.send({"type": "typing", "conversation": room.id})
    frame = await b.expect("typing")
    assert frame == {
        "type": "typing",
        "conversation": room.id,
        "user": {"id": alice.id, "username": "alice", "display_name": "Alice A."},
    }
    await a.send({"type": "typing", "conversation": room.id})  # within the throttle
    await b.nothing("typing", 0.5)
    await a2.nothing("typing", 0.1)  # not echoed to the typist's own sockets
    assert not await sync_to_async(Message.objects.exists)()
    for s in (a, a2, b):
        await s.disconnect()


async def test_read_frame_records_the_read_clamped_and_forward_only(room, alice, bob, monkeypatch):
    calls = []

    async def record_read(**kw):
        calls.append(kw)

    monkeypatch.setattr(receipts, "record_read", record_read)
    for i in range(3):
        await send_message(sender=alice, conversation_id=room.id, body=f"m{i}")
    sock = await open_socket(bob)
    await sock.send({"type": "read", "conversation": room.id, "seq": 2})
    await sock.send({"type": "read", "conversation": room.id, "seq": 1})  # backwards: ignored
    await sock.send({"type": "read", "conversation": room.id, "seq": 99})  # clamped to 3
    await sock.send({"type": "ping"})
    await sock.expect("pong")
    await asyncio.sleep(0.1)
    assert calls == [
        {"conversation_id": room.id, "user_id": bob.id, "seq": 2},
        {"conversation_id": room.id, "user_id": bob.id, "seq": 3},
    ]
    await sock.disconnect()


async def test_delivery_is_recorded_for_recipients_not_the_sender(room, alice, bob, monkeypatch):
    calls = []

    async def record_delivery(**kw):
        calls.append(kw)

    monkeypatch.setattr(receipts, "record_delivery", record_delivery)
    a, b = await open_socket(alice), await open_socket(bob)
    await a.send({"type": "send", "conversation": room.id, "client_id": "d1", "body": "x"})
    await a.expect("message")
    await b.expect("message")
    await asyncio.sleep(0.05)
    assert calls == [{"conversation_id": room.id, "user_id": bob.id, "seq": 1}]
    await a.disconnect()
    await b.disconnect()


advance = sync_to_async(services.receipts_advance_many)


async def test_receipts_reach_every_member_of_a_small_conversation_in_one_event(
    room, alice, bob, carol
):
    await sync_to_async(services.room_join)(user=carol, slug=room.slug)
    socks = {u.username: await open_socket(u) for u in (alice, bob, carol)}
    await send_message(sender=alice, conversation_id=room.id, body="x")
    for sock in socks.values():
        await sock.expect("message")
    moved = await advance(conversation_id=room.id, positions={bob.id: (1, 0), carol.id: (1, 1)})
    assert moved == [(bob.id, 0, 1, 0, 0), (carol.id, 0, 1, 0, 1)]
    for sock in socks.values():
        assert await sock.expect("receipt", user=bob.id) == {
            "type": "receipt",
            "conversation": room.id,
            "user": bob.id,
            "delivered_seq": 1,
            "read_seq": 0,
        }
        await sock.expect("receipt", user=carol.id, delivered_seq=1, read_seq=1)
    # Nothing moves, nothing is sent.
    assert await advance(conversation_id=room.id, positions={bob.id: (1, 0)}) == []
    await socks["alice"].nothing("receipt", 0.3)
    for sock in socks.values():
        await sock.disconnect()


async def test_in_a_big_conversation_receipts_go_to_the_senders_they_cover(
    room, alice, bob, carol, settings
):
    settings.PARLEY_RECEIPT_BROADCAST_MAX_MEMBERS = 2  # the room has 3 members
    await sync_to_async(services.room_join)(user=carol, slug=room.slug)
    a, b, c = await open_socket(alice), await open_socket(bob), await open_socket(carol)
    # seq 1 from alice's socket, seq 2 from carol over HTTP (her socket sees it relayed).
    await a.send({"type": "send", "conversation": room.id, "client_id": "r1", "body": "one"})
    await a.expect("ack")
    await send_message(sender=carol, conversation_id=room.id, body="two")
    for sock in (a, b, c):
        await sock.messages(2)

    # bob's delivery of 1 is news to alice only.
    await advance(conversation_id=room.id, positions={bob.id: (1, 0)})
    await a.expect("receipt", user=bob.id, delivered_seq=1, read_seq=0)
    await c.nothing("receipt", 0.3)
    await b.nothing("receipt", 0.05)  # his own delivery: no frame
    # bob's delivery of 2 is news to carol only.
    await advance(conversation_id=room.id, positions={bob.id: (2, 0)})
    await c.expect("receipt", user=bob.id, delivered_seq=2, read_seq=0)
    await a.nothing("receipt", 0.3)
    # bob reading both: alice and carol (each has a message in it) and bob's own sockets.
    await advance(conversation_id=room.id, positions={bob.id: (2, 2)})
    for sock in (a, b, c):
        await sock.expect("receipt", user=bob.id, delivered_seq=2, read_seq=2)
    for sock in (a, b, c):
        await sock.disconnect()


# --- membership ----------------------------------------------------------------------------


async def test_socket_follows_joins_and_leaves_without_reconnecting(room, alice, carol):
    c = await open_socket(carol)
    assert c.hello["conversations"] == []
    await send_message(sender=alice, conversation_id=room.id, body="before")
    await sync_to_async(services.room_join)(user=carol, slug=room.slug)
    assert await c.expect("membership") == {
        "type": "membership",
        "conversation": room.id,
        "event": "joined",
    }
    await send_message(sender=alice, conversation_id=room.id, body="after")
    frame = await c.expect("message")
    assert (frame["seq"], frame["body"]) == (2, "after")
    await c.send({"type": "typing", "conversation": room.id})
    await c.send({"type": "ping"})
    await c.expect("pong")
    assert "error" not in [f["type"] for f in c.seen]
    await sync_to_async(services.room_leave)(user=carol, slug=room.slug)
    assert (await c.expect("membership"))["event"] == "left"
    await send_message(sender=alice, conversation_id=room.id, body="gone")
    await c.nothing("message", 0.5)
    await c.disconnect()


# --- presence ------------------------------------------------------------------------------


async def test_presence_with_several_sockets(room, alice, bob):
    b = await open_socket(bob)
    a1 = await open_socket(alice)
    assert await b.expect("presence", user=alice.id) == {
        "type": "presence",
        "user": alice.id,
        "status": "online",
    }
    a2 = await open_socket(alice)
    assert await sync_to_async(presence.online_user_ids)(user_ids=[alice.id]) == {alice.id}
    await a1.disconnect()
    await b.nothing("presence", 0.4, user=alice.id)  # alice still has a socket
    await a2.disconnect()
    assert (await b.expect("presence", user=alice.id))["status"] == "offline"
    assert await sync_to_async(presence.online_user_ids)(user_ids=[alice.id]) == set()
    await b.disconnect()


async def test_sockets_opening_together_are_recorded_and_announced_together(
    room, alice, bob, carol, monkeypatch
):
    await sync_to_async(services.room_join)(user=carol, slug=room.slug)
    calls, published = [], []
    update_many = rt_presence.update_many

    async def counted(batch):
        calls.append(sorted(batch))
        return await update_many(batch)

    monkeypatch.setattr(rt_presence, "update_many", counted)
    layer = get_channel_layer()
    group_send = layer.group_send

    async def spied(group, message):
        if message.get("type") == "chat.presence":
            published.append(message["users"])
        return await group_send(group, message)

    monkeypatch.setattr(layer, "group_send", spied)
    b = await open_socket(bob)
    await b.expect("presence", user=bob.id)  # its own, announced to the room
    calls.clear(), published.clear()
    a, c = await asyncio.gather(open_socket(alice), open_socket(carol))
    got = {(await b.expect("presence", timeout=2))["user"] for _ in range(2)}
    assert got == {alice.id, carol.id}
    assert calls == [sorted([alice.id, carol.id])]  # one presence call for both sockets
    assert [sorted(users) for users in published] == [sorted([alice.id, carol.id])]
    for sock in (a, b, c):
        await sock.disconnect()


async def test_a_new_socket_keeps_its_user_online_while_the_old_one_closes(
    room, alice, bob, monkeypatch
):
    b = await open_socket(bob)
    a1 = await open_socket(alice)
    await b.expect("presence", user=alice.id, status="online")
    monkeypatch.setattr(conf, "PRESENCE_BATCH_SECONDS", 0.5)
    a2 = await open_socket(alice)  # its presence is not recorded yet...
    await a1.disconnect()  # ...when the old socket closes: no offline, no flap
    await b.nothing("presence", 1.0, user=alice.id)
    assert await sync_to_async(presence.online_user_ids)(user_ids=[alice.id]) == {alice.id}
    await a2.disconnect()
    assert (await b.expect("presence", user=alice.id))["status"] == "offline"
    await b.disconnect()


async def test_a_socket_closed_before_its_presence_was_recorded_is_never_announced(
    room, alice, bob
):
    b = await open_socket(bob)
    a = await open_socket(alice)
    await a.disconnect()
    await b.nothing("presence", conf.PRESENCE_BATCH_SECONDS * 4, user=alice.id)
    assert await sync_to_async(presence.online_user_ids)(user_ids=[alice.id]) == set()
    await b.disconnect()


async def test_sweep_announces_users_whose_node_died(room, alice, bob):
    b = await open_socket(bob)
    # Alice's socket lives on a node that stopped heartbeating: her entry has lapsed.
    await rt_presence.update(alice.id, [("dead-node:1", f"{time.time() + 0.2:.3f}")])
    await asyncio.sleep(0.3)
    offline = await get_node().sweep_once()
    assert offline == [alice.id]
    assert (await b.expect("presence", user=alice.id))["status"] == "offline"
    assert await get_node().sweep_once() == []  # announced once
    await b.disconnect()


async def test_presence_skips_big_rooms(room, alice, bob, monkeypatch):
    monkeypatch.setattr(conf, "PRESENCE_MAX_MEMBERS", 1)
    b = await open_socket(bob)
    await open_socket(alice)
    await b.nothing("presence", 0.5)
    await b.disconnect()


# --- server-side closes ----------------------------------------------------------------------


async def test_layer_resync_closes_sockets_with_1011(room, alice, bob, monkeypatch):
    monkeypatch.setattr(conf, "RESYNC_SECONDS", 0.2)
    a, b = await open_socket(alice), await open_socket(bob)
    get_node().resync("test")
    assert await a.close_code() == 1011
    assert await b.close_code() == 1011


async def test_drain_closes_with_1012_and_refuses_new_sockets(room, alice, bob):
    socks = [await open_socket(alice) for _ in range(3)] + [await open_socket(bob)]
    drain = asyncio.get_running_loop().create_task(get_node().drain(0.3))
    for sock in socks:
        assert await sock.close_code() == 1012
    for sock in socks:
        await sock.disconnect()
    await drain
    late = await open_socket(alice, expect_hello=False)
    assert await late.close_code() == 1012
    # Drained sockets keep presence for the reconnect grace, so nobody sees a flap.
    assert await sync_to_async(presence.online_user_ids)(user_ids=[alice.id]) == {alice.id}


async def test_a_socket_that_falls_behind_is_shed_and_closed_with_1013(
    room, alice, bob, monkeypatch
):
    import threading

    from parley.chat import selectors

    monkeypatch.setattr(conf, "SLOW_SOCKET_BACKLOG", 5)
    stuck = threading.Event()
    original = selectors.resume_frames

    def slow_resume(**kw):
        stuck.wait(10)
        return original(**kw)

    monkeypatch.setattr(selectors, "resume_frames", slow_resume)
    b = await open_socket(bob)
    await b.send({"type": "resume", "conversation": room.id, "after": 0})  # blocks the socket
    messages = await sync_to_async(quiet_messages)(room, alice, 10)
    for m in messages:
        await get_channel_layer().group_send(
            events.conversation_group(room.id), events.message_event(m)
        )
    await asyncio.sleep(1.5)  # the node's check runs every second
    stuck.set()
    assert await b.close_code(timeout=5) == 1013


# --- HTTP routes ---------------------------------------------------------------------------


async def _get(path):
    comm = HttpCommunicator(application, "GET", path)
    resp = await comm.get_response(timeout=10)
    return resp["status"], resp["body"]


async def test_health_readiness_and_metrics(room, alice):
    sock = await open_socket(alice)
    await sock.send({"type": "ping"})
    await sock.expect("pong")
    status, body = await _get("/healthz")
    assert status == 200 and b'"ok"' in body
    status, body = await _get("/readyz")
    assert status == 200, body
    status, body = await _get("/metrics")
    text = body.decode()
    assert status == 200
    assert 'parley_ws_frames_in_total{type="ping"}' in text
    assert "parley_ws_connections 1.0" in text
    assert "parley_ws_send_ack_seconds_bucket" in text
    assert "parley_ws_delivery_seconds_bucket" in text
    assert (await _get("/nope"))[0] == 404
    await sock.disconnect()
    assert connection.vendor == "postgresql"


async def test_readyz_is_503_while_draining(alice):
    sock = await open_socket(alice)
    node = get_node()
    await node.drain(0)
    status, body = await _get("/readyz")
    assert status == 503 and b"draining" in body
    await sock.disconnect()
