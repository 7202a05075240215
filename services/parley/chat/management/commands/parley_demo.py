"""`parley manage parley_demo`: the demo user and the public room Lobby, for `parley dev`.

Idempotent: run it again and it changes nothing, except that it makes the demo user's
password the one given (so the login `parley dev` prints always works).
"""

from __future__ import annotations

import contextlib
import os
import secrets

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from parley.accounts.models import User
from parley.chat import services
from parley.chat.errors import Conflict, DomainError
from parley.chat.models import Conversation

ROOM_NAME = "Lobby"
ROOM_SLUG = "lobby"
ROOM_TOPIC = "Say hello: everyone who joins Parley can find this room."


class Command(BaseCommand):
    help = (
        "Create the demo user and the public room Lobby (slug lobby) with the demo user in "
        "it. Safe to run again."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default="demo", help="default: %(default)s")
        parser.add_argument(
            "--password",
            help="the demo user's password (default: $PARLEY_DEMO_PASSWORD; without either, "
            "a new random password is set and printed)",
        )

    def handle(self, *args, username: str, password: str | None, **options) -> None:
        password = password or os.environ.get("PARLEY_DEMO_PASSWORD") or ""
        generated = not password
        if generated:
            password = secrets.token_urlsafe(12)

        with transaction.atomic():
            user, created = User.objects.select_for_update().get_or_create(
                username=username, defaults={"display_name": "Demo"}
            )
            if created or not user.check_password(password):
                user.set_password(password)
                user.save(update_fields=["password"])

        try:
            if not Conversation.objects.filter(
                kind=Conversation.Kind.ROOM, slug=ROOM_SLUG
            ).exists():
                # Conflict: created by someone else meanwhile; joined below.
                with contextlib.suppress(Conflict):
                    services.room_create(
                        creator=user, name=ROOM_NAME, slug=ROOM_SLUG, topic=ROOM_TOPIC
                    )
            services.room_join(user=user, slug=ROOM_SLUG)
        except DomainError as exc:
            raise CommandError(f"room {ROOM_SLUG!r}: {exc.detail}") from None

        self.stdout.write(
            f"demo user {username!r} {'created' if created else 'ready'}, "
            f"member of the public room {ROOM_NAME!r} (/{ROOM_SLUG})"
        )
        if generated:
            self.stdout.write(f"password: {password}")
