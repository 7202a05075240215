"""The benchmark's topology, left running: for Locust against a local stack, or a look
around. `python -m loadtests.bench.stack [--config parley|naive] [--users N] [--seconds S]`

Recreates the benchmark database (parley_lt), migrates, seeds N users with tokens into
a users file for `locust --users-file`, starts web, two realtime replicas and a worker,
prints their URLs, and stops everything on Ctrl-C (or after --seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

from loadtests.bench import seed as seeding
from loadtests.bench.__main__ import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, migrate
from loadtests.bench.topology import Topology, drop_database, recreate_database


def write_users_file(path: Path, users: list[seeding.SeedUser]) -> None:
    """Accounts for `locust --users-file` (tokens only: nobody signs in with a password)."""
    path.write_text(
        json.dumps(
            {"users": [{"username": u.username, "id": u.id, "token": u.token} for u in users]}
        )
    )
    path.chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench.stack", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", default="parley", choices=["parley", "naive"])
    p.add_argument("--users", type=int, default=200, help="users seeded into the users file")
    p.add_argument(
        "--users-file", type=Path, default=Path(tempfile.gettempdir()) / "parley-lt-users.json"
    )
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    p.add_argument(
        "--database-url", default=os.environ.get("LT_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    p.add_argument("--redis-url", default=os.environ.get("LT_REDIS_URL", DEFAULT_REDIS_URL))
    p.add_argument("--prefix", default=os.environ.get("LT_CHANNEL_LAYER_PREFIX", "lt"))
    p.add_argument("--keep-db", action="store_true")
    args = p.parse_args(argv)
    recreate_database(args.database_url)
    migrate(args)
    seeding.setup_django(args.database_url, args.redis_url, args.prefix)
    users = seeding.create_users(f"lt{secrets.token_hex(2)}", args.users)
    seeding.close_connections()
    write_users_file(args.users_file, users)
    logdir = Path(tempfile.gettempdir()) / f"parley-stack-{os.getpid()}"
    topo = Topology(
        args.config,
        database_url=args.database_url,
        redis_url=args.redis_url,
        prefix=args.prefix,
        logdir=logdir,
    )
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        topo.start()
        print(
            f"web:      {topo.web_url}\nrealtime: {' '.join(topo.ws_urls)}\n"
            f"users:    {args.users_file} ({args.users} accounts with tokens)\nlogs:     {logdir}\n"
            f"e.g. locust -f loadtests/locustfile.py --headless --host {topo.web_url} "
            f"--ws-url {topo.ws_urls[0]} --users-file {args.users_file} -u 50 -r 10 -t 1m",
            flush=True,
        )
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while not stop and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        topo.stop()
        seeding.close_connections()
        if not args.keep_db:
            drop_database(args.database_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
