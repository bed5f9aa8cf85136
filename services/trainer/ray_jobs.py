"""The trainer's Ray jobs: the program they run (`ray_entrypoint`), the variables that carry its run, and
the kind of a failed job's failure.

The program prints its failure as a `STILLHOUSE_ERROR {json}` line with its reason and kind; a failure it
did not report (Ray ended it) gets its kind from Ray's message.
"""

from __future__ import annotations

from dataclasses import dataclass

from stillhouse.common.ray import jobs
from stillhouse.common.ray.jobs import error_field, error_payload, failure_reason
from stillhouse.trainer.failures import FailureKind, kind_of_reason

RUN_CONFIG_ENV = "STILLHOUSE_RUN_CONFIG"
STORAGE_PATH_ENV = "STILLHOUSE_RAY_STORAGE_PATH"
EVALUATION_GPUS_ENV = "STILLHOUSE_EVALUATION_GPUS"
EVALUATION_CPUS_ENV = "STILLHOUSE_EVALUATION_CPUS"
ENTRYPOINT_MODULE = "stillhouse.trainer.ray_entrypoint"


@dataclass(frozen=True)
class JobFailure:
    reason: str
    kind: FailureKind


def failure_kind(logs: str, reason: str) -> FailureKind:
    """The kind of a job's failure: the one on the run's last STILLHOUSE_ERROR line; for a failure the run
    did not report (Ray ended it), what `reason` says (`failures.kind_of_reason`)."""
    payload = error_payload(logs)
    reported = error_field(payload, "kind") if payload is not None else None
    if reported in {kind.value for kind in FailureKind}:
        return FailureKind(reported)
    return kind_of_reason(reason)


def entrypoint(python: str, command: str) -> str:
    return f"{python} -m {ENTRYPOINT_MODULE} {command}"


class RayJobs(jobs.RayJobs):
    def explain_failure(self, sub_id: str) -> JobFailure:
        """Why the job failed, and the kind of its failure (see `failure_reason` and `failure_kind`)."""
        fallback, logs = self.failure_logs(sub_id)
        reason = failure_reason(logs, fallback)
        return JobFailure(reason, failure_kind(logs, reason))
