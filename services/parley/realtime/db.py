"""The realtime process' bridge to the ORM.

`database_sync_to_async` is thread-sensitive by default: every ORM call of the process
would queue on one thread. Socket traffic is independent per user, so calls run on a
pool of threads sized like the database connection pool (one connection per thread).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from channels.db import database_sync_to_async

from parley.realtime import conf

P = ParamSpec("P")
R = TypeVar("R")

_executor: ThreadPoolExecutor | None = None


def executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(
            max_workers=conf.db_threads(), thread_name_prefix="parley-db"
        )
    return _executor


def db(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run `fn` (which uses the ORM) on the database threads; returns an async callable."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return await database_sync_to_async(fn, thread_sensitive=False, executor=executor())(
            *args, **kwargs
        )

    return call
