"""receipts_advance is receipts_advance_many for one row: the same GREATEST statement, the
same event, and no more statements than its own UPDATE + SELECT took before."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from parley.chat import events, services
from parley.chat.models import Membership

pytestmark = pytest.mark.django_db(transaction=True)


def verbs(ctx) -> list[str]:
    return [q["sql"].split()[0].upper() for q in ctx.captured_queries]


@pytest.fixture
def published(monkeypatch):
    """What is handed to the publisher, i.e. what on_commit let through."""
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        events.publisher, "submit", lambda group, event: sent.append((group, event))
    )
    return sent


def rows_of(event: dict) -> list[list[int]]:
    return [row[:5] for row in event["rows"]]


def test_one_user_is_one_statement_and_its_select(room, bob, published):
    with CaptureQueriesContext(connection) as ctx:
        membership = services.receipts_advance(
            conversation_id=room.id, user_id=bob.id, delivered_seq=2, read_seq=1
        )
    # As before the merge with receipts_advance_many: no savepoint around the statement.
    assert verbs(ctx) == ["BEGIN", "WITH", "SELECT", "COMMIT"], verbs(ctx)
    assert (membership.user_id, membership.last_delivered_seq, membership.last_read_seq) == (
        bob.id,
        2,
        1,
    )
    assert len(published) == 1
    group, event = published[0]
    assert group == events.conversation_group(room.id)
    assert event["type"] == "chat.receipts" and rows_of(event) == [[bob.id, 0, 2, 0, 1]]

    # Backwards moves nothing and publishes nothing; read implies delivered.
    with CaptureQueriesContext(connection) as ctx:
        membership = services.receipts_advance(
            conversation_id=room.id, user_id=bob.id, delivered_seq=1, read_seq=0
        )
    assert verbs(ctx) == ["BEGIN", "WITH", "SELECT", "COMMIT"], verbs(ctx)
    assert (membership.last_delivered_seq, membership.last_read_seq) == (2, 1)
    assert len(published) == 1
    membership = services.receipts_advance(conversation_id=room.id, user_id=bob.id, read_seq=3)
    assert (membership.last_delivered_seq, membership.last_read_seq) == (3, 3)
    assert rows_of(published[-1][1]) == [[bob.id, 2, 3, 1, 3]]


def test_a_non_member_gets_none_and_nothing_is_written(room, carol, published):
    assert services.receipts_advance(conversation_id=room.id, user_id=carol.id, read_seq=5) is None
    assert not published
    assert not Membership.objects.filter(conversation=room, last_read_seq__gt=0).exists()


def test_inside_a_transaction_the_event_waits_for_its_commit(room, alice, bob, published):
    with transaction.atomic():
        with CaptureQueriesContext(connection) as ctx:
            services.receipts_advance(conversation_id=room.id, user_id=bob.id, read_seq=4)
        assert verbs(ctx) == ["SAVEPOINT", "WITH", "SELECT", "RELEASE"], verbs(ctx)
        with CaptureQueriesContext(connection) as ctx:
            moved = services.receipts_advance_many(
                conversation_id=room.id, positions={alice.id: (4, 4), bob.id: (4, 4)}
            )
        assert verbs(ctx) == ["WITH"], verbs(ctx)
        assert moved == [(alice.id, 0, 4, 0, 4)]
        assert not published
    assert [rows_of(event) for _, event in published] == [
        [[bob.id, 0, 4, 0, 4]],
        [[alice.id, 0, 4, 0, 4]],
    ]


def test_a_rolled_back_caller_publishes_nothing_and_keeps_nothing(room, bob, published):
    with pytest.raises(RuntimeError), transaction.atomic():
        services.receipts_advance(conversation_id=room.id, user_id=bob.id, read_seq=4)
        raise RuntimeError("rollback")
    assert not published
    mine = Membership.objects.get(user=bob, conversation=room)
    assert (mine.last_delivered_seq, mine.last_read_seq) == (0, 0)
