"""How a trainer run fails: every failure has a kind, which says who can act on it.

The kind follows from the failure's type: a `RunFailure` carries its own (a subclass fixes it, as
`UserFixableError` does), and torch's and Ray's out-of-memory errors are `OUT_OF_MEMORY`. A failure
inside a Ray job crosses to the service by value, as the kind's name on the job's error line
(`ray_entrypoint`, `ray_jobs.failure_kind`). The service gives each kind its gRPC status code in one table
(`servicer.STATUS_CODES`).
"""

from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    # The job's author (or the trainer's operator) can act on it: bad data, a diverged loss,
    # incompatible tokenizers, a missing dataset, more GPUs than the cluster has.
    USER_FIXABLE = "user_fixable"
    OUT_OF_MEMORY = "out_of_memory"
    UNAVAILABLE = "unavailable"  # the Ray cluster or object storage does not answer
    STOPPED_OUTSIDE = "stopped_outside"  # the Ray job was stopped outside Stillhouse
    INTERNAL = "internal"  # a bug, or a failure that nothing explains


class RunFailure(Exception):
    """A run that cannot go on. A subclass fixes the kind by its type; an instance may be given one."""

    kind: FailureKind = FailureKind.INTERNAL

    def __init__(self, message: str, kind: FailureKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class UserFixableError(RunFailure):
    """A run that cannot go on for a reason the job's author can act on."""

    kind = FailureKind.USER_FIXABLE


def kind_of_error(error: BaseException) -> FailureKind:
    """The kind of an exception, by its type: a RunFailure's own, out of memory for torch's and Ray's
    out-of-memory errors; else what its message says (`kind_of_reason`)."""
    if isinstance(error, RunFailure):
        return error.kind
    if isinstance(error, _out_of_memory_errors()):
        return FailureKind.OUT_OF_MEMORY
    return kind_of_reason(str(error))


def kind_of_reason(reason: str) -> FailureKind:
    """The kind of a failure known only by its text: out of memory when it says so, else internal.
    Ray ends a job or a task it killed for memory with a message that names its `OutOfMemoryError`."""
    if "out of memory" in reason.lower() or "OutOfMemory" in reason:
        return FailureKind.OUT_OF_MEMORY
    return FailureKind.INTERNAL


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    # Imported on use: only a Ray job classifies exceptions, and it has both loaded; the service does not.
    import torch
    from ray.exceptions import OutOfMemoryError

    return torch.OutOfMemoryError, OutOfMemoryError
