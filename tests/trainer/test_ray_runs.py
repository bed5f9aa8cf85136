"""Runs as Ray jobs without gRPC or Ray: a fake cluster's job is submitted, followed, stopped on cancel,
and its end turned into an outcome or a failure of the right kind."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest
from ray.job_submission import JobStatus

from stillhouse.common.ray.jobs import JobEnd
from stillhouse.trainer import ray_runs
from stillhouse.trainer.failures import FailureKind, RunFailure
from stillhouse.trainer.ray_entrypoint import OUTCOME_WRITTEN, outcome_key
from stillhouse.trainer.ray_jobs import EVALUATION_CPUS_ENV, EVALUATION_GPUS_ENV, JobFailure
from stillhouse.trainer.ray_runs import RayRuns
from stillhouse.trainer.run_config import EvaluateRun, EvaluationOutcome

SUBMISSION = "op-1-1"


class FakeJobs:
    """A Ray cluster's job API whose one job ends with `status`, after giving `records`."""

    address = "http://ray.test:8265"

    def __init__(self, status: JobStatus, records=(), failure: JobFailure | None = None, *, hang=False):
        self.status, self.records, self.failure, self.hang = status, records, failure, hang
        self.submitted: list[dict] = []
        self.stopped: list[str] = []
        info = SimpleNamespace(start_time=0, end_time=9000)
        self.client = SimpleNamespace(get_job_info=lambda sub_id: info)

    def submit(self, operation_id, command, env, *, num_gpus=0):
        self.submitted.append({"command": command, "env": env, "gpus": num_gpus})
        return SUBMISSION

    async def follow(self, sub_id, on_progress, finished=lambda: False):
        for record in self.records:
            on_progress(record)
            if finished():
                return JobEnd(sub_id, JobStatus.SUCCEEDED)
        if self.hang:
            await asyncio.Event().wait()
        return JobEnd(sub_id, self.status)

    def stop(self, sub_id):
        self.stopped.append(sub_id)

    def explain_failure(self, sub_id):
        return self.failure


class FakeRay:
    python = "python"
    storage_path = None

    def __init__(self, jobs: FakeJobs, *, embedded=False, gpus=0):
        self._jobs, self.embedded, self._gpus = jobs, embedded, gpus

    def local_capacity(self):
        return (2, self._gpus) if self.embedded else None

    async def jobs(self):
        return self._jobs


class Progress:
    def __init__(self):
        self.updates: list[dict] = []

    def update(self, **fields):
        self.updates.append(fields)


OUTCOME = EvaluationOutcome(
    report_prefix="jobs/j/evaluate/report",
    student_prefix="jobs/j/student",
    recovery_percent=float("nan"),
    student_metrics={"kl": 0.5},
    baseline_metrics={"kl": 2.0},
    teacher_metrics={"kl": 0.0},
    reference_metrics={"uniform": {"kl": 9.0}, "unigram": {"kl": 4.0}},
    gap_closed={},
)


@pytest.fixture
def run(object_store_settings) -> EvaluateRun:
    return EvaluateRun.model_validate(
        {
            "job_id": "j",
            "student_prefix": "jobs/j/train/student",
            "baseline_prefix": "jobs/j/train/baseline",
            "holdout_dataset_id": "jobs/j/teacher/holdout",
            "training_dataset_id": "jobs/j/teacher/answers",
            "teacher": {"backend": "local", "model": "teacher"},
            "evaluation": {},
            "object_store": object_store_settings,
            "output_prefix": "jobs/j/evaluate",
        }
    )


@pytest.fixture
def runs(monkeypatch, object_store):
    """RayRuns on a fake cluster, whose evaluation inputs are taken as there."""
    monkeypatch.setattr(ray_runs, "require_evaluation_inputs", lambda store, run: None)

    def make(
        jobs: FakeJobs,
        *,
        embedded=False,
        gpus=0,
        evaluation_num_gpus=0.0,
        evaluation_num_cpus=None,
        shutting_down=False,
    ):
        ray = FakeRay(jobs, embedded=embedded, gpus=gpus)
        return RayRuns(
            object_store,
            ray,
            preflight=None,
            evaluation_num_gpus=evaluation_num_gpus,
            evaluation_num_cpus=evaluation_num_cpus,
            shutting_down=lambda: shutting_down,
        )

    return make


async def test_an_evaluation_runs_as_a_ray_job_and_gives_its_outcome(runs, run, object_store):
    record = {"kind": "evaluate", "stage": "the student", "done": 3, "total": 9}
    jobs = FakeJobs(JobStatus.SUCCEEDED, [record])
    object_store.put_bytes(outcome_key(run.output_prefix), OUTCOME.model_dump_json().encode())
    progress = Progress()

    outcome = await runs(jobs, evaluation_num_gpus=1).evaluate("op-1", run, progress)

    assert math.isnan(outcome.recovery_percent)  # an undefined recovery survives the outcome's JSON
    assert outcome.model_copy(update={"recovery_percent": 0.0}) == OUTCOME.model_copy(
        update={"recovery_percent": 0.0}
    )
    [submitted] = jobs.submitted
    assert submitted["gpus"] == 1 and submitted["env"][EVALUATION_GPUS_ENV] == "1"
    assert submitted["env"][EVALUATION_CPUS_ENV] == "1"  # a cluster's default
    assert submitted["command"] == "python -m stillhouse.trainer.ray_entrypoint evaluate"
    assert {"done": 3, "total": 9, "message": "evaluating: the student"} in progress.updates


async def test_a_run_ends_once_its_outcome_is_written_without_waiting_for_the_jobs_shutdown(
    runs, run, object_store
):
    record = {"kind": "evaluate", "stage": "the student", "done": 9, "total": 9}
    # The job still runs (Ray shutting its workers and driver down) after it wrote its outcome.
    jobs = FakeJobs(JobStatus.RUNNING, [record, OUTCOME_WRITTEN], hang=True)
    object_store.put_bytes(outcome_key(run.output_prefix), OUTCOME.model_dump_json().encode())
    progress = Progress()

    outcome = await asyncio.wait_for(runs(jobs).evaluate("op-1", run, progress), timeout=30)

    assert outcome.student_prefix == OUTCOME.student_prefix
    assert {"done": 9, "total": 9, "message": "evaluating: the student"} in progress.updates
    assert not jobs.stopped


async def test_a_failed_job_fails_the_run_with_the_kind_its_run_reported(runs, run):
    failure = JobFailure("EvaluationError: no held-out answer is left", FailureKind.USER_FIXABLE)
    jobs = FakeJobs(JobStatus.FAILED, failure=failure)

    with pytest.raises(RunFailure) as failed:
        await runs(jobs).evaluate("op-1", run, Progress())

    assert failed.value.kind is FailureKind.USER_FIXABLE
    assert str(failed.value) == f"evaluate failed in Ray job {SUBMISSION}: {failure.reason}"


async def test_a_job_stopped_outside_stillhouse_fails_the_run_as_such(runs, run):
    with pytest.raises(RunFailure) as failed:
        await runs(FakeJobs(JobStatus.STOPPED)).evaluate("op-1", run, Progress())

    assert failed.value.kind is FailureKind.STOPPED_OUTSIDE


async def test_more_evaluation_gpus_than_the_local_head_has_are_refused_before_submitting(runs, run):
    jobs = FakeJobs(JobStatus.SUCCEEDED)

    with pytest.raises(RunFailure, match="asks for 2 GPUs") as failed:
        await runs(jobs, embedded=True, gpus=1, evaluation_num_gpus=2).evaluate("op-1", run, Progress())

    assert failed.value.kind is FailureKind.USER_FIXABLE and not jobs.submitted


@pytest.mark.parametrize(
    ("embedded", "evaluation_num_cpus", "asked"), [(True, None, "2"), (True, 1, "1"), (False, 8, "8")]
)
async def test_the_evaluation_asks_for_every_cpu_of_a_local_head_unless_the_setting_says(
    runs, run, object_store, embedded, evaluation_num_cpus, asked
):
    jobs = FakeJobs(JobStatus.SUCCEEDED)
    object_store.put_bytes(outcome_key(run.output_prefix), OUTCOME.model_dump_json().encode())

    runs_here = runs(jobs, embedded=embedded, evaluation_num_cpus=evaluation_num_cpus)
    await runs_here.evaluate("op-1", run, Progress())

    [submitted] = jobs.submitted
    assert submitted["env"][EVALUATION_CPUS_ENV] == asked


async def test_more_evaluation_cpus_than_the_local_head_has_are_refused_before_submitting(runs, run):
    jobs = FakeJobs(JobStatus.SUCCEEDED)

    with pytest.raises(RunFailure, match=r"asks for 3 CPUs \(the trainer's evaluation_num_cpus\)") as failed:
        await runs(jobs, embedded=True, evaluation_num_cpus=3).evaluate("op-1", run, Progress())

    assert failed.value.kind is FailureKind.USER_FIXABLE and not jobs.submitted


@pytest.mark.parametrize(
    ("embedded", "shutting_down", "stopped"),
    [(True, False, True), (False, False, True), (True, True, True), (False, True, False)],
)
async def test_a_cancelled_run_stops_its_job_unless_a_stopping_service_leaves_a_clusters_job(
    runs, run, embedded, shutting_down, stopped
):
    jobs = FakeJobs(JobStatus.RUNNING, hang=True)
    task = asyncio.create_task(
        runs(jobs, embedded=embedded, shutting_down=shutting_down).evaluate("op-1", run, Progress())
    )
    while not jobs.submitted:
        await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert jobs.stopped == ([SUBMISSION] if stopped else [])
