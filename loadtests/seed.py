"""Create load-test users (and rooms) through the public API of any Parley deployment.

    python -m loadtests.seed --url https://chat.example.com --users 2000 \\
        --out loadtests/.users.json [--rooms 50 --rooms-per-user 3] [--large-room lt-large]

Sign-up hashes a password per user on the server (by design: PBKDF2), so thousands of
users take minutes; do it once and reuse the file (`locust ... --users-file`). Re-running
with the same file is idempotent: existing users sign in, rooms already joined stay.
Needs sign-up open on the server (PARLEY_ALLOW_SIGNUP=true) while seeding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

API = "/api/v1"


def api_client(base_url: str, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(
        base_url=base_url.rstrip("/"),
        timeout=timeout,
        headers={"Accept": "application/json"},
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    )


def ensure_user(client: httpx.Client, username: str, password: str) -> dict:
    """Sign up, or sign in if the name is taken; returns {username, password, id, token}."""
    r = client.post(
        f"{API}/accounts",
        json={"username": username, "password": password, "display_name": username},
    )
    if r.status_code == 201:
        body = r.json()
        return {
            "username": username,
            "password": password,
            "id": body["user"]["id"],
            "token": body["token"],
        }
    if r.status_code != 409:
        raise RuntimeError(f"sign-up of {username}: HTTP {r.status_code} {r.text[:200]}")
    r = client.post(f"{API}/auth/token", json={"username": username, "password": password})
    if r.status_code != 200:
        raise RuntimeError(f"sign-in of {username}: HTTP {r.status_code} {r.text[:200]}")
    token = r.json()["token"]
    me = client.get(f"{API}/me", headers={"Authorization": f"Bearer {token}"}).json()
    return {"username": username, "password": password, "id": me["id"], "token": token}


def ensure_room(client: httpx.Client, token: str, slug: str, name: str | None = None) -> int:
    """The room's id: joined if it exists, created (public) if not."""
    auth = {"Authorization": f"Bearer {token}"}
    r = client.post(f"{API}/rooms/{slug}/join", headers=auth)
    if r.status_code == 200:
        return r.json()["id"]
    r = client.post(f"{API}/rooms", headers=auth, json={"name": name or slug, "slug": slug})
    if r.status_code == 201:
        return r.json()["id"]
    if r.status_code == 409:  # created meanwhile by another user
        r = client.post(f"{API}/rooms/{slug}/join", headers=auth)
        if r.status_code == 200:
            return r.json()["id"]
    raise RuntimeError(f"room {slug}: HTTP {r.status_code} {r.text[:200]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.seed", description=__doc__.splitlines()[0]
    )
    p.add_argument("--url", required=True, help="web base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="users file (JSON), read and extended")
    p.add_argument("--prefix", default="lt", help="username prefix (default: %(default)s)")
    p.add_argument("--rooms", type=int, default=0, help="rooms lt-room-0..N-1 to spread users over")
    p.add_argument("--rooms-per-user", type=int, default=3)
    p.add_argument("--large-room", default="", help="slug of a room every user joins")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    args = p.parse_args(argv)

    existing = json.loads(args.out.read_text()) if args.out.exists() else {"users": []}
    users: list[dict] = existing["users"]
    # Passwords derive from a secret kept in the file: a re-run signs existing users in.
    secret = existing.get("secret") or secrets.token_urlsafe(24)
    lock = threading.Lock()
    deadline = time.monotonic() + args.timeout
    started = time.monotonic()
    errors: list[str] = []

    def make(i: int) -> None:
        if time.monotonic() > deadline:
            return
        with api_client(args.url) as client:
            try:
                username = f"{args.prefix}-{i}"
                password = hashlib.sha256(f"{secret}:{username}".encode()).hexdigest()[:24]
                user = ensure_user(client, username, password)
                auth_token = user["token"]
                slugs = []
                if args.rooms:
                    rng = secrets.SystemRandom()
                    slugs = [
                        f"lt-room-{k}"
                        for k in rng.sample(range(args.rooms), min(args.rooms_per_user, args.rooms))
                    ]
                if args.large_room:
                    slugs.append(args.large_room)
                user["rooms"] = {slug: ensure_room(client, auth_token, slug) for slug in slugs}
            except (httpx.HTTPError, RuntimeError) as exc:
                with lock:
                    errors.append(str(exc))
                return
        with lock:
            users.append(user)
            if len(users) % 100 == 0:
                rate = len(users) / (time.monotonic() - started)
                print(f"{len(users)} users ({rate:.1f}/s)", flush=True)

    have = {u["username"] for u in users}
    todo = [i for i in range(args.users) if f"{args.prefix}-{i}" not in have]
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(make, todo))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"url": args.url, "secret": secret, "users": users}, indent=1))
    args.out.chmod(0o600)  # tokens and passwords
    print(f"{len(users)} users in {args.out} ({len(errors)} errors)")
    for e in errors[:10]:
        print("  " + e, file=sys.stderr)
    return 1 if errors and not users else 0


if __name__ == "__main__":
    sys.exit(main())
