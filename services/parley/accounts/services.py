"""Writes for accounts: sign-up and tokens."""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import password_validation
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction

from parley.accounts.models import ApiToken, User
from parley.chat.errors import BadRequest, Conflict, Forbidden

USERNAME_MAX = 150
# A token's last_used_at is written at most this often (a hot read path should not write).
TOUCH_EVERY_SECONDS = 60


def token_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def token_touch_due(last_used_at: datetime | None, now: datetime) -> bool:
    return last_used_at is None or (now - last_used_at).total_seconds() > TOUCH_EVERY_SECONDS


def tokens_touch(*, token_ids: Iterable[int], now: datetime) -> int:
    """Set last_used_at = now on these tokens, skipping those touched within the minute.

    One UPDATE for any number of tokens. Returns how many rows it wrote.
    """
    ids = sorted(set(token_ids))  # a stable lock order for concurrent batches
    if not ids:
        return 0
    # One array parameter, not the ORM's IN (%s, %s, ...): after a reconnect storm the
    # batch holds thousands of ids, and splitting that query on the client cost the
    # realtime process more than Postgres running it (docs/benchmarks.md, session 13).
    with connection.cursor() as cur:
        cur.execute(_touch_sql(), [now, ids, now - timedelta(seconds=TOUCH_EVERY_SECONDS)])
        return cur.rowcount


@functools.cache
def _touch_sql() -> str:
    qn = connection.ops.quote_name
    return (
        f"UPDATE {qn(ApiToken._meta.db_table)} SET last_used_at = %s "  # noqa: S608 - ours
        "WHERE id = ANY(%s) AND (last_used_at IS NULL OR last_used_at < %s)"
    )


def token_create(*, user: User) -> str:
    """Create a bearer token and return it; only its digest is kept."""
    raw = "plt_" + secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, digest=token_digest(raw))
    return raw


def user_create(*, username: str, password: str, display_name: str = "", email: str = "") -> User:
    """Sign up a user, validating the username and password like the admin does."""
    if not settings.PARLEY_ALLOW_SIGNUP:
        raise Forbidden("Sign-up is disabled on this server.")
    username = username.strip()
    user = User(username=username, display_name=display_name.strip(), email=email.strip())
    try:
        user.full_clean(exclude=["password"])
    except ValidationError as exc:
        if "username" in exc.error_dict and any(
            e.code == "unique" for e in exc.error_dict["username"]
        ):
            raise Conflict("That username is taken.") from None
        raise BadRequest(_flatten(exc)) from None
    try:
        password_validation.validate_password(password, user)
    except ValidationError as exc:
        raise BadRequest("password: " + " ".join(exc.messages)) from None
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:
        raise Conflict("That username is taken.") from None
    return user


def _flatten(exc: ValidationError) -> str:
    return "; ".join(
        f"{field}: {' '.join(str(m) for m in messages)}"
        for field, messages in exc.message_dict.items()
    )
