#!/usr/bin/env python
"""Container probes for the Parley image (installed as `parley-probe`).

    parley-probe http URL               exit 0 when URL answers 200 (health checks)
    parley-probe wait-for-database [--timeout S]
                                        wait until DATABASE_URL accepts connections

`http` sends as Host the first name in ALLOWED_HOSTS, so that the web service's host
check accepts a probe made from inside the container to 127.0.0.1, whatever public
names the deployment serves. Only the standard library is needed for `http`, so a check
costs one small interpreter start, not a Django start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request


def _host_header() -> str | None:
    for name in os.environ.get("ALLOWED_HOSTS", "").split(","):
        name = name.strip().lstrip(".")
        if name and "*" not in name:
            return name
    return None


def http(url: str, timeout: float) -> int:
    if not url.startswith(("http://", "https://")):
        print(f"parley-probe: not an http URL: {url}", file=sys.stderr)
        return 2
    request = urllib.request.Request(url)  # noqa: S310 - the scheme is checked above
    host = _host_header()
    if host:
        port = url.split("//", 1)[1].split("/", 1)[0].rpartition(":")[2]
        request.add_header("Host", f"{host}:{port}" if port.isdigit() else host)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"parley-probe: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"parley-probe: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


def wait_for_database(timeout: float) -> int:
    import environ
    import psycopg

    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/parley")
    config = environ.Env.db_url_config(url)
    params = {
        "dbname": config.get("NAME"),
        "user": config.get("USER"),
        "password": config.get("PASSWORD"),
        "host": config.get("HOST"),
        "port": config.get("PORT"),
        "connect_timeout": 3,
    }
    params = {key: value for key, value in params.items() if value not in (None, "")}
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            with psycopg.connect(**params) as conn:
                conn.execute("SELECT 1")
            return 0
        except psycopg.Error as exc:
            if time.monotonic() >= deadline:
                print(
                    f"parley-probe: the database did not answer in {timeout:.0f}s: {exc}",
                    file=sys.stderr,
                )
                return 1
            if not said:
                print(
                    f"parley-probe: waiting up to {timeout:.0f}s for the database",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parley-probe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("http", help="exit 0 when URL answers 200")
    check.add_argument("url")
    check.add_argument("--timeout", type=float, default=4.0)
    wait = sub.add_parser("wait-for-database", help="wait until DATABASE_URL answers")
    wait.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.command == "http":
        return http(args.url, args.timeout)
    return wait_for_database(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
