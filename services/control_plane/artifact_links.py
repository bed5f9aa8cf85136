"""How to fetch a job's artifacts: their files, each with a presigned URL from the storage service.

The control plane never moves artifact bytes from a remote object store: a client downloads each file
straight from object storage with the URL given here, and checks it against the size and sha256 the
artifact's manifest recorded. Which artifact a job's results name is `stage_results.StageResults.artifact_id`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from stillhouse.common.api_models import ArtifactFileLink, ArtifactLinks
from stillhouse.control_plane.orchestrator import ServiceChannels
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

LINK_SECONDS = 3600


class ArtifactUnavailable(Exception):
    """The artifact cannot be listed; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def object_key(artifact_id: str, path: str) -> str:
    """The object that holds the artifact's file `path`."""
    return f"{artifact_id.rstrip('/')}/{path}"


@asynccontextmanager
async def _storage_errors() -> AsyncIterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        status = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAVAILABLE: 503}.get(exc.code(), 502)
        raise ArtifactUnavailable(status, f"storage service: {exc.code().name}: {exc.details()}") from exc


async def _link(
    storage: storage_pb2_grpc.StorageStub, artifact_id: str, record: storage_pb2.ArtifactFile
) -> ArtifactFileLink:
    link = await storage.Presign(
        storage_pb2.PresignRequest(
            method=storage_pb2.PresignRequest.METHOD_GET,
            key=object_key(artifact_id, record.path),
            expires_seconds=LINK_SECONDS,
        ),
        timeout=30,
    )
    return ArtifactFileLink(
        path=record.path, size_bytes=record.size_bytes, sha256=record.sha256, url=link.url
    )


async def _artifact(storage: storage_pb2_grpc.StorageStub, artifact_id: str) -> storage_pb2.Artifact:
    return await storage.GetArtifact(storage_pb2.GetArtifactRequest(artifact_id=artifact_id), timeout=30)


async def artifact_links(channels: ServiceChannels, artifact_id: str) -> ArtifactLinks:
    """The artifact's files, each with a URL valid for LINK_SECONDS."""
    storage = storage_pb2_grpc.StorageStub(channels.get("storage"))
    async with _storage_errors():
        artifact = await _artifact(storage, artifact_id)
        files = [await _link(storage, artifact_id, record) for record in artifact.files]
    return ArtifactLinks(artifact_id=artifact_id, files=files, expires_in_seconds=LINK_SECONDS)


async def artifact_file_link(
    channels: ServiceChannels, artifact_id: str, path: str
) -> ArtifactFileLink | None:
    """The artifact's file `path` with a URL valid for LINK_SECONDS; None when the artifact has no such
    file (only the paths its manifest lists are its files)."""
    storage = storage_pb2_grpc.StorageStub(channels.get("storage"))
    async with _storage_errors():
        artifact = await _artifact(storage, artifact_id)
        record = next((record for record in artifact.files if record.path == path), None)
        return None if record is None else await _link(storage, artifact_id, record)
