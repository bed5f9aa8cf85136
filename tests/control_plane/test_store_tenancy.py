"""The job store's tenancy: owned jobs, quota admission, deletion and the audit log, on SQLite and
PostgreSQL alike (see the `store` fixture)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from stillhouse.common.database import database_urls
from stillhouse.common.job_phases import Phase, Stage
from stillhouse.control_plane.store import (
    JobNotFinished,
    JobNotFound,
    JobStore,
    StepState,
    TenantUsage,
    alembic_config,
)

DOCUMENT = {"spec": {"teacher": {"model": "deepseek-chat", "budgetUSD": 5}}}


class Refused(Exception):
    pass


async def new_job(store: JobStore, job_id: str, tenant: str = "team-a", owner: str = "alice", **admission):
    return await store.create_job(job_id, job_id, DOCUMENT, {}, owner=owner, tenant=tenant, **admission)


async def test_jobs_keep_their_owner_and_tenant_and_list_by_tenant(store: JobStore) -> None:
    await new_job(store, "a-1")
    await new_job(store, "b-1", tenant="team-b", owner="bob")
    await new_job(store, "a-2")

    assert (await store.get_job("b-1")).tenant == "team-b"
    assert (await store.get_job("b-1")).owner == "bob"
    team_a, token = await store.list_jobs(tenant="team-a", limit=1)
    rest, end = await store.list_jobs(tenant="team-a", limit=1, page_token=token)
    assert [job.id for job in team_a + rest] == ["a-2", "a-1"] and end is None
    assert [job.id for job in (await store.list_jobs())[0]] == ["a-2", "b-1", "a-1"]
    assert await store.list_jobs(tenant="team-c") == ([], None)


async def test_admission_sees_the_tenants_usage_and_can_refuse(store: JobStore) -> None:
    await new_job(store, "a-1")
    await store.set_phase("a-1", Phase.PROMPTS)
    await store.begin_step("a-1", Stage.PROMPTS, "op-a-1")
    await store.append_event("a-1", "progress", {"stage": "prompts", "metrics": {"cost_usd": 0.5}})
    await store.append_event("a-1", "progress", {"stage": "prompts", "metrics": {"cost_usd": 0.75}})
    await new_job(store, "a-old")
    await store.set_phase("a-old", Phase.CANCELLED)
    await new_job(store, "b-1", tenant="team-b")
    seen: list[TenantUsage] = []

    def refuse(usage: TenantUsage) -> None:
        seen.append(usage)
        raise Refused

    with pytest.raises(Refused):
        await new_job(store, "a-2", admit=refuse, usage_since=datetime.now(UTC) - timedelta(hours=1))

    usage = seen[0]
    assert usage.unfinished_jobs == 1  # a-1; a-old has ended, b-1 is another tenant's
    by_id = {activity.job.id: activity for activity in usage.jobs_since}
    assert set(by_id) == {"a-1", "a-old"}
    assert [step.stage for step in by_id["a-1"].steps] == [Stage.PROMPTS]
    assert by_id["a-1"].last_progress.data["metrics"] == {"cost_usd": 0.75}
    assert by_id["a-old"].last_progress is None
    with pytest.raises(JobNotFound):
        await store.get_job("a-2")  # refused: not stored

    admitted = await new_job(store, "a-3", admit=lambda usage: None, usage_since=datetime.now(UTC))
    assert admitted.phase is Phase.PENDING


async def test_concurrent_submits_cannot_both_take_the_last_place(store: JobStore) -> None:
    def at_most_two(usage: TenantUsage) -> None:
        if usage.unfinished_jobs >= 2:
            raise Refused

    outcomes = await asyncio.gather(
        *(new_job(store, f"a-{number}", admit=at_most_two) for number in range(6)), return_exceptions=True
    )

    admitted = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    assert len(admitted) == 2
    assert all(isinstance(outcome, Refused) for outcome in outcomes if outcome not in admitted)
    assert len((await store.list_jobs(tenant="team-a"))[0]) == 2


async def test_a_finished_job_is_deleted_with_its_steps_and_events(store: JobStore) -> None:
    for job_id in ("job-1", "job-2"):
        await new_job(store, job_id)
        await store.set_phase(job_id, Phase.PROMPTS)
        await store.begin_step(job_id, Stage.PROMPTS, f"{job_id}.prompts.1")
        await store.append_event(job_id, "progress", {"stage": "prompts"})
    with pytest.raises(JobNotFinished, match="'job-1' is Prompts"):
        await store.delete_job("job-1")

    await store.finish_step("job-1", Stage.PROMPTS, StepState.CANCELLED)
    await store.set_phase("job-1", Phase.CANCELLED)
    await store.delete_job("job-1")

    with pytest.raises(JobNotFound):
        await store.get_job("job-1")
    with pytest.raises(JobNotFound):
        await store.delete_job("job-1")
    assert await store.steps("job-1") == [] and await store.events_after("job-1") == []
    assert len(await store.steps("job-2")) == 1 and len(await store.events_after("job-2")) == 3
    # The operation id of the deleted step is free again: nothing of the job is left behind.
    await new_job(store, "job-1")
    await store.begin_step("job-1", Stage.PROMPTS, "job-1.prompts.1")


async def test_finished_before_finds_jobs_that_ended_long_enough_ago(store: JobStore) -> None:
    for job_id in ("ended", "running"):
        await new_job(store, job_id)
    await store.set_phase("ended", Phase.FAILED)
    await store.set_phase("running", Phase.PROMPTS)

    assert [job.id for job in await store.finished_before(datetime.now(UTC) + timedelta(seconds=1))] == [
        "ended"
    ]
    assert await store.finished_before(datetime.now(UTC) - timedelta(hours=1)) == []


async def test_audit_entries_page_newest_first_and_filter(store: JobStore) -> None:
    for number in range(5):
        await store.record_audit(
            principal="alice" if number % 2 else "bob",
            tenant="team-a" if number % 2 else "team-b",
            method="POST",
            route="/v1/jobs/{job_id}:cancel",
            job_id=f"job-{number}",
            status=202,
        )

    seen, token = [], None
    while True:
        entries, token = await store.list_audit(limit=2, page_token=token)
        seen += [entry.job_id for entry in entries]
        if token is None:
            break
    assert seen == [f"job-{number}" for number in reversed(range(5))]
    team_a, _ = await store.list_audit(tenant="team-a")
    assert [(entry.principal, entry.job_id) for entry in team_a] == [("alice", "job-3"), ("alice", "job-1")]
    (one,), _ = await store.list_audit(job_id="job-2")
    assert (one.method, one.route, one.status, one.created_at.tzinfo) == (
        "POST",
        "/v1/jobs/{job_id}:cancel",
        202,
        UTC,
    )
    with pytest.raises(ValueError, match="invalid page token"):
        await store.list_audit(page_token="!!")


async def test_jobs_from_before_tenants_belong_to_the_default_tenant(database_url: str) -> None:
    config = alembic_config()
    url = database_urls(database_url)[1]
    if url.get_backend_name() == "sqlite":
        Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO jobs (id, name, document, labels, phase, cancel_requested, created_at, "
                "updated_at) VALUES ('job-old', 'old', '{}', '{}', 'Succeeded', false, :now, :now)"
            ),
            {"now": datetime.now(UTC)},
        )
    engine.dispose()

    store = await JobStore.open(database_url)
    try:
        old = await store.get_job("job-old")
        assert (old.tenant, old.owner, old.phase) == ("default", None, Phase.SUCCEEDED)
        assert [job.id for job in (await store.list_jobs(tenant="default"))[0]] == ["job-old"]
    finally:
        await store.close()


async def test_events_of_all_jobs_filter_by_type_and_tenant_in_id_order(store: JobStore) -> None:
    assert await store.newest_event_id() == 0
    await new_job(store, "a-1")
    await new_job(store, "b-1", tenant="team-b", owner="bob")
    await store.append_event("a-1", "progress", {"stage": "prompts"})
    await store.set_phase("b-1", Phase.PROMPTS)
    await store.set_phase("a-1", Phase.PROMPTS, "building prompts")

    every = await store.events_of_all_jobs(0, types=("phase",))
    team_a = await store.events_of_all_jobs(0, types=("phase",), tenant="team-a")
    first_two = await store.events_of_all_jobs(0, types=("phase", "progress"), limit=2)
    between = await store.events_of_all_jobs(every[0].id, types=("phase",), up_to_id=every[2].id)

    assert [(event.job_id, event.data["phase"]) for event in every] == [
        ("a-1", "Pending"),
        ("b-1", "Pending"),
        ("b-1", "Prompts"),
        ("a-1", "Prompts"),
    ]
    assert [event.id for event in every] == sorted(event.id for event in every)
    assert [(event.job_id, event.data) for event in team_a] == [
        ("a-1", {"phase": "Pending", "message": None}),
        ("a-1", {"phase": "Prompts", "message": "building prompts"}),
    ]
    assert [event.id for event in first_two] == [every[0].id, every[1].id]
    assert between == every[1:3]
    assert await store.newest_event_id() == every[-1].id
    assert await store.events_of_all_jobs(every[-1].id, types=("phase",)) == []
    with pytest.raises(ValueError, match="limit"):
        await store.events_of_all_jobs(0, types=("phase",), limit=0)
