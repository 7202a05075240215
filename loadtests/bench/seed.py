"""Users, tokens and rooms for the benchmark, written straight into its own database.

The benchmark owns its database, so it seeds with bulk inserts: thousands of users in a
second, where the API (which hashes a password per sign-up, by design) would take
minutes. The Locust scenarios, which run against deployments they do not own, create
their users through the API instead (loadtests/seed.py).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field


def setup_django(database_url: str, redis_url: str, prefix: str) -> None:
    """Configure Django in this process for the benchmark's database (plain connections)."""
    os.environ.update(
        DJANGO_SETTINGS_MODULE="parley.config.settings",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        CHANNEL_LAYER_URL=redis_url,
        CELERY_BROKER_URL=redis_url,
        CHANNEL_LAYER_PREFIX=prefix,
        DB_POOL="false",
        DEBUG="false",
        SECRET_KEY="loadtest-" + "k" * 60,
        ALLOWED_HOSTS="127.0.0.1",
    )
    import django

    django.setup()


@dataclass
class SeedUser:
    id: int
    username: str
    token: str


@dataclass
class SeedRoom:
    id: int
    slug: str
    members: list[SeedUser] = field(default_factory=list)


def create_users(prefix: str, n: int) -> list[SeedUser]:
    """n users with an unusable password and one bearer token each."""
    from django.contrib.auth.hashers import make_password

    from parley.accounts.models import ApiToken, User
    from parley.accounts.services import token_digest

    unusable = make_password(None)
    users = User.objects.bulk_create(
        [
            User(username=f"{prefix}-{i}", display_name=f"Load {prefix} {i}", password=unusable)
            for i in range(n)
        ],
        batch_size=1000,
    )
    raws = ["plt_" + secrets.token_urlsafe(32) for _ in users]
    ApiToken.objects.bulk_create(
        [ApiToken(user=u, digest=token_digest(raw)) for u, raw in zip(users, raws, strict=True)],
        batch_size=1000,
    )
    return [SeedUser(u.id, u.username, raw) for u, raw in zip(users, raws, strict=True)]


def create_rooms(prefix: str, groups: list[list[SeedUser]]) -> list[SeedRoom]:
    """One public room per group of users, every user of the group a member."""
    from parley.chat.models import Conversation, Membership

    rooms = Conversation.objects.bulk_create(
        [
            Conversation(
                kind=Conversation.Kind.ROOM,
                name=f"Load {prefix} {i}",
                slug=f"{prefix}-{i}",
                is_public=True,
                created_by_id=group[0].id if group else None,
            )
            for i, group in enumerate(groups)
        ]
    )
    Membership.objects.bulk_create(
        [
            Membership(conversation=room, user_id=user.id)
            for room, group in zip(rooms, groups, strict=True)
            for user in group
        ],
        batch_size=2000,
    )
    return [
        SeedRoom(room.id, room.slug, list(group)) for room, group in zip(rooms, groups, strict=True)
    ]


def last_seqs(conversation_ids: list[int]) -> dict[int, int]:
    from parley.chat.models import Conversation

    return dict(Conversation.objects.filter(id__in=conversation_ids).values_list("id", "last_seq"))


def history(conversation_ids: list[int], after: dict[int, int]) -> dict[int, list[tuple[int, str]]]:
    """(seq, client_id) of every message after `after[conversation]`, by conversation."""
    from django.db.models import Q

    from parley.chat.models import Message

    if not conversation_ids:
        return {}
    q = Q()
    for cid in conversation_ids:
        q |= Q(conversation_id=cid, seq__gt=after.get(cid, 0))
    out: dict[int, list[tuple[int, str]]] = {cid: [] for cid in conversation_ids}
    rows = Message.objects.filter(q).order_by("conversation_id", "seq")
    for cid, seq, client_id in rows.values_list("conversation_id", "seq", "client_id").iterator(
        chunk_size=5000
    ):
        out[cid].append((seq, client_id))
    return out


def backend_pids(database: str) -> list[int]:
    """Postgres backends connected to the benchmark's database (for their CPU time)."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [database],
        )
        return [r[0] for r in cur.fetchall()]


def close_connections() -> None:
    from django.db import connections

    connections.close_all()
