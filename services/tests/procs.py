"""Targets for child processes started by tests. No Django import at module level: a
spawned child imports this module before it has set Django up."""

from __future__ import annotations

import os


def setup_django(db_name: str) -> None:
    import django
    from django.conf import settings

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.config.settings")
    django.setup()
    settings.DATABASES["default"]["NAME"] = db_name
    from django.db import connections

    connections.close_all()


def send_many(db_name: str, conversation_id: int, user_ids: list[int], n: int, tag: str) -> None:
    """Send n messages round-robin from user_ids; retry every third with the same client_id."""
    setup_django(db_name)
    from parley.accounts.models import User
    from parley.chat import services

    users = list(User.objects.filter(id__in=user_ids))
    for i in range(n):
        sender = users[i % len(users)]
        for _ in range(2 if i % 3 == 0 else 1):
            services.message_create(
                sender=sender,
                conversation_id=conversation_id,
                body=f"{tag}-{i}",
                client_id=f"{tag}-{i}",
            )
