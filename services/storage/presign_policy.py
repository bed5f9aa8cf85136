"""What `Storage.Presign` signs: a download (GET) of one object of a job, for a bounded time.

A presigned URL needs no credential at all, so it is limited to what the control plane hands to users:
artifact files under `jobs/<job-id>/`, for at most `presign_max_seconds`. Uploads never need one (the
services write with the object store's own keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc

from stillhouse.common.objectstore.objects import InvalidKey, validate_key
from stillhouse.storage.v1 import storage_pb2

SIGNED_PREFIX = "jobs/"
DEFAULT_PRESIGN_SECONDS = 3600


@dataclass(frozen=True)
class PresignRefused(Exception):
    """The request asks for a URL that is not given; `code` and `message` are the gRPC status."""

    code: grpc.StatusCode
    message: str


def presign_expiry(request: storage_pb2.PresignRequest, max_seconds: int) -> timedelta:
    """How long the URL `request` asks for stays valid; PresignRefused if it may not be signed."""
    if request.method == storage_pb2.PresignRequest.METHOD_PUT:
        raise PresignRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            "Presign gives download URLs only (METHOD_GET): objects are written by the services with the "
            "object store's own credentials",
        )
    if request.method != storage_pb2.PresignRequest.METHOD_GET:
        raise PresignRefused(grpc.StatusCode.INVALID_ARGUMENT, "method must be METHOD_GET")
    try:
        validate_key(request.key)
    except InvalidKey as exc:
        raise PresignRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    parts = request.key.split("/")
    if len(parts) < 3 or f"{parts[0]}/" != SIGNED_PREFIX or not parts[-1]:
        raise PresignRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"Presign signs the objects of jobs only (keys under '{SIGNED_PREFIX}<job-id>/'), "
            f"not {request.key!r}",
        )
    seconds = request.expires_seconds or min(DEFAULT_PRESIGN_SECONDS, max_seconds)
    if not 1 <= seconds <= max_seconds:
        raise PresignRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"expires_seconds must be between 1 and {max_seconds} (the storage service's "
            f"presign_max_seconds), got {seconds}",
        )
    return timedelta(seconds=seconds)
