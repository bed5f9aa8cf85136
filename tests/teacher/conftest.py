"""Fixtures for teacher tests: databases for the cache, and a fake OpenAI-compatible server.

Every cache test runs on SQLite and on PostgreSQL. PostgreSQL is not optional: CI starts a server,
and a test that cannot reach it fails rather than skips, so a missing server never passes for a green
run. Point the tests at another server with STILLHOUSE_TEST_POSTGRES_URL (a database the user may
connect to and run CREATE DATABASE from).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

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


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database, once per kind the teacher cache supports."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'teacher' / 'cache.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


# --- a fake OpenAI-compatible server ---------------------------------------------------------------

FAKE_OPENAI = Path(__file__).with_name("fake_openai.py")


@dataclass
class FakeOpenAI:
    """The server in fake_openai.py, running as its own process; see that file for its behaviours."""

    port: int

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def control(self, **script: object) -> None:
        """Queue a behaviour (`mode=...`) and/or change settings (`api_key`, `flavor`, ...)."""
        httpx.post(f"{self.root}/_control", json=script, timeout=5).raise_for_status()

    def calls(self) -> dict:
        return httpx.get(f"{self.root}/_calls", timeout=5).json()

    def reset(self) -> None:
        httpx.post(f"{self.root}/_reset", timeout=5).raise_for_status()

    def vocab(self) -> list[str]:
        return httpx.get(f"{self.root}/_vocab", timeout=5).json()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def fake_openai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeOpenAI]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = FakeOpenAI(port)
    log_path = tmp_path_factory.mktemp("fake-openai") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(FAKE_OPENAI), str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{server.root}/_calls"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the fake OpenAI server did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def fake_openai(fake_openai_server: FakeOpenAI) -> FakeOpenAI:
    """The session's fake server, with no calls counted, no behaviours queued and default settings."""
    fake_openai_server.reset()
    return fake_openai_server
