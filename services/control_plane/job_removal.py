"""Deleting finished jobs: on request (`DELETE /v1/jobs/{id}`) and, when configured, once they are old.

A job's objects go first, through the storage service (everything under `jobs/<job-id>/`), then its row
with its steps and events. A removal that stops between the two leaves the row, so asking again
finishes it; deleting objects that are already gone is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import grpc
import structlog

from stillhouse.control_plane.orchestrator import ServiceChannels
from stillhouse.control_plane.store import JobNotFinished, JobNotFound, JobStore
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

log = structlog.get_logger(__name__)

# Who the audit log names for what the expiry sweep deletes.
EXPIRY_PRINCIPAL = "system:expiry"


class RemovalFailed(Exception):
    """The job's objects could not be deleted; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


async def remove_job(store: JobStore, channels: ServiceChannels, job_id: str) -> int:
    """Delete a finished job's objects, then the job; return how many objects were deleted.
    JobNotFinished while the job may still write, JobNotFound if it is gone."""
    job = await store.get_job(job_id)
    if not job.phase.is_terminal:
        raise JobNotFinished(job_id, job.phase)
    storage = storage_pb2_grpc.StorageStub(channels.get("storage"))
    try:
        deleted = await storage.DeletePrefix(
            storage_pb2.DeletePrefixRequest(prefix=job_prefix(job_id)), timeout=300
        )
    except grpc.aio.AioRpcError as exc:
        status = (
            503 if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else 502
        )
        raise RemovalFailed(status, f"storage service: {exc.code().name}: {exc.details()}") from exc
    await store.delete_job(job_id)
    log.info("job deleted", job_id=job_id, tenant=job.tenant, objects=deleted.deleted_objects)
    return deleted.deleted_objects


class ExpirySweep:
    """Every `interval_seconds`, deletes the jobs that finished more than `max_age` ago."""

    def __init__(
        self, store: JobStore, channels: ServiceChannels, *, max_age: timedelta, interval_seconds: float
    ) -> None:
        self._store = store
        self._channels = channels
        self._max_age = max_age
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job expiry sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # the store may be down for a while: try again next time
                log.exception("job expiry sweep failed")
            await asyncio.sleep(self._interval)

    async def sweep(self) -> int:
        """Delete every expired job now; return how many were deleted."""
        removed = 0
        while expired := await self._store.finished_before(datetime.now(UTC) - self._max_age):
            for job in expired:
                try:
                    await remove_job(self._store, self._channels, job.id)
                except JobNotFound:
                    continue  # another replica deleted it first
                except RemovalFailed as exc:
                    log.warning("expired job not deleted", job_id=job.id, error=str(exc))
                    return removed
                await self._store.record_audit(
                    principal=EXPIRY_PRINCIPAL,
                    tenant=job.tenant,
                    method="DELETE",
                    route="/v1/jobs/{job_id}",
                    job_id=job.id,
                    status=204,
                )
                removed += 1
        return removed
