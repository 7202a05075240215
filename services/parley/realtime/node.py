"""The state one realtime process shares between its sockets (one Node per event loop).

- the registry of open sockets, used to drain (SIGTERM) and to resync (see below);
- presence: the heartbeat that refreshes this node's sockets, and the sweep that finds
  users of dead nodes (parley.realtime.presence);
- the channel-layer watch. The live path is at-most-once: while the layer's Redis
  connection is down, events published meanwhile are lost to this node's sockets. Two
  signals say so: the pub/sub connection reconnected (a redis-py connect callback on
  channels_redis' subscriber connection), or the node's own probe stopped echoing and
  came back. Either way the sockets that were open are closed with 1011, spread over
  REALTIME_RESYNC_SECONDS, and their clients reconnect and `resume` from Postgres;
- shared reads: a missing seq that many sockets wait for is read from Postgres once;
- the typing throttle.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from channels.layers import get_channel_layer

from parley.chat import events, receipts, selectors
from parley.realtime import conf, frames, metrics, pg, presence, tokens
from parley.realtime.db import db

if TYPE_CHECKING:
    from parley.realtime.consumers import ChatConsumer

logger = logging.getLogger(__name__)

MEMBER_COUNT_TTL = 60.0
FETCH_TTL = 2.0


class Node:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.id = conf.node_id()
        self.sockets: set[ChatConsumer] = set()
        self.draining = False
        self.layer_healthy = True
        self._started = False
        self._start_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._socket_numbers = itertools.count(1)
        self._typing: dict[tuple[int, int], float] = {}
        self._fetches: dict[tuple[int, int, int], tuple[float, asyncio.Future]] = {}
        self._member_counts: dict[int, tuple[float, int]] = {}
        self._count_fetches: dict[int, asyncio.Task] = {}
        self._arriving: list[ChatConsumer] | None = None  # sockets whose presence is due
        self._hooked: set[int] = set()
        self._last_echo = time.monotonic()
        self._unhealthy_since: float | None = None
        self._last_resync: float | None = None
        self.layer = get_channel_layer()
        size = conf.async_db_connections()
        self.loop_db = pg.LoopConnections(size) if size else None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            # on_commit publishes from the database threads go through this loop (and
            # its channel-layer connection) rather than a private publishing thread.
            events.publisher.bind_loop(self.loop)
            self._tasks = [
                self.loop.create_task(self._heartbeat_loop(), name="parley-presence-heartbeat"),
                self.loop.create_task(self._sweep_loop(), name="parley-presence-sweep"),
                self.loop.create_task(self._probe_loop(), name="parley-layer-probe"),
                self.loop.create_task(self._laggard_loop(), name="parley-laggards"),
            ]
            self._started = True
            logger.info("realtime node %s started", self.id)

    async def stop(self) -> None:
        """Stop the node's loops and flush what is buffered, every step bounded: Redis
        and Postgres may be stopping at the same moment (`podman-compose down` stops
        every container at once), and a cancelled task that waits in a database thread
        only ends when the thread does."""
        started = time.monotonic()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await bounded(asyncio.wait(tasks) if tasks else asyncio.sleep(0), "stopping the loops", 2)
        for task in list(self._background):
            if task.get_name() == "parley-send-worker":  # idle workers wait forever
                task.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=2)
        for task in list(self._background):
            task.cancel()
        await bounded(flush_deliveries(), "flushing delivery receipts", conf.SHUTDOWN_STEP_SECONDS)
        if self.loop_db is not None:  # a node started again (tests) makes new ones
            old, self.loop_db = self.loop_db, pg.LoopConnections(self.loop_db.size)
            await bounded(old.close(), "closing the loop's database connections", 1)
        self._started = False
        logger.info("node stopped in %.1f s", time.monotonic() - started)

    def spawn(self, coro, name: str | None = None) -> asyncio.Task:
        """A background task the node keeps a reference to (and waits for on stop)."""
        task = self.loop.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- sockets -------------------------------------------------------------------------

    def presence_field(self) -> str:
        return f"{self.id}:{next(self._socket_numbers)}"

    def register(self, consumer: ChatConsumer) -> None:
        self.sockets.add(consumer)
        metrics.connections.set(len(self.sockets))

    def unregister(self, consumer: ChatConsumer) -> None:
        self.sockets.discard(consumer)
        metrics.connections.set(len(self.sockets))

    async def close_spread(self, sockets: list[ChatConsumer], *, code: int, window: float) -> None:
        """Close `sockets` with `code`, evenly spread over `window` seconds, in random
        order, so that their clients do not reconnect in the same instant."""
        sockets = [s for s in sockets if not s.closing]
        random.shuffle(sockets)
        if not sockets:
            return
        start, step = time.monotonic(), window / len(sockets)
        closing = []
        for i, consumer in enumerate(sockets):
            delay = start + i * step - time.monotonic()
            if delay > 0.005:
                await asyncio.sleep(delay)
            closing.append(consumer.server_close(code))
        closing = [t for t in closing if t is not None]
        if closing:
            await asyncio.wait(closing, timeout=5)

    async def drain(self, window: float | None = None) -> None:
        """Stop taking sockets and close the open ones with 1012 over the drain window."""
        self.draining = True
        window = conf.DRAIN_SECONDS if window is None else window
        logger.info("draining %d sockets over %.1f s", len(self.sockets), window)
        await self.close_spread(list(self.sockets), code=1012, window=window)
        await bounded(flush_deliveries(), "flushing delivery receipts", conf.SHUTDOWN_STEP_SECONDS)

    def resync(self, reason: str, *, connected_before: float | None = None) -> None:
        """The layer may have lost events: close the sockets that were open with 1011."""
        now = time.monotonic()
        if (
            reason == "recovered"
            and self._last_resync is not None
            and (self._unhealthy_since is None or self._last_resync >= self._unhealthy_since)
        ):
            return  # the reconnect callback already closed what needed closing
        self._last_resync = now
        cutoff = now if connected_before is None else connected_before
        victims = [s for s in self.sockets if s.connected_at <= cutoff and not s.closing]
        metrics.resyncs.labels(reason).inc()
        logger.warning(
            "channel layer %s: closing %d sockets with 1011 so they resume", reason, len(victims)
        )
        if victims:
            self.spawn(
                self.close_spread(victims, code=1011, window=conf.RESYNC_SECONDS),
                name="parley-resync",
            )

    # --- slow sockets ----------------------------------------------------------------------

    def _queues(self) -> dict:
        """channel name -> its queue in the channel layer ({} if the layer hides them)."""
        try:
            get_layer = getattr(self.layer, "_get_layer", None)
            if get_layer is not None:  # pub/sub layer: one queue per channel
                return get_layer().channels
            return self.layer.receive_buffer  # core layer
        except (AttributeError, RuntimeError):
            return {}

    async def _laggard_loop(self) -> None:
        """A client that stops reading blocks its consumer on the socket while events
        keep queueing for it in memory. Past SLOW_SOCKET_BACKLOG, the socket leaves its
        groups (the queue stops growing) and is closed with 1013: the client reconnects
        and resumes from Postgres. Once a second over every socket of the node: the
        layer's queues are looked up once per pass, not once per socket."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._shed_laggards()
            except Exception:  # the check must outlive a surprise
                logger.exception("slow-socket check failed")

    def _shed_laggards(self) -> None:
        queues, limit = self._queues(), conf.SLOW_SOCKET_BACKLOG
        for consumer in list(self.sockets):
            queue = queues.get(consumer.channel_name)
            if queue is not None and queue.qsize() > limit and not consumer.closing:
                logger.warning("socket of user %s fell behind: closing it", consumer.user_id)
                consumer.shed()

    # --- channel-layer watch ---------------------------------------------------------------

    def hook_layer(self) -> None:
        """Watch channels_redis' pub/sub connections for reconnects (once per connection)."""
        get_layer = getattr(self.layer, "_get_layer", None)
        if get_layer is None:
            return  # not the pub/sub layer: the probe alone watches it
        try:
            shards = get_layer()._shards
        except (AttributeError, RuntimeError):
            return
        for shard in shards:
            connection = getattr(getattr(shard, "_pubsub", None), "connection", None)
            if connection is not None and id(connection) not in self._hooked:
                connection.register_connect_callback(self._on_layer_connect)
                self._hooked.add(id(connection))

    async def _on_layer_connect(self, connection) -> None:
        # Called by redis-py after it re-established the subscriber connection (and
        # re-subscribed): whatever was published while it was down never reached us.
        # Runs inside redis-py's connect path: schedule, never await the layer here.
        self.loop.call_soon(self.resync, "reconnected")

    async def _probe_loop(self) -> None:
        group = "parley.probe." + re.sub(r"[^A-Za-z0-9_.-]", "-", self.id)[:80]
        metrics.layer_healthy.set(1)
        receiver = None
        n = 0
        try:
            while True:
                try:
                    if receiver is None or receiver.done():
                        receiver = self.loop.create_task(self._probe_receiver(group))
                    n += 1
                    await asyncio.wait_for(
                        self.layer.group_send(group, frames.probe_event(node=self.id, n=n)),
                        conf.PROBE_INTERVAL_SECONDS,
                    )
                except Exception as exc:
                    logger.debug("layer probe not sent: %r", exc)
                silent = time.monotonic() - self._last_echo
                if silent > conf.PROBE_TIMEOUT_SECONDS and self.layer_healthy:
                    self.layer_healthy = False
                    self._unhealthy_since = self._last_echo
                    metrics.layer_healthy.set(0)
                    logger.warning("channel layer silent for %.1f s", silent)
                await asyncio.sleep(conf.PROBE_INTERVAL_SECONDS)
        finally:
            if receiver is not None:
                receiver.cancel()

    async def _probe_receiver(self, group: str) -> None:
        channel = await self.layer.new_channel()
        await self.layer.group_add(group, channel)
        if asyncio.current_task().cancelling():
            # Cancelled while subscribing, and the cancellation did not reach us: redis-py
            # can swallow it while it opens the pub/sub connection (the node's first
            # SUBSCRIBE). Waiting in receive() now would hold the loop's shutdown forever.
            raise asyncio.CancelledError
        self.hook_layer()
        while True:
            try:
                await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("layer probe receive failed: %r", exc)
                await asyncio.sleep(1)
                continue
            self._last_echo = time.monotonic()
            if not self.layer_healthy:
                self.layer_healthy = True
                metrics.layer_healthy.set(1)
                logger.warning("channel layer answers again")
                self.resync("recovered", connected_before=time.monotonic())

    # --- presence --------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(conf.PRESENCE_HEARTBEAT_SECONDS * random.uniform(0.9, 1.1))
            expiry = presence.expiry()
            batch: dict[int, list[tuple[str, str]]] = {}
            for consumer in list(self.sockets):
                if consumer.presence_field is not None:
                    batch.setdefault(consumer.user_id, []).append((consumer.presence_field, expiry))
            try:
                changes = await presence.update_many(batch)
            except presence.REDIS_ERRORS as exc:
                logger.warning("presence heartbeat failed: %r", exc)
                changes = {}
            for user_id, change in changes.items():
                if change == 1:  # e.g. after Redis lost its keys, or a stalled loop
                    self.spawn(self.announce(user_id, "online"))
            self._prune()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(conf.PRESENCE_SWEEP_SECONDS * random.uniform(0.8, 1.2))
            await self.sweep_once()

    async def sweep_once(self) -> list[int]:
        try:
            offline = await presence.sweep()
        except presence.REDIS_ERRORS as exc:
            logger.warning("presence sweep failed: %r", exc)
            return []
        if offline:
            logger.info("%d users offline: their sockets' node stopped heartbeating", len(offline))
        for user_id in offline:
            await self.announce(user_id, "offline")
        return offline

    def socket_online(self, consumer: ChatConsumer) -> None:
        """Record an opened socket's presence, together with the others that open within
        PRESENCE_BATCH_SECONDS: one Redis call for them all, and their users' "online"
        announced with one event per conversation (a room whose members connect at
        once, after a deploy, gets one write per member socket, not one per pair).
        Synchronous: it only joins the batch (no task per socket)."""
        if consumer.presence_field is None:
            return
        batch = self._arriving
        if batch is None:
            batch = self._arriving = []
            self.spawn(self._record_arrivals(batch), name="parley-presence-arrivals")
        batch.append(consumer)

    async def _record_arrivals(self, batch: list[ChatConsumer]) -> None:
        await asyncio.sleep(conf.PRESENCE_BATCH_SECONDS)
        if self._arriving is batch:
            self._arriving = None
        expiry = presence.expiry()
        changes: dict[int, list[tuple[str, str]]] = {}
        conversations: dict[int, set[int]] = {}
        for consumer in batch:
            field = consumer.presence_field
            if field is None:
                continue  # closed meanwhile (socket_offline cleared it)
            changes.setdefault(consumer.user_id, []).append((field, expiry))
            conversations.setdefault(consumer.user_id, set()).update(consumer.conversations)
        try:
            result = await presence.update_many(changes)
        except presence.REDIS_ERRORS as exc:
            logger.warning("presence of %d sockets not recorded: %r", len(batch), exc)
            return
        online = [user_id for user_id, change in result.items() if change == 1]
        if online:
            await self.announce_many(online, "online", conversations)

    async def socket_offline(self, consumer: ChatConsumer, *, reconnecting: bool) -> None:
        field, consumer.presence_field = consumer.presence_field, None
        if field is None:
            return
        value = presence.expiry(conf.PRESENCE_RECONNECT_GRACE_SECONDS) if reconnecting else "-"
        changes = [(field, value)]
        # The user's sockets opened here whose presence is not recorded yet (a new tab
        # while the old one closes) are recorded now: they keep the user online.
        if self._arriving:
            expiry = presence.expiry()
            changes += [
                (other.presence_field, expiry)
                for other in self._arriving
                if other.user_id == consumer.user_id and other.presence_field is not None
            ]
        try:
            change = await presence.update(consumer.user_id, changes)
        except presence.REDIS_ERRORS as exc:
            logger.warning("presence not cleared: %r", exc)
            return
        if change:
            await self.announce(
                consumer.user_id,
                "offline" if change == -1 else "online",
                conversation_ids=list(consumer.conversations),
            )

    async def announce(
        self, user_id: int, status: str, *, conversation_ids: list[int] | None = None
    ) -> None:
        """Tell the members of the user's conversations (those small enough) its status."""
        if conversation_ids is None:
            try:
                rows = await pg.conversation_ids_for_user(self.loop_db, user_id)
            except Exception as exc:
                logger.warning("presence %s of user %s not published: %r", status, user_id, exc)
                return
            conversation_ids = [cid for cid, _ in rows]
        await self.announce_many([user_id], status, {user_id: conversation_ids})

    async def announce_many(
        self, user_ids: list[int], status: str, conversations: dict[int, Iterable[int]]
    ) -> None:
        """`announce` for several users: one event per conversation, naming all of them."""
        metrics.presence_changes.labels(status).inc(len(user_ids))
        by_conversation: dict[int, list[int]] = {}
        for user_id in user_ids:
            for cid in conversations.get(user_id, ()):
                by_conversation.setdefault(cid, []).append(user_id)
        try:
            counts = await self.member_counts(list(by_conversation))
            for cid, users in by_conversation.items():
                if counts.get(cid, 0) <= conf.PRESENCE_MAX_MEMBERS:
                    await self.layer.group_send(
                        events.conversation_group(cid),
                        frames.presence_event(conversation_id=cid, user_ids=users, status=status),
                    )
        except Exception as exc:
            logger.warning("presence %s of %d users not published: %r", status, len(user_ids), exc)

    async def member_counts(self, conversation_ids: list[int]) -> dict[int, int]:
        now = time.monotonic()
        result, missing = {}, []
        for cid in conversation_ids:
            cached = self._member_counts.get(cid)
            if cached is not None and cached[0] > now:
                result[cid] = cached[1]
            else:
                missing.append(cid)
        if not missing:
            return result
        # One read per conversation however many sockets of it connect at once (a
        # reconnect storm of a big room would otherwise read it once per socket).
        to_fetch = [cid for cid in missing if cid not in self._count_fetches]
        if to_fetch:
            task = self.loop.create_task(
                db(selectors.conversation_member_counts)(conversation_ids=to_fetch)
            )
            for cid in to_fetch:
                self._count_fetches[cid] = task
            task.add_done_callback(lambda t, ids=to_fetch: self._count_fetched(t, ids))
        tasks = {cid: self._count_fetches[cid] for cid in missing}
        for cid, task in tasks.items():
            count = (await asyncio.shield(task)).get(cid, 0)
            self._member_counts[cid] = (now + MEMBER_COUNT_TTL, count)
            result[cid] = count
        return result

    def _count_fetched(self, task: asyncio.Task, conversation_ids: list[int]) -> None:
        for cid in conversation_ids:
            if self._count_fetches.get(cid) is task:
                del self._count_fetches[cid]
        if not task.cancelled():
            task.exception()  # retrieved here; the awaiting callers re-raise it

    # --- typing ----------------------------------------------------------------------------

    def typing_allowed(self, user_id: int, conversation_id: int) -> bool:
        now = time.monotonic()
        key = (user_id, conversation_id)
        last = self._typing.get(key)
        if last is not None and now - last < conf.TYPING_THROTTLE_SECONDS:
            return False
        self._typing[key] = now
        return True

    # --- shared reads ----------------------------------------------------------------------

    async def message_frames_between(
        self, conversation_id: int, after: int, before: int
    ) -> list[tuple[int, int, str]]:
        """Messages after < seq < before, read once for all the sockets that miss them."""
        now = time.monotonic()
        key = (conversation_id, after, before)
        cached = self._fetches.get(key)
        if cached is None or cached[0] < now:
            future = self.loop.create_task(
                db(selectors.message_frames_between)(
                    conversation_id=conversation_id,
                    after=after,
                    before=before,
                    limit=conf.RESUME_MAX,
                )
            )
            cached = self._fetches[key] = (now + FETCH_TTL, future)
        return await asyncio.shield(cached[1])

    def _prune(self) -> None:
        now = time.monotonic()
        self._typing = {
            k: t for k, t in self._typing.items() if now - t < conf.TYPING_THROTTLE_SECONDS
        }
        self._fetches = {k: v for k, v in self._fetches.items() if v[0] >= now}
        self._member_counts = {k: v for k, v in self._member_counts.items() if v[0] >= now}
        tokens.cache.prune()


async def bounded(awaitable, what: str, timeout: float) -> None:
    """Await `awaitable` for at most `timeout` seconds, then go on without it (logged).

    Not asyncio.wait_for: on timeout it waits for the cancellation to finish, and a
    coroutine in asyncio.to_thread or database_sync_to_async finishes only when its
    thread does (a Redis or Postgres call on a host that stopped answering)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        logger.warning("%s: still not done after %.1f s, going on without it", what, timeout)
    elif not task.cancelled() and task.exception() is not None:
        logger.warning("%s failed: %r", what, task.exception())


async def flush_deliveries() -> None:
    flush = getattr(receipts, "flush_deliveries", None)
    if flush is not None:
        try:
            await flush()
        except Exception as exc:
            logger.warning("delivery receipts not flushed: %r", exc)


_nodes: dict[int, Node] = {}


def get_node() -> Node:
    """This event loop's Node (tests run one loop per test; a server runs one)."""
    loop = asyncio.get_running_loop()
    node = _nodes.get(id(loop))
    if node is None or node.loop is not loop:
        for key, other in list(_nodes.items()):
            if other.loop.is_closed():
                del _nodes[key]
                if other.loop_db is not None:  # a test's loop, closed without node.stop()
                    other.loop_db.abandon()
        node = _nodes[id(loop)] = Node(loop)
    return node


def current_node() -> Node | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    node = _nodes.get(id(loop))
    return node if node is not None and node.loop is loop else None
