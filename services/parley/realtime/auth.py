"""Who is on the other end of a WebSocket: the Origin check and authentication.

- A browser always sends Origin. One that is not an allowed host (ALLOWED_HOSTS, or an
  exact CSRF_TRUSTED_ORIGINS entry) is refused with 4403: another site's page must not
  ride on the user's session cookie (cross-site WebSocket hijacking).
- `Authorization: Bearer <token>` authenticates any client; a missing Origin is fine
  for it (non-browser clients send none).
- Otherwise the session cookie authenticates, and only with an allowed Origin present.
- Neither: 4401. The consumer accepts and then closes with the code, because a browser
  sees no close code for a refused handshake.

Lookups run on the realtime database threads, not channels' single thread-sensitive
one (AuthMiddlewareStack would serialize every handshake of the process on it). Bearer
tokens go through a short per-process cache and touch `last_used_at` in the background
(parley.realtime.tokens: a deleted token stops opening sockets within
REALTIME_TOKEN_CACHE_SECONDS, 5 s by default). The session cookie is read every time.
"""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import get_user
from django.http.cookie import parse_cookie
from django.http.request import validate_host

from parley.realtime import tokens
from parley.realtime.db import db


def origin_allowed(origin: str) -> bool:
    origin = origin.strip()
    if origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    try:
        parts = urlsplit(origin)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    if ":" in host:
        host = f"[{host}]"
    return validate_host(host, settings.ALLOWED_HOSTS)


def user_from_session(session_key: str):
    """The active user of a session, or None (Django's own get_user, with its checks)."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = get_user(SimpleNamespace(session=store))
    return user if user.is_authenticated and user.is_active else None


class RealtimeAuthMiddleware:
    """Sets scope["user"] (or None) and scope["parley_reject"] (4401/4403 or None).

    In the server's scope itself, not in a copy as ASGI middleware usually does: this
    coroutine lives as long as the socket, and so would the copy (about 0.8 KB per socket).
    The server reads nothing of these two keys.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            scope["user"], scope["parley_reject"] = await authenticate(scope)
        return await self.inner(scope, receive, send)


async def authenticate(scope) -> tuple[object | None, int | None]:
    """(user or None, close code or None) for a WebSocket handshake's scope."""
    origin = authorization = cookie = None
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"cookie":
            cookie = value.decode("latin-1")
    user, reject = None, None
    if origin is not None and not origin_allowed(origin):
        reject = 4403
    else:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            user = await tokens.user_from_token(token.strip())
        elif cookie and origin is not None:
            session_key = parse_cookie(cookie).get(settings.SESSION_COOKIE_NAME)
            if session_key:
                user = await db(user_from_session)(session_key)
        if user is None:
            reject = 4401
    return user, reject
