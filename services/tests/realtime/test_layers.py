"""The realtime channel layer: one decode per received group message, against real Redis."""

from __future__ import annotations

import asyncio

import pytest
from channels.layers import get_channel_layer

from parley.realtime.layers import SharedDecodePubSubChannelLayer

pytestmark = pytest.mark.timeout(30)


async def test_local_receivers_of_a_group_message_share_one_decoded_event():
    layer = get_channel_layer()
    assert isinstance(layer, SharedDecodePubSubChannelLayer)
    decodes = 0
    original = layer._serializer.deserialize

    def counting(message):
        nonlocal decodes
        decodes += 1
        return original(message)

    layer._serializer.deserialize = counting
    try:
        channels = [await layer.new_channel() for _ in range(3)]
        for channel in channels:
            await layer.group_add("t.shared", channel)
        await layer.group_send("t.shared", {"type": "x", "rows": [[1, 2]]})
        await layer.group_send("t.shared", {"type": "y"})
        got = [
            await asyncio.wait_for(layer.receive(channel), 5)
            for channel in channels
            for _ in (1, 2)
        ]
        firsts, seconds = got[0::2], got[1::2]
        assert [e["type"] for e in firsts] == ["x"] * 3 and [e["type"] for e in seconds] == [
            "y"
        ] * 3
        assert firsts[0] is firsts[1] is firsts[2]
        assert decodes == 2
        # A message to one channel is decoded for it alone, and still correctly.
        await layer.send(channels[0], {"type": "z"})
        assert (await asyncio.wait_for(layer.receive(channels[0]), 5))["type"] == "z"
    finally:
        layer._serializer.deserialize = original
        for channel in channels:
            await layer.group_discard("t.shared", channel)


async def test_a_thread_publishes_synchronously_to_async_receivers():
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("t.sync", channel)
    try:
        # As a database thread does on commit: no event loop in that thread.
        await asyncio.to_thread(
            lambda: [layer.group_send_sync("t.sync", {"type": "m", "n": n}) for n in range(50)]
        )
        got = [(await asyncio.wait_for(layer.receive(channel), 5))["n"] for _ in range(50)]
        assert got == list(range(50)), "one thread's publishes arrive in its order"
    finally:
        await layer.group_discard("t.sync", channel)


@pytest.mark.django_db(transaction=True)
async def test_publish_on_commit_uses_the_committing_thread():
    from django.db import transaction

    from parley.chat import events

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("t.commit", channel)
    threads = []

    def commit():
        import threading

        original = layer.group_send_sync

        def spy(group, event):
            threads.append(threading.current_thread().name)
            return original(group, event)

        layer.group_send_sync = spy
        try:
            with transaction.atomic():
                events.publish_on_commit("t.commit", {"type": "m", "n": 1})
        finally:
            del layer.group_send_sync

    try:
        await asyncio.to_thread(commit)
        event = await asyncio.wait_for(layer.receive(channel), 5)
        assert event["n"] == 1 and "ts" in event
        assert len(threads) == 1 and threads[0].startswith("asyncio")
    finally:
        await layer.group_discard("t.commit", channel)


async def test_a_burst_of_publishes_waits_for_connections_instead_of_failing():
    """2,000 sockets closing at once publish 2,000 presence events together: more than
    redis-py's asyncio pool allows (100, then MaxConnectionsError: the events were lost)."""
    layer = get_channel_layer()
    results = await asyncio.gather(
        *(layer.group_send(f"t.burst.{i}", {"type": "x", "i": i}) for i in range(600)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
