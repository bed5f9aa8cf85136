"""A trainer run's failure has a kind that follows its type, crosses the Ray job boundary on the job's
error line, and comes back as the status code that one table gives the kind."""

from __future__ import annotations

import grpc
import pytest
import torch
from ray.exceptions import RayTaskError

from stillhouse.common.ray.jobs import failure_reason
from stillhouse.trainer.evaluation import EvaluationError
from stillhouse.trainer.failures import FailureKind, UserFixableError, kind_of_error
from stillhouse.trainer.ray_credentials import MissingObjectStoreKeys
from stillhouse.trainer.ray_entrypoint import error_line
from stillhouse.trainer.ray_jobs import failure_kind
from stillhouse.trainer.run_config import IncompatibleTokenizers, TrainingDiverged
from stillhouse.trainer.servicer import STATUS_CODES


def status_of_a_job_failing_with(error: BaseException) -> grpc.StatusCode:
    """The status code the service gives a Ray job whose run failed with `error`, from the job's logs."""
    logs = "\n".join(
        [
            "Traceback (most recent call last):",
            error_line(error),
            "Traceback (most recent call last):",
            f"{type(error).__name__}: {error}",
        ]
    )
    return STATUS_CODES[failure_kind(logs, failure_reason(logs, "exit code 1"))]


def in_a_ray_task(error: Exception) -> Exception:
    """`error` as `ray.get` raises it from the task that ran the evaluation."""
    return RayTaskError("evaluation_task", "Traceback ...", error).as_instanceof_cause()


def test_every_failure_kind_has_a_status_code():
    assert set(STATUS_CODES) == set(FailureKind)


def test_an_evaluation_error_comes_back_with_the_code_of_the_other_user_fixable_errors():
    error = EvaluationError("no held-out answer is left to evaluate on: every row was dropped")

    code = status_of_a_job_failing_with(in_a_ray_task(error))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert code == STATUS_CODES[FailureKind.USER_FIXABLE]
    for fixable in (
        TrainingDiverged("the loss became NaN at step 3"),
        IncompatibleTokenizers("the student's vocabulary is not the teacher's"),
        MissingObjectStoreKeys("this Ray node has no object-store keys"),
    ):
        assert status_of_a_job_failing_with(fixable) == code


def test_the_kind_follows_the_type_not_the_name():
    class Unremarkable(UserFixableError):
        pass

    class TrainingError(Exception):  # named like a user-fixable error, but not one
        pass

    assert status_of_a_job_failing_with(Unremarkable("bad rows")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of_a_job_failing_with(TrainingError("a bug")) == grpc.StatusCode.INTERNAL


def test_out_of_memory_comes_back_as_resource_exhausted():
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert kind_of_error(error) is FailureKind.OUT_OF_MEMORY
    assert status_of_a_job_failing_with(error) == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("logs", "reason", "kind"),
    [
        ("", "Job entrypoint command failed with exit code 1", FailureKind.INTERNAL),
        # Ray's message for a task it killed for memory
        ("", "ray.exceptions.OutOfMemoryError: Task was killed", FailureKind.OUT_OF_MEMORY),
        # an error line without a kind
        (
            'STILLHOUSE_ERROR {"message": "RuntimeError: out of memory"}',
            "RuntimeError: out of memory",
            FailureKind.OUT_OF_MEMORY,
        ),
    ],
)
def test_a_failure_the_run_gave_no_kind_is_known_by_its_reason(logs, reason, kind):
    assert failure_kind(logs, reason) is kind
