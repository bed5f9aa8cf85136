"""Drives each job through its stages by calling the stage services over gRPC.

Every step is written to the store before it starts (with its operation id) and after it ends, and
every service call is idempotent on that id. A control plane that is killed and started again finds
each unfinished job in the store and carries on: a finished step is not run again, and a running one is
re-attached by calling Start again with the same id, which the service answers with the operation it
already has (or starts anew if the service itself forgot it). The id is recorded before Start is sent and
is the same for every try of one attempt (`operation_id_for`), so no Start can go out under an id the
store does not hold.

Among control planes sharing a database, only the leader's orchestrator drives jobs (`leadership`,
`dispatch`): a new leader resumes the unfinished jobs exactly as a restarted control plane does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import grpc
import structlog
import tenacity

from stillhouse.common.database_retry import describe, is_transient
from stillhouse.common.job_phases import STAGE_OF_PHASE, Phase, Stage, StepState, next_phase
from stillhouse.common.operations import State
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.job_metrics import RUNNING_STAGES, entered_phase, stage_ended
from stillhouse.control_plane.progress_events import ProgressEvents
from stillhouse.control_plane.stage_calls import STAGE_CALLS, StageCall, operation_id_for, result_to_json
from stillhouse.control_plane.start_and_follow import (
    FollowBounds,
    FollowFailed,
    describe_rpc_error,
    start_and_follow,
)
from stillhouse.control_plane.store import JobRecord, JobStore, LeaseLost, StepRecord

log = structlog.get_logger(__name__)

# How long a cancelled operation gets to stop before the job is marked Cancelled anyway.
CANCEL_GRACE_SECONDS = 30.0


class StageFailed(Exception):
    """The stage ended without a result; the message says why, for the user."""


class StageCancelled(Exception):
    pass


class ServiceChannels:
    """One gRPC channel per stage service, opened on first use; every call carries the service credential,
    and a stage's operation is followed within `bounds`."""

    def __init__(
        self, addresses: Mapping[str, str], credentials: ServiceCredentials, bounds: FollowBounds
    ) -> None:
        self._addresses = dict(addresses)
        self._credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.bounds = bounds

    def get(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = self._credentials.open_channel(self._addresses[service])
        return self._channels[service]

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))
        self._channels.clear()


def _status_text(service: str, operation: operations_pb2.Operation) -> str:
    code = grpc.StatusCode.UNKNOWN
    for candidate in grpc.StatusCode:
        if candidate.value[0] == operation.error.code:
            code = candidate
    return f"{service} service: {code.name}: {operation.error.message}"


@dataclass
class Orchestrator:
    """Drives jobs through their stages, recording their steps and events in `store` and notifying `bus`
    of each phase change and event; a running stage's progress becomes an event at most once per
    `progress_interval_seconds`."""

    store: JobStore
    channels: ServiceChannels
    bus: JobEventBus
    _: KW_ONLY
    progress_interval_seconds: float
    _runners: dict[str, asyncio.Task] = field(default_factory=dict, init=False)
    _cancel_requests: dict[str, asyncio.Event] = field(default_factory=dict, init=False)

    async def resume_unfinished(self) -> int:
        """Drive every unfinished job not driven yet (one a previous leader left, or one submitted through
        another control plane) and pass on the cancel requests the store holds: how many it picked up."""
        jobs = await self.store.unfinished_jobs()
        picked_up = [job.id for job in jobs if self.run(job.id)]
        for job in jobs:
            if job.cancel_requested:
                self.request_cancel(job.id)
        if picked_up:
            log.info("resuming unfinished jobs", count=len(picked_up))
        return len(picked_up)

    def run(self, job_id: str) -> bool:
        """Drive the job, unless it is being driven already (then False)."""
        if job_id in self._runners and not self._runners[job_id].done():
            return False
        self._cancel_requests.setdefault(job_id, asyncio.Event())
        self._runners[job_id] = asyncio.create_task(self._drive(job_id), name=f"job {job_id}")
        return True

    def request_cancel(self, job_id: str) -> None:
        """Wake the job's runner after the store has recorded the cancel request (a job not being driven
        finds the request in the store when it is)."""
        if job_id in self._cancel_requests:
            self._cancel_requests[job_id].set()

    async def stop(self) -> None:
        """Stop driving jobs; they stay as they are in the store and carry on after a restart."""
        runners = list(self._runners.values())
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        self._runners.clear()

    @property
    def running_jobs(self) -> int:
        return sum(not runner.done() for runner in self._runners.values())

    # --- one job -----------------------------------------------------------------------------------

    async def _drive(self, job_id: str) -> None:
        bound = log.bind(job_id=job_id)

        def log_outage(state: tenacity.RetryCallState) -> None:
            assert state.outcome is not None
            bound.warning(
                "job store unavailable; driving the job on after a pause",
                error=describe(state.outcome.exception()),
                retry_in_seconds=round(state.upcoming_sleep, 1),
            )

        # The store has already retried each call; what still fails is an outage that the job outlasts,
        # pausing up to 30 s between tries, then carrying on from whatever the store says (the steps
        # make that safe), until the orchestrator stops.
        outlast_store_outages = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_exponential_jitter(max=30.0),
            before_sleep=log_outage,
        )
        try:
            async for attempt in outlast_store_outages:
                with attempt:
                    while True:
                        job = await self.store.get_job(job_id)
                        if job.phase.is_terminal:
                            return
                        if job.cancel_requested:
                            await self._cancel_running_step(job)
                            await self._set_phase(job_id, Phase.CANCELLED, "cancelled on request")
                            return
                        if job.phase is Phase.PENDING:
                            await self._set_phase(job_id, next_phase(job.phase))
                            continue
                        stage = STAGE_OF_PHASE[job.phase]
                        try:
                            await self._run_stage(job, stage)
                        except StageCancelled:
                            await self._set_phase(job_id, Phase.CANCELLED, "cancelled on request")
                            return
                        except StageFailed as exc:
                            await self._fail(job_id, str(exc))
                            return
                        await self._set_phase(job_id, next_phase(job.phase))
        except asyncio.CancelledError:
            raise
        except LeaseLost as exc:
            bound.warning("no longer leading: the job is left to the next leader", error=str(exc))
        except Exception as exc:  # a bug: the job must not hang in a working phase
            bound.exception("job runner crashed")
            await self._fail(job_id, f"internal error in the control plane: {type(exc).__name__}: {exc}")
        finally:
            self._cancel_requests.pop(job_id, None)
            self._runners.pop(job_id, None)

    async def _set_phase(self, job_id: str, phase: Phase, message: str | None = None) -> None:
        job = await self.store.set_phase(job_id, phase, message)
        entered_phase(job.tenant, phase)
        log.info("job phase", job_id=job_id, phase=phase.value, message=message)
        self.bus.notify()

    async def _fail(self, job_id: str, message: str) -> None:
        await self.store.append_event(job_id, "error", {"message": message})
        await self._set_phase(job_id, Phase.FAILED, message)

    async def _stage_results(self, job_id: str) -> dict[Stage, Mapping[str, Any]]:
        steps = await self.store.steps(job_id)
        return {step.stage: step.result or {} for step in steps if step.state is StepState.SUCCEEDED}

    async def _run_stage(self, job: JobRecord, stage: Stage) -> None:
        call = STAGE_CALLS[stage]
        step = await self.store.get_step(job.id, stage)
        # A step that ended before a restart, whose phase change was lost: act on how it ended.
        if step is not None and step.state is StepState.SUCCEEDED:
            return
        if step is not None and step.state is StepState.FAILED:
            raise StageFailed(step.error or f"{call.service} service: the step failed")
        if step is not None and step.state is StepState.CANCELLED:
            raise StageCancelled
        if step is None:
            step = await self.store.begin_step(job.id, stage, operation_id_for(job.id, stage, attempt=1))
        results = await self._stage_results(job.id)
        request = call.build_request(step.operation_id, job.id, job.tenant, job.document["spec"], results)
        RUNNING_STAGES.began(job.id, stage)
        try:
            operation = await self._until_final(job.id, call, step, request)
        except StageFailed as exc:
            await self._finish_step(step, StepState.FAILED, error=str(exc))
            raise
        except StageCancelled:
            await self._finish_step(step, StepState.CANCELLED, error="cancelled on request")
            raise
        finally:
            RUNNING_STAGES.ended(job.id)

        if operation.state == State.OPERATION_STATE_SUCCEEDED:
            result = call.result_type()
            operation.result.Unpack(result)
            await self._finish_step(step, StepState.SUCCEEDED, result=result_to_json(result))
            return
        message = _status_text(call.service, operation)
        if operation.state == State.OPERATION_STATE_CANCELLED:
            await self._finish_step(step, StepState.CANCELLED, error=message)
            if self._cancel_requests[job.id].is_set() or (await self.store.get_job(job.id)).cancel_requested:
                raise StageCancelled
            raise StageFailed(message)
        await self._finish_step(step, StepState.FAILED, error=message)
        raise StageFailed(message)

    async def _finish_step(self, step: StepRecord, state: StepState, **outcome: Any) -> None:
        """Record how the step ended, and its time from start to end in the stage metrics."""
        finished = await self.store.finish_step(step.job_id, step.stage, state, **outcome)
        ended_at = finished.finished_at if finished.finished_at is not None else step.started_at
        stage_ended(step.stage, state.value, (ended_at - step.started_at).total_seconds())

    async def _until_final(
        self, job_id: str, call: StageCall, step: StepRecord, request
    ) -> operations_pb2.Operation:
        """Start (or re-attach to) the step's operation and follow it to a final state."""
        watcher = asyncio.create_task(self._follow(job_id, call, request))
        cancel_requested = asyncio.create_task(self._cancel_requests[job_id].wait())
        try:
            done, _ = await asyncio.wait({watcher, cancel_requested}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                return watcher.result()
            if not await self._cancel_operation(call, step.operation_id):
                raise StageCancelled  # nothing is running there that could still finish
            try:
                return await asyncio.wait_for(asyncio.shield(watcher), CANCEL_GRACE_SECONDS)
            except TimeoutError:
                raise StageCancelled from None
        finally:
            for task in (watcher, cancel_requested):
                task.cancel()

    async def _follow(self, job_id: str, call: StageCall, request) -> operations_pb2.Operation:
        async def write(operation: operations_pb2.Operation) -> None:
            await self._progress_event(job_id, call.stage, operation)

        progress = ProgressEvents(write, self.progress_interval_seconds)
        channel, bounds = self.channels.get(call.service), self.channels.bounds
        try:
            return await start_and_follow(channel, call, request, bounds, on_update=progress.seen)
        except FollowFailed as exc:
            raise StageFailed(str(exc)) from exc

    async def _cancel_running_step(self, job: JobRecord) -> None:
        """A cancel request found after a restart: stop the work the previous control plane started."""
        stage = STAGE_OF_PHASE.get(job.phase)
        step = await self.store.get_step(job.id, stage) if stage else None
        if step is not None and step.state is StepState.RUNNING:
            await self._cancel_operation(STAGE_CALLS[stage], step.operation_id)
            await self._finish_step(step, StepState.CANCELLED, error="cancelled on request")

    async def _cancel_operation(self, call: StageCall, operation_id: str) -> bool:
        """Ask the service to stop the operation; False when the service does not have it running."""
        stub = operations_pb2_grpc.OperationsStub(self.channels.get(call.service))
        try:
            await stub.CancelOperation(
                operations_pb2.CancelOperationRequest(operation_id=operation_id), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "cancel did not reach the operation",
                operation_id=operation_id,
                error=describe_rpc_error(call.service, exc),
            )
            return False
        return True

    async def _progress_event(self, job_id: str, stage: Stage, operation: operations_pb2.Operation) -> None:
        RUNNING_STAGES.progressed(job_id, stage)
        progress = operation.progress
        await self.store.append_event(
            job_id,
            "progress",
            {
                "stage": stage.value,
                "state": State.Name(operation.state).removeprefix("OPERATION_STATE_").lower(),
                "unit": progress.unit,
                "done": progress.done,
                "total": progress.total,
                "message": progress.message,
                "metrics": dict(progress.metrics),
            },
        )
        self.bus.notify()
