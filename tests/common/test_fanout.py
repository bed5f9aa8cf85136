"""The fan-out of a stage's shards: in this process and as Ray tasks on a real local Ray head."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fanout_shards import count_rows
from ray.job_submission import JobStatus
from ray_heads import fanout_to, local_ray_head
from waiting import wait_until

from stillhouse.common.fanout.choice import fanout_for, fans_out, plan_for, row_ranges
from stillhouse.common.fanout.inprocess import InProcessFanout
from stillhouse.common.fanout.plan import FanoutPlan
from stillhouse.common.fanout.ray_fanout import MAX_PLAN_CHARS, RayFanout, decode_plan, encode_plan
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.operations import OperationError
from stillhouse.common.ray.cluster import LocalRayHead, auth_headers
from stillhouse.common.ray.jobs import RayJobs

SUPPORT = Path(__file__).parents[1] / "support"
FUNCTION = "fanout_shards:count_rows"


def plan_of(folder: Path, rows: list[int], **extra) -> FanoutPlan:
    shards = [
        {"dir": str(folder), "index": index, "rows": count, **extra} for index, count in enumerate(rows)
    ]
    return FanoutPlan(function=FUNCTION, shards=shards, max_retries=2)


def test_rows_are_cut_into_consecutive_ranges_bounded_in_number():
    settings = FanoutSettings(shard_rows=1_000, max_shards=4)
    assert row_ranges(2_500, settings) == [range(0, 834), range(834, 1_668), range(1_668, 2_500)]
    ranges = row_ranges(10_001, settings)
    assert len(ranges) == 4 and ranges[0].start == 0 and ranges[-1].stop == 10_001
    assert all(a.stop == b.start for a, b in itertools.pairwise(ranges))
    assert row_ranges(0, settings) == [range(0, 0)]


def test_only_a_large_enough_input_with_a_ray_cluster_fans_out():
    local = FanoutSettings(min_rows=10)
    remote = FanoutSettings(ray_address="http://127.0.0.1:1", min_rows=10)
    assert not fans_out(local, 1_000) and not fans_out(remote, 9) and fans_out(remote, 10)
    assert isinstance(fanout_for(remote, 9, count_rows), InProcessFanout)
    assert isinstance(fanout_for(remote, 10, count_rows), RayFanout)


def test_a_plan_sizes_its_tasks_from_the_settings():
    settings = FanoutSettings(cpus_per_shard=0.5, max_parallel_shards=3, max_retries=1)
    plan = plan_for(settings, FUNCTION, [{"index": 0}])
    assert (plan.cpus_per_shard, plan.max_parallel, plan.max_retries, plan.resources) == (0.5, 3, 1, {})
    pinned = plan_for(settings.model_copy(update={"shard_resource": "stillhouse_shard_cpu"}), FUNCTION, [])
    assert pinned.resources == {"stillhouse_shard_cpu": 0.5}
    assert decode_plan(encode_plan(pinned)) == pinned
    with pytest.raises(ValueError, match="shard_resource"):
        FanoutSettings(shard_resource="cpu; rm -rf")


def test_a_plan_travels_compressed_and_a_huge_one_is_refused():
    plan = FanoutPlan(function=FUNCTION, shards=[{"index": i, "rows": [i, i + 1]} for i in range(4096)])
    assert decode_plan(encode_plan(plan)) == plan
    noise = [{"index": i, "token": os.urandom(40).hex()} for i in range(4096)]
    with pytest.raises(OperationError, match="max_shards") as refused:
        encode_plan(FanoutPlan(function=FUNCTION, shards=noise))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and MAX_PLAN_CHARS < 4096 * 80


async def test_in_process_shards_give_results_in_order_and_summed_progress(tmp_path):
    seen: list[dict[str, float]] = []
    results = await InProcessFanout(count_rows, max_parallel=2).run(
        "op", plan_of(tmp_path, [3, 1, 2]), seen.append
    )
    assert [result["index"] for result in results] == [0, 1, 2]
    assert seen[-1] == {"rows": 6.0}
    assert sorted(path.name for path in tmp_path.glob("shard-*")) == ["shard-0", "shard-1", "shard-2"]


async def test_in_process_a_refusing_shard_ends_the_stage_with_its_code(tmp_path):
    plan = FanoutPlan(
        function=FUNCTION, shards=[{"dir": str(tmp_path), "index": 0, "rows": 1, "refuse": True}]
    )
    with pytest.raises(OperationError, match="refuses") as failed:
        await InProcessFanout(count_rows).run("op", plan, lambda _: None)
    assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRayHead]:
    path = os.pathsep.join([str(SUPPORT), *filter(None, [os.environ.get("PYTHONPATH")])])
    with local_ray_head(worker_env={"PYTHONPATH": path}) as head:
        yield head


@pytest.fixture
def ray_fanout(ray_head: LocalRayHead) -> RayFanout:
    return RayFanout(fanout_to(ray_head))


async def test_ray_shards_run_retry_a_dead_worker_and_sum_their_progress(ray_fanout, tmp_path):
    seen: list[dict[str, float]] = []
    plan = plan_of(tmp_path, [5, 3, 4, 2], crash_once=True, pause=0.01)
    results = await ray_fanout.run(f"op-{tmp_path.name}", plan, seen.append)
    assert results == [{"index": i, "rows": rows} for i, rows in enumerate([5, 3, 4, 2])]
    assert seen[-1] == {"rows": 14.0}
    for index in range(4):  # every shard's worker died once, and its retry ran in another process
        assert len(list(tmp_path.glob(f"attempt-{index}-*"))) == 2
        assert (tmp_path / f"shard-{index}").read_text() == str(plan.shards[index]["rows"])


async def test_a_ray_shard_that_refuses_ends_the_stage_with_its_code(ray_fanout, tmp_path):
    plan = FanoutPlan(
        function=FUNCTION,
        shards=[{"dir": str(tmp_path), "index": 0, "rows": 1, "refuse": True}],
        max_retries=3,
    )
    with pytest.raises(OperationError, match="shard 0 refuses its rows") as failed:
        await ray_fanout.run(f"op-{tmp_path.name}", plan, lambda _: None)
    assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(list(tmp_path.glob("attempt-0-*"))) == 1  # a refusal is not retried


async def test_cancelling_stops_the_ray_job_and_its_shards(ray_fanout, ray_head, tmp_path):
    plan = plan_of(tmp_path, [10_000, 10_000], pause=0.05)
    operation_id = f"op-{tmp_path.name}"
    seen: list[dict[str, float]] = []
    run = asyncio.create_task(ray_fanout.run(operation_id, plan, seen.append))
    while not seen:
        await asyncio.sleep(0.2)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    client = RayJobs(ray_head.address, headers=auth_headers(ray_head.token)).client
    ended = wait_until(
        lambda: client.get_job_status(f"{operation_id}-1") in {JobStatus.STOPPED, JobStatus.FAILED},
        30,
        "the stopped job to end",
    )
    assert ended and not list(tmp_path.glob("shard-*"))
