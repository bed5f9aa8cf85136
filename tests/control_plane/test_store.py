"""The job store, on SQLite and PostgreSQL alike (see the `store` fixture)."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from datetime import UTC

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError, OperationalError

from stillhouse.common.database import database_urls
from stillhouse.common.job_phases import IllegalTransition, Phase, Stage
from stillhouse.control_plane import store as store_module
from stillhouse.control_plane.store import (
    Base,
    JobAlreadyExists,
    JobNotFound,
    JobRecord,
    JobStore,
    StepNotFound,
    StepState,
    alembic_config,
)

DOCUMENT = {
    "apiVersion": "stillhouse.dev/v1",
    "kind": "DistillationJob",
    "metadata": {"name": "support-bot-small"},
    "spec": {
        "teacher": {"model": "deepseek-chat", "sampling": {"temperature": 0.7, "maxTokens": 512}},
        "student": {"init": {"pretrained": "s3://stillhouse/models/qwen2.5-0.5b"}},
        "prompts": {"sources": [{"inline": ["héllo ☕", "wie geht's?"]}], "seed": None},
    },
}


async def new_job(store: JobStore, job_id: str = "job-1") -> JobRecord:
    return await store.create_job(
        job_id, "support-bot-small", DOCUMENT, {"team": "support"}, owner="alice", tenant="team-a"
    )


async def phase_events(store: JobStore, job_id: str) -> list[tuple[str, str | None]]:
    events = await store.events_after(job_id)
    return [(event.data["phase"], event.data["message"]) for event in events if event.type == "phase"]


# Schema and connections


async def test_migrations_bring_an_empty_database_to_head(database_url: str) -> None:
    for _ in range(2):  # a restarted control plane finds the schema already there
        await (await JobStore.open(database_url)).close()

    engine = create_engine(database_urls(database_url)[1])
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert context.get_current_revision() == head == "0003"
        # The ORM tables and the migrations describe the same schema.
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


async def test_sqlite_file_is_made_for_two_processes(tmp_path) -> None:
    path = tmp_path / "not" / "yet" / "there.db"
    first = await JobStore.open(f"sqlite:///{path}")
    second = await JobStore.open(f"sqlite+aiosqlite:///{path}")
    try:
        await new_job(first)
        assert (await second.get_job("job-1")).name == "support-bot-small"
    finally:
        await first.close()
        await second.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_database_urls_pick_one_driver_per_database() -> None:
    def drivers(url: str) -> tuple[str, str]:
        async_url, sync_url = database_urls(url)
        return async_url.drivername, sync_url.drivername

    assert drivers("sqlite:///a/b.db") == ("sqlite+aiosqlite", "sqlite")
    assert drivers("sqlite+aiosqlite:////abs/b.db") == ("sqlite+aiosqlite", "sqlite")
    assert drivers("postgresql://u@h:5432/db") == ("postgresql+psycopg", "postgresql+psycopg")
    assert drivers("postgresql+psycopg://u:p@h/db") == ("postgresql+psycopg", "postgresql+psycopg")
    with pytest.raises(ValueError, match=r"'mysql\+pymysql' is not supported; use one of sqlite, "):
        database_urls("mysql+pymysql://u@h/db")
    with pytest.raises(ValueError, match="'postgresql\\+asyncpg' is not supported"):
        database_urls("postgresql+asyncpg://u@h/db")
    with pytest.raises(ValueError, match="in-memory"):
        database_urls("sqlite://")
    with pytest.raises(ValueError, match="not a URL"):
        database_urls("jobs.db")


async def test_ping_and_an_unreachable_server(store: JobStore) -> None:
    await store.ping()
    with pytest.raises(OperationalError):
        await JobStore.open("postgresql://postgres@127.0.0.1:1/nothing")


# Jobs


async def test_create_and_get_keep_the_document_as_given(store: JobStore) -> None:
    created = await new_job(store)
    fetched = await store.get_job("job-1")

    assert fetched == created
    assert fetched.document == DOCUMENT
    assert list(fetched.document["spec"]) == list(DOCUMENT["spec"])  # key order survives
    assert fetched.labels == {"team": "support"}
    assert (fetched.phase, fetched.message, fetched.cancel_requested) == (Phase.PENDING, None, False)
    assert fetched.created_at.tzinfo == UTC
    assert fetched.created_at == fetched.updated_at
    assert await phase_events(store, "job-1") == [("Pending", None)]


async def test_unknown_jobs_are_named_in_the_error(store: JobStore) -> None:
    calls = (
        lambda: store.get_job("nope"),
        lambda: store.set_phase("nope", Phase.PROMPTS),
        lambda: store.request_cancel("nope"),
        lambda: store.begin_step("nope", Stage.PROMPTS, "op-1"),
        lambda: store.append_event("nope", "progress", {}),
    )
    for call in calls:
        with pytest.raises(JobNotFound, match="'nope'"):
            await call()


async def test_job_ids_are_unique_and_short(store: JobStore) -> None:
    await new_job(store)
    with pytest.raises(JobAlreadyExists, match="'job-1'"):
        await new_job(store)
    with pytest.raises(ValueError, match="1 to 64 characters"):
        await new_job(store, "x" * 65)
    assert len(await store.events_after("job-1")) == 1  # the refused duplicate left no event


async def test_list_newest_first_in_pages_without_gaps(store: JobStore) -> None:
    ids = [f"job-{number}" for number in range(7)]
    for job_id in ids:
        await new_job(store, job_id)
    for job_id in ids[::2]:
        await store.set_phase(job_id, Phase.PROMPTS)

    seen, token, pages = [], None, 0
    while True:
        jobs, token = await store.list_jobs(limit=3, page_token=token)
        seen += [job.id for job in jobs]
        pages += 1
        if token is None:
            break
    assert pages == 3
    assert seen == ids[::-1]

    prompts, token = await store.list_jobs(phase=Phase.PROMPTS, limit=3)
    assert [job.id for job in prompts] == ["job-6", "job-4", "job-2"]
    rest, token = await store.list_jobs(phase=Phase.PROMPTS, limit=3, page_token=token)
    assert ([job.id for job in rest], token) == (["job-0"], None)
    assert await store.list_jobs(phase=Phase.FAILED) == ([], None)


@pytest.mark.parametrize(
    "token",
    [
        "not base64!",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b'{"created": 1}').decode(),
        base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", "job-1"]').decode(),  # no time zone
        base64.urlsafe_b64encode(b'["yesterday", "job-1"]').decode(),
    ],
)
async def test_a_malformed_page_token_is_refused(store: JobStore, token: str) -> None:
    with pytest.raises(ValueError, match="invalid page token"):
        await store.list_jobs(page_token=token)


async def test_set_phase_walks_the_pipeline_and_records_each_step(store: JobStore) -> None:
    created = await new_job(store)
    pipeline = [Phase.PROMPTS, Phase.TEACHER, Phase.TRAINING, Phase.EVALUATING, Phase.SUCCEEDED]
    for phase in pipeline:
        job = await store.set_phase("job-1", phase, message=f"now {phase}")
    assert (job.phase, job.message) == (Phase.SUCCEEDED, "now Succeeded")
    assert job.updated_at > created.updated_at
    assert await store.get_job("job-1") == job
    assert await phase_events(store, "job-1") == [("Pending", None)] + [(p, f"now {p}") for p in pipeline]


async def test_illegal_transitions_change_nothing(store: JobStore) -> None:
    await new_job(store)
    with pytest.raises(IllegalTransition) as refused:
        await store.set_phase("job-1", Phase.TRAINING)
    assert (refused.value.current, refused.value.target) == (Phase.PENDING, Phase.TRAINING)

    failed = await store.set_phase("job-1", Phase.FAILED, message="teacher unreachable")
    assert failed.message == "teacher unreachable"
    for target in (Phase.PROMPTS, Phase.FAILED, Phase.CANCELLED):
        with pytest.raises(IllegalTransition):
            await store.set_phase("job-1", target)
    assert await store.get_job("job-1") == failed
    assert await phase_events(store, "job-1") == [("Pending", None), ("Failed", "teacher unreachable")]


async def test_cancel_is_requested_until_the_job_has_ended(store: JobStore) -> None:
    await new_job(store)
    assert (await store.request_cancel("job-1")).cancel_requested
    assert (await store.request_cancel("job-1")).cancel_requested  # idempotent
    await store.set_phase("job-1", Phase.CANCELLED)

    await new_job(store, "job-2")
    await store.set_phase("job-2", Phase.PROMPTS)
    await store.set_phase("job-2", Phase.FAILED)
    for job_id, phase in (("job-1", Phase.CANCELLED), ("job-2", Phase.FAILED)):
        with pytest.raises(IllegalTransition) as refused:
            await store.request_cancel(job_id)
        assert (refused.value.current, refused.value.target) == (phase, Phase.CANCELLED)
    assert not (await store.get_job("job-2")).cancel_requested


async def test_unfinished_jobs_oldest_first(store: JobStore) -> None:
    for job_id in ("a", "b", "c", "d"):
        await new_job(store, job_id)
    await store.set_phase("b", Phase.CANCELLED)
    await store.set_phase("c", Phase.PROMPTS)
    assert [job.id for job in await store.unfinished_jobs()] == ["a", "c", "d"]


async def test_concurrent_moves_from_one_phase_let_exactly_one_win(
    store: JobStore, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two stores, as an API and an orchestrator in separate processes would have.
    other = await JobStore.open(database_url)
    seen_by_writers: list[Phase] = []
    real_check = store_module.check_transition

    def recording_check(current: Phase, target: Phase) -> None:
        seen_by_writers.append(current)
        real_check(current, target)

    monkeypatch.setattr(store_module, "check_transition", recording_check)
    try:
        for round_ in range(5):
            job_id = f"race-{round_}"
            await new_job(store, job_id)
            outcomes = await asyncio.gather(
                store.set_phase(job_id, Phase.PROMPTS, message="a"),
                other.set_phase(job_id, Phase.PROMPTS, message="b"),
                return_exceptions=True,
            )
            winners = [outcome for outcome in outcomes if isinstance(outcome, JobRecord)]
            losers = [outcome for outcome in outcomes if isinstance(outcome, IllegalTransition)]
            assert len(winners) == 1 and len(losers) == 1, outcomes
            assert (losers[0].current, losers[0].target) == (Phase.PROMPTS, Phase.PROMPTS)
            assert await phase_events(store, job_id) == [("Pending", None), ("Prompts", winners[0].message)]
    finally:
        await other.close()
    # Both writers read Pending before either wrote, at least once: the database had to decide.
    assert seen_by_writers.count(Phase.PENDING) > 5


# Steps


async def test_begin_step_is_idempotent_while_running_and_retries_after_failure(store: JobStore) -> None:
    await new_job(store)
    assert await store.get_step("job-1", Stage.PROMPTS) is None

    first = await store.begin_step("job-1", Stage.PROMPTS, "op-1")
    assert (first.state, first.attempt, first.operation_id, first.finished_at) == (
        StepState.RUNNING,
        1,
        "op-1",
        None,
    )
    assert await store.begin_step("job-1", Stage.PROMPTS, "op-other") == first

    failed = await store.finish_step("job-1", Stage.PROMPTS, StepState.FAILED, error="teacher said 500")
    assert (failed.state, failed.error) == (StepState.FAILED, "teacher said 500")
    assert failed.finished_at is not None and failed.finished_at >= failed.started_at

    second = await store.begin_step("job-1", Stage.PROMPTS, "op-2")
    assert (second.state, second.attempt, second.operation_id) == (StepState.RUNNING, 2, "op-2")
    assert (second.error, second.finished_at) == (None, None)

    done = await store.finish_step("job-1", Stage.PROMPTS, StepState.SUCCEEDED, result={"dataset": "d1"})
    assert (done.state, done.result, done.attempt) == (StepState.SUCCEEDED, {"dataset": "d1"}, 2)
    assert await store.get_step("job-1", Stage.PROMPTS) == done

    with pytest.raises(ValueError, match="already succeeded"):
        await store.begin_step("job-1", Stage.PROMPTS, "op-3")
    with pytest.raises(ValueError, match="already succeeded"):
        await store.finish_step("job-1", Stage.PROMPTS, StepState.FAILED)
    with pytest.raises(ValueError, match="not running"):
        await store.finish_step("job-1", Stage.PROMPTS, StepState.RUNNING)
    with pytest.raises(StepNotFound, match="no teacher step"):
        await store.finish_step("job-1", Stage.TEACHER, StepState.SUCCEEDED)


async def test_a_cancelled_step_can_start_again(store: JobStore) -> None:
    await new_job(store)
    await store.begin_step("job-1", Stage.TRAIN, "op-1")
    await store.finish_step("job-1", Stage.TRAIN, StepState.CANCELLED)
    again = await store.begin_step("job-1", Stage.TRAIN, "op-2")
    assert (again.state, again.attempt) == (StepState.RUNNING, 2)


async def test_concurrent_begin_step_starts_one_operation(store: JobStore, database_url: str) -> None:
    await new_job(store)
    other = await JobStore.open(database_url)
    try:
        steps = await asyncio.gather(
            store.begin_step("job-1", Stage.TEACHER, "op-a"),
            other.begin_step("job-1", Stage.TEACHER, "op-b"),
        )
    finally:
        await other.close()
    assert steps[0] == steps[1]
    assert steps[0].attempt == 1


async def test_operation_ids_are_unique_across_steps(store: JobStore) -> None:
    await new_job(store)
    await store.begin_step("job-1", Stage.PROMPTS, "op-1")
    with pytest.raises(IntegrityError):
        await store.begin_step("job-1", Stage.TEACHER, "op-1")


async def test_steps_come_in_pipeline_order(store: JobStore) -> None:
    await new_job(store)
    await new_job(store, "job-2")
    for stage in (Stage.EVALUATE, Stage.PROMPTS, Stage.TRAIN, Stage.TEACHER):
        await store.begin_step("job-1", stage, f"op-{stage}")
    await store.begin_step("job-2", Stage.PROMPTS, "op-other-job")

    steps = await store.steps("job-1")
    assert [step.stage for step in steps] == [Stage.PROMPTS, Stage.TEACHER, Stage.TRAIN, Stage.EVALUATE]
    assert await store.steps("no-such-job") == []


# Events


async def test_events_after_pages_through_one_job(store: JobStore) -> None:
    await new_job(store)
    await new_job(store, "job-2")
    appended = [await store.append_event("job-1", "progress", {"done": n}) for n in range(5)]
    await store.append_event("job-2", "progress", {"done": 99})

    assert [event.id for event in appended] == sorted(event.id for event in appended)
    everything = await store.events_after("job-1")
    assert [event.type for event in everything] == ["phase"] + ["progress"] * 5
    assert everything[1:] == appended

    first = await store.events_after("job-1", limit=4)
    rest = await store.events_after("job-1", after_id=first[-1].id, limit=4)
    assert first + rest == everything
    assert await store.events_after("job-1", after_id=everything[-1].id) == []
    assert appended[0].created_at.tzinfo == UTC
