"""The `parley` command: one entry point for every Parley process.

    parley web [--bind HOST:PORT] [--workers N] [--threads N] [GUNICORN OPTIONS...]
    parley realtime [--host H] [--port P]
    parley worker [--queues receipts,notifications] [--concurrency N] [CELERY OPTIONS...]
    parley migrate [MIGRATE OPTIONS...]
    parley manage COMMAND [ARGS...]
    parley dev [--port 8000] [--realtime-port 8001] [--state-dir .parley]

`web` and `worker` replace this process with gunicorn or celery (exec), so that the
signals a container runtime sends to PID 1 reach the server itself.

Nothing here imports Django at module level: `parley dev` and the gunicorn
configuration import this module without configuring Django.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from parley import __version__

SETTINGS_MODULE = "parley.config.settings"
CELERY_APP = "parley.config.celery"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/parley"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUES = "receipts,notifications"
# Key of the session-level advisory lock that serialises `parley migrate` runs (the
# eight bytes spell "parl-mig").
MIGRATE_LOCK_KEY = int.from_bytes(b"parl-mig", "big")
# sysexits.h EX_CONFIG: the configuration is unusable.
EXIT_CONFIG = 78


# --- helpers shared with the gunicorn configuration --------------------------------


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a
    container's CPU limit), which os.cpu_count() ignores."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
        return None if limit == "max" else int(limit) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # cgroup v1
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    return None


# --- the command line ----------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("must be at most 65535")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley",
        description="Run a Parley service or task. Configuration comes from the "
        "environment (DATABASE_URL, REDIS_URL, SECRET_KEY, DEBUG, ALLOWED_HOSTS, ...).",
    )
    parser.add_argument("--version", action="version", version=f"parley {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    web = sub.add_parser(
        "web",
        help="serve pages and the JSON API with gunicorn",
        description="Serve the web service (WSGI) with gunicorn. Defaults come from "
        "parley/config/gunicorn.py and its environment variables; other options are "
        "passed to gunicorn.",
    )
    web.add_argument("--bind", metavar="HOST:PORT", help="default: $WEB_BIND or 0.0.0.0:8000")
    web.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker processes (default: $WEB_CONCURRENCY or 2 x CPUs + 1, at most 8)",
    )
    web.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="threads per worker (default: $WEB_THREADS or 4)",
    )
    web.set_defaults(handler=cmd_web, passthrough=True)

    realtime = sub.add_parser(
        "realtime",
        help="serve WebSockets with uvicorn",
        description="Serve the realtime service (ASGI: WebSockets, health, metrics).",
    )
    realtime.add_argument("--host", default="0.0.0.0", help="default: %(default)s")  # noqa: S104
    realtime.add_argument("--port", type=_port, default=8001, help="default: %(default)s")
    realtime.set_defaults(handler=cmd_realtime, passthrough=False)

    worker = sub.add_parser(
        "worker",
        help="run a Celery worker (receipts, notifications)",
        description="Run a Celery worker. Other options are passed to `celery worker`.",
    )
    worker.add_argument(
        "--queues",
        default=os.environ.get("WORKER_QUEUES") or DEFAULT_QUEUES,
        help="comma-separated queues to consume (default: $WORKER_QUEUES or %(default)s)",
    )
    worker.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help="worker processes (default: $WORKER_CONCURRENCY or the CPUs available)",
    )
    worker.add_argument(
        "--loglevel",
        default=os.environ.get("LOG_LEVEL") or "INFO",
        help="default: $LOG_LEVEL or %(default)s",
    )
    worker.add_argument(
        "--name",
        default=os.environ.get("WORKER_NAME") or "parley-worker@%h",
        help="Celery node name, unique per host (default: $WORKER_NAME or %(default)s)",
    )
    worker.set_defaults(handler=cmd_worker, passthrough=True)

    migrate = sub.add_parser(
        "migrate",
        help="apply database migrations (safe from several pods at once)",
        description="Apply database migrations while holding a Postgres advisory lock, so "
        "that several pods may run it at once: one migrates, the others wait and then find "
        "nothing left to do. Other options are passed to Django's migrate.",
    )
    migrate.set_defaults(handler=cmd_migrate, passthrough=True)

    # Dispatched before parsing (see main), so that options after `manage` reach Django.
    sub.add_parser(
        "manage",
        help="run a Django management command",
        description="Run a Django management command: parley manage COMMAND [ARGS...]",
    ).add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]")

    dev = sub.add_parser(
        "dev",
        help="run the whole stack on this machine",
        description="Run web, realtime and worker on this machine with a demo user and "
        "room. Uses Postgres and Redis at DATABASE_URL and REDIS_URL when they answer, "
        "otherwise starts private ones under the state folder. Ctrl-C stops everything.",
    )
    dev.add_argument("--port", type=_port, default=8000, help="web port (default: %(default)s)")
    dev.add_argument(
        "--realtime-port", type=_port, default=8001, help="WebSocket port (default: %(default)s)"
    )
    dev.add_argument(
        "--state-dir",
        default=".parley",
        help="folder for embedded servers and the demo password (default: %(default)s)",
    )
    dev.set_defaults(handler=cmd_dev, passthrough=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
    parser = build_parser()
    if argv and argv[0] == "manage":
        args, extra = argparse.Namespace(handler=cmd_manage, args=argv[1:]), []
    else:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if extra and not args.passthrough:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")

    from django.core.exceptions import ImproperlyConfigured

    try:
        return args.handler(args, extra) or 0
    except ImproperlyConfigured as exc:
        print(f"parley: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _check_settings() -> None:
    """Load the settings now, so that an insecure production setting stops the command
    with its message, not with a traceback from deep inside a server process."""
    from django.conf import settings

    settings.INSTALLED_APPS  # noqa: B018 - the access imports the settings module


def _exec(argv: list[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)  # noqa: S606 - a fixed program, not a shell


# --- web, realtime, worker -----------------------------------------------------------


def gunicorn_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "gunicorn", "--config", "python:parley.config.gunicorn"]
    if args.bind:
        argv += ["--bind", args.bind]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return [*argv, *extra, "parley.config.wsgi:application"]


def cmd_web(args: argparse.Namespace, extra: list[str]) -> int:
    _check_settings()
    from parley import gctune

    gctune.web_thresholds()  # a bad value is a configuration error here, not in gunicorn
    _exec(gunicorn_argv(args, extra))
    return 0  # not reached


def cmd_realtime(args: argparse.Namespace, extra: list[str]) -> int:
    _check_settings()
    from parley.realtime.server import serve

    serve(host=args.host, port=args.port)
    return 0


def celery_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    queues = ",".join(q.strip() for q in args.queues.split(",") if q.strip())
    if not queues:
        raise SystemExit("parley worker: --queues names no queue")
    concurrency = args.concurrency or _env_count("WORKER_CONCURRENCY") or available_cpus()
    return [
        sys.executable, "-m", "celery", "-A", CELERY_APP, "worker",
        "-Q", queues,
        "-c", str(concurrency),
        "--loglevel", args.loglevel.upper(),
        "-n", args.name,
        # Workers need not learn about each other at start-up (mingle), exchange
        # heartbeats (gossip) or broadcast event heartbeats (heartbeat): tasks are
        # idempotent, liveness is parley.worker.health's own heartbeat task, and
        # nothing consumes those events. This saves broker traffic that grows with the
        # square of the replica count, and a warm shutdown no longer publishes a
        # "worker-offline" event: with a Redis that stopped answering, that publish
        # held the exit for over 90 s (timeouts times retries).
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        *extra,
    ]  # fmt: skip


def _env_count(name: str) -> int:
    """A whole number from the environment; 0 when unset (meaning: the default)."""
    value = os.environ.get(name, "").strip() or "0"
    if not value.isdigit():
        raise SystemExit(f"parley: {name} must be a whole number, not {value!r}")
    return int(value)


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    _check_settings()
    _exec(celery_argv(args, extra))
    return 0  # not reached


# --- migrate, manage ------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, extra: list[str]) -> int:
    """Run Django's migrate while holding a session-level advisory lock.

    The lock lives on a dedicated connection (not the one migrate uses), so it is held
    across migrate's own transactions, and released by Postgres if this process dies.
    DATABASE_URL must reach Postgres directly: a pooler in transaction mode (PgBouncer)
    does not keep session locks.
    """
    _check_settings()
    import django

    django.setup()
    import psycopg
    from django.core.management import ManagementUtility
    from django.db import connection

    params = {
        key: value
        for key, value in connection.get_connection_params().items()
        if key not in ("cursor_factory", "context", "prepare_threshold")
    }
    params.update(
        application_name="parley migrate (lock)",
        # A long migration must not lose its lock to an idle-connection reaper.
        keepalives=1,
        keepalives_idle=30,
    )
    with psycopg.connect(autocommit=True, **params) as lock_conn:
        got = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", [MIGRATE_LOCK_KEY])
        if not got.fetchone()[0]:
            print("parley migrate: another migration is running; waiting for it", flush=True)
            lock_conn.execute("SELECT pg_advisory_lock(%s)", [MIGRATE_LOCK_KEY])
        try:
            ManagementUtility(["parley migrate", "migrate", *extra]).execute()
        finally:
            connection.close()
            with contextlib.suppress(psycopg.Error):
                lock_conn.execute("SELECT pg_advisory_unlock(%s)", [MIGRATE_LOCK_KEY])
    return 0


def cmd_manage(args: argparse.Namespace, extra: list[str]) -> int:
    _check_settings()
    from django.core.management import execute_from_command_line

    execute_from_command_line(["parley manage", *args.args])
    return 0


# --- dev -------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "parley.cli"]
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0  # SIGTERM to SIGKILL, for all children together
PR_SET_PDEATHSIG = 1


def cmd_dev(args: argparse.Namespace, extra: list[str]) -> int:
    return DevStack(
        web_port=args.port, realtime_port=args.realtime_port, state_dir=Path(args.state_dir)
    ).run()


class _Stopped(Exception):
    """A stop signal arrived."""


class _DevError(Exception):
    """Something went wrong that the user should read about."""


def _die_with_parent():
    """A preexec_fn that has Linux send the child SIGTERM when `parley dev` dies, even by
    SIGKILL, so that no server outlives it. The setting survives exec."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    # Resolved here, in the parent: between fork and exec only this plain call runs.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _live_group_members(pgid: int) -> list[int]:
    """Pids of the processes in process group `pgid`, zombies excluded."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _proc_name(pid: int) -> str | None:
    """The command name of a live process, None when there is none (or only a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if stat[stat.rfind(")") + 2 :].split()[:1] in (["Z"], ["X"]):
        return None
    return stat[stat.find("(") + 1 : stat.rfind(")")]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers set it: a port in TIME_WAIT after the last run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - http://127.0.0.1
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class _Output:
    """Writes each child's lines prefixed with its name, whole lines at a time."""

    COLORS = {"web": 36, "realtime": 35, "worker": 33, "migrate": 34, "demo": 34, "dev": 1}

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def line(self, name: str, text: str) -> None:
        prefix = f"{name:<8} | "
        if self.color:
            prefix = f"\033[{self.COLORS.get(name, 0)}m{prefix}\033[0m"
        with self.lock, contextlib.suppress(OSError, ValueError):
            sys.stdout.write(prefix + text + "\n")
            sys.stdout.flush()

    def relay(self, name: str, stream) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                self.line(name, raw.decode(errors="replace").rstrip("\r\n"))


class _Child:
    """A child process in its own process group, its output relayed with a prefix."""

    def __init__(self, name: str, argv: list[str], env: dict, output: _Output) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own group: Ctrl-C in the terminal reaches only `parley dev`, which then
            # stops each child gracefully and waits for it; and the group holds the child's
            # own children (gunicorn and celery workers), so none can escape a SIGKILL.
            process_group=0,
            preexec_fn=_die_with_parent(),
        )
        self.pgid = self.proc.pid
        self.relay = threading.Thread(
            target=output.relay, args=(name, self.proc.stdout), name=f"relay-{name}", daemon=True
        )
        self.relay.start()

    def running(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL whatever is left of the group (the leader, or workers it left behind)."""
        if self.running() or _live_group_members(self.pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait()
        self.relay.join(timeout=2)

    def exit_description(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


class DevStack:
    """`parley dev`: Postgres and Redis (found or embedded), migrations, the demo user and
    room, then web, realtime and worker as supervised child processes."""

    def __init__(self, *, web_port: int, realtime_port: int, state_dir: Path) -> None:
        self.web_port = web_port
        self.realtime_port = realtime_port
        self.state_dir = state_dir.resolve()
        self.output = _Output()
        self.children: list[_Child] = []
        self.services: list[_Child] = []
        self.stoppers: list = []
        self.embedded_postgres = False
        self.reaper: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self.shutting_down = False
        self.force = False

    # -- plumbing

    def say(self, text: str) -> None:
        self.output.line("dev", text)

    def _on_signal(self, signum, frame) -> None:
        # Only flags here; the main loop acts on them between steps.
        if self.stop_signal is None and not self.shutting_down:
            self.stop_signal = signum
        else:
            self.force = True  # a second Ctrl-C: kill what is left without waiting

    def _check_stop(self) -> None:
        if self.stop_signal is not None:
            raise _Stopped

    def _check_services(self) -> None:
        for child in self.services:
            if not child.running():
                raise _DevError(
                    f"{child.name} exited unexpectedly ({child.exit_description()}); "
                    "stopping the others"
                )

    def _spawn(self, name: str, argv: list[str], env: dict) -> _Child:
        child = _Child(name, argv, env, self.output)
        self.children.append(child)
        self._tell_reaper(f"group {child.pgid}")
        return child

    def _start_reaper(self) -> None:
        # Started first, while this process has no other threads or children.
        self.reaper = subprocess.Popen(
            [sys.executable, "-c", "from parley.cli import _reaper_main; _reaper_main()"],
            stdin=subprocess.PIPE,
            process_group=0,
        )

    def _tell_reaper(self, line: str) -> None:
        if self.reaper and self.reaper.stdin:
            with contextlib.suppress(OSError, ValueError):
                self.reaper.stdin.write(line.encode() + b"\n")
                self.reaper.stdin.flush()

    # -- the run

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            self._start()
            while True:
                self._check_stop()
                self._check_services()
                time.sleep(0.2)
        except _Stopped:
            return 0
        except _DevError as exc:
            self.say(f"error: {exc}")
            return 1
        finally:
            self._shutdown()

    def _start(self) -> None:
        if self.web_port == self.realtime_port:
            raise _DevError("--port and --realtime-port must differ")
        for option, port in (("--port", self.web_port), ("--realtime-port", self.realtime_port)):
            if not _port_free(port):
                raise _DevError(f"port {port} is in use; choose another with {option}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._start_reaper()
        env = self._child_env(*self._ensure_services())
        self._check_stop()
        self._run_once("migrate", [*CLI, "migrate", "--noinput"], env)
        password = self._demo_password()
        self._run_once(
            "demo",
            [*CLI, "manage", "parley_demo", "--username", "demo"],
            {**env, "PARLEY_DEMO_PASSWORD": password},
        )
        self.services.append(
            self._spawn(
                "web",
                [*CLI, "web", "--bind", f"127.0.0.1:{self.web_port}", "--workers", "2"],
                env,
            )
        )
        self.services.append(
            self._spawn(
                "realtime",
                [*CLI, "realtime", "--host", "127.0.0.1", "--port", str(self.realtime_port)],
                env,
            )
        )
        if importlib.util.find_spec(CELERY_APP) is None:
            self.say(f"worker not started: the Celery app {CELERY_APP} does not exist yet")
        else:
            self.services.append(
                self._spawn(
                    "worker",
                    [*CLI, "worker", "--concurrency", "2", "--name", f"dev-{os.getpid()}@%h"],
                    env,
                )
            )
        self._wait_ready()
        url = f"http://127.0.0.1:{self.web_port}/"
        for line in (
            "",
            f"Parley is running: open {url}",
            f"Log in as demo with the password {password} (or sign up)",
            f"WebSockets: ws://127.0.0.1:{self.realtime_port}/ws/chat/",
            "Press Ctrl-C to stop.",
            "",
        ):
            self.say(line)

    def _ensure_services(self) -> tuple[str, str]:
        database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
        self.say(f"Postgres at {_redact(database_url)}, Redis at {_redact(redis_url)}")
        from parley.embedded import (
            EmbeddedPostgres,
            EmbeddedRedis,
            ensure_services,
            postgres_answers,
        )

        try:
            db, rd, self.stoppers = ensure_services(
                self.state_dir, database_url=database_url, redis_url=redis_url
            )
        except Exception as exc:
            # A Postgres started before Redis failed would otherwise be left running.
            with contextlib.suppress(Exception):
                if not postgres_answers(database_url):
                    EmbeddedPostgres(self.state_dir).stop()
            if isinstance(exc, ImportError):
                raise _DevError(
                    f"Postgres or Redis does not answer and the embedded servers are not "
                    f"installed ({exc}); install parley[embedded] or set DATABASE_URL and "
                    "REDIS_URL"
                ) from None
            raise _DevError(f"could not reach or start Postgres and Redis: {exc}") from None
        for stop in self.stoppers:
            server = getattr(stop, "__self__", None)
            if isinstance(server, EmbeddedPostgres):
                self.embedded_postgres = True
                self._tell_reaper(f"postgres {self.state_dir}")
                self.say(f"started embedded Postgres in {server.root}: {_redact(db)}")
            elif isinstance(server, EmbeddedRedis):
                if server.proc is not None:
                    self._tell_reaper(f"redis {server.proc.pid}")
                self.say(f"started embedded Redis in {server.root}: {_redact(rd)}")
        return db, rd

    def _child_env(self, database_url: str, redis_url: str) -> dict:
        env = dict(os.environ)
        # Each service decides about multi-process metrics itself (parley web does).
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if redis_url != (os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL):
            # Embedded Redis: the configured one does not answer, so neither would
            # separate channel-layer or broker URLs pointing at it.
            env["CHANNEL_LAYER_URL"] = env["CELERY_BROKER_URL"] = redis_url
        env.update(
            DJANGO_SETTINGS_MODULE=SETTINGS_MODULE,
            DEBUG="true",
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            # Web and realtime listen on different ports in development; in production a
            # proxy puts both behind one origin.
            REALTIME_PUBLIC_URL=f"ws://127.0.0.1:{self.realtime_port}/ws/chat/",
            PARLEY_PUBLIC_URL=f"http://127.0.0.1:{self.web_port}",
            PYTHONUNBUFFERED="1",
        )
        # Quick stops: one machine has no other replica to hand requests or sockets to.
        env.setdefault("WEB_GRACEFUL_TIMEOUT", "5")
        env.setdefault("REALTIME_DRAIN_SECONDS", "1")
        env.setdefault("REALTIME_GRACE_SECONDS", "10")
        # The worker's health/metrics port and heartbeat file default to fixed values that
        # a second stack on this machine (or the tests) would share.
        env.setdefault("WORKER_METRICS_PORT", str(_free_port()))
        env.setdefault("WORKER_HEARTBEAT_FILE", str(self.state_dir / "worker.heartbeat"))
        return env

    def _run_once(self, name: str, argv: list[str], env: dict) -> None:
        child = self._spawn(name, argv, env)
        while child.running():
            self._check_stop()
            time.sleep(0.1)
        child.relay.join(timeout=2)
        if child.proc.returncode != 0:
            raise _DevError(f"{name} failed ({child.exit_description()})")

    def _demo_password(self) -> str:
        """The demo user's password: generated on the first run, then kept in the state
        folder so that it stays the same from run to run."""
        path = self.state_dir / "demo-password"
        with contextlib.suppress(FileNotFoundError):
            password = path.read_text().strip()
            if password:
                return password
        password = secrets.token_urlsafe(12)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        return password

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        readyz = f"http://127.0.0.1:{self.web_port}/readyz"
        web_ready = realtime_up = False
        while not (web_ready and realtime_up):
            self._check_stop()
            self._check_services()
            if time.monotonic() > deadline:
                waiting = "web /readyz" if not web_ready else "realtime"
                raise _DevError(f"{waiting} not ready after {READY_TIMEOUT:.0f}s")
            web_ready = web_ready or _http_status(readyz) == 200
            realtime_up = realtime_up or _port_open(self.realtime_port)
            time.sleep(0.25)

    def _shutdown(self) -> None:
        self.shutting_down = True
        if self.stop_signal is not None:
            self.say(f"{signal.Signals(self.stop_signal).name} received; stopping")
        running = [child for child in self.children if child.running()]
        for child in running:
            child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(c.running() for c in running) and time.monotonic() < deadline:
            if self.force:
                break
            time.sleep(0.1)
        for child in self.children:
            if child.running():
                self.say(f"{child.name} did not stop in time; killing it")
            child.kill()
        for stop in reversed(self.stoppers):
            try:
                stop()
            except Exception as exc:
                self.say(f"could not stop an embedded server: {exc}")
        if self.embedded_postgres:
            _reap_postgres(self.state_dir, self.say)  # makes sure it is down
        if self.reaper is not None:
            self._tell_reaper("done")
            with contextlib.suppress(OSError):
                self.reaper.stdin.close()
            try:
                self.reaper.wait(5)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
                self.reaper.wait()
        if self.children or self.stoppers:
            self.say("stopped")


def _reaper_main() -> None:
    """Cleans up after `parley dev` when it dies without doing so itself (SIGKILL, the
    OOM killer): its children already got SIGTERM from the kernel (PR_SET_PDEATHSIG),
    but whatever ignores that, and the embedded servers, which run detached, would
    outlive it.

    `parley dev` writes what it starts to this process's stdin, one item a line, and
    "done" once it has stopped everything; end of input without "done" means it died.
    """
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # those are for `parley dev`
    groups: list[int] = []
    postgres_dirs: list[str] = []
    redis_pids: list[int] = []
    for line in sys.stdin:
        kind, _, value = line.strip().partition(" ")
        if kind == "done":
            return
        if kind == "group":
            groups.append(int(value))
        elif kind == "postgres":
            postgres_dirs.append(value)
        elif kind == "redis":
            redis_pids.append(int(value))

    def say(text: str) -> None:
        with contextlib.suppress(OSError):
            print(f"{'reaper':<8} | {text}", flush=True)

    say("parley dev exited without cleaning up; stopping what it started")
    if not sys.platform.startswith("linux"):  # no parent-death signal there
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and any(_live_group_members(g) for g in groups):
        time.sleep(0.2)
    for pgid in groups:
        if stragglers := _live_group_members(pgid):
            say(f"killing {len(stragglers)} process(es) that ignored SIGTERM")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    for pid in redis_pids:
        _stop_pid(pid, "redis", signal.SIGTERM)
    for state_dir in postgres_dirs:
        _reap_postgres(Path(state_dir), say)
    say("done")


def _reap_postgres(state_dir: Path, say) -> None:
    from parley.embedded import EmbeddedPostgres

    postgres = EmbeddedPostgres(state_dir)
    try:
        postgres.stop()
    except Exception as exc:
        say(f"pg_ctl could not stop the embedded Postgres in {postgres.root}: {exc}")
    # pg_ctl's own failures are silent (its output is captured): make sure it is down.
    try:
        pid = int((postgres.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if _proc_name(pid) == "postgres":
        say(f"Postgres in {postgres.root} still runs; sending it SIGINT (fast shutdown)")
        _stop_pid(pid, "postgres", signal.SIGINT)


def _stop_pid(pid: int, name_prefix: str, first: signal.Signals) -> None:
    """Signal `first`, then SIGKILL, a process that is still the one we mean (by name)."""
    for sig, wait in ((first, 10.0), (signal.SIGKILL, 5.0)):
        name = _proc_name(pid)
        if name is None or not name.startswith(name_prefix):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _proc_name(pid) is not None:
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
