"""The job state machine: which phase follows which, which stage of work each phase runs, and the states
of a stage's step. Part of the API's wire schema (`api_models`), so the SDK shares it."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    PENDING = "Pending"
    PROMPTS = "Prompts"
    TEACHER = "Teacher"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_PHASES


class StepState(StrEnum):
    """Where one stage's call (a step of the job) stands."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Stage(StrEnum):
    """A unit of work done by one service call; each working phase runs exactly one stage."""

    PROMPTS = "prompts"
    TEACHER = "teacher"
    TRAIN = "train"
    EVALUATE = "evaluate"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})

# The happy path, in order.
PIPELINE: tuple[Phase, ...] = (
    Phase.PENDING,
    Phase.PROMPTS,
    Phase.TEACHER,
    Phase.TRAINING,
    Phase.EVALUATING,
    Phase.SUCCEEDED,
)

STAGE_OF_PHASE: dict[Phase, Stage] = {
    Phase.PROMPTS: Stage.PROMPTS,
    Phase.TEACHER: Stage.TEACHER,
    Phase.TRAINING: Stage.TRAIN,
    Phase.EVALUATING: Stage.EVALUATE,
}


class IllegalTransition(ValueError):
    def __init__(self, current: Phase, target: Phase) -> None:
        super().__init__(f"a job cannot move from {current} to {target}")
        self.current = current
        self.target = target


def next_phase(current: Phase) -> Phase:
    """The phase that follows `current` when its stage succeeds."""
    if current.is_terminal:
        raise IllegalTransition(current, current)
    return PIPELINE[PIPELINE.index(current) + 1]


def check_transition(current: Phase, target: Phase) -> None:
    """Raise IllegalTransition unless `target` may follow `current`."""
    if current.is_terminal:
        raise IllegalTransition(current, target)
    if target in (Phase.FAILED, Phase.CANCELLED):
        return
    if target != next_phase(current):
        raise IllegalTransition(current, target)
