"""Writes that others must see publish their event to the channel layer, on commit only."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import transaction

from parley.chat import events, services

pytestmark = [pytest.mark.django_db(transaction=True)]


async def _listen(group: str):
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    await asyncio.sleep(0.2)  # let the subscription reach Redis
    return layer, channel


async def test_message_event_is_published_on_commit(alice, room):
    layer, channel = await _listen(events.conversation_group(room.id))
    message, _ = await database_sync_to_async(services.message_create)(
        sender=alice, conversation_id=room.id, body="<b>hi</b>", client_id="e1"
    )
    event = await asyncio.wait_for(layer.receive(channel), 5)
    assert event["type"] == "chat.frame" and event["kind"] == "message"
    assert event["conversation"] == room.id and event["seq"] == message.seq
    frame = orjson.loads(event["frame"])
    assert frame == {
        "type": "message",
        "id": message.id,
        "conversation": room.id,
        "seq": 1,
        "sender": {"id": alice.id, "username": "alice", "display_name": "Alice A."},
        "body": "<b>hi</b>",
        "client_id": "e1",
        "created_at": frame["created_at"],
    }
    assert frame["created_at"].endswith("Z")


async def test_nothing_is_published_for_a_rolled_back_send(alice, room):
    layer, channel = await _listen(events.conversation_group(room.id))

    def send_then_fail():
        with transaction.atomic():
            services.message_create(sender=alice, conversation_id=room.id, body="lost")
            raise RuntimeError("rollback")

    with pytest.raises(RuntimeError):
        await database_sync_to_async(send_then_fail)()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 1.0)
    await database_sync_to_async(room.refresh_from_db)()
    assert room.last_seq == 0


async def test_join_publishes_membership_to_the_users_sockets(alice, bob, room, carol):
    layer, channel = await _listen(events.user_group(carol.id))
    await database_sync_to_async(services.room_join)(user=carol, slug=room.slug)
    event = await asyncio.wait_for(layer.receive(channel), 5)
    assert event["type"] == "chat.membership" and event["event"] == "joined"
    assert orjson.loads(event["frame"]) == {
        "type": "membership",
        "conversation": room.id,
        "event": "joined",
    }


async def test_read_receipt_is_broadcast_to_the_conversation(alice, bob, room):
    await database_sync_to_async(services.message_create)(
        sender=alice, conversation_id=room.id, body="x"
    )
    layer, channel = await _listen(events.conversation_group(room.id))
    await database_sync_to_async(services.membership_mark_read)(
        user=bob, conversation_id=room.id, seq=1
    )
    event = await asyncio.wait_for(layer.receive(channel), 5)
    assert event["type"] == "chat.receipts" and event["everyone"] is True
    [[user, old_delivered, delivered, old_read, read, frame]] = event["rows"]
    # alice's own send moved her receipts; bob joined at 0 and now read 1.
    assert (user, old_delivered, delivered, old_read, read) == (bob.id, 0, 1, 0, 1)
    assert orjson.loads(frame) == {
        "type": "receipt",
        "conversation": room.id,
        "user": bob.id,
        "delivered_seq": 1,
        "read_seq": 1,
    }
