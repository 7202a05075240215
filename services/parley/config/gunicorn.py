"""Gunicorn configuration of the web service (`parley web` passes it with `-c`).

Every value comes from the environment, so production differs from development only by
variables; `parley web --bind/--workers/--threads` override the matching ones.

| variable | default | |
|---|---|---|
| `WEB_BIND` | `0.0.0.0:$PORT` (`PORT` defaults to 8000) | listen address |
| `WEB_CONCURRENCY` | 2 x CPUs + 1, at most 8 (also when 0) | worker processes |
| `WEB_THREADS` | 4 | threads per worker (each may hold one database connection) |
| `WEB_TIMEOUT` | 30 | seconds a silent worker lives before it is restarted |
| `WEB_GRACEFUL_TIMEOUT` | 20 | seconds in-flight requests get after SIGTERM |
| `WEB_KEEPALIVE` | 75 | seconds an idle keep-alive connection stays open |
| `WEB_MAX_REQUESTS` | 0 (never) | recycle a worker after this many requests (+ up to 10 % jitter) |
| `WEB_GC_THRESHOLD` | `700,10,10` | collector thresholds after a worker froze its heap |
| `PROMETHEUS_MULTIPROC_DIR` | a fresh temporary folder | where workers write their metrics |

Only names gunicorn knows are read from this module; helpers start with `_`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from gunicorn.glogging import Logger

from parley import gctune
from parley.cli import available_cpus

# More processes per pod buys little once the CPUs are busy and multiplies database
# connections; scale out with replicas instead (WEB_CONCURRENCY overrides).
_MAX_DEFAULT_WORKERS = 8


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise SystemExit(f"{name} must be a whole number, not {value!r}")
    return number


bind = [os.environ.get("WEB_BIND") or f"0.0.0.0:{os.environ.get('PORT') or 8000}"]
worker_class = "gthread"
# 0 (or unset) means the default.
workers = _int("WEB_CONCURRENCY", 0) or min(2 * available_cpus() + 1, _MAX_DEFAULT_WORKERS)
threads = _int("WEB_THREADS", 4)
timeout = _int("WEB_TIMEOUT", 30)
# Kubernetes allows 30 s by default between SIGTERM and SIGKILL; finish in-flight
# requests well within it.
graceful_timeout = _int("WEB_GRACEFUL_TIMEOUT", 20)
# Longer than the idle timeout of the proxy in front (ingress-nginx and cloud load
# balancers use 60 s): if gunicorn closed first, the proxy could send a request on a
# connection that is just being closed and answer 502.
keepalive = _int("WEB_KEEPALIVE", 75)
max_requests = _int("WEB_MAX_REQUESTS", 0)
max_requests_jitter = _int("WEB_MAX_REQUESTS_JITTER", math.ceil(max_requests / 10))
# The worker heartbeat file is touched constantly; keep it off the container's overlay
# file system, where a slow write could get a healthy worker killed.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
proc_name = "parley-web"
# gunicorn >= 25.1 otherwise opens a control socket at one fixed path per user, which
# several servers on one host would fight over; nothing here uses it.
control_socket_disable = True

# The app logs every request itself (parley.web.middleware), with the request id and
# user; gunicorn's access log would duplicate it.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


class _ParleyLogger(Logger):
    """Gunicorn's own lines (boot, worker exits, timeouts) in Parley's log format, so that
    with LOG_FORMAT=json every line of the web service is one JSON object."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        from parley.config.logging import ConsoleFormatter, JsonFormatter

        json_logs = os.environ.get("LOG_FORMAT", "console").lower() == "json"
        formatter: logging.Formatter = JsonFormatter() if json_logs else ConsoleFormatter()
        for handler in self.error_log.handlers:
            handler.setFormatter(formatter)


logger_class = _ParleyLogger


def _gc_thresholds() -> tuple[int, ...] | None:
    from django.core.exceptions import ImproperlyConfigured

    try:
        return gctune.web_thresholds()
    except ImproperlyConfigured as exc:
        raise SystemExit(str(exc)) from None


_gc = _gc_thresholds()  # a bad value stops the master before any worker starts


def post_worker_init(worker) -> None:
    # The worker has loaded the application: freeze that heap, then raise the threshold.
    gctune.tune(_gc)


# --- Prometheus metrics across worker processes ----------------------------------
# Each worker writes its samples to files in PROMETHEUS_MULTIPROC_DIR and /metrics sums
# them (parley.web.metrics). The variable must be set before a worker imports
# prometheus_client, so it is set here, in the master, before any worker is forked.
_created_metrics_dir: str | None = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _created_metrics_dir = tempfile.mkdtemp(prefix="parley-web-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _created_metrics_dir


def on_starting(server) -> None:
    # A given folder (a Kubernetes emptyDir survives container restarts) may still hold
    # the files of a previous run, whose counters would be added to this run's.
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink(missing_ok=True)


def child_exit(server, worker) -> None:
    # Drops the exited worker's live gauges; its counters stay in the sums.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    if _created_metrics_dir:
        shutil.rmtree(_created_metrics_dir, ignore_errors=True)
