"""Training and evaluation runs as Ray jobs, apart from how they are asked for: a run's inputs and the
cluster's capacity are checked before any Ray work, then the operation's Ray job is submitted (or
re-attached to: see `ray_jobs`), followed to its end, stopped when the operation is cancelled, and its
outcome read back. Every failure is a `RunFailure` with its kind (`failures`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING

from ray.job_submission import JobStatus

from stillhouse.common.jobspec import DistillationJobSpec
from stillhouse.common.objectstore.objects import ObjectNotFound, ObjectStore, ObjectStoreError
from stillhouse.common.ray.cluster import RayUnreachable
from stillhouse.trainer.failures import FailureKind, RunFailure
from stillhouse.trainer.preflight import PreflightReport, capacity_violations
from stillhouse.trainer.preflight_loading import ModelFactsLoader
from stillhouse.trainer.ray_connection import RayConnection
from stillhouse.trainer.ray_credentials import run_without_keys
from stillhouse.trainer.ray_entrypoint import OUTCOME_WRITTEN, outcome_key
from stillhouse.trainer.ray_jobs import (
    EVALUATION_CPUS_ENV,
    EVALUATION_GPUS_ENV,
    RUN_CONFIG_ENV,
    STORAGE_PATH_ENV,
    RayJobs,
    entrypoint,
)
from stillhouse.trainer.run_config import EvaluateRun, EvaluationOutcome, TrainOutcome, TrainRun
from stillhouse.trainer.run_inputs import require_dataset, require_evaluation_inputs
from stillhouse.trainer.run_progress import OnRecord, evaluate_progress, train_progress

if TYPE_CHECKING:
    from stillhouse.common.operations import ProgressReporter


@dataclass(frozen=True)
class TrainedStudent:
    outcome: TrainOutcome
    gpu_hours: float  # workers * GPUs per worker * the job's wall time


@dataclass
class RayRuns:
    """The trainer's runs on its Ray cluster. `shutting_down` says whether a cancel comes from the
    service stopping, which leaves a cluster's job running for the next service to re-attach to."""

    store: ObjectStore
    ray: RayConnection
    preflight: ModelFactsLoader
    _: KW_ONLY
    evaluation_num_gpus: float = 0
    evaluation_num_cpus: int | None = None  # None: every CPU of a local head, one on a cluster
    shutting_down: Callable[[], bool]

    async def check(self, spec: DistillationJobSpec) -> PreflightReport:
        """The whole job checked (see `preflight`), with the workers and GPUs a local head can give."""
        try:
            report = await asyncio.to_thread(self.preflight.check, spec)
        except ObjectStoreError as exc:
            raise RunFailure(f"object storage: {exc}", FailureKind.UNAVAILABLE) from exc
        training = spec.training
        report.violations += capacity_violations(
            training.workers, training.gpus_per_worker, self.ray.local_capacity(), training.cpus_per_worker
        )
        return report

    async def train(
        self, operation_id: str, spec: DistillationJobSpec, run: TrainRun, progress: ProgressReporter
    ) -> TrainedStudent:
        """Train the student of `spec` (the job `run` was built from) as the operation's Ray job."""
        progress.update(unit="steps", message="checking the answers dataset and the tokenizers")
        await asyncio.to_thread(require_dataset, self.store, "answers", run.answers_dataset_id)
        report = await self.check(spec)
        if report.violations:
            raise RunFailure(
                "; ".join(f"{found.field}: {found.message}" for found in report.violations),
                FailureKind.USER_FIXABLE,
            )
        jobs = await self._jobs()
        env = {RUN_CONFIG_ENV: run_without_keys(run)}
        if self.ray.storage_path is not None:
            env[STORAGE_PATH_ENV] = self.ray.storage_path
        wall_seconds = await self._run_job(
            jobs, operation_id, "train", env, progress, train_progress(progress), num_gpus=0
        )
        outcome = TrainOutcome.model_validate_json(await self._outcome(run.output_prefix))
        gpu_hours = run.training.workers * run.training.gpus_per_worker * wall_seconds / 3600
        return TrainedStudent(outcome, gpu_hours)

    async def evaluate(
        self, operation_id: str, run: EvaluateRun, progress: ProgressReporter
    ) -> EvaluationOutcome:
        """Evaluate the student as the operation's Ray job, on `evaluation_num_gpus` GPUs and the CPUs of
        `_evaluation_cpus`."""
        progress.update(unit="prompts", message="checking the held-out answers and the models")
        await asyncio.to_thread(require_evaluation_inputs, self.store, run)
        jobs = await self._jobs()
        cpus = self._evaluation_cpus()
        env = {
            RUN_CONFIG_ENV: run_without_keys(run),
            EVALUATION_GPUS_ENV: str(self.evaluation_num_gpus),
            EVALUATION_CPUS_ENV: str(cpus),
        }
        await self._run_job(
            jobs,
            operation_id,
            "evaluate",
            env,
            progress,
            evaluate_progress(progress),
            num_gpus=self.evaluation_num_gpus,
        )
        return EvaluationOutcome.model_validate_json(await self._outcome(run.output_prefix))

    def _evaluation_cpus(self) -> int:
        """The CPUs the evaluation task asks for: `evaluation_num_cpus`, or by default every CPU of a local
        head and one on a cluster. RunFailure when a local head has fewer CPUs or GPUs than asked."""
        capacity = self.ray.local_capacity()
        if capacity is None:
            return self.evaluation_num_cpus or 1
        cpus, gpus = capacity
        for unit, setting, asked, has in (
            ("GPUs", "evaluation_num_gpus", self.evaluation_num_gpus, gpus),
            ("CPUs", "evaluation_num_cpus", self.evaluation_num_cpus or 0, cpus),
        ):
            if asked > has:
                raise RunFailure(
                    f"the evaluation asks for {asked:g} {unit} (the trainer's {setting}), but the local Ray "
                    f"cluster has {has}",
                    FailureKind.USER_FIXABLE,
                )
        return self.evaluation_num_cpus or cpus

    async def _jobs(self) -> RayJobs:
        try:
            return await self.ray.jobs()
        except RayUnreachable as exc:
            raise RunFailure(str(exc), FailureKind.UNAVAILABLE) from exc

    async def _run_job(
        self,
        jobs: RayJobs,
        operation_id: str,
        command: str,
        env: dict[str, str],
        progress: ProgressReporter,
        on_record: OnRecord,
        *,
        num_gpus: float,
    ) -> float:
        """Submit (or re-attach to) the operation's Ray job and follow it until its outcome is written (or
        it ends); the wall seconds it ran. A RunFailure of the run's reason and kind if it fails; stops it
        if cancelled."""
        outcome_written = False

        def on_job_record(record: dict) -> None:
            nonlocal outcome_written
            if record == OUTCOME_WRITTEN:
                outcome_written = True
            else:
                on_record(record)

        try:
            sub_id = await asyncio.to_thread(
                jobs.submit, operation_id, entrypoint(self.ray.python, command), env, num_gpus=num_gpus
            )
            progress.update(message=f"Ray job {sub_id} submitted to {jobs.address}")
            started = time.monotonic()
            try:
                end = await jobs.follow(sub_id, on_job_record, finished=lambda: outcome_written)
            except asyncio.CancelledError:
                # A restarting service leaves a cluster's job running: the next Start re-attaches to it.
                if not (self.shutting_down() and not self.ray.embedded):
                    await asyncio.to_thread(jobs.stop, sub_id)
                raise
        except OSError as exc:  # requests' and aiohttp's connection errors are OSErrors
            raise RunFailure(
                f"lost the Ray cluster at {jobs.address}: {exc}", FailureKind.UNAVAILABLE
            ) from exc
        if end.status is JobStatus.STOPPED:
            raise RunFailure(
                f"the Ray job {sub_id} was stopped outside Stillhouse", FailureKind.STOPPED_OUTSIDE
            )
        if end.status is not JobStatus.SUCCEEDED:
            failure = await asyncio.to_thread(jobs.explain_failure, sub_id)
            raise RunFailure(f"{command} failed in Ray job {sub_id}: {failure.reason}", failure.kind)
        info = await asyncio.to_thread(lambda: jobs.client.get_job_info(sub_id))
        if info.start_time and info.end_time:
            return (info.end_time - info.start_time) / 1000
        return time.monotonic() - started

    async def _outcome(self, output_prefix: str) -> bytes:
        try:
            return await asyncio.to_thread(self.store.get_bytes, outcome_key(output_prefix))
        except ObjectNotFound as exc:
            raise RunFailure(
                f"the Ray job succeeded but wrote no {outcome_key(output_prefix)}", FailureKind.INTERNAL
            ) from exc
