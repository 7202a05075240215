"""Fixtures for the tests of the `parley` command."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.cli.support import ParleyProcess


@pytest.fixture
def parley_processes(state_dir):
    """Start `parley` processes with `start(*args, env=...)`; each is killed afterwards,
    with every process recorded below it, whatever the test's outcome."""
    started: list[ParleyProcess] = []

    def start(*args: str, env: dict[str, str], cwd: Path | None = None) -> ParleyProcess:
        process = ParleyProcess(*args, env=env, cwd=cwd)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill_all()


@pytest.fixture
def state_dir():
    """A state folder for `parley dev`, outside pytest's tmp_path: every pytest session
    started on this machine takes the other-users permissions off /tmp/pytest-of-<user>,
    which locks the embedded Postgres (running as an unprivileged user) out of its
    files."""
    path = Path(tempfile.mkdtemp(prefix="parley-cli-test-"))
    try:
        yield path / "state"
    finally:
        shutil.rmtree(path, ignore_errors=True)
