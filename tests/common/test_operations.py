"""OperationRegistry: start once per id, report progress in order, finish, fail, cancel, forget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from stillhouse.common.operations import (
    OperationConflict,
    OperationError,
    OperationNotFound,
    OperationRegistry,
    ProgressReporter,
)
from stillhouse.common.v1 import operations_pb2

State = operations_pb2.OperationState
KIND = "stillhouse.prompts.v1.Prompts/GeneratePrompts"


@pytest.fixture
async def registry() -> AsyncIterator[OperationRegistry]:
    operations = OperationRegistry()
    yield operations
    await operations.shutdown()


def start(registry: OperationRegistry, operation_id: str, work, fingerprint: bytes = b"request-1"):
    return registry.start(operation_id, kind=KIND, job_id="job-1", fingerprint=fingerprint, work=work)


async def final(registry: OperationRegistry, operation_id: str) -> operations_pb2.Operation:
    """The operation once it has reached a final state (via watch, which must end there)."""
    async with asyncio.timeout(5):
        async for operation in registry.watch(operation_id):
            last = operation
    return last


def dataset(name: str, rows: int = 3) -> operations_pb2.DatasetRef:
    return operations_pb2.DatasetRef(
        dataset_id=f"jobs/job-1/{name}", manifest_uri=f"s3://b/{name}/manifest.json", num_rows=rows
    )


class BlockedWork:
    """Work that waits until released; counts how often it was started and whether it saw cancellation."""

    def __init__(self, result: operations_pb2.DatasetRef | None = None) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.saw_cancel = False
        self.result = result or dataset("train")

    async def __call__(self, progress: ProgressReporter) -> operations_pb2.DatasetRef:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.saw_cancel = True
            raise
        return self.result


async def test_start_returns_running_at_once(registry: OperationRegistry) -> None:
    work = BlockedWork()
    operation = start(registry, "op-1", work)
    assert operation.id == "op-1"
    assert operation.kind == KIND
    assert operation.job_id == "job-1"
    assert operation.state == State.OPERATION_STATE_RUNNING
    assert operation.create_time.seconds > 0
    await asyncio.sleep(0.01)
    assert registry.get("op-1").state == State.OPERATION_STATE_RUNNING
    assert work.started == 1


async def test_same_id_and_request_returns_the_same_operation(registry: OperationRegistry) -> None:
    work = BlockedWork()
    first = start(registry, "op-1", work)
    await asyncio.sleep(0.01)
    again = start(registry, "op-1", work)
    assert again.id == first.id
    assert again.create_time == first.create_time
    work.release.set()
    done = await final(registry, "op-1")
    assert done.state == State.OPERATION_STATE_SUCCEEDED
    # Retrying after it finished returns the finished operation, not new work.
    assert start(registry, "op-1", work).state == State.OPERATION_STATE_SUCCEEDED
    await asyncio.sleep(0.01)
    assert work.started == 1


async def test_same_id_with_a_different_request_conflicts(registry: OperationRegistry) -> None:
    work = BlockedWork()
    start(registry, "op-1", work, fingerprint=b"request-1")
    with pytest.raises(OperationConflict, match="'op-1' already exists with a different request"):
        start(registry, "op-1", work, fingerprint=b"request-2")
    await asyncio.sleep(0.01)
    assert work.started == 1


async def test_empty_id_is_invalid(registry: OperationRegistry) -> None:
    with pytest.raises(OperationError) as caught:
        start(registry, "", BlockedWork())
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "operation_id" in caught.value.message


async def test_watch_sees_every_progress_update_in_order_then_the_result(
    registry: OperationRegistry,
) -> None:
    proceed: asyncio.Queue[None] = asyncio.Queue()

    async def work(progress: ProgressReporter) -> operations_pb2.DatasetRef:
        for step in (1, 2, 3):
            progress.update(
                done=step, total=3, unit="prompts", message=f"step {step}", metrics={"loss": step}
            )
            await proceed.get()
        return dataset("train", rows=3)

    start(registry, "op-1", work)
    seen = []
    async with asyncio.timeout(5):
        async for operation in registry.watch("op-1"):
            progress = operation.progress
            seen.append((operation.state, progress.done, progress.total, progress.message))
            if operation.state == State.OPERATION_STATE_RUNNING and progress.done > 0:
                assert progress.unit == "prompts"
                assert progress.metrics["loss"] == progress.done
                proceed.put_nowait(None)
    running = State.OPERATION_STATE_RUNNING
    assert seen == [
        (running, 0, 0, ""),
        (running, 1, 3, "step 1"),
        (running, 2, 3, "step 2"),
        (running, 3, 3, "step 3"),
        (State.OPERATION_STATE_SUCCEEDED, 3, 3, "step 3"),
    ]


async def test_watch_repeats_an_unchanged_operation_as_a_heartbeat() -> None:
    registry = OperationRegistry(heartbeat_seconds=0.05)
    work = BlockedWork()
    start(registry, "op-quiet", work)
    seen = []
    async with asyncio.timeout(5):
        async for operation in registry.watch("op-quiet"):
            seen.append(operation)
            if len(seen) == 4:
                work.release.set()
    # Nothing changed for the first messages: they repeat the operation, so a watcher hears from a
    # live service even while its work is quiet; then the change ends the watch as usual.
    assert [operation.state for operation in seen[:4]] == [State.OPERATION_STATE_RUNNING] * 4
    assert len({operation.update_time.ToNanoseconds() for operation in seen[:4]}) == 1
    assert seen[-1].state == State.OPERATION_STATE_SUCCEEDED
    await registry.shutdown()


async def test_success_packs_the_result(registry: OperationRegistry) -> None:
    work = BlockedWork(result=dataset("holdout", rows=42))
    start(registry, "op-1", work)
    work.release.set()
    done = await final(registry, "op-1")
    assert done.state == State.OPERATION_STATE_SUCCEEDED
    assert not done.HasField("error")
    result = operations_pb2.DatasetRef()
    assert done.result.Unpack(result)
    assert result == dataset("holdout", rows=42)
    assert done.update_time.ToNanoseconds() >= done.create_time.ToNanoseconds()


async def test_operation_error_fails_with_its_code_and_message(registry: OperationRegistry) -> None:
    async def work(progress: ProgressReporter) -> operations_pb2.DatasetRef:
        raise OperationError(grpc.StatusCode.FAILED_PRECONDITION, "seed file s3://b/seeds.jsonl is empty")

    start(registry, "op-1", work)
    done = await final(registry, "op-1")
    assert done.state == State.OPERATION_STATE_FAILED
    assert done.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert done.error.message == "seed file s3://b/seeds.jsonl is empty"
    assert not done.HasField("result")


async def test_unexpected_exception_fails_as_internal(registry: OperationRegistry) -> None:
    async def work(progress: ProgressReporter) -> operations_pb2.DatasetRef:
        raise ZeroDivisionError("division by zero")

    start(registry, "op-1", work)
    done = await final(registry, "op-1")
    assert done.state == State.OPERATION_STATE_FAILED
    assert done.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert done.error.message == "ZeroDivisionError: division by zero"


async def test_cancel_stops_the_work(registry: OperationRegistry) -> None:
    work = BlockedWork()
    start(registry, "op-1", work)
    await asyncio.sleep(0.01)
    assert registry.cancel("op-1").id == "op-1"
    done = await final(registry, "op-1")
    assert done.state == State.OPERATION_STATE_CANCELLED
    assert done.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert work.saw_cancel


async def test_cancel_before_the_work_began_still_ends_the_operation(registry: OperationRegistry) -> None:
    work = BlockedWork()
    start(registry, "op-1", work)
    registry.cancel("op-1")
    done = await final(registry, "op-1")
    assert done.state == State.OPERATION_STATE_CANCELLED
    assert work.started == 0


async def test_cancel_of_a_finished_operation_changes_nothing(registry: OperationRegistry) -> None:
    work = BlockedWork()
    start(registry, "op-1", work)
    work.release.set()
    done = await final(registry, "op-1")
    after_cancel = registry.cancel("op-1")
    await asyncio.sleep(0.01)
    assert after_cancel == done
    assert registry.get("op-1") == done
    assert registry.get("op-1").state == State.OPERATION_STATE_SUCCEEDED


async def test_unknown_id_is_not_found(registry: OperationRegistry) -> None:
    with pytest.raises(OperationNotFound, match="no operation 'missing'"):
        registry.get("missing")
    with pytest.raises(OperationNotFound):
        registry.cancel("missing")
    with pytest.raises(OperationNotFound):
        await anext(registry.watch("missing"))


async def test_only_the_oldest_finished_operations_are_forgotten() -> None:
    registry = OperationRegistry(retain_finished=2)
    works = {name: BlockedWork() for name in ("a", "b", "c", "running")}
    for name, work in works.items():
        start(registry, name, work)
    # The first started finishes last: it is the newest finished one and must be kept.
    for name in ("b", "c", "a"):
        works[name].release.set()
        await final(registry, name)
    with pytest.raises(OperationNotFound):
        registry.get("b")
    assert registry.get("c").state == State.OPERATION_STATE_SUCCEEDED
    assert registry.get("a").state == State.OPERATION_STATE_SUCCEEDED
    assert registry.get("running").state == State.OPERATION_STATE_RUNNING
    await registry.shutdown()


async def test_shutdown_cancels_running_operations() -> None:
    registry = OperationRegistry()
    running, finished = BlockedWork(), BlockedWork()
    start(registry, "running", running)
    start(registry, "finished", finished)
    finished.release.set()
    await final(registry, "finished")
    async with asyncio.timeout(5):
        await registry.shutdown()
    assert running.saw_cancel
    assert registry.get("running").state == State.OPERATION_STATE_CANCELLED
    assert registry.get("finished").state == State.OPERATION_STATE_SUCCEEDED


async def test_work_can_tell_a_shutdown_from_a_cancel() -> None:
    registry = OperationRegistry()
    seen: dict[str, bool] = {}

    def work_recording(name: str):
        async def work(progress):
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen[name] = registry.shutting_down
                raise

        return work

    registry.start("op-cancel", kind="k", job_id="j", fingerprint=b"1", work=work_recording("cancel"))
    registry.start("op-shutdown", kind="k", job_id="j", fingerprint=b"2", work=work_recording("shutdown"))
    await asyncio.sleep(0.05)
    registry.cancel("op-cancel")
    await asyncio.sleep(0.05)
    await registry.shutdown()
    assert seen == {"cancel": False, "shutdown": True}
