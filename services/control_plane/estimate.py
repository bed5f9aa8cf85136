"""What a job would cost before it runs: its prompts, then the teacher's price for answering them.

The prompts stage runs for real, under an estimate id of its own: it is deterministic, so the estimate
sees exactly the prompts the job will send, and the teacher calls that generation makes land in the
teacher cache, so the job (or a repeated estimate) later gets them for free. It is started and followed
as a job's stage is (`start_and_follow`), within the same bounds and re-attached the same way, except
that a prompts service that has not answered at all fails the estimate at once. The teacher stage is
only priced (`Teacher.EstimateCost`), never run.

An estimate is bounded in time: past its deadline, or when the caller goes away, the prompts operation
is cancelled in its service (`EstimateTimedOut` says which, for a 504). However it ends, it leaves
nothing behind: its prompts operation is let finish or stopped, then its datasets are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from stillhouse.common.job_phases import Stage
from stillhouse.common.operations import FINAL_STATES, State
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.control_plane.job_removal import job_prefix
from stillhouse.control_plane.orchestrator import ServiceChannels
from stillhouse.control_plane.stage_calls import STAGE_CALLS
from stillhouse.control_plane.start_and_follow import FollowFailed, describe_rpc_error, start_and_follow
from stillhouse.prompts.v1 import prompts_pb2
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc

log = structlog.get_logger(__name__)

CANCEL_SECONDS = 10.0


class EstimateTimedOut(Exception):
    """The estimate passed its deadline; its prompts operation was cancelled."""


class EstimateFailed(Exception):
    """The estimate could not be made; the message says why, for the user."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Estimate:
    """The prompts an estimate built (the prompts stage's result) and the teacher's price for them."""

    estimate_id: str
    prompts: prompts_pb2.GeneratePromptsResult
    teacher: teacher_pb2.CostEstimate


def estimate_job_id(spec: Mapping[str, Any], tenant: str) -> str:
    """A new id for each estimate (two at once must not share, nor delete, each other's datasets),
    beginning with a digest of what decides the prompts, so that the objects of one spec sort together."""
    deciding = {"tenant": tenant, **{part: spec[part] for part in ("prompts", "teacher", "evaluation")}}
    digest = hashlib.sha256(json.dumps(deciding, sort_keys=True).encode()).hexdigest()
    return f"estimate-{digest[:16]}-{secrets.token_hex(4)}"


def _retryable(exc: Exception) -> bool:
    """Whether the failure may pass: a service that is away, or a stream that closed or went silent."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return True


def _failure(service: str, exc: grpc.aio.AioRpcError) -> EstimateFailed:
    return EstimateFailed(describe_rpc_error(service, exc), retryable=_retryable(exc))


async def _prompts(
    channels: ServiceChannels, job_id: str, tenant: str, spec: Mapping[str, Any]
) -> prompts_pb2.GeneratePromptsResult:
    call = STAGE_CALLS[Stage.PROMPTS]
    channel = channels.get(call.service)
    request = call.build_request(f"{job_id}.prompts.1", job_id, tenant, spec, {})
    try:
        # A prompts service that cannot be reached is reported at once: the caller is waiting.
        operation = await start_and_follow(
            channel, call, request, channels.bounds, wait_for_first_answer=False
        )
    except FollowFailed as exc:
        raise EstimateFailed(str(exc), retryable=_retryable(exc.cause)) from exc
    except asyncio.CancelledError:
        await _cancel(operations_pb2_grpc.OperationsStub(channel), request.operation_id)
        raise
    if operation.state != State.OPERATION_STATE_SUCCEEDED:
        raise EstimateFailed(f"prompts service: {operation.error.message or 'the stage did not finish'}")
    result = prompts_pb2.GeneratePromptsResult()
    operation.result.Unpack(result)
    return result


async def _cancel(operations: operations_pb2_grpc.OperationsStub, operation_id: str) -> None:
    """Ask the prompts service to stop the estimate's operation (an estimate that is given up on must
    not go on generating, and paying for, prompts), and wait a little for it to stop writing."""
    # A service that is gone, or an operation that has ended, leaves nothing to stop.
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError, TimeoutError):
        await asyncio.shield(_stop(operations, operation_id))


async def _stop(operations: operations_pb2_grpc.OperationsStub, operation_id: str) -> None:
    async with asyncio.timeout(CANCEL_SECONDS):
        request = operations_pb2.CancelOperationRequest(operation_id=operation_id)
        operation = await operations.CancelOperation(request, timeout=CANCEL_SECONDS)
        if operation.state in FINAL_STATES:
            return
        watch = operations.WatchOperation(operations_pb2.WatchOperationRequest(operation_id=operation_id))
        async for operation in watch:
            if operation.state in FINAL_STATES:
                return


async def _delete_datasets(channels: ServiceChannels, job_id: str) -> None:
    """Delete everything the estimate wrote (`jobs/<estimate id>/`); a failure is logged, not raised: the
    estimate itself is still good."""
    storage = storage_pb2_grpc.StorageStub(channels.get("storage"))
    try:
        deleted = await storage.DeletePrefix(
            storage_pb2.DeletePrefixRequest(prefix=job_prefix(job_id)), timeout=CANCEL_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        log.warning("estimate datasets not deleted", estimate_id=job_id, error=str(_failure("storage", exc)))
        return
    log.info("estimate datasets deleted", estimate_id=job_id, objects=deleted.deleted_objects)


async def _price(
    channels: ServiceChannels, dataset: operations_pb2.DatasetRef, spec: Mapping[str, Any]
) -> teacher_pb2.CostEstimate:
    if not dataset.dataset_id:
        return teacher_pb2.CostEstimate()
    stub = teacher_pb2_grpc.TeacherStub(channels.get("teacher"))
    request = teacher_pb2.EstimateCostRequest(prompts=dataset)
    request.teacher.update(dict(spec["teacher"]))
    try:
        return await stub.EstimateCost(request, timeout=120)
    except grpc.aio.AioRpcError as exc:
        raise _failure("teacher", exc) from exc


def _sum(*estimates: teacher_pb2.CostEstimate) -> teacher_pb2.CostEstimate:
    total = teacher_pb2.CostEstimate()
    for estimate in estimates:
        total.requests += estimate.requests
        total.prompt_tokens += estimate.prompt_tokens
        total.completion_tokens += estimate.completion_tokens
        total.cost_usd += estimate.cost_usd
    return total


async def estimate_job(
    channels: ServiceChannels, spec: Mapping[str, Any], tenant: str, deadline_seconds: float
) -> Estimate:
    """The prompts (built for real, for `tenant`) and the teacher's price for answering them;
    `EstimateTimedOut` after `deadline_seconds`."""
    try:
        async with asyncio.timeout(deadline_seconds):
            return await _estimate(channels, spec, tenant)
    except TimeoutError:
        raise EstimateTimedOut(
            f"the estimate took longer than {deadline_seconds:g} s and was stopped; a job with this spec "
            "may still run (the limit is the control plane's estimate_timeout_seconds)"
        ) from None


async def _estimate(channels: ServiceChannels, spec: Mapping[str, Any], tenant: str) -> Estimate:
    job_id = estimate_job_id(spec, tenant)
    try:
        prompts = await _prompts(channels, job_id, tenant, spec)
        train, holdout = await asyncio.gather(
            _price(channels, prompts.train, spec), _price(channels, prompts.holdout, spec)
        )
    finally:
        # Shielded: a deadline or a caller who went away must not leave the datasets behind.
        await asyncio.shield(_delete_datasets(channels, job_id))
    return Estimate(job_id, prompts, _sum(train, holdout))
