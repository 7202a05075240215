"""Micro-benchmarks behind the proposals in docs/benchmarks.md.

    python -m loadtests.bench.microbench hops [--seconds 3]

`hops`: Channels' AsyncConsumer.dispatch runs `await aclose_old_connections()` before
every handler, that is `sync_to_async(close_old_connections)()` with asgiref's default
thread_sensitive=True: every event of every socket of a realtime process goes through
one shared thread and back. This measures how many such hops one process completes per
second, and how long one takes, when N events are dispatched at once (N sockets of a room
on one replica receiving the same message), against calling the function directly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from loadtests.common import Percentiles, fmt_ms


async def _hops(concurrent: int, seconds: float, mode: str) -> dict:
    from asgiref.sync import sync_to_async
    from django.db import close_old_connections

    if mode == "thread_sensitive":
        call = sync_to_async(close_old_connections)  # what channels' dispatch does
    elif mode == "thread_pool":
        call = sync_to_async(close_old_connections, thread_sensitive=False)
    else:

        async def call():
            close_old_connections()

    latency = Percentiles()
    done = 0
    end = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        while time.monotonic() < end:
            t = time.monotonic()
            await call()
            latency.add(time.monotonic() - t)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(concurrent)))
    elapsed = time.monotonic() - started
    return {
        "mode": mode,
        "concurrent": concurrent,
        "per_second": round(done / elapsed),
        "latency_ms": latency.summary_ms(),
    }


def hops(seconds: float) -> list[dict]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.config.settings")
    os.environ.setdefault("DB_POOL", "false")
    import django

    django.setup()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    rows = []
    for concurrent in (1, 100, 500):
        for mode in ("direct", "thread_sensitive", "thread_pool"):
            rows.append(run(_hops(concurrent, seconds, mode)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.microbench")
    p.add_argument("what", choices=["hops"])
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    print(f"load average {os.getloadavg()}")
    print("| call | concurrent events | calls/s | latency p50 / p99 ms |")
    print("|---|---|---|---|")
    for r in hops(args.seconds):
        lat = r["latency_ms"]
        print(
            f"| {r['mode']} | {r['concurrent']} | {r['per_second']:,} | "
            f"{fmt_ms(lat['p50'])} / {fmt_ms(lat['p99'])} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
