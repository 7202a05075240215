"""The realtime process' own database connections, used from the event loop.

Every ORM call of the realtime process ran on the database threads (parley.realtime.db),
and the hot ones paid for it: a thread needs the GIL back after each libpq call, and
while the event loop thread runs Python (fanning out messages, opening sockets) it gets
it only when the loop blocks or the interpreter's switch interval forces a hand-over. A
probe on an idle machine put the send statement at 2.7 ms through a thread and 1.8 ms on
the loop (publish included); with the loop kept busy the thread path stalled for whole
seconds (docs/benchmarks.md, session 13).

So the statements of the two hot paths run here, on a few autocommit connections that
belong to the node's loop (`LoopConnections`, REALTIME_ASYNC_DB_CONNECTIONS):

- a send (`message_create`): the common case, a new message, is one statement. Anything
  else it can answer (a client_id used before, not a member, a concurrent retry) goes to
  `services.message_create` on a thread, which runs it again and says which: the
  statement writes nothing in those cases, so running it twice changes nothing;
- a handshake: the bearer token's user (`token_by_digest`) and the user's conversations
  (`conversation_ids_for_user`), the same SQL as the selectors of those names, read for
  every handshake waiting at that moment in one statement (`BatchRead`): in a connection
  storm one statement answers dozens of sockets.

With no such connections configured (0), all of it runs on the threads as before.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from psycopg import sql as psql
from psycopg.pq import TransactionStatus

from parley.accounts import selectors as account_selectors
from parley.accounts.models import User
from parley.chat import events, notifications, selectors, services
from parley.chat.models import Message
from parley.realtime import conf
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
        # A utility statement takes no bound parameter: the name goes in as a literal,
        # as Django's compose_sql does.
        statements.append((psql.SQL("SET ROLE {}").format(psql.Literal(role)), []))
    return statements


class BatchRead:
    """Reads of one kind, keyed, that go to Postgres together: every key asked for while
    a read is in flight (or in the same turn of the loop) is read by the next one, in one
    statement. A quiet replica reads each key at once; one opening hundreds of sockets a
    second reads them in a few statements instead of one each (psycopg's per-statement
    work was about a fifth of a replica's CPU in a connection storm; docs/benchmarks.md,
    sessions 13 and 14). `fetch_many(keys)` returns {key: value}; a key it leaves out gets
    `missing`. An error fails every waiter of that read, not later ones; so does a read
    that takes longer than `timeout` seconds (one statement at a time per kind: a hung
    connection must not hold every handshake of the replica). Waiters of one key share
    the value: treat it as read-only."""

    def __init__(
        self, fetch_many, *, missing=None, max_keys: int = 500, timeout: float = 5.0
    ) -> None:
        self._fetch_many = fetch_many
        self._missing = missing
        self._max_keys = max_keys
        self._timeout = timeout
        self._pending: dict[object, list[asyncio.Future]] = {}
        self._reader: asyncio.Task | None = None

    async def get(self, key):
        loop = asyncio.get_running_loop()
        reader = self._reader
        if reader is not None and not reader.done() and reader.get_loop() is not loop:
            # A reader left behind on a loop that is gone (tests): so are its waiters.
            self._pending, self._reader = {}, None
        fut = loop.create_future()
        self._pending.setdefault(key, []).append(fut)
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read())
        return await fut

    async def _read(self) -> None:
        while self._pending:
            keys = list(itertools.islice(self._pending, self._max_keys))
            batch = {key: self._pending.pop(key) for key in keys}
            try:
                async with asyncio.timeout(self._timeout):
                    found = await self._fetch_many(keys)
            except asyncio.CancelledError:
                # The loop is going away: so are the handshakes that wait.
                for waiters in (*batch.values(), *self._pending.values()):
                    for fut in waiters:
                        fut.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                for waiters in batch.values():
                    for fut in waiters:
                        if not fut.done():
                            fut.set_exception(exc)
                continue
            for key, waiters in batch.items():
                value = found.get(key, self._missing)
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(value)


class LoopConnections:
    """Up to `size` autocommit connections of one event loop.

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
        self.tokens = BatchRead(self._tokens)
        self.conversations = BatchRead(self._conversations, missing=())

    async def _tokens(self, digests: list[str]) -> dict:
        rows = await self.fetchall(account_selectors.tokens_sql(), [digests])
        return {row[0]: account_selectors.token_from_row(row[1:]) for row in rows}

    async def _conversations(self, user_ids: list[int]) -> dict:
        rows = await self.fetchall(selectors.conversation_ids_many_sql(), [user_ids])
        found: dict[int, list[tuple[int, int]]] = {}
        for user_id, cid, last_seq in rows:
            found.setdefault(user_id, []).append((cid, last_seq))
        return found

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._setup is None:

            def read():
                wrapper = connections[DEFAULT_DB_ALIAS]
                return _connection_params(), _session_setup(wrapper)

            self._setup = await db(read)()
        params, setup = self._setup
        conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
        conn.prepare_threshold = conf.async_db_prepare_threshold()
        try:
            for sql, args in setup:
                await conn.execute(sql, args)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def fetchone(self, sql: str, params, *, repeatable: bool) -> tuple | None:
        return await self._run(sql, params, repeatable, many=False)

    async def fetchall(self, sql: str, params) -> list[tuple]:
        """For reads (always safe to repeat)."""
        return await self._run(sql, params, True, many=True)

    async def _run(self, sql: str, params, repeatable: bool, *, many: bool):
        async with self._slots:
            for attempt in (1, 2):
                conn = self._idle.pop() if self._idle else None
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                try:
                    cur = await conn.execute(sql, params)
                    result = await (cur.fetchall() if many else cur.fetchone())
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
                return result
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
    pg: LoopConnections | None,
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
        asyncio.get_running_loop().run_in_executor(
            executor(), _schedule_notifications, conversation_id
        )
    return message, True


def _schedule_notifications(conversation_id: int) -> None:
    # Never raises, so nobody needs to retrieve its future's exception.
    try:
        notifications.conversation_changed(conversation_id=conversation_id)
    except Exception as exc:  # best effort, as on_commit(robust=True) in the thread path
        logger.warning("notification pass not scheduled: %r", exc)


async def conversation_ids_for_user(
    pg: LoopConnections | None, user_id: int
) -> list[tuple[int, int]]:
    """selectors.conversation_ids_for_user: (conversation id, last_seq) of the user's."""
    if pg is None:
        return await db(selectors.conversation_ids_for_user)(user_id=user_id)
    return list(await pg.conversations.get(user_id))


async def token_by_digest(pg: LoopConnections | None, digest: str):
    """accounts.selectors.token_by_digest: (token id, last_used_at, user) or None. Read
    with the other handshakes' tokens: callers asking for the same digest at once get
    the same tuple and User (copy the user before changing it, as tokens.py does)."""
    if pg is None:
        return await db(account_selectors.token_by_digest)(digest=digest)
    return await pg.tokens.get(digest)
