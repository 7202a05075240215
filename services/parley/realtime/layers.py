"""The channel layer the realtime service runs on.

channels_redis' pub/sub layer receives a group message once per node and hands the same
bytes to every local channel in the group, but each channel's `receive` decodes it again:
a message to a 500-socket group is decoded 500 times, and a receipts event of a
1,000-member room (about 100 KB) cost the node half a second of CPU per flush
(docs/benchmarks.md). This layer decodes each received payload once and gives every
local receiver the same object. Receivers must treat events as read-only (the consumer
only adds private `_` keys that are derived from the event and are the same for all).

It also publishes synchronously (`group_send_sync`) for the events that web, worker and
the realtime service's database threads publish on commit.

And it takes the per-connection lock out of the hot paths. channels_redis guards each
Redis shard with one asyncio.Lock held across every PUBLISH round trip and every
(un)subscribe, even of a channel already subscribed: each handshake's own-channel
subscribe, user-group and conversation-group joins, and each presence publish queued
behind all the others. Measured while 2,000 sockets connected: 270 ms p50 from
authentication to `websocket_connect` and 220 sockets/s (docs/benchmarks.md). Here a
PUBLISH goes straight to the connection pool (which serves concurrent commands), and
joining a group whose channel is already subscribed takes no lock; a real SUBSCRIBE or
UNSUBSCRIBE still takes it (the pub/sub connection's state is shared).

And it holds less per socket: each channel's queue is a parley.realtime.lean.Inbox
(nothing allocated while empty) instead of an asyncio.Queue (3.3 KB each, measured),
`receive` hands back the loop layer's coroutine instead of wrapping it in another one, and
`inbox`/`release` let a consumer wait on its channel without a task (ChatConsumer).
"""

from __future__ import annotations

import asyncio
import logging
import threading

import redis
import redis.asyncio as aioredis
from channels_redis.pubsub import (
    RedisPubSubChannelLayer,
    RedisPubSubLoopLayer,
    RedisSingleShardConnection,
)
from channels_redis.utils import _consistent_hash, _wrap_close, create_pool, decode_hosts
from redis.sentinel import Sentinel

from parley.realtime.lean import Inbox

logger = logging.getLogger(__name__)

_RECENT = 32  # payloads remembered; each is held only until 32 newer ones arrived


# Concurrent commands per node and Redis shard; more wait (up to 5 s) for a connection.
# redis-py 8's asyncio pool allows 100 and then raises MaxConnectionsError: when 2,000
# sockets closed at once, their presence "offline" publishes failed and were lost.
LAYER_MAX_CONNECTIONS = 64


def _pool(host: dict):
    host = dict(host)
    if "address" in host:
        address = host.pop("address")
        return aioredis.BlockingConnectionPool.from_url(
            address, max_connections=LAYER_MAX_CONNECTIONS, timeout=5, **host
        )
    # Sentinel: redis-py has no blocking sentinel pool; allow far more than a burst needs.
    host.setdefault("max_connections", 10_000)
    return create_pool(host)


class _Shard(RedisSingleShardConnection):
    def _ensure_redis(self):
        # As channels_redis' own, with the pool above.
        if self._redis is None:
            self._redis = aioredis.Redis(connection_pool=_pool(self.host))
            self._pubsub = self._redis.pubsub()

    async def publish(self, channel, message):
        self._ensure_redis()  # synchronous: no other coroutine runs in between
        await self._redis.publish(channel, message)

    async def subscribe(self, channel):
        if channel in self._subscribed_to:
            return
        await super().subscribe(channel)


class _LoopLayer(RedisPubSubLoopLayer):
    def __init__(self, hosts=None, *args, **kwargs) -> None:
        super().__init__(hosts, *args, **kwargs)
        self._shards = [_Shard(host, self) for host in decode_hosts(hosts)]

    async def _subscribe_to_channel(self, channel):
        # As channels_redis' own, with an Inbox (put_nowait, get, qsize: all it and
        # Node.backlog use) for the channel's queue.
        self.channels[channel] = Inbox()
        shard = self._get_shard(channel)
        await shard.subscribe(channel)


class SharedDecodePubSubChannelLayer(RedisPubSubChannelLayer):
    def _get_layer(self):
        # As channels_redis' own, with the shard class above.
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
        return layer

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._decoded: list[tuple[bytes, object]] = []
        self._sync: list[redis.Redis] | None = None  # (the base class proxies unknown names)

    def receive(self, channel):
        # channels_redis proxies `receive` through one more coroutine (_async_proxy),
        # held for as long as the socket waits, i.e. its whole life.
        return self._get_layer().receive(channel)

    def inbox(self, channel: str) -> Inbox | None:
        """The queue of a channel made by this process' new_channel, for a consumer that
        waits on it without a task of its own (ChatConsumer); release() when done."""
        queue = self._get_layer().channels.get(channel)
        return queue if isinstance(queue, Inbox) else None

    async def release(self, channel: str) -> None:
        """What channels_redis' receive does when its waiter is cancelled (the consumer
        stopped): forget the channel and unsubscribe from it."""
        layer = self._get_layer()
        if layer.channels.pop(channel, None) is None:
            return
        try:
            await layer._get_shard(channel).unsubscribe(channel)
        except Exception:
            logger.exception("Unexpected exception while cleaning-up channel:")

    def deserialize(self, message):
        # Identity, not equality: the layer fans out the very same bytes object, and
        # holding it here keeps its id from being reused while it is remembered.
        for raw, decoded in reversed(self._decoded):
            if raw is message:
                return decoded
        decoded = super().deserialize(message)
        self._decoded.append((message, decoded))
        if len(self._decoded) > _RECENT:
            del self._decoded[0]
        return decoded

    # --- publishing from synchronous code -------------------------------------------------

    def group_send_sync(self, group: str, message: dict) -> None:
        """`group_send` from a thread without an event loop: one PUBLISH, right now.

        Used by chat.events for the events a transaction publishes on commit: the thread
        that committed publishes before it does anything else, so two consecutive seqs
        committed in two processes reach Redis in commit order far more often than when
        the publish first waits for an event loop to get round to it (docs/benchmarks.md:
        out-of-order arrivals made sockets wait for the missing seq). Same channel
        naming, sharding and serialization as channels_redis' group_send. Raises
        redis.RedisError if Redis does not answer within a second.
        """
        prefix = self._kwargs.get("prefix", "asgi")
        channel = f"{prefix}__group__{group}"
        clients = self._sync_clients()
        client = clients[_consistent_hash(channel, len(clients))]
        client.publish(channel, self.serialize(message))

    def _sync_clients(self) -> list[redis.Redis]:
        clients = self._sync
        if clients is None:
            with _sync_lock:
                clients = self._sync
                if clients is None:
                    hosts = self._kwargs.get("hosts") or (self._args[0] if self._args else None)
                    clients = self._sync = [_sync_client(h) for h in decode_hosts(hosts)]
        return clients


_sync_lock = threading.Lock()


def _sync_client(host: dict) -> redis.Redis:
    """A thread-safe synchronous client for one layer host (channels_redis' host forms).
    redis-py's pool notices a fork and reconnects in the child."""
    host = {**host, "socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    if "address" in host:
        return redis.Redis.from_url(host.pop("address"), **host)
    master_name = host.pop("master_name", None)
    if master_name is not None:
        sentinels = host.pop("sentinels")
        sentinel_kwargs = host.pop("sentinel_kwargs", None) or {}
        return Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs).master_for(master_name, **host)
    return redis.Redis(**host)
