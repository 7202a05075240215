"""Loaded with `-p parley.testing.pytest_plugin` before pytest-django reads the settings.

Uses DATABASE_URL / REDIS_URL (default: the local servers) when they answer and otherwise
starts embedded Postgres and Redis for the session, so `make test` passes on a machine
with only Python. Must run before Django's settings are imported, hence a hook wrapper.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_stoppers: list = []


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    if not os.environ.get("PARLEY_TEST_SERVICES_READY"):
        from parley.embedded import ensure_services

        state = Path(
            os.environ.get("PARLEY_TEST_STATE_DIR") or tempfile.mkdtemp(prefix="parley-test-")
        )
        db, rd, stoppers = ensure_services(
            state,
            database_url=os.environ.get(
                "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/parley"
            ),
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        )
        _stoppers.extend(stoppers)
        os.environ["DATABASE_URL"] = db
        os.environ["REDIS_URL"] = rd
        os.environ["PARLEY_TEST_SERVICES_READY"] = "1"
        if stoppers:
            print(f"parley tests: embedded services {db} {rd}")
    os.environ.setdefault("DEBUG", "true")
    return (yield)


def pytest_unconfigure(config):
    while _stoppers:
        _stoppers.pop()()
