"""parley.realtime.db: the bridge from the event loop to the ORM threads."""

from __future__ import annotations

import contextvars
import threading

import pytest
from django.db import connection

from parley.realtime.db import db

pytestmark = [pytest.mark.timeout(30), pytest.mark.django_db(transaction=True)]

REQUEST = contextvars.ContextVar("request", default=None)


async def test_runs_on_the_database_threads_with_the_callers_context():
    loop_thread = threading.get_ident()

    def where():
        return threading.get_ident(), threading.current_thread().name, REQUEST.get()

    REQUEST.set("r1")
    ident, name, seen = await db(where)()
    assert ident != loop_thread and name.startswith("parley-db")
    assert seen == "r1"


async def test_results_and_errors_come_back_as_raised():
    def fails():
        raise LookupError("nope")

    with pytest.raises(LookupError, match="nope"):
        await db(fails)()

    def query(n):
        with connection.cursor() as cur:
            cur.execute("SELECT %s + 1", [n])
            return cur.fetchone()[0]

    assert await db(query)(41) == 42


async def test_a_broken_connection_is_not_reused(monkeypatch):
    """close_old_connections runs around every call, as channels' database_sync_to_async
    does: a connection marked unusable on one call is replaced on the next (one thread,
    so that both calls see the same connection)."""
    from concurrent.futures import ThreadPoolExecutor

    from parley.realtime import db as db_module

    one = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parley-db-test")
    monkeypatch.setattr(db_module, "_executor", one)

    def break_it():
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        connection.errors_occurred = True
        connection.is_usable = lambda: False  # as after a dropped socket
        return id(connection.connection)

    def use_it():
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
        return connection.errors_occurred

    try:
        await db(break_it)()
        assert await db(use_it)() is False
    finally:
        one.submit(lambda: connection.close()).result()  # that thread's connection
        one.shutdown()
