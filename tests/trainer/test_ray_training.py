"""Training and its control through real Ray jobs on a local Ray head: a 2-worker DDP run on CPU that
learns and writes its artifacts, a stopped run that resumes from its checkpoint, and cancel. The runs
read and write a real S3 server, whose keys reach the Ray workers only through the head's environment."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from ray.exceptions import RayTaskError
from ray.job_submission import JobStatus
from ray.train.v2.api.exceptions import WorkerGroupError
from ray_heads import local_ray_head, short_temp_dir
from s3_server import SeaweedFS, seaweedfs_server
from waiting import wait_until

from stillhouse.common.datasets.artifacts import read_artifact_manifest
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.common.ray.cluster import LocalRayHead, RayUnreachable, auth_headers
from stillhouse.common.ray.jobs import failure_reason, parse_progress, submission_id
from stillhouse.trainer.checkpoints import committed_steps
from stillhouse.trainer.ray_credentials import key_environment, run_without_keys
from stillhouse.trainer.ray_entrypoint import error_line, error_summary, outcome_key
from stillhouse.trainer.ray_jobs import RUN_CONFIG_ENV, RayJobs, entrypoint, failure_kind
from stillhouse.trainer.run_config import TrainingDataError, TrainOutcome, TrainRun
from stillhouse.trainer.servicer import STATUS_CODES

pytestmark = pytest.mark.long

TOPICS = ["cats", "dogs", "rain", "the sea", "mountains", "bread", "music", "trains"]
PROMPTS = [f"question {i}: tell me about {topic}" for i, topic in enumerate(TOPICS * 2)]
DATASET = "jobs/j/teacher/answers"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def object_store_settings(s3: SeaweedFS) -> ObjectStoreSettings:
    return s3.settings(f"train-{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
def ray_head(s3: SeaweedFS) -> Iterator[LocalRayHead]:
    with local_ray_head(worker_env=key_environment(s3.settings("any"))) as head:
        yield head


@pytest.fixture
def jobs(ray_head: LocalRayHead) -> RayJobs:
    return RayJobs(ray_head.address, headers=auth_headers(ray_head.token), poll_seconds=0.5)


@pytest.fixture
def train_run(tmp_path, tiny_llama, answers_dataset, object_store, object_store_settings):
    teacher = tiny_llama(tmp_path / "teacher", seed=1)
    student = tiny_llama(tmp_path / "student", seed=0)
    answers_dataset(object_store, DATASET, teacher, PROMPTS, max_new_tokens=16, rows_per_shard=4)

    def make(job_id: str, **training) -> TrainRun:
        return TrainRun.model_validate(
            {
                "job_id": job_id,
                "answers_dataset_id": DATASET,
                "object_store": object_store_settings,
                "teacher": {"backend": "local", "model": str(teacher)},
                "student": {"init": {"pretrained": str(student)}},
                "training": {
                    "loss": {"kind": "forward_kl"},
                    "learningRate": 3e-3,
                    "batchTokens": 256,
                    "maxSeqLen": 128,
                    "warmupRatio": 0.1,
                    "workers": 2,
                    **training,
                },
                "output_prefix": f"jobs/{job_id}/train",
                "report_every_steps": 1,
            }
        )

    return make


def submit(
    jobs: RayJobs, ray_head: LocalRayHead, operation_id: str, run: TrainRun, env: dict[str, str] | None = None
) -> str:
    """As the trainer submits to a cluster: Ray Train's state goes to the run's folder in object storage."""
    env = {RUN_CONFIG_ENV: run_without_keys(run), **(env or {})}
    return jobs.submit(operation_id, entrypoint(sys.executable, "train"), env)


def follow(jobs: RayJobs, sub_id: str, records: list[dict]) -> JobStatus:
    """Follow the job to its end; each record gets its arrival time as `arrived`."""

    def arrived(record: dict) -> None:
        records.append({**record, "arrived": time.monotonic()})

    return asyncio.run(jobs.follow(sub_id, arrived)).status


# How often Ray Train's controller polls the workers in the test below. A worker's `ray.train.report`
# waits while its one-result queue is full, that is until the next poll: a loop that reported every step
# through it could not step faster than this (2 s by default).
CONTROLLER_POLL_SECONDS = 5


def test_two_workers_learn_and_write_student_and_baseline(jobs, ray_head, train_run, object_store):
    run = train_run("learn", epochs=3)
    records: list[dict] = []
    submitted = time.monotonic()
    poll = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(CONTROLLER_POLL_SECONDS)}
    sub_id = submit(jobs, ray_head, "op-learn", run, poll)

    status = follow(jobs, sub_id, records)

    assert status is JobStatus.SUCCEEDED, jobs.explain_failure(sub_id)
    job_env = json.dumps(jobs.client.get_job_info(sub_id).runtime_env)
    secret_key = run.object_store.secret_key.get_secret_value()
    assert RUN_CONFIG_ENV in job_env and secret_key not in job_env
    steps = [r for r in records if r.get("kind") == "train"]
    assert len(steps) >= 3
    assert [step["step"] for step in steps] == list(range(1, len(steps) + 1)), "each step once, in order"
    assert steps[-1]["loss"] < steps[0]["loss"]
    outcome = TrainOutcome.model_validate_json(object_store.get_bytes(outcome_key(run.output_prefix)))
    assert outcome.steps == int(steps[-1]["step"]) and outcome.resumed_from_step is None
    # Every step reported its progress, and none waited for the controller's poll to do so.
    assert outcome.steps >= 4 and outcome.seconds < CONTROLLER_POLL_SECONDS * (outcome.steps - 1)
    for prefix in (run.student_prefix, run.baseline_prefix):
        files = {f.path for f in read_artifact_manifest(object_store, prefix).files}
        assert "config.json" in files and "tokenizer.json" in files
    ray_state = [item.key for item in object_store.list(f"{run.output_prefix}/ray/")]
    assert ray_state, "Ray Train kept no state in object storage"
    # Each structured line of the workers reaches the job's log once.
    job_log = jobs.client.get_job_logs(sub_id).splitlines()
    committed = [line for line in job_log if "checkpoint committed" in line]
    assert committed and len(set(committed)) == len(committed), committed
    print(
        f"submit to first step: {steps[0]['arrived'] - submitted:.1f} s, "
        f"{len(steps)} steps in {steps[-1]['arrived'] - steps[0]['arrived']:.1f} s, "
        f"submit to end: {time.monotonic() - submitted:.1f} s"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stopped_run_resubmitted_resumes_from_its_checkpoint(jobs, ray_head, train_run, object_store):
    run = train_run("resume", epochs=10, checkpointEverySteps=2)
    first = submit(jobs, ray_head, "op-resume", run)
    wait_until(lambda: committed_steps(object_store, run.checkpoints_prefix), 400, "the first checkpoint")
    jobs.stop(first)
    assert follow(jobs, first, []) is JobStatus.STOPPED
    checkpointed = max(committed_steps(object_store, run.checkpoints_prefix))

    second = submit(jobs, ray_head, "op-resume", run)
    records: list[dict] = []
    assert second != first
    assert follow(jobs, second, records) is JobStatus.SUCCEEDED, jobs.explain_failure(second)

    outcome = TrainOutcome.model_validate_json(object_store.get_bytes(outcome_key(run.output_prefix)))
    assert outcome.resumed_from_step is not None and outcome.resumed_from_step >= checkpointed
    first_step = min(int(r["step"]) for r in records if r.get("kind") == "train")
    assert first_step == outcome.resumed_from_step + 1


def test_cancel_stops_the_job_and_a_running_job_is_reattached(jobs, ray_head, train_run):
    run = train_run("cancel", epochs=50)
    sub_id = submit(jobs, ray_head, "op-cancel", run)
    assert submit(jobs, ray_head, "op-cancel", run) == sub_id  # a restarted service re-attaches

    jobs.stop(sub_id)

    assert follow(jobs, sub_id, []) is JobStatus.STOPPED


def test_progress_lines_are_found_behind_ray_worker_prefixes():
    line = '(RayTrainWorker pid=4242) STILLHOUSE_PROGRESS {"kind": "train", "step": 3.0, "loss": 1.5}'
    assert parse_progress(line) == {"kind": "train", "step": 3.0, "loss": 1.5}
    assert parse_progress("(RayTrainWorker pid=4242) step 3") is None


def processes_using(folder: Path) -> list[int]:
    """Processes whose command line names `folder` (Ray's GCS server, raylet, agents...)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_a_failed_job_is_explained_by_the_runs_own_error_line():
    logs = "\n".join(
        [
            "(RayTrainWorker pid=7) Traceback (most recent call last):",
            'STILLHOUSE_ERROR {"message": "TrainingDiverged: the loss became NaN at step 3"}',
            "Traceback (most recent call last):",
            "ray.exceptions.RayTaskError: the last line of a traceback",
        ]
    )
    assert failure_reason(logs, "exit code 1") == "TrainingDiverged: the loss became NaN at step 3"
    assert failure_reason("boom\nMemoryError: out of memory\ndone", "exit code 1") == (
        "MemoryError: out of memory"
    )
    assert failure_reason("nothing useful", "exit code 1") == "exit code 1"


def test_submission_ids_are_per_operation_and_attempt():
    assert submission_id("train/job 1", 2) == "train_job_1-2"


def test_a_workers_own_error_is_dug_out_of_rays_wrappers():
    try:
        raise TrainingDataError("every row was dropped")
    except TrainingDataError as exc:
        wrapped = RayTaskError("train_fn", "Traceback ...", exc).as_instanceof_cause()
    failure = WorkerGroupError("rank 0 failed", {0: wrapped})
    summary = error_summary(failure)
    assert summary == "TrainingDataError: every row was dropped"
    assert STATUS_CODES[failure_kind(error_line(failure), summary)] == grpc.StatusCode.FAILED_PRECONDITION
    # Ray's own message for a job it killed: the run printed no error line.
    oom = "OutOfMemoryError: Task was killed"
    assert STATUS_CODES[failure_kind("", oom)] == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.slow
def test_a_killed_owner_takes_its_head_along():
    with short_temp_dir() as temp_dir:
        owner = subprocess.Popen(
            [sys.executable, "-c", OWNER_PROGRAM, str(temp_dir)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert owner.stdout.readline().strip() == "ready"
            assert processes_using(temp_dir)
        finally:
            owner.kill()
            owner.wait(10)
        wait_until(lambda: not processes_using(temp_dir), 30, "the orphaned head's processes to exit")


OWNER_PROGRAM = """
import sys, time
from pathlib import Path
from stillhouse.common.ray.settings import LocalRaySettings
from stillhouse.common.ray.cluster import LocalRayHead
temp_dir = Path(sys.argv[1])
head = LocalRayHead(LocalRaySettings(temp_dir=temp_dir, auth_token_file=temp_dir / "auth-token", num_cpus=1))
head.start()
head.wait_ready()
print("ready", flush=True)
time.sleep(600)
"""


# Last in this module: it stops the module's head.
def test_the_head_stops_and_leaves_nothing_behind(ray_head):
    assert processes_using(ray_head.temp_dir)
    ray_head.stop()
    with pytest.raises(RayUnreachable, match="cannot reach the Ray cluster"):
        RayJobs(ray_head.address, connect_timeout_seconds=2).check_reachable()
    wait_until(lambda: not processes_using(ray_head.temp_dir), 20, "the head's processes to exit")


class _StartingHead:
    """The job API of a head whose job agent is not up for its first `busy` submissions: it answers as
    Ray's SDK does (a RuntimeError with the server's 500 text)."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.submitted: list[str] = []

    def get_job_info(self, sub_id: str):
        raise RuntimeError(f"Request failed with status code 404: Job {sub_id} does not exist.")

    def submit_job(self, *, submission_id: str, **_: object) -> str:
        if self.busy:
            self.busy -= 1
            raise RuntimeError(
                "Request failed with status code 500: "
                "No available agent to submit job, please try again later.."
            )
        self.submitted.append(submission_id)
        return submission_id


def test_a_submission_before_the_job_agent_is_up_is_tried_again(monkeypatch):
    head = _StartingHead(busy=2)
    jobs = RayJobs("http://127.0.0.1:1", agent_wait_seconds=30)
    monkeypatch.setattr(RayJobs, "client", property(lambda self: head))
    assert jobs.submit("op-1", "true", {}) == "op-1-1" and head.submitted == ["op-1-1"]

    never_up = RayJobs("http://127.0.0.1:1", agent_wait_seconds=0.5)
    monkeypatch.setattr(RayJobs, "client", property(lambda self: _StartingHead(busy=1000)))
    with pytest.raises(RuntimeError, match="No available agent"):
        never_up.submit("op-2", "true", {})
