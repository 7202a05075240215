"""Reads of the chat domain."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from django.db import connection
from django.db.models import Count, F, Q

from parley.accounts.models import User
from parley.chat import events, presence
from parley.chat.errors import BadRequest, NotFound
from parley.chat.models import Conversation, Membership, Message, Notification

PAGE_DEFAULT = 50
PAGE_MAX = 200
MEMBERS_IN_LIST = 100  # receipts shown per conversation in the list; see members endpoint


def membership_get(*, user: User, conversation_id: int) -> Membership:
    """The caller's membership, or NotFound: a non-member learns nothing, not even existence."""
    membership = (
        Membership.objects.select_related("conversation")
        .filter(user=user, conversation_id=conversation_id)
        .first()
    )
    if membership is None:
        raise NotFound("No such conversation, or you are not a member.")
    return membership


def conversation_title(conversation: Conversation, *, viewer: User, others: list[User]) -> str:
    if conversation.kind == Conversation.Kind.ROOM:
        return conversation.name
    other = next((u for u in others if u.id != viewer.id), None)
    return other.shown_name if other else "(direct)"


def conversation_list(*, user: User) -> list[dict]:
    """The user's conversations, most recently active first, with unread counts and receipts."""
    memberships = list(
        Membership.objects.filter(user=user)
        .select_related("conversation")
        .order_by("-conversation__last_seq", "conversation_id")
    )
    conv_ids = [m.conversation_id for m in memberships]
    members_by_conv: dict[int, list[Membership]] = {cid: [] for cid in conv_ids}
    counts = dict(
        Membership.objects.filter(conversation_id__in=conv_ids)
        .values_list("conversation_id")
        .annotate(n=Count("id"))
        .values_list("conversation_id", "n")
    )
    small = [cid for cid in conv_ids if counts.get(cid, 0) <= MEMBERS_IN_LIST]
    for m in (
        Membership.objects.filter(conversation_id__in=small)
        .select_related("user")
        .order_by("conversation_id", "user_id")
    ):
        members_by_conv[m.conversation_id].append(m)
    result = []
    for m in memberships:
        conv = m.conversation
        members = members_by_conv[conv.id]
        result.append(
            {
                "conversation": conv,
                "membership": m,
                "title": conversation_title(conv, viewer=user, others=[x.user for x in members]),
                "last_seq": conv.last_seq,
                "unread": max(conv.last_seq - m.last_read_seq, 0),
                "member_count": counts.get(conv.id, 0),
                "members": members,
            }
        )
    return result


def unread_total(*, user: User) -> int:
    agg = Membership.objects.filter(user=user).aggregate(
        n=Count("id", filter=Q(conversation__last_seq__gt=F("last_read_seq")))
    )
    return agg["n"] or 0


def conversation_ids_for_user(*, user_id: int) -> list[tuple[int, int]]:
    """(conversation id, last_seq) of every conversation the user is in.

    Raw SQL: every WebSocket handshake runs it twice, and compiling the ORM query cost
    more than Postgres answering it (connect profiles in docs/benchmarks.md).
    """
    with connection.cursor() as cur:
        cur.execute(conversation_ids_sql(), [user_id])
        return [(cid, last_seq) for cid, last_seq in cur.fetchall()]


@functools.cache
def conversation_ids_many_sql() -> str:
    """`conversation_ids_sql` for several users at once: one parameter, a list of user
    ids; rows (user id, conversation id, last_seq) ordered by user, then conversation."""
    return (
        f"SELECT m.user_id, m.conversation_id, c.last_seq FROM {_table(Membership)} m "  # noqa: S608
        f"JOIN {_table(Conversation)} c ON c.id = m.conversation_id "
        "WHERE m.user_id = ANY(%s::bigint[]) ORDER BY m.user_id, m.conversation_id"
    )


@functools.cache
def conversation_ids_sql() -> str:
    """`conversation_ids_for_user`'s query: one parameter, the user id."""
    return (
        f"SELECT m.conversation_id, c.last_seq FROM {_table(Membership)} m "  # noqa: S608
        f"JOIN {_table(Conversation)} c ON c.id = m.conversation_id "
        "WHERE m.user_id = %s ORDER BY m.conversation_id"
    )


@dataclass(frozen=True)
class MessagePage:
    # Message instances, or with as_json=True the API's message objects (dicts).
    messages: list
    has_older: bool
    has_newer: bool
    direction: str  # "newer" when paging forward with `after`, else "older"


def _seq_arg(name: str, value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        seq = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be an integer.") from None
    if seq < 0:
        raise BadRequest(f"{name} must not be negative.")
    return seq


def message_page(
    *,
    user: User,
    conversation_id: int,
    after: object = None,
    before: object = None,
    limit: object = None,
    as_json: bool = False,
) -> MessagePage:
    """A page of history, ascending by seq.

    `after`: the `limit` messages just after it; `before`: the `limit` just before it;
    neither: the newest `limit`. Each is one range scan of the (conversation, seq) index.
    With `as_json` the messages are the API's message objects (`events.message_json`),
    read with one raw query: the JSON API's hot path, where building 50 Messages and 50
    Users cost more than Postgres answering (docs/benchmarks.md, session 13).
    """
    after_seq = _seq_arg("after", after)
    before_seq = _seq_arg("before", before)
    if limit in (None, ""):
        n = PAGE_DEFAULT
    else:
        try:
            n = int(limit)
        except (TypeError, ValueError):
            raise BadRequest("limit must be an integer.") from None
        if not 1 <= n <= PAGE_MAX:
            raise BadRequest(f"limit must be between 1 and {PAGE_MAX}.")
    last_seq = _member_last_seq(user_id=user.id, conversation_id=conversation_id)
    fetch = _page_json if as_json else _page_models
    seq_of = _json_seq if as_json else _model_seq
    if after_seq is not None:
        rows = fetch(conversation_id, after=after_seq, before=before_seq, n=n + 1, newest=False)
        has_newer = len(rows) > n
        rows = rows[:n]
        has_older = (bool(rows) and seq_of(rows[0]) > 1) or (not rows and after_seq > 0)
        return MessagePage(rows, has_older=has_older, has_newer=has_newer, direction="newer")
    rows = fetch(conversation_id, after=None, before=before_seq, n=n + 1, newest=True)
    has_older = len(rows) > n
    rows = rows[:n][::-1]
    newest_shown = seq_of(rows[-1]) if rows else (before_seq - 1 if before_seq else last_seq)
    has_newer = newest_shown < last_seq
    return MessagePage(rows, has_older=has_older, has_newer=has_newer, direction="older")


def _json_seq(message: dict) -> int:
    return message["seq"]


def _model_seq(message: Message) -> int:
    return message.seq


def _member_last_seq(*, user_id: int, conversation_id: int) -> int:
    """The conversation's last_seq if the user is a member, else NotFound (as
    membership_get, without building the Membership and Conversation)."""
    with connection.cursor() as cur:
        cur.execute(_member_last_seq_sql(), [user_id, conversation_id])
        row = cur.fetchone()
    if row is None:
        raise NotFound("No such conversation, or you are not a member.")
    return row[0]


@functools.cache
def _member_last_seq_sql() -> str:
    return (
        f"SELECT c.last_seq FROM {_table(Membership)} m "  # noqa: S608
        f"JOIN {_table(Conversation)} c ON c.id = m.conversation_id "
        "WHERE m.user_id = %s AND m.conversation_id = %s"
    )


def _page_models(conversation_id, *, after, before, n, newest) -> list[Message]:
    qs = Message.objects.filter(conversation_id=conversation_id).select_related("sender")
    if before is not None:
        qs = qs.filter(seq__lt=before)
    if after is not None:
        qs = qs.filter(seq__gt=after)
    return list(qs.order_by("-seq" if newest else "seq")[:n])


_PAGE_COLUMNS = "m.id, m.seq, u.id, u.username, u.display_name, m.body, m.client_id, m.created_at"


@functools.cache
def _page_sql(*, before: bool, after: bool, newest: bool) -> str:
    where = " AND ".join(
        ["m.conversation_id = %s"] + ["m.seq < %s"] * before + ["m.seq > %s"] * after
    )
    return (
        f"SELECT {_PAGE_COLUMNS} FROM {_table(Message)} m "  # noqa: S608 - names are ours
        f"JOIN {_table(User)} u ON u.id = m.sender_id WHERE {where} "
        f"ORDER BY m.seq {'DESC' if newest else 'ASC'} LIMIT %s"
    )


def _page_json(conversation_id, *, after, before, n, newest) -> list[dict]:
    sql = _page_sql(before=before is not None, after=after is not None, newest=newest)
    params = [conversation_id] + [s for s in (before, after) if s is not None] + [n]
    with connection.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    iso = events.iso
    return [
        {
            "id": mid,
            "conversation": conversation_id,
            "seq": seq,
            "sender": {"id": uid, "username": username, "display_name": display_name},
            "body": body,
            "client_id": client_id,
            "created_at": iso(created_at),
        }
        for mid, seq, uid, username, display_name, body, client_id, created_at in rows
    ]


def messages_after(*, conversation_id: int, after: int, limit: int) -> list[Message]:
    """Messages with seq > after, ascending (for resume). The caller checks membership."""
    return list(
        Message.objects.filter(conversation_id=conversation_id, seq__gt=after)
        .select_related("sender")
        .order_by("seq")[:limit]
    )


def room_search(*, q: str = "", limit: int = 50) -> list[Conversation]:
    qs = Conversation.objects.filter(kind=Conversation.Kind.ROOM, is_public=True)
    q = (q or "").strip()
    if q:
        qs = qs.filter(Q(name__icontains=q) | Q(slug__icontains=q) | Q(topic__icontains=q))
    return list(qs.annotate(member_count=Count("memberships")).order_by("name")[:limit])


def member_list(*, user: User, conversation_id: int) -> list[dict]:
    membership_get(user=user, conversation_id=conversation_id)
    members = list(
        Membership.objects.filter(conversation_id=conversation_id)
        .select_related("user")
        .order_by("user__username")
    )
    online = presence.online_user_ids(user_ids=[m.user_id for m in members])
    return [{"membership": m, "user": m.user, "online": m.user_id in online} for m in members]


def notification_list(*, user: User, limit: int = 50) -> list[Notification]:
    return list(
        Notification.objects.filter(user=user)
        .select_related("conversation")
        .order_by("-created_at", "-id")[:limit]
    )


def notification_open_count(*, user: User) -> int:
    return Notification.objects.filter(user=user, closed_at__isnull=True).count()


# --- reads of the realtime service ------------------------------------------------


def conversation_member_counts(*, conversation_ids: list[int]) -> dict[int, int]:
    """How many members each conversation has (one grouped index scan)."""
    if not conversation_ids:
        return {}
    # Raw SQL: called on the WebSocket handshake path (see conversation_ids_for_user).
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT conversation_id, count(*) FROM {_table(Membership)} "  # noqa: S608
            "WHERE conversation_id = ANY(%s) GROUP BY conversation_id",
            [list(conversation_ids)],
        )
        return dict(cur.fetchall())


def _table(model) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def message_frames_between(
    *, conversation_id: int, after: int, before: int, limit: int
) -> list[tuple[int, int, str]]:
    """(seq, sender id, serialized frame) of messages with after < seq < before."""
    rows = messages_after(
        conversation_id=conversation_id, after=after, limit=min(limit, before - after - 1)
    )
    return [
        (m.seq, m.sender_id, events.dumps(events.message_frame(m))) for m in rows if m.seq < before
    ]


def resume_frames(
    *, user, conversation_id: int, after: int, limit: int
) -> tuple[list[tuple[int, str]], int, bool]:
    """Up to `limit` message frames after `after`, the conversation's last seq, and
    whether more messages remain. Raises NotFound for a non-member."""
    membership = membership_get(user=user, conversation_id=conversation_id)
    rows = messages_after(conversation_id=conversation_id, after=after, limit=limit + 1)
    more = len(rows) > limit
    last_seq = max(membership.conversation.last_seq, rows[-1].seq if rows else 0)
    rows = rows[:limit]
    return [(m.seq, events.dumps(events.message_frame(m))) for m in rows], last_seq, more
