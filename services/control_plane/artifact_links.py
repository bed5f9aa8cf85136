"""Where a job's artifacts are and how to fetch them: files and presigned URLs from the storage service.

The control plane never moves artifact bytes: a client downloads each file straight from object storage
with the URL given here, and checks it against the size and sha256 the artifact's manifest recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import json_format

from stillhouse.control_plane.orchestrator import ServiceChannels
from stillhouse.control_plane.phases import Stage
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

# Which step result names each downloadable artifact, the preferred one first: the published student
# (with the evaluation in its model card) once evaluation has run, else the trained one.
ARTIFACT_SOURCES: dict[str, list[tuple[Stage, str]]] = {
    "student": [(Stage.EVALUATE, "student"), (Stage.TRAIN, "student")],
    "baseline": [(Stage.TRAIN, "baseline")],
    "report": [(Stage.EVALUATE, "report")],
}
LINK_SECONDS = 3600


class ArtifactUnavailable(Exception):
    """The artifact cannot be listed; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def artifact_id_of(results: Mapping[Stage, Mapping[str, Any]], name: str) -> str | None:
    """The artifact id a job's finished steps give for `name`, or None if none of them has produced it."""
    for stage, field in ARTIFACT_SOURCES[name]:
        artifact_id = results.get(stage, {}).get(field, {}).get("artifact_id")
        if artifact_id:
            return artifact_id
    return None


async def artifact_links(channels: ServiceChannels, artifact_id: str) -> dict[str, Any]:
    """The artifact's files, each with a URL valid for LINK_SECONDS (proto field names)."""
    storage = storage_pb2_grpc.StorageStub(channels.get("storage"))
    try:
        artifact = await storage.GetArtifact(
            storage_pb2.GetArtifactRequest(artifact_id=artifact_id), timeout=30
        )
        files = []
        for record in artifact.files:
            key = f"{artifact_id.rstrip('/')}/{record.path}"
            link = await storage.Presign(
                storage_pb2.PresignRequest(
                    method=storage_pb2.PresignRequest.METHOD_GET, key=key, expires_seconds=LINK_SECONDS
                ),
                timeout=30,
            )
            files.append(
                {**json_format.MessageToDict(record, preserving_proto_field_name=True), "url": link.url}
            )
    except grpc.aio.AioRpcError as exc:
        status = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAVAILABLE: 503}.get(exc.code(), 502)
        raise ArtifactUnavailable(status, f"storage service: {exc.code().name}: {exc.details()}") from exc
    return {"artifact_id": artifact_id, "files": files, "expires_in_seconds": LINK_SECONDS}
