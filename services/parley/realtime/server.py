"""Runs the realtime service under uvicorn (uvloop, httptools, websockets-sansio), with a
graceful drain.

SIGTERM (or the first Ctrl-C):
1. stop accepting: the listening sockets close, /readyz would answer 503, and a
   handshake that still arrives is closed with 1012;
2. close the open sockets with 1012 (Service Restart: reconnect elsewhere), spread evenly
   over REALTIME_DRAIN_SECONDS so that the other replicas do not take every reconnect in
   the same instant; sends being committed get their ack first;
3. let uvicorn finish (lifespan shutdown flushes delivery receipts) and exit 0; threads
   still blocked in a Redis or Postgres call 3 s after that do not hold the exit.
A second signal skips the rest of the drain; REALTIME_GRACE_SECONDS after the first,
the process exits whatever it is doing (set it below terminationGracePeriodSeconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from types import FrameType

logger = logging.getLogger("parley.realtime.server")


def _uvicorn_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(
            self,
            config,
            *,
            drain_seconds: float,
            grace_seconds: float,
            exit_wait_seconds: float = 3.0,
            gc_thresholds: tuple[int, ...] | None = None,
        ) -> None:
            super().__init__(config)
            self.drain_seconds = drain_seconds
            self.grace_seconds = grace_seconds
            self.exit_wait_seconds = exit_wait_seconds
            self.gc_thresholds = gc_thresholds
            self._loop: asyncio.AbstractEventLoop | None = None
            self._drain_task: asyncio.Task | None = None

        async def serve(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            if not self.config.loaded:
                self.config.load()  # imports the application, whose heap is then frozen
            from parley import gctune

            gctune.tune(self.gc_thresholds)
            await super().serve(sockets=sockets)
            # Drained and shut down. What is left is asyncio.run's cleanup and the
            # interpreter's exit, and both wait for every thread: one blocked in a Redis
            # or Postgres call (the host stopped answering, a row lock) would hold the
            # exit until the grace timer kills the process with 1. The drain is done, so
            # such threads get EXIT_WAIT_SECONDS and the process exits 0 anyway.
            timer = threading.Timer(self.exit_wait_seconds, self._stuck_on_exit)
            timer.daemon = True
            timer.start()

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Unlike uvicorn's, no re-raise of the signal after shutdown: a drained
            # process exits 0.
            if self._drain_task is not None or self._loop is None:
                logger.warning("second signal: skipping the rest of the drain")
                self.should_exit = True
                return
            logger.info("signal %s: draining", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_drain)
            timer = threading.Timer(self.grace_seconds, self._out_of_time)
            timer.daemon = True
            timer.start()

        def _start_drain(self) -> None:
            if self._drain_task is None:
                self._drain_task = self._loop.create_task(self._drain())

        async def _drain(self) -> None:
            from parley.realtime.node import get_node

            try:
                for server in getattr(self, "servers", []):
                    server.close()  # stop accepting; open connections stay
                await get_node().drain(self.drain_seconds)
            except Exception:
                logger.exception("drain failed")
            finally:
                self.should_exit = True

        def _stuck_on_exit(self) -> None:
            stuck = [
                t.name
                for t in threading.enumerate()
                if t is not threading.current_thread() and t is not threading.main_thread()
            ]
            logger.warning(
                "drained, but %d thread(s) still busy %.0f s later (%s): exiting",
                len(stuck),
                self.exit_wait_seconds,
                ", ".join(stuck[:10]),
            )
            logging.shutdown()
            os._exit(0)

        def _out_of_time(self) -> None:
            logger.error("still running %.0f s after the signal: exiting", self.grace_seconds)
            logging.shutdown()
            os._exit(1)

    return DrainingServer


def _ws_protocol_class():
    """uvicorn's websockets-sansio protocol, holding less per open socket.

    - its receive queue and `writable` event are parley.realtime.lean's Inbox and Flag
      (an asyncio.Queue and an asyncio.Event cost 4 KB per socket, measured);
    - the handshake's request and response (websockets objects with their headers, about
      3 KB) are dropped, and the request's headers emptied, once the handshake is
      answered: uvicorn reads them only to answer it. The ASGI scope keeps its own copy
      of the request headers.
    - `parley.wire.send` messages write ready-made frames (parley.realtime.frames):
      a broadcast is framed once per node, and a flush's receipt frames for a socket go
      out in one write instead of one per frame.
    Nothing on the wire changes. tests/realtime/test_lean.py checks that the uvicorn
    internals this relies on are still there.
    """
    from uvicorn.protocols.utils import ClientDisconnected
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.protocol import State

    from parley.realtime.frames import WIRE_EXTENSION, WIRE_SEND
    from parley.realtime.lean import Flag, Inbox

    class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.queue = Inbox()
            self.writable = Flag()
            self.writable.set()

        def handle_connect(self, event) -> None:
            super().handle_connect(event)
            scope = self.__dict__.get("scope")
            if scope is not None:  # the app starts on the next loop turn: still in time
                scope["extensions"][WIRE_EXTENSION] = {}

        async def send(self, message) -> None:
            if message["type"] == WIRE_SEND:
                # Ready-made frames (parley.realtime.frames.wire_text): what a
                # `websocket.send` would write, without framing them again per socket.
                await self.writable.wait()
                if (
                    self.disconnected
                    or self.close_sent
                    or not self.handshake_complete
                    or self.conn.state is not State.OPEN
                ):
                    raise ClientDisconnected()
                self.transport.write(message["bytes"])
                return
            await super().send(message)
            if self.handshake_complete and message["type"] == "websocket.accept":
                request, self.request, self.response = self.request, None, None
                if request is not None:
                    # websockets' parser generator keeps a reference to the request.
                    request.headers.clear()

    return LeanWebSocketProtocol


def serve(
    host: str = "0.0.0.0",  # noqa: S104
    port: int = 8001,
    *,
    drain_seconds: float | None = None,
    grace_seconds: float | None = None,
    log_level: str | None = None,
    fd: int | None = None,
) -> None:
    """Serve the realtime ASGI app until SIGTERM/SIGINT, then drain and return."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.config.settings")
    import django

    django.setup()
    import uvicorn
    from django.conf import settings

    from parley import gctune
    from parley.realtime import conf

    gc_thresholds = gctune.thresholds()  # a bad value stops here, before serving
    config = uvicorn.Config(
        "parley.config.asgi:application",
        host=host,
        port=port,
        fd=fd,
        loop="uvloop",
        http="httptools",
        ws=_ws_protocol_class(),  # websockets-sansio, leaner per socket
        ws_max_size=conf.WS_MAX_SIZE,  # a bigger frame closes the socket with 1009
        ws_per_message_deflate=False,  # ~64 KiB of zlib state per socket; chat frames are small
        ws_ping_interval=conf.WS_PING_INTERVAL,
        ws_ping_timeout=conf.WS_PING_TIMEOUT,
        lifespan="on",
        # Logging is Django's (LOG_FORMAT); uvicorn's per-handshake INFO lines and access
        # log would cost more than the traffic they describe.
        log_config=None,
        log_level=(log_level or settings.LOG_LEVEL).lower(),
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
        timeout_graceful_shutdown=5,
        backlog=4096,
    )
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = _uvicorn_server_class()(
        config,
        drain_seconds=conf.DRAIN_SECONDS if drain_seconds is None else drain_seconds,
        grace_seconds=conf.GRACE_SECONDS if grace_seconds is None else grace_seconds,
        exit_wait_seconds=conf.EXIT_WAIT_SECONDS,
        gc_thresholds=gc_thresholds,
    )
    logger.info("realtime node %s listening on %s:%s", conf.node_id(), host, port)
    server.run()
