"""Tunables of the realtime service, read from the environment.

Each may also be set in Django settings under the same name (settings win), so that the
defaults stay next to the code that depends on them.
"""

from __future__ import annotations

import os
import socket

from django.conf import settings

from parley.knobs import knob_float as _float
from parley.knobs import knob_int as _int
from parley.knobs import knob_str as _str


def node_id() -> str:
    """PARLEY_NODE_ID (the pod name in Kubernetes), else hostname-pid."""
    return settings.PARLEY_NODE_ID or f"{socket.gethostname()}-{os.getpid()}"


# Graceful drain: on SIGTERM, sockets are closed with 1012 spread over this window, so
# that clients do not all reconnect to the other replicas in the same instant.
DRAIN_SECONDS = _float("REALTIME_DRAIN_SECONDS", 10.0)
# Hard cap from SIGTERM to exit (keep it under terminationGracePeriodSeconds).
GRACE_SECONDS = _float("REALTIME_GRACE_SECONDS", 25.0)
# Each shutdown step that talks to Redis or Postgres (flushing delivery receipts) gets
# this long; Redis and Postgres may be stopping at the same time as the replica.
SHUTDOWN_STEP_SECONDS = 3.0
# Once the server has shut down, threads still blocked in a Redis or Postgres call (a
# host that stopped answering, a lock) get this long before the process exits anyway.
EXIT_WAIT_SECONDS = 3.0
# After the channel layer lost its Redis connection, the node's sockets may have missed
# events: they are closed with 1011 spread over this window and resume elsewhere/here.
RESYNC_SECONDS = _float("REALTIME_RESYNC_SECONDS", 3.0)
# WebSocket protocol pings keep idle sockets alive through proxies and find dead peers.
WS_PING_INTERVAL = _float("REALTIME_WS_PING_INTERVAL", 20.0)
WS_PING_TIMEOUT = _float("REALTIME_WS_PING_TIMEOUT", 20.0)
WS_MAX_SIZE = 65536

# Presence: sockets' entries are refreshed every HEARTBEAT seconds and live
# chat.presence.PRESENCE_TTL seconds; every node sweeps for lapsed entries every SWEEP
# seconds, so a dead node's users are announced offline within TTL + SWEEP < 30 s.
PRESENCE_HEARTBEAT_SECONDS = _float("REALTIME_PRESENCE_HEARTBEAT_SECONDS", 8.0)
PRESENCE_SWEEP_SECONDS = _float("REALTIME_PRESENCE_SWEEP_SECONDS", 3.0)
# A socket closed by the server (drain, resync) keeps its presence this long, so that a
# client that reconnects elsewhere does not flap offline/online.
PRESENCE_RECONNECT_GRACE_SECONDS = _float("REALTIME_PRESENCE_RECONNECT_GRACE_SECONDS", 10.0)
# Presence changes are broadcast to conversations of at most this many members (every
# direct conversation, small rooms); larger rooms show presence through the members API.
PRESENCE_MAX_MEMBERS = _int("PARLEY_PRESENCE_MAX_MEMBERS", 200)
# Sockets opened within this window have their presence recorded and announced together
# (Node.socket_online): "online" reaches members up to this much later.
PRESENCE_BATCH_SECONDS = _float("REALTIME_PRESENCE_BATCH_SECONDS", 0.05)

TYPING_THROTTLE_SECONDS = _float("REALTIME_TYPING_THROTTLE_SECONDS", 2.5)
# How long a socket holds a message that arrived ahead of a missing seq before it reads
# the missing ones from Postgres. Two processes' publishes of consecutive seqs often
# cross by a few ms; under load a fifth of deliveries waited here, so the wait is short
# (a read, once per node and gap, costs less than the latency it saves).
GAP_WAIT_SECONDS = _float("REALTIME_GAP_WAIT_SECONDS", 0.05)
RESUME_MAX = 500
# Sends a socket may have queued (committed one by one) before it stops reading frames.
MAX_QUEUED_SENDS = _int("REALTIME_MAX_QUEUED_SENDS", 32)


# Connections (per replica) the event loop uses itself for sends and handshake reads,
# beside the DB_POOL_MAX_SIZE of the database threads (parley.realtime.pg). 0: those go
# through the threads like every other ORM call.
def async_db_connections() -> int:
    return max(0, _int("REALTIME_ASYNC_DB_CONNECTIONS", 4))


# Those connections prepare a statement once it ran this many times (psycopg's
# prepare_threshold): Postgres then neither parses nor plans the send statement again,
# which halves its CPU per message (docs/benchmarks.md, session 13). "off" behind a
# transaction-mode pooler without prepared-statement support (PgBouncer before 1.21).
# Django's own connections keep its default (never).
def async_db_prepare_threshold() -> int | None:
    raw = _str("REALTIME_ASYNC_DB_PREPARE_THRESHOLD", "1").strip().lower()
    return None if raw in ("off", "none", "never") else max(0, int(raw))


# Events queued for a socket whose client does not read before it is closed with 1013.
SLOW_SOCKET_BACKLOG = _int("REALTIME_SLOW_SOCKET_BACKLOG", 2000)
# Per-socket budget for frames other than `send` (token bucket): burst and refill per s.
FRAME_BURST = _int("REALTIME_FRAME_BURST", 200)
FRAME_RATE = _float("REALTIME_FRAME_RATE", 50.0)
# Channel-layer probe: each node publishes to itself this often; no echo within
# PROBE_TIMEOUT marks the layer unhealthy (/readyz 503), and its return triggers a resync.
PROBE_INTERVAL_SECONDS = _float("REALTIME_PROBE_INTERVAL_SECONDS", 2.0)
PROBE_TIMEOUT_SECONDS = _float("REALTIME_PROBE_TIMEOUT_SECONDS", 6.0)


# Bearer tokens: token -> user is cached per process for this long (keyed by the token's
# SHA-256, never the token), so a reconnect storm does not read Postgres per socket. A
# deleted token or a deactivated user is refused by new handshakes within this TTL (open
# sockets are not closed). 0 turns the cache off. Read per handshake.
def token_cache_seconds() -> float:
    return _float("REALTIME_TOKEN_CACHE_SECONDS", 5.0)


def token_cache_size() -> int:
    return _int("REALTIME_TOKEN_CACHE_SIZE", 10_000)


# last_used_at of the tokens that authenticated sockets is written in one batched UPDATE
# this long after the first handshake that needs it (at most once a minute per token).
TOKEN_TOUCH_FLUSH_SECONDS = _float("REALTIME_TOKEN_TOUCH_FLUSH_SECONDS", 1.0)


def db_threads() -> int:
    """Threads for ORM calls: one per pooled database connection."""
    pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool")
    if isinstance(pool, dict) and pool.get("max_size"):
        return int(pool["max_size"])
    return _int("DB_POOL_MAX_SIZE", 10)
