"""Long-running operations inside a service: start once per id, report progress, cancel, finish.

A stage service hands `OperationRegistry.start` a coroutine function that does the work; the registry
runs it as a task, keeps the `Operation` message up to date and wakes watchers on every change. The gRPC
adapter (`OperationsServicer` in `grpc_server`) only translates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import structlog
from google.protobuf import any_pb2, message, timestamp_pb2
from google.rpc import status_pb2

from stillhouse.common.v1 import operations_pb2

State = operations_pb2.OperationState
FINAL_STATES = frozenset(
    {State.OPERATION_STATE_SUCCEEDED, State.OPERATION_STATE_FAILED, State.OPERATION_STATE_CANCELLED}
)

log = structlog.get_logger(__name__)

# A watch re-sends the operation at least this often, unchanged or not: a watcher that hears nothing
# for several times this long knows the service has stalled (a stopped process keeps its connections).
WATCH_HEARTBEAT_SECONDS = 5.0


def request_fingerprint(request: message.Message) -> bytes:
    """What a Start request asks for, without its operation id: the same id with another fingerprint is a
    conflict, the same fingerprint a repeat."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("operation_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


class OperationError(Exception):
    """A failure the caller should see with this gRPC status code (bad input, missing data...)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProgressReporter:
    """Handed to the work function so it can report progress without knowing about gRPC."""

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry

    def update(
        self,
        *,
        done: int | None = None,
        total: int | None = None,
        unit: str | None = None,
        message: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        progress = self._entry.operation.progress
        if unit is not None:
            progress.unit = unit
        if done is not None:
            progress.done = done
        if total is not None:
            progress.total = total
        if message is not None:
            progress.message = message
        if metrics:
            progress.metrics.update(metrics)
        self._entry.changed()


Work = Callable[[ProgressReporter], Awaitable[message.Message]]


def _mark_cancelled(operation: operations_pb2.Operation) -> None:
    operation.state = State.OPERATION_STATE_CANCELLED
    operation.error.CopyFrom(status_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0], message="cancelled"))


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass
class _Entry:
    operation: operations_pb2.Operation
    fingerprint: bytes
    task: asyncio.Task | None = None
    version: int = 0
    condition: asyncio.Condition = field(default_factory=asyncio.Condition)
    finished_at: float | None = None

    def changed(self) -> None:
        self.operation.update_time.CopyFrom(_now())
        self.version += 1
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.condition:
            self.condition.notify_all()

    @property
    def is_final(self) -> bool:
        return self.operation.state in FINAL_STATES


class OperationNotFound(LookupError):
    def __init__(self, operation_id: str) -> None:
        super().__init__(f"no operation {operation_id!r} on this service (never started, or forgotten)")


class OperationConflict(ValueError):
    def __init__(self, operation_id: str) -> None:
        super().__init__(
            f"operation {operation_id!r} already exists with a different request; "
            "choose a new operation id for new work"
        )


class OperationRegistry:
    """The operations of one service process. Finished ones are kept until `retain_finished` is exceeded."""

    def __init__(
        self, retain_finished: int = 10_000, heartbeat_seconds: float = WATCH_HEARTBEAT_SECONDS
    ) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._retain_finished = retain_finished
        self._heartbeat_seconds = heartbeat_seconds
        self._shutting_down = False

    @property
    def shutting_down(self) -> bool:
        """True once the process is stopping: a cancelled work function can tell a restart from a user's
        cancel, and leave work that outlives the process (e.g. a job on a cluster) running."""
        return self._shutting_down

    def start(self, operation_id: str, *, kind: str, job_id: str, fingerprint: bytes, work: Work):
        """Start `work` under `operation_id`, or return the operation already running under it."""
        if not operation_id:
            raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, "operation_id must not be empty")
        existing = self._entries.get(operation_id)
        if existing is not None:
            if existing.fingerprint != fingerprint:
                raise OperationConflict(operation_id)
            return self._snapshot(existing)
        operation = operations_pb2.Operation(
            id=operation_id,
            kind=kind,
            job_id=job_id,
            state=State.OPERATION_STATE_RUNNING,
            create_time=_now(),
            update_time=_now(),
        )
        entry = _Entry(operation=operation, fingerprint=fingerprint)
        self._entries[operation_id] = entry
        entry.task = asyncio.get_running_loop().create_task(self._run(entry, work), name=operation_id)
        entry.task.add_done_callback(lambda task: self._cancelled_before_start(entry, task))
        log.info("operation started", operation_id=operation_id, kind=kind, job_id=job_id)
        return self._snapshot(entry)

    def start_request(self, request: message.Message, *, kind: str, work: Work):
        """`start` for a stage's Start request: its operation id, its job id, its fingerprint."""
        return self.start(
            request.operation_id,
            kind=kind,
            job_id=request.job_id,
            fingerprint=request_fingerprint(request),
            work=work,
        )

    def get(self, operation_id: str) -> operations_pb2.Operation:
        return self._snapshot(self._entry(operation_id))

    def cancel(self, operation_id: str) -> operations_pb2.Operation:
        entry = self._entry(operation_id)
        if not entry.is_final and entry.task is not None:
            entry.task.cancel()
        return self._snapshot(entry)

    async def watch(self, operation_id: str) -> AsyncIterator[operations_pb2.Operation]:
        entry = self._entry(operation_id)
        while True:
            seen = entry.version
            snapshot = self._snapshot(entry)
            yield snapshot
            # Decided on what was sent: the operation may have ended while that message was on its way.
            if snapshot.state in FINAL_STATES:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat_seconds), entry.condition:
                    await entry.condition.wait_for(lambda seen=seen: entry.version != seen)

    async def shutdown(self) -> None:
        """Cancel every running operation (the process is stopping)."""
        self._shutting_down = True
        tasks = [entry.task for entry in self._entries.values() if entry.task and not entry.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _entry(self, operation_id: str) -> _Entry:
        entry = self._entries.get(operation_id)
        if entry is None:
            raise OperationNotFound(operation_id)
        return entry

    @staticmethod
    def _snapshot(entry: _Entry) -> operations_pb2.Operation:
        copy = operations_pb2.Operation()
        copy.CopyFrom(entry.operation)
        return copy

    async def _run(self, entry: _Entry, work: Work) -> None:
        operation = entry.operation
        try:
            result = await work(ProgressReporter(entry))
        except asyncio.CancelledError:
            _mark_cancelled(operation)
        except OperationError as exc:
            operation.state = State.OPERATION_STATE_FAILED
            operation.error.CopyFrom(status_pb2.Status(code=exc.code.value[0], message=exc.message))
        except Exception as exc:
            log.exception("operation crashed", operation_id=operation.id)
            operation.state = State.OPERATION_STATE_FAILED
            operation.error.CopyFrom(
                status_pb2.Status(
                    code=grpc.StatusCode.INTERNAL.value[0], message=f"{type(exc).__name__}: {exc}"
                )
            )
        else:
            packed = any_pb2.Any()
            packed.Pack(result)
            operation.result.CopyFrom(packed)
            operation.state = State.OPERATION_STATE_SUCCEEDED
        self._finished(entry)

    def _cancelled_before_start(self, entry: _Entry, task: asyncio.Task) -> None:
        # A task cancelled before its first step never enters `_run`, so the end is recorded here.
        if task.cancelled() and not entry.is_final:
            _mark_cancelled(entry.operation)
            self._finished(entry)

    def _finished(self, entry: _Entry) -> None:
        entry.finished_at = time.monotonic()
        entry.changed()
        log.info(
            "operation finished", operation_id=entry.operation.id, state=State.Name(entry.operation.state)
        )
        self._forget_oldest_finished()

    def _forget_oldest_finished(self) -> None:
        finished = sorted(
            (key for key, entry in self._entries.items() if entry.is_final),
            key=lambda key: self._entries[key].finished_at,
        )
        for key in finished[: max(0, len(finished) - self._retain_finished)]:
            del self._entries[key]
