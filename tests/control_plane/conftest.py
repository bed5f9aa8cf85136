"""Databases for control-plane tests: every store test runs on SQLite and on PostgreSQL.

PostgreSQL is not optional: CI starts a server, and a test that cannot reach it fails rather than
skips, so a missing server never passes for a green run. Point the tests at another server with
STILLHOUSE_TEST_POSTGRES_URL (a database the user may connect to and run CREATE DATABASE from).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from stillhouse.control_plane.store import JobStore

POSTGRES_ADMIN_URL = os.environ.get(
    "STILLHOUSE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _libpq_url(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(_libpq_url(POSTGRES_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        problem = str(error).strip()
    where = make_url(POSTGRES_ADMIN_URL).render_as_string(hide_password=True)
    pytest.fail(
        f"PostgreSQL is not reachable at {where}: start it, or point STILLHOUSE_TEST_POSTGRES_URL "
        f"at a server where CREATE DATABASE is allowed ({problem})",
        pytrace=False,
    )


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards; yields its URL."""
    name = f"stillhouse_test_{secrets.token_hex(6)}"
    with _admin_connection() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _libpq_url(POSTGRES_ADMIN_URL, database=name)
    finally:
        with _admin_connection() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def sqlite_database(folder: Path) -> str:
    return f"sqlite:///{folder / 'control-plane' / 'jobs.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database, once per kind the job store supports."""
    if request.param == "sqlite":
        yield sqlite_database(tmp_path)
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[JobStore]:
    """A migrated job store on an empty database."""
    job_store = await JobStore.open(database_url)
    try:
        yield job_store
    finally:
        await job_store.close()
