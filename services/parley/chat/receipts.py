"""Delivery and read receipts reported by the realtime service, persisted by the worker.

CONTRACT (the realtime service calls these):
- `await record_delivery(conversation_id=, user_id=, seq=)`: after a `message` frame was
  written to a recipient's socket. Costs a dict update: deliveries are buffered per
  process and staged in Redis every DELIVERY_BUFFER_SECONDS in one script call.
- `await record_read(conversation_id=, user_id=, seq=)`: for a WebSocket `read` frame.
  When it returns, the read is in Redis and a flush is scheduled: it survives this
  process dying. Raises `redis.RedisError` if it could not.
- `await flush_deliveries()`: stage what is buffered now (call it when draining).

How receipts travel (docs/operations.md, "Receipts"):
1. Staging merges into the Redis hash `parley:rcpt:<conversation>` (fields `d:<user>`
   and `r:<user>`, the highest seq wins) and, with `SET NX` on
   `parley:rcpt:sched:<conversation>`, schedules at most one flush per conversation at a
   time, in the sorted set `parley:rcpt:due` (scored by when it is due; no broker call on
   the realtime side). Each worker's ticker takes what is due every
   PARLEY_RECEIPT_TICK_SECONDS (atomically: one ticker gets each) and enqueues one
   `parley.receipts.flush_many` task for all of it. The due time throttles: the flush runs
   PARLEY_RECEIPT_FLUSH_SECONDS after the previous one started (the key
   `parley:rcpt:last:<conversation>`), or after PARLEY_DELIVERY_BUFFER_SECONDS + 50 ms
   when that is later (the other replicas' buffered deliveries of the same messages
   join it). A busy room therefore costs a few updates per member per second, however
   many messages it gets, and a receipt waits at most one interval for its flush.
2. `receipts_flush` (the task) deletes the schedule key (noting when it started), reads
   the hash, applies every user's receipts with `services.receipts_advance_many` (one
   GREATEST statement, safe to repeat and to reorder, one `chat.receipts` event on
   commit carrying every row that moved), then deletes the fields it applied unless they
   moved meanwhile (compare-and-delete). A task that dies midway leaves the hash as it
   was, and its redelivery does the same work again.
3. Conversations with staged receipts are listed in the sorted set `parley:rcpt:dirty`
   (scored by when they were staged or last flushed); one worker at a time sweeps it and
   schedules a flush for any left waiting with none scheduled (`receipts_sweep`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import redis
from django.db import transaction

from parley.chat import notifications, services
from parley.chat.ratelimit import redis_client
from parley.knobs import knob_float

logger = logging.getLogger(__name__)

FLUSH_TASK = "parley.receipts.flush"
FLUSH_MANY_TASK = "parley.receipts.flush_many"
KEY_PREFIX = "parley:rcpt:"
DIRTY_KEY = f"{KEY_PREFIX}dirty"
DUE_KEY = f"{KEY_PREFIX}due"
# A schedule key outlives its countdown by this much in case its task is lost; the
# sweeper (or the next receipt after that) schedules a new one.
SCHEDULE_GRACE_SECONDS = 60


def flush_seconds() -> float:
    """How long staged receipts of a conversation wait to be written together."""
    return knob_float("PARLEY_RECEIPT_FLUSH_SECONDS", 0.5)


def delivery_buffer_seconds() -> float:
    return knob_float("PARLEY_DELIVERY_BUFFER_SECONDS", 0.25)


def pending_key(conversation_id: int) -> str:
    return f"{KEY_PREFIX}{conversation_id}"


def schedule_key(conversation_id: int) -> str:
    return f"{KEY_PREFIX}sched:{conversation_id}"


def last_flush_key(conversation_id: int) -> str:
    return f"{KEY_PREFIX}last:{conversation_id}"


def first_wait_seconds() -> float:
    """The shortest countdown: long enough that the other replicas' buffered deliveries
    of the same messages are staged before the flush reads them."""
    return delivery_buffer_seconds() + 0.05


# KEYS: dirty zset, then (pending hash, schedule key, last-flush key) per conversation.
# ARGV: schedule ttl ms, flush interval ms, shortest countdown ms, then per conversation:
# its id, n fields, n x (field, seq).
# Returns (conversation id, countdown ms) pairs, flattened: the flushes this call must
# enqueue. The countdown throttles, it does not delay: a conversation is flushed at most
# once per interval (counted from the last flush's start), but no later than the
# interval after it, and never sooner than the shortest countdown (so the other
# replicas' deliveries of the same messages make it into the same flush).
_STAGE = """
local ttl = ARGV[1]
local interval, shortest = tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1])
local now_ms = now * 1000 + math.floor(tonumber(t[2]) / 1000)
local pos = 4
local out = {}
for i = 2, #KEYS, 3 do
  local pending, sched, last = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local conv = ARGV[pos]
  local n = tonumber(ARGV[pos + 1])
  pos = pos + 2
  for j = 1, n do
    local field, seq = ARGV[pos], tonumber(ARGV[pos + 1])
    pos = pos + 2
    local cur = tonumber(redis.call('HGET', pending, field) or '-1')
    if seq > cur then redis.call('HSET', pending, field, seq) end
  end
  redis.call('ZADD', KEYS[1], 'NX', now, conv)
  if redis.call('SET', sched, '1', 'NX', 'PX', ttl) then
    local wait = shortest
    local previous = tonumber(redis.call('GET', last) or '')
    if previous and previous + interval - now_ms > wait then
      wait = previous + interval - now_ms
    end
    out[#out + 1] = conv
    out[#out + 1] = wait
  end
end
return out
"""

# KEYS: schedule key, last-flush key. ARGV: last-flush key ttl ms.
# A flush starts: a receipt staged from now on schedules the next one, counted from now.
_FLUSH_STARTS = """
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[2], string.format('%.0f', ms), 'PX', ARGV[1])
return 0
"""

# KEYS: pending hash, dirty zset. ARGV: conversation id, then (field, applied seq) pairs.
# Deletes each field still at (or below) the applied seq; forgets an emptied hash, else
# notes that a flush just ran (what is left was staged since and has its own flush).
_FORGET_APPLIED = """
for i = 2, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if cur ~= -1 and cur <= tonumber(ARGV[i + 1]) then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], 'XX', tonumber(redis.call('TIME')[1]), ARGV[1])
end
return 0
"""

_scripts: dict[str, object] = {}


def _run_script(client: redis.Redis, source: str, keys: list, args: list):
    # EVALSHA, loading the script again when Redis lost it (e.g. after a restart).
    script = _scripts.get(source)
    if script is None:
        script = _scripts[source] = client.register_script(source)
    return script(keys=keys, args=args, client=client)


# KEYS: due zset. ARGV: conversation id, countdown ms. Due at Redis' now + countdown, or
# earlier if it already was.
_DUE_ADD = """
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local cur = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '')
if not cur or due < cur then redis.call('ZADD', KEYS[1], due, ARGV[1]) end
return 0
"""

# KEYS: due zset. ARGV: most ids to take. Takes (removes and returns) the conversations
# that are due now: each is taken once, by one ticker, whichever worker runs it. Returns
# (id, ms past its due time) pairs, flattened.
_TAKE_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[1]))
local out = {}
for i = 1, #due, 2 do
  redis.call('ZREM', KEYS[1], due[i])
  out[#out + 1] = due[i]
  out[#out + 1] = math.floor(now - tonumber(due[i + 1]))
end
return out
"""


def tick_seconds() -> float:
    """How often a worker's ticker moves due flushes into tasks (the most a flush waits
    past its due time, besides the queue)."""
    return knob_float("PARLEY_RECEIPT_TICK_SECONDS", 0.1)


def _enqueue_flush(
    conversation_id: int, countdown: float | None = None, *, client: redis.Redis | None = None
) -> None:
    """Schedule a conversation's flush `countdown` seconds from now (default: one flush
    interval). It lands in the due set; the workers' tickers turn what is due into
    `parley.receipts.flush_many` tasks, many conversations per task (take_due)."""
    countdown = flush_seconds() if countdown is None else countdown
    _run_script(
        client or redis_client(),
        _DUE_ADD,
        [DUE_KEY],
        [int(conversation_id), max(int(countdown * 1000), 0)],
    )


def take_due(*, client: redis.Redis | None = None, limit: int = 500) -> list[tuple[int, float]]:
    """Remove and return the conversations whose flush is due (at most `limit`), each
    with how late it was taken: (conversation id, seconds past due). The caller must
    enqueue their flush, or `_enqueue_flush` them again if it cannot."""
    out = _run_script(client or redis_client(), _TAKE_DUE, [DUE_KEY], [int(limit)])
    return [(int(out[i]), int(out[i + 1]) / 1000) for i in range(0, len(out), 2)]


def stage(
    entries: Iterable[tuple[int, int, int, int]], *, client: redis.Redis | None = None
) -> list[int]:
    """Stage (conversation_id, user_id, delivered_seq, read_seq) receipts; schedule flushes.

    Synchronous (call it from a thread in async code). Returns the conversations for
    which a flush was scheduled (in the due set). Raises if Redis cannot be reached;
    what was staged stays staged, and the sweeper schedules its flush later.
    """
    client = client or redis_client()
    by_conv: dict[int, dict[str, int]] = {}
    for conversation_id, user_id, delivered_seq, read_seq in entries:
        fields = by_conv.setdefault(int(conversation_id), {})
        read_seq = max(int(read_seq), 0)
        delivered_seq = max(int(delivered_seq), read_seq)
        if delivered_seq > 0:
            f = f"d:{int(user_id)}"
            fields[f] = max(fields.get(f, 0), delivered_seq)
        if read_seq > 0:
            f = f"r:{int(user_id)}"
            fields[f] = max(fields.get(f, 0), read_seq)
    by_conv = {c: f for c, f in by_conv.items() if f}
    if not by_conv:
        return []
    keys = [DIRTY_KEY]
    args = [
        int((flush_seconds() + SCHEDULE_GRACE_SECONDS) * 1000),
        int(flush_seconds() * 1000),
        int(min(first_wait_seconds(), flush_seconds()) * 1000),
    ]
    for conversation_id, fields in by_conv.items():
        keys += [
            pending_key(conversation_id),
            schedule_key(conversation_id),
            last_flush_key(conversation_id),
        ]
        args += [conversation_id, len(fields)]
        for field, seq in fields.items():
            args += [field, seq]
    out = _run_script(client, _STAGE, keys, args)
    to_schedule = [(int(out[i]), int(out[i + 1]) / 1000) for i in range(0, len(out), 2)]
    for conversation_id, countdown in to_schedule:
        try:
            _enqueue_flush(conversation_id, countdown, client=client)
        except Exception:
            # Let the next receipt (or the sweeper) schedule it again.
            client.delete(schedule_key(conversation_id))
            raise
    return [conversation_id for conversation_id, _ in to_schedule]


# --- the realtime side ------------------------------------------------------------------


class _DeliveryBuffer:
    """Highest delivered seq per (conversation, user), per process and event loop."""

    def __init__(self) -> None:
        self.seqs: dict[tuple[int, int], int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None


_buffer = _DeliveryBuffer()


async def record_delivery(*, conversation_id: int, user_id: int, seq: int) -> None:
    """Note that `seq` reached one of the user's sockets (buffered; see the module doc)."""
    loop = asyncio.get_running_loop()
    if _buffer.loop is not loop:
        _buffer.loop, _buffer.task = loop, None
    key = (conversation_id, user_id)
    if seq > _buffer.seqs.get(key, 0):
        _buffer.seqs[key] = seq
    if _buffer.task is None or _buffer.task.done():
        _buffer.task = loop.create_task(_delivery_flusher(), name="parley-delivery-receipts")


async def _delivery_flusher() -> None:
    try:
        while True:
            await asyncio.sleep(delivery_buffer_seconds())
            if not _buffer.seqs:
                break  # idle: record_delivery starts a new flusher when needed
            await flush_deliveries()
    finally:
        _buffer.task = None


async def flush_deliveries() -> None:
    """Stage the buffered deliveries now. On failure they stay buffered for the next try."""
    if not _buffer.seqs:
        return
    batch, _buffer.seqs = _buffer.seqs, {}
    entries = [(c, u, seq, 0) for (c, u), seq in batch.items()]
    try:
        await asyncio.to_thread(stage, entries)
    except redis.RedisError as exc:
        logger.warning("delivery receipts not staged (%r); retrying", exc)
        for key, seq in batch.items():
            if seq > _buffer.seqs.get(key, 0):
                _buffer.seqs[key] = seq
    except Exception as exc:
        # Staged, but a flush could not be enqueued: the sweeper will schedule it.
        logger.warning("delivery receipts staged, flush not enqueued: %r", exc)


async def record_read(*, conversation_id: int, user_id: int, seq: int) -> None:
    """Durably record a read (and so a delivery) up to `seq`; see the module doc."""
    await asyncio.to_thread(stage, [(conversation_id, user_id, seq, seq)])


# --- the worker side ---------------------------------------------------------------------


def receipts_flush(*, conversation_id: int, client: redis.Redis | None = None) -> int:
    """Apply the receipts staged for a conversation. Returns how many users' rows moved.

    Idempotent: the update is GREATEST-style, and a field is forgotten only once its
    value is in Postgres.
    """
    client = client or redis_client()
    # Delete the schedule first: a receipt staged from now on schedules a new flush, so
    # nothing staged after the read below waits for the sweeper. And note when this one
    # started: the next one waits for the rest of the interval, not a whole one.
    _run_script(
        client,
        _FLUSH_STARTS,
        [schedule_key(conversation_id), last_flush_key(conversation_id)],
        [int(flush_seconds() * 2000) + 1],
    )
    raw = client.hgetall(pending_key(conversation_id))
    staged: dict[int, dict[str, int]] = {}
    for field, value in raw.items():
        kind, _, user_id = field.decode().partition(":")
        staged.setdefault(int(user_id), {})[kind] = int(value)
    moved = []
    if staged:
        positions = {
            user_id: (max(seqs.get("d", 0), seqs.get("r", 0)), seqs.get("r", 0))
            for user_id, seqs in staged.items()
        }
        with transaction.atomic():
            moved = services.receipts_advance_many(
                conversation_id=conversation_id, positions=positions
            )
            reads = {u: r for u, (_, r) in positions.items() if r}
            if reads:
                notifications.bursts_close_read(conversation_id=conversation_id, reads=reads)
    args: list = [conversation_id]
    for field, value in raw.items():
        args += [field, value]
    _run_script(client, _FORGET_APPLIED, [pending_key(conversation_id), DIRTY_KEY], args)
    return len(moved)


def sweep_after_seconds() -> float:
    """Staged receipts this old with no flush scheduled had their flush lost."""
    return max(5.0, 4 * flush_seconds())


def receipts_sweep(*, client: redis.Redis | None = None, limit: int = 1000) -> list[int]:
    """Schedule a flush for staged receipts whose scheduled flush was lost. Returns them.

    A flush is lost when the process that staged receipts died (or lost Redis) between
    staging and scheduling, when a worker's ticker died between taking it from the due
    set and enqueueing it, or when the broker lost the task. The dirty set remembers
    when each conversation was staged or last flushed.
    """
    client = client or redis_client()
    now, _ = client.time()
    ttl_ms = int((flush_seconds() + SCHEDULE_GRACE_SECONDS) * 1000)
    scheduled = []
    stale = client.zrangebyscore(DIRTY_KEY, "-inf", now - sweep_after_seconds(), start=0, num=limit)
    for raw in stale:
        conversation_id = int(raw)
        if not client.hlen(pending_key(conversation_id)):
            client.zrem(DIRTY_KEY, conversation_id)
            continue
        if not client.set(schedule_key(conversation_id), "1", nx=True, px=ttl_ms):
            continue  # a flush is pending
        try:
            _enqueue_flush(conversation_id, client=client)
        except Exception:
            client.delete(schedule_key(conversation_id))
            raise
        client.zadd(DIRTY_KEY, {conversation_id: now}, xx=True)
        scheduled.append(conversation_id)
    return scheduled
