"""The program inside a trainer Ray job: `python -m stillhouse.trainer.ray_entrypoint train|evaluate`.

The run (a TrainRun or EvaluateRun as JSON) comes in the job's environment, so that no shell quoting or
argument length limit touches it. `train` runs the training loop on Ray Train workers; `evaluate` runs
the evaluation as one Ray task. Progress goes to stdout as `STILLHOUSE_PROGRESS {json}` lines (from rank
0 only), the outcome (a TrainOutcome or EvaluationOutcome as JSON) to `<output_prefix>/outcome.json` in
object storage, announced by an `OUTCOME_WRITTEN` record, and a failure's reason and kind
(`failures.FailureKind`) to a last `STILLHOUSE_ERROR {json}` line before a non-zero exit.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from stillhouse.common.ray.jobs import ERROR_PREFIX, PROGRESS_PREFIX
from stillhouse.trainer.failures import kind_of_error
from stillhouse.trainer.ray_credentials import run_with_keys
from stillhouse.trainer.ray_jobs import (
    EVALUATION_CPUS_ENV,
    EVALUATION_GPUS_ENV,
    RUN_CONFIG_ENV,
    STORAGE_PATH_ENV,
)
from stillhouse.trainer.ray_train_storage import ray_train_storage
from stillhouse.trainer.run_config import EvaluateRun, TrainRun

OUTCOME_NAME = "outcome.json"
# The record printed once the outcome is in object storage: what is left of the job is Ray's shutdown of
# its workers and driver (seconds), which the trainer service need not wait for.
OUTCOME_WRITTEN = {"kind": "outcome_written"}


def outcome_key(output_prefix: str) -> str:
    return f"{output_prefix}/{OUTCOME_NAME}"


def print_progress(record: dict[str, Any]) -> None:
    # Not through `print`, for the reason that `common.logging.log_without_print` gives.
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(record) + "\n")
    sys.stdout.flush()


def hand_over_outcome(run: TrainRun | EvaluateRun, outcome_json: str) -> None:
    """Write the run's outcome to object storage, then say so (`OUTCOME_WRITTEN`)."""
    from stillhouse.common.objectstore.open_store import open_object_store

    open_object_store(run.object_store).put_bytes(outcome_key(run.output_prefix), outcome_json.encode())
    print_progress(OUTCOME_WRITTEN)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from stillhouse.common.logging import log_without_print
    from stillhouse.trainer.train_loop import train_worker

    log_without_print()
    run = run_with_keys(TrainRun, config["run"])
    # Ray sets OMP_NUM_THREADS to the worker's CPUs, which torch may have read before: say it outright.
    torch.set_num_threads(run.training.cpus_per_worker)
    rank = ray.train.get_context().get_world_rank()

    # Not through `ray.train.report`: a worker's report waits until Ray Train's controller has taken the
    # one before, and the controller looks every 2 s, so reporting each step that way held every step
    # to at least 2 s (the demo's CPU steps by a tenth, a GPU's steps by far more).
    def report(metrics: dict[str, float]) -> None:
        if rank == 0:
            print_progress({"kind": "train", **metrics})

    outcome = train_worker(run, report)
    if rank == 0:
        # Ray Train keeps no return value and no metrics of a report without a checkpoint, so rank 0
        # hands the outcome over through object storage.
        hand_over_outcome(run, outcome.model_dump_json())


def train(run_json: str, given_storage_path: str | None) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run = run_with_keys(TrainRun, run_json)
    storage = ray_train_storage(given_storage_path, run.object_store, run.output_prefix)
    training = run.training
    gpus = training.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": run_json},
        scaling_config=ScalingConfig(
            num_workers=training.workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": training.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=RunConfig(
            name=f"stillhouse-{run.job_id}",
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    print_progress({"kind": "status", "message": f"starting {training.workers} Ray Train workers"})
    trainer.fit()


def evaluate(run_json: str, num_cpus: int, num_gpus: float) -> None:
    import ray

    from stillhouse.trainer.evaluation import run_evaluation

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)
    def evaluation_task(serialized: str) -> str:
        import torch

        torch.set_num_threads(num_cpus)
        run = run_with_keys(EvaluateRun, serialized)

        def progress(stage: str, done: int, total: int) -> None:
            print_progress({"kind": "evaluate", "stage": stage, "done": done, "total": total})

        return run_evaluation(run, progress).model_dump_json()

    hand_over_outcome(run_with_keys(EvaluateRun, run_json), ray.get(evaluation_task.remote(run_json)))


def root_error(exc: BaseException) -> BaseException:
    """The error at the root of a failure. Ray wraps a worker's exception twice: in a WorkerGroupError
    (per rank) and in a RayTaskError (whose `cause` is the worker's own)."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def error_summary(exc: BaseException) -> str:
    """`Name: message` of the error at the root of a failure."""
    root = root_error(exc)
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[-1] if lines else ''}"


def error_line(exc: BaseException) -> str:
    """The STILLHOUSE_ERROR line of a failure: its summary, and the kind of its root error by type."""
    record = {"message": error_summary(exc), "kind": kind_of_error(root_error(exc)).value}
    return ERROR_PREFIX + json.dumps(record)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("train", "evaluate"):
        print("usage: python -m stillhouse.trainer.ray_entrypoint train|evaluate", file=sys.stderr)
        return 2
    run_json = os.environ.get(RUN_CONFIG_ENV)
    if not run_json:
        print(f"{RUN_CONFIG_ENV} is not set: the trainer service passes the run in it", file=sys.stderr)
        return 2
    try:
        if argv[0] == "train":
            train(run_json, os.environ.get(STORAGE_PATH_ENV) or None)
        else:
            evaluate(
                run_json,
                int(os.environ.get(EVALUATION_CPUS_ENV) or 1),
                float(os.environ.get(EVALUATION_GPUS_ENV) or 0),
            )
    except Exception as exc:
        print(error_line(exc), flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
