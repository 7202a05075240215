"""A mail catcher for the compose stack: an SMTP sink that keeps the last messages in
memory and shows them on a small web page. Standard library only.

    python mailcatcher.py [--smtp-port 1025] [--http-port 8025] [--keep 500]
    python mailcatcher.py --check        exit 0 when the web view answers (health check)

Web view: `/` lists the messages, `/messages/ID` shows one as sent, `/api/messages` is
the list as JSON (for tests), `/healthz` answers "ok". Nothing is relayed anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email
import email.policy
import html
import itertools
import json
import signal
import sys
import threading
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_MESSAGE_BYTES = 10 * 1024 * 1024
MAX_LINE_BYTES = 64 * 1024  # far above SMTP's 1000, for sloppy clients


class Store:
    def __init__(self, keep: int) -> None:
        self._messages: collections.deque[dict] = collections.deque(maxlen=keep)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, sender: str, recipients: list[str], raw: bytes) -> dict:
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        message = {
            "id": next(self._ids),
            "received_at": datetime.now(UTC).isoformat(),
            "from": sender,
            "to": recipients,
            "subject": str(parsed.get("Subject", "")),
            "raw": raw.decode("utf-8", "replace"),
        }
        with self._lock:
            self._messages.append(message)
        return message

    def all(self) -> list[dict]:
        with self._lock:
            return list(self._messages)


# --- SMTP ------------------------------------------------------------------------------


def _address(argument: str) -> str:
    """The address in `FROM:<a@b> SIZE=10` or `TO:<a@b>`."""
    value = argument.split(":", 1)[1].strip() if ":" in argument else argument
    if value.startswith("<"):
        value = value[1 : value.find(">")] if ">" in value else value[1:]
    return value.split()[0] if value.split() else ""


async def smtp_session(reader, writer, store: Store) -> None:
    async def reply(line: str) -> None:
        writer.write(line.encode() + b"\r\n")
        await writer.drain()

    sender, recipients = "", []
    try:
        await reply("220 mailcatcher ESMTP ready")
        while True:
            line = await reader.readuntil(b"\n")
            if len(line) > MAX_LINE_BYTES:
                await reply("500 line too long")
                continue
            verb, _, argument = line.decode("utf-8", "replace").strip().partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                await reply(
                    f"250-mailcatcher\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                    f"250 SIZE {MAX_MESSAGE_BYTES}"
                )
            elif verb == "HELO":
                await reply("250 mailcatcher")
            elif verb == "MAIL":
                sender, recipients = _address(argument), []
                await reply("250 OK")
            elif verb == "RCPT":
                recipients.append(_address(argument))
                await reply("250 OK")
            elif verb == "DATA":
                if not recipients:
                    await reply("503 RCPT first")
                    continue
                await reply("354 end with <CRLF>.<CRLF>")
                lines, size = [], 0
                while True:
                    chunk = await reader.readuntil(b"\n")
                    if chunk.rstrip(b"\r\n") == b".":
                        break
                    size += len(chunk)
                    if size <= MAX_MESSAGE_BYTES:
                        lines.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                if size > MAX_MESSAGE_BYTES:
                    await reply("552 message too big")
                else:
                    message = store.add(sender, recipients, b"".join(lines))
                    print(
                        f"mailcatcher: message {message['id']} from {sender} to "
                        f"{', '.join(recipients)}: {message['subject']!r}",
                        flush=True,
                    )
                    await reply(f"250 OK id={message['id']}")
                sender, recipients = "", []
            elif verb == "RSET":
                sender, recipients = "", []
                await reply("250 OK")
            elif verb == "NOOP":
                await reply("250 OK")
            elif verb == "QUIT":
                await reply("221 bye")
                break
            else:
                await reply("502 command not implemented")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


# --- web view ----------------------------------------------------------------------------


def handler_class(store: Store):
    class Handler(BaseHTTPRequestHandler):
        server_version = "mailcatcher"

        def log_message(self, format, *args) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/api/messages":
                self._send(200, json.dumps(store.all()).encode(), "application/json")
            elif path.startswith("/messages/"):
                wanted = path.rsplit("/", 1)[1]
                for message in store.all():
                    if str(message["id"]) == wanted:
                        body = message["raw"].encode()
                        self._send(200, body, "text/plain; charset=utf-8")
                        return
                self._send(404, b"no such message\n", "text/plain")
            elif path == "/":
                rows = "".join(
                    f"<tr><td><a href='/messages/{m['id']}'>{m['id']}</a></td>"
                    f"<td>{html.escape(m['received_at'])}</td><td>{html.escape(m['from'])}</td>"
                    f"<td>{html.escape(', '.join(m['to']))}</td>"
                    f"<td>{html.escape(m['subject'])}</td></tr>"
                    for m in reversed(store.all())
                )
                page = (
                    "<!doctype html><meta charset=utf-8><title>Mail catcher</title>"
                    "<h1>Caught mail</h1><p>Newest first; kept in memory only.</p>"
                    "<table border=1 cellpadding=4><tr><th>#</th><th>received</th>"
                    f"<th>from</th><th>to</th><th>subject</th></tr>{rows}</table>"
                )
                self._send(200, page.encode(), "text/html; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain")

    return Handler


async def serve(smtp_port: int, http_port: int, keep: int) -> None:
    store = Store(keep)
    web = ThreadingHTTPServer(("0.0.0.0", http_port), handler_class(store))  # noqa: S104
    threading.Thread(target=web.serve_forever, name="http", daemon=True).start()
    smtp = await asyncio.start_server(
        lambda r, w: smtp_session(r, w, store),
        "0.0.0.0",  # noqa: S104 - a container's port
        smtp_port,
        limit=MAX_LINE_BYTES,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"mailcatcher: SMTP on :{smtp_port}, web view on :{http_port}", flush=True)
    async with smtp:
        await stop.wait()
    web.shutdown()
    print("mailcatcher: stopped", flush=True)


def check(http_port: int) -> int:
    try:
        url = f"http://127.0.0.1:{http_port}/healthz"
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--http-port", type=int, default=8025)
    parser.add_argument("--keep", type=int, default=500, help="messages kept (oldest dropped)")
    parser.add_argument("--check", action="store_true", help="health check of a running one")
    args = parser.parse_args()
    if args.check:
        return check(args.http_port)
    asyncio.run(serve(args.smtp_port, args.http_port, args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
