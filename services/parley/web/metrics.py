"""Prometheus metrics of the web service.

Gunicorn runs several worker processes; with PROMETHEUS_MULTIPROC_DIR set (`parley web`
sets it) every worker writes its samples there and /metrics aggregates them.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess

http_requests = Counter("parley_http_requests_total", "HTTP requests served", ["method", "status"])
http_latency = Histogram(
    "parley_http_request_duration_seconds",
    "HTTP request latency",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
messages_sent = Counter("parley_messages_created_total", "Messages committed", ["transport"])


def registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    return DEFAULT_REGISTRY
