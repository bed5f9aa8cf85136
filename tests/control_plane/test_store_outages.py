"""The job store through transient database errors, caused for real: PostgreSQL connections terminated
mid-call, commits whose answer never arrives (through a TCP proxy), and SQLite files locked by another
connection. Each test checks that the error really happened, so that it would fail without the retries."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psycopg
import pytest
import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from tcp_proxy import TcpProxy

from stillhouse.common import database
from stillhouse.common.database_retry import DatabaseUnavailable, RetryPolicy
from stillhouse.common.job_phases import Phase, Stage, StepState
from stillhouse.control_plane import store as store_module
from stillhouse.control_plane.store import JobStore

DOCUMENT = {"spec": {"teacher": {"model": "deepseek-chat", "sampling": {"temperature": 0.7}}}}
TERMINATE_OTHERS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
LOCK_WAITERS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


async def new_job(store: JobStore, job_id: str = "job-1"):
    return await store.create_job(job_id, "bot", DOCUMENT, {}, owner="alice", tenant="team-a")


async def phase_events(store: JobStore, job_id: str = "job-1") -> list[str]:
    return [event.data["phase"] for event in await store.events_after(job_id) if event.type == "phase"]


async def eventually(condition: Callable[[], Awaitable[object]], what: str, timeout: float = 20.0):
    """Poll `condition` until it returns something truthy, and return that."""
    try:
        async with asyncio.timeout(timeout):
            while not (value := await condition()):
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None
    return value


# --- PostgreSQL: terminated connections -----------------------------------------------------------


@pytest.fixture
async def pg_store(postgres_database_url: str) -> AsyncIterator[JobStore]:
    store = await JobStore.open(postgres_database_url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def admin(postgres_database_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """A second connection to the store's database, to terminate the store's connections from."""
    connection = await psycopg.AsyncConnection.connect(postgres_database_url, autocommit=True)
    try:
        yield connection
    finally:
        await connection.close()


async def terminate(admin: psycopg.AsyncConnection, query: str = TERMINATE_OTHERS) -> int:
    """Terminate backends; how many were."""
    return sum(1 for (terminated,) in await (await admin.execute(query)).fetchall() if terminated)


async def test_calls_after_the_connections_were_terminated_succeed(
    pg_store: JobStore, admin: psycopg.AsyncConnection
) -> None:
    # The pool checks a connection before lending it (pool_pre_ping) and replaces a dead one, so this
    # holds without retries too; the mid-call tests below are the ones the retries are for.
    await new_job(pg_store)
    for _ in range(3):
        assert await terminate(admin) >= 1  # the store's pooled connection, at least
        assert (await pg_store.get_job("job-1")).phase is Phase.PENDING
        await pg_store.append_event("job-1", "progress", {})
    assert len(await pg_store.events_after("job-1")) == 4


WRITES = {
    "set_phase": lambda store: store.set_phase("job-1", Phase.PROMPTS),
    "append_event": lambda store: store.append_event("job-1", "progress", {"done": 1}),
    "request_cancel": lambda store: store.request_cancel("job-1"),
}


@pytest.mark.parametrize("write", WRITES)
async def test_a_write_whose_connection_is_terminated_mid_call_is_done_once(
    pg_store: JobStore, admin: psycopg.AsyncConnection, postgres_database_url: str, write: str
) -> None:
    await new_job(pg_store)
    locker = await psycopg.AsyncConnection.connect(postgres_database_url)
    try:
        # The job's row stays locked, so the write waits inside its transaction until it is killed there.
        await locker.execute("SELECT 1 FROM jobs WHERE id = 'job-1' FOR UPDATE")
        writing = asyncio.create_task(WRITES[write](pg_store))
        [(waiter,)] = await eventually(
            lambda: _fetchall(admin, LOCK_WAITERS), "the write to wait for the row lock"
        )
        assert await terminate(admin, f"SELECT pg_terminate_backend({waiter})") == 1
        # The write came back on a new connection (the terminated one cannot wait any more).
        await eventually(
            lambda: _other_lock_waiter(admin, waiter), "the retried write to wait for the row lock"
        )
        assert not writing.done()
    finally:
        await locker.rollback()
        await locker.close()
    await writing

    job = await pg_store.get_job("job-1")
    events = await pg_store.events_after("job-1")
    if write == "set_phase":
        assert job.phase is Phase.PROMPTS
        assert await phase_events(pg_store) == ["Pending", "Prompts"]
    elif write == "append_event":
        assert [event.data for event in events if event.type == "progress"] == [{"done": 1}]
    else:
        assert job.cancel_requested


async def _fetchall(admin: psycopg.AsyncConnection, query: str) -> list[tuple]:
    return await (await admin.execute(query)).fetchall()


async def _other_lock_waiter(admin: psycopg.AsyncConnection, pid: int) -> bool:
    return any(waiter != pid for (waiter,) in await _fetchall(admin, LOCK_WAITERS))


# --- PostgreSQL: a commit whose answer is lost ----------------------------------------------------


async def _finish_prompts(store: JobStore):
    return await store.finish_step("job-1", Stage.PROMPTS, StepState.SUCCEEDED, result={"rows": 90})


LOST_ANSWER_WRITES = {
    "create_job": (lambda store: new_job(store, "job-2"), lambda record: record.id == "job-2"),
    "set_phase": (
        lambda store: store.set_phase("job-1", Phase.PROMPTS, "now"),
        lambda record: (record.phase, record.message) == (Phase.PROMPTS, "now"),
    ),
    "begin_step": (
        lambda store: store.begin_step("job-1", Stage.TEACHER, "op-teacher"),
        lambda step: (step.state, step.attempt, step.operation_id) == (StepState.RUNNING, 1, "op-teacher"),
    ),
    "finish_step": (_finish_prompts, lambda step: step.state is StepState.SUCCEEDED),
}


@pytest.mark.parametrize("write", LOST_ANSWER_WRITES)
async def test_a_write_whose_commit_answer_is_lost_is_done_once_and_answered(
    postgres_database_url: str, write: str
) -> None:
    url = make_url(postgres_database_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        # Plain text on the wire, so that the proxy can see the COMMIT go by.
        proxied = url.set(port=proxy.port, query={"sslmode": "disable"})
        store = await JobStore.open(proxied.render_as_string(hide_password=False))
        try:
            await new_job(store)
            await store.begin_step("job-1", Stage.PROMPTS, "op-prompts")
            before = await store.events_after("job-1")
            call, expected = LOST_ANSWER_WRITES[write]

            proxy.lose_next_commit_answer()
            answer = await call(store)

            assert proxy.lost_commit_answers == 1
            assert expected(answer)
            if write == "create_job":
                assert await store.get_job("job-2") == answer
                assert await phase_events(store, "job-2") == ["Pending"]
            elif write == "set_phase":
                assert await store.get_job("job-1") == answer
                assert await phase_events(store) == ["Pending", "Prompts"]
            else:
                assert await store.get_step("job-1", answer.stage) == answer
            if write != "set_phase":
                assert await store.events_after("job-1") == before
        finally:
            await store.close()


# --- PostgreSQL: a replica cut off in the middle of a write ----------------------------------------


async def test_a_replica_cut_off_in_the_middle_of_a_write_does_not_hold_up_another_replicas_writes(
    pg_store: JobStore, postgres_database_url: str, admin: psycopg.AsyncConnection
) -> None:
    """Its UPDATE done and its COMMIT lost, the replica's transaction holds the job's row lock; the server
    ends it once it idles past the store's limit, and the other replica's write of that row goes through."""
    await new_job(pg_store)
    url = make_url(postgres_database_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as network:
        proxied = url.set(port=network.port, query={"sslmode": "disable"})
        limit_ms = 1000
        replica = await JobStore.open(
            proxied.render_as_string(hide_password=False), idle_transaction_limit_ms=limit_ms
        )
        network.stall_at_next_commit()
        hanging = asyncio.ensure_future(replica.request_cancel("job-1"))
        try:
            await eventually(
                lambda: _idle_in_a_write(admin), "the replica's write to wait for its COMMIT", 10
            )
            job = await asyncio.wait_for(pg_store.set_phase("job-1", Phase.PROMPTS), limit_ms / 1000 * 5)
            assert job.phase is Phase.PROMPTS and not job.cancel_requested  # the cut-off write never landed
        finally:
            network.cut()
            hanging.cancel()
            await asyncio.gather(hanging, return_exceptions=True)
            await replica.close()


async def _idle_in_a_write(admin: psycopg.AsyncConnection) -> bool:
    """Whether a session of the database sits idle in its transaction, waiting for its client."""
    cursor = await admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND state = 'idle in transaction'"
    )
    return (await cursor.fetchone())[0] > 0


# --- SQLite: a file locked by another connection --------------------------------------------------


async def sqlite_store(path: Path, retry_seconds: float) -> JobStore:
    """A store whose connections give up on a lock after 50 ms (the default waits 30 s inside SQLite)."""
    url = f"sqlite:///{path}"
    await asyncio.to_thread(store_module.migrate, url)
    pragmas = ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=50")
    return JobStore(database.create_engine_for(url, pragmas), RetryPolicy(max_seconds=retry_seconds))


def exclusive_lock(path: Path) -> sqlite3.Connection:
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    return locker


async def test_an_sqlite_write_waits_for_a_lock_then_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = await sqlite_store(path, retry_seconds=30)
    try:
        await new_job(store)
        locker = exclusive_lock(path)
        try:
            with structlog.testing.capture_logs() as logs:
                moving = asyncio.create_task(store.set_phase("job-1", Phase.PROMPTS))

                async def retried() -> bool:
                    return any(entry["event"] == "database call failed, trying again" for entry in logs)

                await eventually(retried, "the write to meet the lock and try again")
                assert not moving.done()
        finally:
            locker.rollback()
            locker.close()
        assert (await moving).phase is Phase.PROMPTS
        assert all(entry["error"] == "OperationalError: database is locked" for entry in logs)
        assert await phase_events(store) == ["Pending", "Prompts"]
    finally:
        await store.close()


async def test_an_sqlite_lock_held_past_the_bound_fails_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = await sqlite_store(path, retry_seconds=1)
    try:
        await new_job(store)
        locker = exclusive_lock(path)
        try:
            with pytest.raises(DatabaseUnavailable) as failure:
                await store.set_phase("job-1", Phase.PROMPTS)
        finally:
            locker.rollback()
            locker.close()
        assert re.fullmatch(
            r"the database stayed unavailable to JobStore\._move_phase for \d+\.\d s \(\d+ attempts?\): "
            r"OperationalError: database is locked",
            str(failure.value),
        ), str(failure.value)
        assert isinstance(failure.value.__cause__, OperationalError)
        assert (await store.get_job("job-1")).phase is Phase.PENDING
    finally:
        await store.close()
