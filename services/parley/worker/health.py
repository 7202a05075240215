"""Liveness and readiness of a worker, for probes.

    python -m parley.worker.health --liveness    # exit 0 while the worker consumes
    python -m parley.worker.health --readiness   # exit 0 while Postgres and Redis answer

Liveness reads the heartbeat file that only a consuming worker keeps fresh (see
runtime.py), so it needs neither Django nor the network and answers in milliseconds.
The same checks are served by the worker at /healthz and /readyz on WORKER_METRICS_PORT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from parley.worker import conf


def liveness() -> tuple[bool, dict]:
    from parley.worker.runtime import heartbeat_age

    age = heartbeat_age()
    limit = conf.liveness_max_age()
    if age is None:
        return False, {
            "status": "unavailable",
            "detail": "no heartbeat yet",
            "heartbeat_file": str(conf.heartbeat_file()),
        }
    ok = age <= limit
    return ok, {"status": "ok" if ok else "stale", "heartbeat_age": round(age, 3), "max_age": limit}


def _database_check() -> str:
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    params = {
        "dbname": db.get("NAME") or "postgres",
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "connect_timeout": 3,
    }
    # A plain connection, not Django's: the main process must not open a pool that the
    # pool's forked children would inherit.
    with psycopg.connect(**{k: v for k, v in params.items() if v is not None}) as conn:
        conn.execute("SELECT 1")
    return "ok"


def _redis_check(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    finally:
        client.close()
    return "ok"


def readiness() -> tuple[bool, dict]:
    from django.conf import settings

    checks = {}
    for name, check in (
        ("database", _database_check),
        ("redis", lambda: _redis_check(settings.REDIS_URL)),
        ("broker", lambda: _redis_check(settings.CELERY_BROKER_URL)),
    ):
        try:
            checks[name] = check()
        except Exception as exc:  # any failure means not ready
            checks[name] = f"error: {exc.__class__.__name__}"
    ok = all(v == "ok" for v in checks.values())
    return ok, {"status": "ok" if ok else "unavailable", **checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parley.worker.health", description=__doc__.split("\n\n")[0]
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--liveness", action="store_true", help="is the worker consuming?")
    group.add_argument("--readiness", action="store_true", help="do Postgres and Redis answer?")
    args = parser.parse_args(argv)
    if args.liveness:
        ok, body = liveness()
    else:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.config.settings")
        ok, body = readiness()
    print(json.dumps(body))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
