"""Starting a stage's operation and following it to its end (what a job's stage and an estimate share),
over real gRPC in-process: re-attached by id after a lost stream, given up on past its bounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from stillhouse.common.grpc_server import OperationsServicer
from stillhouse.common.job_phases import Stage
from stillhouse.common.operations import OperationRegistry, ProgressReporter, State
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.control_plane.stage_calls import STAGE_CALLS
from stillhouse.control_plane.start_and_follow import FollowBounds, FollowFailed, start_and_follow
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

CALL = STAGE_CALLS[Stage.PROMPTS]
BOUNDS = FollowBounds(call_timeout_seconds=2, watch_idle_timeout_seconds=0.5, unavailable_timeout_seconds=1)
SETTING = "service_unavailable_timeout_seconds"
SPEC = {"prompts": {}, "teacher": {"backend": "local"}, "evaluation": {}}


class Prompts(prompts_pb2_grpc.PromptsServicer):
    """Starts each operation once, whatever the number of Start calls; its work takes a moment."""

    def __init__(self, registry: OperationRegistry) -> None:
        self.registry = registry
        self.starts: list[str] = []

    async def work(self, progress: ProgressReporter) -> prompts_pb2.GeneratePromptsResult:
        for done in (1, 2):
            await asyncio.sleep(0.1)
            progress.update(done=done, total=2, unit="prompts")
        return prompts_pb2.GeneratePromptsResult(collected=2)

    async def GeneratePrompts(self, request, context):
        self.starts.append(request.operation_id)
        return self.registry.start(
            request.operation_id,
            kind="GeneratePrompts",
            job_id=request.job_id,
            fingerprint=request.SerializeToString(deterministic=True),
            work=self.work,
        )


class LosingOperations(OperationsServicer):
    """Loses the first progress streams: `closed` of them end at once (a service shutting down), then
    `silent` send nothing at all (a stalled one); those after are served as usual."""

    def __init__(self, registry: OperationRegistry, *, closed: int = 0, silent: int = 0) -> None:
        super().__init__(registry)
        self.closed, self.silent = closed, silent

    async def WatchOperation(self, request, context) -> AsyncIterator[operations_pb2.Operation]:
        if self.closed:
            self.closed -= 1
            return
        if self.silent:
            self.silent -= 1
            await asyncio.sleep(3600)
        async for operation in super().WatchOperation(request, context):
            yield operation


@dataclass
class Service:
    prompts: Prompts
    channel: grpc.aio.Channel


@pytest.fixture
async def serve(free_port):
    """Serve Prompts with progress streams that are lost as asked; yields a function that starts it."""
    services: list[tuple[grpc.aio.Server, OperationRegistry, grpc.aio.Channel]] = []

    async def start(**losses: int) -> Service:
        registry = OperationRegistry()
        prompts = Prompts(registry)
        server = grpc.aio.server()
        operations_pb2_grpc.add_OperationsServicer_to_server(LosingOperations(registry, **losses), server)
        prompts_pb2_grpc.add_PromptsServicer_to_server(prompts, server)
        address = f"127.0.0.1:{free_port()}"
        assert server.add_insecure_port(address)
        await server.start()
        channel = grpc.aio.insecure_channel(address)
        services.append((server, registry, channel))
        return Service(prompts, channel)

    yield start
    for server, registry, channel in services:
        await channel.close()
        await registry.shutdown()
        await server.stop(None)


def request(operation_id: str = "estimate-1.prompts.1"):
    return CALL.build_request(operation_id, "estimate-1", "default", SPEC, {})


@pytest.mark.parametrize("wait_for_first_answer", [True, False])
async def test_lost_streams_are_re_attached_by_the_same_operation_id(serve, wait_for_first_answer) -> None:
    service = await serve(closed=2, silent=1)
    seen: list[operations_pb2.Operation] = []

    async def on_update(operation: operations_pb2.Operation) -> None:
        seen.append(operation)

    async with asyncio.timeout(10):
        final = await start_and_follow(
            service.channel,
            CALL,
            request(),
            BOUNDS,
            on_update=on_update,
            wait_for_first_answer=wait_for_first_answer,
        )
    assert final.state == State.OPERATION_STATE_SUCCEEDED
    assert seen[-1] == final
    # Three streams lost, so four Starts, all of the one operation: the work ran once.
    assert service.prompts.starts == ["estimate-1.prompts.1"] * 4
    result = prompts_pb2.GeneratePromptsResult()
    assert final.result.Unpack(result) and result.collected == 2


async def test_a_stream_silent_for_longer_than_the_bound_is_given_up_naming_the_operation(serve) -> None:
    service = await serve(silent=1)
    # Silent for longer than the service may go without answering: no re-attach comes in time.
    bounds = FollowBounds(
        call_timeout_seconds=2, watch_idle_timeout_seconds=1.5, unavailable_timeout_seconds=1
    )
    with pytest.raises(FollowFailed) as failed:
        await start_and_follow(service.channel, CALL, request("job-1.prompts.1"), bounds)
    assert str(failed.value) == (
        "prompts service stopped answering: nothing about operation job-1.prompts.1 for 1 s "
        f"(the limit is the control plane's {SETTING})"
    )


async def test_a_service_that_never_answered_is_waited_for_only_when_asked(free_port) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as nowhere:
        started = time.monotonic()
        with pytest.raises(FollowFailed) as waited:
            await start_and_follow(nowhere, CALL, request(), BOUNDS)
        assert time.monotonic() - started >= 1
        assert str(waited.value).startswith("prompts service unreachable for 1 s: UNAVAILABLE: ")
        assert str(waited.value).endswith(f"(the limit is the control plane's {SETTING})")

        started = time.monotonic()
        with pytest.raises(FollowFailed) as told:
            await start_and_follow(nowhere, CALL, request(), BOUNDS, wait_for_first_answer=False)
        assert time.monotonic() - started < 1
        assert str(told.value).startswith("prompts service: UNAVAILABLE: ")
        assert isinstance(told.value.cause, grpc.aio.AioRpcError)
