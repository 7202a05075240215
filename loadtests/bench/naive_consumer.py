"""The benchmark's `naive` configuration: the Channels tutorial's design, speaking just
enough of Parley's protocol for the load generator. Benchmark-only code, not the product.

What the tutorial does, and so what this does:
- a plain `AsyncJsonWebsocketConsumer` (channels' own `dispatch`, with its hop through
  the thread-sensitive thread per event; `json` for every frame in and out);
- on connect, one channel-layer group per conversation of the user, read with the ORM
  through `database_sync_to_async` (thread-sensitive: one ORM thread per process);
- on `send`: the message is saved (`database_sync_to_async`), the sender gets its `ack`,
  then the message dict is `group_send` to the conversation's group; each member's
  consumer serializes it and writes the `message` frame (one `json.dumps` per recipient);
- no ordering buffer, no gap fill, no resume, no delivery or read receipts, no presence,
  typing or membership events, no node (probe, drain, resync), no rate limit;
- served by plain uvicorn on the asyncio loop with h11 and uvicorn's default WebSocket
  protocol (loadtests.bench.topology.naive_realtime_argv), with the core
  `RedisChannelLayer` (CHANNEL_LAYER_BACKEND=core, in NAIVE_ENV).

Kept from Parley, so that the generator can use it and the figures stay checkable:
- authentication: parley.realtime.auth's middleware (bearer token or session cookie with
  an Origin check; 4401/4403), as AuthMiddlewareStack would be; NAIVE_ENV turns its
  token cache off, so every handshake reads the token;
- the save: parley.chat.services.message_create, so seqs have no gap and the ack follows
  the commit. That service also publishes its own event on commit, to Parley's
  `conv.<id>` group: nobody listens to it in this process (its groups are `chat_<id>`), so
  it costs one channel-layer call to an empty group per message, and nothing else.

Frames: `hello`, `ack`, `message`, `error` (bad_request, not_found, too_long...), `pong`.
Any other client frame type gets an `error` frame (bad_request); the socket stays open.
"""

from __future__ import annotations

import logging
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.config.settings")

django_asgi_app = get_asgi_application()  # sets Django up: import models after this

from channels.db import database_sync_to_async  # noqa: E402
from channels.generic.websocket import AsyncJsonWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from parley.chat import events, services  # noqa: E402
from parley.chat.errors import DomainError  # noqa: E402
from parley.chat.models import Conversation, Membership  # noqa: E402
from parley.realtime import conf  # noqa: E402
from parley.realtime.auth import RealtimeAuthMiddleware  # noqa: E402

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401


def group_name(conversation_id: int) -> str:
    return f"chat_{conversation_id}"


@database_sync_to_async
def conversation_ids(user_id: int) -> list[int]:
    return list(
        Membership.objects.filter(user_id=user_id)
        .order_by("conversation_id")
        .values_list("conversation_id", flat=True)
    )


@database_sync_to_async
def last_seqs(ids: list[int]) -> dict[int, int]:
    return dict(Conversation.objects.filter(id__in=ids).values_list("id", "last_seq"))


@database_sync_to_async
def save_message(user, conversation_id, body, client_id):
    """Commit the message (Parley's service: seq assignment, client_id idempotency)."""
    message, created = services.message_create(
        sender=user, conversation_id=conversation_id, body=body, client_id=client_id
    )
    return message, created


class NaiveChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        self.user = None
        self.groups_joined = []
        reject = self.scope.get("parley_reject")
        user = self.scope.get("user")
        if reject is None and (user is None or not user.is_authenticated):
            reject = CLOSE_UNAUTHENTICATED
        if reject is not None:
            # Accept, then close: a browser only sees a close code after a handshake.
            await self.accept()
            await self.close(code=reject)
            return
        self.user = user
        ids = await conversation_ids(user.id)
        for cid in ids:
            await self.channel_layer.group_add(group_name(cid), self.channel_name)
            self.groups_joined.append(group_name(cid))
        # Read after joining: a message committed after this read reaches the socket.
        seqs = await last_seqs(ids)
        await self.accept()
        await self.send_json(
            {
                "type": "hello",
                "user": events.user_json(user),
                "node": conf.node_id(),
                "conversations": [{"id": cid, "last_seq": seqs.get(cid, 0)} for cid in ids],
            }
        )

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        if getattr(self, "user", None) is None:
            return
        try:
            content = await self.decode_json(text_data) if text_data is not None else None
        except ValueError:
            content = None
        if not isinstance(content, dict):
            await self.send_error("bad_request", "Frames must be JSON objects.")
            return
        await self.receive_json(content)

    async def receive_json(self, content, **kwargs):
        ftype = content.get("type")
        if ftype == "send":
            await self.on_send(content)
        elif ftype == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self.send_error(
                "bad_request",
                "Unknown or unsupported frame type.",
                content.get("client_id"),
            )

    async def on_send(self, content):
        conversation_id = content.get("conversation")
        client_id = content.get("client_id")
        if type(conversation_id) is not int or not isinstance(client_id, str):
            await self.send_error(
                "bad_request", "conversation and client_id are required.", client_id
            )
            return
        try:
            message, created = await save_message(
                self.user, conversation_id, content.get("body"), client_id
            )
        except DomainError as exc:
            await self.send_error(exc.code, exc.detail, client_id)
            return
        except Exception:
            logger.exception("send failed")
            await self.send_error("unavailable", "The message was not saved.", client_id)
            return
        await self.send_json(
            {
                "type": "ack",
                "client_id": client_id,
                "conversation": conversation_id,
                "seq": message.seq,
                "id": message.id,
            }
        )
        if created:  # a retried client_id was broadcast the first time
            await self.channel_layer.group_send(
                group_name(conversation_id),
                {"type": "chat.message", "message": events.message_json(message, self.user)},
            )

    async def chat_message(self, event):
        await self.send_json({"type": "message", **event["message"]})

    async def send_error(self, code, detail, client_id=None):
        frame = {"type": "error", "code": code, "detail": detail}
        if isinstance(client_id, str):
            frame["client_id"] = client_id
        await self.send_json(frame)


application = ProtocolTypeRouter(
    {
        # Parley's Django app: its /healthz, /readyz and /metrics answer the bench's probes.
        "http": django_asgi_app,
        "websocket": RealtimeAuthMiddleware(
            URLRouter([path("ws/chat/", NaiveChatConsumer.as_asgi())])
        ),
    }
)
