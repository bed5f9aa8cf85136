"""The check of a job at submit and in the estimate, before anything is paid: the trainer service's
`CheckJob` looks at the tokenizers, chat templates and context the spec names (see
`stillhouse.trainer.preflight`). A job whose check finds violations is never stored, so the orchestrator
never starts it; a check that cannot be made refuses the job too (`PreflightUnavailable`, a 503), rather
than let it fail after the teacher stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import struct_pb2

from stillhouse.control_plane.orchestrator import ServiceChannels
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

# Reading a tokenizer out of a GGUF file takes seconds on a small machine; later checks hit the cache.
CHECK_TIMEOUT_SECONDS = 120.0


class PreflightUnavailable(Exception):
    """The check could not be made; the message says why, for the user."""


class PreflightRefused(Exception):
    """The trainer refused the spec itself (a schema it reads differently); the message names fields."""


async def check_job(channels: ServiceChannels, spec: Mapping[str, Any]) -> trainer_pb2.CheckJobResponse:
    """The trainer's findings on `spec` (the job's `spec`, camelCase with every default filled in)."""
    request = trainer_pb2.CheckJobRequest(spec=_struct(spec))
    stub = trainer_pb2_grpc.TrainerStub(channels.get("trainer"))
    try:
        return await stub.CheckJob(request, timeout=CHECK_TIMEOUT_SECONDS)
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
            raise PreflightRefused(exc.details()) from exc
        raise PreflightUnavailable(
            f"the trainer service could not check the job ({exc.code().name}: {exc.details()}); nothing "
            "was started: try again once it answers"
        ) from exc


def _struct(section: Mapping[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(dict(section))
    return value
