"""Helpers for tests that run the `parley` command as real processes: free ports, bounded
waits, and a record of every process started below them, to check that none is left."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A port nothing listens on (bound and released; nobody else should take it)."""
    return free_port()


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def parley_env(**overrides: str | None) -> dict[str, str]:
    """The test process's environment (DATABASE_URL and REDIS_URL point at servers that
    answer, see parley.testing.pytest_plugin) with overrides; None removes a variable."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class ParleyProcess:
    """`python -m parley.cli ARGS` in its own session, its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str], cwd: Path | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parley.cli", *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._changed = threading.Condition(threading.RLock())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # pid -> create_time of every descendant seen; see record_descendants.
        self.seen: dict[int, float] = {}

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching `pattern`; fails if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    if match := regex.search(line):
                        return match
                checked = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    pytest.fail(
                        f"parley {' '.join(self.args)} exited ({self.proc.returncode}) "
                        f"before printing {pattern!r}:\n{self.output}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"parley {' '.join(self.args)} did not print {pattern!r} within "
                        f"{timeout}s:\n{self.output}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"parley {' '.join(self.args)} still running after {timeout}s:\n{self.output}"
            )
        self._reader.join(timeout=10)
        return code

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def record_descendants(self, *extra_pids: int) -> None:
        """Remember every process below this one (and `extra_pids` with theirs)."""
        roots = []
        with contextlib.suppress(psutil.NoSuchProcess):
            roots.append(psutil.Process(self.pid))
        for pid in extra_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                self.seen[proc.pid] = proc.create_time()
                roots.append(proc)
        for root in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        self.seen[child.pid] = child.create_time()

    def survivors(self) -> list[str]:
        """The recorded processes that still run (zombies count as gone)."""
        alive = []
        for pid, created in self.seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
        return alive

    def wait_survivors_gone(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while (alive := self.survivors()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return alive

    def kill_all(self) -> None:
        """Last resort in `finally`: kill this process and everything recorded below it."""
        self.record_descendants()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid, created in self.seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
