"""Failures: a worker killed mid-task, Redis restarted under queued tasks, a mail server
that refuses everything. Each test runs its own workers."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

from parley.chat import receipts, services
from parley.chat.models import Membership, Notification
from parley.config.celery import app
from tests.worker.conftest import EMAIL, FLUSH, room_with_messages
from tests.worker.support import RedisServer, SmtpSink, Worker, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.multiprocess]


def positions(conversation_id: int, user_id: int) -> tuple[int, int]:
    m = Membership.objects.get(conversation_id=conversation_id, user_id=user_id)
    return m.last_delivered_seq, m.last_read_seq


def email_in_flight(user_factory, sink, body: str):
    """alice writes to offline bob in a room; returns (bob, room) once the worker's email
    to bob has reached the (slow) mail server, i.e. while the task waits for its answer."""
    alice = user_factory("alice", email="alice@example.test")
    bob = user_factory("bob", email="bob@example.test")
    room = services.room_create(creator=alice, name="General")
    services.room_join(user=bob, slug=room.slug)
    services.message_create(sender=alice, conversation_id=room.id, body=body)
    wait_for(lambda: sink.to(bob.email), timeout=20, what="the email to reach the server")
    return bob, room


def test_worker_killed_mid_email_the_task_runs_again_elsewhere_without_a_second_email(
    worker_env, user_factory
):
    # A mail server that takes 20 s to answer: the worker is mid-send when it is killed.
    sink = SmtpSink(hold=20)
    env = {
        **worker_env,
        "EMAIL_URL": sink.url,
        # Redeliver a dead worker's messages after 6 s instead of 15 min.
        "CELERY_VISIBILITY_TIMEOUT": "6",
        "CELERY_UNACKED_RESTORE_INTERVAL": "1",
    }
    first = second = None
    try:
        first = Worker("kill1", env).wait_ready()
        bob, room = email_in_flight(user_factory, sink, "are you there?")
        first.kill()  # kill -9 of the whole worker while it waits for the server's answer
        second = Worker("kill2", env).wait_ready()

        # The unacknowledged email task comes back and runs on the other worker.
        wait_for(
            lambda: second.tasks_done(EMAIL) >= 1,
            timeout=30,
            what="the email task to run again on the second worker",
        )
        assert second.metric("parley_notification_emails_total", result="skipped") == 1
        (n,) = Notification.objects.filter(user=bob, conversation=room)
        assert n.emailed_at is not None and n.email_failed_at is None
        assert len(sink.to(bob.email)) == 1  # not a second one
    finally:
        for w in (first, second):
            if w:
                w.stop()
        sink.stop()


def test_a_killed_pool_process_gives_its_task_back_at_once_without_a_second_email(
    worker_env, user_factory
):
    # Only the pool process running the task dies (the OOM killer, a segfault): the
    # worker's main process sees it and requeues the task at once (acks_late +
    # reject_on_worker_lost), long before the 15 min visibility timeout would.
    import psutil

    sink = SmtpSink(hold=20)
    env = {**worker_env, "EMAIL_URL": sink.url, "CELERY_VISIBILITY_TIMEOUT": "900"}
    worker = None
    try:
        worker = Worker("killchild", env).wait_ready()
        bob, _ = email_in_flight(user_factory, sink, "still there?")

        smtp_port = sink.port

        def sender():
            for child in psutil.Process(worker.pid).children():
                with contextlib.suppress(psutil.Error):
                    if any(c.raddr and c.raddr.port == smtp_port for c in child.net_connections()):
                        return child
            return None

        child = sender()
        assert child is not None, "the pool process talking to the mail server"
        killed_at = time.monotonic()
        child.kill()
        wait_for(
            lambda: worker.tasks_done(EMAIL) >= 1,
            timeout=30,
            what="the email task to run again in a new pool process",
        )
        assert time.monotonic() - killed_at < 30  # requeued, not restored after 900 s
        assert worker.proc.poll() is None, "the worker itself lives on"
        assert worker.metric("parley_notification_emails_total", result="skipped") == 1
        assert len(sink.to(bob.email)) == 1  # not a second one
    finally:
        if worker:
            worker.stop()
        sink.stop()


def test_redis_restarted_while_tasks_are_queued_the_worker_resumes_by_itself(
    worker_env, user_factory, monkeypatch
):
    redis_server = RedisServer()  # our own: never restart the shared one
    private = redis_server.client()
    env = {
        **worker_env,
        "REDIS_URL": redis_server.url,
        "CELERY_BROKER_URL": redis_server.url,
        "CHANNEL_LAYER_URL": redis_server.url,
        "WORKER_LIVENESS_MAX_AGE": "4",
    }
    worker = None

    def enqueue_flush(conversation_id, countdown=None, client=None):
        countdown = receipts.flush_seconds() if countdown is None else countdown
        with app.connection_for_write(redis_server.url) as conn:
            app.send_task(FLUSH, args=[conversation_id], connection=conn, countdown=countdown)

    monkeypatch.setattr(receipts, "_enqueue_flush", enqueue_flush)

    def stage(*entries):
        receipts.stage(entries, client=private)

    def liveness_probe() -> int:
        probe_env = {
            **os.environ,
            "WORKER_HEARTBEAT_FILE": str(worker.heartbeat),
            "WORKER_LIVENESS_MAX_AGE": "4",
        }
        return subprocess.run(
            [sys.executable, "-m", "parley.worker.health", "--liveness"],
            env=probe_env,
            capture_output=True,
            timeout=30,
        ).returncode

    try:
        worker = Worker("redis1", env).wait_ready()
        alice, bob, carol = (user_factory(n) for n in ("alice", "bob", "carol"))
        room = room_with_messages(alice, [bob, carol], 50)
        other = room_with_messages(alice, [bob], 50, name="Other")
        stage((room.id, bob.id, 10, 10))
        wait_for(lambda: positions(room.id, bob.id) == (10, 10), timeout=15, what="receipts")
        wait_for(
            lambda: not private.exists(receipts.schedule_key(room.id)),
            timeout=5,
            what="the flush to finish",
        )

        # Freeze the worker, queue tasks, crash Redis, thaw the worker with Redis down.
        worker.signal_group(signal.SIGSTOP)
        # A BRPOP the frozen worker had in flight still takes the next message into its
        # socket buffer; give it one that does nothing (a flush of a conversation with
        # nothing staged), so that the tasks below are really queued. If the worker was
        # frozen between two BRPOPs, the no-op stays queued in front of them (harmless).
        enqueue_flush(0)
        time.sleep(1.0)  # an in-flight BRPOP answers within milliseconds
        before = private.llen("receipts")
        assert before in (0, 1)
        stage((room.id, bob.id, 30, 30), (room.id, carol.id, 20, 20), (other.id, bob.id, 5, 5))
        assert private.llen("receipts") == before + 2  # one flush per conversation
        redis_server.crash()
        worker.signal_group(signal.SIGCONT)

        # Alive but unable to consume: liveness and readiness fail, the process stays up.
        wait_for(lambda: worker.http("/healthz")[0] == 503, timeout=20, what="liveness to fail")
        assert liveness_probe() == 1
        assert worker.http("/readyz")[0] == 503
        assert worker.proc.poll() is None

        redis_server.start()  # same port; the append-only file brings the queue back
        wait_for(
            lambda: (
                positions(room.id, bob.id) == (30, 30)
                and positions(room.id, carol.id) == (20, 20)
                and positions(other.id, bob.id) == (5, 5)
            ),
            timeout=60,
            what="the queued tasks to run after the restart",
        )
        # And it keeps consuming what comes next.
        stage((room.id, bob.id, 40, 40))
        wait_for(lambda: positions(room.id, bob.id) == (40, 40), timeout=30, what="new tasks")
        wait_for(lambda: worker.http("/healthz")[0] == 200, timeout=20, what="liveness again")
        assert liveness_probe() == 0
        assert worker.http("/readyz")[0] == 200
        assert worker.proc.poll() is None  # the same process throughout
    finally:
        if worker:
            worker.stop()
        redis_server.stop()


def test_sigterm_while_redis_hangs_the_worker_still_stops_in_time(worker_env):
    """`podman-compose down` (or a partition) can leave the broker unanswering while a
    worker shuts down: the warm shutdown must not wait out socket timeouts times
    retries (a "worker-offline" event publish held it for over 90 s) but exit 0 by
    itself within the grace period of the chart and compose (75 s)."""
    redis_server = RedisServer()
    env = {
        **worker_env,
        "REDIS_URL": redis_server.url,
        "CELERY_BROKER_URL": redis_server.url,
        "CHANNEL_LAYER_URL": redis_server.url,
    }
    worker = Worker("hung-redis", env).wait_ready()
    try:
        redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        time.sleep(1)
        started = time.monotonic()
        worker.terminate()
        code = worker.proc.wait(timeout=70)
        took = time.monotonic() - started
        assert code == 0, worker.log()[-3000:]
        # Measured about 20 s: the remote-control (pidbox) and consumer channels are
        # closed with a few Redis calls that each time out after 5 s. Before, > 90 s.
        assert took < 45, (took, worker.log()[-3000:])
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        worker.stop()
        redis_server.stop()


def test_a_refusing_mail_server_is_retried_with_backoff_then_recorded_and_blocks_nothing(
    worker_env, user_factory
):
    sink = SmtpSink(mode="refuse")
    env = {
        **worker_env,
        "EMAIL_URL": sink.url,
        "PARLEY_EMAIL_MAX_RETRIES": "3",
        "PARLEY_EMAIL_RETRY_BACKOFF": "1",
        "PARLEY_EMAIL_RETRY_BACKOFF_MAX": "30",
    }
    worker = None
    try:
        worker = Worker("smtp1", env).wait_ready()
        alice = user_factory("alice", email="alice@example.test")
        bob = user_factory("bob", email="bob@example.test")
        carol = user_factory("carol", email="carol@example.test")
        room = services.room_create(creator=alice, name="General")
        for user in (bob, carol):
            services.room_join(user=user, slug=room.slug)
        services.membership_set_muted(user=carol, conversation_id=room.id, muted=True)
        services.message_create(sender=alice, conversation_id=room.id, body="hello")
        wait_for(lambda: len(sink.attempts) >= 2, timeout=20, what="a refused email, retried")

        # While the email waits for its next retry, receipts flow.
        receipts.stage([(room.id, carol.id, 1, 1)])
        wait_for(lambda: positions(room.id, carol.id) == (1, 1), timeout=5, what="receipts")
        assert Notification.objects.get(user=bob).email_failed_at is None

        wait_for(
            lambda: Notification.objects.get(user=bob).email_failed_at,
            timeout=40,
            what="the email to be recorded as failed",
        )
        time.sleep(1.0)
        n = Notification.objects.get(user=bob)
        assert n.emailed_at is None
        attempts = list(sink.attempts)
        assert len(attempts) == 4  # the first try and 3 retries
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        # Exponential: about 1, 2, 4 s (plus up to 25 % jitter).
        for i, gap in enumerate(gaps):
            assert 2**i * 0.9 <= gap <= 2**i * 1.25 + 1.5, gaps
        assert worker.metric("parley_notification_emails_total", result="failed") == 1
        assert worker.metric("parley_notification_emails_total", result="retry") == 3
        assert worker.http("/healthz")[0] == 200
    finally:
        if worker:
            worker.stop()
        sink.stop()
