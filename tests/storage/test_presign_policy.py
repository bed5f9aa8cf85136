"""What Presign may sign, as a pure function of the request and the service's limit."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from stillhouse.storage.presign_policy import PresignRefused, presign_expiry
from stillhouse.storage.v1 import storage_pb2

GET = storage_pb2.PresignRequest.METHOD_GET


def request(key: str = "jobs/j-1/evaluate/report/report.json", **fields) -> storage_pb2.PresignRequest:
    return storage_pb2.PresignRequest(**{"method": GET, "key": key, **fields})


def test_the_default_validity_is_an_hour_or_the_limit_if_lower() -> None:
    assert presign_expiry(request(), max_seconds=7200) == timedelta(hours=1)
    assert presign_expiry(request(), max_seconds=60) == timedelta(seconds=60)
    assert presign_expiry(request(expires_seconds=60), max_seconds=60) == timedelta(seconds=60)


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"expires_seconds": 61}, grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 60"),
        ({"expires_seconds": -5}, grpc.StatusCode.INVALID_ARGUMENT, "got -5"),
        ({"method": storage_pb2.PresignRequest.METHOD_PUT}, grpc.StatusCode.PERMISSION_DENIED, "download"),
        ({"method": storage_pb2.PresignRequest.METHOD_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "GET"),
        ({"key": "jobs/j-1/../../secrets/x"}, grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        ({"key": "jobs/j-1/"}, grpc.StatusCode.PERMISSION_DENIED, "'jobs/j-1/'"),
        ({"key": "prompts/seeds.jsonl"}, grpc.StatusCode.PERMISSION_DENIED, "'prompts/seeds.jsonl'"),
    ],
)
def test_refusals_name_what_is_allowed(fields: dict, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(PresignRefused) as refused:
        presign_expiry(request(**fields), max_seconds=60)
    assert refused.value.code is code
    assert words in refused.value.message
