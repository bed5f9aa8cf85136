"""Teacher fan-out benchmark: the teacher stage in this process beside the same stage fanned out as Ray tasks
over a local Ray head with `workers` CPUs, on the same prompts, in one run.

    python bench/scale_teacher_fanout.py [--prompts 4000] [--latency-ms 50] [--workers 2]

The teacher is the fake OpenAI-compatible server of the tests (`tests/teacher/fake_openai.py`, a
subprocess) taking `latency_ms` over each answer: 64-token answers with the top-20 logprobs of every token,
about 110 KB each, as `teacher_http_bench.py` asks them. The cache is a fresh PostgreSQL database (the
cluster's cache), and each run asks under a scope of its own, so every prompt reaches the server.

- in-process: `AnswerPromptsStage.run` with its shards in the service's process.
- fanned-out: the same stage with `fanout.ray_address` set: one Ray job whose driver runs `workers`
  shards as Ray tasks, each worker building its own cache connection, teacher and object store. Ray
  starts a job's worker processes for that job, so their imports and set-up are part of every stage.

Each row: seconds from `run` to the committed answers dataset, answers per second, the ratio to the
in-process figure, and where the time went: until the first answer was counted (set-up: Ray job start,
driver, task scheduling, worker set-up) and after the last (commit of the final dataset, job end).
A fanned-out stage pays a fixed cost that the in-process one does not (a Ray job per stage: job and
driver start, worker processes started for the job, the job's end noticed): the ratio grows with the
prompts, which is why stages under `fanout.min_rows` stay in the service's process.
`run()` returns the rows; `main()` prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from _table import print_grid, verdict
from ray_heads import fanout_to, local_ray_head
from teacher_http_bench import conversations, fake_openai, teacher_spec, write_prompts

from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.ray.cluster import LocalRayHead
from stillhouse.teacher.cache import TeacherCache
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.ledger import PriceTable
from stillhouse.teacher.shards import ShardAnswerer
from stillhouse.teacher.stage import AnswerPromptsStage
from stillhouse.teacher.teachers import TeacherPool

POSTGRES_ADMIN_URL = os.environ.get(
    "STILLHOUSE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
CONCURRENCY = 64
TARGET_RATIO = 0.8
LOOPBACK_EGRESS = ["127.0.0.0/8"]


class TimedProgress:
    """Keeps when the first and the last answer were counted."""

    def __init__(self) -> None:
        self.first_answer: float | None = None
        self.last_answer: float | None = None
        self._done = 0

    def update(self, *, done: int | None = None, **_: Any) -> None:
        if done and done > self._done:
            self._done = done
            self.last_answer = time.perf_counter()
            self.first_answer = self.first_answer or self.last_answer


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"stillhouse_bench_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def ray_head(home: Path, temp_dir: Path, cache_url: str, workers: int) -> Iterator[LocalRayHead]:
    """A local Ray head of `workers` CPUs whose workers find the teacher settings in their environment."""
    worker_env = {
        "STILLHOUSE_HOME": str(home),
        "STILLHOUSE_TEACHER_CACHE_URL": cache_url,
        "STILLHOUSE_TEACHER_OBJECT_STORE__LOCAL_ROOT": str(home / "objects"),
        "STILLHOUSE_TEACHER_EGRESS_ALLOW": json.dumps(LOOPBACK_EGRESS),
        "STILLHOUSE_TEACHER_LOG_LEVEL": "warning",
    }
    with local_ray_head(temp_dir, num_cpus=workers, worker_env=worker_env) as head:
        yield head


async def stage_run(
    store: LocalObjectStore, cache_url: str, base_url: str, fanout: FanoutSettings, run_name: str
) -> tuple[float, TimedProgress, int]:
    """(seconds, progress times, answers) of one teacher stage under a scope of its own."""
    spec = teacher_spec(base_url, CONCURRENCY)
    cache = await TeacherCache.open(cache_url)
    teachers = TeacherPool(TeacherSettings(egress_allow=LOOPBACK_EGRESS))
    progress = TimedProgress()
    stage = AnswerPromptsStage(
        store=store,
        spec=spec,
        job_id=run_name,
        scope=run_name,
        fanout=fanout,
        progress=progress,  # type: ignore[arg-type]
    )
    shards = ShardAnswerer(store, cache, teachers, PriceTable.load())
    try:
        await teachers.get(spec)
        started = time.perf_counter()
        result = await stage.run(run_name, "bench/prompts", "", shards)
        seconds = time.perf_counter() - started
    finally:
        await teachers.close()
        await cache.close()
    if result.failed_prompts:
        raise RuntimeError(f"the teacher stage failed {result.failed_prompts} prompts")
    answers = DatasetReader(store, result.answers.dataset_id).manifest.num_rows
    progress.first_answer = (progress.first_answer or started) - started
    progress.last_answer = seconds - ((progress.last_answer or started) - started)
    return seconds, progress, answers


def run(prompts: int = 4000, latency_ms: float = 50, workers: int = 2) -> list[dict[str, Any]]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with (
        tempfile.TemporaryDirectory(prefix="fanout-bench-") as folder,
        tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_dir,
        fresh_database() as cache_url,
    ):
        home = Path(folder)
        store = LocalObjectStore(home / "objects", "stillhouse")
        store.ensure_bucket()
        write_prompts(store, "bench/prompts", conversations(prompts))
        with (
            fake_openai(home / "fake-openai.log", latency_ms) as base_url,
            ray_head(home, Path(ray_dir), cache_url, workers) as head,
        ):
            local = FanoutSettings()
            fanned = fanout_to(head, shard_rows=max(100, math.ceil(prompts / workers)))
            figures = [
                ("in-process", *asyncio.run(stage_run(store, cache_url, base_url, local, "run-local"))),
                (
                    f"fanned-out, {workers} Ray workers",
                    *asyncio.run(stage_run(store, cache_url, base_url, fanned, "run-fanned")),
                ),
            ]
    baseline = prompts / figures[0][1]
    rows = []
    for path, seconds, progress, answers in figures:
        rate = answers / seconds
        ratio = rate / baseline
        rows.append(
            {
                "path": path,
                "seconds": round(seconds, 2),
                "answers/s": round(rate, 1),
                "ratio": round(ratio, 2),
                "until first answer s": round(progress.first_answer or 0.0, 2),
                "after last answer s": round(progress.last_answer or 0.0, 2),
                "target": "-" if path == "in-process" else f">= {TARGET_RATIO}x",
                "pass": None if path == "in-process" else ratio >= TARGET_RATIO and answers == prompts,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4000)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--workers", type=int, default=2)
    arguments = parser.parse_args()
    rows = run(arguments.prompts, arguments.latency_ms, arguments.workers)
    headers = [name for name in rows[0] if name != "pass"] + ["pass"]
    print_grid(headers, [[str(row[name]) for name in headers[:-1]] + [verdict(row["pass"])] for row in rows])


if __name__ == "__main__":
    main()
