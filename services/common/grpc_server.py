"""What every Stillhouse gRPC service process shares: the callers' check, health, reflection, metrics,
logs, shutdown.

A service's `server.py` builds its servicers (opening first what they need, if anything) and calls
`run_grpc_service`; this module does the rest.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import grpc
import prometheus_client
import structlog
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stillhouse.common import grpc_keepalive as keepalive
from stillhouse.common.config import GrpcServiceSettings
from stillhouse.common.logging import configure_logging
from stillhouse.common.metrics_listener import start_metrics_listener
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.operations import (
    OperationConflict,
    OperationError,
    OperationNotFound,
    OperationRegistry,
)
from stillhouse.common.service_auth import caller_check
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc

log = structlog.get_logger(__name__)

RPC_HANDLED = prometheus_client.Counter(
    "stillhouse_grpc_server_handled_total", "RPCs completed, by method and status code.", ["method", "code"]
)
RPC_SECONDS = prometheus_client.Histogram(
    "stillhouse_grpc_server_handling_seconds", "Time to handle an RPC (to the last message).", ["method"]
)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    @staticmethod
    def _record(method: str, context: grpc.aio.ServicerContext, started: float, error: bool) -> None:
        code = context.code() or (grpc.StatusCode.UNKNOWN if error else grpc.StatusCode.OK)
        RPC_HANDLED.labels(method, code.name).inc()
        RPC_SECONDS.labels(method).observe(time.perf_counter() - started)

    @contextmanager
    def _recorded(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
        started, error = time.perf_counter(), False
        try:
            yield
        except BaseException:
            error = True
            raise
        finally:
            self._record(method, context, started, error)

    def _wrap_unary(self, behaviour, method: str):
        async def wrapped(request, context):
            with self._recorded(method, context):
                return await behaviour(request, context)

        return wrapped

    def _wrap_stream(self, behaviour, method: str):
        async def wrapped(request, context):
            with self._recorded(method, context):
                async for response in behaviour(request, context):
                    yield response

        return wrapped


async def abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Translate an error from the operation layer into the gRPC status it stands for."""
    if isinstance(exc, OperationNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, OperationConflict):
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
    if isinstance(exc, OperationError):
        await context.abort(exc.code, exc.message)
    raise exc


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    def __init__(self, registry: OperationRegistry) -> None:
        self._registry = registry

    async def GetOperation(self, request, context):
        try:
            return self._registry.get(request.operation_id)
        except OperationNotFound as exc:
            await abort_for(context, exc)

    async def WatchOperation(self, request, context) -> AsyncIterator[operations_pb2.Operation]:
        try:
            async for operation in self._registry.watch(request.operation_id):
                yield operation
        except OperationNotFound as exc:
            await abort_for(context, exc)

    async def CancelOperation(self, request, context):
        try:
            return self._registry.cancel(request.operation_id)
        except OperationNotFound as exc:
            await abort_for(context, exc)


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to serve: its full name and the function that adds it to a server."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]

    @classmethod
    def of(
        cls, service: ServiceDescriptor, add_servicer: Callable[[Any, grpc.aio.Server], None], servicer: Any
    ) -> ServiceBinding:
        """`servicer` of `service`, added by the generated `add_<Service>Servicer_to_server`."""
        return cls(service.full_name, lambda server: add_servicer(servicer, server))


# Builds a service's servicers on the process's operation registry; returns what to serve.
ServiceBuild = Callable[[OperationRegistry], Iterable[ServiceBinding]]


@dataclass
class ServiceContext:
    """What a service's setup builds its servicers on: the process's operation registry, its service
    credentials (which check callers and go with calls to other services) and its object store."""

    registry: OperationRegistry
    credentials: ServiceCredentials
    settings: GrpcServiceSettings

    @cached_property
    def store(self) -> ObjectStore:
        """The object store the settings name, opened on first use."""
        return open_object_store(self.settings.object_store)


# The build of a service that must first open what it serves with (stores, a database, background tasks):
# entered before the server is built and left after it has stopped, so what it opened is closed last.
ServiceSetup = Callable[[ServiceContext], AbstractAsyncContextManager[Iterable[ServiceBinding]]]


def _setup_of(build: ServiceBuild) -> ServiceSetup:
    """The setup of a service that opens nothing: its build, as it is."""

    @asynccontextmanager
    async def setup(service: ServiceContext) -> AsyncIterator[Iterable[ServiceBinding]]:
        yield build(service.registry)

    return setup


def _server(
    settings: GrpcServiceSettings,
    check: grpc.aio.ServerInterceptor | None,
    registry: OperationRegistry,
    bindings: Iterable[ServiceBinding],
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, list[str]]:
    """The server with the operations, the service's own bindings, health and (when set) reflection;
    with the full names of what it serves."""
    # The metrics come first, so they count the calls the token check refuses.
    server = grpc.aio.server(
        interceptors=[MetricsInterceptor(), *([check] if check else [])],
        options=[("grpc.max_receive_message_length", settings.max_request_bytes), *keepalive.SERVER_OPTIONS],
    )
    operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(registry), server)
    names = [operations_pb2.DESCRIPTOR.services_by_name["Operations"].full_name]
    for binding in bindings:
        binding.add_to_server(server)
        names.append(binding.full_name)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    return server, health_servicer, names


def _listen(
    server: grpc.aio.Server, settings: GrpcServiceSettings, tls: grpc.ServerCredentials | None
) -> int:
    """The port the server listens on, with TLS when the credentials have it."""
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port} (in use, or not a local address)")
    return port


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve_grpc(settings: GrpcServiceSettings, setup: ServiceSetup) -> None:
    """Serve until SIGTERM/SIGINT, then report NOT_SERVING, stop running operations and drain.

    ServiceCredentialsError, before anything is opened or listens, when the settings give no usable
    token."""
    credentials = ServiceCredentials.load(settings)
    check = caller_check(settings, credentials)
    registry = OperationRegistry()
    async with setup(ServiceContext(registry, credentials, settings)) as bindings:
        server, health_servicer, names = _server(settings, check, registry, bindings)
        tls = credentials.server_credentials()
        port = _listen(server, settings, tls)
        metrics = (
            start_metrics_listener(settings.host, settings.metrics_port)
            if settings.metrics_port is not None
            else None
        )
        await server.start()
        for name in ["", *names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            address=f"{settings.host}:{port}",
            services=names,
            metrics_port=metrics.port if metrics else None,
            tls=tls is not None,
            reflection=settings.reflection,
        )
        await _until_signalled()

        log.info("stopping", grace_seconds=settings.shutdown_grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        await registry.shutdown()
        await server.stop(settings.shutdown_grace_seconds)
        if metrics is not None:
            metrics.close()
        log.info("stopped")


def run_grpc_service(
    service_label: str,
    settings: GrpcServiceSettings,
    build: ServiceBuild | None = None,
    *,
    setup: ServiceSetup | None = None,
) -> None:
    """Blocking entry point of a service process (`stillhouse serve <service>`): serves what `build`
    returns or, for a service that opens things first, what `setup` yields (one of the two)."""
    if (build is None) == (setup is None):
        raise TypeError("run_grpc_service takes one of `build` and `setup`")
    configure_logging(settings.log_level, settings.log_format, service=service_label)
    asyncio.run(serve_grpc(settings, setup or _setup_of(build)))
