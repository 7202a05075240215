"""Browser tests: Debian's Chromium driven by Playwright against the real stack.

One stack for the whole suite (web, realtime replicas A and B behind a front door, a
worker), one Chromium; every test makes its own accounts and browser contexts. The suite
is skipped when /usr/bin/chromium or Playwright is missing (CI installs Chromium with
apt; never `playwright install`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.browser.support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    Account,
    Api,
    FrontDoor,
    child_env,
    clear_stale_redis_state,
    login,
)

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the suite is skipped below
    sync_playwright = None
else:
    # Receipts pass through the worker (about a second); leave room on a busy machine.
    expect.set_options(timeout=TIMEOUT_MS)

HERE = Path(__file__).resolve().parent
SKIP_REASON = (
    f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium) and Playwright "
    "for Python; they never download a browser"
)


def pytest_collection_modifyitems(config, items):
    if os.path.exists(CHROMIUM) and sync_playwright is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@dataclass
class Stack:
    web: object
    replicas: dict
    worker: object
    door: FrontDoor
    env: dict
    logdir: Path
    api: Api
    extra: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.web.url

    def replica(self, name: str):
        """Another realtime replica, stopped at the end of the session."""
        from tests.realtime.cluster import Realtime

        proc = Realtime(name, {**self.env, "PARLEY_NODE_ID": name}, self.logdir)
        self.extra.append(proc)
        proc.wait_ready()
        return proc

    def route_to(self, *replicas) -> None:
        """New connections go to the first of these replicas that accepts them."""
        self.door.order = [r.port for r in replicas]

    def tails(self) -> str:
        procs = [self.web, *self.replicas.values(), *self.extra]
        text = "\n".join(p.tail(40) for p in procs)
        with contextlib.suppress(Exception):
            text += "\n[worker] " + "\n[worker] ".join(self.worker.log().splitlines()[-40:])
        return text


@pytest.fixture(scope="package")
def test_database(django_db_setup, django_db_blocker):
    """The name of the test database that the stack runs on.

    pytest-django creates it only for sessions with `django_db` tests, and no test here
    can be one: Playwright's sync API runs an event loop on the test thread, where Django
    refuses ORM calls. So the tests reach the stack over HTTP only, and this creates the
    database when no other package of the session has.
    """
    from django.db import connection, connections
    from django.db.backends.base.creation import TEST_DATABASE_PREFIX
    from django.test.utils import setup_databases, teardown_databases

    name = connection.settings_dict["NAME"]
    if name == connection.settings_dict["TEST"].get("NAME") or name.startswith(
        TEST_DATABASE_PREFIX
    ):
        yield name  # set up already, for another package's `django_db` tests
        return
    with django_db_blocker.unblock():
        config = setup_databases(
            verbosity=0, interactive=False, aliases={"default"}, serialized_aliases=set()
        )
    try:
        yield connection.settings_dict["NAME"]
    finally:
        with django_db_blocker.unblock():
            for conn in connections.all():
                close_pool = getattr(conn, "close_pool", None)
                if close_pool is not None:
                    close_pool()
            teardown_databases(config, verbosity=0)


@pytest.fixture(scope="package")
def stack(test_database, tmp_path_factory, request):
    from tests.realtime.cluster import Realtime, Web, stop_all
    from tests.worker.support import Worker

    logdir = tmp_path_factory.mktemp("browser-stack")
    env = child_env(test_database)
    for url in {env["REDIS_URL"], env.get("CELERY_BROKER_URL") or env["REDIS_URL"]}:
        clear_stale_redis_state(url)
    door = FrontDoor().start()
    procs, worker, the_stack = [], None, None
    try:
        replicas = {}
        for name in ("A", "B"):
            replicas[name] = Realtime(name, {**env, "PARLEY_NODE_ID": name}, logdir)
            procs.append(replicas[name])
        web = Web({**env, "REALTIME_PUBLIC_URL": door.ws_url}, logdir)
        procs.append(web)
        worker = Worker("browser", env)
        for proc in procs:
            proc.wait_ready()
        worker.wait_ready()
        the_stack = Stack(web, replicas, worker, door, env, logdir, Api(web.url))
        the_stack.route_to(replicas["A"], replicas["B"])
        yield the_stack
    finally:
        if request.session.testsfailed and the_stack is not None:
            print(the_stack.tails())
        extra = the_stack.extra if the_stack is not None else []
        for proc in extra:
            proc.signal(signal.SIGKILL)
        stop_all([*procs, *extra])
        if worker is not None:
            worker.stop()
        door.stop()


@pytest.fixture(scope="package")
def chromium(stack):
    # After the stack (and its database) and closed before them: while Playwright runs,
    # this thread has an event loop, and Django's ORM refuses to run on it.
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def new_page(chromium, stack):
    """new_page(account=None, **context_options): a page in a fresh browser context,
    logged in as `account` when given. Every page's dialogs are recorded in
    page.dialogs (and dismissed); contexts are closed after the test."""
    contexts = []

    def make(account: Account | None = None, **options):
        options.setdefault("viewport", {"width": 1280, "height": 800})
        context = chromium.new_context(base_url=stack.url, **options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.dialogs = []

        def on_dialog(dialog):
            page.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.console_errors = []
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        if account is not None:
            login(page, account)
        return page

    yield make
    for context in contexts:
        with contextlib.suppress(Exception):
            context.close()
