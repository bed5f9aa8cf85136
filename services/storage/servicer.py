"""The Storage gRPC service: translates requests to the storage library and its errors to status codes.

All object-store I/O is blocking (the S3 client is synchronous), so every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import grpc
import pyarrow as pa
import structlog
from google.protobuf import json_format, timestamp_pb2

from stillhouse.common.datasets import artifacts, manifest
from stillhouse.common.datasets import store as datasets
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
    (datasets.DatasetNotFound, grpc.StatusCode.NOT_FOUND),
    (ObjectNotFound, grpc.StatusCode.NOT_FOUND),
    (datasets.DatasetConflict, grpc.StatusCode.ALREADY_EXISTS),
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


def _lineage_message(lineage: manifest.Lineage) -> storage_pb2.Lineage:
    return storage_pb2.Lineage(
        job_id=lineage.job_id,
        stage=lineage.stage,
        input_ids=lineage.input_ids,
        code_version=lineage.code_version,
    )


def _lineage(message: storage_pb2.Lineage) -> manifest.Lineage:
    return manifest.Lineage(
        job_id=message.job_id,
        stage=message.stage,
        input_ids=list(message.input_ids),
        code_version=message.code_version,
    )


def check_job_layout(item_id: str, lineage: storage_pb2.Lineage) -> None:
    """A job's data lives under jobs/<job-id>/<stage>/, so one job's data never lands in another's."""
    if lineage.job_id:
        expected = f"jobs/{lineage.job_id}/{lineage.stage}/"
        if not item_id.startswith(expected):
            raise ValueError(
                f"{item_id!r} must start with {expected!r} for job {lineage.job_id}, stage {lineage.stage}"
            )


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

    def _dataset_message(
        self, dataset: manifest.DatasetManifest, manifest_bytes: bytes
    ) -> storage_pb2.Dataset:
        return storage_pb2.Dataset(
            ref=operations_pb2.DatasetRef(
                dataset_id=dataset.dataset_id,
                manifest_uri=self._store.uri(manifest.manifest_key(dataset.dataset_id)),
                manifest_sha256=manifest.manifest_sha256(manifest_bytes),
                num_rows=dataset.num_rows,
            ),
            shards=[
                storage_pb2.Shard(path=s.path, num_rows=s.num_rows, size_bytes=s.size_bytes, sha256=s.sha256)
                for s in dataset.shards
            ],
            lineage=_lineage_message(dataset.lineage),
            arrow_schema=base64.b64decode(dataset.schema),
            create_time=_timestamp(datetime.fromisoformat(dataset.created_at)),
        )

    def _committed(self, dataset: manifest.DatasetManifest) -> storage_pb2.Dataset:
        return self._dataset_message(dataset, dataset.to_json())

    # --- datasets ----------------------------------------------------------------------------------

    async def CreateDataset(self, request, context):
        def create() -> storage_pb2.DatasetUpload:
            manifest.validate_dataset_id(request.dataset_id)
            check_job_layout(request.dataset_id, request.lineage)
            self._store.ensure_bucket()
            return storage_pb2.DatasetUpload(
                dataset_id=request.dataset_id, prefix=self._store.uri(request.dataset_id) + "/shards/"
            )

        return await self._call(context, create)

    async def CommitDataset(self, request, context):
        def commit() -> storage_pb2.Dataset:
            manifest.validate_dataset_id(request.dataset_id)
            check_job_layout(request.dataset_id, request.lineage)
            try:
                schema = pa.ipc.read_schema(pa.py_buffer(request.arrow_schema))
            except pa.ArrowInvalid as exc:
                raise ValueError(f"arrow_schema is not a serialised Arrow schema: {exc}") from exc
            shards = [
                manifest.ShardRecord(
                    path=s.path, num_rows=s.num_rows, size_bytes=s.size_bytes, sha256=s.sha256
                )
                for s in request.shards
            ]
            committed = datasets.commit_shards(
                self._store, request.dataset_id, shards, schema, _lineage(request.lineage)
            )
            log.info("dataset committed", dataset_id=request.dataset_id, rows=committed.num_rows)
            return self._committed(committed)

        return await self._call(context, commit)

    async def GetDataset(self, request, context):
        def get() -> storage_pb2.Dataset:
            manifest.validate_dataset_id(request.dataset_id)
            return self._committed(datasets.DatasetReader(self._store, request.dataset_id).manifest)

        return await self._call(context, get)

    async def ListDatasets(self, request, context):
        def list_page() -> storage_pb2.ListDatasetsResponse:
            found = {item.dataset_id: item for item in datasets.list_datasets(self._store, request.prefix)}
            page, next_token = _page(list(found), request.page_size, request.page_token)
            return storage_pb2.ListDatasetsResponse(
                datasets=[self._committed(found[item]) for item in page], next_page_token=next_token
            )

        return await self._call(context, list_page)

    async def DeleteDataset(self, request, context):
        def delete() -> storage_pb2.DeleteDatasetResponse:
            manifest.validate_dataset_id(request.dataset_id)
            datasets.delete_dataset(self._store, request.dataset_id)
            log.info("dataset deleted", dataset_id=request.dataset_id)
            return storage_pb2.DeleteDatasetResponse()

        return await self._call(context, delete)

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

    async def CreateArtifact(self, request, context):
        def create() -> storage_pb2.ArtifactUpload:
            validate_key(request.artifact_id)
            check_job_layout(request.artifact_id, request.lineage)
            self._store.ensure_bucket()
            return storage_pb2.ArtifactUpload(
                artifact_id=request.artifact_id, prefix=self._store.uri(request.artifact_id) + "/"
            )

        return await self._call(context, create)

    async def CommitArtifact(self, request, context):
        def commit() -> storage_pb2.Artifact:
            validate_key(request.artifact_id)
            check_job_layout(request.artifact_id, request.lineage)
            files = [
                artifacts.ArtifactFileRecord(path=file.path, size=file.size_bytes, sha256=file.sha256)
                for file in request.files
            ]
            lineage = json_format.MessageToDict(request.lineage, preserving_proto_field_name=True)
            record = artifacts.commit_artifact(self._store, request.artifact_id, files, lineage)
            log.info("artifact committed", artifact_id=request.artifact_id, files=len(files))
            return self._artifact_message(request.artifact_id, record)

        return await self._call(context, commit)

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
