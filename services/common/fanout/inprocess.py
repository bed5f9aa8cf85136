"""Shards run as asyncio tasks of this process: small jobs, and embedded mode without a Ray cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from stillhouse.common.fanout.plan import FanoutPlan, ProgressCallback, ShardFunction, summed


class InProcessFanout:
    def __init__(self, shard_function: ShardFunction, max_parallel: int = 1) -> None:
        self._shard_function = shard_function
        self._max_parallel = max(1, max_parallel)

    async def run(
        self, operation_id: str, plan: FanoutPlan, on_progress: ProgressCallback
    ) -> list[dict[str, Any]]:
        counters: dict[int, Mapping[str, float]] = {}
        slots = asyncio.Semaphore(self._max_parallel)

        async def run_one(index: int, payload: dict[str, Any]) -> dict[str, Any]:
            def report(shard_counters: Mapping[str, float]) -> None:
                counters[index] = dict(shard_counters)
                on_progress(summed(counters))

            async with slots:
                return await self._shard_function(payload, report)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(run_one(index, payload)) for index, payload in enumerate(plan.shards)
                ]
        except ExceptionGroup as failures:
            # The first shard that failed ends the stage with its own error; the group cancelled the rest.
            raise failures.exceptions[0] from None
        return [task.result() for task in tasks]
