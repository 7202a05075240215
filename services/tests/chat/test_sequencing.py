"""Seq allocation and idempotency, including many OS processes sending at once."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from django.db import connection

from parley.chat import services
from parley.chat.errors import BadRequest, Conflict, NotFound, TooLong
from parley.chat.models import Message
from tests import procs as procs_mod

pytestmark = pytest.mark.django_db(transaction=True)


def test_concurrent_processes_get_gapless_unique_seqs(room, alice, bob):
    procs, per_proc, nprocs = [], 40, 6
    db_name = connection.settings_dict["NAME"]
    ctx = mp.get_context("spawn")
    for p in range(nprocs):
        proc = ctx.Process(
            target=procs_mod.send_many,
            args=(db_name, room.id, [alice.id, bob.id], per_proc, f"p{p}"),
        )
        procs.append(proc)
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    seqs = list(
        Message.objects.filter(conversation=room).order_by("seq").values_list("seq", flat=True)
    )
    assert seqs == list(range(1, nprocs * per_proc + 1))
    room.refresh_from_db()
    assert room.last_seq == nprocs * per_proc


def test_retry_with_same_client_id_returns_first_message(room, alice):
    first, created = services.message_create(
        sender=alice, conversation_id=room.id, body="hello", client_id="c-1"
    )
    again, created_again = services.message_create(
        sender=alice, conversation_id=room.id, body="hello (retried)", client_id="c-1"
    )
    assert created and not created_again
    assert again.id == first.id and again.body == "hello"
    assert Message.objects.filter(conversation=room).count() == 1


def test_same_client_id_from_another_sender_is_independent(room, alice, bob):
    a, _ = services.message_create(sender=alice, conversation_id=room.id, body="a", client_id="x")
    b, created = services.message_create(
        sender=bob, conversation_id=room.id, body="b", client_id="x"
    )
    assert created and a.id != b.id and (a.seq, b.seq) == (1, 2)


def test_client_id_reused_in_another_conversation_is_a_conflict(room, alice, bob):
    direct, _ = services.direct_get_or_create(user=alice, username="bob")
    services.message_create(sender=alice, conversation_id=room.id, body="a", client_id="k")
    with pytest.raises(Conflict):
        services.message_create(sender=alice, conversation_id=direct.id, body="b", client_id="k")


def test_non_member_cannot_send(room, carol):
    with pytest.raises(NotFound):
        services.message_create(sender=carol, conversation_id=room.id, body="hi")
    assert not Message.objects.exists()
    room.refresh_from_db()
    assert room.last_seq == 0


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("", BadRequest),
        ("   ", BadRequest),
        (None, BadRequest),
        (5, BadRequest),
        ("x" * 4001, TooLong),
        ("nul\x00", BadRequest),
    ],
)
def test_invalid_bodies_are_refused_and_nothing_is_written(room, alice, body, error):
    with pytest.raises(error):
        services.message_create(sender=alice, conversation_id=room.id, body=body)
    room.refresh_from_db()
    assert room.last_seq == 0 and not Message.objects.exists()


def test_a_failed_insert_does_not_leave_a_gap(room, alice):
    services.message_create(sender=alice, conversation_id=room.id, body="one", client_id="dup")
    # A too-long client_id fails validation before any seq is taken.
    with pytest.raises(BadRequest):
        services.message_create(sender=alice, conversation_id=room.id, body="x", client_id="y" * 65)
    m, _ = services.message_create(sender=alice, conversation_id=room.id, body="two")
    assert m.seq == 2
