"""Prometheus metrics of the worker service.

Tasks run in the prefork pool's child processes, so samples go to files under
PROMETHEUS_MULTIPROC_DIR (prepared by `runtime.on_worker_init` before the pool forks)
and the main process' HTTP endpoint adds them up. Queue depths are read from the broker
when scraped. Metrics are created on first use, after that directory is set.
"""

from __future__ import annotations

import os
from functools import cache

QUEUES = ("receipts", "notifications")
# kombu's Redis transport keeps one list per queue and priority step (0 has no suffix).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


@cache
def metrics():
    from types import SimpleNamespace

    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        tasks=Counter(
            "parley_worker_tasks_total",
            "Tasks run by the worker, by task name and final state "
            "(success, failure, retry, ignored, rejected)",
            ["task", "state"],
        ),
        received=Counter(
            "parley_worker_tasks_received_total", "Tasks taken off the broker", ["task"]
        ),
        duration=Histogram(
            "parley_worker_task_duration_seconds",
            "Time a task ran",
            ["task"],
            buckets=_DURATION_BUCKETS,
        ),
        wait=Histogram(
            "parley_worker_task_queue_wait_seconds",
            "Time from enqueue (or the end of its countdown) to the task's start",
            ["task"],
            buckets=_WAIT_BUCKETS,
        ),
        receipts_late=Histogram(
            "parley_receipts_flush_late_seconds",
            "How long after its due time a receipts flush was taken by a worker's ticker "
            "(PARLEY_RECEIPT_TICK_SECONDS at most, unless the ticker is held up)",
            buckets=_WAIT_BUCKETS,
        ),
        receipts_applied=Counter(
            "parley_receipts_applied_total",
            "Memberships whose receipts a flush moved forward in Postgres",
        ),
        emails=Counter(
            "parley_notification_emails_total",
            "Notification email attempts by result (sent, skipped, retry, failed)",
            ["result"],
        ),
    )


def queue_key(queue: str, priority: int) -> str:
    return f"{queue}{PRIORITY_SEP}{priority}" if priority else queue


class BrokerCollector:
    """Queue depth and unacknowledged messages, read from the broker Redis at scrape time."""

    def __init__(self, broker_url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(broker_url, socket_timeout=3, socket_connect_timeout=3)

    def collect(self):
        import redis
        from prometheus_client.core import GaugeMetricFamily

        from parley.chat.receipts import DIRTY_KEY

        depth = GaugeMetricFamily(
            "parley_worker_queue_depth", "Messages waiting in a queue", labels=["queue"]
        )
        unacked = GaugeMetricFamily(
            "parley_worker_unacked_messages",
            "Messages taken by some worker and not yet acknowledged (all queues)",
        )
        staged = GaugeMetricFamily(
            "parley_receipts_staged_conversations",
            "Conversations with receipts staged in Redis, not yet in Postgres",
        )
        up = GaugeMetricFamily("parley_worker_broker_up", "Whether the broker answered the scrape")
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in QUEUES:
                for priority in PRIORITY_STEPS:
                    pipe.llen(queue_key(queue, priority))
            pipe.zcard("unacked_index")
            pipe.zcard(DIRTY_KEY)
            values = pipe.execute()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        n = len(PRIORITY_STEPS)
        for i, queue in enumerate(QUEUES):
            depth.add_metric([queue], sum(values[i * n : (i + 1) * n]))
        unacked.add_metric([], values[-2])
        staged.add_metric([], values[-1])
        up.add_metric([], 1)
        yield from (depth, unacked, staged, up)


def registry(broker_url: str):
    from prometheus_client import CollectorRegistry, multiprocess

    reg = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(reg)
    reg.register(BrokerCollector(broker_url))
    return reg
