"""Liveness, readiness and Prometheus metrics of the web service."""

from __future__ import annotations

from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from parley.chat.ratelimit import redis_client


@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


def check_dependencies() -> dict[str, str]:
    """Whether Postgres and Redis answer; used by every service's readiness check."""
    checks = {}
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        redis_client().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}"
    return checks


@require_GET
def readyz(request):
    checks = check_dependencies()
    ok = all(v == "ok" for v in checks.values())
    return JsonResponse(
        {"status": "ok" if ok else "unavailable", **checks}, status=200 if ok else 503
    )


@require_GET
def metrics(request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from parley.web.metrics import registry

    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
