"""The teacher service's `Complete` RPC as a `Completer` for prompt generation, with its ledger.

Each call sends the job's `spec.teacher` with the generation's temperature and the call's seed in
place of the answering ones, so generation calls are distinct, reproducible and cached by the teacher
service like any other call: a repeated stage costs nothing.
"""

from __future__ import annotations

import copy
import json
from types import TracebackType
from typing import Any

import grpc
import structlog
from google.protobuf import struct_pb2

from stillhouse.common.operations import OperationError
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc

log = structlog.get_logger(__name__)

# The channel retries calls that could not reach the teacher service (e.g. while it restarts).
_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "stillhouse.teacher.v1.Teacher", "method": "Complete"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.5s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def add_ledger(total: teacher_pb2.Ledger, part: teacher_pb2.Ledger) -> None:
    """Add every count of `part` to `total` (a ledger's fields are all counts or sums)."""
    for field, value in part.ListFields():
        setattr(total, field.name, getattr(total, field.name) + value)


class TeacherClient:
    """Completes chats through the teacher service at `address`, each call carrying `credentials`;
    `ledger` sums what every call spent."""

    def __init__(
        self,
        address: str,
        *,
        credentials: ServiceCredentials,
        job_id: str,
        tenant: str,
        teacher: dict[str, Any],
        timeout_seconds: float,
    ) -> None:
        self.address = address
        self.ledger = teacher_pb2.Ledger()
        self._job_id = job_id
        self._tenant = tenant
        self._teacher = teacher
        self._timeout = timeout_seconds
        self._channel = credentials.open_channel(
            address, options=[("grpc.service_config", _RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        )
        self._stub = teacher_pb2_grpc.TeacherStub(self._channel)

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self._channel.close()

    async def complete(self, messages: list[dict[str, str]], *, temperature: float, seed: int) -> str:
        request = teacher_pb2.CompleteRequest(
            job_id=self._job_id,
            tenant=self._tenant,
            messages=[teacher_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            teacher=self._teacher_struct(temperature, seed),
        )
        try:
            response = await self._stub.Complete(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            log.warning(
                "teacher call failed",
                address=self.address,
                code=error.code().name,
                details=error.details(),
                debug=error.debug_error_string(),
            )
            raise self._stage_error(error) from error
        add_ledger(self.ledger, response.ledger)
        return response.text

    def _teacher_struct(self, temperature: float, seed: int) -> struct_pb2.Struct:
        teacher = copy.deepcopy(self._teacher)
        teacher["sampling"] = {**teacher.get("sampling", {}), "temperature": temperature, "seed": seed}
        struct = struct_pb2.Struct()
        struct.update(teacher)
        return struct

    def _stage_error(self, error: grpc.aio.AioRpcError) -> OperationError:
        code, details = error.code(), error.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return OperationError(
                grpc.StatusCode.UNAVAILABLE,
                f"the teacher service at {self.address} did not answer a prompt generation call "
                f"({code.name}: {details})",
            )
        if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
            return OperationError(code, details)
        return OperationError(
            code, f"the teacher service at {self.address} failed a prompt generation call: {details}"
        )
