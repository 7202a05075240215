"""The burst rules and the email claim, in process (no worker needed)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from parley.chat import notifications
from parley.chat.models import Conversation, Message, Notification
from tests.worker.conftest import room_with_messages, set_online

pytestmark = pytest.mark.django_db(transaction=True)


def add_messages(room, sender, n):
    start = Conversation.objects.get(pk=room.pk).last_seq
    Message.objects.bulk_create(
        [
            Message(conversation=room, seq=s, sender=sender, body=f"m{s}")
            for s in range(start + 1, start + n + 1)
        ]
    )
    Conversation.objects.filter(pk=room.pk).update(last_seq=start + n)
    # As message_create does: the sender has seen their own messages.
    room.memberships.filter(user=sender).update(
        last_delivered_seq=start + n, last_read_seq=start + n
    )


def spans(user, room):
    return [
        (n.first_seq, n.last_seq, n.message_count, n.closed_at is not None)
        for n in Notification.objects.filter(user=user, conversation=room).order_by("id")
    ]


def test_a_burst_absorbs_messages_until_a_quiet_spell_longer_than_the_window(
    user_factory, settings
):
    settings.PARLEY_NOTIFICATION_BURST_SECONDS = 60
    alice, bob = user_factory("alice"), user_factory("bob", email="bob@example.test")
    room = room_with_messages(alice, [bob], 0)

    add_messages(room, alice, 3)
    (first_id,) = notifications.notification_bursts_update(conversation_id=room.id)
    add_messages(room, alice, 1)
    assert notifications.notification_bursts_update(conversation_id=room.id) == [first_id]
    assert spans(bob, room) == [(1, 4, 4, False)]

    # Quiet for longer than the window, then a new message: a new burst (and email).
    Notification.objects.filter(pk=first_id).update(
        updated_at=timezone.now() - timedelta(seconds=120), emailed_at=timezone.now()
    )
    add_messages(room, alice, 2)
    (second_id,) = notifications.notification_bursts_update(conversation_id=room.id)
    assert second_id != first_id
    assert spans(bob, room) == [(1, 4, 4, True), (5, 6, 2, False)]


def test_who_gets_a_burst_and_who_an_email(user_factory):
    alice = user_factory("alice", email="alice@example.test")
    bob = user_factory("bob", email="bob@example.test")
    no_email = user_factory("noemail")
    muted = user_factory("muted", email="muted@example.test")
    online = user_factory("online", email="online@example.test")
    gone = user_factory("gone", email="gone@example.test", is_active=False)
    room = room_with_messages(alice, [bob, no_email, muted, online, gone], 0)
    room.memberships.filter(user=muted).update(muted=True)
    set_online(online.id)
    add_messages(room, alice, 2)

    to_email = notifications.notification_bursts_update(conversation_id=room.id)

    assert set(Notification.objects.values_list("user__username", flat=True)) == {"bob", "noemail"}
    assert set(
        Notification.objects.filter(id__in=to_email).values_list("user__username", flat=True)
    ) == {"bob"}
    # Twice is the same as once.
    assert notifications.notification_bursts_update(conversation_id=room.id) == to_email
    assert Notification.objects.count() == 2


def test_concurrent_passes_open_one_burst(user_factory):
    alice, bob = user_factory("alice"), user_factory("bob", email="bob@example.test")
    room = room_with_messages(alice, [bob], 5)
    barrier = threading.Barrier(4)
    errors = []

    def run():
        try:
            barrier.wait()
            notifications.notification_bursts_update(conversation_id=room.id)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert spans(bob, room) == [(1, 5, 5, False)]


def test_the_email_claim_is_taken_once_and_released_on_failure(user_factory):
    alice, bob = user_factory("alice"), user_factory("bob", email="bob@example.test")
    room = room_with_messages(alice, [bob], 2)
    (nid,) = notifications.notification_bursts_update(conversation_id=room.id)

    claimed = notifications.notification_email_claim(notification_id=nid)
    assert claimed is not None and claimed.emailed_at is not None
    assert notifications.notification_email_claim(notification_id=nid) is None  # redelivery
    notifications.notification_email_release(notification=claimed)
    assert notifications.notification_email_claim(notification_id=nid) is not None

    n = Notification.objects.get(pk=nid)
    notifications.notification_email_release(notification=n)
    assert notifications.notification_email_failed(notification_id=nid)
    assert notifications.notification_email_claim(notification_id=nid) is None


def test_a_burst_that_ended_is_not_emailed(user_factory):
    alice, bob = user_factory("alice"), user_factory("bob", email="bob@example.test")
    room = room_with_messages(alice, [bob], 2)
    (nid,) = notifications.notification_bursts_update(conversation_id=room.id)
    assert notifications.burst_close_for_user(user_id=bob.id) == 1
    assert notifications.notification_email_claim(notification_id=nid) is None
    # A read below the burst does not end the next one; a read into it does.
    add_messages(room, alice, 2)
    (nid2,) = notifications.notification_bursts_update(conversation_id=room.id)
    assert notifications.burst_close(user_id=bob.id, conversation_id=room.id, read_seq=2) == 0
    assert notifications.burst_close(user_id=bob.id, conversation_id=room.id, read_seq=3) == 1
    assert Notification.objects.get(pk=nid2).closed_at is not None
