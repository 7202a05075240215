"""Sends committed from the event loop: the send statement on psycopg's async connection.

Every other ORM call of the realtime process runs on the database threads
(parley.realtime.db). A send did too, and its acknowledgement paid for it: a thread
needs the GIL back after each libpq call, and while the event loop thread runs Python
(fanning out the previous messages) it gets it only when the loop blocks or the
interpreter's switch interval forces a hand-over. A probe on an idle machine put the
statement at 2.7 ms through a thread and 1.8 ms on the loop (publish included); with the
loop kept busy the thread path stalled for whole seconds (docs/benchmarks.md, session 13).

So the common case, a new message, is one statement on one of a few autocommit
connections that belong to the node's loop (`SendConnections`). Everything else the
statement can answer (a client_id used before, not a member, a concurrent retry) goes to
`services.message_create` on a thread, which runs it again and says which: the
statement writes nothing in those cases, so running it twice changes nothing.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from psycopg.pq import TransactionStatus

from parley.accounts.models import User
from parley.chat import events, notifications, services
from parley.chat.models import Message
from parley.realtime.db import db, executor

logger = logging.getLogger(__name__)

ERRORS = (psycopg.Error,)


def _connection_params() -> dict:
    """Django's parameters for the default database (adapters, prepare threshold, TLS),
    without its synchronous cursor class."""
    wrapper = connections[DEFAULT_DB_ALIAS]
    params = wrapper.get_connection_params()
    params.pop("cursor_factory", None)
    return params


def _session_setup(wrapper) -> list[tuple[str, list]]:
    """What Django's connection setup runs: time zone, then role (if configured)."""
    statements = []
    if wrapper.timezone_name:
        statements.append((wrapper.ops.set_time_zone_sql(), [wrapper.timezone_name]))
    role = wrapper.settings_dict["OPTIONS"].get("assume_role")
    if role:
        statements.append(("SET ROLE %s", [role]))
    return statements


class SendConnections:
    """Up to `size` autocommit connections of one event loop, for the send statement.

    Not psycopg_pool: its background tasks would outlive a test's event loop. A
    connection is made when none is idle and kept while it stays usable; one that failed
    is closed. A statement that failed on a connection that had been idle (Postgres
    restarted, an idle timeout) is tried once more on a new one if the caller says it
    is safe to repeat."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection] = []
        self._setup: tuple[dict, list] | None = None
        self._closed = False

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._setup is None:

            def read():
                wrapper = connections[DEFAULT_DB_ALIAS]
                return _connection_params(), _session_setup(wrapper)

            self._setup = await db(read)()
        params, setup = self._setup
        conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
        try:
            for sql, args in setup:
                await conn.execute(sql, args)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def fetchone(self, sql: str, params: dict, *, repeatable: bool) -> tuple | None:
        async with self._slots:
            for attempt in (1, 2):
                conn = self._idle.pop() if self._idle else None
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                try:
                    cur = await conn.execute(sql, params)
                    row = await cur.fetchone()
                except psycopg.OperationalError:
                    await conn.close()
                    if reused and repeatable and attempt == 1:
                        continue
                    raise
                except BaseException:
                    await conn.close()
                    raise
                if self._closed or conn.info.transaction_status != TransactionStatus.IDLE:
                    await conn.close()
                else:
                    self._idle.append(conn)
                return row
        raise AssertionError("unreachable")

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    def abandon(self) -> None:
        """Close the idle connections of a loop that is already closed (no await)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.pgconn.finish()


async def message_create(
    pg: SendConnections | None,
    *,
    sender: User,
    conversation_id: int,
    body: object,
    client_id: object,
) -> tuple[Message, bool]:
    """`services.message_create` for the event loop: (message, created); the same errors
    (DomainError; psycopg.Error or DatabaseError when the database is away). The event
    is published before this returns; the notification pass is scheduled on a thread.
    With no connections configured (`pg` None) the whole send runs on a thread."""
    if pg is None:
        return await db(services.message_create)(
            sender=sender, conversation_id=conversation_id, body=body, client_id=client_id
        )
    body, client_id = services.message_validate(body=body, client_id=client_id)
    sql, params = services.message_insert_statement(
        sender=sender, conversation_id=conversation_id, body=body, client_id=client_id
    )
    row = await pg.fetchone(sql, params, repeatable=client_id is not None)
    message = services.message_from_row(
        row, sender=sender, conversation_id=conversation_id, body=body, client_id=client_id
    )
    if message is None:
        return await db(services.message_create)(
            sender=sender, conversation_id=conversation_id, body=body, client_id=client_id
        )
    await events.publish_now(
        events.conversation_group(conversation_id), events.message_event(message, sender)
    )
    if not notifications.pass_pending(conversation_id):
        future = asyncio.get_running_loop().run_in_executor(
            executor(), _schedule_notifications, conversation_id
        )
        future.add_done_callback(_retrieve)
    return message, True


def _schedule_notifications(conversation_id: int) -> None:
    try:
        notifications.conversation_changed(conversation_id=conversation_id)
    except Exception as exc:  # best effort, as on_commit(robust=True) in the thread path
        logger.warning("notification pass not scheduled: %r", exc)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
