"""The worker's knobs, from the environment (read when used, so tests can change them).

Each reads a Django setting of the same name first, if settings.py defines one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from parley.knobs import knob_float, knob_int, knob_str


def email_max_retries() -> int:
    return knob_int("PARLEY_EMAIL_MAX_RETRIES", 5)


def email_retry_backoff() -> float:
    """Seconds before the first retry of a refused email; doubles each time."""
    return knob_float("PARLEY_EMAIL_RETRY_BACKOFF", 30)


def email_retry_backoff_max() -> float:
    # Keep well under the broker's visibility timeout (CELERY_VISIBILITY_TIMEOUT).
    return knob_float("PARLEY_EMAIL_RETRY_BACKOFF_MAX", 300)


def metrics_port() -> int:
    """Port of the worker's /metrics, /healthz and /readyz; 0 disables the server."""
    return knob_int("WORKER_METRICS_PORT", 9808)


def heartbeat_file() -> Path:
    default = Path(tempfile.gettempdir()) / "parley-worker.heartbeat"
    return Path(knob_str("WORKER_HEARTBEAT_FILE", str(default)))


def heartbeat_interval() -> float:
    return knob_float("WORKER_HEARTBEAT_SECONDS", 10)


def liveness_max_age() -> float:
    """A heartbeat older than this means the worker stopped consuming. Keep it above
    the longest task (60 s) plus the heartbeat interval: with every pool process busy,
    the heartbeat waits for one to be free."""
    return knob_float("WORKER_LIVENESS_MAX_AGE", 120)


def sweep_interval() -> float:
    """How often (seconds) one worker looks for staged receipts whose flush was lost."""
    return knob_float("PARLEY_RECEIPT_SWEEP_SECONDS", 30)


def db_conn_max_age() -> int:
    """Seconds a pool process keeps its Postgres connection between tasks."""
    return knob_int("WORKER_DB_CONN_MAX_AGE", 60)
