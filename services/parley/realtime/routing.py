"""ASGI routing of the realtime service.

- websocket `/ws/chat/`: RealtimeAuthMiddleware (Origin check, session or bearer) ->
  ChatConsumer. Other paths are refused at the handshake.

The two routers are channels' ProtocolTypeRouter and URLRouter, but they return the
application's awaitable instead of awaiting it in a coroutine of their own: an open
socket kept both coroutines, and URLRouter's copy of the scope, for its whole life (about
1.5 KB per socket, `python -m loadtests.bench.memprofile`).
- http: /healthz, /readyz, /metrics (parley.realtime.http).
- lifespan: starts this process' Node (presence heartbeat, sweeps, layer probe) and
  stops it on shutdown.
"""

from __future__ import annotations

import logging

from asgiref.sync import markcoroutinefunction

from parley.realtime.auth import RealtimeAuthMiddleware
from parley.realtime.consumers import ChatConsumer
from parley.realtime.http import http_app
from parley.realtime.node import get_node

logger = logging.getLogger(__name__)


async def refuse_websocket(scope, receive, send) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008})


async def lifespan(scope, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await get_node().start()
            except Exception as exc:
                logger.exception("realtime node failed to start")
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await get_node().stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


CHAT_PATH = "ws/chat/"


class ProtocolRouter:
    """scope["type"] -> application (ProtocolTypeRouter's contract)."""

    def __init__(self, applications: dict) -> None:
        self.applications = applications

    @markcoroutinefunction  # an ASGI 3 application to servers and asgiref alike
    def __call__(self, scope, receive, send):
        application = self.applications.get(scope["type"])
        if application is None:
            raise ValueError(f"No application configured for scope type {scope['type']!r}")
        return application(scope, receive, send)


@markcoroutinefunction
def websocket_router(scope, receive, send):
    """`/ws/chat/` -> a ChatConsumer; any other path is refused (as URLRouter did with
    path("ws/chat/") and a catch-all: the path without root_path and leading slashes)."""
    path = scope["path"]
    root_path = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    if path.lstrip("/") == CHAT_PATH:
        return ChatConsumer()(scope, receive, send)
    return refuse_websocket(scope, receive, send)


def build_application(django_asgi_app=None):
    """The ASGI application. `django_asgi_app` (whose import sets Django up) is unused:
    the realtime process serves no pages."""
    return ProtocolRouter(
        {
            "http": http_app,
            "websocket": RealtimeAuthMiddleware(websocket_router),
            "lifespan": lifespan,
        }
    )
