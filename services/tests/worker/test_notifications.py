"""Offline notifications through real worker processes and an SMTP server."""

from __future__ import annotations

import time

import pytest

from parley.chat import notifications, receipts, services
from parley.chat.models import Membership, Notification
from tests.worker.conftest import FLUSH_MANY, PUBLIC_URL, set_online
from tests.worker.support import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.multiprocess]


def people(user_factory, *names):
    return [user_factory(n, email=f"{n}@example.test", display_name=n.title()) for n in names]


def room_of(creator, members, name="General"):
    room = services.room_create(creator=creator, name=name)
    for user in members:
        services.room_join(user=user, slug=room.slug)
    return room


def send(sender, room, n, tag="hello"):
    for i in range(n):
        services.message_create(sender=sender, conversation_id=room.id, body=f"{tag} {i}")


def bursts(user, room):
    return list(Notification.objects.filter(user=user, conversation=room).order_by("id"))


def test_a_burst_of_200_messages_gives_one_notification_and_one_email(pair, mailbox, user_factory):
    alice, bob, carol, dave = people(user_factory, "alice", "bob", "carol", "dave")
    room = room_of(alice, [bob, carol, dave])
    services.membership_set_muted(user=carol, conversation_id=room.id, muted=True)
    set_online(dave.id)  # dave has a socket open on some realtime node

    send(alice, room, 200)

    def bob_done():
        rows = bursts(bob, room)
        return rows and rows[0].last_seq == 200 and rows[0].emailed_at and mailbox.to(bob.email)

    wait_for(bob_done, timeout=30, what="bob's notification and email")
    time.sleep(2.0)  # several more notification passes would have run by now

    (n,) = bursts(bob, room)
    assert (n.first_seq, n.last_seq, n.message_count) == (1, 200, 200)
    assert n.closed_at is None and n.email_failed_at is None
    assert len(mailbox.to(bob.email)) == 1
    # Muted, online, and the sender: nothing.
    for user in (carol, dave, alice):
        assert bursts(user, room) == [] and mailbox.to(user.email) == []

    msg = mailbox.to(bob.email)[0]
    assert "in General" in msg["Subject"]
    text = msg.get_body(preferencelist=("plain",)).get_content()
    html = msg.get_body(preferencelist=("html",)).get_content()
    link = f"{PUBLIC_URL}/c/{room.id}/"
    assert link in text and f'href="{link}"' in html
    # The latest messages of the burst when the email went out.
    assert "Alice: hello " in text and "Alice</strong>: hello " in html

    # The API shows it.
    from tests.conftest import ApiClient

    data = ApiClient(bob).get("/api/v1/notifications").json()
    assert len(data) == 1


def test_coming_online_or_reading_ends_the_burst(pair, mailbox, user_factory):
    alice, bob = people(user_factory, "alice", "bob")
    room = room_of(alice, [bob])

    send(alice, room, 3)
    wait_for(lambda: mailbox.to(bob.email), timeout=20, what="first email")

    # bob connects: the realtime service ends his bursts and reports deliveries.
    notifications.burst_close_for_user(user_id=bob.id)
    set_online(bob.id)
    send(alice, room, 2, tag="live")
    receipts.stage([(room.id, bob.id, 5, 0)])
    wait_for(
        lambda: Membership.objects.get(user=bob, conversation=room).last_delivered_seq == 5,
        timeout=15,
        what="deliveries",
    )
    time.sleep(1.5)
    (first,) = bursts(bob, room)
    assert first.closed_at is not None and first.last_seq == 3
    assert len(mailbox.to(bob.email)) == 1

    # bob goes away; a new message starts a new burst and a new email.
    set_online(bob.id, False)
    send(alice, room, 1, tag="later")
    wait_for(lambda: len(mailbox.to(bob.email)) == 2, timeout=20, what="second email")
    second = bursts(bob, room)[1]
    assert (second.first_seq, second.last_seq, second.message_count) == (6, 6, 1)
    assert second.closed_at is None

    # Reading the conversation (here over HTTP) ends it.
    services.membership_mark_read(user=bob, conversation_id=room.id, seq=6)
    second.refresh_from_db()
    assert second.closed_at is not None
    done = sum(w.tasks_done(FLUSH_MANY) for w in pair)
    assert done >= 1
