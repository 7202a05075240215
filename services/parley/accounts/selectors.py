"""Reads for accounts: token lookup."""

from __future__ import annotations

import functools
from datetime import datetime

from django.db import DEFAULT_DB_ALIAS, connection
from django.utils import timezone

from parley.accounts.models import ApiToken, User
from parley.accounts.services import token_digest, token_touch_due


def token_by_digest(*, digest: str) -> tuple[int, datetime | None, User] | None:
    """(token id, last_used_at, active user) of the token with this SHA-256, or None.

    One SELECT; writes nothing (the realtime service touches last_used_at in batches).
    """
    # Raw SQL: every WebSocket handshake with a token comes here, and compiling the ORM
    # query (select_related) cost more than Postgres answering it.
    with connection.cursor() as cur:
        cur.execute(token_sql(), [digest])
        row = cur.fetchone()
    return None if row is None else token_from_row(row)


def token_from_row(row) -> tuple[int, datetime | None, User]:
    """`token_by_digest`'s result from a row of `token_sql()` (read by any cursor)."""
    return row[0], row[1], User.from_db(DEFAULT_DB_ALIAS, _user_fields(), row[2:])


@functools.cache
def _user_fields() -> list[str]:
    return [f.attname for f in User._meta.concrete_fields]


@functools.cache
def token_sql() -> str:
    """The token lookup: one parameter, the digest (pyformat, for any psycopg cursor)."""
    return _token_query("", "t.digest = %s")


@functools.cache
def tokens_sql() -> str:
    """The lookup of several tokens at once: one parameter, a list of digests. Each row
    is the digest followed by a row of `token_sql()`."""
    return _token_query("t.digest, ", "t.digest = ANY(%s::text[])")


def _token_query(first: str, where: str) -> str:
    qn = connection.ops.quote_name
    columns = ", ".join(f"u.{qn(f.column)}" for f in User._meta.concrete_fields)
    return (
        f"SELECT {first}t.id, t.last_used_at, {columns} "  # noqa: S608 - names are ours
        f"FROM {qn(ApiToken._meta.db_table)} t JOIN {qn(User._meta.db_table)} u "
        f"ON u.{qn(User._meta.pk.column)} = t.user_id "
        f"WHERE {where} AND u.is_active"
    )


def user_from_token(*, token: str) -> User | None:
    """The active user a bearer token belongs to, or None."""
    if not token or len(token) > 200:
        return None
    found = token_by_digest(digest=token_digest(token))
    if found is None:
        return None
    token_id, last_used_at, user = found
    now = timezone.now()
    # At most once a minute: a hot read path should not write.
    if token_touch_due(last_used_at, now):
        ApiToken.objects.filter(pk=token_id).update(last_used_at=now)
    return user
