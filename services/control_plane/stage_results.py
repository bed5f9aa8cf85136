"""A job's stage results as the stages' own messages, read back from the JSON the store keeps (where
64-bit integers are strings), and which of them names each downloadable artifact."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stillhouse.common.job_phases import Stage, StepState
from stillhouse.control_plane.stage_calls import result_from_json
from stillhouse.control_plane.store import StepRecord
from stillhouse.prompts.v1 import prompts_pb2
from stillhouse.teacher.v1 import teacher_pb2
from stillhouse.trainer.v1 import trainer_pb2

# Which result field names each downloadable artifact, the preferred one first: the published student
# (with the evaluation in its model card) once evaluation has run, else the trained one.
ARTIFACT_SOURCES: dict[str, list[tuple[Stage, str]]] = {
    "student": [(Stage.EVALUATE, "student"), (Stage.TRAIN, "student")],
    "baseline": [(Stage.TRAIN, "baseline")],
    "report": [(Stage.EVALUATE, "report")],
}


@dataclass(frozen=True)
class StageResults:
    """The results of a job's stages that succeeded; None for a stage that has not (yet). The fields are
    named after the stages."""

    prompts: prompts_pb2.GeneratePromptsResult | None = None
    teacher: teacher_pb2.AnswerPromptsResult | None = None
    train: trainer_pb2.TrainStudentResult | None = None
    evaluate: trainer_pb2.EvaluateStudentResult | None = None

    @classmethod
    def of(cls, steps: Iterable[StepRecord]) -> StageResults:
        return cls(
            **{
                step.stage.value: result_from_json(step.stage, step.result or {})
                for step in steps
                if step.state is StepState.SUCCEEDED
            }
        )

    @property
    def empty(self) -> bool:
        return all(result is None for result in (self.prompts, self.teacher, self.train, self.evaluate))

    def artifact_id(self, name: str) -> str | None:
        """The id of the artifact `name` (a key of ARTIFACT_SOURCES), or None if no stage has produced it."""
        for stage, field in ARTIFACT_SOURCES[name]:
            result = getattr(self, stage.value)
            if result is not None and (artifact_id := getattr(result, field).artifact_id):
                return artifact_id
        return None
