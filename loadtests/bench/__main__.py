"""The benchmark: `python -m loadtests.bench [--profile quick|full|smoke] [options]`.

For each configuration (`parley`, `naive`, and `noop`, the generator's ceiling) it starts
the local topology on a dedicated database and Redis namespace, seeds users and rooms,
and measures with one open-loop generator (loadtests.bench.generator):

1. idle sockets: N authenticated sockets opened against one realtime replica as fast as
   the server takes them (sockets/s, time to hello) and the replica's RSS growth per
   socket;
2. rooms: a step search for the highest send rate that keeps zero loss, zero order
   violations and p99 send->delivery under the bar, in rooms of M members spread over
   both replicas; per step: send->ack and send->delivery percentiles, deliveries/s,
   receipt lag (commit -> the sender sees every member's delivery receipt), the worker's
   queue depth, CPU per process;
3. a large room (one room, thousands of members): the same search;
4. optionally (--pyspy) a profiled step at the best rate: py-spy on a realtime replica
   and the worker.

Every figure of a configuration comes from the same run, so the ratios between them are
measured under the same machine load. Results: loadtests/results/<UTC stamp>-bench-*.json
and .md, and the summary table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import redis

from loadtests.bench import generator as g
from loadtests.bench import profile as pyspy
from loadtests.bench import report
from loadtests.bench import seed as seeding
from loadtests.bench.topology import PARLEY, Topology, recreate_database
from loadtests.common import RESULTS_DIR, git_revision, machine, stamp

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/parley_lt"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"

PROFILES = {
    # The smoke test's: proves the tools work, measures nothing worth keeping.
    "smoke": dict(
        configs="parley",
        rooms=2,
        room_size=4,
        rates="10",
        duration=1.5,
        refine=0,
        large_size=0,
        large_rates="1",
        large_duration=2,
        idle_sockets=20,
        pyspy=False,
        search_down=False,
    ),
    # A few minutes on a 2-core machine.
    "quick": dict(
        configs="noop,parley,naive",
        rooms=20,
        room_size=20,
        rates="25,50,100,200,325,500,650,800,1000,1300,1600,2000",
        duration=5,
        refine=1,
        large_size=1000,
        large_rates="1,2,5,10,20,40",
        large_duration=6,
        idle_sockets=2000,
        pyspy=False,
    ),
    # Longer steps, finer search: for numbers to publish.
    "full": dict(
        configs="noop,parley,naive",
        rooms=20,
        room_size=20,
        rates="25,50,100,200,325,500,650,800,1000,1300,1600,2000",
        duration=20,
        refine=2,
        large_size=1000,
        large_rates="1,2,5,10,15,20,30,40",
        large_duration=20,
        idle_sockets=5000,
        pyspy=True,
    ),
}

QUEUE_KEYS = [
    q + s
    for q in ("receipts", "notifications")
    for s in ("", "\x06\x163", "\x06\x166", "\x06\x169")
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Benchmark the local topology (web, 2 realtime replicas, worker) against "
        "a naive configuration and a no-op server, in one run. See docs/benchmarks.md.",
    )
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="quick",
        help="preset sizes (default: %(default)s); the options below override it",
    )
    p.add_argument("--configs", help="comma-separated: parley, naive, noop")
    p.add_argument("--rooms", type=int, help="rooms in the rooms search")
    p.add_argument("--room-size", type=int, help="members per room")
    p.add_argument("--rates", help="messages/s ladder of the rooms search, e.g. 25,50,100")
    p.add_argument("--duration", type=float, help="seconds of sending per step")
    p.add_argument(
        "--refine", type=int, help="bisection steps between the last pass and first failure"
    )
    p.add_argument("--large-size", type=int, help="members of the large room (0: skip)")
    p.add_argument("--large-rates", help="messages/s ladder of the large-room search")
    p.add_argument("--large-duration", type=float, help="seconds of sending per large-room step")
    p.add_argument(
        "--idle-sockets", type=int, help="idle sockets for memory and connect rate (0: skip)"
    )
    p.add_argument(
        "--pyspy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile a step at the best rate with py-spy",
    )
    p.add_argument(
        "--search-down",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="when the first rate fails, halve it until one passes (default: on)",
    )
    p.add_argument(
        "--locust",
        metavar="SCENARIO",
        help="after measuring, run this Locust scenario headless against the topology",
    )
    p.add_argument(
        "--locust-args",
        default="-u 20 -r 10 -t 20s",
        help="Locust options for --locust (default: %(default)s)",
    )
    p.add_argument("--pyspy-rate", type=float, help="profile at this rate instead of the best one")
    p.add_argument(
        "--p99-ms", type=float, default=250.0, help="the latency bar (default: %(default)s)"
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("LT_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="the benchmark's own database, dropped and recreated (name parley_lt*)",
    )
    p.add_argument("--redis-url", default=os.environ.get("LT_REDIS_URL", DEFAULT_REDIS_URL))
    p.add_argument(
        "--prefix",
        default=os.environ.get("LT_CHANNEL_LAYER_PREFIX", "lt"),
        help="CHANNEL_LAYER_PREFIX (pub/sub channels are global to a Redis server)",
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--web-workers", type=int, default=2)
    p.add_argument("--worker-concurrency", type=int, default=2)
    p.add_argument("--db-pool", type=int, default=10, help="DB_POOL_MAX_SIZE per process")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--docs",
        type=Path,
        default=RESULTS_DIR.parent.parent / "docs" / "benchmarks.md",
        help="the file whose summary table is updated",
    )
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    p.add_argument("--keep-db", action="store_true", help="keep the database afterwards")
    p.add_argument(
        "--config-timeout",
        type=float,
        default=1800.0,
        help="give up on one configuration's measurement after this many seconds",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed of the schedules")
    args = p.parse_args(argv)
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.search_down is None:
        args.search_down = True
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.rates = [float(x) for x in str(args.rates).split(",")]
    args.large_rates = [float(x) for x in str(args.large_rates).split(",")]
    return args


# --- measurements around a step ------------------------------------------------------------


class Meter:
    """CPU seconds per process group between two snapshots, queue depth, server counters."""

    def __init__(self, topo: Topology, args, database: str | None) -> None:
        self.topo, self.args, self.database = topo, args, database
        self.redis = redis.Redis.from_url(args.redis_url, socket_timeout=5)
        self.redis_pid = None
        with contextlib.suppress(redis.RedisError):
            self.redis_pid = int(self.redis.info("server")["process_id"])

    def _groups(self) -> dict[str, list[int]]:
        groups = self.topo.process_groups()
        if self.database:
            groups["postgres backends"] = seeding.backend_pids(self.database)
            seeding.close_connections()
        if self.redis_pid:
            groups["redis-server (shared)"] = [self.redis_pid]
        groups["generator"] = [os.getpid()]
        return groups

    def cpu(self) -> dict[str, dict[int, float]]:
        snap = {}
        for name, pids in self._groups().items():
            per = {}
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    t = psutil.Process(pid).cpu_times()
                    per[pid] = t.user + t.system
            snap[name] = per
        return snap

    @staticmethod
    def cores(before: dict, after: dict, seconds: float) -> dict[str, float]:
        out = {}
        for name, per in after.items():
            old = before.get(name, {})
            used = sum(v - old[pid] for pid, v in per.items() if pid in old)
            out[name] = round(used / seconds, 3) if seconds > 0 else None
        return out

    async def queue_probe(self, sink: list) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.args.redis_url, socket_timeout=5)
        try:
            while True:
                try:
                    pipe = client.pipeline(transaction=False)
                    for key in QUEUE_KEYS:
                        pipe.llen(key)
                    pipe.hlen("unacked")
                    values = await pipe.execute()
                    sink.append((sum(values[:-1]), values[-1]))
                except (redis.RedisError, OSError):
                    pass
                # redis-py can swallow a cancellation that lands during execute() (it
                # surfaced as an error or not at all): then this loop ran forever and the
                # step that awaited it never ended (two quick runs sat idle for minutes).
                if asyncio.current_task().cancelling():
                    return
                await asyncio.sleep(0.25)
        finally:
            await client.aclose()

    def counters(self) -> dict[str, float]:
        """Realtime counters worth a delta per step, summed over replicas."""
        names = (
            "parley_ws_gap_fills_total",
            "parley_ws_server_closes_total",
            "parley_ws_errors_total",
            "parley_layer_resyncs_total",
        )
        total: dict[str, float] = {}
        if self.topo.config == "noop":
            return total
        for i in range(len(self.topo.realtime_ports)):
            for line in self.topo.scrape(i).splitlines():
                if line.startswith("#"):
                    continue
                series, _, value = line.rpartition(" ")
                if series.split("{", 1)[0] in names:
                    with contextlib.suppress(ValueError):
                        total[series] = total.get(series, 0.0) + float(value)
        return total


# The worker's tickers batch due flushes into this task (parley.chat.receipts.take_due).
FLUSH_TASK = "parley.receipts.flush_many"


def flush_buckets(text: str) -> dict[str, dict[float, float]]:
    """The worker's cumulative histogram buckets for the receipts flush task:
    {"wait": {le: count}, "run": {le: count}} (Prometheus text format)."""
    out: dict[str, dict[float, float]] = {"late": {}, "wait": {}, "run": {}}
    names = {
        "parley_receipts_flush_late_seconds_bucket": "late",  # due -> taken by a ticker
        "parley_worker_task_queue_wait_seconds_bucket": "wait",
        "parley_worker_task_duration_seconds_bucket": "run",
    }
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        kind = names.get(name)
        if kind is None or (kind != "late" and f'task="{FLUSH_TASK}"' not in rest):
            continue
        labels, _, value = rest.rpartition("} ")
        le = labels.split('le="', 1)[1].split('"', 1)[0]
        with contextlib.suppress(ValueError):
            out[kind][math.inf if le == "+Inf" else float(le)] = float(value)
    return out


def file_refaults() -> int | None:
    """The kernel's count of file pages faulted back in after eviction (Linux only)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("workingset_refault_file "):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict:
    """Count and p50/p99 (as the bucket's upper bound, in ms) of the observations made
    between two scrapes of a cumulative histogram."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0
    if not total:
        return {"count": 0}
    result = {"count": int(total)}
    for q, key in ((0.5, "p50_ms_le"), (0.99, "p99_ms_le")):
        for le, cumulative in delta:
            if cumulative >= q * total:
                result[key] = None if le == math.inf else round(le * 1000)
                break
    return result


async def measured_step(gen: g.Generator, meter: Meter, db, **kw) -> dict:
    queue: list = []
    before_cpu = await asyncio.to_thread(meter.cpu)
    before_counters = await asyncio.to_thread(meter.counters)
    before_flush = flush_buckets(await asyncio.to_thread(meter.topo.scrape_worker))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    refaults_before = file_refaults()
    _, result = await gen.run_step(
        last_seqs=db.last_seqs, history=db.history, probe=lambda: meter.queue_probe(queue), **kw
    )
    elapsed = time.monotonic() - started
    after_cpu = await asyncio.to_thread(meter.cpu)
    after_counters = await asyncio.to_thread(meter.counters)
    result["cpu_cores"] = Meter.cores(before_cpu, after_cpu, elapsed)
    result["queue_depth"] = {
        "ready_max": max((q[0] for q in queue), default=0),
        "ready_mean": round(sum(q[0] for q in queue) / len(queue), 1) if queue else 0,
        "reserved_max": max((q[1] for q in queue), default=0),
    }
    result["server_counters"] = {
        k: v - before_counters.get(k, 0.0)
        for k, v in after_counters.items()
        if v - before_counters.get(k, 0.0)
    }
    result["loadavg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    # Pages of files read back after the kernel (or the host) evicted them: on a machine
    # that reclaims page cache under the services (Postgres' data files, the interpreter's
    # libraries) a step stalls on disk reads however idle the CPUs are.
    refaults_after = file_refaults()
    result["file_refaults_per_s"] = (
        round((refaults_after - refaults_before) / elapsed)
        if refaults_before is not None and refaults_after is not None and elapsed > 0
        else None
    )
    # Where receipt lag comes from: how long the worker's flush batches waited in the
    # queue, and how long they ran (bucket bounds, from the worker's histograms; the
    # tasks of this step and of the one before that ran meanwhile).
    after_flush = flush_buckets(await asyncio.to_thread(meter.topo.scrape_worker))
    result["receipt_flushes"] = {
        kind: bucket_quantiles(before_flush[kind], after_flush[kind]) for kind in after_flush
    }
    return result


# --- data access: Postgres for Parley, the acks for the no-op server --------------------------


class PostgresView:
    def last_seqs(self, ids):
        try:
            return seeding.last_seqs(ids)
        finally:
            seeding.close_connections()

    def history(self, ids, after):
        try:
            return seeding.history(ids, after)
        finally:
            seeding.close_connections()


class AckView:
    """For the no-op server, which has no database: what it acknowledged is its history."""

    def __init__(self, gen_ref: list) -> None:
        self.gen_ref = gen_ref
        self.acks: dict[int, list] = {}

    def last_seqs(self, ids):
        return {cid: max((s for s, _ in self.acks.get(cid, [])), default=0) for cid in ids}

    def history(self, ids, after):
        return {cid: [r for r in self.acks.get(cid, []) if r[0] > after.get(cid, 0)] for cid in ids}


# --- searches ---------------------------------------------------------------------------------


async def search(
    gen,
    meter,
    db,
    *,
    label,
    rooms,
    ladder,
    refine,
    duration,
    p99_ms,
    say,
    receipt_samples_per_s=0.0,
    min_rate=0.1,
    clients=(),
    down=True,
) -> dict:
    steps: list[dict] = []
    best = fail = None

    async def one(rate: float) -> bool:
        reopened = await gen.reopen_closed(list(clients))
        if reopened:
            say(f"  reopened {reopened} closed sockets")
        dur = max(duration, min(30.0, 8 / rate)) if rate < 2 else duration
        res = await measured_step(
            gen,
            meter,
            db,
            label=label,
            rate=rate,
            duration=dur,
            rooms=rooms,
            receipt_samples_per_s=receipt_samples_per_s,
        )
        ok, reasons = g.passed(res, p99_ms=p99_ms)
        res["passed"], res["reasons"] = ok, reasons
        res["generator_bound"] = g.generator_bound(res)
        steps.append(res)
        d = res["send_delivery_ms"]
        rf = res.get("file_refaults_per_s")
        refaults = f", file refaults/s {rf}" if rf else ""
        say(
            f"  {label} {rate:g} msg/s: {'PASS' if ok else 'FAIL'} "
            f"sent {res['sent']} deliveries/s {res['deliveries_per_s']} "
            f"ack p50 {res['send_ack_ms']['p50']} ms, delivery p50/p99 {d['p50']}/{d['p99']} ms"
            f"{' (generator late)' if res['generator_bound'] else ''}"
            f"{'' if ok else ' - ' + '; '.join(reasons)}  load {res['loadavg'][1]}{refaults}"
        )
        lag, flushes = res.get("receipt_lag_ms"), res.get("receipt_flushes") or {}
        if lag and lag.get("count") and flushes.get("run", {}).get("count"):
            w, r, t = flushes["wait"], flushes["run"], flushes.get("late") or {}
            say(
                f"    receipt lag p50/p99 {lag['p50']}/{lag['p99']} ms; flushes taken past "
                f"due p50/p99 <= {t.get('p50_ms_le')}/{t.get('p99_ms_le')} ms; {r['count']} "
                f"flush batches, queued p50/p99 <= {w.get('p50_ms_le')}/{w.get('p99_ms_le')} "
                f"ms, ran p50/p99 <= {r.get('p50_ms_le')}/{r.get('p99_ms_le')} ms"
            )
        if not ok:
            await asyncio.sleep(3)  # let a backlog drain before the next step
        return ok

    # Warm-up (not counted): pools, caches and lazily created tasks get going.
    await gen.reopen_closed(list(clients))
    warm = await measured_step(
        gen,
        meter,
        db,
        label=f"{label} warm-up",
        rate=ladder[0],
        duration=min(2.0, duration),
        rooms=rooms,
    )
    say(f"  warm-up at {ladder[0]:g} msg/s: delivery p99 {warm['send_delivery_ms']['p99']} ms")
    await asyncio.sleep(0.5)
    for rate in ladder:
        if await one(rate):
            best = rate
        else:
            fail = rate
            break
    if best is None and fail is not None and down:
        rate = fail / 2
        while rate >= min_rate:
            if await one(round(rate, 2)):
                best = round(rate, 2)
                break
            fail = round(rate, 2)
            rate /= 2
    for _ in range(refine):
        if best is None or fail is None:
            break
        mid = round(math.sqrt(best * fail), 1 if best < 10 else 0)
        if mid <= best or mid >= fail:
            break
        if await one(mid):
            best = mid
        else:
            fail = mid
    best_step = next((s for s in reversed(steps) if s["passed"] and s["rate"] == best), None)
    return {"best_rate": best, "first_failure": fail, "best": best_step, "steps": steps}


# --- one configuration ---------------------------------------------------------------------------


async def _open_metered(gen: g.Generator, meter: Meter, clients: list) -> dict:
    """Open `clients` (200 handshakes in flight) and say which process bounds the rate:
    the cores each process group used meanwhile (the generator's must stay well below)."""
    cpu0, t0 = await asyncio.to_thread(meter.cpu), time.monotonic()
    opened = await gen.open_all(clients, concurrency=200, timeout=120)
    cpu1 = await asyncio.to_thread(meter.cpu)
    opened["cores"] = Meter.cores(cpu0, cpu1, time.monotonic() - t0)
    return opened


def _code(config: str) -> str:
    """A short, unique tag per configuration for usernames, client_ids and prefixes."""
    return {"parley": "p", "naive": "n", "noop": "o", "parley-noworker": "w"}.get(
        config, config[:3]
    )


def seed_users(config: str, args, runid: str) -> dict:
    """Users for traffic rooms, the large room and idle sockets; their rooms."""
    n_rooms = args.rooms * args.room_size
    n_large = args.large_size
    n_idle = args.idle_sockets
    prefix = f"lt{runid}{_code(config)}"
    if config == "noop":
        users = [
            seeding.SeedUser(i + 1, f"{prefix}-{i}", secrets.token_urlsafe(16))
            for i in range(n_rooms + n_large + n_idle)
        ]
        groups = _groups(users, args)
        rooms = [seeding.SeedRoom(i + 1, f"{prefix}-{i}", grp) for i, grp in enumerate(groups)]
    else:
        users = seeding.create_users(prefix, n_rooms + n_large + n_idle)
        rooms = seeding.create_rooms(prefix, _groups(users, args))
        seeding.close_connections()
    traffic = rooms[: args.rooms]
    large = rooms[args.rooms] if n_large else None
    idle_rooms = rooms[args.rooms + (1 if n_large else 0) :]
    idle_users = users[n_rooms + n_large :]
    return {
        "traffic": traffic,
        "large": large,
        "idle_rooms": idle_rooms,
        "idle": idle_users,
        "rooms": rooms,
    }


def _groups(users, args) -> list[list]:
    n_rooms = args.rooms * args.room_size
    groups = [users[i * args.room_size : (i + 1) * args.room_size] for i in range(args.rooms)]
    if args.large_size:
        groups.append(users[n_rooms : n_rooms + args.large_size])
    idle = users[n_rooms + args.large_size :]
    groups += [idle[i : i + 20] for i in range(0, len(idle), 20)]  # idle users: rooms of 20
    return groups


def write_noop_seed(path: Path, seeded: dict) -> None:
    tokens = {}
    for room in seeded["rooms"]:
        for user in room.members:
            tokens.setdefault(user.token, [user.id, []])[1].append(room.id)
    path.write_text(json.dumps(tokens))


async def measure(
    config: str, topo: Topology, seeded: dict, args, runid: str, say, logdir: Path
) -> dict:
    gen = g.Generator(f"{runid}{_code(config)}.", seed=args.seed)
    if config == "noop":
        db = AckView([gen])
        original = gen.on_ack

        def on_ack(client, frame, t, _orig=original, _db=db):
            idx = gen._index(frame.get("client_id"))
            if idx is not None and idx < len(gen.acked) and not gen.acked[idx]:
                _db.acks.setdefault(frame["conversation"], []).append(
                    (frame["seq"], frame["client_id"])
                )
            _orig(client, frame, t)

        gen.on_ack = on_ack
        database = None
    else:
        db = PostgresView()
        database = args.database_url.rsplit("/", 1)[1]
    meter = Meter(topo, args, database)
    urls = topo.ws_urls
    out: dict = {"config": config, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}

    def clients_for(room, spread=True):
        return [
            g.Client(gen, u.id, u.token, urls[j % len(urls)] if spread else urls[0])
            for j, u in enumerate(room.members)
        ]

    # 1. Idle sockets: connect rate and memory per socket, on one replica.
    if seeded["idle"]:
        idle = [g.Client(gen, u.id, u.token, urls[0]) for u in seeded["idle"]]
        warm, rest = idle[: min(20, len(idle) // 10 or 1)], idle[min(20, len(idle) // 10 or 1) :]
        await gen.open_all(warm, concurrency=20)
        await asyncio.sleep(1.5)
        proc = psutil.Process(topo.realtime[0].pid)
        rss0 = proc.memory_info().rss
        load = os.getloadavg()[0]
        spy = None
        if args.pyspy and config != "noop":
            spy_file = args.results_dir / f"{stamp()}-pyspy-realtime-A-connect-{config}.txt"
            spy = pyspy.record(topo.realtime[0].pid, spy_file, max(3.0, len(rest) / 200), fmt="raw")
            await asyncio.sleep(0.5)
        opened = await _open_metered(gen, meter, rest)
        if spy is not None:
            await asyncio.to_thread(pyspy.finish, spy)
            if spy_file.exists() and spy_file.stat().st_size:
                opened["profile"] = {"file": _rel(spy_file), "summary": pyspy.summarize(spy_file)}
        await asyncio.sleep(3)
        rss1 = proc.memory_info().rss
        # What the open sockets cost while nothing happens (presence heartbeats, pings):
        # replica A's CPU over 9 s, more than one heartbeat period (not for a handful).
        opened["idle_cores_realtime_a"] = None
        if len(idle) >= 1000:
            idle0, t0 = await asyncio.to_thread(meter.cpu), time.monotonic()
            await asyncio.sleep(9)
            idle1 = await asyncio.to_thread(meter.cpu)
            opened["idle_cores_realtime_a"] = Meter.cores(idle0, idle1, time.monotonic() - t0).get(
                topo.realtime[0].name
            )
        opened.update(
            rss_before_mb=round(rss0 / 2**20, 1),
            rss_after_mb=round(rss1 / 2**20, 1),
            bytes_per_socket=round((rss1 - rss0) / max(1, opened["opened"])),
            loadavg=[round(load, 2), round(os.getloadavg()[0], 2)],
        )
        out["idle_sockets"] = opened
        say(
            f"  idle sockets: {opened['opened']}/{opened['sockets']} opened at "
            f"{opened['per_second']}/s, {opened['bytes_per_socket'] / 1024:.1f} KiB each "
            f"(RSS {opened['rss_before_mb']} -> {opened['rss_after_mb']} MiB), "
            f"failed {opened['failed']}; cores {opened['cores']}; "
            f"replica A idle afterwards: {opened['idle_cores_realtime_a']} cores"
        )
        await gen.close_all(idle)
        await asyncio.sleep(1)
        closed_at = time.monotonic()

        # 1b. The same users again over every replica, as after a deploy: what the
        # deployment, not one replica, opens per second. After the replicas' token
        # caches forgot them (a replica that just started has nothing cached either).
        if len(urls) > 1:
            cached = float(topo.env.get("REALTIME_TOKEN_CACHE_SECONDS") or 5.0)  # its default
            if cached > 0:
                await asyncio.sleep(max(0.0, cached + 1 - (time.monotonic() - closed_at)))
            spread = [
                g.Client(gen, u.id, u.token, urls[j % len(urls)])
                for j, u in enumerate(seeded["idle"])
            ]
            storm = await _open_metered(gen, meter, spread)
            storm["replicas"] = len(urls)
            # Which replica each hello came from (the `node` it names).
            storm["nodes"] = dict(Counter(c.hello["node"] for c in spread if c.hello))
            out["storm"] = storm
            say(
                f"  storm over {len(urls)} replicas: {storm['opened']}/{storm['sockets']} "
                f"opened at {storm['per_second']}/s, failed {storm['failed']}; "
                f"cores {storm['cores']}"
            )
            await gen.close_all(spread)
            await asyncio.sleep(1)

    # 2. Rooms of M members over both replicas.
    rooms = []
    all_clients: list[g.Client] = []
    for room in seeded["traffic"]:
        clients = clients_for(room)
        all_clients += clients
        rooms.append(g.Room(room.id, clients, [u.id for u in room.members]))
    if rooms:
        opened = await gen.open_all(all_clients, concurrency=100)
        say(f"  {opened['opened']} room sockets open ({opened['per_second']}/s)")
        out["rooms"] = await search(
            gen,
            meter,
            db,
            label=f"rooms {len(rooms)}x{args.room_size}",
            rooms=rooms,
            ladder=args.rates,
            refine=args.refine,
            duration=args.duration,
            p99_ms=args.p99_ms,
            say=say,
            # The naive consumer records no receipts: sampling would only wait out the
            # receipt timeout every step.
            receipt_samples_per_s=0 if config == "naive" else 20,
            clients=all_clients,
            down=args.search_down,
        )

        # 3. A profiled step at the best rate.
        best = args.pyspy_rate or out["rooms"]["best_rate"]
        if args.pyspy and best and config != "noop":
            out["profile"] = await profiled_step(
                gen, meter, db, topo, rooms, best, args, say, logdir, all_clients
            )
        await gen.close_all(all_clients)

    # 4. The large room.
    if seeded["large"] is not None:
        clients = clients_for(seeded["large"])
        opened = await gen.open_all(clients, concurrency=100)
        say(f"  {opened['opened']} large-room sockets open ({opened['per_second']}/s)")
        large = [g.Room(seeded["large"].id, clients, [u.id for u in seeded["large"].members])]
        out["large_room"] = await search(
            gen,
            meter,
            db,
            label=f"room of {args.large_size}",
            rooms=large,
            ladder=args.large_rates,
            refine=args.refine,
            duration=args.large_duration,
            p99_ms=args.p99_ms,
            say=say,
            min_rate=0.2,
            clients=clients,
            down=args.search_down,
        )
        await gen.close_all(clients)
    out["closes_total"] = {str(k): v for k, v in gen.closes_total.items()}
    out["errors_total"] = {str(k): v for k, v in gen.errors_total.items()}
    out["reconnects"] = gen.reconnects
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


async def profiled_step(gen, meter, db, topo, rooms, rate, args, say, logdir, clients) -> dict:
    duration = max(8.0, args.duration)
    stamp_ = stamp()
    results = args.results_dir
    files = {
        "realtime_raw": results / f"{stamp_}-pyspy-realtime-A-{topo.config}.txt",
        "realtime_svg": results / f"{stamp_}-pyspy-realtime-B-{topo.config}.svg",
        "worker_raw": results / f"{stamp_}-pyspy-worker-{topo.config}.txt",
    }
    spies = [
        pyspy.record(topo.realtime[0].pid, files["realtime_raw"], duration, fmt="raw"),
        pyspy.record(
            topo.realtime[1 % len(topo.realtime)].pid,
            files["realtime_svg"],
            duration,
            fmt="flamegraph",
        ),
    ]
    if topo.worker is not None:
        spies.append(
            pyspy.record(
                topo.worker.pid, files["worker_raw"], duration, fmt="raw", subprocesses=True
            )
        )
    await asyncio.sleep(0.5)  # py-spy attaches
    await gen.reopen_closed(list(clients))
    res = await measured_step(
        gen,
        meter,
        db,
        label="profiled",
        rate=rate,
        duration=duration,
        rooms=rooms,
        receipt_samples_per_s=20,
    )
    errors = [pyspy.finish(p) for p in spies]
    ok, reasons = g.passed(res, p99_ms=args.p99_ms)
    res["passed"], res["reasons"] = ok, reasons
    summaries = {}
    for key in ("realtime_raw", "worker_raw"):
        if files[key].exists() and files[key].stat().st_size:
            summaries[key] = pyspy.summarize(files[key])
    say(f"  profiled step at {rate:g} msg/s: {'PASS' if ok else 'FAIL'}; profiles in {results}")
    return {
        "rate": rate,
        "step": res,
        "files": {k: _rel(v) for k, v in files.items() if v.exists()},
        "summaries": summaries,
        "py_spy_errors": [e for e in errors if e.strip()],
    }


def _rel(path: Path) -> str:
    root = RESULTS_DIR.parent.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def run_config(config: str, args, runid: str, logroot: Path, say) -> dict:
    say(f"== {config}: seeding")
    seeded = seed_users(config, args, runid)
    logdir = logroot / config
    logdir.mkdir(parents=True, exist_ok=True)
    noop_seed = None
    if config == "noop":
        noop_seed = logdir / "noop-seed.json"
        write_noop_seed(noop_seed, seeded)
    topo = Topology(
        config,
        database_url=args.database_url,
        redis_url=args.redis_url,
        prefix=f"{args.prefix}{runid}{_code(config)}",
        logdir=logdir,
        replicas=args.replicas,
        web_workers=args.web_workers,
        worker_concurrency=args.worker_concurrency,
        db_pool=args.db_pool,
        noop_seed=noop_seed,
    )
    say(f"== {config}: starting the topology (logs in {logdir})")
    started = time.monotonic()
    topo.start()
    try:
        say(
            f"== {config}: ready in {time.monotonic() - started:.1f} s; "
            f"measuring (load {os.getloadavg()[0]:.2f})"
        )
        result = _run_async(
            _bounded(measure(config, topo, seeded, args, runid, say, logdir), args, config, say)
        )
        if args.locust and config != "noop":
            result["locust"] = run_locust(topo, seeded, args, runid, config, logdir, say)
        result["env"] = {k: topo.env[k] for k in sorted(topo.env) if k in _SHOWN_ENV}
        return result
    except BaseException:
        say(topo.tails(15))
        raise
    finally:
        topo.stop()


def run_locust(
    topo: Topology, seeded: dict, args, runid: str, config: str, logdir: Path, say
) -> dict:
    """Locust headless against this topology, with the seeded accounts (tokens only)."""
    import shlex

    from loadtests.bench.stack import write_users_file

    users_file = logdir / "locust-users.json"
    write_users_file(users_file, [u for room in seeded["traffic"] for u in room.members])
    out = logdir / "locust-results"
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO_LOCUSTFILE),
        "--headless",
        "--host",
        topo.web_url,
        "--ws-url",
        topo.ws_urls[0],
        "--users-file",
        str(users_file),
        "--scenario",
        args.locust,
        "--results-dir",
        str(out),
        "--run-tag",
        f"{runid}-{config}",
        "--only-summary",
        "--rooms",
        str(max(1, args.rooms)),
        *shlex.split(args.locust_args),
    ]
    say(f"  locust: {' '.join(argv[2:])}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    (logdir / "locust.log").write_text(proc.stdout + proc.stderr)
    files = sorted(out.glob("*.json"))
    result = json.loads(files[-1].read_text()) if files else {}
    result["exit_code"] = proc.returncode
    say(
        "  locust exit "
        + str(proc.returncode)
        + "; "
        + (
            proc.stdout.split("Parley chat figures")[-1]
            .split("chat figures saved")[0]
            .strip()
            .replace("\n", "\n  ")
            if files
            else proc.stderr[-2000:]
        )
    )
    return result


REPO_LOCUSTFILE = Path(__file__).resolve().parent.parent / "locustfile.py"

_SHOWN_ENV = {
    "DB_POOL_MIN_SIZE",
    "CHANNEL_LAYER_BACKEND",
    "DB_POOL",
    "CONN_MAX_AGE",
    "DB_POOL_MAX_SIZE",
    "REALTIME_TOKEN_CACHE_SECONDS",
    "PARLEY_DELIVERY_BUFFER_SECONDS",
    "PARLEY_RECEIPT_FLUSH_SECONDS",
    "DEBUG",
    "LOG_LEVEL",
    "PARLEY_RATE_MESSAGES_PER_10S",
}


async def _bounded(coro, args, config: str, say) -> dict:
    """One configuration's measurement, given up after --config-timeout seconds (a naive
    run once waited forever); the other configurations are still measured and saved."""
    try:
        return await asyncio.wait_for(coro, args.config_timeout)
    except TimeoutError:
        say(f"== {config}: gave up after {args.config_timeout:.0f} s")
        return {"error": f"measurement did not finish within {args.config_timeout:.0f} s"}


def _run_async(coro):
    try:
        import uvloop

        return uvloop.run(_dumpable(coro))
    except ImportError:
        return asyncio.run(_dumpable(coro))


async def _dumpable(coro):
    """`kill -USR1 <pid>` prints every task's stack to stderr: a run that stops making
    progress shows where it waits (once, a run sat idle for minutes between two steps
    until a signal woke its loop; docs/benchmarks.md, session 14)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    return await coro


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def migrate(args) -> None:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=args.database_url, REDIS_URL=args.redis_url, DEBUG="true", DB_POOL="false"
    )
    subprocess.run([*PARLEY, "migrate", "--noinput", "-v", "0"], env=env, check=True, timeout=300)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    runid = secrets.token_hex(2)
    when = stamp()
    logroot = Path(tempfile.gettempdir()) / f"parley-bench-{when}-{runid}"

    def say(text: str) -> None:
        print(text, flush=True)

    run: dict = {
        "started": when,
        "command": "python -m loadtests.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "profile": args.profile,
        "revision": git_revision(),
        "machine": machine(),
        "settings": {
            k: (v if not isinstance(v, Path) else str(v))
            for k, v in vars(args).items()
            if k not in ("docs",)
        },
        "configs": {},
    }
    say(f"parley bench ({args.profile}); load average {run['machine']['loadavg']}; logs {logroot}")
    needs_db = any(c != "noop" for c in args.configs)
    if needs_db:
        recreate_database(args.database_url)
        migrate(args)
        seeding.setup_django(args.database_url, args.redis_url, args.prefix)
    try:
        for config in args.configs:
            run["configs"][config] = run_config(config, args, runid, logroot, say)
    finally:
        run["finished"] = stamp()
        run["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if needs_db:
            seeding.close_connections()
            if not args.keep_db:
                with contextlib.suppress(Exception):
                    from loadtests.bench.topology import drop_database

                    drop_database(args.database_url)
    base = args.results_dir / f"{when}-bench-{args.profile}"
    base.with_suffix(".json").write_text(json.dumps(run, indent=2, default=str))
    md = report.markdown(run)
    base.with_suffix(".md").write_text(md)
    say("")
    say(report.summary_table(run))
    say(f"\nresults: {base}.json and .md")
    if not args.no_docs and args.profile != "smoke":
        report.update_docs(args.docs, run, base.with_suffix(".md"))
        say(f"summary table updated in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
