"""The Trainer gRPC service: checks a whole job at submit (`CheckJob`, see `preflight`), checks a request
as far as it can alone, and hands the run to `ray_runs`, which runs it as a Ray job; it turns the run's
outcome into the result message and its failure into a status code (`STATUS_CODES`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc
from google.protobuf import json_format, message

from stillhouse.common.datasets.artifacts import manifest_sha256, read_artifact_manifest
from stillhouse.common.grpc_server import abort_for
from stillhouse.common.jobspec import DistillationJobSpec, EvaluationSpec, TeacherSpec
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.common.operations import (
    OperationConflict,
    OperationError,
    OperationRegistry,
    ProgressReporter,
)
from stillhouse.common.spec_sections import spec_section, validated
from stillhouse.common.v1 import operations_pb2
from stillhouse.trainer.failures import FailureKind, RunFailure
from stillhouse.trainer.preflight import Finding
from stillhouse.trainer.preflight_loading import ModelFactsLoader
from stillhouse.trainer.ray_connection import RayConnection
from stillhouse.trainer.ray_runs import RayRuns
from stillhouse.trainer.run_config import EvaluateRun, TrainRun
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

_TRAINER = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]
TRAIN_STUDENT = _TRAINER.methods_by_name["TrainStudent"].full_name
EVALUATE_STUDENT = _TRAINER.methods_by_name["EvaluateStudent"].full_name

STATUS_CODES: dict[FailureKind, grpc.StatusCode] = {
    FailureKind.USER_FIXABLE: grpc.StatusCode.FAILED_PRECONDITION,
    FailureKind.OUT_OF_MEMORY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailureKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    FailureKind.STOPPED_OUTSIDE: grpc.StatusCode.ABORTED,
    FailureKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def job_spec(
    teacher: message.Message,
    student: message.Message,
    training: message.Message,
    evaluation: message.Message,
):
    """The request's spec sections, validated together by the job schema (so its cross-field rules hold)."""
    document = {
        "teacher": json_format.MessageToDict(teacher),
        "student": json_format.MessageToDict(student),
    }
    for name, section in (("training", training), ("evaluation", evaluation)):
        if section.ListFields():
            document[name] = json_format.MessageToDict(section)
    return validated(DistillationJobSpec, document, "spec")


@contextlib.contextmanager
def failures_as_status_codes() -> Iterator[None]:
    """A RunFailure raised inside becomes the OperationError of its kind's status code."""
    try:
        yield
    except RunFailure as failure:
        raise OperationError(STATUS_CODES[failure.kind], str(failure)) from failure


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(
        self,
        registry: OperationRegistry,
        store: ObjectStore,
        object_store: ObjectStoreSettings,
        ray: RayConnection,
        preflight: ModelFactsLoader,
        *,
        evaluation_num_gpus: float = 0,
        evaluation_num_cpus: int | None = None,
        models: ModelSettings | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._object_store = object_store
        self._models = models or ModelSettings()
        self._runs = RayRuns(
            store,
            ray,
            preflight,
            evaluation_num_gpus=evaluation_num_gpus,
            evaluation_num_cpus=evaluation_num_cpus,
            shutting_down=lambda: registry.shutting_down,
        )

    # --- CheckJob ---------------------------------------------------------------------------------

    async def CheckJob(self, request, context):
        try:
            spec = validated(DistillationJobSpec, json_format.MessageToDict(request.spec), "spec")
            with failures_as_status_codes():
                report = await self._runs.check(spec)
        except OperationError as exc:
            await abort_for(context, exc)
        return trainer_pb2.CheckJobResponse(
            violations=[_finding(found) for found in report.violations],
            warnings=[_finding(found) for found in report.warnings],
        )

    # --- TrainStudent -----------------------------------------------------------------------------

    async def TrainStudent(self, request, context):
        try:
            spec = job_spec(request.teacher, request.student, request.training, request.evaluation)
            run = self._train_run(request, spec)

            async def work(progress: ProgressReporter) -> trainer_pb2.TrainStudentResult:
                with failures_as_status_codes():
                    trained = await self._runs.train(request.operation_id, spec, run, progress)
                outcome = trained.outcome
                artifacts = await self._artifacts(
                    student=run.student_prefix,
                    baseline=run.baseline_prefix,
                    sft_control=run.sft_control_prefix if "sft" in run.controls else None,
                )
                return trainer_pb2.TrainStudentResult(
                    **artifacts,
                    steps=outcome.steps,
                    tokens=outcome.tokens,
                    gpu_hours=trained.gpu_hours,
                    final_metrics={
                        **outcome.final_metrics,
                        "on_policy_steps": float(outcome.on_policy_steps),
                    },
                    curve=[trainer_pb2.TrainingCurvePoint(**point.model_dump()) for point in outcome.curves],
                )

            return self._registry.start_request(request, kind=TRAIN_STUDENT, work=work)
        except (OperationError, OperationConflict) as exc:
            await abort_for(context, exc)

    def _train_run(self, request: trainer_pb2.TrainStudentRequest, spec: DistillationJobSpec) -> TrainRun:
        """The run a request asks for; OperationError (INVALID_ARGUMENT) naming a field it lacks."""
        if not request.answers.dataset_id:
            raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, "answers.dataset_id must be set")
        if not request.job_id:
            raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, "job_id must be set")
        return TrainRun(
            job_id=request.job_id,
            answers_dataset_id=request.answers.dataset_id,
            object_store=self._object_store,
            models=self._models,
            teacher=spec.teacher,
            student=spec.student,
            training=spec.training,
            output_prefix=f"jobs/{request.job_id}/train",
            controls=spec.evaluation.controls,
        )

    # --- EvaluateStudent --------------------------------------------------------------------------

    async def EvaluateStudent(self, request, context):
        try:
            run = self._evaluate_run(request)

            async def work(progress: ProgressReporter) -> trainer_pb2.EvaluateStudentResult:
                with failures_as_status_codes():
                    outcome = await self._runs.evaluate(request.operation_id, run, progress)
                references = outcome.reference_metrics
                artifacts = await self._artifacts(
                    report=outcome.report_prefix, student=outcome.student_prefix
                )
                return trainer_pb2.EvaluateStudentResult(
                    **artifacts,
                    recovery_percent=outcome.recovery_percent,
                    student_metrics=outcome.student_metrics,
                    baseline_metrics=outcome.baseline_metrics,
                    teacher_metrics=outcome.teacher_metrics,
                    uniform_metrics=references.get("uniform", {}),
                    unigram_metrics=references.get("unigram", {}),
                    control_sft_metrics=references.get("control-sft", {}),
                    gap_closed_percent=outcome.gap_closed,
                    control_sft_lead={
                        metric: trainer_pb2.PairedLead(**lead.model_dump())
                        for metric, lead in outcome.control_sft_lead.items()
                    },
                    samples=[
                        trainer_pb2.AnswerSample(**sample.model_dump(exclude_none=True))
                        for sample in outcome.samples
                    ],
                )

            return self._registry.start_request(request, kind=EVALUATE_STUDENT, work=work)
        except (OperationError, OperationConflict) as exc:
            await abort_for(context, exc)

    def _evaluate_run(self, request: trainer_pb2.EvaluateStudentRequest) -> EvaluateRun:
        """The run a request asks for; OperationError (INVALID_ARGUMENT) naming a field it lacks."""
        teacher = spec_section(TeacherSpec, request.teacher, "spec.teacher")
        evaluation = spec_section(EvaluationSpec, request.evaluation, "spec.evaluation")
        for name in ("student", "baseline"):
            if not getattr(request, name).artifact_id:
                raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}.artifact_id must be set")
        for name in ("holdout_answers", "training_answers"):
            if not getattr(request, name).dataset_id:
                raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}.dataset_id must be set")
        return EvaluateRun(
            job_id=request.job_id,
            student_prefix=request.student.artifact_id,
            baseline_prefix=request.baseline.artifact_id,
            holdout_dataset_id=request.holdout_answers.dataset_id,
            training_dataset_id=request.training_answers.dataset_id,
            teacher=teacher,
            evaluation=evaluation,
            object_store=self._object_store,
            models=self._models,
            output_prefix=f"jobs/{request.job_id}/evaluate",
        )

    # --- results ----------------------------------------------------------------------------------

    async def _artifacts(self, **prefixes: str | None) -> dict[str, operations_pb2.ArtifactRef | None]:
        """The artifacts written under `prefixes`, by the result field each goes in (None where the prefix
        is None), their manifests read off the event loop."""
        return {
            field: None if prefix is None else await asyncio.to_thread(self._artifact_ref, prefix)
            for field, prefix in prefixes.items()
        }

    def _artifact_ref(self, prefix: str) -> operations_pb2.ArtifactRef:
        manifest = read_artifact_manifest(self._store, prefix)
        return operations_pb2.ArtifactRef(
            artifact_id=prefix,
            uri=self._store.uri(prefix) + "/",
            sha256=manifest_sha256(manifest),
            size_bytes=sum(file.size for file in manifest.files),
        )


def _finding(found: Finding) -> trainer_pb2.SpecFinding:
    return trainer_pb2.SpecFinding(field=found.field, message=found.message)
