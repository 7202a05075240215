"""The garbage collector of the long-running service processes.

CPython's cyclic collector scans a whole generation each time it runs. In a realtime
process the oldest generation is Django's import-time heap plus every open socket's
objects, and while 5,000 sockets opened, six full collections took 1.4 s of the 7.9 s of
CPU the storm cost, the younger ones another 0.4 s (timed with gc.callbacks;
docs/benchmarks.md, session 14). Each full collection stopped the event loop for 175-370
ms, growing with the heap: every frame in flight waited that long. A web worker's heap
is smaller, but a full collection still scans all of Django's. Two remedies, as
long-lived Python servers use them:

- `gc.freeze()` once the application is loaded: what exists then (modules, settings, URL
  patterns, the ORM's metadata) lives as long as the process and is not scanned again;
- a larger first threshold: the collector runs once this many more container objects were
  allocated than freed, not Python's 700. What reference counting frees (most of a frame's,
  a handshake's or a request's objects) never counts; cycles left behind are collected in
  fewer, larger passes (about 20-50 ms each at 50,000 in a realtime process), and full
  collections become rare.

Knobs: REALTIME_GC_THRESHOLD (`parley realtime`, after uvicorn loaded the app; default
50000,20,10) and WEB_GC_THRESHOLD (each `parley web` worker, after it loaded the app;
default 700,10,10: the freeze with Python's thresholds): "T0[,T1[,T2]]" for
gc.set_threshold, or "default" for Python's own without the freeze. The web default
differs because a request waits for whatever collection it triggers: with 50,000 the
slowest history page went from 6-18 ms to 21-41 ms (docs/benchmarks.md, session 14),
while the freeze alone took a little off p99.
"""

from __future__ import annotations

import gc
import logging
import os

from django.core.exceptions import ImproperlyConfigured

from parley.knobs import knob_str

logger = logging.getLogger(__name__)

DEFAULT = (50_000, 20, 10)  # the realtime process
WEB_DEFAULT = (700, 10, 10)  # Python's thresholds, after the freeze
_PYTHON = ("default", "python")


def thresholds(knob: str = "REALTIME_GC_THRESHOLD") -> tuple[int, ...] | None:
    """The knob (a Django setting or the environment) parsed: the thresholds to set, or
    None (Python's defaults)."""
    return parse(knob_str(knob, ""), knob)


def web_thresholds() -> tuple[int, ...] | None:
    """WEB_GC_THRESHOLD, from the environment only, as gunicorn's config (whose master
    never loads Django) and `parley web` both read it."""
    return parse(os.environ.get("WEB_GC_THRESHOLD"), "WEB_GC_THRESHOLD", WEB_DEFAULT)


def parse(raw: str | None, knob: str, default: tuple[int, ...] = DEFAULT) -> tuple[int, ...] | None:
    """A knob's raw value parsed, without touching Django's settings (gunicorn's master
    reads its own from the environment). Empty: `default`."""
    raw = (raw or "").strip().lower()
    if not raw:
        return default
    if raw in _PYTHON:
        return None
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        values = ()
    if not 1 <= len(values) <= 3 or values[0] < 1 or any(v < 1 for v in values):
        raise ImproperlyConfigured(
            f'{knob} must be "default" or one to three positive integers '
            f'separated by commas (gc.set_threshold), got "{raw}"'
        )
    return values


def tune(values: tuple[int, ...] | None) -> None:
    """Once the application is loaded, before serving: freeze what exists, then set the
    thresholds (None: leave Python's collector as it is)."""
    if values is None:
        logger.info("gc: Python's defaults %s", gc.get_threshold())
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*values)
    logger.info("gc: %d objects frozen, thresholds %s", gc.get_freeze_count(), gc.get_threshold())
