"""Frames only the realtime service produces (hello, ack, error, pong, resumed, typing,
presence). Frames that other services also publish (message, receipt, membership) are
built in parley.chat.events. docs/protocol.md is the catalogue of both.
"""

from __future__ import annotations

import struct
from typing import Any

from parley.chat import events

# A private ASGI extension of `parley realtime`'s WebSocket protocol (server.py): the
# scope's extensions list it, and a `{"type": WIRE_SEND, "bytes": ...}` message writes
# ready-made WebSocket frames as they are. A node frames a broadcast once and every
# local socket writes the same bytes (one write for all of a flush's receipt frames).
WIRE_EXTENSION = "parley.wire"
WIRE_SEND = "parley.wire.send"


def wire_text(text: str) -> bytes:
    """`text` as one unmasked, unfragmented WebSocket text frame (RFC 6455 5.2), as a
    server sends it without extensions (permessage-deflate is off)."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + data
    return struct.pack("!BBQ", 0x81, 127, n) + data


PONG = events.dumps({"type": "pong"})

# SPEC's error codes; domain codes outside it are reported as bad_request.
ERROR_CODES = frozenset(
    {"bad_request", "forbidden", "not_found", "too_long", "rate_limited", "unavailable"}
)


def hello(*, user, node: str, conversations: list[tuple[int, int]]) -> str:
    return events.dumps(
        {
            "type": "hello",
            "user": events.user_json(user),
            "node": node,
            "conversations": [{"id": cid, "last_seq": last} for cid, last in conversations],
        }
    )


def ack(*, client_id: str, conversation_id: int, seq: int, message_id: int) -> str:
    return events.dumps(
        {
            "type": "ack",
            "client_id": client_id,
            "conversation": conversation_id,
            "seq": seq,
            "id": message_id,
        }
    )


def error(code: str, detail: str, client_id: Any = None) -> str:
    if code not in ERROR_CODES:
        code = "bad_request"
    frame: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if isinstance(client_id, str):
        frame["client_id"] = client_id
    return events.dumps(frame)


def resumed(*, conversation_id: int, last_seq: int, more: bool) -> str:
    return events.dumps(
        {"type": "resumed", "conversation": conversation_id, "last_seq": last_seq, "more": more}
    )


# --- channel-layer events for the frames above that are broadcast -----------------------


def typing_event(*, conversation_id: int, user) -> dict[str, Any]:
    frame = {"type": "typing", "conversation": conversation_id, "user": events.user_json(user)}
    return {
        "type": "chat.frame",
        "kind": "typing",
        "conversation": conversation_id,
        "sender": user.id,
        "frame": events.dumps(frame),
    }


def presence_event(*, conversation_id: int, user_ids: list[int], status: str) -> dict[str, Any]:
    """Users of one conversation who came online (or went offline) together: one event,
    one `presence` frame per user (ChatConsumer.chat_presence)."""
    return {
        "type": "chat.presence",
        "conversation": conversation_id,
        "status": status,
        "users": user_ids,
        "frames": [
            events.dumps({"type": "presence", "user": user_id, "status": status})
            for user_id in user_ids
        ],
    }


def probe_event(*, node: str, n: int) -> dict[str, Any]:
    return {"type": "rt.probe", "node": node, "n": n}
