"""The driver of a fanned-out stage, run as a Ray job: every shard of the plan as a Ray task.

    python -m stillhouse.common.fanout.ray_driver     (the plan in STILLHOUSE_FANOUT_PLAN)

Shard tasks reserve `cpus_per_shard` CPUs each, so they land on the cluster's CPU workers and the autoscaler
sees the queue. A task whose worker died, or that raised anything but `OperationError`, is retried up to
`max_retries` times; the shard function resumes from what it committed. Every shard reports its counters to
one actor; the driver prints their sum and each shard's result as progress lines, and the first failure that
ends the stage as an error line carrying its gRPC code, before it exits non-zero (which ends the other tasks).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import ray

from stillhouse.common.fanout.plan import import_shard_function, summed
from stillhouse.common.fanout.ray_fanout import PLAN_ENV, decode_plan
from stillhouse.common.operations import OperationError
from stillhouse.common.ray.jobs import ERROR_PREFIX, PROGRESS_PREFIX

REPORT_INTERVAL_SECONDS = 0.5


@ray.remote(num_cpus=0)
class ShardCounters:
    """Each shard's latest counters; a retried shard's replace its earlier attempt's."""

    def __init__(self) -> None:
        self._counters: dict[int, dict[str, float]] = {}

    def update(self, index: int, counters: dict[str, float]) -> None:
        self._counters[index] = counters

    def total(self) -> dict[str, float]:
        return summed(self._counters)


def run_shard(function: str, index: int, payload: dict[str, Any], counters) -> dict[str, Any]:
    shard_function = import_shard_function(function)
    last_sent = 0.0
    latest: dict[str, float] = {}

    def report(shard_counters: Mapping[str, float]) -> None:
        nonlocal last_sent
        latest.update(shard_counters)
        if time.monotonic() - last_sent >= REPORT_INTERVAL_SECONDS:
            last_sent = time.monotonic()
            counters.update.remote(index, dict(latest))

    try:
        result = asyncio.run(shard_function(payload, report))
    except OperationError as exc:  # ends the stage: a retry would fail the same way
        return {"error": {"code": exc.code.name, "message": exc.message}}
    ray.get(counters.update.remote(index, dict(latest)))
    return {"result": result}


def _outcome(ref: ray.ObjectRef, index: int, max_retries: int) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
        code = "UNAVAILABLE" if isinstance(exc, ray.exceptions.WorkerCrashedError) else "INTERNAL"
        cause = getattr(exc, "cause", None) or exc
        message = f"shard {index} failed {max_retries + 1} times: {type(cause).__name__}: {cause}"
        return {"error": {"code": code, "message": message}}


def _print(prefix: str, record: dict[str, Any]) -> None:
    print(prefix + json.dumps(record), flush=True)


def main() -> int:
    plan = decode_plan(os.environ[PLAN_ENV])
    ray.init()
    counters = ShardCounters.remote()
    task = ray.remote(run_shard).options(
        num_cpus=plan.cpus_per_shard,
        resources=dict(plan.resources) or None,
        max_retries=plan.max_retries,
        retry_exceptions=True,
    )
    waiting = list(enumerate(plan.shards))
    running: dict[ray.ObjectRef, int] = {}
    limit = plan.max_parallel or len(waiting)
    last_total: dict[str, float] | None = None
    while waiting or running:
        while waiting and len(running) < limit:
            index, payload = waiting.pop(0)
            running[task.remote(plan.function, index, payload, counters)] = index
        ready, _ = ray.wait(list(running), num_returns=1, timeout=REPORT_INTERVAL_SECONDS)
        finished: list[tuple[int, dict[str, Any]]] = []
        for ref in ready:
            index = running.pop(ref)
            outcome = _outcome(ref, index, plan.max_retries)
            if "error" in outcome:
                _print(ERROR_PREFIX, outcome["error"])
                return 1
            finished.append((index, outcome["result"]))
        # The counters first: a finished shard's last counters are in the total before its result is
        # printed, so a follower that stops at the last result has the stage's whole progress.
        total = ray.get(counters.total.remote())
        if total != last_total:
            _print(PROGRESS_PREFIX, {"counters": total})
            last_total = total
        for index, result in finished:
            _print(PROGRESS_PREFIX, {"shard": index, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
