"""The realtime process' garbage collector.

CPython's cyclic collector scans a whole generation each time it runs. In a realtime
process the oldest generation is Django's import-time heap plus every open socket's
objects, and while 5,000 sockets opened, six full collections took 1.4 s of the 7.9 s of
CPU the storm cost, the younger ones another 0.4 s (timed with gc.callbacks;
docs/benchmarks.md, session 14). Each full collection stopped the event loop for 175-370
ms, growing with the heap: every frame in flight waited that long. Two remedies, as
long-lived Python servers use them:

- `gc.freeze()` once the application is loaded: what exists then (modules, settings, URL
  patterns, the ORM's metadata) lives as long as the process and is not scanned again;
- a larger first threshold: the collector runs once this many more container objects were
  allocated than freed, not Python's 700. What reference counting frees (most of a frame's
  and a handshake's objects) never counts; cycles left behind are collected in fewer,
  larger passes (about 20-50 ms each at 50,000), and full collections become rare.

REALTIME_GC_THRESHOLD: "T0[,T1[,T2]]" for gc.set_threshold, or "default" for Python's own
(700,10,10) without the freeze. Default: 50000,20,10.
"""

from __future__ import annotations

import gc
import logging

from django.core.exceptions import ImproperlyConfigured

from parley.knobs import knob_str

logger = logging.getLogger(__name__)

DEFAULT = (50_000, 20, 10)
_PYTHON = ("default", "python")


def thresholds() -> tuple[int, ...] | None:
    """REALTIME_GC_THRESHOLD parsed: the thresholds to set, or None (Python's defaults)."""
    raw = knob_str("REALTIME_GC_THRESHOLD", "").strip().lower()
    if not raw:
        return DEFAULT
    if raw in _PYTHON:
        return None
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        values = ()
    if not 1 <= len(values) <= 3 or values[0] < 1 or any(v < 1 for v in values):
        raise ImproperlyConfigured(
            f'REALTIME_GC_THRESHOLD must be "default" or one to three positive integers '
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
