"""Request logs (JSON and console) and the web service's health endpoints."""

from __future__ import annotations

import io
import json
import logging

import pytest
from django.test import Client

from parley.chat import ratelimit
from parley.config.logging import ConsoleFormatter, JsonFormatter

pytestmark = pytest.mark.django_db


@pytest.fixture
def request_log():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("parley.request")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield handler, stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_json_request_log_line(alice, request_log, api_for):
    handler, stream = request_log
    handler.setFormatter(JsonFormatter())
    api_for(alice).get("/api/v1/me", headers={"X-Request-ID": "req-123"})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["request_id"] == "req-123"
    assert entry["user_id"] == alice.id
    assert entry["status"] == 200 and entry["method"] == "GET" and entry["path"] == "/api/v1/me"
    assert isinstance(entry["duration_ms"], float)
    assert entry["level"] == "info" and entry["logger"] == "parley.request"


def test_request_id_is_generated_and_returned(request_log):
    handler, stream = request_log
    handler.setFormatter(JsonFormatter())
    resp = Client().get("/api/v1/me", headers={"X-Request-ID": "bad id with spaces"})
    rid = resp["X-Request-ID"]
    assert rid != "bad id with spaces" and len(rid) == 32
    assert json.loads(stream.getvalue().splitlines()[0])["request_id"] == rid


def test_console_request_log_line(request_log):
    handler, stream = request_log
    handler.setFormatter(ConsoleFormatter())
    Client().get("/api/v1/me")
    line = stream.getvalue().strip()
    assert "GET /api/v1/me 401" in line and "status=401" in line


def test_healthz_and_readyz(db):
    c = Client()
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_readyz_fails_when_redis_is_down(db, settings, monkeypatch):
    import redis

    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    monkeypatch.setattr(ratelimit, "_client", dead)
    resp = Client().get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["redis"].startswith("error") and resp.json()["database"] == "ok"


def test_metrics_exposes_request_counters(db):
    c = Client()
    c.get("/api/v1/me")
    body = c.get("/metrics").content.decode()
    assert 'parley_http_requests_total{method="GET",status="401"}' in body
    assert "parley_http_request_duration_seconds_bucket" in body


def test_probes_answer_whatever_the_host_header(db, settings):
    settings.ALLOWED_HOSTS = ["chat.example.com"]
    c = Client(HTTP_HOST="10.1.2.3:8000")
    assert c.get("/healthz").status_code == 200
    assert c.get("/readyz").status_code == 200
    assert c.get("/metrics").status_code == 200
    # Everything else still validates the host.
    assert c.get("/api/v1/me").status_code == 400


def test_csp_allows_every_realtime_url_and_no_inline_script(db, settings):
    settings.REALTIME_PUBLIC_URL = (
        "wss://rt-a.example.com/ws/chat/, wss://rt-b.example.com/ws/chat/"
    )
    csp = Client().get("/login/")["Content-Security-Policy"]
    assert "connect-src 'self' wss://rt-a.example.com wss://rt-b.example.com;" in csp
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp
