"""How each stage of a job is asked of its service: which RPC, built from which parts of the job.

Pure mapping, no I/O: the orchestrator owns the calls. A stage's request is built from the job (its
document and tenant) and the stored results of earlier stages; its result is stored as JSON (proto
field names).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, message, struct_pb2

from stillhouse.common.job_phases import Stage
from stillhouse.common.v1 import operations_pb2
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

StageResults = Mapping[Stage, Mapping[str, Any]]


def _struct(section: Mapping[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(dict(section))
    return value


def _dataset(result: Mapping[str, Any], field: str) -> operations_pb2.DatasetRef:
    return json_format.ParseDict(result.get(field, {}), operations_pb2.DatasetRef())


def _artifact(result: Mapping[str, Any], field: str) -> operations_pb2.ArtifactRef:
    return json_format.ParseDict(result.get(field, {}), operations_pb2.ArtifactRef())


def result_to_json(result: message.Message) -> dict[str, Any]:
    return json_format.MessageToDict(result, preserving_proto_field_name=True)


@dataclass(frozen=True)
class StageCall:
    stage: Stage
    service: str
    rpc: str
    stub: Callable[[Any], Any]
    result_type: type[message.Message]
    # (operation id, job id, tenant, spec, results of earlier stages) -> request
    build_request: Callable[[str, str, str, Mapping[str, Any], StageResults], message.Message]

    def start(self, channel: Any, request: message.Message, timeout: float | None = None):
        return getattr(self.stub(channel), self.rpc)(request, timeout=timeout)


def _prompts_request(operation_id: str, job_id: str, tenant: str, spec: Mapping[str, Any], _: StageResults):
    return prompts_pb2.GeneratePromptsRequest(
        operation_id=operation_id,
        job_id=job_id,
        tenant=tenant,
        prompts=_struct(spec["prompts"]),
        teacher=_struct(spec["teacher"]),
        evaluation=_struct(spec["evaluation"]),
    )


def _teacher_request(
    operation_id: str, job_id: str, tenant: str, spec: Mapping[str, Any], results: StageResults
):
    prompts = results[Stage.PROMPTS]
    return teacher_pb2.AnswerPromptsRequest(
        operation_id=operation_id,
        job_id=job_id,
        tenant=tenant,
        prompts=_dataset(prompts, "train"),
        holdout=_dataset(prompts, "holdout"),
        teacher=_struct(spec["teacher"]),
    )


def _train_request(operation_id: str, job_id: str, _: str, spec: Mapping[str, Any], results: StageResults):
    return trainer_pb2.TrainStudentRequest(
        operation_id=operation_id,
        job_id=job_id,
        answers=_dataset(results[Stage.TEACHER], "answers"),
        teacher=_struct(spec["teacher"]),
        student=_struct(spec["student"]),
        training=_struct(spec["training"]),
        evaluation=_struct(spec["evaluation"]),
    )


def _evaluate_request(operation_id: str, job_id: str, _: str, spec: Mapping[str, Any], results: StageResults):
    trained = results[Stage.TRAIN]
    return trainer_pb2.EvaluateStudentRequest(
        operation_id=operation_id,
        job_id=job_id,
        student=_artifact(trained, "student"),
        baseline=_artifact(trained, "baseline"),
        holdout_answers=_dataset(results[Stage.TEACHER], "holdout_answers"),
        training_answers=_dataset(results[Stage.TEACHER], "answers"),
        teacher=_struct(spec["teacher"]),
        evaluation=_struct(spec["evaluation"]),
    )


STAGE_CALLS: dict[Stage, StageCall] = {
    Stage.PROMPTS: StageCall(
        Stage.PROMPTS,
        "prompts",
        "GeneratePrompts",
        prompts_pb2_grpc.PromptsStub,
        prompts_pb2.GeneratePromptsResult,
        _prompts_request,
    ),
    Stage.TEACHER: StageCall(
        Stage.TEACHER,
        "teacher",
        "AnswerPrompts",
        teacher_pb2_grpc.TeacherStub,
        teacher_pb2.AnswerPromptsResult,
        _teacher_request,
    ),
    Stage.TRAIN: StageCall(
        Stage.TRAIN,
        "trainer",
        "TrainStudent",
        trainer_pb2_grpc.TrainerStub,
        trainer_pb2.TrainStudentResult,
        _train_request,
    ),
    Stage.EVALUATE: StageCall(
        Stage.EVALUATE,
        "trainer",
        "EvaluateStudent",
        trainer_pb2_grpc.TrainerStub,
        trainer_pb2.EvaluateStudentResult,
        _evaluate_request,
    ),
}


def result_from_json(stage: Stage, stored: Mapping[str, Any]) -> message.Message:
    """A stage's result as `result_to_json` stored it, read back into the stage's own message."""
    return json_format.ParseDict(stored, STAGE_CALLS[stage].result_type(), ignore_unknown_fields=True)


def operation_id_for(job_id: str, stage: Stage, attempt: int) -> str:
    """The same id for every retry of one attempt, so a repeated Start never starts new work."""
    return f"{job_id}.{stage.value}.{attempt}"
