"""The Trainer gRPC service: checks a whole job at submit (`CheckJob`, see `preflight`), checks a request
again as far as it can before any Ray work, runs it as a Ray job, streams the job's progress into the
operation, stops the job on cancel and returns the outcome."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format, message
from ray.job_submission import JobStatus

from stillhouse.common.datasets.artifacts import manifest_sha256, read_artifact_manifest
from stillhouse.common.datasets.store import DatasetNotFound, DatasetReader
from stillhouse.common.grpc_server import abort_for
from stillhouse.common.jobspec import DistillationJobSpec, EvaluationSpec, TeacherSpec
from stillhouse.common.objectstore.objects import ObjectNotFound, ObjectStore, ObjectStoreError
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.common.operations import (
    OperationConflict,
    OperationError,
    OperationRegistry,
    ProgressReporter,
)
from stillhouse.common.spec_sections import spec_section, validated
from stillhouse.common.v1 import operations_pb2
from stillhouse.trainer.preflight import Finding, PreflightReport, capacity_violations
from stillhouse.trainer.preflight_loading import ModelFactsLoader
from stillhouse.trainer.ray_cluster import RayUnreachable
from stillhouse.trainer.ray_connection import RayConnection
from stillhouse.trainer.ray_credentials import run_without_keys
from stillhouse.trainer.ray_entrypoint import outcome_key
from stillhouse.trainer.ray_jobs import (
    EVALUATION_GPUS_ENV,
    RUN_CONFIG_ENV,
    STORAGE_PATH_ENV,
    RayJobs,
    entrypoint,
)
from stillhouse.trainer.run_config import EvaluateRun, TrainOutcome, TrainRun
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

_TRAINER = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]
TRAIN_STUDENT = _TRAINER.methods_by_name["TrainStudent"].full_name
EVALUATE_STUDENT = _TRAINER.methods_by_name["EvaluateStudent"].full_name
PROGRESS_METRICS = ("loss", "kd", "ce", "learning_rate", "tokens_per_second", "tokens", "epoch")
# Failures the run names as the job's own (bad data, diverged, incompatible tokenizers).
_PRECONDITION_ERRORS = (
    "TrainingError",
    "TrainingDataError",
    "IncompatibleTokenizers",
    "UnsupportedArchitecture",
    "TrainingDiverged",
    "MissingObjectStoreKeys",
)


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


def failure_code(reason: str) -> grpc.StatusCode:
    if "out of memory" in reason.lower() or "OutOfMemory" in reason:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if reason.split(":", 1)[0] in _PRECONDITION_ERRORS:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


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
    ) -> None:
        self._registry = registry
        self._store = store
        self._object_store = object_store
        self._ray = ray
        self._preflight = preflight
        self._evaluation_num_gpus = evaluation_num_gpus

    # --- CheckJob ---------------------------------------------------------------------------------

    async def CheckJob(self, request, context):
        try:
            spec = validated(DistillationJobSpec, json_format.MessageToDict(request.spec), "spec")
            report = await self._check(spec)
        except OperationError as exc:
            await abort_for(context, exc)
        return trainer_pb2.CheckJobResponse(
            violations=[_finding(found) for found in report.violations],
            warnings=[_finding(found) for found in report.warnings],
        )

    async def _check(self, spec: DistillationJobSpec) -> PreflightReport:
        try:
            report = await asyncio.to_thread(self._preflight.check, spec)
        except ObjectStoreError as exc:
            raise OperationError(grpc.StatusCode.UNAVAILABLE, f"object storage: {exc}") from exc
        training = spec.training
        report.violations += capacity_violations(
            training.workers, training.gpus_per_worker, self._ray.local_capacity()
        )
        return report

    # --- TrainStudent -----------------------------------------------------------------------------

    async def TrainStudent(self, request, context):
        try:
            spec = job_spec(request.teacher, request.student, request.training, request.evaluation)
            if not request.answers.dataset_id:
                raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, "answers.dataset_id must be set")
            if not request.job_id:
                raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, "job_id must be set")
            run = TrainRun(
                job_id=request.job_id,
                answers_dataset_id=request.answers.dataset_id,
                object_store=self._object_store,
                teacher=spec.teacher,
                student=spec.student,
                training=spec.training,
                output_prefix=f"jobs/{request.job_id}/train",
                controls=spec.evaluation.controls,
            )

            async def work(progress: ProgressReporter) -> trainer_pb2.TrainStudentResult:
                progress.update(unit="steps", message="checking the answers dataset and the tokenizers")
                await asyncio.to_thread(self._require_dataset, "answers", run.answers_dataset_id)
                report = await self._check(spec)
                if report.violations:
                    raise OperationError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "; ".join(f"{found.field}: {found.message}" for found in report.violations),
                    )
                jobs = await self._ray_jobs()
                env = {RUN_CONFIG_ENV: run_without_keys(run)}
                if self._ray.storage_path is not None:
                    env[STORAGE_PATH_ENV] = self._ray.storage_path
                wall_seconds = await self._run_job(
                    jobs, request.operation_id, "train", env, progress, self._train_progress(progress)
                )
                outcome = TrainOutcome.model_validate_json(await self._outcome(run.output_prefix))
                gpu_hours = run.training.workers * run.training.gpus_per_worker * wall_seconds / 3600
                sft_control = (
                    await asyncio.to_thread(self._artifact_ref, run.sft_control_prefix)
                    if "sft" in run.controls
                    else None
                )
                return trainer_pb2.TrainStudentResult(
                    student=await asyncio.to_thread(self._artifact_ref, run.student_prefix),
                    baseline=await asyncio.to_thread(self._artifact_ref, run.baseline_prefix),
                    steps=outcome.steps,
                    tokens=outcome.tokens,
                    gpu_hours=gpu_hours,
                    final_metrics={
                        **outcome.final_metrics,
                        "on_policy_steps": float(outcome.on_policy_steps),
                    },
                    sft_control=sft_control,
                )

            return self._registry.start_request(request, kind=TRAIN_STUDENT, work=work)
        except (OperationError, OperationConflict) as exc:
            await abort_for(context, exc)

    @staticmethod
    def _train_progress(progress: ProgressReporter) -> Callable[[dict[str, Any]], None]:
        def on_record(record: dict[str, Any]) -> None:
            if record.get("kind") == "train" and "step" in record:
                step = int(record["step"])
                metrics = {name: float(record[name]) for name in PROGRESS_METRICS if name in record}
                model = record.get("model", "student")
                progress.update(done=step, message=f"training the {model}: step {step}", metrics=metrics)
            elif "message" in record:
                progress.update(message=str(record["message"]))

        return on_record

    # --- EvaluateStudent --------------------------------------------------------------------------

    async def EvaluateStudent(self, request, context):
        try:
            teacher = spec_section(TeacherSpec, request.teacher, "spec.teacher")
            evaluation = spec_section(EvaluationSpec, request.evaluation, "spec.evaluation")
            for name in ("student", "baseline"):
                if not getattr(request, name).artifact_id:
                    raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}.artifact_id must be set")
            for name in ("holdout_answers", "training_answers"):
                if not getattr(request, name).dataset_id:
                    raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}.dataset_id must be set")
            run = EvaluateRun(
                job_id=request.job_id,
                student_prefix=request.student.artifact_id,
                baseline_prefix=request.baseline.artifact_id,
                holdout_dataset_id=request.holdout_answers.dataset_id,
                training_dataset_id=request.training_answers.dataset_id,
                teacher=teacher,
                evaluation=evaluation,
                object_store=self._object_store,
                output_prefix=f"jobs/{request.job_id}/evaluate",
            )

            async def work(progress: ProgressReporter) -> trainer_pb2.EvaluateStudentResult:
                progress.update(unit="prompts", message="checking the held-out answers and the models")
                await asyncio.to_thread(self._require_dataset, "holdout_answers", run.holdout_dataset_id)
                await asyncio.to_thread(self._require_dataset, "training_answers", run.training_dataset_id)
                models = {"student": run.student_prefix, "baseline": run.baseline_prefix}
                if run.control_sft_prefix is not None:
                    models["control-sft"] = run.control_sft_prefix
                for name, prefix in models.items():
                    await asyncio.to_thread(self._require_artifact, name, prefix)
                jobs = await self._ray_jobs()
                capacity = self._ray.local_capacity()
                if capacity is not None and self._evaluation_num_gpus > capacity[1]:
                    raise OperationError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"the evaluation asks for {self._evaluation_num_gpus:g} GPUs (the trainer's "
                        f"evaluation_num_gpus), but the local Ray cluster has {capacity[1]}",
                    )
                env = {
                    RUN_CONFIG_ENV: run_without_keys(run),
                    EVALUATION_GPUS_ENV: str(self._evaluation_num_gpus),
                }

                def on_record(record: dict[str, Any]) -> None:
                    if record.get("kind") == "evaluate":
                        progress.update(
                            done=int(record.get("done", 0)),
                            total=int(record.get("total", 0)),
                            message=f"evaluating: {record.get('stage', '')}",
                        )

                await self._run_job(jobs, request.operation_id, "evaluate", env, progress, on_record)
                outcome = json.loads(await self._outcome(run.output_prefix))
                references = outcome["reference_metrics"]
                return trainer_pb2.EvaluateStudentResult(
                    report=await asyncio.to_thread(self._artifact_ref, outcome["report_prefix"]),
                    student=await asyncio.to_thread(self._artifact_ref, outcome["student_prefix"]),
                    recovery_percent=float(outcome["recovery_percent"]),
                    student_metrics=outcome["student_metrics"],
                    baseline_metrics=outcome["baseline_metrics"],
                    teacher_metrics=outcome["teacher_metrics"],
                    uniform_metrics=references.get("uniform", {}),
                    unigram_metrics=references.get("unigram", {}),
                    control_sft_metrics=references.get("control-sft", {}),
                    gap_closed_percent=outcome["gap_closed"],
                )

            return self._registry.start_request(request, kind=EVALUATE_STUDENT, work=work)
        except (OperationError, OperationConflict) as exc:
            await abort_for(context, exc)

    # --- shared steps -----------------------------------------------------------------------------

    async def _ray_jobs(self) -> RayJobs:
        try:
            return await self._ray.jobs()
        except RayUnreachable as exc:
            raise OperationError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc

    async def _run_job(
        self,
        jobs: RayJobs,
        operation_id: str,
        command: str,
        env: dict[str, str],
        progress: ProgressReporter,
        on_record: Callable[[dict[str, Any]], None],
    ) -> float:
        """Submit (or re-attach to) the operation's Ray job and follow it to a successful end; the wall
        seconds it ran. OperationError naming the run's reason if it fails; stops it if cancelled."""
        try:
            sub_id = await asyncio.to_thread(
                jobs.submit,
                operation_id,
                entrypoint(self._ray.python, command),
                env,
                num_gpus=self._evaluation_num_gpus if command == "evaluate" else 0,
            )
            progress.update(message=f"Ray job {sub_id} submitted to {jobs.address}")
            started = time.monotonic()
            try:
                end = await jobs.follow(sub_id, on_record)
            except asyncio.CancelledError:
                # A restarting service leaves a cluster's job running: the next Start re-attaches to it.
                if not (self._registry.shutting_down and not self._ray.embedded):
                    await asyncio.to_thread(jobs.stop, sub_id)
                raise
        except OSError as exc:  # requests' and aiohttp's connection errors are OSErrors
            raise OperationError(
                grpc.StatusCode.UNAVAILABLE, f"lost the Ray cluster at {jobs.address}: {exc}"
            ) from exc
        if end.status is JobStatus.STOPPED:
            raise OperationError(
                grpc.StatusCode.ABORTED, f"the Ray job {sub_id} was stopped outside Stillhouse"
            )
        if end.status is not JobStatus.SUCCEEDED:
            reason = await asyncio.to_thread(jobs.explain_failure, sub_id)
            raise OperationError(failure_code(reason), f"{command} failed in Ray job {sub_id}: {reason}")
        info = await asyncio.to_thread(lambda: jobs.client.get_job_info(sub_id))
        if info.start_time and info.end_time:
            return (info.end_time - info.start_time) / 1000
        return time.monotonic() - started

    def _require_dataset(self, field: str, dataset_id: str) -> None:
        try:
            DatasetReader(self._store, dataset_id)
        except DatasetNotFound as exc:
            raise OperationError(grpc.StatusCode.FAILED_PRECONDITION, f"{field}: {exc}") from exc
        except ObjectStoreError as exc:
            raise OperationError(grpc.StatusCode.UNAVAILABLE, f"object storage: {exc}") from exc

    def _require_artifact(self, field: str, prefix: str) -> None:
        try:
            read_artifact_manifest(self._store, prefix)
        except ObjectNotFound as exc:
            raise OperationError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{field}: no committed artifact {prefix!r}"
            ) from exc

    async def _outcome(self, output_prefix: str) -> bytes:
        try:
            return await asyncio.to_thread(self._store.get_bytes, outcome_key(output_prefix))
        except ObjectNotFound as exc:
            raise OperationError(
                grpc.StatusCode.INTERNAL, f"the Ray job succeeded but wrote no {outcome_key(output_prefix)}"
            ) from exc

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
