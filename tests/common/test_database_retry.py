"""Which database errors are transient, and the retry policy around them, on errors that real engines
raise against real PostgreSQL and SQLite databases."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import structlog
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import create_async_engine
from waiting import pick_free_port

from stillhouse.common.database import configure_sqlite, database_urls
from stillhouse.common.database_retry import DatabaseUnavailable, RetryPolicy, describe, is_transient
from stillhouse.common.job_phases import IllegalTransition, Phase
from stillhouse.control_plane.store import JobAlreadyExists, JobNotFound, StepNotFound


def raised(call: Callable[[], object]) -> BaseException:
    with pytest.raises(BaseException) as caught:
        call()
    return caught.value


@pytest.fixture
def postgres(postgres_database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_urls(postgres_database_url)[1])
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id integer PRIMARY KEY, n integer)"))
        connection.execute(text("INSERT INTO t VALUES (1, 0)"))
    yield engine
    engine.dispose()


def test_a_terminated_postgres_connection_is_transient(postgres: Engine) -> None:
    with postgres.connect() as victim, postgres.connect() as admin:
        pid = victim.execute(text("SELECT pg_backend_pid()")).scalar_one()
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        error = raised(lambda: victim.execute(text("SELECT 1")))
    assert isinstance(error, DBAPIError) and error.connection_invalidated
    assert is_transient(error)


def test_a_refused_postgres_connection_is_transient() -> None:
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{pick_free_port()}/nothing")
    error = raised(engine.connect)
    engine.dispose()
    assert "Connection refused" in str(error)
    assert is_transient(error)


def test_postgres_conflicts_that_pass_are_transient(postgres: Engine) -> None:
    with postgres.connect() as first, postgres.connect() as second:
        # A row lock asked for without waiting.
        first.execute(text("SELECT * FROM t WHERE id = 1 FOR UPDATE"))
        locked = raised(lambda: second.execute(text("SELECT * FROM t WHERE id = 1 FOR UPDATE NOWAIT")))
        first.rollback()
        second.rollback()
        # Two serializable transactions that each read what the other writes: the second commit loses.
        for connection in (first, second):
            connection.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
            connection.execute(text("SELECT sum(n) FROM t")).scalar_one()
        first.execute(text("INSERT INTO t VALUES (2, 1)"))
        second.execute(text("INSERT INTO t VALUES (3, 1)"))
        first.commit()
        conflict = raised(second.commit)
    assert isinstance(locked.orig, psycopg.errors.LockNotAvailable)
    assert isinstance(conflict.orig, psycopg.errors.SerializationFailure)
    assert is_transient(locked) and is_transient(conflict)


def test_postgres_errors_of_the_statement_are_not_transient(postgres: Engine) -> None:
    with postgres.connect() as connection:
        duplicate = raised(lambda: connection.execute(text("INSERT INTO t VALUES (1, 0)")))
        connection.rollback()
        no_table = raised(lambda: connection.execute(text("SELECT * FROM nowhere")))
        connection.rollback()
        division = raised(lambda: connection.execute(text("SELECT 1 / 0")))
    assert isinstance(duplicate, IntegrityError)
    assert isinstance(no_table, ProgrammingError)
    assert not any(is_transient(error) for error in (duplicate, no_table, division))


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[tuple[Engine, Path]]:
    path = tmp_path / "t.db"
    engine = create_engine(f"sqlite:///{path}")
    configure_sqlite(engine, str(path), ("journal_mode=WAL", "busy_timeout=0"))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id integer PRIMARY KEY)"))
    yield engine, path
    engine.dispose()


def test_a_locked_sqlite_file_is_transient_and_its_other_errors_are_not(sqlite: tuple[Engine, Path]) -> None:
    engine, path = sqlite
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with engine.connect() as connection:
            locked = raised(lambda: connection.execute(text("INSERT INTO t VALUES (1)")))
    finally:
        locker.rollback()
        locker.close()
    with engine.connect() as connection:
        connection.execute(text("INSERT INTO t VALUES (1)"))
        duplicate = raised(lambda: connection.execute(text("INSERT INTO t VALUES (1)")))
        # Also an OperationalError to SQLite and to SQLAlchemy, but about the statement.
        no_table = raised(lambda: connection.execute(text("SELECT * FROM nowhere")))
    assert describe(locked) == "OperationalError: database is locked"
    assert is_transient(locked)
    assert describe(no_table) == "OperationalError: no such table: nowhere"
    assert not is_transient(duplicate) and not is_transient(no_table)


def test_errors_of_the_store_and_others_are_not_transient() -> None:
    for error in (
        JobNotFound("j"),
        JobAlreadyExists("j"),
        StepNotFound("j", "prompts"),
        IllegalTransition(Phase.FAILED, Phase.PROMPTS),
        ValueError("invalid page token"),
        ConnectionError("not the database's"),
    ):
        assert not is_transient(error), error
    assert is_transient(DatabaseUnavailable("a call that gave up is transient to its caller"))


# --- the retry policy -----------------------------------------------------------------------------


@pytest.fixture
def locked_error(sqlite: tuple[Engine, Path]) -> DBAPIError:
    engine, path = sqlite
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with engine.connect() as connection:
            error = raised(lambda: connection.execute(text("INSERT INTO t VALUES (1)")))
    finally:
        locker.rollback()
        locker.close()
    assert isinstance(error, DBAPIError)
    return error


QUICK = RetryPolicy(max_seconds=30, first_wait_seconds=0.001, max_wait_seconds=0.01)


async def test_transient_errors_are_tried_again_and_logged(locked_error: DBAPIError) -> None:
    attempts = []

    async def flaky() -> str:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise locked_error
        return "done"

    with structlog.testing.capture_logs() as logs:
        assert await QUICK.retrying("flaky")(flaky) == "done"
    assert len(attempts) == 3
    assert [(entry["event"], entry["call"], entry["attempt"]) for entry in logs] == [
        ("database call failed, trying again", "flaky", 1),
        ("database call failed, trying again", "flaky", 2),
    ]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["error"] == "OperationalError: database is locked"


async def test_other_errors_are_raised_at_once(sqlite: tuple[Engine, Path]) -> None:
    attempts = []

    async def broken() -> None:
        attempts.append(1)
        with sqlite[0].connect() as connection:
            connection.execute(text("SELECT * FROM nowhere"))

    with pytest.raises(DBAPIError, match="no such table"):
        await QUICK.retrying("broken")(broken)
    assert attempts == [1]


async def test_giving_up_names_the_call_and_the_last_error_without_the_password() -> None:
    engine = create_async_engine(
        f"postgresql+psycopg://stillhouse:s3cret-password@127.0.0.1:{pick_free_port()}/jobs"
    )

    async def connect() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    policy = RetryPolicy(max_seconds=0.3, first_wait_seconds=0.01, max_wait_seconds=0.05)
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(DatabaseUnavailable) as failure:
            await policy.retrying("JobStore.get_job")(connect)
    finally:
        await engine.dispose()
    message = str(failure.value)
    assert message.startswith("the database stayed unavailable to JobStore.get_job for ")
    assert message.endswith("Connection refused")
    assert isinstance(failure.value.__cause__, DBAPIError)
    assert logs  # it was tried more than once
    assert "s3cret" not in message and "s3cret" not in repr(logs)


async def test_a_policy_of_zero_seconds_tries_once(locked_error: DBAPIError) -> None:
    attempts = []

    async def locked() -> None:
        attempts.append(1)
        raise locked_error

    with pytest.raises(DatabaseUnavailable, match=r"\(1 attempt\): OperationalError: database is locked"):
        await RetryPolicy(max_seconds=0).retrying("locked")(locked)
    assert attempts == [1]
