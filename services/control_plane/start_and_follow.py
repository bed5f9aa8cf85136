"""Starting a stage's operation in its service and following it to a final state, within bounds.

Start is idempotent on the operation id, so the one call both starts the work and re-attaches to it.
When a call fails in a way that may pass (the service is down, restarting, or has forgotten the
operation), when the progress stream closes early, or when it sends nothing, not even its heartbeat, for
the idle bound, the operation is started again with the same id (the service answers with the operation
it already has, or starts it anew if it forgot it) and followed on, until the service has gone without
answering for longer than the bounds allow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import tenacity

from stillhouse.common.operations import FINAL_STATES
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.control_plane.stage_calls import StageCall

if TYPE_CHECKING:
    from stillhouse.control_plane.config import ControlPlaneSettings

# Codes that say "the service is not there right now", not "the request is wrong".
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
# Where a message about running out of patience sends the operator.
PATIENCE_SETTING = "(the limit is the control plane's service_unavailable_timeout_seconds)"

OnUpdate = Callable[[operations_pb2.Operation], Awaitable[None]]


@dataclass(frozen=True)
class FollowBounds:
    """How long a stage's service may take to answer: each call, each silence, and in all."""

    # Deadline of each Start, the first one and every re-attach.
    call_timeout_seconds: float
    # A progress stream that sends nothing for this long is given up and re-attached.
    watch_idle_timeout_seconds: float
    # How long the service may go without answering before the operation is given up on.
    unavailable_timeout_seconds: float

    @classmethod
    def of(cls, settings: ControlPlaneSettings) -> FollowBounds:
        return cls(
            call_timeout_seconds=settings.service_call_timeout_seconds,
            watch_idle_timeout_seconds=settings.watch_idle_timeout_seconds,
            unavailable_timeout_seconds=settings.service_unavailable_timeout_seconds,
        )


class FollowFailed(Exception):
    """The operation could not be followed to a final state; the message says why, for the user, and
    `cause` is the last failure: a `grpc.aio.AioRpcError`, `StreamClosed` or `StreamStalled`."""

    def __init__(self, message: str, cause: Exception) -> None:
        super().__init__(message)
        self.cause = cause


class StreamClosed(Exception):
    """The watch stream closed before the operation was final (e.g. the service is shutting down)."""


class StreamStalled(Exception):
    """The watch stream sent nothing, not even its heartbeat, for longer than the idle bound: the
    service is stalled (a stopped process keeps its connections open) or the network is."""


def describe_rpc_error(service: str, exc: grpc.aio.AioRpcError) -> str:
    return f"{service} service: {exc.code().name}: {exc.details()}"


def _may_pass(exc: BaseException) -> bool:
    # NOT_FOUND: the service restarted and forgot the operation; starting again re-creates it.
    return isinstance(exc, StreamClosed | StreamStalled) or (
        isinstance(exc, grpc.aio.AioRpcError)
        and (exc.code() in TRANSIENT_CODES or exc.code() is grpc.StatusCode.NOT_FOUND)
    )


async def _until_idle(
    stream: grpc.aio.UnaryStreamCall, idle_seconds: float
) -> AsyncIterator[operations_pb2.Operation]:
    """The stream's messages; `StreamStalled` (the call cancelled) once none comes for `idle_seconds`."""
    messages = aiter(stream)
    while True:
        try:
            async with asyncio.timeout(idle_seconds):
                message = await anext(messages)
        except StopAsyncIteration:
            return
        except TimeoutError:
            stream.cancel()
            raise StreamStalled from None
        yield message


async def start_and_follow(
    channel: grpc.aio.Channel,
    call: StageCall,
    request: Any,
    bounds: FollowBounds,
    *,
    on_update: OnUpdate | None = None,
    wait_for_first_answer: bool = True,
) -> operations_pb2.Operation:
    """Start (or re-attach to) the operation `request` names and return it once final; `on_update` is
    awaited with every state the service sends, heartbeats and re-attaches included. `FollowFailed`
    when the service fails the call for good, or goes without answering for longer than `bounds`.

    `wait_for_first_answer=False` gives up at once on a service that has not answered yet (whoever is
    waiting is better told now); once it has, its outages are waited out as any other's."""
    return await _Follower(channel, call, request, bounds, on_update, wait_for_first_answer).run()


@dataclass
class _Follower:
    """One operation followed to its final state, re-attached after every failure that may pass."""

    channel: grpc.aio.Channel
    call: StageCall
    request: Any
    bounds: FollowBounds
    on_update: OnUpdate | None
    wait_for_first_answer: bool
    _answered: bool = field(default=False, init=False)
    _operations: operations_pb2_grpc.OperationsStub = field(init=False)
    _last_contact: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self) -> None:
        self._operations = operations_pb2_grpc.OperationsStub(self.channel)

    async def run(self) -> operations_pb2.Operation:
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_may_pass),
            wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=5.0),
            stop=self._out_of_patience,
            reraise=True,
        )
        try:
            return await retrying(self._attempt)
        except (StreamClosed, StreamStalled, grpc.aio.AioRpcError) as exc:
            raise FollowFailed(self._why(exc), exc) from exc

    @property
    def _waiting_out_outages(self) -> bool:
        return self._answered or self.wait_for_first_answer

    def _out_of_patience(self, _: tenacity.RetryCallState) -> bool:
        if not self._waiting_out_outages:
            return True
        return time.monotonic() - self._last_contact > self.bounds.unavailable_timeout_seconds

    async def _attempt(self) -> operations_pb2.Operation:
        # Start is idempotent on the operation id: after a restart, or a lost stream, this re-attaches.
        await self.call.start(self.channel, self.request, timeout=self.bounds.call_timeout_seconds)
        self._last_contact, self._answered = time.monotonic(), True
        watch = self._operations.WatchOperation(
            operations_pb2.WatchOperationRequest(operation_id=self.request.operation_id)
        )
        async for operation in _until_idle(watch, self.bounds.watch_idle_timeout_seconds):
            self._last_contact = time.monotonic()
            if self.on_update is not None:
                await self.on_update(operation)
            if operation.state in FINAL_STATES:
                return operation
        raise StreamClosed

    def _why(self, exc: Exception) -> str:
        service, patience = self.call.service, self.bounds.unavailable_timeout_seconds
        if isinstance(exc, StreamClosed):
            return f"{service} service kept closing the progress stream"
        if isinstance(exc, StreamStalled):
            return (
                f"{service} service stopped answering: nothing about operation {self.request.operation_id} "
                f"for {patience:.0f} s {PATIENCE_SETTING}"
            )
        assert isinstance(exc, grpc.aio.AioRpcError)
        if exc.code() in TRANSIENT_CODES and self._waiting_out_outages:
            return (
                f"{service} service unreachable for {patience:.0f} s: {exc.code().name}: {exc.details()} "
                f"{PATIENCE_SETTING}"
            )
        return describe_rpc_error(service, exc)
