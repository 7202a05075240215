"""`parley migrate` is safe to run from several pods at once."""

from __future__ import annotations

import os
import secrets

import psycopg
import pytest
from psycopg import sql

from parley.cli import MIGRATE_LOCK_KEY
from parley.embedded import ensure_database
from tests.cli.support import parley_env, with_database

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


@pytest.fixture
def fresh_database_url():
    """A new, empty database on the test run's server, dropped afterwards."""
    server = os.environ["DATABASE_URL"]
    name = f"parley_cli_migrate_{secrets.token_hex(4)}"
    url = with_database(server, name)
    ensure_database(url)
    try:
        yield url
    finally:
        with psycopg.connect(with_database(server, "postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def applied_migrations(url: str) -> set[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return set(conn.execute("SELECT app, name FROM django_migrations").fetchall())


def test_two_migrations_at_once_on_a_fresh_database_both_succeed(
    parley_processes, fresh_database_url
):
    env = parley_env(DATABASE_URL=fresh_database_url)
    runs = [parley_processes("migrate", "--noinput", env=env) for _ in range(2)]
    codes = [run.wait(180) for run in runs]

    outputs = "\n----\n".join(run.output for run in runs)
    assert codes == [0, 0], outputs
    # One applied each migration; the other found it done.
    assert outputs.count("Applying chat.0001_initial... OK") == 1, outputs
    assert ("chat", "0001_initial") in applied_migrations(fresh_database_url)
    check = parley_processes("manage", "migrate", "--check", env=env)
    assert check.wait(60) == 0, check.output  # nothing left unapplied


def test_migrate_waits_while_another_holds_the_lock(parley_processes, fresh_database_url):
    with psycopg.connect(fresh_database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [MIGRATE_LOCK_KEY])
        run = parley_processes(
            "migrate", "--noinput", env=parley_env(DATABASE_URL=fresh_database_url)
        )
        run.wait_for_line("another migration is running; waiting", 60)
        # Blocked on the lock: nothing applied while it is held.
        with pytest.raises(psycopg.errors.UndefinedTable):
            applied_migrations(fresh_database_url)
        assert run.proc.poll() is None
        holder.execute("SELECT pg_advisory_unlock(%s)", [MIGRATE_LOCK_KEY])
        assert run.wait(120) == 0, run.output
    assert ("chat", "0001_initial") in applied_migrations(fresh_database_url)
