"""A no-op chat server: the protocol's hello/send/ack/message frames with nothing
behind them (no Postgres, no Redis, no ordering buffer), one process serving every port.

It measures the load generator, not Parley: whatever rate the benchmark reaches against
it is the ceiling of the generator (and of the client library) on this machine, so a
Parley figure near it is generator-bound. Users and their conversations come from a JSON
seed file: {"<token>": [user_id, [conversation ids]]}.

    python -m loadtests.bench.noop --seed seed.json --port 9001 --port 9002
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections import defaultdict
from http import HTTPStatus

import orjson
from websockets.asyncio.server import broadcast, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response


class NoopChat:
    def __init__(self, seed: dict) -> None:
        self.users = {token: (uid, cids) for token, (uid, cids) in seed.items()}
        self.seq: dict[int, int] = defaultdict(int)
        self.members: dict[int, set] = defaultdict(set)

    def process_request(self, connection, request):
        if request.path in ("/healthz", "/readyz"):
            return Response(HTTPStatus.OK, "OK", Headers([("Content-Length", "3")]), b"ok\n")
        if request.path != "/ws/chat/":
            return Response(
                HTTPStatus.FORBIDDEN, "Forbidden", Headers([("Content-Length", "0")]), b""
            )
        return None

    async def handler(self, ws) -> None:
        auth = ws.request.headers.get("Authorization", "")
        user = self.users.get(auth.partition(" ")[2].strip())
        if user is None:
            await ws.close(4401)
            return
        uid, cids = user
        for cid in cids:
            self.members[cid].add(ws)
        try:
            await ws.send(
                orjson.dumps(
                    {
                        "type": "hello",
                        "user": {"id": uid, "username": f"u{uid}", "display_name": ""},
                        "node": "noop",
                        "conversations": [{"id": c, "last_seq": self.seq[c]} for c in cids],
                    }
                ).decode()
            )
            async for text in ws:
                frame = orjson.loads(text)
                ftype = frame.get("type")
                if ftype == "send":
                    cid = frame["conversation"]
                    seq = self.seq[cid] = self.seq[cid] + 1
                    await ws.send(
                        orjson.dumps(
                            {
                                "type": "ack",
                                "client_id": frame["client_id"],
                                "conversation": cid,
                                "seq": seq,
                                "id": seq,
                            }
                        ).decode()
                    )
                    message = orjson.dumps(
                        {
                            "type": "message",
                            "id": seq,
                            "conversation": cid,
                            "seq": seq,
                            "sender": {"id": uid, "username": f"u{uid}", "display_name": ""},
                            "body": frame["body"],
                            "client_id": frame["client_id"],
                            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        }
                    ).decode()
                    broadcast(self.members[cid], message)
                elif ftype == "ping":
                    await ws.send('{"type":"pong"}')
        except ConnectionClosed:
            pass  # the generator closes sockets abruptly between phases
        finally:
            for cid in cids:
                self.members[cid].discard(ws)


async def main(seed_path: str, ports: list[int]) -> None:
    with open(seed_path, "rb") as f:
        chat = NoopChat(orjson.loads(f.read()))
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            sig, lambda: stop.done() or stop.set_result(None)
        )
    async with contextlib.AsyncExitStack() as stack:
        for port in ports:
            await stack.enter_async_context(
                serve(
                    chat.handler,
                    "127.0.0.1",
                    port,
                    process_request=chat.process_request,
                    compression=None,
                    max_size=65536,
                    ping_interval=None,
                    backlog=4096,
                )
            )
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", required=True)
    parser.add_argument("--port", type=int, action="append", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.seed, args.port))
    except ImportError:
        asyncio.run(main(args.seed, args.port))
