"""Writes of the chat domain. Every write other members must see publishes its event on commit."""

from __future__ import annotations

import functools

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, transaction
from django.utils import timezone
from django.utils.text import slugify

from parley.accounts.models import User
from parley.chat import events, notifications
from parley.chat.errors import BadRequest, Conflict, NotFound, TooLong
from parley.chat.models import Conversation, Membership, Message
from parley.knobs import knob_int

CLIENT_ID_MAX = 64


def _membership_for_update(*, user: User, conversation_id: int) -> Membership:
    try:
        return Membership.objects.get(user=user, conversation_id=conversation_id)
    except Membership.DoesNotExist:
        raise NotFound("No such conversation, or you are not a member.") from None


def message_validate(*, body: object, client_id: object = None) -> tuple[str, str | None]:
    """Check a message's fields; return them normalized. Raises BadRequest/TooLong."""
    if not isinstance(body, str):
        raise BadRequest("body must be a string.")
    if not body.strip():
        raise BadRequest("body must not be empty.")
    if "\x00" in body:
        raise BadRequest("body must not contain NUL characters.")
    limit = settings.PARLEY_MAX_MESSAGE_CHARS
    if len(body) > limit:
        raise TooLong(f"body is {len(body)} characters; the limit is {limit}.")
    if client_id is not None:
        if not isinstance(client_id, str) or not client_id or len(client_id) > CLIENT_ID_MAX:
            raise BadRequest(f"client_id must be a string of 1 to {CLIENT_ID_MAX} characters.")
        if "\x00" in client_id:
            raise BadRequest("client_id must not contain NUL characters.")
    return body, client_id


def message_create(
    *, sender: User, conversation_id: int, body: object, client_id: object = None
) -> tuple[Message, bool]:
    """Commit a message and return (message, created).

    One statement (`_MESSAGE_INSERT_SQL`) does the whole send: it locks the conversation
    row (only if the sender is a member), inserts the message with seq = last_seq + 1,
    moves last_seq to it and the sender's own receipts forward. Outside a transaction it
    commits by itself: one round trip, no BEGIN/COMMIT. The row lock orders concurrent
    senders, and last_seq moves only when the insert happened (a send that fails takes
    nothing), so seqs have no gap and no duplicate. The same (sender, client_id) again
    returns the first message (created=False): the unique constraint decides, even
    between concurrent retries (`ON CONFLICT DO NOTHING`, then the winner is read).
    The message event is published, and the notification pass scheduled, on commit.
    """
    body, client_id = message_validate(body=body, client_id=client_id)
    for _ in range(3):
        if connection.in_atomic_block:
            # Inside the caller's transaction: a savepoint, so that an error leaves the
            # caller's transaction usable; events wait for the caller's commit.
            with transaction.atomic():
                row = _message_insert(sender, conversation_id, body, client_id)
        else:
            row = _message_insert(sender, conversation_id, body, client_id)
        message = message_from_row(
            row, sender=sender, conversation_id=conversation_id, body=body, client_id=client_id
        )
        if message is not None:
            # On commit; at once when the statement committed by itself (autocommit).
            events.publish_on_commit(
                events.conversation_group(conversation_id),
                events.message_event(message, sender),
            )
            # Offline members' notifications: one coalesced worker pass per conversation.
            notifications.notify_on_commit(conversation_id=conversation_id)
            return message, True
        _, _, _, allowed, *existing = row
        if existing[0] is not None:
            # The client_id was already used (committed before this statement began).
            fields = dict(zip(_EXISTING_FIELDS, existing, strict=True))
            message = _message_loaded(sender=sender, client_id=client_id, **fields)
            return _idempotent_result(message, conversation_id)
        if not allowed:
            raise NotFound("No such conversation, or you are not a member.")
        if client_id is None:  # only a client_id conflict skips the insert
            raise RuntimeError("message insert returned no row")
        # The insert met a (sender, client_id) committed by a concurrent retry after this
        # statement began: nothing was written; read the winner.
        winner = _message_by_client_id(sender=sender, client_id=client_id)
        if winner is not None:
            return _idempotent_result(winner, conversation_id)
        # The conflicting message is gone again (only a hard delete does that): retry.
    raise Conflict("client_id is in use by a message being written; retry.")


# $msg, $conv and $mem are the tables; values are parameters. The conversation row is
# locked FOR NO KEY UPDATE (as the UPDATE of last_seq would) before the insert, and
# last_seq moves only for a row the insert returned: an insert skipped by ON CONFLICT
# leaves last_seq alone, so no seq is ever consumed without its message.
_EXISTING_FIELDS = ("id", "conversation_id", "seq", "body", "created_at", "edited_at", "deleted_at")
_MESSAGE_INSERT_SQL = """
WITH existing AS (
    SELECT id, conversation_id, seq, body, created_at, edited_at, deleted_at
    FROM $msg WHERE sender_id = %(sender)s AND client_id = %(client_id)s
),
conv AS (
    SELECT c.last_seq FROM $conv AS c
    WHERE c.id = %(conversation)s
      AND EXISTS (
          SELECT 1 FROM $mem AS m
          WHERE m.user_id = %(sender)s AND m.conversation_id = %(conversation)s
      )
      AND NOT EXISTS (SELECT 1 FROM existing)
    FOR NO KEY UPDATE OF c
),
ins AS (
    INSERT INTO $msg (conversation_id, seq, sender_id, body, client_id, created_at)
    SELECT %(conversation)s, conv.last_seq + 1, %(sender)s, %(body)s, %(client_id)s, %(now)s
    FROM conv
    ON CONFLICT (sender_id, client_id) WHERE client_id IS NOT NULL DO NOTHING
    RETURNING id, seq, created_at
),
seq AS (
    UPDATE $conv AS c SET last_seq = ins.seq FROM ins WHERE c.id = %(conversation)s
),
receipts AS (
    -- The sender has obviously seen their own message.
    UPDATE $mem AS m
    SET last_delivered_seq = GREATEST(m.last_delivered_seq, ins.seq),
        last_read_seq = GREATEST(m.last_read_seq, ins.seq)
    FROM ins
    WHERE m.user_id = %(sender)s AND m.conversation_id = %(conversation)s
)
SELECT ins.id, ins.seq, ins.created_at, (SELECT count(*) FROM conv),
       e.id, e.conversation_id, e.seq, e.body, e.created_at, e.edited_at, e.deleted_at
FROM (SELECT 1) AS one
LEFT JOIN ins ON TRUE
LEFT JOIN existing AS e ON TRUE
"""


@functools.cache
def _message_insert_sql() -> str:
    qn = connection.ops.quote_name  # table names only: no database access
    return (
        _MESSAGE_INSERT_SQL.replace("$msg", qn(Message._meta.db_table))
        .replace("$conv", qn(Conversation._meta.db_table))
        .replace("$mem", qn(Membership._meta.db_table))
    )


def message_insert_statement(
    *, sender: User, conversation_id: int, body: str, client_id: str | None
) -> tuple[str, dict]:
    """The one statement of a send, and its parameters (pyformat, for any psycopg cursor).

    Run outside a transaction it commits by itself. Its row goes to `message_from_row`."""
    params = {
        "sender": sender.id,
        "conversation": conversation_id,
        "body": body,
        "client_id": client_id,
        "now": timezone.now(),
    }
    return _message_insert_sql(), params


def message_from_row(
    row, *, sender: User, conversation_id: int, body: str, client_id: str | None
) -> Message | None:
    """The message the send statement inserted, or None when it inserted nothing (the
    client_id was used before, the sender is not a member, or a concurrent retry won:
    `message_create` tells which)."""
    new_id, seq, created_at = row[:3]
    if new_id is None:
        return None
    return _message_loaded(
        id=new_id,
        conversation_id=conversation_id,
        seq=seq,
        sender=sender,
        body=body,
        client_id=client_id,
        created_at=created_at,
    )


def _message_insert(sender: User, conversation_id: int, body: str, client_id: str | None):
    sql, params = message_insert_statement(
        sender=sender, conversation_id=conversation_id, body=body, client_id=client_id
    )
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def _message_loaded(**fields) -> Message:
    """A Message built from a row the statement returned, as if read by the ORM."""
    message = Message(**fields)
    message._state.adding = False
    message._state.db = DEFAULT_DB_ALIAS  # not connection.alias: also built on event loops
    return message


def _message_by_client_id(*, sender: User, client_id: str) -> Message | None:
    return (
        Message.objects.select_related("sender").filter(sender=sender, client_id=client_id).first()
    )


def _idempotent_result(message: Message, conversation_id: int) -> tuple[Message, bool]:
    if message.conversation_id != conversation_id:
        raise Conflict("client_id was already used for a message in another conversation.")
    return message, False


# --- rooms and direct conversations -------------------------------------------------


def room_create(
    *, creator: User, name: object, slug: object = None, topic: object = "", public: object = True
) -> Conversation:
    """Create a room and make its creator a member."""
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("name must be a non-empty string.")
    name = name.strip()
    if len(name) > 80:
        raise BadRequest("name must be at most 80 characters.")
    if topic is None:
        topic = ""
    if not isinstance(topic, str) or len(topic) > 300:
        raise BadRequest("topic must be a string of at most 300 characters.")
    if not isinstance(public, bool):
        raise BadRequest("public must be true or false.")
    if slug in (None, ""):
        slug = slugify(name)[:80]
    elif not isinstance(slug, str) or slugify(slug) != slug or len(slug) > 80:
        raise BadRequest("slug may hold only lowercase letters, digits, hyphens and underscores.")
    if not slug:
        raise BadRequest("name must contain a letter or digit (or give a slug).")
    try:
        with transaction.atomic():
            room = Conversation.objects.create(
                kind=Conversation.Kind.ROOM,
                name=name,
                slug=slug,
                topic=topic.strip(),
                is_public=public,
                created_by=creator,
            )
            _join(user=creator, conversation=room)
    except IntegrityError:
        raise Conflict(f"A room with the slug {slug!r} exists.") from None
    return room


def _join(*, user: User, conversation: Conversation) -> Membership:
    # A newcomer starts with everything before them counted as read.
    membership = Membership.objects.create(
        user=user,
        conversation=conversation,
        last_delivered_seq=conversation.last_seq,
        last_read_seq=conversation.last_seq,
    )
    events.publish_on_commit(
        events.user_group(user.id),
        events.membership_event(conversation_id=conversation.id, event="joined"),
    )
    return membership


def _room_by_slug(slug: str) -> Conversation:
    room = Conversation.objects.filter(kind=Conversation.Kind.ROOM, slug=slug).first()
    if room is None:
        raise NotFound(f"No room {slug!r}.")
    return room


def room_join(*, user: User, slug: str) -> Conversation:
    """Join a public room (idempotent). Private rooms cannot be joined by slug."""
    room = _room_by_slug(slug)
    if Membership.objects.filter(user=user, conversation=room).exists():
        return room
    if not room.is_public:
        raise NotFound(f"No room {slug!r}.")
    try:
        with transaction.atomic():
            _join(user=user, conversation=room)
    except IntegrityError:
        pass  # joined concurrently: same outcome
    return room


def room_leave(*, user: User, slug: str) -> Conversation:
    """Leave a room (idempotent for a room one has already left)."""
    room = _room_by_slug(slug)
    with transaction.atomic():
        deleted, _ = Membership.objects.filter(user=user, conversation=room).delete()
        if deleted:
            events.publish_on_commit(
                events.user_group(user.id),
                events.membership_event(conversation_id=room.id, event="left"),
            )
    if not deleted and not room.is_public:
        raise NotFound(f"No room {slug!r}.")
    return room


def direct_get_or_create(*, user: User, username: object) -> tuple[Conversation, bool]:
    """The direct conversation between `user` and `username`, created on first use."""
    if not isinstance(username, str) or not username.strip():
        raise BadRequest("username must be a non-empty string.")
    other = User.objects.filter(username=username.strip(), is_active=True).first()
    if other is None:
        raise NotFound(f"No user {username.strip()!r}.")
    if other.id == user.id:
        raise BadRequest("A direct conversation needs another user.")
    low, high = sorted((user.id, other.id))
    key = f"{low}:{high}"
    existing = Conversation.objects.filter(direct_key=key).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            conv = Conversation.objects.create(kind=Conversation.Kind.DIRECT, direct_key=key)
            _join(user=user, conversation=conv)
            _join(user=other, conversation=conv)
    except IntegrityError:
        return Conversation.objects.get(direct_key=key), False
    return conv, True


# --- receipts and settings --------------------------------------------------------


def membership_mark_read(*, user: User, conversation_id: int, seq: object) -> Membership:
    """Move the caller's read (and so delivered) position forward to `seq`; never back."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise BadRequest("seq must be a non-negative integer.")
    membership = _membership_for_update(user=user, conversation_id=conversation_id)
    last_seq = Conversation.objects.values_list("last_seq", flat=True).get(pk=conversation_id)
    seq = min(seq, last_seq)
    with transaction.atomic():
        membership = receipts_advance(
            conversation_id=conversation_id,
            user_id=membership.user_id,
            delivered_seq=seq,
            read_seq=seq,
        )
        # Reading the conversation ends its notification burst.
        notifications.burst_close(user_id=user.id, conversation_id=conversation_id, read_seq=seq)
    return membership


def receipts_broadcast_max_members() -> int:
    """Up to this many members, every member's socket gets every member's receipt frames.

    Above it a socket gets only the moves that cover a message its user sent on it and
    its user's own read moves (docs/protocol.md, "Receipts"): a flush of a big room
    would otherwise write members x members frames.
    """
    return knob_int("PARLEY_RECEIPT_BROADCAST_MAX_MEMBERS", 50)


def receipts_advance_many(
    *, conversation_id: int, positions: dict[int, tuple[int, int]]
) -> list[tuple[int, int, int, int, int]]:
    """Move many members' receipts of one conversation forward in one statement.

    `positions` maps user id to (delivered_seq, read_seq). GREATEST: never backwards,
    safe to repeat and to reorder. Only rows where something moves are written; rows are
    locked in user-id order, so two flushes of one conversation cannot deadlock. On
    commit ONE `chat.receipts` event carries every moved row to the conversation's
    sockets (each writes the `receipt` frames its user should see). Returns the moved rows
    as (user_id, old_delivered, delivered, old_read, read), ascending by user.
    """
    if not positions:
        return []
    users = sorted(positions)
    read = [max(int(positions[u][1]), 0) for u in users]
    delivered = [max(int(positions[u][0]), r) for u, r in zip(users, read, strict=True)]
    table = connection.ops.quote_name(Membership._meta.db_table)
    # No savepoint inside a caller's transaction: one statement needs none, and
    # `receipts_advance` stays at BEGIN, this statement, its SELECT, COMMIT.
    with transaction.atomic(savepoint=False), connection.cursor() as cur:
        cur.execute(
            f"""
            WITH v(u, d, r) AS (SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[])),
            locked AS (
                SELECT m.id, v.d, v.r, m.last_delivered_seq AS od, m.last_read_seq AS orr
                FROM {table} m JOIN v ON m.user_id = v.u
                WHERE m.conversation_id = %s
                  AND (m.last_delivered_seq < v.d OR m.last_read_seq < v.r)
                ORDER BY m.user_id
                FOR UPDATE OF m
            )
            UPDATE {table} m
            SET last_delivered_seq = GREATEST(m.last_delivered_seq, locked.d),
                last_read_seq = GREATEST(m.last_read_seq, locked.r)
            FROM locked WHERE m.id = locked.id
            RETURNING m.user_id, locked.od, m.last_delivered_seq, locked.orr, m.last_read_seq,
                (SELECT count(*) FROM {table} c WHERE c.conversation_id = %s)
            """,  # noqa: S608 - the table name is ours, values are parameters
            [users, delivered, read, conversation_id, conversation_id],
        )
        rows = sorted(cur.fetchall())
        moved = [tuple(row[:5]) for row in rows]
        if rows:
            everyone = rows[0][5] <= receipts_broadcast_max_members()
            events.publish_on_commit(
                events.conversation_group(conversation_id),
                events.receipts_event(
                    conversation_id=conversation_id, moved=moved, everyone=everyone
                ),
            )
    return moved


def receipts_advance(
    *, conversation_id: int, user_id: int, delivered_seq: int = 0, read_seq: int = 0
) -> Membership | None:
    """One member's `receipts_advance_many`; returns the membership as it is now."""
    read_seq = max(read_seq, 0)
    with transaction.atomic():
        receipts_advance_many(
            conversation_id=conversation_id,
            positions={user_id: (max(delivered_seq, read_seq), read_seq)},
        )
        return Membership.objects.filter(user_id=user_id, conversation_id=conversation_id).first()


def membership_set_muted(*, user: User, conversation_id: int, muted: object) -> Membership:
    if not isinstance(muted, bool):
        raise BadRequest("muted must be true or false.")
    membership = _membership_for_update(user=user, conversation_id=conversation_id)
    if membership.muted != muted:
        membership.muted = muted
        membership.save(update_fields=["muted"])
    return membership
