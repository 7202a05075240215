"""The collector settings of the service processes: REALTIME_GC_THRESHOLD and
WEB_GC_THRESHOLD parsed with a clear error, and a real `parley realtime` and each `parley
web` worker freeze their startup heap and raise the threshold."""

from __future__ import annotations

import gc
import re
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from parley import gctune
from tests.cli.support import ParleyProcess, free_port, parley_env
from tests.realtime.cluster import wait_until


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", gctune.DEFAULT),
        ("default", None),
        ("Python", None),
        ("20000", (20000,)),
        (" 20000,15 ", (20000, 15)),
        ("20000,15,5", (20000, 15, 5)),
    ],
)
def test_threshold_values(monkeypatch, raw, expected):
    monkeypatch.setenv("REALTIME_GC_THRESHOLD", raw)
    assert gctune.thresholds() == expected


@pytest.mark.parametrize("raw", ["off", "many", "0", "700,0", "1,2,3,4", "700,,10", "-5", "1e5"])
def test_bad_thresholds_are_a_configuration_error(monkeypatch, raw):
    monkeypatch.setenv("REALTIME_GC_THRESHOLD", raw)
    with pytest.raises(ImproperlyConfigured, match="REALTIME_GC_THRESHOLD must be"):
        gctune.thresholds()
    with pytest.raises(ImproperlyConfigured, match="WEB_GC_THRESHOLD must be"):
        gctune.parse(raw, "WEB_GC_THRESHOLD")


def test_tune_freezes_then_sets_and_default_leaves_python_alone():
    before_threshold, before_frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        gctune.tune(None)
        assert gc.get_threshold() == before_threshold
        assert gc.get_freeze_count() == before_frozen
        marker = object.__new__(type("Marker", (), {}))  # a container tracked by gc
        gctune.tune((12345, 11, 9))
        assert gc.get_threshold() == (12345, 11, 9)
        assert gc.get_freeze_count() > before_frozen
        assert not any(o is marker for o in gc.get_objects())  # frozen: not scanned
    finally:
        gc.unfreeze()
        gc.set_threshold(*before_threshold)


def test_parley_realtime_freezes_its_heap_and_sets_the_thresholds():
    proc = ParleyProcess(
        "realtime", "--port", str(free_port()), env=parley_env(REALTIME_GC_THRESHOLD="40000,30")
    )
    try:
        match = proc.wait_for_line(r"gc: (\d+) objects frozen, thresholds \((.*)\)", timeout=60)
        # Django, channels and the application's modules: far more than a bare interpreter.
        assert int(match.group(1)) > 50_000, proc.output
        assert match.group(2) == "40000, 30, 10"
    finally:
        proc.proc.terminate()
        proc.wait(30)


def test_the_web_default_is_the_freeze_with_pythons_thresholds():
    assert gctune.parse("", "WEB_GC_THRESHOLD", gctune.WEB_DEFAULT) == (700, 10, 10)
    assert gctune.parse("default", "WEB_GC_THRESHOLD", gctune.WEB_DEFAULT) is None


def test_each_parley_web_worker_freezes_its_heap_and_sets_the_thresholds():
    proc = ParleyProcess(
        "web",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--workers",
        "2",
        env=parley_env(WEB_GC_THRESHOLD="30000,15,5"),
    )
    try:
        pattern = r"gc: (\d+) objects frozen, thresholds \(30000, 15, 5\)"
        proc.wait_for_line(pattern, timeout=60)
        wait_until(lambda: len(re.findall(pattern, proc.output)) == 2, 30, what="both workers")
        frozen = [int(n) for n in re.findall(pattern, proc.output)]
        assert all(n > 50_000 for n in frozen), proc.output  # Django's heap, loaded
    finally:
        proc.proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize(("command", "knob"), [("realtime", "REALTIME"), ("web", "WEB")])
def test_a_bad_threshold_is_refused_without_a_traceback(command, knob):
    result = subprocess.run(
        [sys.executable, "-m", "parley.cli", command, "--port", str(free_port())]
        if command == "realtime"
        else [sys.executable, "-m", "parley.cli", command, "--bind", f"127.0.0.1:{free_port()}"],
        env=parley_env(**{f"{knob}_GC_THRESHOLD": "lots"}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.startswith(f"parley: configuration error: {knob}_GC_THRESHOLD must be")
    assert "Traceback" not in result.stderr
