"""Where an idle authenticated socket's bytes go in a realtime process.

    python -m loadtests.bench.memprofile [--sockets 1000] [--frames 10] [--top 25]
    python -m loadtests.bench.memprofile --frames 0 --sockets 2000   # RSS only, as the bench

What it does, like the benchmark's idle-socket phase (docs/benchmarks.md, "Idle sockets"):
recreates its own database (`--database-url`, default parley_lt_mem), seeds N users with
bearer tokens in rooms of 20, starts ONE realtime process (parley.realtime.server.serve,
the code behind `parley realtime`, on Redis database 10 by default) under tracemalloc,
opens 20 warm-up sockets with the benchmark's generator, takes a snapshot, opens N more
(200 handshakes in flight), waits 3 s, takes another, and prints per socket:

- RSS growth (with tracemalloc on, RSS includes its own bookkeeping: use `--frames 0` for
  the figure the benchmark reports), traced bytes growth, and glibc malloc's in-use and
  free bytes (fragmentation shows as RSS growing more than what is in use);
- traced bytes by *owner*: the innermost frame outside the standard library, i.e. the
  line of Parley, Channels, uvicorn... that asked for the memory (an asyncio.Queue made by
  channels_redis is charged to channels_redis' line), and by package;
- gc-tracked objects by type (count and shallow size per socket).

The server side of it is this module's `--serve PORT` mode: tracemalloc started before
Django is imported, and SIGUSR1 writes a snapshot (tracemalloc dump + a JSON of gc counts)
into `--out`. `--server-env KEY=VALUE` (repeatable) runs the server with extra settings,
e.g. `--server-env MALLOC_ARENA_MAX=2`, to compare variants.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import secrets
import signal
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/parley_lt_mem"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
WARM = 20


# --- the server side -----------------------------------------------------------------------


def _mallinfo() -> dict | None:
    """glibc's heap counters (bytes): in use and free inside the heap, mmapped."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallinfo2"):
        return None

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (f, ctypes.c_size_t)
            for f in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc.mallinfo2.restype = Mallinfo2
    m = libc.mallinfo2()
    return {"in_use": m.uordblks + m.hblkhd, "free": m.fordblks, "mmapped": m.hblkhd}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _snapshot(out: Path, counter: list[int]) -> None:
    k = counter[0]
    counter[0] += 1
    gc.collect()
    rss = _rss()
    heap = _mallinfo()
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
    counts: Counter = Counter()
    sizes: Counter = Counter()
    for obj in gc.get_objects():
        t = type(obj)
        name = f"{t.__module__}.{t.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(out / f"snap-{k}.tracemalloc"))
    from parley.realtime.node import _nodes

    sockets = sum(len(node.sockets) for node in _nodes.values())
    snap = {"rss": rss, "heap": heap, "traced": traced, "sockets": sockets}
    snap.update(counts=counts, sizes=sizes)
    (out / f"snap-{k}.json").write_text(json.dumps(snap))
    (out / f"snap-{k}.done").touch()


def serve(port: int, frames: int, out: Path) -> None:
    if frames > 0:
        tracemalloc.start(frames)
    counter = [0]
    signal.signal(signal.SIGUSR1, lambda *_: _snapshot(out, counter))
    from parley.realtime.server import serve as realtime_serve

    realtime_serve("127.0.0.1", port)


# --- the measuring side ----------------------------------------------------------------------


def _request_snapshot(pid: int, out: Path, k: int, timeout: float = 300) -> dict:
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not (out / f"snap-{k}.done").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"snapshot {k} not written within {timeout:.0f} s")
        time.sleep(0.2)
    return json.loads((out / f"snap-{k}.json").read_text())


_STDLIB = (sysconfig.get_paths()["stdlib"], "<frozen ", "<string>", "<unknown>")


def _owner(tb) -> tuple[str, str]:
    """(owner line, innermost line) of a traceback: the owner is the innermost frame
    outside the standard library (who asked for the memory)."""
    frames = list(tb)  # oldest first
    inner = f"{_short(frames[-1].filename)}:{frames[-1].lineno}"
    for frame in reversed(frames):
        if not frame.filename.startswith(_STDLIB):
            return f"{_short(frame.filename)}:{frame.lineno}", inner
    return inner, inner


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/services/", "/loadtests/", sysconfig.get_paths()["stdlib"]):
        i = filename.find(marker)
        if i >= 0:
            return filename[i + len(marker) :].lstrip("/")
    return filename


def _package(line: str) -> str:
    path = line.rsplit(":", 1)[0]
    if path.startswith("parley/"):
        return "/".join(path.split("/")[:3]).removesuffix(".py")  # parley/realtime/consumers
    return path.split("/")[0].removesuffix(".py")


def analyse(out: Path, n: int, top: int, before: dict, after: dict) -> str:
    lines = []
    rss = (after["rss"] - before["rss"]) / n
    lines.append(f"RSS growth per socket: {rss / 1024:.1f} KiB")
    if before.get("traced") is not None:
        lines.append(
            f"traced (tracemalloc) growth per socket: "
            f"{(after['traced'] - before['traced']) / n / 1024:.2f} KiB"
        )
    if before.get("heap") and after.get("heap"):
        b, a = before["heap"], after["heap"]
        lines.append(
            "glibc heap per socket: in use {:+.2f} KiB, free {:+.2f} KiB".format(
                (a["in_use"] - b["in_use"]) / n / 1024, (a["free"] - b["free"]) / n / 1024
            )
        )
    snap0 = out / "snap-0.tracemalloc"
    if snap0.exists():
        s0 = tracemalloc.Snapshot.load(str(snap0))
        s1 = tracemalloc.Snapshot.load(str(out / "snap-1.tracemalloc"))
        by_owner: Counter = Counter()
        count_owner: Counter = Counter()
        inner_of: dict[str, Counter] = defaultdict(Counter)
        for diff in s1.compare_to(s0, "traceback"):
            if not diff.size_diff:
                continue
            owner, inner = _owner(diff.traceback)
            by_owner[owner] += diff.size_diff
            count_owner[owner] += diff.count_diff
            inner_of[owner][inner] += diff.size_diff
        by_package: Counter = Counter()
        for owner, size in by_owner.items():
            by_package[_package(owner)] += size
        lines.append("\ntraced bytes per socket by package (owner frame):")
        for pkg, size in by_package.most_common():
            if abs(size) / n >= 8:
                lines.append(f"  {size / n:9.0f}  {pkg}")
        lines.append(f"\ntop {top} owner lines (bytes, blocks per socket; innermost line):")
        for owner, size in by_owner.most_common(top):
            inner = inner_of[owner].most_common(1)[0][0]
            extra = f"   <- {inner}" if inner != owner else ""
            lines.append(f"  {size / n:9.0f} {count_owner[owner] / n:6.2f}  {owner}{extra}")
    counts = Counter(after["counts"])
    counts.subtract(before["counts"])
    sizes = Counter(after["sizes"])
    sizes.subtract(before["sizes"])
    lines.append(f"\ngc-tracked objects per socket, top {top} by shallow size (count, bytes):")
    for name, size in sizes.most_common(top):
        lines.append(f"  {counts[name] / n:6.2f} {size / n:8.0f}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench.memprofile", description=__doc__.splitlines()[0]
    )
    p.add_argument("--sockets", type=int, default=1000, help="sockets measured (after 20 warm)")
    p.add_argument(
        "--frames", type=int, default=10, help="tracemalloc frames (0: no tracemalloc, RSS only)"
    )
    p.add_argument("--top", type=int, default=25, help="lines shown per table")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before the last reading")
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.frames, args.out)
        return 0
    from loadtests.bench import seed as seeding
    from loadtests.bench.__main__ import migrate
    from loadtests.bench.topology import drop_database, recreate_database

    runid = secrets.token_hex(2)
    prefix = f"mp{runid}"
    recreate_database(args.database_url)
    try:
        migrate(args)
        seeding.setup_django(args.database_url, args.redis_url, prefix)
        users = seeding.create_users(prefix, WARM + args.sockets)
        seeding.create_rooms(prefix, [users[i : i + 20] for i in range(0, len(users), 20)])
        seeding.close_connections()
        return asyncio.run(measure(args, runid, prefix, users))
    finally:
        if not args.keep_db:
            drop_database(args.database_url)


async def measure(args, runid: str, prefix: str, users) -> int:
    import psutil

    from loadtests.bench import generator as g
    from loadtests.bench.topology import BASE_ENV, LAUNCH_ENV
    from loadtests.common import REPO
    from tests.realtime.cluster import Proc, free_port, http_get

    out = Path(tempfile.mkdtemp(prefix="parley-memprofile-"))

    env = dict(LAUNCH_ENV)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(BASE_ENV)
    env.update(
        DATABASE_URL=args.database_url,
        REDIS_URL=args.redis_url,
        CHANNEL_LAYER_URL=args.redis_url,
        CELERY_BROKER_URL=args.redis_url,
        CHANNEL_LAYER_PREFIX=prefix,
        DB_POOL_MAX_SIZE="10",
        PARLEY_NODE_ID=f"memprofile-{runid}",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "services")]),
    )
    env.update(kv.split("=", 1) for kv in args.server_env)
    port = free_port()
    argv = [sys.executable, "-m", "loadtests.bench.memprofile", "--serve", str(port)]
    argv += ["--frames", str(args.frames), "--out", str(out)]
    server = Proc("realtime", argv, env, out)
    url = f"ws://127.0.0.1:{port}/ws/chat/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if not server.alive():
                raise RuntimeError(f"the realtime process exited:\n{server.tail()}")
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the realtime process did not start:\n{server.tail()}")
            await asyncio.sleep(0.2)
        gen = g.Generator("mem.")
        clients = [g.Client(gen, u.id, u.token, url) for u in users]
        warm, rest = clients[:WARM], clients[WARM:]
        await gen.open_all(warm, concurrency=WARM)
        await asyncio.sleep(1.5)
        proc = psutil.Process(server.pid)
        rss0 = proc.memory_info().rss
        snapshots = args.frames > 0
        before = await asyncio.to_thread(_request_snapshot, server.pid, out, 0) if snapshots else {}
        opened = await gen.open_all(rest, concurrency=args.concurrency, timeout=300)
        await asyncio.sleep(args.settle)
        rss1 = proc.memory_info().rss
        after = await asyncio.to_thread(_request_snapshot, server.pid, out, 1) if snapshots else {}
        n = opened["opened"]
        if snapshots:  # the server's count: a handshake the client gave up on may be open
            n = after["sockets"] - before["sockets"]
        print(
            f"{n}/{len(rest)} sockets opened at {opened['per_second']}/s (failed "
            f"{opened['failed']}), load average {os.getloadavg()[0]:.2f}; RSS "
            f"{rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB: {(rss1 - rss0) / max(n, 1) / 1024:.1f}"
            f" KiB per socket" + (" (tracemalloc on: inflated)" if snapshots else ""),
            flush=True,
        )
        await gen.close_all(clients)
    finally:
        server.stop()
    if snapshots and n:
        print(analyse(out, n, args.top, before, after))
    print(f"(snapshots and the server's log in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
