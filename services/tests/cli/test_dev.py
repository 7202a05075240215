"""`parley dev`: the whole stack for a newcomer, and nothing left running once it stops."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.cli.support import closed_port, database_name, free_port, parley_env, with_database

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

READY = r"Parley is running: open (http://\S+)"
LOGIN = r"Log in as demo with the password (\S+)"
CELERY_APP_EXISTS = importlib.util.find_spec("parley.config.celery") is not None


def dev_env(**overrides: str | None) -> dict[str, str]:
    """Same servers as the test run, a database of its own (migrated by parley dev)."""
    url = os.environ["DATABASE_URL"]
    return parley_env(DATABASE_URL=with_database(url, database_name(url) + "_dev"), **overrides)


def embedded_env() -> dict[str, str]:
    """Configured servers that do not answer: parley dev must start its own."""
    return parley_env(
        DATABASE_URL=f"postgres://postgres@127.0.0.1:{closed_port()}/parley",
        REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
        CHANNEL_LAYER_URL=None,
        CELERY_BROKER_URL=None,
    )


def start_dev(start, state_dir: Path, env: dict[str, str]):
    web_port = free_port()
    realtime_port = free_port()
    while realtime_port == web_port:
        realtime_port = free_port()
    dev = start(
        "dev",
        "--port",
        str(web_port),
        "--realtime-port",
        str(realtime_port),
        "--state-dir",
        str(state_dir),
        env=env,
    )
    return dev, web_port, realtime_port


def wait_running(dev, timeout: float = 120) -> tuple[str, str]:
    url = dev.wait_for_line(READY, timeout).group(1)
    password = dev.wait_for_line(LOGIN, 5).group(1)
    # Servers fork their own workers a moment after they answer: keep looking a while.
    for _ in range(15):
        dev.record_descendants()
        time.sleep(0.2)
    return url, password


def postmaster_pid(state_dir: Path) -> int:
    return int((state_dir / "postgres" / "data" / "postmaster.pid").read_text().split()[0])


def api_login(url: str, password: str) -> dict[str, str]:
    response = httpx.post(
        url + "api/v1/auth/token", json={"username": "demo", "password": password}, timeout=10
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


def lobby_id(url: str, headers: dict[str, str]) -> int:
    response = httpx.get(url + "api/v1/conversations", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    lobby = [c for c in response.json() if c["slug"] == "lobby"]
    assert lobby, f"the demo user is not in the Lobby: {response.json()}"
    return lobby[0]["id"]


def commands_seen(dev) -> str:
    import psutil

    lines = []
    for pid in dev.seen:
        with contextlib.suppress(psutil.NoSuchProcess):
            lines.append(" ".join(psutil.Process(pid).cmdline()))
    return "\n".join(lines)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_dev_serves_the_demo_login_and_stops_every_process(
    parley_processes, state_dir, stop_signal
):
    dev, web_port, realtime_port = start_dev(parley_processes, state_dir, dev_env())
    url, password = wait_running(dev)

    assert url == f"http://127.0.0.1:{web_port}/"
    assert (state_dir / "demo-password").read_text().strip() == password
    assert httpx.get(url + "readyz", timeout=10).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{realtime_port}/healthz", timeout=10).status_code == 200
    headers = api_login(url, password)
    conversation_id = lobby_id(url, headers)

    # The browser login works too, and the page points at the realtime port.
    with httpx.Client(base_url=url, timeout=10) as browser:
        login_page = browser.get("login/")
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page.text)
        assert csrf, login_page.text
        response = browser.post(
            "login/",
            data={"username": "demo", "password": password, "csrfmiddlewaretoken": csrf[1]},
        )
        assert response.status_code == 302, response.text
        page = browser.get(f"c/{conversation_id}/")
        assert page.status_code == 200
        assert f"ws://127.0.0.1:{realtime_port}/ws/chat/" in page.text

    if CELERY_APP_EXISTS:
        dev.wait_for_line(r"^worker +\| .*\bready\.$", 60)
        dev.record_descendants()
    commands = commands_seen(dev)
    assert "gunicorn" in commands
    assert "parley.cli realtime" in commands
    if CELERY_APP_EXISTS:
        assert "celery" in commands
    assert len(dev.seen) >= 5, commands  # gunicorn master + 2 workers, realtime, reaper

    dev.send(stop_signal)
    assert dev.wait(60) == 0, dev.output
    assert f"{stop_signal.name} received; stopping" in dev.output
    assert dev.wait_survivors_gone(3) == [], dev.output


def test_dev_keeps_the_demo_password_between_runs(parley_processes, state_dir):
    passwords = []
    for _ in range(2):
        dev, _, _ = start_dev(parley_processes, state_dir, dev_env())
        url, password = wait_running(dev)
        api_login(url, password)
        passwords.append(password)
        dev.send(signal.SIGTERM)
        assert dev.wait(60) == 0, dev.output
    assert passwords[0] == passwords[1]
    assert (state_dir / "demo-password").stat().st_mode & 0o077 == 0  # readable by its owner only


def test_dev_starts_embedded_servers_when_the_configured_ones_do_not_answer(
    parley_processes, state_dir
):
    dev, _, _ = start_dev(parley_processes, state_dir, embedded_env())
    url, password = wait_running(dev, timeout=240)
    assert "started embedded Postgres" in dev.output
    assert "started embedded Redis" in dev.output
    postgres = postmaster_pid(state_dir)
    dev.record_descendants(postgres)

    assert httpx.get(url + "readyz", timeout=10).status_code == 200
    lobby_id(url, api_login(url, password))

    dev.send(signal.SIGTERM)
    assert dev.wait(90) == 0, dev.output
    assert dev.wait_survivors_gone(3) == [], dev.output  # Redis and Postgres included
    assert not (state_dir / "postgres" / "data" / "postmaster.pid").exists()


def test_dev_killed_with_sigkill_leaves_nothing_behind(parley_processes, state_dir):
    dev, _, _ = start_dev(parley_processes, state_dir, embedded_env())
    wait_running(dev, timeout=240)
    dev.record_descendants(postmaster_pid(state_dir))

    dev.send(signal.SIGKILL)
    dev.wait(10)
    # The kernel sends the children SIGTERM (PR_SET_PDEATHSIG); the reaper stops the
    # detached embedded servers.
    assert dev.wait_survivors_gone(60) == [], dev.output
    assert not (state_dir / "postgres" / "data" / "postmaster.pid").exists()


def test_dev_stops_everything_when_a_service_dies(parley_processes, state_dir):
    import psutil

    dev, _, _ = start_dev(parley_processes, state_dir, dev_env())
    wait_running(dev)
    realtime = [
        pid for pid in dev.seen if "parley.cli realtime" in " ".join(psutil.Process(pid).cmdline())
    ]
    assert len(realtime) == 1
    os.kill(realtime[0], signal.SIGKILL)

    assert dev.wait(60) == 1, dev.output
    assert "realtime exited unexpectedly (killed by SIGKILL)" in dev.output
    assert dev.wait_survivors_gone(3) == [], dev.output


def test_dev_refuses_a_port_in_use(parley_processes, state_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        dev = parley_processes(
            "dev",
            "--port",
            str(port),
            "--realtime-port",
            str(free_port()),
            "--state-dir",
            str(state_dir),
            env=dev_env(),
        )
        assert dev.wait(30) == 1
    assert f"port {port} is in use; choose another with --port" in dev.output
