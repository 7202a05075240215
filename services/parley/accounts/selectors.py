"""Reads for accounts: token lookup."""

from __future__ import annotations

from django.utils import timezone

from parley.accounts.models import ApiToken, User
from parley.accounts.services import token_digest


def user_from_token(*, token: str) -> User | None:
    """The active user a bearer token belongs to, or None."""
    if not token or len(token) > 200:
        return None
    row = (
        ApiToken.objects.select_related("user")
        .filter(digest=token_digest(token), user__is_active=True)
        .first()
    )
    if row is None:
        return None
    now = timezone.now()
    # Touch last_used_at at most once a minute: a hot read path should not write.
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
    return row.user
