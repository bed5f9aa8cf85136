"""What every service process shares: the service token, health, reflection, refused requests, metrics,
JSON logs, SIGTERM.

The service processes run for real (`stillhouse serve <service>`); the operations adapter is also tested
in-process over a real grpc.aio server.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import httpx
import prometheus_client
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families
from service_token import SERVICE_TOKEN, authorized_channel, token_metadata

from stillhouse.common.grpc_server import MetricsInterceptor, OperationsServicer, abort_for
from stillhouse.common.operations import (
    OperationConflict,
    OperationError,
    OperationRegistry,
    ProgressReporter,
)
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

OPERATIONS = "stillhouse.common.v1.Operations"
OPERATIONS_SERVICE = operations_pb2.DESCRIPTOR.services_by_name["Operations"]
PROMPTS = "stillhouse.prompts.v1.Prompts"
State = operations_pb2.OperationState


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    address: str
    metrics_url: str
    log: Callable[[], str]


@pytest.fixture
def serve(processes, free_port, wait_until, grpc_ready) -> Callable[[str], ServiceProcess]:
    """Start `stillhouse serve <service>` on free ports and wait until it reports SERVING."""

    def start(service: str, **env: str) -> ServiceProcess:
        port, metrics_port = free_port(), free_port()
        argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", service]
        argv += ["--port", str(port), "--metrics-port", str(metrics_port)]
        process = processes.start(service, argv, env)
        address = f"127.0.0.1:{port}"
        wait_until(lambda: grpc_ready(address) or process.poll() is not None, 30, f"the {service} service")
        assert process.poll() is None, processes.log(service)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        return ServiceProcess(service, process, address, metrics_url, lambda: processes.log(service))

    return start


def health_status(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def handled_counts(metrics_url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(metrics_url, timeout=5).text
    return {
        (sample.labels["method"], sample.labels["code"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "stillhouse_grpc_server_handled"
        for sample in family.samples
        if sample.name == "stillhouse_grpc_server_handled_total"
    }


def reflected_services(channel: grpc.Channel) -> set[str]:
    return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_health_is_open_and_reflection_off_by_default(serve) -> None:
    service = serve("prompts")
    # Health needs no token: Kubernetes probes send none.
    with grpc.insecure_channel(service.address) as channel:
        for name in ("", PROMPTS, OPERATIONS):
            assert health_status(channel, name) == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as caught:
            health_status(channel, "stillhouse.kitchen.v1.Kitchen")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with authorized_channel(service.address) as channel, pytest.raises(grpc.RpcError) as caught:
        reflected_services(channel)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_when_turned_on_needs_the_token(serve) -> None:
    service = serve("prompts", STILLHOUSE_PROMPTS_REFLECTION="true")
    with grpc.insecure_channel(service.address) as channel, pytest.raises(grpc.RpcError) as caught:
        reflected_services(channel)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with authorized_channel(service.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {PROMPTS, OPERATIONS, "grpc.health.v1.Health"} <= services
        # Reflection serves whole descriptors, so a client can call the service knowing only its name.
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName(PROMPTS).methods_by_name["GeneratePrompts"]
        assert method.output_type.full_name == "stillhouse.common.v1.Operation"
        assert "WatchOperation" in pool.FindServiceByName(OPERATIONS).methods_by_name


def test_refused_requests_and_unknown_operations_are_answered_and_counted(serve) -> None:
    service = serve("prompts")
    with authorized_channel(service.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            prompts_pb2_grpc.PromptsStub(channel).GeneratePrompts(
                prompts_pb2.GeneratePromptsRequest(operation_id="op-1", job_id="job-1"), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        operations = operations_pb2_grpc.OperationsStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as caught:
                operations.GetOperation(operations_pb2.GetOperationRequest(operation_id="nope"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert "'nope'" in caught.value.details()

    counts = handled_counts(service.metrics_url)
    assert counts[(f"/{PROMPTS}/GeneratePrompts", "INVALID_ARGUMENT")] == 1
    assert counts[(f"/{OPERATIONS}/GetOperation", "NOT_FOUND")] == 2
    assert counts[("/grpc.health.v1.Health/Check", "OK")] >= 1
    assert (f"/{OPERATIONS}/GetOperation", "OK") not in counts

    with grpc.insecure_channel(service.address) as channel, pytest.raises(grpc.RpcError):
        operations_pb2_grpc.OperationsStub(channel).GetOperation(
            operations_pb2.GetOperationRequest(operation_id="nope"), timeout=5
        )
    assert handled_counts(service.metrics_url)[(f"/{OPERATIONS}/GetOperation", "UNAUTHENTICATED")] == 1


def test_sigterm_stops_cleanly_with_json_logs(serve, processes) -> None:
    service = serve("prompts")
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(10) == 0
    processes.running.pop("prompts")

    lines = [line for line in processes.log("prompts").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert all(isinstance(record, dict) and record["service"] == "prompts" for record in records), lines
    events = [record["event"] for record in records]
    assert events.index("serving") < events.index("stopping") < events.index("stopped")


@pytest.mark.parametrize(
    ("service", "full_name"),
    [
        ("prompts", "stillhouse.prompts.v1.Prompts"),
        ("teacher", "stillhouse.teacher.v1.Teacher"),
        ("storage", "stillhouse.storage.v1.Storage"),
        ("trainer", "stillhouse.trainer.v1.Trainer"),
    ],
)
def test_every_stage_service_serves_its_contract_to_token_holders_only(
    serve, service: str, full_name: str
) -> None:
    running = serve(service)
    module = importlib.import_module(f"stillhouse.{service}.server")
    assert module.SERVICE.full_name == full_name
    with grpc.insecure_channel(running.address) as channel:
        assert health_status(channel, full_name) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(channel, OPERATIONS) == health_pb2.HealthCheckResponse.SERVING
        for method in [*module.SERVICE.methods, *OPERATIONS_SERVICE.methods]:
            call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}")
            for metadata, words in [
                ((), "send the metadata `authorization: Bearer <token>`"),
                (token_metadata("x" * 40), "not one this service accepts"),
                ((("authorization", "Basic dXNlcjpwYXNz"),), "must be one `Bearer <service token>`"),
            ]:
                with pytest.raises(grpc.RpcError) as refused:
                    call(b"", metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name
                assert words in refused.value.details()
                assert SERVICE_TOKEN not in refused.value.details()
    assert SERVICE_TOKEN not in running.log()
    with authorized_channel(running.address) as channel:
        for method in module.SERVICE.methods:
            # An empty request is a valid proto3 message of any type.
            call = channel.unary_unary(f"/{full_name}/{method.name}")
            try:
                call(b"", timeout=10)
            except grpc.RpcError as error:
                code, details = error.code(), error.details()
            else:
                code, details = grpc.StatusCode.OK, ""
            # A request with nothing in it is the caller's mistake: a clear status, never a crash.
            assert code not in (
                grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNIMPLEMENTED,
            ), (
                method.name,
                details,
            )


# --- the operations adapter, in-process ---------------------------------------------------------


class StartingPrompts(prompts_pb2_grpc.PromptsServicer):
    """A Start-style RPC as a stage service writes one: register the work, translate errors."""

    def __init__(self, registry: OperationRegistry) -> None:
        self.registry = registry
        self.proceed: asyncio.Queue[None] = asyncio.Queue()

    async def work(self, progress: ProgressReporter) -> prompts_pb2.GeneratePromptsResult:
        for done in (1, 2):
            progress.update(done=done, total=2, unit="prompts")
            await self.proceed.get()
        return prompts_pb2.GeneratePromptsResult(collected=2)

    async def GeneratePrompts(self, request, context):
        try:
            return self.registry.start(
                request.operation_id,
                kind=f"{PROMPTS}/GeneratePrompts",
                job_id=request.job_id,
                fingerprint=request.SerializeToString(deterministic=True),
                work=self.work,
            )
        except (OperationError, OperationConflict) as exc:
            await abort_for(context, exc)


@dataclass
class InProcess:
    registry: OperationRegistry
    prompts: StartingPrompts
    channel: grpc.aio.Channel


@pytest.fixture
async def in_process(free_port) -> AsyncIterator[InProcess]:
    registry = OperationRegistry()
    prompts = StartingPrompts(registry)
    server = grpc.aio.server(interceptors=[MetricsInterceptor()])
    operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(registry), server)
    prompts_pb2_grpc.add_PromptsServicer_to_server(prompts, server)
    address = f"127.0.0.1:{free_port()}"
    assert server.add_insecure_port(address)
    await server.start()
    async with grpc.aio.insecure_channel(address) as channel:
        yield InProcess(registry, prompts, channel)
    await registry.shutdown()
    await server.stop(None)


def handled(method: str, code: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "stillhouse_grpc_server_handled_total", {"method": method, "code": code}
    )
    return value or 0.0


async def test_start_then_watch_until_final(in_process: InProcess) -> None:
    prompts = prompts_pb2_grpc.PromptsStub(in_process.channel)
    operations = operations_pb2_grpc.OperationsStub(in_process.channel)
    watched_before = handled(f"/{OPERATIONS}/WatchOperation", "OK")
    request = prompts_pb2.GeneratePromptsRequest(operation_id="op-1", job_id="job-1")

    started = await prompts.GeneratePrompts(request, timeout=5)
    assert (started.id, started.job_id, started.state) == ("op-1", "job-1", State.OPERATION_STATE_RUNNING)
    again = await prompts.GeneratePrompts(request, timeout=5)
    assert again.create_time == started.create_time

    seen = []
    async with asyncio.timeout(10):
        async for operation in operations.WatchOperation(
            operations_pb2.WatchOperationRequest(operation_id="op-1")
        ):
            seen.append((operation.state, operation.progress.done))
            if operation.state == State.OPERATION_STATE_RUNNING and operation.progress.done > 0:
                in_process.prompts.proceed.put_nowait(None)
    running = State.OPERATION_STATE_RUNNING
    assert seen[-1] == (State.OPERATION_STATE_SUCCEEDED, 2)
    assert [entry for entry in seen if entry[1] > 0] == [(running, 1), (running, 2), seen[-1]]

    final = await operations.GetOperation(operations_pb2.GetOperationRequest(operation_id="op-1"), timeout=5)
    result = prompts_pb2.GeneratePromptsResult()
    assert final.result.Unpack(result)
    assert result.collected == 2
    assert handled(f"/{OPERATIONS}/WatchOperation", "OK") == watched_before + 1


async def test_cancel_over_grpc(in_process: InProcess) -> None:
    prompts = prompts_pb2_grpc.PromptsStub(in_process.channel)
    operations = operations_pb2_grpc.OperationsStub(in_process.channel)
    request = prompts_pb2.GeneratePromptsRequest(operation_id="op-2", job_id="job-1")
    await prompts.GeneratePrompts(request, timeout=5)

    watch = operations.WatchOperation(operations_pb2.WatchOperationRequest(operation_id="op-2"))
    async with asyncio.timeout(10):
        first = await watch.read()
        assert first.state == State.OPERATION_STATE_RUNNING
        await operations.CancelOperation(
            operations_pb2.CancelOperationRequest(operation_id="op-2"), timeout=5
        )
        states = [first.state]
        while (operation := await watch.read()) is not grpc.aio.EOF:
            states.append(operation.state)
    assert states[-1] == State.OPERATION_STATE_CANCELLED
    final = await operations.GetOperation(operations_pb2.GetOperationRequest(operation_id="op-2"), timeout=5)
    assert final.error.code == grpc.StatusCode.CANCELLED.value[0]
    # Cancelling again, once finished, changes nothing.
    after = await operations.CancelOperation(
        operations_pb2.CancelOperationRequest(operation_id="op-2"), timeout=5
    )
    assert after == final


async def test_operation_errors_become_grpc_statuses(in_process: InProcess) -> None:
    prompts = prompts_pb2_grpc.PromptsStub(in_process.channel)
    operations = operations_pb2_grpc.OperationsStub(in_process.channel)
    await prompts.GeneratePrompts(
        prompts_pb2.GeneratePromptsRequest(operation_id="op-3", job_id="job-1"), timeout=5
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await prompts.GeneratePrompts(
            prompts_pb2.GeneratePromptsRequest(operation_id="op-3", job_id="job-2"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'op-3' already exists with a different request" in caught.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await prompts.GeneratePrompts(prompts_pb2.GeneratePromptsRequest(job_id="job-1"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    for call in (
        operations.GetOperation(operations_pb2.GetOperationRequest(operation_id="nope"), timeout=5),
        operations.CancelOperation(operations_pb2.CancelOperationRequest(operation_id="nope"), timeout=5),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    watch = operations.WatchOperation(operations_pb2.WatchOperationRequest(operation_id="nope"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
