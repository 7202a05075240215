"""The chat WebSocket: one socket carries all of a user's conversations.

The consumer authenticates (scope prepared by parley.realtime.auth), manages groups,
validates frames and relays events; writes and reads go through parley.chat services
and selectors on the database threads (parley.realtime.db).

Ordering: channels dispatches one event at a time per socket, so a socket sees its
events in the order its node received them. That is not always seq order (two
processes commit seq 5 and 6 and publish 6 first), so each socket keeps, per
conversation, the last seq it wrote: the next one goes out at once, a later one waits
(up to REALTIME_GAP_WAIT_SECONDS) for the missing ones, which are then read from
Postgres, and an older one (a duplicate) is dropped. A client therefore sees every
conversation's messages in seq order with no gap, as long as the live path holds; when
it does not (the node resyncs, see node.py) the socket is closed and the client resumes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType

import orjson
from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.db import Error as DatabaseError

from parley.chat import events, receipts, selectors, services
from parley.chat.errors import BadRequest, DomainError, NotFound, Unavailable
from parley.chat.ratelimit import message_rate_check_async
from parley.realtime import conf, frames, metrics, pg
from parley.realtime.db import db
from parley.realtime.node import get_node

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
CLOSE_SERVICE_RESTART = 1012  # drain: reconnect (to another replica)
CLOSE_RESYNC = 1011  # the node may have missed events: reconnect and resume
CLOSE_TOO_SLOW = 1013  # Try Again Later: the client fell too far behind; resume
SEND_WORKER = "parley-send-worker"
MINE_KEPT = 64


class ConversationState:
    """What one socket knows about one conversation."""

    __slots__ = ("mine", "pending", "read", "sent", "timer")

    def __init__(self, sent: int) -> None:
        self.sent = sent  # highest seq written to the socket (or known to the client)
        # Events that arrived ahead of a missing seq (made on the first one).
        self.pending: dict[int, dict] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.read = 0  # highest read seq recorded from this socket
        # The seqs of the user's latest messages seen on this socket (ascending, at most
        # MINE_KEPT): in a big conversation, receipts are written only when they cover one.
        self.mine: list[int] | None = None

    def note_mine(self, seq: int) -> None:
        mine = self.mine
        if mine is None:
            self.mine = [seq]
            return
        if mine[-1] < seq:
            mine.append(seq)
        elif seq not in mine:
            bisect.insort(mine, seq)
        if len(mine) > MINE_KEPT:
            del mine[0]

    def covers_mine(self, low: int, high: int) -> bool:
        """Whether one of the user's seqs lies in (low, high]."""
        mine = self.mine
        if not mine or high <= low:
            return False
        i = bisect.bisect_right(mine, low)
        return i < len(mine) and mine[i] <= high


def _id_field(frame: dict, name: str) -> int:
    value = frame.get(name)
    if type(value) is not int or value <= 0:
        raise BadRequest(f"{name} must be a positive integer.")
    return value


def _seq_field(frame: dict, name: str) -> int:
    value = frame.get(name)
    if type(value) is not int or value < 0:
        raise BadRequest(f"{name} must be a non-negative integer.")
    return value


def _published_at(event: dict) -> float | None:
    """The commit time that chat.events stamps on every published event."""
    ts = event.get("ts")
    return float(ts) if isinstance(ts, (int, float)) else None


class _Wakeup:
    """The one future a dispatch loop sleeps on, resolved when any task it started is
    done: instead of an asyncio.wait per event (its set, waiter future, callback closure
    and two coroutine frames, held for as long as the socket is idle)."""

    __slots__ = ("future", "loop")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future | None = None

    def __call__(self, _task) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)

    def start(self, coro) -> asyncio.Task:
        task = self.loop.create_task(coro)
        task.add_done_callback(self)
        return task

    def arm(self) -> asyncio.Future:
        self.future = self.loop.create_future()
        return self.future

    def disarm(self) -> None:
        self.future = None


async def _cancelled(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def dispatch_many(sources, dispatch) -> None:
    """channels.utils.await_many_dispatch, holding less while it waits (_Wakeup).

    Same contract: one task per source (a coroutine function), each result dispatched
    (awaited) before that source is read again, sources in order when several are ready,
    the tasks cancelled on the way out.
    """
    wakeup = _Wakeup()
    tasks = [wakeup.start(source()) for source in sources]
    try:
        while True:
            if not any(task.done() for task in tasks):
                try:
                    await wakeup.arm()
                finally:
                    wakeup.disarm()
            for i, task in enumerate(tasks):
                if task.done():
                    result = task.result()
                    await dispatch(result)
                    tasks[i] = wakeup.start(sources[i]())
    finally:
        for task in tasks:
            await _cancelled(task)


async def dispatch_with_inbox(receive, inbox, decode, dispatch) -> None:
    """dispatch_many for a client and a channel whose queue is a lean.Inbox: the same
    order (the client's event first when both are ready) and one event at a time, but
    the channel is read without a task (and its coroutines) per socket, ~1 KB."""
    wakeup = _Wakeup()
    client, fresh = wakeup.start(receive()), True
    try:
        while True:
            if client.done():
                result = client.result()
                await dispatch(result)
                client, fresh = wakeup.start(receive()), True
            elif not inbox.empty():
                if fresh:  # let a new client task see what is ready first, as in channels
                    fresh = False
                    await asyncio.sleep(0)
                    continue
                await dispatch(decode(inbox.get_nowait()))
                if not inbox.empty():
                    await asyncio.sleep(0)  # let the other sockets in, as a task would
            else:
                fresh = False
                waiter = wakeup.arm()
                inbox.wake_on_put(waiter)
                try:
                    await waiter
                finally:
                    wakeup.disarm()
                    inbox.forget(waiter)
    finally:
        await _cancelled(client)


_NO_CONVERSATIONS: Mapping[int, ConversationState] = MappingProxyType({})


class ChatConsumer(AsyncWebsocketConsumer):
    # A realtime process holds thousands of idle sockets (docs/benchmarks.md): the
    # per-socket state is in slots (an instance dict of this many keys cost about 1 KB)
    # and what a socket may never need is made on first use.
    __slots__ = (
        "_order",
        "base_send",
        "channel_layer",
        "channel_name",
        "close_code",
        "closing",
        "connected_at",
        "conversations",
        "node",
        "presence_field",
        "presence_seen",
        "scope",
        "send_worker",
        "sends",
        "tokens",
        "tokens_at",
        "user",
        "user_id",
        "wire",
    )
    groups = ()  # AsyncWebsocketConsumer would give each instance a list of its own

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = None
        self.user_id = 0
        self.closing = False
        self.presence_field: str | None = None
        self.connected_at = 0.0
        # A refused socket's (read-only); an accepted one gets its own dict.
        self.conversations: Mapping[int, ConversationState] = _NO_CONVERSATIONS
        # A socket's sends are committed one after the other, in the order they came:
        # two quick messages from one client keep their order in the conversation.
        self.sends: asyncio.Queue | None = None
        self.send_worker: asyncio.Task | None = None
        self.tokens, self.tokens_at = float(conf.FRAME_BURST), 0.0  # the budget starts full
        self.presence_seen: dict[int, str] | None = None
        self.close_code: int | None = None
        self._order: asyncio.Lock | None = None
        # The server takes ready-made frames (parley.realtime.frames.WIRE_EXTENSION):
        # `parley realtime` does; a test communicator or another server does not.
        self.wire = False

    async def __call__(self, scope, receive, send) -> None:
        # channels' AsyncConsumer.__call__, with dispatch_with_inbox (the pub/sub layer of
        # parley.realtime.layers) or dispatch_many (any other) for await_many_dispatch.
        self.scope = scope
        self.wire = frames.WIRE_EXTENSION in (scope.get("extensions") or ())
        self.channel_layer = layer = get_channel_layer(self.channel_layer_alias)
        self.base_send = send
        if layer is None:
            with contextlib.suppress(StopConsumer):
                await dispatch_many([receive], self.dispatch)
            return
        self.channel_name = await layer.new_channel()
        inbox = getattr(layer, "inbox", None)
        inbox = inbox(self.channel_name) if inbox is not None else None
        if inbox is None:  # another layer (core, in-memory): a task reads the channel
            with contextlib.suppress(StopConsumer):
                await dispatch_many(
                    [receive, functools.partial(layer.receive, self.channel_name)],
                    self.dispatch,
                )
            return
        try:
            with contextlib.suppress(StopConsumer):
                await dispatch_with_inbox(receive, inbox, layer.deserialize, self.dispatch)
        finally:
            await layer.release(self.channel_name)

    @property
    def order(self) -> asyncio.Lock:
        """Held while writing a conversation's messages (made on first use)."""
        lock = self._order
        if lock is None:
            lock = self._order = asyncio.Lock()
        return lock

    async def dispatch(self, message) -> None:
        # Channels' AsyncConsumer.dispatch first awaits aclose_old_connections(), a hop
        # through the process' single thread-sensitive thread, for every event of every
        # socket: fan-out to N local sockets became N trips through one thread
        # (docs/benchmarks.md). This consumer reaches the ORM only through
        # parley.realtime.db, whose threads close stale connections themselves.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # --- connect and disconnect ----------------------------------------------------------

    async def websocket_connect(self, message) -> None:
        self.node = get_node()
        await self.node.start()

        reject = self.scope.get("parley_reject")
        user = self.scope.get("user")
        if reject is None and (user is None or not user.is_authenticated):
            reject = CLOSE_UNAUTHENTICATED
        if reject is None and self.node.draining:
            reject = CLOSE_SERVICE_RESTART
        if reject is not None:
            # Accept, then close: a browser only sees a close code after a handshake.
            outcome = {4401: "unauthenticated", 4403: "forbidden_origin"}.get(reject, "draining")
            metrics.handshakes.labels(outcome).inc()
            await self.accept()
            await self.close(code=reject)
            return

        self.user, self.user_id = user, user.id
        self.conversations = {}
        try:
            await self._join_groups()
        except Exception:
            logger.exception("socket setup failed for user %s", self.user_id)
            await self._leave_groups()
            self.user = None
            metrics.handshakes.labels("failed").inc()
            await self.accept()
            await self.close(code=CLOSE_RESYNC)
            return
        await self.accept()
        self.connected_at = time.monotonic()
        self.presence_field = self.node.presence_field()
        self.node.register(self)
        metrics.HANDSHAKES_ACCEPTED.inc()
        await self._write(
            frames.hello(
                user=self.user,
                node=self.node.id,
                conversations=[(cid, st.sent) for cid, st in self.conversations.items()],
            ),
            "hello",
        )
        self.node.socket_online(self)

    async def _join_groups(self) -> None:
        """Subscribe, then read: every message committed after the read that `hello`
        reports is published after the subscription, so the socket receives it."""
        layer = self.channel_layer
        await layer.group_add(events.user_group(self.user_id), self.channel_name)
        self.node.hook_layer()
        before = await pg.conversation_ids_for_user(self.node.loop_db, self.user_id)
        for cid, _ in before:
            await layer.group_add(events.conversation_group(cid), self.channel_name)
        rows = await pg.conversation_ids_for_user(self.node.loop_db, self.user_id)
        known = {cid for cid, _ in before}
        for cid, _ in rows:
            if cid not in known:
                await layer.group_add(events.conversation_group(cid), self.channel_name)
        self.conversations = {cid: ConversationState(last_seq) for cid, last_seq in rows}
        for cid in known - self.conversations.keys():
            await layer.group_discard(events.conversation_group(cid), self.channel_name)

    async def _leave_groups(self) -> None:
        layer = self.channel_layer
        for cid in list(self.conversations):
            try:
                await layer.group_discard(events.conversation_group(cid), self.channel_name)
            except Exception:  # noqa: S112 - leaving; the layer forgets anyway
                continue
        with contextlib.suppress(Exception):
            await layer.group_discard(events.user_group(self.user_id), self.channel_name)

    async def websocket_disconnect(self, message) -> None:
        if self.user is not None:
            self.node.unregister(self)
            if self.send_worker is not None:
                # What was taken in is committed (its ack cannot be written any more; the
                # client retries with the same client_id and gets the same message).
                self.node.spawn(self._finish_sends())
            for st in self.conversations.values():
                if st.timer is not None:
                    st.timer.cancel()
            # A socket the server closed for drain or resync reconnects at once: keep its
            # presence for a grace period instead of flapping offline/online.
            reconnecting = self.close_code in (CLOSE_SERVICE_RESTART, CLOSE_RESYNC, CLOSE_TOO_SLOW)
            await self.node.socket_offline(self, reconnecting=reconnecting)
            await self._leave_groups()
        raise StopConsumer

    async def _finish_sends(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sends.join(), timeout=30)
        self.send_worker.cancel()

    def server_close(self, code: int) -> asyncio.Task | None:
        """Close from the server side (drain, resync); returns the closing task."""
        if self.closing or self.user is None:
            return None
        self.closing = True
        return self.node.spawn(self._server_close(code))

    def shed(self) -> None:
        """Stop queueing events for this socket (it does not keep up) and close it."""
        if self.closing or self.user is None:
            return
        for cid in list(self.conversations):
            self.node.spawn(
                self.channel_layer.group_discard(events.conversation_group(cid), self.channel_name)
            )
        self.node.spawn(
            self.channel_layer.group_discard(events.user_group(self.user_id), self.channel_name)
        )
        self.server_close(CLOSE_TOO_SLOW)

    async def _server_close(self, code: int) -> None:
        if self.sends is not None and not self.sends.empty():
            # Let the sends already taken in get committed and acked first.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sends.join(), timeout=2)
        self.close_code = code
        metrics.closes.labels(str(code)).inc()
        with contextlib.suppress(Exception):  # already gone
            await self.close(code=code)

    # --- frames from the client ----------------------------------------------------------

    async def websocket_receive(self, message) -> None:
        if self.user is None:
            return
        text = message.get("text")
        if text is None:
            metrics.frames_in.labels("invalid").inc()
            await self._error("bad_request", "Frames must be JSON text.")
            return
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            metrics.frames_in.labels("invalid").inc()
            await self._error("bad_request", "Malformed JSON.")
            return
        if type(frame) is not dict:
            metrics.frames_in.labels("invalid").inc()
            await self._error("bad_request", "A frame must be a JSON object.")
            return
        ftype = frame.get("type")
        handler = HANDLERS.get(ftype) if type(ftype) is str else None
        client_id = frame.get("client_id")
        if handler is None:
            metrics.frames_in.labels("unknown").inc()
            await self._error("bad_request", "Unknown or missing frame type.", client_id)
            return
        metrics.frames_in_of(ftype).inc()
        if ftype != "send" and not self._take_token():
            await self._error("rate_limited", "Too many frames; slow down.", client_id)
            return
        try:
            await handler(self, frame)
        except DomainError as exc:
            await self._error(exc.code, exc.detail, client_id)

    def _take_token(self) -> bool:
        now = time.monotonic()
        tokens = min(conf.FRAME_BURST, self.tokens + (now - self.tokens_at) * conf.FRAME_RATE)
        self.tokens_at = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True

    async def on_send(self, frame: dict) -> None:
        started = time.monotonic()
        conversation_id = _id_field(frame, "conversation")
        client_id = frame.get("client_id")
        if type(client_id) is not str:
            raise BadRequest("client_id must be a string.")
        body, client_id = services.message_validate(body=frame.get("body"), client_id=client_id)
        if self.sends is None:
            self.sends = asyncio.Queue(maxsize=conf.MAX_QUEUED_SENDS)
            self.send_worker = self.node.spawn(self._send_worker(), name=SEND_WORKER)
        # A full queue stops reading this socket until a send completes (back-pressure).
        await self.sends.put((conversation_id, body, client_id, started))

    async def _send_worker(self) -> None:
        while True:
            conversation_id, body, client_id, started = await self.sends.get()
            try:
                await self._send(conversation_id, body, client_id, started)
            finally:
                self.sends.task_done()

    async def _send(self, conversation_id: int, body: str, client_id: str, started: float):
        try:
            await message_rate_check_async(user_id=self.user_id)
            message, _ = await pg.message_create(
                self.node.loop_db,
                sender=self.user,
                conversation_id=conversation_id,
                body=body,
                client_id=client_id,
            )
        except DomainError as exc:
            await self._error(exc.code, exc.detail, client_id)
            return
        except (DatabaseError, *pg.ERRORS) as exc:
            logger.warning("send failed: %r", exc)
            await self._error("unavailable", Unavailable.__doc__, client_id)
            return
        except Exception:
            logger.exception("send failed")
            await self._error("unavailable", Unavailable.__doc__, client_id)
            return
        st = self.conversations.get(conversation_id)
        if st is not None:
            st.note_mine(message.seq)
        await self._write(
            frames.ack(
                client_id=client_id,
                conversation_id=conversation_id,
                seq=message.seq,
                message_id=message.id,
            ),
            "ack",
        )
        metrics.send_ack_seconds.observe(time.monotonic() - started)

    async def on_resume(self, frame: dict) -> None:
        conversation_id = _id_field(frame, "conversation")
        after = _seq_field(frame, "after")
        if conversation_id not in self.conversations:
            raise NotFound("No such conversation, or you are not a member.")
        try:
            rows, last_seq, more = await db(selectors.resume_frames)(
                user=self.user,
                conversation_id=conversation_id,
                after=after,
                limit=conf.RESUME_MAX,
            )
        except DatabaseError as exc:
            logger.warning("resume failed: %r", exc)
            raise Unavailable() from None
        async with self.order:
            st = self.conversations.get(conversation_id)
            if st is None:
                raise NotFound("No such conversation, or you are not a member.")
            for _, text in rows:
                await self._write(text, "message")
            top = rows[-1][0] if rows else 0  # never trust `after` to move the stream
            # With more to page over HTTP, the live stream continues after last_seq.
            st.sent = max(st.sent, last_seq if more else top)
            await self._write(
                frames.resumed(conversation_id=conversation_id, last_seq=last_seq, more=more),
                "resumed",
            )
            await self._flush_pending(conversation_id, st)

    async def on_read(self, frame: dict) -> None:
        conversation_id = _id_field(frame, "conversation")
        seq = _seq_field(frame, "seq")
        st = self.conversations.get(conversation_id)
        if st is None:
            raise NotFound("No such conversation, or you are not a member.")
        seq = min(seq, st.sent)  # nobody reads what does not exist yet
        if seq <= st.read:
            return
        st.read = seq
        self.node.spawn(self._record_read(conversation_id, seq))

    async def _record_read(self, conversation_id: int, seq: int) -> None:
        try:
            await receipts.record_read(
                conversation_id=conversation_id, user_id=self.user_id, seq=seq
            )
        except Exception as exc:
            logger.warning("read receipt not recorded: %r", exc)
            st = self.conversations.get(conversation_id)
            if st is not None and st.read == seq:
                st.read = 0  # let the client's retry through
            await self._error("unavailable", "The read was not recorded; send it again.")

    async def on_typing(self, frame: dict) -> None:
        conversation_id = _id_field(frame, "conversation")
        if conversation_id not in self.conversations:
            raise NotFound("No such conversation, or you are not a member.")
        if not self.node.typing_allowed(self.user_id, conversation_id):
            return
        try:
            await self.channel_layer.group_send(
                events.conversation_group(conversation_id),
                frames.typing_event(conversation_id=conversation_id, user=self.user),
            )
        except Exception as exc:
            logger.debug("typing not published: %r", exc)

    async def on_ping(self, frame: dict) -> None:
        await self._write(frames.PONG, "pong")

    # --- events from the channel layer ---------------------------------------------------

    async def chat_frame(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "message":
            await self._relay_message(event)
            return
        conversation_id = event.get("conversation")
        if conversation_id is not None and conversation_id not in self.conversations:
            return  # left meanwhile
        if kind == "typing" and event.get("sender") == self.user_id:
            return
        await self._write_event(event, kind or "event")

    async def chat_presence(self, event: dict) -> None:
        """Users of a conversation whose presence changed together (frames.presence_event):
        their `presence` frames in one write. A user sharing several conversations with
        this socket's user is announced in each: written once per change."""
        if event["conversation"] not in self.conversations:
            return
        status, users = event["status"], event["users"]
        seen = self.presence_seen
        if seen is None:
            seen = self.presence_seen = {}
        fresh = [i for i, user_id in enumerate(users) if seen.get(user_id) != status]
        if not fresh:
            return
        for i in fresh:
            seen[users[i]] = status
        if not self.wire:
            for i in fresh:
                if not await self._write(event["frames"][i], "presence"):
                    return
            return
        # Framed once per node (the event object is shared by its sockets).
        wires = event.get("_wires")
        if wires is None:
            wires = event["_wires"] = [frames.wire_text(text) for text in event["frames"]]
        if len(fresh) == len(users):
            data = event.get("_wire_all")
            if data is None:
                data = event["_wire_all"] = b"".join(wires)
        else:
            data = b"".join(wires[i] for i in fresh)
        await self._emit({"type": frames.WIRE_SEND, "bytes": data}, "presence", len(fresh))

    async def chat_receipts(self, event: dict) -> None:
        """One flush's receipts of a conversation (chat.events.receipts_event).

        In a small conversation every member sees every member's `receipt` frame. In a
        big one (above PARLEY_RECEIPT_BROADCAST_MAX_MEMBERS) a socket writes a member's
        frame only when it covers a message its user sent (seen on this socket), or when
        it is its own user's read moving (other devices): one read of everyone in a
        1,000-member room would otherwise be a million frames.
        """
        st = self.conversations.get(event.get("conversation"))
        if st is None:
            return
        rows = event["rows"]
        if event.get("everyone", True):
            if self.wire:
                # Every row's frame, framed once per node, in one write per socket.
                wire = event.get("_wire_rows")
                if wire is None:
                    wire = event["_wire_rows"] = b"".join(frames.wire_text(row[5]) for row in rows)
                await self._emit({"type": frames.WIRE_SEND, "bytes": wire}, "receipt", len(rows))
                return
            for row in rows:
                if not await self._write(row[5], "receipt"):
                    return
            return
        # A node hands the same event object to all its local sockets of the
        # conversation: index it once, then most sockets are done in O(1).
        index = event.get("_index")
        if index is None:
            index = event["_index"] = (
                {row[0]: row for row in rows},
                min(min(row[1], row[3]) for row in rows),
            )
        by_user, lowest = index
        me = self.user_id
        own = by_user.get(me)
        if own is not None and own[4] > own[3] and not await self._write(own[5], "receipt"):
            return
        if not st.mine or st.mine[-1] <= lowest:
            return  # no message of this socket's user is covered by any row
        for user, old_delivered, delivered, old_read, read, text in rows:
            if (
                user != me
                and (st.covers_mine(old_delivered, delivered) or st.covers_mine(old_read, read))
                and not await self._write(text, "receipt")
            ):
                return

    async def chat_membership(self, event: dict) -> None:
        conversation_id, change = event["conversation"], event["event"]
        group = events.conversation_group(conversation_id)
        if change == "joined":
            if conversation_id not in self.conversations:
                await self.channel_layer.group_add(group, self.channel_name)
                try:
                    membership = await db(selectors.membership_get)(
                        user=self.user, conversation_id=conversation_id
                    )
                except NotFound:  # left again already
                    await self.channel_layer.group_discard(group, self.channel_name)
                    return
                self.conversations[conversation_id] = ConversationState(
                    membership.conversation.last_seq
                )
        elif change == "left":
            st = self.conversations.pop(conversation_id, None)
            if st is not None:
                if st.timer is not None:
                    st.timer.cancel()
                await self.channel_layer.group_discard(group, self.channel_name)
        await self._write(event["frame"], "membership")

    async def _relay_message(self, event: dict) -> None:
        conversation_id = event["conversation"]
        st = self.conversations.get(conversation_id)
        if st is None:
            return
        seq = event["seq"]
        if seq <= st.sent:
            return  # a duplicate, or already replayed by resume
        async with self.order:
            if seq <= st.sent or self.conversations.get(conversation_id) is not st:
                return
            if seq == st.sent + 1 and not st.pending:
                st.sent = seq
                await self._deliver(conversation_id, event)
                return
            if st.pending is None:
                st.pending = {}
            st.pending[seq] = event
            await self._flush_pending(conversation_id, st)

    async def _flush_pending(self, conversation_id: int, st: ConversationState) -> None:
        """Write the held events that are now next in line; arm the gap timer if a gap
        remains. Called with self.order held."""
        pending = st.pending
        if not pending:
            return
        while st.sent + 1 in pending:
            st.sent += 1
            await self._deliver(conversation_id, pending.pop(st.sent))
        for seq in [s for s in pending if s <= st.sent]:
            del pending[seq]
        if not pending:
            if st.timer is not None:
                st.timer.cancel()
                st.timer = None
        elif st.timer is None:
            st.timer = asyncio.get_running_loop().call_later(
                conf.GAP_WAIT_SECONDS, self._gap_timeout, conversation_id, st
            )

    def _gap_timeout(self, conversation_id: int, st: ConversationState) -> None:
        st.timer = None
        if self.conversations.get(conversation_id) is st and st.pending:
            self.node.spawn(self._fill_gap(conversation_id, st))

    async def _fill_gap(self, conversation_id: int, st: ConversationState) -> None:
        """Read the messages a socket is missing from Postgres (once per node).

        When a seq is committed, every lower seq is too (the seq is allocated under the
        conversation row's lock, held until commit), so Postgres has what is missing.
        """
        if not st.pending:
            return  # filled by the live path meanwhile
        after, before = st.sent, min(st.pending)
        try:
            rows = await self.node.message_frames_between(conversation_id, after, before)
        except Exception as exc:
            logger.warning("gap fill failed: %r", exc)
            rows = []
        async with self.order:
            if self.conversations.get(conversation_id) is not st or not st.pending:
                return
            progressed = False
            for seq, sender, text in rows:
                if seq == st.sent + 1:
                    st.sent = seq
                    metrics.gap_fills.inc()
                    await self._deliver(
                        conversation_id, {"seq": seq, "sender": sender, "frame": text}
                    )
                    progressed = True
            if not progressed and st.sent == after and st.sent + 1 not in st.pending:
                # Postgres has nothing to fill this gap with (or did not answer): write
                # what we hold so that the client sees the gap and resumes. (Only for
                # the gap this read was for: if the stream moved meanwhile, the gap now
                # open is a new one, with its own wait.)
                for seq in sorted(st.pending):
                    st.sent = seq
                    await self._deliver(conversation_id, st.pending.pop(seq))
            await self._flush_pending(conversation_id, st)

    async def _deliver(self, conversation_id: int, event: dict) -> None:
        if not await self._write_event(event):
            return
        metrics.FRAMES_OUT_MESSAGE.inc()
        published = _published_at(event)
        if published is not None:
            metrics.delivery_seconds.observe(max(time.time() - published, 0.0))
        if event.get("sender") == self.user_id:
            st = self.conversations.get(conversation_id)
            if st is not None:
                st.note_mine(event["seq"])
        else:
            try:
                await receipts.record_delivery(
                    conversation_id=conversation_id, user_id=self.user_id, seq=event["seq"]
                )
            except Exception as exc:
                logger.warning("delivery receipt not recorded: %r", exc)

    # --- writing ---------------------------------------------------------------------------

    async def _write(self, text: str, kind: str | None = None) -> bool:
        return await self._emit({"type": "websocket.send", "text": text}, kind)

    async def _write_event(self, event: dict, kind: str | None = None) -> bool:
        """Write `event["frame"]`. The node hands the same event to all its sockets of a
        group: with a server that takes ready-made frames it is framed once, here."""
        if not self.wire:
            return await self._write(event["frame"], kind)
        wire = event.get("_wire")
        if wire is None:
            wire = event["_wire"] = frames.wire_text(event["frame"])
        return await self._emit({"type": frames.WIRE_SEND, "bytes": wire}, kind)

    async def _emit(self, message: dict, kind: str | None = None, count: int = 1) -> bool:
        """Send one ASGI message (`count` frames of type `kind`); False if the socket is
        gone."""
        try:
            await self.base_send(message)
        except Exception:
            return False
        if kind is not None:
            metrics.frames_out_of(kind).inc(count)
        return True

    async def _error(self, code: str, detail: str, client_id=None) -> None:
        metrics.errors.labels(code if code in frames.ERROR_CODES else "bad_request").inc()
        await self._write(frames.error(code, detail, client_id), "error")


HANDLERS = {
    "send": ChatConsumer.on_send,
    "resume": ChatConsumer.on_resume,
    "read": ChatConsumer.on_read,
    "typing": ChatConsumer.on_typing,
    "ping": ChatConsumer.on_ping,
}
