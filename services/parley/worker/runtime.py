"""What a worker process runs besides its tasks (hooked in by parley.config.celery):

- metrics: a PROMETHEUS_MULTIPROC_DIR for the pool's processes, and task signals;
- liveness: every WORKER_HEARTBEAT_SECONDS the main process sends a
  `parley.worker.heartbeat` task to this worker's own queue (`<hostname>.dq2`); running
  it touches WORKER_HEARTBEAT_FILE. The file stays fresh only while the worker takes
  messages off the broker and runs them, so a worker that is alive but stuck (lost its
  broker connection for good, consumer wedged, pool hung) fails its liveness check;
- the receipts ticker (every PARLEY_RECEIPT_TICK_SECONDS, the flushes that are due become
  one `parley.receipts.flush_many` task) and sweeper (under a Redis lock so that one
  worker at a time sweeps), see parley.chat.receipts;
- an HTTP server on WORKER_METRICS_PORT with /metrics, /healthz and /readyz.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from parley.worker import conf

logger = logging.getLogger(__name__)

SWEEP_LOCK_KEY = "parley:rcpt:sweeper"


class _State:
    metrics_dir_created: str | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    server: ThreadingHTTPServer | None = None


_state = _State()


# --- start and stop -------------------------------------------------------------------


def on_worker_init() -> None:
    """In the main process, before the pool forks."""
    _prepare_metrics_dir()
    _connect_task_signals()
    _database_without_pool()


def _database_without_pool() -> None:
    """One persistent connection per pool process instead of a psycopg pool.

    Celery's Django fixup would close the connection around every task (with a psycopg
    pool, the whole pool, threads and all). Opening a connection per task was a fifth
    of the worker's CPU at 150 msg/s (docs/benchmarks.md), so parley.config.celery turns
    the fixup's closing off (CELERY_DB_REUSE_MAX) and the task signals below do what
    Django does around a request: close_old_connections(), which keeps a usable
    connection for WORKER_DB_CONN_MAX_AGE seconds and drops one that failed (health
    checks on), so a Postgres restart costs at most one task a retry.
    """
    from django.conf import settings

    for db in settings.DATABASES.values():
        db.get("OPTIONS", {}).pop("pool", None)
        db["CONN_MAX_AGE"] = conf.db_conn_max_age()
        db["CONN_HEALTH_CHECKS"] = True
        # Named in pg_stat_activity, so that an operator (and a test) can tell them apart.
        db.setdefault("OPTIONS", {}).setdefault("application_name", "parley-worker")


def on_worker_ready(*, hostname: str) -> None:
    heartbeat_write(hostname=hostname)  # a fresh start counts as a heartbeat
    _state.stop.clear()
    _start_thread(_maintenance_loop, hostname, name="parley-worker-maintenance")
    _start_thread(_receipts_ticker, name="parley-worker-receipts-ticker")
    port = conf.metrics_port()
    if port:
        from django.conf import settings

        _state.server = ThreadingHTTPServer(("0.0.0.0", port), _Handler)  # noqa: S104
        _state.server.daemon_threads = True
        _state.server.registry = _registry(settings.CELERY_BROKER_URL)
        _start_thread(_state.server.serve_forever, name="parley-worker-http")
        logger.info("worker metrics and health on :%s", port)


def on_worker_shutdown() -> None:
    _state.stop.set()
    if _state.server is not None:
        _state.server.shutdown()
        _state.server.server_close()
        _state.server = None
    for thread in _state.threads:
        thread.join(timeout=5)
    _state.threads.clear()
    with contextlib.suppress(OSError):
        conf.heartbeat_file().unlink()
    if _state.metrics_dir_created:
        shutil.rmtree(_state.metrics_dir_created, ignore_errors=True)
        _state.metrics_dir_created = None


def _start_thread(target, *args, name: str) -> None:
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    _state.threads.append(thread)


# --- metrics ------------------------------------------------------------------------------


def _prepare_metrics_dir() -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        # Samples of a previous run of this worker must not add up with this one's.
        for stale in Path(path).glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="parley-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        _state.metrics_dir_created = path
    Path(path).mkdir(parents=True, exist_ok=True)
    # prometheus_client picks its value class when first imported; make sure it is the
    # multiprocess one even if something imported it before the directory was set.
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()


def _registry(broker_url: str):
    from parley.worker.metrics import registry

    return registry(broker_url)


_started: dict[str, float] = {}


def _connect_task_signals() -> None:
    from celery import signals

    signals.task_received.connect(_on_received, weak=False)
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)
    signals.task_rejected.connect(_on_rejected, weak=False)


def _on_received(request=None, **kwargs) -> None:
    from parley.worker.metrics import metrics

    metrics().received.labels(request.task_name).inc()


def _on_prerun(task_id=None, task=None, **kwargs) -> None:
    from django.db import close_old_connections

    from parley.worker.metrics import metrics

    close_old_connections()

    now = time.time()
    _started[task_id] = now
    published = _request_header(task.request, "parley_published_at")
    if published is not None:
        start_of_wait = float(published)
        eta = getattr(task.request, "eta", None)
        if eta:
            from datetime import datetime

            with contextlib.suppress(ValueError, TypeError):
                start_of_wait = max(start_of_wait, datetime.fromisoformat(eta).timestamp())
        metrics().wait.labels(task.name).observe(max(now - start_of_wait, 0.0))


def _on_postrun(task_id=None, task=None, state=None, **kwargs) -> None:
    from django.db import close_old_connections

    from parley.worker.metrics import metrics

    close_old_connections()

    m = metrics()
    started = _started.pop(task_id, None)
    if started is not None:
        m.duration.labels(task.name).observe(time.time() - started)
    m.tasks.labels(task.name, (state or "unknown").lower()).inc()


def _on_rejected(message=None, **kwargs) -> None:
    from parley.worker.metrics import metrics

    name = (getattr(message, "headers", None) or {}).get("task", "unknown")
    metrics().tasks.labels(name, "rejected").inc()


def _request_header(request, name: str):
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


# --- heartbeat and sweeper -------------------------------------------------------------


def heartbeat_write(*, hostname: str) -> None:
    path = conf.heartbeat_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"hostname": hostname, "at": time.time(), "pid": os.getpid()}))
    tmp.replace(path)  # atomic: a probe never reads half a file


def heartbeat_age() -> float | None:
    try:
        return max(time.time() - conf.heartbeat_file().stat().st_mtime, 0.0)
    except OSError:
        return None


def _maintenance_loop(hostname: str) -> None:
    from celery.utils.nodenames import worker_direct

    from parley.config.celery import app

    interval = conf.heartbeat_interval()
    next_sweep = time.monotonic() + conf.sweep_interval()
    while not _state.stop.wait(interval):
        try:
            app.send_task(
                "parley.worker.heartbeat",
                args=[hostname],
                queue=worker_direct(hostname),
                expires=max(interval * 3, 30),
                retry=False,
            )
        except Exception as exc:  # broker down: the heartbeat file goes stale
            logger.warning("heartbeat not sent: %r", exc)
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + conf.sweep_interval()
            _sweep_receipts()


# Conversations per flush_many task: a batch takes a few ms per conversation.
TICK_BATCH = 20


def _receipts_ticker() -> None:
    """Every PARLEY_RECEIPT_TICK_SECONDS, move the receipt flushes that are due into
    `parley.receipts.flush_many` tasks (parley.chat.receipts). Every worker runs one;
    each due flush is taken by exactly one of them."""
    from parley.chat import receipts
    from parley.config.celery import app
    from parley.worker import metrics

    tick = receipts.tick_seconds()
    quiet_until = 0.0  # while Redis or the broker is away, warn every 10 s, not every tick
    while not _state.stop.wait(tick):
        try:
            taken = receipts.take_due(limit=TICK_BATCH * 10)
        except Exception as exc:
            if time.monotonic() >= quiet_until:
                quiet_until = time.monotonic() + 10
                logger.warning("receipt flushes not taken: %r", exc)
            continue
        late = metrics.metrics().receipts_late
        for _, seconds in taken:
            late.observe(seconds)
        due = [cid for cid, _ in taken]
        for i in range(0, len(due), TICK_BATCH):
            batch = due[i : i + TICK_BATCH]
            try:
                app.send_task(receipts.FLUSH_MANY_TASK, args=[batch], queue="receipts")
            except Exception as exc:
                logger.warning("receipt flushes not enqueued (%r); due again in 1 s", exc)
                for conversation_id in batch:
                    # If this fails too, the sweeper schedules them (after the schedule
                    # key's grace).
                    with contextlib.suppress(Exception):
                        receipts._enqueue_flush(conversation_id, 1.0)


def _sweep_receipts() -> None:
    from parley.chat import receipts
    from parley.chat.ratelimit import redis_client

    client = redis_client()
    try:
        lock_ms = max(int(conf.sweep_interval() * 1000) - 500, 500)
        if not client.set(SWEEP_LOCK_KEY, "1", nx=True, px=lock_ms):
            return
        scheduled = receipts.receipts_sweep(client=client)
        if scheduled:
            logger.warning("receipts sweeper scheduled lost flushes for %s", scheduled)
    except Exception as exc:  # try again next round
        logger.warning("receipts sweep failed: %r", exc)


# --- HTTP --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "parley-worker"

    def do_GET(self):
        from parley.worker import health

        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok, body = health.liveness()
            self._send_json(200 if ok else 503, body)
        elif path == "/readyz":
            ok, body = health.readiness()
            self._send_json(200 if ok else 503, body)
        else:
            self._send_json(404, {"error": "not_found", "detail": "no such path"})

    def _send_json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):
        pass
