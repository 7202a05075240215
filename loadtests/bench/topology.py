"""The local topology the benchmark measures: web (gunicorn), two realtime replicas
(uvicorn), a worker (Celery), on the host's Postgres and Redis with a dedicated database
and channel-layer prefix. Each service is started with the `parley` command, as an
operator would (but the `naive` realtime replicas: see naive_realtime_argv); process
handling comes from the multi-process test helpers.

Configurations (`CONFIGS`) differ by environment variables, and `naive` by its realtime
command:
- `parley`: the defaults (pub/sub channel layer, pooled connections, batched receipts);
- `naive`: the tutorial's design: its realtime replicas are plain uvicorn (asyncio, h11)
  serving loadtests.bench.naive_consumer (a tutorial-style consumer) instead of
  `parley realtime`, with the tutorial's settings (NAIVE_ENV, also for web and worker);
- `noop`: no Parley at all, an in-memory server speaking the protocol (loadtests.bench.noop),
  to measure the load generator's own ceiling on this machine.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil

from loadtests.common import REPO

# The process helpers of the multi-process tests (services/tests/realtime/cluster.py).
if str(REPO / "services") not in sys.path:
    sys.path.insert(0, str(REPO / "services"))
from tests.realtime.cluster import Proc, free_port, http_get

BIN = Path(sys.executable).parent
# The environment as it was before this process configured Django for itself (seeding
# sets DB_POOL, DEBUG... in os.environ): the services must not inherit that.
LAUNCH_ENV = dict(os.environ)
PARLEY = (
    [str(BIN / "parley")] if (BIN / "parley").exists() else [sys.executable, "-m", "parley.cli"]
)

# A production-like process: DEBUG off (Django keeps no query log), quiet logs (a
# log line per task or request would be measured too), no send rate limit (the load is
# the point), quick drain so that a run stops promptly.
BASE_ENV = {
    "DEBUG": "false",
    "SECRET_KEY": "loadtest-" + "k" * 60,
    "ALLOWED_HOSTS": "127.0.0.1,localhost",
    "SECURE_SSL_REDIRECT": "false",
    "SESSION_COOKIE_SECURE": "false",
    "CSRF_COOKIE_SECURE": "false",
    "SECURE_HSTS_SECONDS": "0",
    "LOG_LEVEL": "WARNING",
    "PARLEY_RATE_MESSAGES_PER_10S": "0",
    "REALTIME_DRAIN_SECONDS": "1",
    "REALTIME_GRACE_SECONDS": "10",
    "WEB_GRACEFUL_TIMEOUT": "5",
    "PYTHONUNBUFFERED": "1",
}

# The tutorial's settings, for every process of the `naive` configuration (its realtime
# replicas run the tutorial's consumer: naive_realtime_argv):
# - channels_redis' default RedisChannelLayer: a group send writes one copy per member
#   channel (and drops silently past capacity);
# - no connection pool and CONN_MAX_AGE=0: Django opens and closes a Postgres connection
#   around every ORM call, as the tutorial's settings do;
# - one ORM thread per process: the naive consumer uses database_sync_to_async's
#   thread-sensitive default; DB_POOL_MAX_SIZE=1 sizes the auth middleware's threads;
# - no token cache in the auth middleware: every handshake reads its token, as
#   AuthMiddlewareStack reads the session;
# - receipts unbatched as far as the knobs go (the naive consumer records none; the web
#   service's read receipts are staged at once, flushed at once).
NAIVE_ENV = {
    "CHANNEL_LAYER_BACKEND": "core",
    "DB_POOL": "false",
    "CONN_MAX_AGE": "0",
    "DB_POOL_MAX_SIZE": "1",
    "REALTIME_TOKEN_CACHE_SECONDS": "0",
    "PARLEY_DELIVERY_BUFFER_SECONDS": "0",
    "PARLEY_RECEIPT_FLUSH_SECONDS": "0",
}

NAIVE_APPLICATION = "loadtests.bench.naive_consumer:application"


def naive_realtime_argv(host: str, port: int) -> list[str]:
    """A realtime replica of the `naive` configuration: uvicorn run as the tutorial's
    deployment would, on the asyncio loop with h11 and uvicorn's default WebSocket
    protocol, serving loadtests.bench.naive_consumer (Parley's lean protocol, uvloop,
    httptools, the node and its drain are `parley realtime`'s, not the tutorial's). The
    process needs the repository root on PYTHONPATH (Topology sets it)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        NAIVE_APPLICATION,
        *("--host", host, "--port", str(port)),
        *("--loop", "asyncio", "--http", "h11"),
        *("--lifespan", "off"),  # the tutorial's ProtocolTypeRouter has no lifespan
        *("--log-level", "warning", "--no-access-log"),
        *("--timeout-graceful-shutdown", "5"),
    ]


CONFIGS: dict[str, dict[str, str]] = {
    "parley": {},
    "naive": NAIVE_ENV,
    "noop": {},
    # An experiment, not a deployment: Parley without its worker, so that no receipt is
    # ever applied or broadcast. The difference from `parley` is what receipts cost.
    "parley-noworker": {},
}


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def admin_url(url: str) -> str:
    return with_database(url, "postgres")


def recreate_database(database_url: str) -> None:
    """Drop and create the benchmark's own database (never anyone else's: the name must
    start with parley_lt)."""
    name = urlsplit(database_url).path.lstrip("/")
    if not name.startswith("parley_lt"):
        raise SystemExit(f"refusing to recreate {name!r}: the benchmark's database is parley_lt*")
    _drop(database_url, name, create=True)


def drop_database(database_url: str) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    if name.startswith("parley_lt"):
        _drop(database_url, name, create=False)


def _drop(database_url: str, name: str, *, create: bool) -> None:
    """Close its sessions and drop the database `name` (then create it again if asked)."""
    import psycopg

    with psycopg.connect(admin_url(database_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        if create:
            conn.execute(f'CREATE DATABASE "{name}"')


def _wait(predicate, timeout: float, what: str, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited while starting:\n{proc.tail(40)}")
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"{what} not ready within {timeout:.0f} s:\n" + "\n".join(p.tail(20) for p in procs)
    )


def _status(url: str) -> int:
    try:
        return http_get(url, timeout=2)[0]
    except (OSError, urllib.error.URLError):
        return 0


class Topology:
    """Starts and stops one configuration's processes."""

    def __init__(
        self,
        config: str,
        *,
        database_url: str,
        redis_url: str,
        prefix: str,
        logdir: Path,
        replicas: int = 2,
        web_workers: int = 2,
        worker_concurrency: int = 2,
        db_pool: int = 10,
        noop_seed: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.logdir = logdir
        self.replicas = replicas
        self.web_workers = web_workers
        self.worker_concurrency = worker_concurrency
        self.noop_seed = noop_seed
        self.procs: list[Proc] = []
        self.realtime: list[Proc] = []
        self.realtime_ports: list[int] = []
        self.web: Proc | None = None
        self.worker: Proc | None = None
        self.web_port = free_port()
        self.worker_port = free_port()
        env = dict(LAUNCH_ENV)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(BASE_ENV)
        env.update(
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            CHANNEL_LAYER_URL=redis_url,
            CELERY_BROKER_URL=redis_url,
            CHANNEL_LAYER_PREFIX=prefix,
            DB_POOL_MAX_SIZE=str(db_pool),
            WORKER_METRICS_PORT=str(self.worker_port),
            WORKER_HEARTBEAT_FILE=str(logdir / "worker.heartbeat"),
            PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "services")]),
        )
        env.update(CONFIGS.get(config, {}))
        env.update(extra_env or {})
        self.env = env

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 90) -> Topology:
        self.logdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.config == "noop":
                self._start_noop(timeout)
            else:
                self._start_parley(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_noop(self, timeout: float) -> None:
        self.realtime_ports = [free_port() for _ in range(self.replicas)]
        argv = [sys.executable, "-m", "loadtests.bench.noop", "--seed", str(self.noop_seed)]
        for port in self.realtime_ports:
            argv += ["--port", str(port)]
        proc = Proc("noop", argv, self.env, self.logdir)
        self.procs.append(proc)
        self.realtime = [proc] * self.replicas
        _wait(
            lambda: all(
                _status(f"http://127.0.0.1:{p}/healthz") == 200 for p in self.realtime_ports
            ),
            timeout,
            "noop server",
            self.procs,
        )

    def _start_parley(self, timeout: float) -> None:
        self.web = Proc(
            "web",
            [
                *PARLEY,
                "web",
                "--bind",
                f"127.0.0.1:{self.web_port}",
                "--workers",
                str(self.web_workers),
            ],
            self.env,
            self.logdir,
        )
        self.procs.append(self.web)
        for i in range(self.replicas):
            port = free_port()
            name = f"realtime-{'ABCDEFGH'[i]}"
            if self.config == "naive":
                argv = naive_realtime_argv("127.0.0.1", port)
            else:
                argv = [*PARLEY, "realtime", "--host", "127.0.0.1", "--port", str(port)]
            proc = Proc(
                name,
                argv,
                {**self.env, "PARLEY_NODE_ID": f"lt-{self.config}-{name}"},
                self.logdir,
            )
            self.realtime.append(proc)
            self.realtime_ports.append(port)
            self.procs.append(proc)
        if self.config.endswith("-noworker"):
            _wait(
                lambda: (
                    _status(f"{self.web_url}/readyz") == 200
                    and all(
                        _status(f"http://127.0.0.1:{p}/readyz") == 200 for p in self.realtime_ports
                    )
                ),
                timeout,
                "web and realtime",
                self.procs,
            )
            return
        self.worker = Proc(
            "worker",
            [
                *PARLEY,
                "worker",
                "--concurrency",
                str(self.worker_concurrency),
                "--name",
                f"lt-{self.config}-{os.getpid()}@%h",
            ],
            self.env,
            self.logdir,
        )
        self.procs.append(self.worker)
        _wait(
            lambda: (
                _status(f"{self.web_url}/readyz") == 200
                and all(_status(f"http://127.0.0.1:{p}/readyz") == 200 for p in self.realtime_ports)
                and _status(f"http://127.0.0.1:{self.worker_port}/healthz") == 200
            ),
            timeout,
            "web, realtime and worker",
            self.procs,
        )

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to every process at once (one signal: a second one skips the realtime
        drain), then wait; whatever is left after `timeout` is killed."""
        procs = list(dict.fromkeys(self.procs))  # noop appears once per replica
        for proc in procs:
            if proc.alive():
                proc.signal(15)
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop(timeout=2)

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- addresses and processes -----------------------------------------------------------

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{p}/ws/chat/" for p in self.realtime_ports]

    def metrics_url(self, replica: int) -> str:
        return f"http://127.0.0.1:{self.realtime_ports[replica]}/metrics"

    def process_groups(self) -> dict[str, list[int]]:
        """Service name -> pids (a service's children included: gunicorn and Celery pools)."""
        groups: dict[str, list[int]] = {}
        seen = set()
        for proc in self.procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            pids = [proc.pid]
            with contextlib.suppress(psutil.Error):
                pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            groups[proc.name] = pids
        return groups

    def scrape(self, replica: int) -> str:
        try:
            # Our own http:// URL on 127.0.0.1.
            with urllib.request.urlopen(self.metrics_url(replica), timeout=5) as resp:  # noqa: S310
                return resp.read().decode()
        except OSError:
            return ""

    def scrape_worker(self) -> str:
        if self.worker is None:
            return ""
        try:
            url = f"http://127.0.0.1:{self.worker_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.read().decode()
        except OSError:
            return ""

    def tails(self, n: int = 30) -> str:
        return "\n".join(p.tail(n) for p in dict.fromkeys(self.procs))
