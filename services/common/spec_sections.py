"""Parts of a job spec as a stage service receives them (`google.protobuf.Struct`), checked by the job
schema; a bad field fails the call with INVALID_ARGUMENT and a message naming it
(`spec.teacher.model: ...`)."""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, message
from pydantic import BaseModel, ValidationError

from stillhouse.common.operations import OperationError

Part = TypeVar("Part", bound=BaseModel)


def spec_problems(exc: ValidationError, where: str = "spec") -> str:
    return "; ".join(
        f"{'.'.join([where, *map(str, error['loc'])])}: {error['msg']}" for error in exc.errors()
    )


def validated(model: type[Part], document: Any, where: str) -> Part:
    """`document` as `model`; OperationError(INVALID_ARGUMENT) naming each bad field under `where`."""
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise OperationError(
            grpc.StatusCode.INVALID_ARGUMENT, f"invalid {where}: {spec_problems(exc, where)}"
        ) from exc


def spec_section(model: type[Part], struct: message.Message, where: str) -> Part:
    """One part of the spec, e.g. `spec_section(TeacherSpec, request.teacher, "spec.teacher")`."""
    return validated(model, json_format.MessageToDict(struct), where)
