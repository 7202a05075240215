"""With DEBUG off, every `parley` command refuses insecure defaults with a clear message,
and production settings pass `check --deploy` without a warning."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from parley.config.settings import DEV_SECRET_KEY
from tests.cli.support import free_port, parley_env

GOOD_KEY = secrets.token_urlsafe(64)


def parley(*args: str, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parley.cli", *args],
        env=parley_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def production(**env: str | None) -> dict[str, str | None]:
    return {"DEBUG": "false", "SECRET_KEY": GOOD_KEY, "ALLOWED_HOSTS": "chat.example.com", **env}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (production(SECRET_KEY=None), "SECRET_KEY is the development default"),
        (production(SECRET_KEY=DEV_SECRET_KEY), "SECRET_KEY is the development default"),
        (production(SECRET_KEY="short-and-guessable"), "shorter than 50 characters"),
        (production(ALLOWED_HOSTS=""), "ALLOWED_HOSTS is empty"),
        (production(ALLOWED_HOSTS=None), "ALLOWED_HOSTS is empty"),
    ],
    ids=["no-key", "default-key", "short-key", "empty-hosts", "no-hosts"],
)
def test_manage_check_refuses_insecure_production_settings(env, message):
    result = parley("manage", "check", **env)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.startswith("parley: configuration error:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["web", "realtime", "worker", "migrate"])
def test_servers_refuse_to_start_on_the_default_secret_key(command):
    port = str(free_port())
    args = {
        "web": ["web", "--bind", f"127.0.0.1:{port}"],
        "realtime": ["realtime", "--host", "127.0.0.1", "--port", port],
        "worker": ["worker"],
        "migrate": ["migrate"],
    }[command]
    result = parley(*args, **production(SECRET_KEY=None))
    assert result.returncode != 0
    assert "SECRET_KEY is the development default" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_deploy_is_clean_with_production_settings():
    result = parley("manage", "check", "--deploy", **production())
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr
