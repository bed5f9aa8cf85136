"""The teacher stage fanned out over a real local Ray head (2 CPUs), against the fake OpenAI-compatible
server, with the cache in PostgreSQL: a Ray worker killed mid-shard costs no prompt twice.

Determinism without weakening the claim: the fake server lets a number of calls through and holds the
rest at its gate; the test waits until the cache holds every answer the server gave, SIGKILLs the worker
process of a running shard, then opens the gate. The stage must still succeed, the server must have
answered each prompt exactly once, and the answers dataset must hold each prompt once, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_heads import fanout_to, local_ray_head
from sqlalchemy import func, select
from teacher_runs import PRICES, TENANT, RecordedProgress, write_prompts

from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.ray.cluster import LocalRayHead
from stillhouse.teacher.cache import TeacherCache, answers
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.shards import ShardAnswerer
from stillhouse.teacher.stage import AnswerPromptsStage
from stillhouse.teacher.teachers import TeacherPool

PROMPTS = 400
LET_THROUGH = 60
CONCURRENCY = 4  # per shard
RUNNING_SHARDS = 2  # 2 CPUs, one shard each
LOOPBACK_EGRESS = ["127.0.0.0/8"]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def ray_head(home: Path, postgres_database_url: str) -> Iterator[LocalRayHead]:
    """A local Ray head whose workers are teacher shard workers: the teacher settings in their environment."""
    worker_env = {
        "STILLHOUSE_HOME": str(home),
        "STILLHOUSE_TEACHER_CACHE_URL": postgres_database_url,
        "STILLHOUSE_TEACHER_OBJECT_STORE__LOCAL_ROOT": str(home / "objects"),
        "STILLHOUSE_TEACHER_EGRESS_ALLOW": json.dumps(LOOPBACK_EGRESS),
        "STILLHOUSE_TEACHER_LOG_FORMAT": "console",
    }
    with local_ray_head(worker_env=worker_env) as head:
        yield head


def shard_worker_pids() -> list[int]:
    """The processes running a shard task now: Ray names a worker's process after the task it runs."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith(b"ray::run_shard"):
                pids.append(int(entry.name))
    return pids


async def eventually(check, seconds: float, what: str) -> None:
    for _ in range(int(seconds / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_killed_ray_worker_costs_no_prompt_twice(ray_head, home, postgres_database_url, fake_openai):
    store = LocalObjectStore(home / "objects", "stillhouse")
    store.ensure_bucket()
    texts = [f"fan me out {i}" for i in range(PROMPTS)]
    write_prompts(store, "jobs/job-ray/prompts/train", texts)
    cache = await TeacherCache.open(postgres_database_url)
    teachers = TeacherPool(TeacherSettings(egress_allow=LOOPBACK_EGRESS))
    spec = TeacherSpec.model_validate(
        {
            "backend": "openai",
            "baseURL": fake_openai.base_url,
            "model": "fake-teacher",
            "topLogprobs": 5,
            "sampling": {"temperature": 0.0, "maxTokens": 16},
            "limits": {"maxConcurrency": CONCURRENCY, "maxRetries": 2, "timeoutSeconds": 120},
        }
    )
    await teachers.get(spec)
    fanout = fanout_to(ray_head, shard_rows=100, max_retries=2)
    progress = RecordedProgress()
    stage = AnswerPromptsStage(
        store=store,
        spec=spec,
        job_id="job-ray",
        scope=teachers.cache_scope(spec, TENANT),
        fanout=fanout,
        progress=progress,  # type: ignore[arg-type]
    )
    fake_openai.control(hold_after=LET_THROUGH)
    try:
        local_shards = ShardAnswerer(store, cache, teachers, PRICES)
        running = asyncio.create_task(stage.run("op-ray", "jobs/job-ray/prompts/train", "", local_shards))

        async def answered() -> int:
            return sum(fake_openai.calls()["answered_by_prompt"].values())

        async def all_answers_cached() -> bool:
            return await answered() == LET_THROUGH and await cached_count(cache) == LET_THROUGH

        async def every_shard_held() -> bool:
            return fake_openai.calls()["in_flight"] == RUNNING_SHARDS * CONCURRENCY

        await eventually(all_answers_cached, 120, f"the {LET_THROUGH} answers let through to be cached")
        # On a loaded machine one shard's worker may still be starting while the other took every call
        # let through: whichever worker is killed must have calls waiting at the gate.
        await eventually(every_shard_held, 120, "both running shards to have their calls held at the gate")
        victims = shard_worker_pids()
        assert len(victims) == RUNNING_SHARDS, f"Ray workers running a shard: {victims}"
        os.kill(victims[0], signal.SIGKILL)
        await asyncio.sleep(1.0)  # the held calls of the dead worker see their connections drop
        fake_openai.control(open_gate=True)
        result = await asyncio.wait_for(running, 240)
    finally:
        await teachers.close()
        await cache.close()

    calls = fake_openai.calls()
    assert calls["by_status"].get("499", 0) >= 1  # the dead worker's held calls were never answered
    assert sorted(calls["answered_by_prompt"]) == sorted(texts)
    assert set(calls["answered_by_prompt"].values()) == {1}  # each prompt paid for once
    table = DatasetReader(store, result.answers.dataset_id).read_table(columns=["messages"])
    assert [m[0]["content"] for m in table.column("messages").to_pylist()] == texts
    assert result.answers.num_rows == PROMPTS
    # The retried shard took what its dead attempt had been answered from the cache, as cached.
    assert result.ledger.requests == PROMPTS and result.ledger.cached_requests <= LET_THROUGH
    assert progress.updates[-1]["done"] == PROMPTS and progress.updates[-1]["total"] == PROMPTS


async def cached_count(cache: TeacherCache) -> int:
    async with cache.engine.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(answers))).scalar_one()
