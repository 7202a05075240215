"""The benchmark's open-loop load generator (asyncio, one process).

Open loop: a step's send times are drawn before the step starts (Poisson arrivals at the
step's rate, a fixed seed) and each send goes out at its time whatever the server is
doing. Every latency is measured from the *scheduled* time, so a server (or a generator)
that falls behind shows up in the figures instead of slowing the load down: there is no
coordinated omission. The generator's own lateness (actual - scheduled send time) is
recorded too, so that a generator-bound step can be told apart.

Each send's client_id (`<tag><index>`) indexes the schedule: an `ack` or a `message`
frame gives back its scheduled time exactly; the body carries the wall-clock send time as
well (for readers on other machines, as in the Locust scenarios).

A step passes when every send was acknowledged, every member socket received every
committed message exactly once and in seq order (checked against Postgres at the end of
the step), no error frame came, and p99 send->delivery is under the bar.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

import orjson
import psutil
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # pure-Python websockets build
    from websockets.utils import apply_mask

from loadtests.common import Percentiles, Stream, check_history, make_body

clock = time.monotonic


@dataclass
class Room:
    id: int
    clients: list[Client]
    member_ids: list[int]


@dataclass
class StepStats:
    label: str
    rate: float
    duration: float
    room_size: int
    rooms: int
    first_idx: int = 0
    end_idx: int = 0
    scheduled: int = 0
    sent: int = 0
    send_failed: int = 0
    acks: int = 0
    deliveries: int = 0
    ack: Percentiles = field(default_factory=Percentiles)
    delivery: Percentiles = field(default_factory=Percentiles)
    lag: Percentiles = field(default_factory=Percentiles)
    receipt_lag: Percentiles = field(default_factory=Percentiles)
    receipt_samples: int = 0
    errors: Counter = field(default_factory=Counter)
    closes: Counter = field(default_factory=Counter)
    other_frames: Counter = field(default_factory=Counter)
    sample_every: int = 0


class _Wire(asyncio.Protocol):
    """A lean WebSocket client connection. The handshake goes through websockets'
    sans-I/O ClientProtocol; after it, frames are parsed and built here (server frames
    are unmasked; client frames are masked with websockets' C `apply_mask`), and each text
    frame is handed to the Client as bytes, synchronously: no per-frame futures, queues or
    generators. The generator spends its CPU on the load, not on itself; a no-op server
    (loadtests.bench.noop) measures what is left of its ceiling."""

    def __init__(self, client: Client, uri: str, token: str) -> None:
        self.client = client
        self.proto: ClientProtocol | None = ClientProtocol(parse_uri(uri), max_size=2**22)
        self.request = self.proto.connect()
        self.request.headers["Authorization"] = f"Bearer {token}"
        self.opened = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.fragments: list[bytes] = []
        self.open = False
        self.close_code: int | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.proto.send_request(self.request)
        for data in self.proto.data_to_send():
            transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.buffer += data
            self._frames()
            return
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Response) and not self.opened.done():
                if event.status_code != 101 or proto.handshake_exc is not None:
                    self.opened.set_exception(
                        proto.handshake_exc or ConnectionError(f"HTTP {event.status_code}")
                    )
                    self.transport.close()
                    return
                self.open = True
                self.opened.set_result(None)
            elif self.open and event.opcode is Opcode.TEXT and event.fin:
                self.client.on_text(event.data)  # e.g. hello, in the same packet as the 101
        if self.open:
            # Bytes after the 101 response are already frames: take them from the parser.
            self.buffer += proto.reader.buffer
            self.proto = None
            self._frames()

    def _frames(self) -> None:
        buf = self.buffer
        pos, end = 0, len(buf)
        on_text = self.client.on_text
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if end - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 0:  # text, continuation
                if b0 & 0x80 and not self.fragments:
                    on_text(payload)
                else:
                    self.fragments.append(payload)
                    if b0 & 0x80:
                        on_text(b"".join(self.fragments))
                        self.fragments.clear()
            elif opcode == 9:  # ping
                self._write(0xA, payload)
            elif opcode == 8:  # close: answer it and hang up
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._write(0x8, payload[:2])
                self.open = False
                self.transport.close()
                break
        del buf[:pos]

    def _write(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        self.transport.write(head + mask + apply_mask(payload, mask))

    def connection_lost(self, exc) -> None:
        self.open = False
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        self.client.on_closed(self.close_code or 1006)

    def send_text(self, text: bytes) -> bool:
        if not self.open:
            return False
        self._write(0x1, text)
        return True

    def close(self, code: int = 1000) -> None:
        if self.open:
            self.close_code = code
            self._write(0x8, code.to_bytes(2, "big"))
            self.open = False
        if self.transport is not None:
            self.transport.close()


class Client:
    """One authenticated socket of one user."""

    __slots__ = (
        "closed",
        "closed_code",
        "gen",
        "hello",
        "hello_event",
        "receipts",
        "samples",
        "streams",
        "token",
        "url",
        "user_id",
        "wire",
    )

    def __init__(self, gen: Generator, user_id: int, token: str, url: str) -> None:
        self.gen, self.user_id, self.token, self.url = gen, user_id, token, url
        self.wire: _Wire | None = None
        self.hello: dict | None = None
        self.hello_event = asyncio.Event()
        self.streams: dict[int, Stream] = {}
        self.receipts: dict[int, dict[int, int]] = {}
        self.samples: dict[int, list[tuple[int, float]]] = {}
        self.closed_code: int | None = None
        self.closed = True

    @property
    def alive(self) -> bool:
        return not self.closed

    async def open(self, timeout: float = 20) -> float:
        """Connect and wait for `hello`; returns the seconds it took."""
        started = clock()
        self.hello_event.clear()
        self.closed_code = None
        uri = parse_uri(self.url)
        loop = asyncio.get_running_loop()

        async def handshake() -> None:
            _, wire = await loop.create_connection(
                lambda: _Wire(self, self.url, self.token), uri.host, uri.port
            )
            self.wire = wire
            self.closed = False
            try:
                await wire.opened
            except BaseException:
                self.closed = True
                wire.close()
                raise
            await self.hello_event.wait()

        await asyncio.wait_for(handshake(), timeout)
        return clock() - started

    def send_text(self, text: bytes) -> bool:
        return self.wire is not None and not self.closed and self.wire.send_text(text)

    async def close(self) -> None:
        if self.wire is not None and not self.closed:
            self.wire.close()
            deadline = clock() + 3
            while not self.closed and clock() < deadline:
                await asyncio.sleep(0.05)

    def on_closed(self, code: int) -> None:
        if self.closed and self.closed_code is not None:
            return
        self.closed = True
        self.closed_code = code
        gen = self.gen
        if gen.step is not None:
            gen.step.closes[code] += 1
        gen.closes_total[code] += 1

    def on_text(self, data: bytes) -> None:
        t = clock()
        gen = self.gen
        frame = orjson.loads(data)
        ftype = frame["type"]
        if ftype == "message":
            gen.on_message(self, frame, t)
        elif ftype == "ack":
            gen.on_ack(self, frame, t)
        elif ftype == "receipt":
            gen.on_receipt(self, frame, t)
            if gen.step is not None:
                gen.step.other_frames["receipt"] += 1
        elif ftype == "hello":
            self.hello = frame
            self.hello_event.set()
        elif ftype == "error":
            if gen.step is not None:
                gen.step.errors[frame.get("code")] += 1
            gen.errors_total[frame.get("code")] += 1
        elif gen.step is not None:
            gen.step.other_frames[ftype] += 1


class Generator:
    def __init__(self, tag: str, *, seed: int = 1) -> None:
        self.tag = tag
        self.taglen = len(tag)
        self.rng = random.Random(seed)
        self.sched = array("d")  # scheduled send time (monotonic) per message index
        self.conv_of = array("q")
        self.acked = bytearray()
        self.step: StepStats | None = None
        self.members: dict[int, list[int]] = {}
        self.errors_total: Counter = Counter()
        self.closes_total: Counter = Counter()
        self.reconnects = 0
        self.process = psutil.Process()
        # A diagnostic: PARLEY_BENCH_RECEIPT_TRACE=FILE appends one JSON line per answered
        # receipt sample (wall-clock ack and completion times, the member that came last).
        trace = os.environ.get("PARLEY_BENCH_RECEIPT_TRACE")
        self.receipt_trace = open(trace, "a") if trace else None  # noqa: SIM115
        self.wall_offset = time.time() - clock()

    # --- frames (hot path) ---------------------------------------------------------------

    def _index(self, client_id) -> int | None:
        if type(client_id) is str and client_id.startswith(self.tag):
            return int(client_id[self.taglen :])
        return None

    def on_message(self, client: Client, frame: dict, t: float) -> None:
        cid = frame["conversation"]
        stream = client.streams.get(cid)
        if stream is None:
            return
        stream.add(frame["seq"])
        if client.samples.get(cid):  # only a sampled message's sender waits for receipts
            self._advance(client, cid, frame["sender"]["id"], frame["seq"], t)
        step = self.step
        idx = self._index(frame.get("client_id"))
        if step is not None and idx is not None and step.first_idx <= idx < step.end_idx:
            step.deliveries += 1
            step.delivery.add(t - self.sched[idx])

    def on_ack(self, client: Client, frame: dict, t: float) -> None:
        idx = self._index(frame.get("client_id"))
        if idx is None or idx >= len(self.acked):
            return
        if self.acked[idx]:
            return
        self.acked[idx] = 1
        step = self.step
        if step is not None and step.first_idx <= idx < step.end_idx:
            step.acks += 1
            step.ack.add(t - self.sched[idx])
            if step.sample_every and idx % step.sample_every == 0:
                cid = frame["conversation"]
                client.samples.setdefault(cid, []).append((frame["seq"], t))
                step.receipt_samples += 1

    def on_receipt(self, client: Client, frame: dict, t: float) -> None:
        self._advance(client, frame["conversation"], frame["user"], frame["delivered_seq"], t)

    def _advance(self, client: Client, cid: int, user: int, delivered: int, t: float) -> None:
        """`user` has `delivered` in conversation `cid`, as seen by `client`: a `receipt`
        frame says so, and so does a `message` frame for its sender (sending moves the
        sender's receipts to the message's seq without a receipt frame; docs/protocol.md)."""
        positions = client.receipts.setdefault(cid, {})
        if delivered > positions.get(user, 0):
            positions[user] = delivered
        pending = client.samples.get(cid)
        if not pending or self.step is None:
            return
        others = [u for u in self.members.get(cid, ()) if u != client.user_id]
        low = min((positions.get(u, 0) for u in others), default=0)
        done = [s for s in pending if s[0] <= low]
        if done:
            for seq, acked_at in done:
                self.step.receipt_lag.add(t - acked_at)
                if self.receipt_trace is not None:
                    self.receipt_trace.write(
                        orjson.dumps(
                            {
                                "conversation": cid,
                                "seq": seq,
                                "sender": client.user_id,
                                "acked": acked_at + self.wall_offset,
                                "done": t + self.wall_offset,
                                "last": user,
                                "label": self.step.label,
                            }
                        ).decode()
                        + "\n"
                    )
                    self.receipt_trace.flush()
            client.samples[cid] = [s for s in pending if s[0] > low]

    # --- sockets -------------------------------------------------------------------------

    async def open_all(
        self, clients: list[Client], *, concurrency: int = 100, timeout: float = 60
    ) -> dict:
        """Open sockets with at most `concurrency` handshakes in flight. Returns the rate
        (sockets per second from first attempt to last hello) and time-to-hello figures."""
        sem = asyncio.Semaphore(concurrency)
        took = Percentiles()
        failures: Counter = Counter()

        async def one(client: Client) -> None:
            async with sem:
                try:
                    took.add(await client.open())
                except InvalidStatus as exc:
                    failures[f"http {exc.response.status_code}"] += 1
                except (OSError, TimeoutError, InvalidHandshake) as exc:
                    failures[type(exc).__name__] += 1

        started = clock()
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients)), timeout)
        elapsed = clock() - started
        return {
            "sockets": len(clients),
            "opened": len(took),
            "failed": dict(failures),
            "seconds": round(elapsed, 3),
            "per_second": round(len(took) / elapsed, 1) if elapsed > 0 else None,
            "time_to_hello_ms": took.summary_ms(),
        }

    async def reopen_closed(self, clients: list[Client]) -> int:
        closed = [c for c in clients if not c.alive]
        if closed:
            await self.open_all(closed, concurrency=50)
            self.reconnects += len(closed)
        return len(closed)

    @staticmethod
    async def close_all(clients: list[Client]) -> None:
        sem = asyncio.Semaphore(200)

        async def one(c: Client) -> None:
            async with sem:
                await c.close()

        await asyncio.gather(*(one(c) for c in clients))

    # --- a step --------------------------------------------------------------------------

    def plan(
        self, rate: float, duration: float, rooms: list[Room]
    ) -> list[tuple[float, Client, int]]:
        """Poisson arrivals at `rate` for `duration` s; rooms in turn, a random member sends."""
        plan, t, i = [], 0.0, 0
        while True:
            t += self.rng.expovariate(rate)
            if t >= duration:
                return plan
            room = rooms[i % len(rooms)]
            i += 1
            plan.append((t, self.rng.choice(room.clients), room.id))

    async def drive(self, plan: list[tuple[float, Client, int]], step: StepStats) -> None:
        start = clock() + 0.05
        first = len(self.sched)
        for offset, _, cid in plan:  # the whole schedule is fixed before the first send
            self.sched.append(start + offset)
            self.conv_of.append(cid)
        self.acked.extend(bytes(len(plan)))
        step.first_idx, step.end_idx = first, first + len(plan)
        step.scheduled = len(plan)
        dumps, tag, sched = orjson.dumps, self.tag, self.sched
        for k, (_, client, cid) in enumerate(plan):
            idx = first + k
            due = sched[idx]
            delay = due - clock()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            elif k % 64 == 63:
                await asyncio.sleep(0)  # behind schedule: let the readers run
            step.lag.add(max(0.0, clock() - due))
            frame = {
                "type": "send",
                "conversation": cid,
                "client_id": f"{tag}{idx}",
                "body": make_body(time.time(), str(idx)),
            }
            if client.send_text(dumps(frame)):
                step.sent += 1
            else:
                step.send_failed += 1

    async def run_step(
        self,
        *,
        label: str,
        rate: float,
        duration: float,
        rooms: list[Room],
        last_seqs,
        history,
        receipt_samples_per_s: float = 0,
        drain_timeout: float = 10.0,
        receipt_timeout: float = 5.0,
        probe=None,
    ) -> tuple[StepStats, dict]:
        """One step at `rate` messages/s. `last_seqs(ids)` and `history(ids, after)` read
        Postgres (sync, run in a thread). `probe` (async, optional) runs during the step."""
        room_size = max(len(r.clients) for r in rooms)
        step = StepStats(label, rate, duration, room_size, len(rooms))
        ids = [r.id for r in rooms]
        start_seqs = await asyncio.to_thread(last_seqs, ids)
        for room in rooms:
            self.members[room.id] = room.member_ids
            for client in room.clients:
                client.streams = {room.id: Stream(start=start_seqs.get(room.id, 0))}
                client.samples = {}
        plan = self.plan(rate, duration, rooms)
        if receipt_samples_per_s > 0 and plan:
            step.sample_every = max(1, round(rate / receipt_samples_per_s))
        self.step = step
        cpu0 = self.process.cpu_times()
        wall0 = clock()
        probe_task = asyncio.get_running_loop().create_task(probe()) if probe else None
        try:
            await self.drive(plan, step)
            sending = clock() - wall0
            # Drain: every ack and every delivery in, or no progress for 2 s.
            expected = step.sent * room_size
            deadline = clock() + drain_timeout
            progress, progress_at = -1, clock()
            while clock() < deadline:
                now_progress = step.deliveries + step.acks
                if step.deliveries >= expected and step.acks >= step.sent:
                    break
                if now_progress != progress:
                    progress, progress_at = now_progress, clock()
                elif clock() - progress_at > 2.0:
                    break
                await asyncio.sleep(0.05)
            if step.sample_every:
                deadline = clock() + receipt_timeout
                while clock() < deadline and any(
                    s for r in rooms for c in r.clients for s in c.samples.values()
                ):
                    await asyncio.sleep(0.1)
        finally:
            if probe_task is not None:
                probe_task.cancel()
                # Bounded (asyncio.wait, not wait_for, which waits for the cancellation
                # to finish): a probe that does not stop must not hold the step.
                await asyncio.wait({probe_task}, timeout=5)
                if probe_task.done() and not probe_task.cancelled():
                    probe_task.exception()  # retrieved: nobody else wants it
        cpu1 = self.process.cpu_times()
        elapsed = clock() - wall0
        self.step = None
        rows = await asyncio.to_thread(history, ids, start_seqs)
        acked, unacked = [], []
        for idx in range(step.first_idx, step.end_idx):
            pair = (self.conv_of[idx], f"{self.tag}{idx}")
            (acked if self.acked[idx] else unacked).append(pair)
        check = check_history(
            history=rows,
            streams=[(cid, s) for r in rooms for c in r.clients for cid, s in c.streams.items()],
            acked=acked,
            unacked=unacked,
        )
        pending_receipts = sum(len(s) for r in rooms for c in r.clients for s in c.samples.values())
        delivery = step.delivery.summary_ms()
        result = {
            "label": label,
            "rate": rate,
            "duration_s": duration,
            "rooms": len(rooms),
            "room_size": room_size,
            "scheduled": step.scheduled,
            "sent": step.sent,
            "send_failed": step.send_failed,
            "acked": step.acks,
            "deliveries": step.deliveries,
            "sends_per_s": round(step.sent / sending, 1) if sending > 0 else None,
            "deliveries_per_s": round(step.deliveries / sending, 1) if sending > 0 else None,
            "send_ack_ms": step.ack.summary_ms(),
            "send_delivery_ms": delivery,
            "generator_lag_ms": step.lag.summary_ms(),
            "generator_cpu": round(
                (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed, 3
            ),
            "receipt_lag_ms": step.receipt_lag.summary_ms() if step.sample_every else None,
            "receipt_samples_unanswered": pending_receipts if step.sample_every else None,
            "history": check.__dict__,
            "errors": {str(k): v for k, v in step.errors.items()},
            "closes": {str(k): v for k, v in step.closes.items()},
            "other_frames": dict(step.other_frames),
        }
        return step, result


def passed(result: dict, *, p99_ms: float) -> tuple[bool, list[str]]:
    """The bar: zero loss, zero order violations, every send acknowledged, no error
    frame, p99 send->delivery under p99_ms. Returns (passed, reasons it failed)."""
    h = result["history"]
    reasons = []
    if h["lost_deliveries"]:
        # Committed, but not on the member's socket when the drain ended (lost, or later
        # than the drain window: either fails the bar).
        reasons.append(f"{h['lost_deliveries']} deliveries missing after the drain")
    if h["order_violations"]:
        reasons.append(f"{h['order_violations']} order violations")
    if h["duplicate_frames"]:
        reasons.append(f"{h['duplicate_frames']} duplicate frames")
    if h["acked_missing"] or h["duplicate_messages"]:
        reasons.append("acked message missing or committed twice")
    if result["send_failed"]:
        reasons.append(f"{result['send_failed']} sends on closed sockets")
    if result["sent"] and result["acked"] < result["sent"]:
        reasons.append(f"{result['sent'] - result['acked']} sends not acknowledged")
    if result["errors"]:
        reasons.append(f"error frames {result['errors']}")
    p99 = result["send_delivery_ms"]["p99"]
    if p99 is None or p99 >= p99_ms:
        reasons.append(f"p99 send->delivery {p99} ms")
    return not reasons, reasons


def generator_bound(result: dict) -> bool:
    """The generator, not the server, may have set this step's figures."""
    lag = result["generator_lag_ms"]["p99"] or 0
    return lag > 25 or result["generator_cpu"] > 0.9
