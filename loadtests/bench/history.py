"""History paging on a very long conversation: `python -m loadtests.bench.history`.

Issue 8's target: a history page answers with p99 under 10 ms on a conversation of 10
million messages. This fills one conversation of its own database with N messages
(`INSERT ... SELECT generate_series`, a few minutes for 10 million; `--keep-db` keeps
them for the next run, which then starts at once), starts the topology (`parley web`
with its usual 2 workers; the other services idle), and times `GET
/api/v1/conversations/{id}/messages` over HTTP from this process, one request at a time
(the latency of a page, not the throughput of the box) in three shapes: the newest page,
`before=` a random seq (scrolling back), `after=` a random seq (catching up). Each
request is timed from connect to the last byte of the body; the figure includes the HTTP
round trip on loopback and JSON encoding of 50 messages.

Results: loadtests/results/<stamp>-history.json and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from loadtests.bench import seed as seeding
from loadtests.bench.topology import Topology, drop_database, recreate_database
from loadtests.common import RESULTS_DIR, Percentiles, git_revision, machine, stamp

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/parley_lt_history"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
ROOM_SLUG = "lt-history"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.history", description=__doc__)
    p.add_argument("--messages", type=int, default=10_000_000)
    p.add_argument("--requests", type=int, default=1000, help="per request shape")
    p.add_argument("--limit", type=int, default=50, help="page size (the API's default)")
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--keep-db", action="store_true", help="keep (and reuse) the database")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--seed", type=int, default=8)
    return p.parse_args(argv)


def _database_exists(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


def prepare(args, say) -> tuple[int, str]:
    """The conversation id and a member's token; fills the database when needed."""
    from loadtests.bench.__main__ import migrate

    reuse = args.keep_db and _database_exists(args.database_url)
    if not reuse:
        recreate_database(args.database_url)
    migrate(args)
    seeding.setup_django(args.database_url, args.redis_url, "lth")
    from django.db import connection

    from parley.chat.models import Conversation, Message

    room = Conversation.objects.filter(slug=ROOM_SLUG).first()
    if room is not None and room.last_seq == args.messages:
        say(f"reusing {args.messages:,} messages in conversation {room.id}")
    else:
        if room is not None:
            Conversation.objects.filter(pk=room.pk).delete()
        [user] = seeding.create_users("lth", 1)
        [seeded] = seeding.create_rooms("lth", [[user]])
        Conversation.objects.filter(pk=seeded.id).update(slug=ROOM_SLUG)
        room = Conversation.objects.get(pk=seeded.id)
        say(f"inserting {args.messages:,} messages (this takes a while)")
        started = time.monotonic()
        table = connection.ops.quote_name(Message._meta.db_table)
        step = 1_000_000
        with connection.cursor() as cur:
            for low in range(1, args.messages + 1, step):
                high = min(low + step - 1, args.messages)
                cur.execute(
                    f"INSERT INTO {table} (conversation_id, seq, sender_id, body, created_at) "  # noqa: S608
                    "SELECT %s, g, %s, 'history message ' || g || ' ' || repeat('x', 40), "
                    "now() - make_interval(secs => %s - g) FROM generate_series(%s, %s) g",
                    [room.id, user.id, args.messages, low, high],
                )
                say(f"  {high:,} ({time.monotonic() - started:.0f} s)")
            cur.execute(f"ANALYZE {table}")
        Conversation.objects.filter(pk=room.pk).update(last_seq=args.messages)
    from parley.accounts.models import ApiToken
    from parley.accounts.services import token_digest
    from parley.chat.models import Membership

    member = Membership.objects.filter(conversation_id=room.id).first()
    raw = "plt_history_" + str(random.Random(args.seed).getrandbits(64))
    ApiToken.objects.get_or_create(user_id=member.user_id, digest=token_digest(raw))
    seeding.close_connections()
    return room.id, raw


def get(port: int, path: str, token: str) -> tuple[float, int, bytes]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    return time.perf_counter() - started, resp.status, body


def page_seqs(body: bytes) -> list[int]:
    return [m["seq"] for m in json.loads(body)["messages"]]


def measure(port: int, conversation_id: int, token: str, args, say) -> dict:
    rng = random.Random(args.seed)
    base = f"/api/v1/conversations/{conversation_id}/messages"
    n = args.messages
    k = args.limit

    # Each shape: (path, the seqs the page must hold), so that speed is never bought with
    # a wrong page.
    def newest():
        return f"{base}?limit={k}", list(range(n - k + 1, n + 1))

    def before():
        x = rng.randint(k + 1, n)
        return f"{base}?before={x}&limit={k}", list(range(x - k, x))

    def after():
        x = rng.randint(0, n - k)
        return f"{base}?after={x}&limit={k}", list(range(x + 1, x + k + 1))

    shapes = {"newest": newest, "before": before, "after": after}
    for _ in range(50):  # warm: connections, caches, the first compiled queries
        get(port, before()[0], token)
    out = {}
    for name, shape in shapes.items():
        latency = Percentiles()
        statuses: dict[int, int] = {}
        wrong = 0
        size = 0
        for _ in range(args.requests):
            path, expected = shape()
            took, status, body = get(port, path, token)
            latency.add(took)
            statuses[status] = statuses.get(status, 0) + 1
            size = len(body)
            if status != 200 or page_seqs(body) != expected:
                wrong += 1
        out[name] = {
            "latency_ms": latency.summary_ms(),
            "statuses": statuses,
            "wrong_pages": wrong,
            "bytes": size,
        }
        s = out[name]["latency_ms"]
        say(
            f"  {name}: p50 {s['p50']} ms, p99 {s['p99']} ms, max {s['max']} ms, "
            f"{statuses}, {wrong} wrong pages"
        )
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    say = print
    started = stamp()
    run = {"started": started, "revision": git_revision(), "machine": machine(), "args": {}}
    run["args"] = {k: str(v) for k, v in vars(args).items()}
    conversation_id, token = prepare(args, say)
    logdir = Path(tempfile.mkdtemp(prefix=f"parley-history-{started}-"))
    topo = Topology(
        "parley",
        database_url=args.database_url,
        redis_url=args.redis_url,
        prefix="lth",
        logdir=logdir,
        replicas=1,
    )
    topo.start()
    try:
        say(f"measuring over HTTP (web on :{topo.web_port}, logs in {logdir})")
        run["pages"] = measure(topo.web_port, conversation_id, token, args, say)
    finally:
        topo.stop()
        if not args.keep_db:
            drop_database(args.database_url)
    run["finished"] = stamp()
    run["loadavg_end"] = machine()["loadavg"]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    base = args.results_dir / f"{started}-history"
    base.with_suffix(".json").write_text(json.dumps(run, indent=2))
    lines = [
        f"# History pages, run {started}",
        "",
        f"`python -m loadtests.bench.history {' '.join(sys.argv[1:])}`, revision "
        f"{run['revision']}, load average at start {run['machine']['loadavg']}, "
        f"at end {run['loadavg_end']}; {args.messages:,} messages in one conversation, "
        f"pages of {args.limit}, {args.requests} sequential requests per shape.",
        "",
        "| page | p50 ms | p90 ms | p99 ms | max ms | statuses | wrong pages |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, page in run["pages"].items():
        s = page["latency_ms"]
        lines.append(
            f"| {name} | {s['p50']} | {s['p90']} | {s['p99']} | {s['max']} "
            f"| {page['statuses']} | {page['wrong_pages']} |"
        )
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    say(f"results: {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
