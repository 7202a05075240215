"""The realtime process' bridge to the ORM.

`database_sync_to_async` is thread-sensitive by default: every ORM call of the process
would queue on one thread. Socket traffic is independent per user, so calls run on a
pool of threads sized like the database connection pool (one connection per thread).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from django.db import close_old_connections

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


def _in_thread(fn, args, kwargs):
    # What channels' DatabaseSyncToAsync does around the call: a connection that broke
    # or outlived CONN_MAX_AGE is not reused, before or after.
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()


def db(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run `fn` (which uses the ORM) on the database threads; returns an async callable.

    channels' `database_sync_to_async(fn, thread_sensitive=False, executor=...)`, without
    asgiref's per-call machinery: it built a SyncToAsync object per call (update_wrapper,
    two iscoroutinefunction checks), and wrapped the executor future in a shielded task;
    a third of the send path's Python time (docs/benchmarks.md, session 12). Here: the
    caller's contextvars, the executor, the connection cleanup, nothing else. `fn` must
    not call async_to_sync (nothing on these threads does). Cancelling the caller does
    not stop the thread, as before."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        return await loop.run_in_executor(executor(), context.run, _in_thread, fn, args, kwargs)

    return call
