"""Readiness checks shared by the web and realtime services: do Postgres and Redis answer?"""

from __future__ import annotations

from django.db import connection

from parley.chat.ratelimit import redis_client


def check_dependencies() -> dict[str, str]:
    """{"database": "ok"|"error: …", "redis": "ok"|"error: …"}; never raises."""
    checks = {}
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        redis_client().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}"
    return checks
