"""The Storage gRPC service: what a client without the shared storage library needs (the control plane
and the CLI): a job's artifacts, a presigned link to download one of their files, and deleting a job's
folder. The services themselves read and write datasets and artifacts through `stillhouse.common`. Each
call goes to that library; its errors become status codes.

All object-store I/O is blocking (the S3 client is synchronous), so every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import grpc
import structlog
from google.protobuf import timestamp_pb2

from stillhouse.common.datasets import artifacts
from stillhouse.common.objectstore.objects import (
    AccessDenied,
    BucketNotFound,
    IntegrityError,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    StoreUnavailable,
    validate_key,
)
from stillhouse.common.v1 import operations_pb2
from stillhouse.storage.presign_policy import DEFAULT_PRESIGN_SECONDS, PresignRefused, presign_expiry
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

log = structlog.get_logger(__name__)

T = TypeVar("T")

MAX_PAGE_SIZE = 1000

# Which status each storage error stands for.
STATUS_OF_ERROR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (ObjectNotFound, grpc.StatusCode.NOT_FOUND),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (InvalidKey, grpc.StatusCode.INVALID_ARGUMENT),
    (BucketNotFound, grpc.StatusCode.FAILED_PRECONDITION),
    (AccessDenied, grpc.StatusCode.PERMISSION_DENIED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ObjectStoreError, grpc.StatusCode.INTERNAL),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(exc: Exception) -> grpc.StatusCode | None:
    for error_type, code in STATUS_OF_ERROR:
        if isinstance(exc, error_type):
            return code
    return None


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _page(ids: list[str], page_size: int, page_token: str) -> tuple[list[str], str]:
    if page_size < 0:
        raise ValueError(f"page_size must not be negative, got {page_size}")
    size = min(page_size or 100, MAX_PAGE_SIZE)
    remaining = [item for item in sorted(ids) if item > page_token] if page_token else sorted(ids)
    page = remaining[:size]
    return page, (page[-1] if len(remaining) > size else "")


class StorageServicer(storage_pb2_grpc.StorageServicer):
    def __init__(self, store: ObjectStore, *, presign_max_seconds: int = DEFAULT_PRESIGN_SECONDS) -> None:
        self._store = store
        self._presign_max_seconds = presign_max_seconds

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(work)
        except Exception as exc:
            code = status_for(exc)
            if code is None:
                raise
            if code is grpc.StatusCode.INTERNAL:
                log.exception("object store error")
            await context.abort(code, str(exc))
            raise AssertionError("unreachable") from exc

    # --- artifacts ---------------------------------------------------------------------------------

    def _artifact_message(self, artifact_id: str, record: artifacts.ArtifactManifest) -> storage_pb2.Artifact:
        return storage_pb2.Artifact(
            ref=operations_pb2.ArtifactRef(
                artifact_id=artifact_id,
                uri=self._store.uri(artifact_id) + "/",
                sha256=artifacts.manifest_sha256(record),
                size_bytes=sum(file.size for file in record.files),
            ),
            files=[
                storage_pb2.ArtifactFile(path=file.path, size_bytes=file.size, sha256=file.sha256)
                for file in record.files
            ],
            lineage=storage_pb2.Lineage(**record.lineage),
            create_time=_timestamp(record.created_at),
        )

    async def GetArtifact(self, request, context):
        def get() -> storage_pb2.Artifact:
            validate_key(request.artifact_id)
            record = artifacts.read_artifact_manifest(self._store, request.artifact_id)
            return self._artifact_message(request.artifact_id, record)

        return await self._call(context, get)

    async def ListArtifacts(self, request, context):
        def list_page() -> storage_pb2.ListArtifactsResponse:
            found = artifacts.list_artifacts(self._store, request.prefix)
            page, next_token = _page(list(found), request.page_size, request.page_token)
            return storage_pb2.ListArtifactsResponse(
                artifacts=[self._artifact_message(item, found[item]) for item in page],
                next_page_token=next_token,
            )

        return await self._call(context, list_page)

    # --- bulk transfer -----------------------------------------------------------------------------

    async def Presign(self, request, context):
        try:
            expires = presign_expiry(request, self._presign_max_seconds)
        except PresignRefused as refused:
            await context.abort(refused.code, refused.message)

        def presign() -> storage_pb2.PresignResponse:
            url = self._store.presign_get(request.key, expires)
            stamp = timestamp_pb2.Timestamp()
            stamp.GetCurrentTime()
            stamp.FromSeconds(stamp.seconds + int(expires.total_seconds()))
            return storage_pb2.PresignResponse(url=url, expire_time=stamp)

        return await self._call(context, presign)

    async def DeletePrefix(self, request, context):
        def delete() -> storage_pb2.DeletePrefixResponse:
            deleted = self._store.delete_prefix(request.prefix)
            log.info("prefix deleted", prefix=request.prefix, objects=deleted)
            return storage_pb2.DeletePrefixResponse(deleted_objects=deleted)

        return await self._call(context, delete)
