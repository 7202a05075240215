"""Real worker processes, a private Redis server and an SMTP sink for the worker tests."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis
from aiosmtpd.controller import Controller

from parley.cli import celery_argv
from parley.embedded import free_port
from tests.realtime.cluster import Proc

REPO = Path(__file__).resolve().parents[3]
REDIS_SERVER = "/usr/bin/redis-server"


def wait_for(predicate, *, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def database_url(settings_dict: dict) -> str:
    user = quote(settings_dict.get("USER") or "postgres")
    password = settings_dict.get("PASSWORD")
    auth = f"{user}:{quote(password)}@" if password else f"{user}@"
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{settings_dict['NAME']}"


class Worker:
    """`celery -A parley.config.celery worker` in its own process group."""

    def __init__(self, name: str, env: dict[str, str], *, concurrency: int = 2) -> None:
        self.name = name
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"parley-{name}-"))
        self.heartbeat = self.dir / "heartbeat"
        self.log_path = self.dir / "worker.log"
        (self.dir / "metrics").mkdir()
        self.env = {
            **os.environ,
            **env,
            "WORKER_METRICS_PORT": str(self.port),
            "WORKER_HEARTBEAT_FILE": str(self.heartbeat),
            "PYTHONPATH": str(REPO / "services"),
            "PYTHONUNBUFFERED": "1",
            # Removed with the rest in stop(), even after a kill -9.
            "PROMETHEUS_MULTIPROC_DIR": str(self.dir / "metrics"),
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # Exactly the command `parley worker` execs (celery_argv), with a name and log
        # level of the test's.
        argv = celery_argv(
            argparse.Namespace(
                queues="receipts,notifications",
                concurrency=concurrency,
                loglevel="info",
                name=f"{name}@%h",
            ),
            [],
        )
        self.proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> Worker:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{self.log()[-4000:]}")
            return " ready." in self.log() and self.http("/healthz")[0] == 200

        wait_for(ready, timeout=timeout, interval=0.2, what=f"worker {self.name} ready")
        return self

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples with these labels (0 when absent)."""
        status, text = self.http("/metrics")
        assert status == 200, text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            series, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def tasks_done(self, task: str, state: str = "success") -> float:
        return self.metric("parley_worker_tasks_total", task=task, state=state)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 of the whole worker: main process and pool processes at once."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """Ask for a warm shutdown (finish running tasks); `stop` waits for it."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Pool processes left behind by a killed main process.
        self.signal_group(signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Realtime(Proc):
    """`parley realtime` (the SPEC's command) on a free port, for end-to-end tests."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="parley-realtime-"))
        argv = [
            str(Path(sys.executable).with_name("parley")),
            "realtime",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        env = {**os.environ, **env, "PYTHONPATH": str(REPO / "services")}
        super().__init__("realtime", argv, env, self.dir)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/"

    def wait_ready(self, timeout: float = 60) -> Realtime:
        self.wait_http_ok(f"http://127.0.0.1:{self.port}/healthz", timeout)
        return self

    def stop(self) -> None:
        super().stop(timeout=20)
        # Anything left in its session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    """A private redis-server, restartable on the same port, with an append-only file
    so that queued messages survive a crash (as the broker Redis must in production)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="parley-redis-"))
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers():
            try:
                return self.client().ping()
            except redis.RedisError:
                return False

        wait_for(answers, timeout=15, what="private redis-server")

    def crash(self) -> None:
        """kill -9: whatever is not in the append-only file is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.crash()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class SmtpSink:
    """An SMTP server that records every message it is given (aiosmtpd).

    mode "accept": 250; "refuse": 451 for every message; `hold` seconds: wait that long
    after receiving a message before answering (a slow server, to kill a worker mid-send).
    """

    mode: str = "accept"
    hold: float = 0.0
    messages: list = field(default_factory=list)
    attempts: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_DATA(self, server, session, envelope):
        self.attempts.append(time.time())
        if self.mode == "refuse":
            return "451 4.3.0 Mailbox busy, try again later"
        self.messages.append(
            (
                list(envelope.rcpt_tos),
                email.message_from_bytes(envelope.content, policy=email.policy.default),
            )
        )
        if self.hold:
            await asyncio.sleep(self.hold)
        return "250 OK"

    def to(self, address: str) -> list:
        return [m for rcpts, m in self.messages if address in rcpts]

    def stop(self) -> None:
        self.controller.stop()
