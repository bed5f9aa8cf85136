"""Shards as Ray tasks: one Ray job per stage operation, whose driver (`ray_driver`) runs every shard.

The service submits the job through the cluster's job API and follows its log: the driver prints the
summed shard counters and each shard's result as progress lines, and a failure that ends the stage as an
error line with its gRPC code. The job's submission id comes from the operation id, so a restarted service
re-attaches to a running job instead of starting the work twice, and a failed attempt's successor resumes
from the shards that committed. Cancelling the follower stops the job and with it every shard task.
"""

from __future__ import annotations

import asyncio
import base64
import zlib
from typing import Any

import grpc
from ray.job_submission import JobStatus

from stillhouse.common.fanout.plan import FanoutPlan, ProgressCallback
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.operations import OperationError
from stillhouse.common.ray.cluster import RayUnreachable, auth_headers
from stillhouse.common.ray.jobs import RayJobs, error_field, error_payload, failure_reason

PLAN_ENV = "STILLHOUSE_FANOUT_PLAN"
DRIVER_MODULE = "stillhouse.common.fanout.ray_driver"
# One environment variable may hold at most 128 KiB on Linux; the compressed plan stays well below.
MAX_PLAN_CHARS = 100_000


def encode_plan(plan: FanoutPlan) -> str:
    encoded = base64.b64encode(zlib.compress(plan.to_json().encode(), 9)).decode()
    if len(encoded) > MAX_PLAN_CHARS:
        raise OperationError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the stage's {len(plan.shards)} shards do not fit in one Ray job ({len(encoded)} characters "
            f"compressed, at most {MAX_PLAN_CHARS}): lower fanout.max_shards",
        )
    return encoded


def decode_plan(encoded: str) -> FanoutPlan:
    return FanoutPlan.from_json(zlib.decompress(base64.b64decode(encoded)).decode())


class RayFanout:
    def __init__(self, settings: FanoutSettings) -> None:
        if settings.ray_address is None:
            raise ValueError("RayFanout needs fanout.ray_address")
        self._settings = settings
        self._jobs = RayJobs(
            settings.ray_address,
            headers=auth_headers(settings.ray_auth_token()),
            connect_timeout_seconds=settings.ray_connect_timeout_seconds,
            poll_seconds=settings.ray_poll_seconds,
        )

    async def run(
        self, operation_id: str, plan: FanoutPlan, on_progress: ProgressCallback
    ) -> list[dict[str, Any]]:
        env = {PLAN_ENV: encode_plan(plan)}
        command = f"{self._settings.ray_python} -m {DRIVER_MODULE}"
        try:
            sub_id = await asyncio.to_thread(self._jobs.submit, operation_id, command, env)
        except RayUnreachable as exc:
            raise OperationError(grpc.StatusCode.UNAVAILABLE, f"the Ray cluster: {exc}") from exc
        results: dict[int, dict[str, Any]] = {}

        def on_record(record: dict[str, Any]) -> None:
            if "counters" in record:
                on_progress({name: float(value) for name, value in record["counters"].items()})
            if "shard" in record:
                results[int(record["shard"])] = record["result"]

        try:
            end = await self._jobs.follow(
                sub_id, on_record, finished=lambda: len(results) == len(plan.shards)
            )
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.to_thread(self._jobs.stop, sub_id))
            raise
        if end.status is not JobStatus.SUCCEEDED:
            raise await asyncio.to_thread(self._failure, sub_id)
        missing = [index for index in range(len(plan.shards)) if index not in results]
        if missing:
            raise OperationError(
                grpc.StatusCode.INTERNAL,
                f"the Ray job {sub_id} succeeded without the results of shards {missing[:10]}",
            )
        return [results[index] for index in range(len(plan.shards))]

    def _failure(self, sub_id: str) -> OperationError:
        fallback, logs = self._jobs.failure_logs(sub_id)
        payload = error_payload(logs)
        code_name = error_field(payload, "code") if payload is not None else None
        code = grpc.StatusCode[code_name] if code_name in grpc.StatusCode.__members__ else None
        return OperationError(code or grpc.StatusCode.INTERNAL, failure_reason(logs, fallback))
