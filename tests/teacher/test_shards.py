"""The teacher stage as shards, in this process, against the fake OpenAI-compatible server and a real cache
database (SQLite and PostgreSQL): the same answers as one shard, resume per shard without paying twice, the
job's budget across shards, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from teacher_runs import PRICES, TENANT, RecordedProgress, fake_teacher_spec, write_prompts

from stillhouse.common.datasets.manifest import manifest_key
from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.teacher.budget import JobBudget
from stillhouse.teacher.cache import TeacherCache, answers
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.shards import ShardAnswerer
from stillhouse.teacher.stage import AnswerPromptsStage
from stillhouse.teacher.teachers import TeacherPool


@dataclass
class Service:
    """The teacher service's objects, as the servicer holds them, without the gRPC around them."""

    store: LocalObjectStore
    cache: TeacherCache
    teachers: TeacherPool

    def spec(self, base_url: str, **overrides: Any) -> TeacherSpec:
        return TeacherSpec.model_validate(fake_teacher_spec(base_url, **overrides))

    def stage(self, spec: TeacherSpec, job: str, shard_rows: int, progress: RecordedProgress | None = None):
        scope = self.teachers.cache_scope(spec, TENANT)
        return AnswerPromptsStage(
            store=self.store,
            spec=spec,
            job_id=job,
            scope=scope,
            fanout=FanoutSettings(shard_rows=shard_rows),
            progress=progress or RecordedProgress(),  # type: ignore[arg-type]
        )

    async def answer(self, spec: TeacherSpec, job: str, shard_rows: int, holdout: str = ""):
        await self.teachers.get(spec)
        stage = self.stage(spec, job, shard_rows)
        shards = ShardAnswerer(self.store, self.cache, self.teachers, PRICES)
        return await stage.run(f"{job}.teacher", f"jobs/{job}/prompts/train", holdout, shards)

    async def cached_answers(self) -> int:
        async with self.cache.engine.connect() as connection:
            return (await connection.execute(select(func.count()).select_from(answers))).scalar_one()


@pytest.fixture
async def service(tmp_path: Path, database_url: str) -> AsyncIterator[Service]:
    store = LocalObjectStore(tmp_path / "objects", "stillhouse")
    store.ensure_bucket()
    cache = await TeacherCache.open(database_url)
    teachers = TeacherPool(TeacherSettings(egress_allow=["127.0.0.0/8"], limiter_storage_uri="memory://"))
    try:
        yield Service(store, cache, teachers)
    finally:
        await teachers.close()
        await cache.close()


def without_latency(table) -> list[dict[str, Any]]:
    return table.drop_columns(["latency_seconds"]).to_pylist()


async def test_many_shards_write_the_same_answers_as_one(service, fake_openai):
    texts = [f"shard me {i}" for i in range(250)]
    for job in ("job-one", "job-many"):
        write_prompts(service.store, f"jobs/{job}/prompts/train", texts)
        write_prompts(service.store, f"jobs/{job}/prompts/holdout", [f"held {i}" for i in range(30)])
    spec = service.spec(fake_openai.base_url)

    one = await service.answer(spec, "job-one", 10_000, holdout="jobs/job-one/prompts/holdout")
    fake_openai.reset()
    # Another tenant's key would be another scope; the same scope answers from the cache: ask again.
    many = await service.answer(
        service.spec(fake_openai.base_url, revision="r2"),
        "job-many",
        100,
        holdout="jobs/job-many/prompts/holdout",
    )

    assert fake_openai.calls()["completions"] == 280  # every prompt asked, none twice
    for name in ("answers", "holdout"):
        single = DatasetReader(service.store, f"jobs/job-one/teacher/{name}")
        sharded = DatasetReader(service.store, f"jobs/job-many/teacher/{name}")
        assert without_latency(sharded.read_table()) == without_latency(single.read_table())
    answers_manifest = DatasetReader(service.store, "jobs/job-many/teacher/answers").manifest
    writers = {shard.path.rsplit("-", 1)[1] for shard in answers_manifest.shards}
    assert len(writers) == 3  # three shards' writers, named by the one manifest where they wrote
    assert [
        m[0]["content"]
        for m in DatasetReader(service.store, many.answers.dataset_id)
        .read_table(columns=["messages"])
        .column("messages")
        .to_pylist()
    ] == texts
    assert many.answers.num_rows == one.answers.num_rows == 250
    assert many.ledger.requests == 280 and many.ledger.cached_requests == 0
    assert many.ledger.completion_tokens == one.ledger.completion_tokens


async def test_a_resumed_stage_skips_committed_shards_and_pays_only_for_missing_prompts(service, fake_openai):
    job = "job-resume"
    write_prompts(service.store, f"jobs/{job}/prompts/train", [f"resume me {i}" for i in range(300)])
    spec = service.spec(fake_openai.base_url)
    await service.teachers.get(spec)
    stage = service.stage(spec, job, 100)
    shards = ShardAnswerer(service.store, service.cache, service.teachers, PRICES)
    plan = stage.plan(stage._inputs(f"jobs/{job}/prompts/train", ""))
    assert len(plan.shards) == 3

    await shards(plan.shards[0], lambda counters: None)  # shard 0 commits
    # Shard 1 gets 50 answers, then the teacher hangs and the shard is stopped, as a dying worker would be.
    fake_openai.control(mode="ok", times=50)
    fake_openai.control(mode="slow", delay=600)
    interrupted = asyncio.create_task(shards(plan.shards[1], lambda counters: None))
    for _ in range(600):
        if await service.cached_answers() == 150:
            break
        await asyncio.sleep(0.05)
    interrupted.cancel()
    with pytest.raises(asyncio.CancelledError):
        await interrupted
    first_run = fake_openai.calls()
    fake_openai.reset()

    result = await service.answer(spec, job, 100)

    second_run = fake_openai.calls()
    assert first_run["answered_by_prompt"].keys().isdisjoint(second_run["answered_by_prompt"].keys())
    assert sum(first_run["answered_by_prompt"].values()) == 150
    assert second_run["completions"] == 150  # shard 1's last 50 and shard 2's 100
    assert result.answers.num_rows == 300
    assert result.ledger.cached_requests == 50  # shard 1's first 50; shard 0 was skipped
    table = DatasetReader(service.store, result.answers.dataset_id).read_table(columns=["messages"])
    assert [m[0]["content"] for m in table.column("messages").to_pylist()] == [
        f"resume me {i}" for i in range(300)
    ]


async def test_the_budget_holds_across_shards_and_runs(service, fake_openai):
    job = "job-budget"
    write_prompts(service.store, f"jobs/{job}/prompts/train", [f"pricey {i}" for i in range(300)])
    spec = service.spec(fake_openai.base_url, budgetUSD=0.5)

    first = await service.answer(spec, job, 100)
    paid_first = fake_openai.calls()["completions"]
    # The job again, cut into other shards so that none is skipped: the budget is the job's, spent already.
    second = await service.answer(spec, job, 150)

    budget = JobBudget(service.cache.engine, job, service.teachers.cache_scope(spec, TENANT), 0.5)
    spent, reserved = await budget.committed_usd()
    assert first.stopped_reason == "budget of 0.50 USD reached"
    assert 0 < first.answers.num_rows < 300 and paid_first == first.answers.num_rows
    assert first.ledger.cost_usd == pytest.approx(spent) and spent <= 0.5
    assert reserved == pytest.approx(0.0, abs=1e-9)
    assert fake_openai.calls()["completions"] == paid_first  # the re-run paid nothing more
    assert second.answers.num_rows == first.answers.num_rows
    assert second.stopped_reason == first.stopped_reason
    assert second.ledger.cost_usd == 0 and 0 < second.ledger.cached_requests == second.ledger.requests


async def test_cancelling_the_stage_commits_nothing_and_releases_its_reservations(service, fake_openai):
    job = "job-cancel"
    write_prompts(service.store, f"jobs/{job}/prompts/train", [f"cancel me {i}" for i in range(300)])
    spec = service.spec(fake_openai.base_url, budgetUSD=100.0)
    fake_openai.control(mode="ok", times=20)
    fake_openai.control(mode="slow", delay=600)

    running = asyncio.create_task(service.answer(spec, job, 100))
    for _ in range(600):
        if fake_openai.calls()["in_flight"] > 0 and fake_openai.calls()["by_status"].get("200") == 20:
            break
        await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    budget = JobBudget(service.cache.engine, job, service.teachers.cache_scope(spec, TENANT), 100.0)
    for _ in range(100):  # the cancelled calls hand their reservations back as they unwind
        spent, reserved = await budget.committed_usd()
        if reserved < 1e-9:
            break
        await asyncio.sleep(0.05)
    assert reserved == pytest.approx(0.0, abs=1e-9) and spent > 0
    assert not service.store.exists(manifest_key(f"jobs/{job}/teacher/answers"))
