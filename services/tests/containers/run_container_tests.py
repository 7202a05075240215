"""Builds Parley's image and runs it with Podman: the container tests (issue 6).

    .venv/bin/python services/tests/containers/run_container_tests.py [options]

    --install               install Podman and podman-compose first (CI), as in
                            shared/CONTAINERS.md; otherwise nothing is installed
    --skip-if-unavailable   exit 0 (after saying why) where Podman cannot run
    --skip-compose          only the single-container part
    --keep                  leave containers running at the end (for debugging)

Not collected by pytest (the name has no test_ prefix): `make test-containers` runs it.

1. Builds the python:3.11-slim stand-in if it is missing (deploy/docker/standins/),
   then the image (deploy/docker/build-image.sh), and reports its size and build time;
   then the load-test image (`--target loadtest`).
2. Checks the image: runs as uid 10001, has no compiler, has collected static files.
3. Starts migrate, web, two realtime replicas, worker and the nginx front door as
   containers on the host network (read-only root, only /tmp writable, no
   capabilities) against this machine's Postgres and Redis, in a database, a Redis
   database number and a channel-layer prefix of their own. Then: web answers /readyz; a
   message sent over the HTTP API is delivered over WebSockets through the front door to
   a socket on each realtime replica; every process of every container runs as
   non-root; a distributed Locust run from the load-test image (a master and a worker
   container, read-only, uid 10001) through the front door ends with exit code 0, the chat
   figures and no lost message; stopping a realtime replica closes its socket with 1012
   and exits 0 within its grace period.
4. `podman-compose up -d` of docker-compose.yml (stand-ins for postgres, redis and nginx
   tagged with the names the file uses): every service becomes healthy, the message
   test passes through the published port, and `podman-compose down` stops every
   container within its stop_grace_period, none killed.

Everything it starts is removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[3]
DOCKER_DIR = ROOT / "deploy" / "docker"
COMPOSE_FILE = ROOT / "docker-compose.yml"
IMAGE = os.environ.get("PARLEY_IMAGE", "localhost/parley:latest")
LOADTEST_IMAGE = os.environ.get("PARLEY_LOADTEST_IMAGE", "localhost/parley-loadtest:latest")
BASE_IMAGE = "docker.io/library/python:3.11-slim"
# docker-compose.yml's defaults; deploy/docker/standins/build.sh builds these.
NGINX_IMAGE = "docker.io/library/nginx:1.27-bookworm"
POSTGRES_IMAGE = "docker.io/library/postgres:16-bookworm"
REDIS_IMAGE = "docker.io/library/redis:7.2-bookworm"
APP_UID = 10001
TOOLS_VENV = Path(
    os.environ.get("PARLEY_CONTAINER_TOOLS", Path.home() / ".cache" / "parley" / "container-tools")
)
PODMAN_COMPOSE_VERSION = "1.6.0"
APT_PACKAGES = [
    "podman",
    "buildah",
    "runc",
    "netavark",
    "aardvark-dns",
    "iptables",
    "catatonit",
    "fuse-overlayfs",
    "slirp4netns",
    "uidmap",
    "debootstrap",
]
CONTAINERS_CONF = """\
# Written by Parley's container tests (--install), as shared/CONTAINERS.md describes.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[network]
network_backend = "netavark"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


class Unavailable(Exception):
    """Podman cannot run here."""


class CheckFailed(Exception):
    pass


# --- output and bookkeeping -------------------------------------------------------------

results: list[tuple[str, bool, str]] = []
measurements: dict[str, str] = {}


def say(text: str) -> None:
    print(f"[containers] {text}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    say(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}")
    return ok


def require(name: str, ok: bool, detail: str = "") -> None:
    """A check the following steps depend on."""
    if not check(name, ok, detail):
        raise CheckFailed(name)


def run(
    *argv: str | Path, check_rc: bool = True, capture: bool = True, timeout: float = 600, **kw
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=capture,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,
    )
    if check_rc and proc.returncode != 0:
        out = ((proc.stdout or "") + (proc.stderr or "")).strip()
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{out[-4000:]}")
    return proc


def podman(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    return run("podman", *args, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error
            last = exc
        time.sleep(interval)
    raise CheckFailed(
        f"{what} not within {timeout:.0f}s" + (f" (last error: {last})" if last else "")
    )


def http_status(url: str, host: str | None = None, timeout: float = 3) -> int:
    import httpx

    headers = {"Host": host} if host else {}
    try:
        return httpx.get(url, headers=headers, timeout=timeout).status_code
    except httpx.HTTPError:
        return 0


# --- installing and finding Podman ------------------------------------------------------


def install() -> None:
    if os.geteuid() != 0:
        raise Unavailable("--install needs root (apt-get, /etc/containers)")
    say("installing Podman from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", env=env, timeout=900)
    run(
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        *APT_PACKAGES,
        env=env,
        timeout=1200,
    )
    conf = Path("/etc/containers/containers.conf")
    if not conf.exists() or 'runtime = "runc"' not in conf.read_text():
        if conf.exists():
            shutil.copy2(conf, conf.with_suffix(".conf.before-parley"))
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(CONTAINERS_CONF)
    cni = Path("/etc/cni/net.d/87-podman-bridge.conflist")
    if cni.exists():  # silences a CNI warning; netavark is the backend
        aside = Path("/etc/cni/net.d.disabled")
        aside.mkdir(parents=True, exist_ok=True)
        shutil.move(str(cni), aside / cni.name)
    if not (TOOLS_VENV / "bin" / "podman-compose").exists():
        say(f"installing podman-compose {PODMAN_COMPOSE_VERSION} into {TOOLS_VENV}")
        run(sys.executable, "-m", "venv", TOOLS_VENV)
        run(
            TOOLS_VENV / "bin" / "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"podman-compose=={PODMAN_COMPOSE_VERSION}",
            timeout=600,
        )


def podman_compose() -> str:
    for candidate in (shutil.which("podman-compose"), TOOLS_VENV / "bin" / "podman-compose"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise Unavailable("podman-compose is not installed (run with --install, or pip install it)")


def ensure_podman() -> str:
    if shutil.which("podman") is None:
        raise Unavailable("the podman command is not installed (run with --install)")
    proc = podman("info", "--format", "{{.Version.Version}}", check_rc=False, timeout=60)
    if proc.returncode != 0:
        raise Unavailable(f"`podman info` fails: {(proc.stderr or proc.stdout).strip()[-800:]}")
    version = proc.stdout.strip()
    probe = podman(
        "run",
        "--rm",
        "--network=none",
        "--pull=never",
        BASE_IMAGE,
        "true",
        check_rc=False,
        timeout=120,
    )
    if probe.returncode != 0 and "image not known" not in (probe.stderr or ""):
        raise Unavailable(f"podman cannot run a container: {probe.stderr.strip()[-800:]}")
    return version


# --- building ---------------------------------------------------------------------------


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check_rc=False).returncode == 0


def build_standins(what: str) -> None:
    start = time.monotonic()
    run(DOCKER_DIR / "standins" / "build.sh", what, capture=False, timeout=1200)
    say(f"stand-ins ({what}) ready in {time.monotonic() - start:.0f}s")


def _build(image: str, check_name: str, **env: str) -> tuple[float, int, int]:
    """Builds `image` with deploy/docker/build-image.sh (`env` picks the tag and target),
    as the check `check_name`, which the following steps depend on. Returns the seconds
    it took, its size and the base image's size (bytes)."""
    say(f"building {image}")
    start = time.monotonic()
    log = run(
        DOCKER_DIR / "build-image.sh",
        "--pull=never",
        check_rc=False,
        timeout=1800,
        env={**os.environ, **env, "CONTAINER_ENGINE": "podman"},
    )
    took = time.monotonic() - start
    if log.returncode != 0:
        print(log.stdout[-6000:], log.stderr[-6000:], sep="\n")
    require(check_name, log.returncode == 0, f"{took:.0f}s")
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    base = int(podman("image", "inspect", "--format", "{{.Size}}", BASE_IMAGE).stdout.strip())
    return took, size, base


def build_image() -> None:
    took, size, base = _build(IMAGE, "the image builds", PARLEY_IMAGE=IMAGE)
    measurements["build time"] = f"{took:.0f} s"
    measurements["image size"] = (
        f"{size / 1e6:.0f} MB ({(size - base) / 1e6:.0f} MB above the base)"
    )
    say(f"image size {measurements['image size']}")


def check_image() -> None:
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"]
    check(
        "the image's user is 10001",
        config.get("User") == f"{APP_UID}:{APP_UID}",
        config.get("User", ""),
    )
    probe = podman(
        "run",
        "--rm",
        "--network=none",
        "--read-only",
        "--entrypoint",
        "sh",
        IMAGE,
        "-c",
        "id -u; for c in gcc cc c++ clang make; do command -v $c; done; "
        "test -f /opt/parley/static/staticfiles.json && echo static-ok; "
        "parley --version",
    )
    lines = probe.stdout.split()
    check("a container runs as uid 10001", lines[:1] == [str(APP_UID)], lines[0] if lines else "")
    compilers = [line for line in probe.stdout.splitlines() if line.startswith("/")]
    check("the runtime image has no compiler", not compilers, ", ".join(compilers))
    check("static files are collected at build time", "static-ok" in lines)
    env = dict(item.split("=", 1) for item in config.get("Env", []))
    check(
        "PYTHONDONTWRITEBYTECODE and PYTHONUNBUFFERED are set",
        env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1",
    )
    secrets_in_layers = podman(
        "run",
        "--rm",
        "--network=none",
        "--entrypoint",
        "sh",
        IMAGE,
        "-c",
        "env | grep -c '^SECRET_KEY=' || true; ls /tmp/ca.pem /src 2>/dev/null | wc -l",
    ).stdout.split()
    check("no SECRET_KEY or build leftovers in the image", secrets_in_layers == ["0", "0"])


def build_loadtest_image() -> None:
    took, size, base = _build(
        LOADTEST_IMAGE,
        "the load-test image builds (--target loadtest)",
        PARLEY_TARGET="loadtest",
        PARLEY_LOADTEST_IMAGE=LOADTEST_IMAGE,
    )
    measurements["load-test image"] = (
        f"{size / 1e6:.0f} MB ({(size - base) / 1e6:.0f} MB above the base), built in {took:.0f} s"
    )
    say(f"load-test image size {size / 1e6:.0f} MB")
    config = json.loads(podman("image", "inspect", LOADTEST_IMAGE).stdout)[0]["Config"]
    check(
        "the load-test image's user is 10001 and its entrypoint locust",
        config.get("User") == f"{APP_UID}:{APP_UID}" and config.get("Entrypoint") == ["locust"],
        f"{config.get('User')} {config.get('Entrypoint')}",
    )
    # `docker build` without --target must still produce the Parley image.
    labels = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"].get("Labels") or {}
    check(
        "the default build target is still the Parley runtime image",
        labels.get("org.opencontainers.image.title") == "parley",
        labels.get("org.opencontainers.image.title", ""),
    )


# --- the message test (shared by both parts) --------------------------------------------


async def _message_round_trip(base: str, sockets: int) -> dict:
    """Alice, Bob and Carol sign up; Alice creates a room, Bob and Carol join, Bob opens
    `sockets` WebSockets through the front door; Alice posts a message over HTTP; every
    socket of Bob's must receive it. Carol stays offline (a notification email is due to
    her). Returns the nodes the sockets reached and Carol's address."""
    import httpx
    from websockets.asyncio.client import connect

    suffix = secrets.token_hex(4)
    ws_base = base.replace("http://", "ws://", 1)
    async with httpx.AsyncClient(base_url=base, timeout=15) as http:
        tokens = {}
        carol_email = f"carol{suffix}@example.com"
        for name in ("alice", "bob", "carol"):
            account = {"username": f"{name}{suffix}", "password": f"pw-{secrets.token_hex(8)}"}
            if name == "carol":
                account["email"] = carol_email
            resp = await http.post("/api/v1/accounts", json=account)
            if resp.status_code != 201:
                raise CheckFailed(f"sign-up answered {resp.status_code}: {resp.text[:300]}")
            tokens[name] = resp.json()["token"]
        alice = {"Authorization": f"Bearer {tokens['alice']}"}
        bob = {"Authorization": f"Bearer {tokens['bob']}"}
        room = await http.post("/api/v1/rooms", json={"name": f"Ops {suffix}"}, headers=alice)
        if room.status_code != 201:
            raise CheckFailed(f"creating a room answered {room.status_code}: {room.text[:300]}")
        room = room.json()
        for name in ("bob", "carol"):
            joined = await http.post(
                f"/api/v1/rooms/{room['slug']}/join",
                headers={"Authorization": f"Bearer {tokens[name]}"},
            )
            if joined.status_code != 200:
                raise CheckFailed(f"joining answered {joined.status_code}: {joined.text[:300]}")

        conns = []
        nodes = []
        try:
            for _ in range(sockets):
                ws = await connect(f"{ws_base}/ws/chat/", additional_headers=bob, open_timeout=10)
                conns.append(ws)
                hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if hello.get("type") != "hello":
                    raise CheckFailed(f"first frame is not hello: {hello}")
                nodes.append(hello.get("node"))
            body = f"hello through the front door {suffix}"
            sent = await http.post(
                f"/api/v1/conversations/{room['id']}/messages",
                json={"body": body, "client_id": f"c-{suffix}"},
                headers=alice,
            )
            if sent.status_code != 201:
                raise CheckFailed(f"sending answered {sent.status_code}: {sent.text[:300]}")
            seq = sent.json()["seq"]

            async def receive(ws):
                while True:
                    frame = json.loads(await ws.recv())
                    if frame.get("type") == "message" and frame.get("conversation") == room["id"]:
                        return frame

            frames = await asyncio.wait_for(asyncio.gather(*(receive(ws) for ws in conns)), 15)
            for frame in frames:
                if frame.get("body") != body or frame.get("seq") != seq:
                    raise CheckFailed(f"received a different message: {frame}")
        finally:
            for ws in conns:
                with contextlib.suppress(Exception):
                    await ws.close()
    return {"nodes": nodes, "room": room["id"], "offline_email": carol_email}


def message_round_trip(base: str, sockets: int = 2) -> dict:
    return asyncio.run(_message_round_trip(base, sockets))


# --- part 1: containers on the host network ---------------------------------------------


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    default = {"redis": 6379}.get(parts.scheme, 5432)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default), 2):
            return True
    except OSError:
        return False


def container_uids(name: str) -> list[tuple[int, str]]:
    """(effective uid, command) of every process of a running container, read from
    /proc on the host (rootful Podman: container uids are host uids)."""
    pids = podman("top", name, "hpid", "comm").stdout.splitlines()[1:]
    found = []
    for line in pids:
        pid, _, comm = line.strip().partition(" ")
        with contextlib.suppress(FileNotFoundError, ValueError):
            status = Path(f"/proc/{pid}/status").read_text()
            uid_line = next(x for x in status.splitlines() if x.startswith("Uid:"))
            found.append((int(uid_line.split()[2]), comm.strip()))
    return found


class HostNetworkStack:
    """migrate, web, realtime x2, worker and nginx, as `podman run --network=host`."""

    def __init__(self, run_id: str, workdir: Path) -> None:
        self.run_id = run_id
        self.workdir = workdir
        self.label = f"parley-container-test={run_id}"
        self.names: list[str] = []
        self.db_name = f"parley_ctest_{run_id.replace('-', '_')}"
        database_url = os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/parley"
        # CREATE/DROP DATABASE through the maintenance database: the configured one
        # need not exist yet on a fresh machine.
        self.admin_url = urlunsplit(urlsplit(database_url)._replace(path="/postgres"))
        self.database_url = urlunsplit(urlsplit(database_url)._replace(path="/" + self.db_name))
        redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
        self.redis_db = int(os.environ.get("PARLEY_CONTAINER_TEST_REDIS_DB", "14"))
        self.redis_url = urlunsplit(urlsplit(redis_url)._replace(path=f"/{self.redis_db}"))
        self.ports = {
            "web": free_port(),
            "realtime1": free_port(),
            "realtime2": free_port(),
            "worker": free_port(),
            "front": free_port(),
        }
        self.db_created = False

    # -- outside services

    def prepare_backends(self) -> None:
        import psycopg
        import redis

        local = ("127.0.0.1", "localhost", "::1")
        usable = all(
            urlsplit(url).hostname in local and _answers(url)
            for url in (self.admin_url, self.redis_url)
        )
        if usable:
            say(
                f"using this machine's Postgres and Redis (database {self.db_name}, "
                f"Redis db {self.redis_db}, channel prefix parley-ctest-{self.run_id})"
            )
        else:
            self.start_standin_backends()
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_created = True
        redis.Redis.from_url(self.redis_url).flushdb()

    def start_standin_backends(self) -> None:
        """Postgres and Redis from the stand-in images, on free loopback ports, where
        this machine runs none (a fresh CI machine)."""
        import psycopg
        import redis

        say("no Postgres and Redis on this machine's loopback: starting stand-in containers")
        pg_port, redis_port, password = free_port(), free_port(), secrets.token_hex(16)
        base = ["--label", self.label, "--network=host", "--pull=never"]
        podman(
            "run",
            "-d",
            "--name",
            f"parley-ctest-{self.run_id}-postgres",
            *base,
            "-e",
            f"POSTGRES_PASSWORD={password}",
            POSTGRES_IMAGE,
            "postgres",
            "-c",
            f"port={pg_port}",
            "-c",
            "listen_addresses=127.0.0.1",
        )
        podman(
            "run",
            "-d",
            "--name",
            f"parley-ctest-{self.run_id}-redis",
            *base,
            REDIS_IMAGE,
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        )
        self.admin_url = f"postgres://postgres:{password}@127.0.0.1:{pg_port}/postgres"
        self.database_url = urlunsplit(urlsplit(self.admin_url)._replace(path="/" + self.db_name))
        self.redis_url = f"redis://127.0.0.1:{redis_port}/{self.redis_db}"

        def postgres_up():
            with psycopg.connect(self.admin_url, connect_timeout=3) as conn:
                return conn.execute("SELECT 1").fetchone()

        wait_until("the stand-in Postgres", postgres_up, 90)
        wait_until("the stand-in Redis", lambda: redis.Redis.from_url(self.redis_url).ping(), 30)

    def drop_backends(self) -> None:
        import psycopg
        import redis

        if self.db_created:
            with (
                contextlib.suppress(Exception),
                psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn,
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            redis.Redis.from_url(self.redis_url).flushdb()

    # -- containers

    def env_file(self) -> Path:
        env = {
            "DEBUG": "false",
            "SECRET_KEY": secrets.token_urlsafe(60),
            "ALLOWED_HOSTS": "localhost,127.0.0.1",
            "SECURE_SSL_REDIRECT": "false",
            "SESSION_COOKIE_SECURE": "false",
            "CSRF_COOKIE_SECURE": "false",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "CHANNEL_LAYER_PREFIX": f"parley-ctest-{self.run_id}",
            "LOG_FORMAT": "json",
            "PARLEY_PUBLIC_URL": f"http://127.0.0.1:{self.ports['front']}",
            "REALTIME_DRAIN_SECONDS": "2",
            "WORKER_METRICS_PORT": str(self.ports["worker"]),
            "WEB_CONCURRENCY": "2",
        }
        path = self.workdir / "parley.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        path.chmod(0o600)
        return path

    def common(self, name: str) -> list[str]:
        return [
            "--name",
            name,
            "--label",
            self.label,
            "--network=host",
            # Only /tmp is writable, as in docker-compose.yml and the chart.
            "--read-only",
            "--read-only-tmpfs=false",
            "--tmpfs",
            "/tmp:rw,mode=1777",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges",
            "--pull=never",
        ]

    def start(self, name: str, *args: str, image: str = IMAGE, extra: tuple = ()) -> None:
        full = f"parley-ctest-{self.run_id}-{name}"
        podman("run", "-d", *self.common(full), *extra, image, *args)
        self.names.append(full)

    def nginx_config(self) -> Path:
        text = (DOCKER_DIR / "nginx" / "nginx.conf").read_text()
        p = self.ports
        replacements = {
            "server web:8000;": f"server 127.0.0.1:{p['web']};",
            "server realtime:8001;": (
                f"server 127.0.0.1:{p['realtime1']};\n        server 127.0.0.1:{p['realtime2']};"
            ),
            "listen 8080;": f"listen 127.0.0.1:{p['front']};",
        }
        for old, new in replacements.items():
            if old not in text:
                raise CheckFailed(f"deploy/docker/nginx/nginx.conf no longer contains {old!r}")
            text = text.replace(old, new)
        path = self.workdir / "nginx.conf"
        path.write_text(text)
        path.chmod(0o644)
        return path

    def run_all(self) -> None:
        env = ("--env-file", str(self.env_file()))
        p = self.ports
        migrate = podman(
            "run",
            "--rm",
            *self.common(f"parley-ctest-{self.run_id}-migrate"),
            *env,
            IMAGE,
            "migrate",
            "--noinput",
            check_rc=False,
            timeout=300,
        )
        require(
            "migrate runs in a container and exits 0",
            migrate.returncode == 0,
            (migrate.stderr or "").strip()[-1500:] if migrate.returncode else "",
        )
        self.start("web", "web", "--bind", f"127.0.0.1:{p['web']}", extra=env)
        for rt in ("realtime1", "realtime2"):
            # On the host network both replicas share the host name, which the default
            # node id is made of: name them, as Kubernetes does with the pod name.
            node = ("-e", f"PARLEY_NODE_ID=ctest-{rt}")
            self.start(
                rt, "realtime", "--host", "127.0.0.1", "--port", str(p[rt]), extra=env + node
            )
        self.start("worker", "worker", "--concurrency", "1", extra=env)
        self.start(
            "nginx",
            image=NGINX_IMAGE,
            extra=("--user", "101:101", "-v", f"{self.nginx_config()}:/etc/nginx/nginx.conf:ro,Z"),
        )

    def logs(self, name: str, tail: int = 40) -> str:
        proc = podman("logs", "--tail", str(tail), name, check_rc=False)
        return (proc.stdout or "") + (proc.stderr or "")

    def running(self, short: str) -> bool:
        name = f"parley-ctest-{self.run_id}-{short}"
        proc = podman("inspect", "--format", "{{.State.Running}}", name, check_rc=False)
        return proc.stdout.strip() == "true"

    def verify(self) -> None:
        p = self.ports
        try:
            wait_until(
                "web /readyz",
                lambda: (
                    self._alive("web") and http_status(f"http://127.0.0.1:{p['web']}/readyz") == 200
                ),
                90,
            )
            check("web answers /readyz (200) in its container", True)
            for rt in ("realtime1", "realtime2"):
                wait_until(
                    f"{rt} /readyz",
                    lambda rt=rt: (
                        self._alive(rt) and http_status(f"http://127.0.0.1:{p[rt]}/readyz") == 200
                    ),
                    60,
                )
            check("both realtime replicas answer /readyz", True)
            wait_until(
                "worker /readyz",
                lambda: (
                    self._alive("worker")
                    and http_status(f"http://127.0.0.1:{p['worker']}/readyz") == 200
                ),
                90,
            )
            worker = f"parley-ctest-{self.run_id}-worker"
            wait_until(
                "worker liveness",
                lambda: (
                    podman(
                        "exec",
                        worker,
                        "python",
                        "-m",
                        "parley.worker.health",
                        "--liveness",
                        check_rc=False,
                    ).returncode
                    == 0
                ),
                60,
            )
            check("the worker is ready (/readyz) and live (heartbeat exec check)", True)
            wait_until(
                "nginx",
                lambda: (
                    self._alive("nginx")
                    and http_status(f"http://127.0.0.1:{p['front']}/nginx-health") == 200
                ),
                30,
            )
            front = f"http://127.0.0.1:{p['front']}"
            check("web /readyz through the front door", http_status(f"{front}/readyz") == 200)
        except CheckFailed as exc:
            for name in self.names:
                say(f"--- last lines of {name}:\n{self.logs(name)}")
            raise CheckFailed(str(exc)) from None

        try:
            got = message_round_trip(front, sockets=2)
            nodes = got["nodes"]
            check(
                "a message sent over the API arrives over WebSockets through the front door",
                True,
                f"on sockets at nodes {nodes}",
            )
            check(
                "the front door spreads sockets over both realtime replicas",
                len(set(nodes)) == 2,
                f"nodes {nodes}",
            )
        except Exception as exc:
            check(
                "a message sent over the API arrives over WebSockets through the front door",
                False,
                f"{exc.__class__.__name__}: {exc}",
            )
            for name in self.names:
                say(f"--- last lines of {name}:\n{self.logs(name)}")

        for name in self.names:
            uids = container_uids(name)
            short = name.rsplit("-", 1)[1]
            expected = "uid 10001" if short != "nginx" else "non-root (101)"
            ok = bool(uids) and all(
                uid == APP_UID if short != "nginx" else uid != 0 for uid, _ in uids
            )
            check(
                f"every process of {short} runs as {expected}",
                ok,
                ", ".join(f"{c}={u}" for u, c in uids),
            )

    def verify_loadtest(self) -> None:
        """The load-test image as the chart runs it: a headless Locust master and one
        worker (distributed), read-only root, /tmp on a tmpfs, uid 10001, chat scenario
        through the front door, users signing up over the API. Locust exits 0 when no
        request failed (1 when any did, 2 on an error in the locustfile); the master prints
        the chat figures its worker checked against history."""
        try:
            self._loadtest()
        except Exception as exc:  # the drain test still runs
            check("the load-test image runs Locust", False, f"{exc.__class__.__name__}: {exc}")
            say(f"--- last lines of the Locust worker:\n{self.logs(self._locust_worker)}")

    @property
    def _locust_worker(self) -> str:
        return f"parley-ctest-{self.run_id}-locust-worker"

    def _loadtest(self) -> None:
        start = time.monotonic()
        port = free_port()
        worker = self._locust_worker
        user = ("--user", f"{APP_UID}:{APP_UID}")
        podman(
            "run", "-d", *self.common(worker), *user, LOADTEST_IMAGE,
            "--worker", "--master-host", "127.0.0.1", "--master-port", str(port),
        )  # fmt: skip
        master = podman(
            "run", "--rm", *self.common(f"parley-ctest-{self.run_id}-locust-master"), *user,
            LOADTEST_IMAGE, "--headless", "--master", "--master-bind-host", "127.0.0.1",
            "--master-bind-port", str(port), "--expect-workers", "1",
            "--expect-workers-max-wait", "60",
            "--host", f"http://127.0.0.1:{self.ports['front']}",
            "--scenario", "chat", "--users", "10", "--spawn-rate", "5", "--run-time", "20s",
            "--csv", "/tmp/locust", "--only-summary",
            check_rc=False, timeout=240,
        )  # fmt: skip
        out = (master.stdout or "") + (master.stderr or "")
        took = time.monotonic() - start
        measurements["load-test run (10 users, 20 s, master + 1 worker)"] = f"{took:.0f} s"
        check(
            "a distributed Locust run from the load-test image exits 0 (no failed request)",
            master.returncode == 0,
            f"exit code {master.returncode} after {took:.0f}s"
            + ("" if master.returncode == 0 else f"\n{out[-4000:]}"),
        )
        # The master's quit reaches the worker within a second.
        worker_exit = podman("wait", worker, check_rc=False, timeout=60).stdout.strip()
        check("the Locust worker exits 0 when the master is done", worker_exit == "0", worker_exit)

        def figure(pattern: str) -> re.Match | None:
            return re.search(pattern, out, re.MULTILINE)

        ack = figure(r"^\s*send->ack: n=(\d+) p50 \S+ p90 \S+ p99 (\S+)")
        delivery = figure(r"^\s*send->delivery: n=(\d+) p50 \S+ p90 \S+ p99 (\S+)")
        counts = figure(r"^sends (\d+) .*, acks (\d+), deliveries (\d+)")
        history = figure(
            r"^history check .*: lost deliveries (\d+) of (\d+), duplicate frames (\d+), "
            r"order violations (\d+), acked but missing (\d+)"
        )
        found = bool(ack and delivery and counts)
        check(
            "the run prints the Parley chat figures: send->ack and delivery percentiles",
            found and int(ack[1]) > 0 and int(delivery[1]) > 0 and int(counts[3]) > 0,
            f"send->ack n={ack[1]} p99 {ack[2]} ms, send->delivery n={delivery[1]} p99 "
            f"{delivery[2]} ms, deliveries {counts[3]}"
            if found
            else out[-3000:],
        )
        lost = [int(x) for x in history.groups()] if history else []
        check(
            "the worker checked every socket against history: nothing lost or duplicated",
            bool(lost) and lost[1] > 0 and lost[0] == lost[2] == lost[3] == lost[4] == 0,
            history[0] if history else "no history check in the output",
        )
        check(
            "the chat figures are saved under /tmp on a read-only root",
            "chat figures saved to /tmp/parley-loadtest/" in out,
        )

    def verify_drain(self) -> None:
        """A socket on a realtime replica that is stopped is closed with 1012, and the
        replica exits 0 well within its grace period."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        port = self.ports["realtime1"]
        name = f"parley-ctest-{self.run_id}-realtime1"

        async def scenario() -> tuple[int | None, float, int]:
            import httpx

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.ports['front']}") as c:
                resp = await c.post(
                    "/api/v1/accounts",
                    json={
                        "username": f"drain{secrets.token_hex(4)}",
                        "password": f"pw-{secrets.token_hex(8)}",
                    },
                )
                token = resp.json()["token"]
            ws = await connect(
                f"ws://127.0.0.1:{port}/ws/chat/",
                additional_headers={"Authorization": f"Bearer {token}"},
            )
            await ws.recv()  # hello
            start = time.monotonic()
            stopper = asyncio.create_task(
                asyncio.to_thread(podman, "stop", "-t", "30", name, check_rc=False)
            )
            code = None
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
            await stopper
            took = time.monotonic() - start
            exit_code = int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout)
            return code, took, exit_code

        try:
            code, took, exit_code = asyncio.run(scenario())
            check(
                "stopping a realtime replica closes its sockets with 1012",
                code == 1012,
                f"code {code}",
            )
            check(
                "the replica drains and exits 0 within its grace period (no SIGKILL)",
                exit_code == 0 and took < 30,
                f"exit code {exit_code} after {took:.1f}s",
            )
        except Exception as exc:
            check(
                "stopping a realtime replica closes its sockets with 1012",
                False,
                f"{exc.__class__.__name__}: {exc}",
            )

    def _alive(self, short: str) -> bool:
        if not self.running(short):
            name = f"parley-ctest-{self.run_id}-{short}"
            raise CheckFailed(f"container {short} exited:\n{self.logs(name)}")
        return True

    def cleanup(self) -> None:
        listed = podman(
            "ps", "-aq", "--filter", f"label={self.label}", check_rc=False
        ).stdout.split()
        if listed:
            podman("rm", "-f", "-t", "5", *listed, check_rc=False, timeout=120)
        self.drop_backends()


# --- part 2: docker-compose.yml under podman-compose ------------------------------------


class ComposeStack:
    def __init__(self, run_id: str, workdir: Path) -> None:
        self.project = f"parley-ctest-{run_id}"
        self.workdir = workdir
        self.port = free_port()
        self.mail_port = free_port()
        self.started = False
        self.tool = podman_compose()

    def compose(self, *args: str, timeout: float = 600, check_rc: bool = True):
        return run(
            self.tool,
            "--project-name",
            self.project,
            "--env-file",
            self.workdir / "compose.env",
            "--file",
            COMPOSE_FILE,
            *args,
            timeout=timeout,
            check_rc=check_rc,
            cwd=ROOT,
        )

    def write_env(self) -> None:
        env_path = self.workdir / "compose.env"
        run(DOCKER_DIR / "init-env.sh", env_path)
        extra = {
            "PARLEY_HTTP_PORT": str(self.port),
            "MAIL_UI_PORT": str(self.mail_port),
            "PARLEY_IMAGE": IMAGE,
            "PARLEY_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
        }
        lines = [
            line for line in env_path.read_text().splitlines() if line.split("=", 1)[0] not in extra
        ]
        env_path.write_text("\n".join(lines + [f"{k}={v}" for k, v in extra.items()]) + "\n")

    def containers(self) -> list[dict]:
        out = podman(
            "ps",
            "-a",
            "--format",
            "json",
            "--filter",
            f"label=io.podman.compose.project={self.project}",
        ).stdout
        return json.loads(out or "[]")

    def up(self) -> None:
        self.write_env()
        self.started = True
        start = time.monotonic()
        proc = self.compose("up", "-d", timeout=900, check_rc=False)
        require(
            "podman-compose up -d starts docker-compose.yml",
            proc.returncode == 0,
            (proc.stderr or "").strip()[-3000:] if proc.returncode else "",
        )
        names = sorted(c["Names"][0] for c in self.containers())
        services = {c["Labels"].get("com.docker.compose.service") for c in self.containers()}
        expected = {
            "postgres",
            "redis",
            "mailcatcher",
            "migrate",
            "web",
            "realtime",
            "worker",
            "nginx",
        }
        require(
            "every service of the file has a container", expected <= services, f"{sorted(services)}"
        )
        replicas = [n for n in names if "realtime" in n]
        check("realtime runs as two replicas", len(replicas) == 2, ", ".join(replicas))
        self.wait_healthy()
        measurements["compose up to all healthy"] = f"{time.monotonic() - start:.0f} s"

    def wait_healthy(self, timeout: float = 240) -> None:
        """Drives the health checks with `podman healthcheck run` (Podman runs them on
        systemd timers, which a machine without systemd lacks) until every container
        with one is healthy, and migrate has exited 0."""
        deadline = time.monotonic() + timeout
        pending: dict[str, str] = {}
        while time.monotonic() < deadline:
            pending = {}
            for c in self.containers():
                name = c["Names"][0]
                service = c["Labels"].get("com.docker.compose.service")
                state = json.loads(podman("inspect", name).stdout)[0]
                if service == "migrate":
                    st = state["State"]
                    if st["Status"] == "exited" and st["ExitCode"] != 0:
                        raise CheckFailed(f"migrate exited {st['ExitCode']}:\n{self.logs(name)}")
                    if st["Status"] != "exited":
                        pending[name] = st["Status"]
                    continue
                if not state["State"]["Running"]:
                    pending[name] = state["State"]["Status"]
                    continue
                hc = podman("healthcheck", "run", name, check_rc=False)
                if hc.returncode != 0:
                    pending[name] = (hc.stdout + hc.stderr).strip()[-200:] or "unhealthy"
            if not pending:
                check("every compose service becomes healthy (migrate exits 0)", True)
                return
            time.sleep(3)
        for name in pending:
            say(f"--- last lines of {name}:\n{self.logs(name)}")
        raise CheckFailed(f"not healthy in {timeout:.0f}s: {pending}")

    def logs(self, name: str) -> str:
        proc = podman("logs", "--tail", "40", name, check_rc=False)
        return (proc.stdout or "") + (proc.stderr or "")

    def verify(self) -> None:
        front = f"http://127.0.0.1:{self.port}"
        check(
            "the published port answers /readyz through nginx",
            http_status(f"{front}/readyz") == 200,
        )
        got = None
        try:
            got = message_round_trip(front, sockets=2)
            nodes = got["nodes"]
            check(
                "compose: a message sent over the API arrives over WebSockets",
                True,
                f"nodes {nodes}",
            )
            check(
                "compose: nginx spreads sockets over both realtime replicas", len(set(nodes)) == 2
            )
        except Exception as exc:
            check(
                "compose: a message sent over the API arrives over WebSockets",
                False,
                f"{exc.__class__.__name__}: {exc}",
            )
        if got:
            self.verify_mail(got["offline_email"])
        app = [
            c["Names"][0]
            for c in self.containers()
            if c["Labels"].get("com.docker.compose.service") in ("web", "realtime", "worker")
            and c["State"] == "running"
        ]
        bad = {}
        for name in app:
            uids = {uid for uid, _ in container_uids(name)}
            if uids != {APP_UID}:
                bad[name] = sorted(uids)
        check(
            "compose: web, realtime and worker processes all run as uid 10001",
            not bad and bool(app),
            str(bad),
        )

    def verify_mail(self, address: str) -> None:
        """The worker emails the member who was offline; the mail catcher shows it."""
        import httpx

        def caught():
            url = f"http://127.0.0.1:{self.mail_port}/api/messages"
            messages = httpx.get(url, timeout=5).json()
            return [m for m in messages if address in m["to"]]

        try:
            found = wait_until("the notification email", caught, 60, interval=2)
            check(
                "compose: the offline member's notification email reaches the mail catcher",
                True,
                found[0]["subject"],
            )
        except CheckFailed as exc:
            worker = [
                c["Names"][0]
                for c in self.containers()
                if c["Labels"].get("com.docker.compose.service") == "worker"
            ]
            for name in worker:
                say(f"--- last lines of {name}:\n{self.logs(name)}")
            check(
                "compose: the offline member's notification email reaches the mail catcher",
                False,
                str(exc),
            )

    def down(self) -> None:
        """`podman-compose down`, timed; exit codes from Podman's events show whether a
        container was killed (137) instead of stopping by itself."""
        # docker-compose.yml's stop_grace_period values
        graces = {
            "postgres": 30,
            "redis": 30,
            "mailcatcher": 10,
            "web": 30,
            "realtime": 30,
            "worker": 75,
            "nginx": 30,
        }
        services = {
            c["Names"][0]: c["Labels"].get("com.docker.compose.service") for c in self.containers()
        }
        since = str(int(time.time()) - 1)
        # down removes the containers with their logs: follow them while they stop, so
        # that a container that does not stop cleanly can say why.
        followers = {}
        for name in services:
            out = tempfile.TemporaryFile()  # noqa: SIM115 (closed after down, below)
            followers[name] = (
                subprocess.Popen(
                    ["podman", "logs", "-f", "--tail", "30", name],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                ),
                out,
            )
        start = time.monotonic()
        proc = self.compose("down", "--volumes", timeout=300, check_rc=False)
        took = time.monotonic() - start
        self.started = proc.returncode != 0
        measurements["compose down"] = f"{took:.1f} s"
        check(
            "podman-compose down succeeds",
            proc.returncode == 0,
            (proc.stderr or "")[-1500:] if proc.returncode else f"{took:.1f}s",
        )
        events = podman(
            "events",
            "--stream=false",
            "--since",
            since,
            "--filter",
            "event=died",
            "--format",
            "{{.Name}} {{.ContainerExitCode}}",
            check_rc=False,
        ).stdout.splitlines()
        exit_codes = {}
        for line in events:
            name, _, code = line.rpartition(" ")
            if name in services:
                exit_codes[name] = code
        killed = {n: c for n, c in exit_codes.items() if c not in ("0",)}
        for name, (follower, out) in followers.items():
            try:
                follower.wait(timeout=5)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
            if name in killed:
                out.seek(0)
                text = out.read().decode("utf-8", "replace").splitlines()
                say(f"--- {name} exited {killed[name]}; its last log lines:")
                say("\n".join(text[-60:]))
            out.close()
        running = [n for n in services if services[n] != "migrate"]
        check(
            "down stops every container by itself within its grace period (exit 0, none killed)",
            not killed and set(running) <= set(exit_codes) and took < max(graces.values()),
            f"{took:.1f}s; exit codes {exit_codes}",
        )
        left = self.containers()
        check("down removes every container", not left, ", ".join(c["Names"][0] for c in left))

    def cleanup(self) -> None:
        if self.started:
            self.compose("down", "--volumes", "-t", "5", timeout=300, check_rc=False)
        listed = [c["Names"][0] for c in self.containers()]
        if listed:
            podman("rm", "-f", "-t", "2", *listed, check_rc=False)
        project = f"label=io.podman.compose.project={self.project}"
        vols = podman("volume", "ls", "-q", "--filter", project, check_rc=False).stdout.split()
        if vols:
            podman("volume", "rm", "-f", *vols, check_rc=False)
        nets = podman("network", "ls", "-q", "--filter", project, check_rc=False).stdout.split()
        if nets:
            podman("network", "rm", "-f", *nets, check_rc=False)


# --- main -------------------------------------------------------------------------------


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--install", action="store_true", help="install Podman and podman-compose first (root)"
    )
    parser.add_argument(
        "--skip-if-unavailable", action="store_true", help="exit 0 where Podman cannot run"
    )
    parser.add_argument("--skip-compose", action="store_true", help="skip docker-compose.yml")
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    try:
        if args.install:
            install()
        version = ensure_podman()
        say(f"podman {version}")
        if not image_exists(BASE_IMAGE):
            if shutil.which("debootstrap") is None:
                raise Unavailable(f"{BASE_IMAGE} cannot be pulled or built: debootstrap is missing")
            build_standins("base")
        if not args.skip_compose:
            podman_compose()  # fail early when it is missing
    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # an install or a build failed
        say(f"could not prepare Podman: {exc}")
        return 1
    except Unavailable as exc:
        if args.skip_if_unavailable:
            say(f"SKIPPED: Podman cannot run here: {exc}")
            return 0
        say(f"Podman cannot run here: {exc}")
        say("install it with --install (root, Debian), or pass --skip-if-unavailable to skip")
        return 1

    run_id = f"{os.getpid()}-{secrets.token_hex(2)}"
    workdir = Path(tempfile.mkdtemp(prefix="parley-ctest-"))
    host = compose = None
    try:
        build_image()
        check_image()
        build_loadtest_image()
        build_standins("services")
        host = HostNetworkStack(run_id, workdir)
        host.prepare_backends()
        host.run_all()
        host.verify()
        host.verify_loadtest()
        host.verify_drain()
        if not args.keep:
            host.cleanup()
            host = None
        if not args.skip_compose:
            compose = ComposeStack(run_id, workdir)
            compose.up()
            compose.verify()
            if not args.keep:
                compose.down()
    except CheckFailed as exc:
        check("(stopped early)", False, str(exc)[-3000:])
    except KeyboardInterrupt:
        check("(interrupted)", False)
    except Exception as exc:
        traceback.print_exc()
        check("(error)", False, f"{exc.__class__.__name__}: {str(exc)[-3000:]}")
    finally:
        if args.keep:
            say(
                f"--keep: containers left running (labels parley-container-test={run_id}, "
                f"compose project parley-ctest-{run_id})"
            )
        else:
            for stack in (host, compose):
                if stack is not None:
                    with contextlib.suppress(Exception):
                        stack.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    for key, value in measurements.items():
        say(f"{key}: {value}")
    failed = [r for r in results if not r[1]]
    passed = len(results) - len(failed)
    for name, _, detail in failed:
        say(f"failed: {name}{': ' + detail if detail else ''}")
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
