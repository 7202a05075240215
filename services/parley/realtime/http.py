"""The realtime process' own HTTP routes: /healthz, /readyz, /metrics.

Plain ASGI (no Django request cycle): probes and scrapes stay cheap and keep answering
while the process is busy with sockets. Anything else is 404; pages are the web
service's.
"""

from __future__ import annotations

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from parley.realtime.db import db
from parley.realtime.node import current_node


async def _respond(send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _json(send, status: int, payload: dict) -> None:
    await _respond(send, status, orjson.dumps(payload), b"application/json")


def _dependencies() -> dict[str, str]:
    from parley.health import check_dependencies

    return check_dependencies()


async def http_app(scope, receive, send) -> None:
    path = scope["path"].rstrip("/") or "/"
    if scope["method"] not in ("GET", "HEAD"):
        await _json(send, 405, {"error": "method_not_allowed", "detail": "GET only."})
        return
    node = current_node()
    if path == "/healthz":
        await _json(send, 200, {"status": "ok", "node": node.id if node else None})
    elif path == "/readyz":
        checks = await db(_dependencies)()
        if node is not None:
            checks["channel_layer"] = "ok" if node.layer_healthy else "error: no probe echo"
            if node.draining:
                checks["draining"] = "error: draining"
        ok = all(v == "ok" for v in checks.values())
        await _json(send, 200 if ok else 503, {"status": "ok" if ok else "unavailable", **checks})
    elif path == "/metrics":
        await _respond(send, 200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST.encode())
    else:
        await _json(send, 404, {"error": "not_found", "detail": "No such route."})
