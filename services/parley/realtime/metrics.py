"""Prometheus metrics of the realtime service (one process per pod: the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

connections = Gauge("parley_ws_connections", "Open, authenticated WebSocket connections")
handshakes = Counter(
    "parley_ws_handshakes_total",
    "WebSocket handshakes by outcome",
    ["outcome"],  # accepted, unauthenticated, forbidden_origin, draining
)
closes = Counter("parley_ws_server_closes_total", "Sockets closed by the server", ["code"])
frames_in = Counter("parley_ws_frames_in_total", "Frames received, by type", ["type"])
frames_out = Counter("parley_ws_frames_out_total", "Frames sent, by type", ["type"])
errors = Counter("parley_ws_errors_total", "Error frames sent, by code", ["code"])
send_ack_seconds = Histogram(
    "parley_ws_send_ack_seconds",
    "From a `send` frame's arrival to its `ack` (validation, rate limit, commit)",
    buckets=LATENCY_BUCKETS,
)
delivery_seconds = Histogram(
    "parley_ws_delivery_seconds",
    "From a message's publication (its creation if the event carries no publish time) to "
    "the write of its frame to a recipient's socket",
    buckets=LATENCY_BUCKETS,
)
gap_fills = Counter(
    "parley_ws_gap_fills_total",
    "Messages a socket read from Postgres because their live event was late or lost",
)
resyncs = Counter(
    "parley_layer_resyncs_total",
    "Times the node closed its sockets because the channel layer may have lost events",
    ["reason"],
)
layer_healthy = Gauge("parley_layer_healthy", "1 while the node's channel-layer probe echoes")
presence_changes = Counter(
    "parley_presence_changes_total", "Presence changes announced by this node", ["status"]
)
deliveries_recorded = Counter(
    "parley_delivery_receipts_recorded_total",
    "Coalesced delivery receipts handed to chat.receipts.record_delivery",
)

# Hot-path children, bound once: `labels()` costs a lock and a tuple per call, and these
# are on the path of every frame received or written.
FRAMES_OUT_MESSAGE = frames_out.labels("message")
HANDSHAKES_ACCEPTED = handshakes.labels("accepted")


def _bound_children(metric):
    """`kind -> metric.labels(kind)`, each child made once (the kinds are the protocol's
    frame types: a bounded set)."""
    children: dict = {}

    def child(kind: str):
        found = children.get(kind)
        if found is None:
            found = children[kind] = metric.labels(kind)
        return found

    return child


frames_in_of = _bound_children(frames_in)
frames_out_of = _bound_children(frames_out)
