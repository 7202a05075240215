"""The worker's Postgres connections: one per pool process, reused across tasks, and
replaced by itself when Postgres drops it."""

from __future__ import annotations

import pytest
from django.db import connection

from parley.chat import receipts
from parley.chat.models import Membership
from tests.worker.conftest import FLUSH, room_with_messages
from tests.worker.support import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.multiprocess]


def _sessions() -> int:
    """Sessions ever opened on the test database (Postgres >= 14)."""
    with connection.cursor() as cur:
        cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return cur.fetchone()[0]


def _worker_backends() -> list[int]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'parley-worker'"
        )
        return [row[0] for row in cur.fetchall()]


def _flush_rounds(pair, room, users, rounds: int, start: int) -> None:
    for i in range(rounds):
        seq = start + i
        receipts.stage([(room.id, u.id, seq, 0) for u in users])
        from parley.config.celery import app

        app.send_task(FLUSH, args=[room.id])
        wait_for(
            lambda seq=seq: (
                set(
                    Membership.objects.filter(conversation=room, user__in=users).values_list(
                        "last_delivered_seq", flat=True
                    )
                )
                == {seq}
            ),
            timeout=15,
            interval=0.05,
            what=f"receipts at {seq}",
        )


def test_tasks_reuse_their_connection_and_survive_it_being_killed(pair, user_factory):
    alice = user_factory("alice")
    users = [user_factory(f"u{i}") for i in range(3)]
    room = room_with_messages(alice, users, 100)
    _flush_rounds(pair, room, users, 3, start=1)  # warm: every pool process connected

    before = _sessions()
    _flush_rounds(pair, room, users, 20, start=4)
    opened = _sessions() - before
    # Tasks of both workers (2 pool processes each) plus their notification passes; with
    # a connection per task this was above 20.
    assert opened <= 4, f"{opened} new Postgres sessions for 20 flush rounds"

    # Postgres drops every worker connection (a failover, an admin, a restart): the next
    # tasks notice, reconnect and apply the receipts (a retry at most).
    backends = _worker_backends()
    assert backends, "the worker's connections are named parley-worker"
    with connection.cursor() as cur:
        for pid in backends:
            cur.execute("SELECT pg_terminate_backend(%s)", [pid])
    _flush_rounds(pair, room, users, 5, start=24)
