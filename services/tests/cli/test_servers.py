"""`parley web` and `parley worker`: the server command lines, and gunicorn serving for real."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from parley import cli
from tests.cli.support import free_port, parley_env


class Exec(Exception):
    """Raised instead of replacing the test process."""


@pytest.fixture
def exec_argv(monkeypatch):
    def fake_execvp(file, argv):
        raise Exec(argv)

    monkeypatch.setattr(cli.os, "execvp", fake_execvp)

    def run(*args: str) -> list[str]:
        with pytest.raises(Exec) as caught:
            cli.main(list(args))
        return caught.value.args[0]

    return run


def test_web_execs_gunicorn_with_the_config_module_and_options(exec_argv):
    argv = exec_argv("web", "--bind", "127.0.0.1:9000", "--workers", "3", "--threads", "2",
                     "--max-requests", "500")  # fmt: skip
    assert argv[:3] == [sys.executable, "-m", "gunicorn"]
    assert argv[3:5] == ["--config", "python:parley.config.gunicorn"]
    options = argv[5:]
    assert options[options.index("--bind") + 1] == "127.0.0.1:9000"
    assert options[options.index("--workers") + 1] == "3"
    assert options[options.index("--threads") + 1] == "2"
    assert options[options.index("--max-requests") + 1] == "500"  # passed through
    assert argv[-1] == "parley.config.wsgi:application"


def test_web_leaves_defaults_to_the_config_module(exec_argv):
    argv = exec_argv("web")
    assert "--bind" not in argv
    assert "--workers" not in argv


def test_worker_execs_celery_with_queues_concurrency_loglevel_and_name(exec_argv):
    argv = exec_argv("worker", "--queues", "receipts", "--concurrency", "3", "--loglevel",
                     "debug", "--name", "w1@%h", "--max-tasks-per-child", "100")  # fmt: skip
    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "parley.config.celery", "worker"]
    assert argv[argv.index("-Q") + 1] == "receipts"
    assert argv[argv.index("-c") + 1] == "3"
    assert argv[argv.index("--loglevel") + 1] == "DEBUG"
    assert argv[argv.index("-n") + 1] == "w1@%h"
    assert argv[argv.index("--max-tasks-per-child") + 1] == "100"


def test_worker_defaults_to_both_queues_and_the_available_cpus(exec_argv, monkeypatch):
    monkeypatch.delenv("WORKER_CONCURRENCY", raising=False)
    argv = exec_argv("worker")
    assert argv[argv.index("-Q") + 1] == "receipts,notifications"
    assert argv[argv.index("-c") + 1] == str(cli.available_cpus())


def test_options_unknown_to_a_command_without_passthrough_are_refused(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["realtime", "--workers", "2"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --workers 2" in capsys.readouterr().err


def test_available_cpus_is_at_least_one_and_within_the_affinity():
    assert 1 <= cli.available_cpus() <= len(os.sched_getaffinity(0))


def metric_total(text: str, name: str) -> float:
    return sum(float(m[1]) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_web_serves_with_metrics_from_every_worker_and_stops_gracefully(parley_processes):
    port = free_port()
    web = parley_processes(
        "web", "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "2",
        env=parley_env(WEB_GRACEFUL_TIMEOUT="5"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert web.proc.poll() is None, web.output
        assert time.monotonic() < deadline, web.output
        time.sleep(0.2)

    master = psutil.Process(web.pid)  # gunicorn replaced `parley web` (exec)
    assert "gunicorn" in " ".join(master.cmdline())
    workers = master.children()
    assert len(workers) == 2
    web.record_descendants()

    # New connections each time, so both workers serve some of them. (Probes such as
    # /healthz are not counted.)
    for _ in range(40):
        assert httpx.get(f"{url}/login/", timeout=5).status_code == 200
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert metric_total(metrics, "parley_http_requests_total") >= 40, metrics

    # Each worker writes its samples to files in the folder gunicorn's config made.
    metric_files = {Path(f.path) for w in workers for f in w.open_files() if f.path.endswith(".db")}
    assert metric_files
    metrics_dir = {path.parent for path in metric_files}.pop()
    assert metrics_dir.name.startswith("parley-web-metrics-")

    web.send(signal.SIGTERM)
    assert web.wait(30) == 0, web.output
    assert web.wait_survivors_gone(3) == []
    assert not metrics_dir.exists()  # the folder gunicorn created is gone with it
