"""Request logging (one line per request, with id, user, status, duration) and CSP."""

from __future__ import annotations

import logging
import re
import time
import uuid

from parley.config.logging import request_id_var, user_id_var
from parley.web import metrics

logger = logging.getLogger("parley.request")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class ProbeMiddleware:
    """Answers /healthz, /readyz and /metrics before host validation and SSL redirects.

    Kubelet probes and Prometheus address a pod by its IP, which is not (and should not
    be) in ALLOWED_HOSTS; these endpoints reveal nothing that depends on the host.
    """

    def __init__(self, get_response):
        from parley.web import health

        self.get_response = get_response
        self.views = {
            "/healthz": health.healthz,
            "/readyz": health.readyz,
            "/metrics": health.metrics,
        }

    def __call__(self, request):
        view = self.views.get(request.path_info)
        if view is not None and request.method in ("GET", "HEAD"):
            return view(request)
        return self.get_response(request)


class RequestLogMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        request.request_id = request_id
        rid_token = request_id_var.set(request_id)
        uid_token = user_id_var.set(None)
        start = time.perf_counter()
        status = 500
        try:
            response = self.get_response(request)
            status = response.status_code
            response["X-Request-ID"] = request_id
            return response
        finally:
            elapsed = time.perf_counter() - start
            metrics.http_requests.labels(request.method, str(status)).inc()
            metrics.http_latency.observe(elapsed)
            user = getattr(request, "user", None)
            user_id = user.pk if user is not None and user.is_authenticated else None
            if request.path not in QUIET_PATHS or status >= 400:
                logger.info(
                    "%s %s %s",
                    request.method,
                    request.path,
                    status,
                    extra={
                        "method": request.method,
                        "path": request.path,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "user_id": user_id,
                    },
                )
            request_id_var.reset(rid_token)
            user_id_var.reset(uid_token)


class ContentSecurityPolicyMiddleware:
    """A strict CSP: scripts and styles only from our own origin, sockets to the realtime URL."""

    def __init__(self, get_response):
        from django.conf import settings

        self.get_response = get_response
        connect = "'self'"
        # REALTIME_PUBLIC_URL may list several URLs that the client tries in turn.
        realtime_urls = [u for u in re.split(r"[\s,]+", settings.REALTIME_PUBLIC_URL) if u]
        if realtime_urls:
            connect += "".join(" " + _origin_of(u) for u in realtime_urls)
        else:
            connect += " ws: wss:" if settings.DEBUG else ""
        self.policy = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src {connect}; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
        )

    def __call__(self, request):
        response = self.get_response(request)
        if not request.path.startswith("/admin/"):
            response.setdefault("Content-Security-Policy", self.policy)
        return response


def _origin_of(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
