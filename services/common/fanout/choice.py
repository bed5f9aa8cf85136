"""The one switch between running a stage's shards in this process and fanning them out over Ray."""

from __future__ import annotations

import math
from typing import Any

from stillhouse.common.fanout.inprocess import InProcessFanout
from stillhouse.common.fanout.plan import Fanout, FanoutPlan, ShardFunction
from stillhouse.common.fanout.settings import FanoutSettings


def fans_out(settings: FanoutSettings, input_rows: int) -> bool:
    return settings.ray_address is not None and input_rows >= settings.min_rows


def fanout_for(
    settings: FanoutSettings, input_rows: int, local: ShardFunction, *, local_parallel: int = 1
) -> Fanout:
    """`RayFanout` for a large enough input when a Ray cluster is configured, else `local` in this process."""
    if not fans_out(settings, input_rows):
        return InProcessFanout(local, local_parallel)
    from stillhouse.common.fanout.ray_fanout import RayFanout  # Ray's client only where it is used

    return RayFanout(settings)


def plan_for(settings: FanoutSettings, function: str, shards: list[dict[str, Any]]) -> FanoutPlan:
    """The plan that runs `function` over `shards` as `settings` size each task."""
    return FanoutPlan(
        function=function,
        shards=shards,
        cpus_per_shard=settings.cpus_per_shard,
        max_parallel=settings.max_parallel_shards,
        max_retries=settings.max_retries,
        resources={settings.shard_resource: settings.cpus_per_shard} if settings.shard_resource else {},
    )


def row_ranges(total_rows: int, settings: FanoutSettings) -> list[range]:
    """`total_rows` cut into consecutive ranges of `shard_rows` rows, fewer and larger ones beyond
    `max_shards`; one empty range for an empty input, so that a stage always has a shard to commit."""
    if total_rows <= 0:
        return [range(0, 0)]
    count = min(settings.max_shards, math.ceil(total_rows / settings.shard_rows))
    size = math.ceil(total_rows / count)
    return [range(start, min(start + size, total_rows)) for start in range(0, total_rows, size)]
