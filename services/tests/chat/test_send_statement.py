"""message_create is one SQL statement (committing by itself outside a transaction), with
the same guarantees: gapless unique seqs, idempotent client_id, nothing written on error."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from parley.chat import services
from parley.chat.errors import Conflict, NotFound
from parley.chat.models import Conversation, Membership, Message

pytestmark = pytest.mark.django_db(transaction=True)


def sql_of(ctx) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries]


def test_a_new_message_is_one_statement(room, alice, bob):
    with CaptureQueriesContext(connection) as ctx:
        message, created = services.message_create(
            sender=alice, conversation_id=room.id, body="hello", client_id="one-1"
        )
    # Before: client_id lookup, membership EXISTS, UPDATE ... RETURNING, INSERT, the
    # sender's receipts UPDATE (5 captured, inside BEGIN ... COMMIT). Now: one statement
    # in autocommit, so no BEGIN and no COMMIT either.
    assert len(ctx.captured_queries) == 1, sql_of(ctx)
    assert created and message.seq == 1 and message.sender == alice
    stored = Message.objects.get(pk=message.id)
    assert (stored.conversation_id, stored.seq, stored.sender_id) == (room.id, 1, alice.id)
    assert (stored.body, stored.client_id, stored.created_at) == (
        "hello",
        "one-1",
        message.created_at,
    )
    assert stored.edited_at is None and stored.deleted_at is None
    assert Conversation.objects.get(pk=room.id).last_seq == 1
    mine = Membership.objects.get(user=alice, conversation=room)
    assert (mine.last_delivered_seq, mine.last_read_seq) == (1, 1)
    theirs = Membership.objects.get(user=bob, conversation=room)
    assert (theirs.last_delivered_seq, theirs.last_read_seq) == (0, 0)

    with CaptureQueriesContext(connection) as ctx:
        second, _ = services.message_create(sender=bob, conversation_id=room.id, body="no id")
    assert len(ctx.captured_queries) == 1, sql_of(ctx)
    assert second.seq == 2 and second.client_id is None


def test_a_retry_is_one_statement_and_takes_no_seq(room, alice):
    first, _ = services.message_create(
        sender=alice, conversation_id=room.id, body="hello", client_id="r-1"
    )
    with CaptureQueriesContext(connection) as ctx:
        again, created = services.message_create(
            sender=alice, conversation_id=room.id, body="hello (retried)", client_id="r-1"
        )
    assert len(ctx.captured_queries) == 1, sql_of(ctx)
    assert not created
    assert (again.id, again.seq, again.body, again.created_at) == (
        first.id,
        1,
        "hello",
        first.created_at,
    )
    assert Conversation.objects.get(pk=room.id).last_seq == 1
    nxt, _ = services.message_create(sender=alice, conversation_id=room.id, body="next")
    assert nxt.seq == 2


def test_non_members_and_missing_conversations_write_nothing(room, alice, carol):
    with CaptureQueriesContext(connection) as ctx, pytest.raises(NotFound):
        services.message_create(sender=carol, conversation_id=room.id, body="hi", client_id="n")
    assert len(ctx.captured_queries) == 1, sql_of(ctx)
    with pytest.raises(NotFound):
        services.message_create(sender=alice, conversation_id=room.id + 10_000, body="hi")
    assert not Message.objects.exists()
    assert Conversation.objects.get(pk=room.id).last_seq == 0
    # carol's client_id was not taken by the refused send.
    services.room_join(user=carol, slug=room.slug)
    m, created = services.message_create(
        sender=carol, conversation_id=room.id, body="hi", client_id="n"
    )
    assert created and m.seq == 1


def test_a_client_id_of_another_conversation_is_a_conflict_even_for_a_non_member(
    room, alice, bob, carol
):
    direct, _ = services.direct_get_or_create(user=alice, username="carol")
    services.message_create(sender=alice, conversation_id=direct.id, body="a", client_id="k")
    services.room_leave(user=alice, slug=room.slug)
    with pytest.raises(Conflict):
        services.message_create(sender=alice, conversation_id=room.id, body="b", client_id="k")
    assert Conversation.objects.get(pk=room.id).last_seq == 0


def test_inside_a_transaction_errors_leave_it_usable_and_events_wait_for_commit(room, alice, carol):
    with transaction.atomic():
        with pytest.raises(NotFound):
            services.message_create(sender=carol, conversation_id=room.id, body="no")
        m, created = services.message_create(
            sender=alice, conversation_id=room.id, body="yes", client_id="t-1"
        )
        again, created_again = services.message_create(
            sender=alice, conversation_id=room.id, body="yes", client_id="t-1"
        )
        assert created and not created_again and again.id == m.id
        assert len(connection.run_on_commit) == 2  # the event and the notification pass
    assert list(Message.objects.values_list("seq", "body")) == [(1, "yes")]

    with pytest.raises(RuntimeError), transaction.atomic():
        services.message_create(sender=alice, conversation_id=room.id, body="lost")
        raise RuntimeError("rollback")
    assert Conversation.objects.get(pk=room.id).last_seq == 1
    assert Message.objects.count() == 1


def _in_thread(fn):
    def run(*args):
        try:
            return fn(*args)
        finally:
            connection.close()

    return run


def test_concurrent_retries_of_the_same_client_ids_make_one_message_each_and_no_gap(
    room, alice, bob
):
    """Threads race on the same client_ids (the insert meets a row committed after its
    statement began, the case ON CONFLICT skips): one message each, and no seq is lost."""
    nthreads, per_thread = 6, 25
    barrier = threading.Barrier(nthreads + 1)

    @_in_thread
    def retrier():
        barrier.wait()
        out = []
        for i in range(per_thread):
            cid = f"same-{i}"  # every thread races on the same client_id at once
            m, created = services.message_create(
                sender=alice, conversation_id=room.id, body=cid, client_id=cid
            )
            out.append((cid, m.id, m.seq, created))
        return out

    @_in_thread
    def other():
        barrier.wait()
        return [
            services.message_create(sender=bob, conversation_id=room.id, body=f"b{i}")[0].seq
            for i in range(per_thread)
        ]

    with ThreadPoolExecutor(nthreads + 1) as pool:
        futures = [pool.submit(retrier) for _ in range(nthreads)]
        bobs = pool.submit(other)
        results = [row for f in futures for row in f.result()]
        bob_seqs = bobs.result()

    by_cid: dict[str, set[int]] = {}
    for cid, mid, _, _ in results:
        by_cid.setdefault(cid, set()).add(mid)
    assert len(by_cid) == per_thread and all(len(ids) == 1 for ids in by_cid.values())
    assert sum(created for *_, created in results) == per_thread
    seqs = list(
        Message.objects.filter(conversation=room).order_by("seq").values_list("seq", flat=True)
    )
    assert seqs == list(range(1, 2 * per_thread + 1))
    assert Conversation.objects.get(pk=room.id).last_seq == 2 * per_thread
    assert len(set(bob_seqs)) == per_thread
    mine = Membership.objects.get(user=alice, conversation=room)
    top = Message.objects.filter(conversation=room, sender=alice).order_by("-seq").first()
    assert mine.last_read_seq == top.seq


def test_concurrent_reuse_of_a_client_id_across_conversations(room, alice, bob):
    """The same client_id sent to two conversations at once: one wins, the other is a
    Conflict, and neither conversation is left with a gap."""
    direct, _ = services.direct_get_or_create(user=alice, username="bob")
    rounds = 20
    barrier = threading.Barrier(2)

    @_in_thread
    def sender(conversation_id):
        outcomes = []
        for i in range(rounds):
            barrier.wait()
            try:
                services.message_create(
                    sender=alice, conversation_id=conversation_id, body="x", client_id=f"x{i}"
                )
                outcomes.append("ok")
            except Conflict:
                outcomes.append("conflict")
        return outcomes

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(sender, [room.id, direct.id])
    assert all(sorted(pair) == ["conflict", "ok"] for pair in zip(a, b, strict=True))
    for conv in (room, direct):
        seqs = list(
            Message.objects.filter(conversation=conv).order_by("seq").values_list("seq", flat=True)
        )
        assert seqs == list(range(1, len(seqs) + 1))
        assert Conversation.objects.get(pk=conv.id).last_seq == len(seqs)
    assert Message.objects.count() == rounds
