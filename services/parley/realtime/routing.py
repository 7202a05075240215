"""ASGI routing of the realtime service.

- websocket `/ws/chat/`: RealtimeAuthMiddleware (Origin check, session or bearer) ->
  ChatConsumer. Other paths are refused at the handshake.
- http: /healthz, /readyz, /metrics (parley.realtime.http).
- lifespan: starts this process' Node (presence heartbeat, sweeps, layer probe) and
  stops it on shutdown.
"""

from __future__ import annotations

import logging

from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path, re_path

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


websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi()),
    re_path(r"", refuse_websocket),
]


def build_application(django_asgi_app=None):
    """The ASGI application. `django_asgi_app` (whose import sets Django up) is unused:
    the realtime process serves no pages."""
    return ProtocolTypeRouter(
        {
            "http": http_app,
            "websocket": RealtimeAuthMiddleware(URLRouter(websocket_urlpatterns)),
            "lifespan": lifespan,
        }
    )
