"""parley.realtime.pg: sends and handshake reads on the event loop's own connections."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from channels.db import database_sync_to_async as sync_to_async
from django.db import connection

from parley.accounts import selectors as account_selectors
from parley.accounts.models import User
from parley.accounts.services import token_create, token_digest
from parley.chat import selectors, services
from parley.chat.errors import Conflict, NotFound
from parley.chat.models import Message
from parley.realtime import pg as apg
from parley.realtime.node import get_node

from .conftest import open_socket

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("node_cleanup"),
    pytest.mark.timeout(60),
]


@pytest.fixture
async def pg():
    conns = apg.LoopConnections(2)
    yield conns
    await conns.close()


def backend_pids(conns: apg.LoopConnections) -> list[int]:
    return [c.info.backend_pid for c in conns._idle]


@sync_to_async
def terminate(pids: list[int]) -> None:
    with connection.cursor() as cur:
        for pid in pids:
            cur.execute("SELECT pg_terminate_backend(%s)", [pid])


@sync_to_async
def stored(conversation_id: int) -> list[Message]:
    return list(Message.objects.filter(conversation_id=conversation_id).order_by("seq"))


async def test_a_socket_send_commits_on_the_loops_connection_and_reaches_the_member(
    room, alice, bob
):
    a, b = await open_socket(alice), await open_socket(bob)
    await a.send({"type": "send", "conversation": room.id, "body": "hi", "client_id": "c1"})
    ack = await a.expect("ack", client_id="c1")
    got = await b.expect("message", conversation=room.id)
    assert got["seq"] == ack["seq"] == 1 and got["body"] == "hi"
    # Committed on the node's send connection, which stays open for the next send (the
    # thread path would have left none there).
    assert get_node().loop_db.idle == 1
    [message] = await stored(room.id)
    assert (message.id, message.seq, message.client_id) == (ack["id"], 1, "c1")
    await a.disconnect()
    await b.disconnect()


async def test_the_message_is_the_one_the_orm_reads(pg, room, alice):
    message, created = await apg.message_create(
        pg, sender=alice, conversation_id=room.id, body=" é\u2603 ", client_id="x"
    )
    assert created
    [read] = await stored(room.id)
    assert (message.id, message.seq, message.body, message.client_id) == (
        read.id,
        read.seq,
        read.body,
        read.client_id,
    )
    # Same instant and the same zone as Django's connections use (frames carry isoformat).
    assert message.created_at == read.created_at
    assert message.created_at.utcoffset() == read.created_at.utcoffset()
    assert message.created_at.isoformat() == read.created_at.isoformat()


async def test_a_replayed_client_id_returns_the_first_message_without_writing(pg, room, alice):
    first, created = await apg.message_create(
        pg, sender=alice, conversation_id=room.id, body="one", client_id="same"
    )
    again, created_again = await apg.message_create(
        pg, sender=alice, conversation_id=room.id, body="other", client_id="same"
    )
    assert created and not created_again
    assert (again.id, again.seq, again.body) == (first.id, 1, "one")
    assert len(await stored(room.id)) == 1


async def test_the_statements_refusals_come_from_the_domain(pg, room, alice, carol):
    with pytest.raises(NotFound):
        await apg.message_create(pg, sender=carol, conversation_id=room.id, body="x", client_id="c")
    with pytest.raises(NotFound):
        await apg.message_create(pg, sender=alice, conversation_id=10**9, body="x", client_id="c")
    other = await sync_to_async(services.room_create)(creator=alice, name="Other")
    await apg.message_create(pg, sender=alice, conversation_id=room.id, body="x", client_id="k")
    with pytest.raises(Conflict):
        await apg.message_create(
            pg, sender=alice, conversation_id=other.id, body="y", client_id="k"
        )
    assert [m.body for m in await stored(room.id)] == ["x"]


async def test_a_connection_lost_while_idle_is_replaced_and_the_send_goes_through(pg, room, alice):
    await apg.message_create(pg, sender=alice, conversation_id=room.id, body="a", client_id="1")
    assert pg.idle == 1
    await terminate(backend_pids(pg))
    # Repeating the statement is safe with a client_id: at most one message either way.
    message, created = await apg.message_create(
        pg, sender=alice, conversation_id=room.id, body="b", client_id="2"
    )
    assert created and message.seq == 2
    assert [m.body for m in await stored(room.id)] == ["a", "b"]
    assert pg.idle == 1


async def test_without_a_client_id_a_lost_connection_is_an_error_not_a_repeat(pg, room, alice):
    await apg.message_create(pg, sender=alice, conversation_id=room.id, body="a", client_id=None)
    await terminate(backend_pids(pg))
    with pytest.raises(psycopg.OperationalError):
        await apg.message_create(
            pg, sender=alice, conversation_id=room.id, body="b", client_id=None
        )
    assert pg.idle == 0
    # The next send makes a new connection.
    await apg.message_create(pg, sender=alice, conversation_id=room.id, body="c", client_id=None)
    assert [m.body for m in await stored(room.id)] == ["a", "c"]


async def test_with_no_connections_configured_the_send_runs_on_a_thread(room, alice):
    message, created = await apg.message_create(
        None, sender=alice, conversation_id=room.id, body="t", client_id=uuid.uuid4().hex
    )
    assert created and message.seq == 1


async def test_stopping_the_node_closes_its_send_connections(room, alice):
    sock = await open_socket(alice)
    await sock.send({"type": "send", "conversation": room.id, "body": "x", "client_id": "s"})
    await sock.expect("ack", client_id="s")
    node = get_node()
    conns = node.loop_db._idle[:]
    assert len(conns) == 1
    await sock.disconnect()
    await node.stop()
    assert all(c.closed for c in conns)
    assert node.loop_db is not None and node.loop_db.idle == 0  # new and empty if it starts again


async def test_a_handshake_reads_on_the_loops_connections(room, alice):
    sock = await open_socket(alice)  # a bearer token nobody looked up before
    assert sock.hello["conversations"] == [{"id": room.id, "last_seq": 0}]
    assert get_node().loop_db.idle >= 1  # the thread path leaves none there
    await sock.disconnect()


async def test_the_handshake_reads_match_the_selectors(pg, room, alice, bob, carol):
    direct, _ = await sync_to_async(services.direct_get_or_create)(user=alice, username="bob")
    await apg.message_create(pg, sender=alice, conversation_id=room.id, body="x", client_id="q")
    for user, expected in [
        (alice, sorted([(room.id, 1), (direct.id, 0)])),
        (bob, sorted([(room.id, 1), (direct.id, 0)])),
        (carol, []),
    ]:
        assert await sync_to_async(selectors.conversation_ids_for_user)(user_id=user.id) == expected
        assert await apg.conversation_ids_for_user(pg, user.id) == expected

    token = await sync_to_async(token_create)(user=alice)
    digest = token_digest(token)
    token_id, used_at, user = await apg.token_by_digest(pg, digest)
    t_id, t_used_at, t_user = await sync_to_async(account_selectors.token_by_digest)(digest=digest)
    assert (token_id, used_at) == (t_id, t_used_at)
    assert user == t_user == alice
    assert [getattr(user, f.attname) for f in User._meta.concrete_fields] == [
        getattr(t_user, f.attname) for f in User._meta.concrete_fields
    ]
    assert not user._state.adding and user._state.db == "default"
    assert await apg.token_by_digest(pg, token_digest("nope")) is None
    alice.is_active = False
    await sync_to_async(alice.save)()
    assert await apg.token_by_digest(pg, digest) is None


async def test_connections_are_set_up_as_djangos_time_zone_and_role(monkeypatch):
    @sync_to_async
    def make_role():
        with connection.cursor() as cur:
            cur.execute(
                "DO $$ BEGIN CREATE ROLE parley_test_assumed; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )

    await make_role()
    options = connection.settings_dict["OPTIONS"]
    monkeypatch.setitem(options, "assume_role", "parley_test_assumed")
    conns = apg.LoopConnections(1)
    try:
        row = await conns.fetchone(
            "SELECT current_user, current_setting('TimeZone')", [], repeatable=True
        )
    finally:
        await conns.close()
    assert row == ("parley_test_assumed", "UTC")


@pytest.mark.parametrize(("threshold", "prepared"), [("1", True), ("off", False)])
async def test_hot_statements_are_prepared_unless_turned_off(
    room, alice, monkeypatch, threshold, prepared
):
    """Prepared, Postgres neither parses nor plans the send statement again (half its
    CPU); behind an old transaction-mode pooler that must be off."""
    monkeypatch.setenv("REALTIME_ASYNC_DB_PREPARE_THRESHOLD", threshold)
    conns = apg.LoopConnections(1)  # one connection: every statement below runs on it
    try:
        for n in range(3):
            await apg.message_create(
                conns, sender=alice, conversation_id=room.id, body=f"m{n}", client_id=f"p{n}"
            )
        rows = await conns.fetchall(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s",
            ["%INSERT INTO%"],
        )
    finally:
        await conns.close()
    assert (len(rows) == 1) is prepared
    assert [m.seq for m in await stored(room.id)] == [1, 2, 3]


async def test_concurrent_handshake_reads_go_out_as_one_statement_each(
    pg, room, alice, bob, carol, monkeypatch
):
    """Sockets opening together: their token lookups are one statement, their
    conversation reads another, and each gets its own answer (the selectors')."""
    direct, _ = await sync_to_async(services.direct_get_or_create)(user=alice, username="bob")
    users = [alice, bob, carol]
    tokens = [await sync_to_async(token_create)(user=u) for u in users]
    statements = []
    fetchall = pg.fetchall

    async def counted(sql, params):
        statements.append(sql)
        return await fetchall(sql, params)

    monkeypatch.setattr(pg, "fetchall", counted)
    digests = [token_digest(t) for t in tokens] + [
        token_digest("nobody's"),
        token_digest(tokens[0]),
    ]
    found = await asyncio.gather(*(apg.token_by_digest(pg, d) for d in digests))
    assert statements == [account_selectors.tokens_sql()]
    assert [f[2] if f else None for f in found] == [*users, None, alice]
    assert found[4] is found[0]  # the same token twice: read once, both answered
    for (token_id, used_at, user), digest in zip(found[:3], digests[:3], strict=True):
        expected = await sync_to_async(account_selectors.token_by_digest)(digest=digest)
        assert (token_id, used_at) == expected[:2]
        assert [getattr(user, f.attname) for f in User._meta.concrete_fields] == [
            getattr(expected[2], f.attname) for f in User._meta.concrete_fields
        ]

    statements.clear()
    ids = [u.id for u in users] + [alice.id]
    got = await asyncio.gather(*(apg.conversation_ids_for_user(pg, uid) for uid in ids))
    assert statements == [selectors.conversation_ids_many_sql()]
    expected = [
        await sync_to_async(selectors.conversation_ids_for_user)(user_id=uid) for uid in ids
    ]
    assert got == expected
    assert got[0] == sorted([(room.id, 0), (direct.id, 0)]) and got[2] == []
    got[0].append("mine")  # each caller owns its list
    assert got[3] == expected[3]


async def test_a_read_asked_for_while_one_is_in_flight_goes_in_the_next():
    started, release = asyncio.Event(), asyncio.Event()
    batches = []

    async def fetch_many(keys):
        batches.append(sorted(keys))
        if len(batches) == 1:
            started.set()
            await release.wait()
        return {k: k * 10 for k in keys if k != 4}

    reads = apg.BatchRead(fetch_many, missing="none")
    first = asyncio.gather(reads.get(1), reads.get(2))
    await started.wait()
    # 1 again: a key asked for while a read of it is in flight is read once more, after
    # (a handshake's second conversation read must start after its subscriptions).
    later = asyncio.gather(reads.get(3), reads.get(4), reads.get(3), reads.get(1))
    await asyncio.sleep(0.01)
    assert batches == [[1, 2]]  # the later ones wait for the read in flight
    release.set()
    assert await first == [10, 20]
    assert await later == [30, "none", 30, 10]
    assert batches == [[1, 2], [1, 3, 4]]


async def test_a_failed_read_fails_its_waiters_only_and_a_cancelled_waiter_is_skipped():
    calls = []
    gate = asyncio.Event()

    async def fetch_many(keys):
        calls.append(sorted(keys))
        if len(calls) == 1:
            raise psycopg.OperationalError("the server closed the connection")
        await gate.wait()
        return {k: str(k) for k in keys}

    reads = apg.BatchRead(fetch_many)
    with pytest.raises(psycopg.OperationalError):
        await asyncio.gather(reads.get(1), reads.get(2))
    gone = asyncio.ensure_future(reads.get(3))
    kept = asyncio.ensure_future(reads.get(4))
    await asyncio.sleep(0.01)
    gone.cancel()  # its socket went away during the handshake
    gate.set()
    assert await kept == "4"
    assert gone.cancelled()
    assert calls == [[1, 2], [3, 4]]


async def test_keys_asked_for_during_a_failing_read_are_read_by_the_next():
    failing, fail = asyncio.Event(), asyncio.Event()
    calls = []

    async def fetch_many(keys):
        calls.append(sorted(keys))
        if len(calls) == 1:
            failing.set()
            await fail.wait()
            raise psycopg.OperationalError("terminating connection")
        return {k: -k for k in keys}

    reads = apg.BatchRead(fetch_many)
    doomed = asyncio.ensure_future(reads.get(1))
    await failing.wait()
    later = asyncio.ensure_future(reads.get(2))
    await asyncio.sleep(0.01)
    fail.set()
    with pytest.raises(psycopg.OperationalError):
        await doomed
    assert await later == -2
    assert calls == [[1], [2]]


async def test_a_read_that_hangs_fails_its_waiters_after_the_timeout_only():
    calls = []

    async def fetch_many(keys):
        calls.append(sorted(keys))
        if len(calls) == 1:
            await asyncio.sleep(3600)  # a half-open connection
        return {k: k for k in keys}

    reads = apg.BatchRead(fetch_many, timeout=0.2)
    hung = asyncio.ensure_future(reads.get(1))
    await asyncio.sleep(0.05)
    later = asyncio.ensure_future(reads.get(2))
    with pytest.raises(TimeoutError):
        await hung
    assert await later == 2


async def test_cancelling_the_reader_cancels_every_waiter():
    started = asyncio.Event()

    async def fetch_many(keys):
        started.set()
        await asyncio.sleep(3600)

    reads = apg.BatchRead(fetch_many)
    first = asyncio.ensure_future(reads.get(1))
    await started.wait()
    second = asyncio.ensure_future(reads.get(2))
    await asyncio.sleep(0.01)
    reads._reader.cancel()  # what the loop's shutdown does to a leftover task
    await asyncio.wait([first, second], timeout=1)
    assert first.cancelled() and second.cancelled()
    # A later read starts a new reader.
    reads._fetch_many = lambda keys: asyncio.sleep(0, {k: "again" for k in keys})
    assert await reads.get(3) == "again"


async def test_one_of_two_waiters_of_a_key_cancelled_the_other_gets_the_value():
    gate = asyncio.Event()

    async def fetch_many(keys):
        await gate.wait()
        return {k: f"v{k}" for k in keys}

    reads = apg.BatchRead(fetch_many)
    a, b = asyncio.ensure_future(reads.get(7)), asyncio.ensure_future(reads.get(7))
    await asyncio.sleep(0.01)
    a.cancel()
    gate.set()
    assert await b == "v7"
    assert a.cancelled()


async def test_reads_are_split_at_the_batch_limit():
    batches = []

    async def fetch_many(keys):
        batches.append(len(keys))
        return {k: k for k in keys}

    reads = apg.BatchRead(fetch_many, max_keys=3)
    assert await asyncio.gather(*(reads.get(k) for k in range(7))) == list(range(7))
    assert batches == [3, 3, 1]
