"""Shared fixtures: users, rooms, API clients. Postgres and Redis are real (see
parley.testing.pytest_plugin for how they are found or started)."""

from __future__ import annotations

import itertools

import pytest
from django.test import Client

from parley.accounts.models import User
from parley.accounts.services import token_create
from parley.chat import services

_counter = itertools.count(1)
PASSWORD = "correct-horse-battery"


@pytest.fixture(autouse=True)
def _flush_redis_keys():
    """Rate-limit windows and presence must not leak from one test to the next."""
    from parley.chat.ratelimit import redis_client

    r = redis_client()
    for pattern in ("parley:rl:*", "parley:presence:*"):
        keys = list(r.scan_iter(pattern, count=500))
        if keys:
            r.delete(*keys)
    yield


def make_user(username: str | None = None, **extra) -> User:
    username = username or f"user{next(_counter)}"
    return User.objects.create_user(username=username, password=PASSWORD, **extra)


@pytest.fixture
def user_factory(db):
    return make_user


@pytest.fixture
def alice(db) -> User:
    return make_user("alice", display_name="Alice A.")


@pytest.fixture
def bob(db) -> User:
    return make_user("bob", display_name="Bob B.")


@pytest.fixture
def carol(db) -> User:
    return make_user("carol")


@pytest.fixture
def room(alice, bob):
    room = services.room_create(creator=alice, name="General", topic="All things")
    services.room_join(user=bob, slug=room.slug)
    return room


class ApiClient:
    """A bearer-token API client over Django's test client."""

    def __init__(self, user: User | None = None) -> None:
        self.client = Client()
        self.user = user
        self.headers = {}
        if user is not None:
            self.headers["Authorization"] = f"Bearer {token_create(user=user)}"

    def _call(self, method: str, path: str, data=None, headers=None, **kw):
        fn = getattr(self.client, method)
        headers = {**self.headers, **(headers or {})}
        if method in ("post", "put", "patch"):
            if data is None:
                data = {}
            return fn(path, data=data, content_type="application/json", headers=headers, **kw)
        return fn(path, data=data, headers=headers, **kw)

    def get(self, path, data=None, **kw):
        return self._call("get", path, data, **kw)

    def post(self, path, data=None, **kw):
        return self._call("post", path, data, **kw)


@pytest.fixture
def api_for(db):
    return ApiClient
