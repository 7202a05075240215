"""The Celery app of the worker service (and of every process that enqueues its tasks).

Wiring only: the broker comes from Django settings (CELERY_BROKER_URL, defaulting to
REDIS_URL); the reliability settings below are chosen on purpose and explained in
docs/operations.md ("Reliability settings"). Each can be tuned by an environment
variable of the same name in capitals, prefixed CELERY_ (e.g. CELERY_VISIBILITY_TIMEOUT).
"""

from __future__ import annotations

import os
import time

import environ
from celery import Celery
from celery import signals as celery_signals
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.config.settings")

env = environ.Env()

# The longest task runs at most this long (hard limit, seconds); see parley.worker.tasks.
LONGEST_TASK_SECONDS = 60

app = Celery("parley")
# CELERY_* Django settings first (CELERY_BROKER_URL, CELERY_TASK_ALWAYS_EAGER)...
app.config_from_object("django.conf:settings", namespace="CELERY")

# A message that is taken but not acknowledged (the worker died) goes back to its
# queue after this many seconds. It must exceed the longest task plus the longest
# countdown a task is held for (email retries back off at most
# PARLEY_EMAIL_RETRY_BACKOFF_MAX, 300 s by default), or a healthy but slow task would
# run twice. Lower means faster recovery from a killed worker.
VISIBILITY_TIMEOUT = env.int("CELERY_VISIBILITY_TIMEOUT", default=900)

# Celery's Django fixup closes the database connection before and after every task
# unless this is set; parley.worker.runtime manages connections instead (persistent,
# checked and closed when unusable or older than WORKER_DB_CONN_MAX_AGE).
app.conf["CELERY_DB_REUSE_MAX"] = 1_000_000_000

# ... and the settings this service relies on, explicitly (they override settings.py).
app.conf.update(
    # Two queues, so that a slow mail server never delays receipts.
    task_queues=tuple(
        Queue(name, Exchange(name, type="direct"), routing_key=name)
        for name in ("receipts", "notifications")
    ),
    task_routes={
        "parley.receipts.*": {"queue": "receipts"},
        "parley.notifications.*": {"queue": "notifications"},
    },
    # Every task names its queue; anything unrouted lands where latency matters least.
    task_default_queue="notifications",
    task_create_missing_queues=False,
    # Each worker also consumes its own queue (<name>.dq2): the liveness heartbeat goes
    # through it, so it proves that this worker still takes messages off the broker.
    worker_direct=True,
    # Results are never read: every task's effect is in Postgres.
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    # Acknowledge after the task ran, and requeue when its process dies (kill -9, OOM):
    # every task is idempotent, so running twice is harmless, losing one is not.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,
    # One message reserved per process: a slow email never sits in front of a receipt
    # that another idle worker could take, and a killed worker strands few messages.
    worker_prefetch_multiplier=env.int("CELERY_WORKER_PREFETCH_MULTIPLIER", default=1),
    # Tasks that are running when the broker connection drops finish; their ack goes
    # nowhere, so they are redelivered after the visibility timeout (harmless: idempotent).
    # Cancelling them instead could interrupt an email between its claim and its send.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # Default hard limit for any task without its own (each Parley task sets its own).
    task_time_limit=LONGEST_TASK_SECONDS,
    task_soft_time_limit=LONGEST_TASK_SECONDS - 10,
    # Start even if Redis is not up yet, and retry forever when it goes away.
    broker_connection_retry_on_startup=True,
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        # How often a worker looks for messages whose worker died (restore sweep):
        # interval x throttle seconds, about 10 s.
        "unacked_restore_interval": env.int("CELERY_UNACKED_RESTORE_INTERVAL", default=10),
        "unacked_restore_throttle": 1,
        # Detect a dead, restarted or unanswering Redis instead of waiting on a socket.
        # The worker's event loop makes these calls itself (binding refreshes, restore
        # sweeps): while one waits, nothing else runs, not even a warm shutdown. With
        # 30 s and a retry on timeout, a Redis that stopped answering held SIGTERM for
        # over 90 s; now a call fails after 5 s and the consumer reconnects, and
        # shutdown proceeds (tests/worker/test_reliability.py). Kombu's BRPOP waits
        # 1 s, well under the timeout.
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "retry_on_timeout": False,
        "health_check_interval": 15,
    },
    # Enqueueing (from web, realtime and tasks) retries briefly, then raises: callers
    # keep enough state in Redis/Postgres to enqueue again later.
    task_publish_retry=True,
    task_publish_retry_policy={
        "max_retries": 3,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    },
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    # The Django fixup opens a database connection per task; tasks are short.
    broker_pool_limit=env.int("CELERY_BROKER_POOL_LIMIT", default=10),
)

# With Redis Sentinel, CELERY_BROKER_URL=sentinel://:pw@h1:26379;sentinel://:pw@h2:26379
# and the master's name here.
if env.str("CELERY_BROKER_SENTINEL_MASTER", default=""):
    app.conf.broker_transport_options["master_name"] = env.str("CELERY_BROKER_SENTINEL_MASTER")

app.autodiscover_tasks()


@celery_signals.before_task_publish.connect
def _stamp_publish_time(headers=None, **kwargs):
    # The worker reports queue wait (enqueue -> start) from it: the receipts lag.
    if headers is not None:
        headers.setdefault("parley_published_at", time.time())


# Worker-process plumbing (metrics, health endpoints, heartbeat, receipts sweeper).
# These signals fire only in a `celery worker` process; other processes that import
# this app to enqueue tasks are unaffected.
@celery_signals.celeryd_init.connect
def _on_worker_init(**kwargs):
    from parley.worker import runtime

    runtime.on_worker_init()


@celery_signals.worker_ready.connect
def _on_worker_ready(sender=None, **kwargs):
    from parley.worker import runtime

    runtime.on_worker_ready(hostname=sender.hostname)


@celery_signals.worker_shutdown.connect
def _on_worker_shutdown(**kwargs):
    from parley.worker import runtime

    runtime.on_worker_shutdown()
