"""Tunables read when used: a Django setting of the same name wins, else the environment,
else the default next to the code that depends on it (so tests can change them)."""

from __future__ import annotations

import os


def _raw(name: str):
    try:
        from django.conf import settings

        value = getattr(settings, name, None)
    except Exception:  # settings not configured (e.g. the worker's health probe)
        value = None
    return os.environ.get(name) if value is None else value


def knob_float(name: str, default: float) -> float:
    value = _raw(name)
    return default if value in (None, "") else float(value)


def knob_int(name: str, default: int) -> int:
    value = _raw(name)
    return default if value in (None, "") else int(value)


def knob_str(name: str, default: str) -> str:
    value = _raw(name)
    return default if value in (None, "") else str(value)
