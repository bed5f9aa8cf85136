"""What one training or evaluation run is given, what it gives back, and how a training run fails.

`TrainRun` and `EvaluateRun` are built by the trainer service from a job and handed to the workers
(Ray Train pickles them), so they carry everything a worker needs and nothing it must look up.
"""

from __future__ import annotations

import posixpath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, FieldSerializationInfo, field_serializer

from stillhouse.common.jobspec import EvaluationSpec, SpecModel, StudentSpec, TeacherSpec, TrainingSpec
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer.failures import UserFixableError


class _RunModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_serializer("teacher", "student", "training", "evaluation", check_fields=False)
    def _spec_by_alias(self, section: SpecModel, info: FieldSerializationInfo) -> dict:
        """Job-spec sections are dumped with their camelCase names, the only ones they accept back, so
        that `model_validate(run.model_dump())` (and the JSON round trip) gives the same run."""
        return section.model_dump(mode="json" if info.mode_is_json() else "python", by_alias=True)


class TrainRun(_RunModel):
    job_id: str
    answers_dataset_id: str  # the teacher's answers to train on
    object_store: ObjectStoreSettings
    models: ModelSettings = Field(default_factory=ModelSettings, description="Where model weights are.")
    teacher: TeacherSpec
    student: StudentSpec
    training: TrainingSpec
    output_prefix: str = Field(description="Where the run's artifacts go: `jobs/<job-id>/train`.")
    controls: list[Literal["sft"]] = Field(
        default_factory=list, description="Control students to train after the student (evaluation.controls)."
    )
    # Knobs of the loop itself, not of the job: defaults suit both a laptop and a GPU node.
    report_every_steps: int | None = Field(
        default=None, gt=0, description="Progress every this many steps; default: about 100 reports a run."
    )
    micro_batch_tokens: int = Field(
        default=8192, gt=0, description="Tokens per forward pass; gradients accumulate up to batchTokens."
    )
    compile_model: bool = Field(default=False, description="torch.compile the student (GPU only).")
    gradient_checkpointing: bool | None = Field(
        default=None, description="Recompute activations in the backward pass; default: on a GPU only."
    )
    keep_checkpoints: int = Field(default=2, gt=0, description="Committed checkpoints kept.")
    shuffle_buffer_examples: int = Field(
        default=4096,
        gt=0,
        description="Examples a worker holds to shuffle its stream of examples (see trainer.worker_data).",
    )

    @property
    def student_prefix(self) -> str:
        return f"{self.output_prefix}/student"

    @property
    def baseline_prefix(self) -> str:
        """The student before training, for the evaluation's baseline."""
        return f"{self.output_prefix}/baseline"

    @property
    def checkpoints_prefix(self) -> str:
        return f"{self.output_prefix}/checkpoints"

    @property
    def sft_control_prefix(self) -> str:
        """The SFT control student: trained like the student, with plain cross-entropy."""
        return f"{self.output_prefix}/control-sft"

    @property
    def sft_control_checkpoints_prefix(self) -> str:
        return f"{self.output_prefix}/control-sft-checkpoints"


class EvaluateRun(_RunModel):
    job_id: str
    student_prefix: str  # the trained student artifact
    baseline_prefix: str  # the untrained student artifact
    holdout_dataset_id: str  # the teacher's answers to the held-out prompts
    training_dataset_id: str  # the teacher's answers the student trained on (the unigram is fitted on them)
    teacher: TeacherSpec
    evaluation: EvaluationSpec
    object_store: ObjectStoreSettings
    models: ModelSettings = Field(default_factory=ModelSettings, description="Where model weights are.")
    output_prefix: str = Field(description="Where the evaluation's outputs go: `jobs/<job-id>/evaluate`.")

    @property
    def control_sft_prefix(self) -> str | None:
        """The SFT control student, trained beside the student (`TrainRun.output_prefix`/control-sft),
        when `evaluation.controls` lists `sft`; else None."""
        if "sft" not in self.evaluation.controls:
            return None
        return f"{posixpath.dirname(self.student_prefix)}/control-sft"


class CurvePoint(BaseModel):
    """One reported step of a training run on its curve: the loss figures and learning rate."""

    model_config = ConfigDict(frozen=True)

    model: str  # what was trained: "student", or a control ("control-sft")
    step: int
    metrics: dict[str, float]


class TrainOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    steps: int  # optimizer steps taken in all, counting those before a resume
    tokens: int  # tokens trained on in all, over every worker
    seconds: float  # wall time of this run (since the last resume)
    final_metrics: dict[str, float]
    resumed_from_step: int | None  # the checkpoint this run started from, if any
    on_policy_steps: int = 0  # steps that trained on the student's own generations
    controls: dict[str, TrainOutcome] = Field(default_factory=dict)  # by control name: "sft"
    curve: list[CurvePoint] = Field(default_factory=list)  # `training_curve.training_curve` of its log

    @property
    def curves(self) -> list[CurvePoint]:
        """The curve of this run, then of each of its controls."""
        return [*self.curve, *(point for control in self.controls.values() for point in control.curve)]


class AnswerSample(BaseModel):
    """One held-out prompt with the teacher's answer and each trained model's greedy answer (texts bounded,
    see `answer_samples`)."""

    model_config = ConfigDict(frozen=True)

    prompt_id: str
    prompt: str  # the user's prompt, before the chat template
    teacher: str
    baseline: str
    student: str
    control_sft: str | None = None  # when the SFT control was trained


class PairedLead(BaseModel):
    """The student's figure minus another model's on the same held-out answers, and the interval around it
    (see `paired_lead`)."""

    model_config = ConfigDict(frozen=True)

    difference: float
    low: float
    high: float


class EvaluationOutcome(BaseModel):
    # An undefined recovery (NaN) stays NaN in the outcome's JSON, where pydantic would write null.
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    report_prefix: str
    student_prefix: str  # the published student
    recovery_percent: float  # the headline's lead figure (see `evaluation.Headline`); NaN when undefined
    student_metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    teacher_metrics: dict[str, float]
    # The reference rows by name: uniform, unigram, and control-sft when it was trained.
    reference_metrics: dict[str, dict[str, float]]
    gap_closed: dict[str, float]  # the share of the unigram's gap closed, per metric where defined
    samples: list[AnswerSample] = Field(default_factory=list)  # the first held-out prompts, answered
    # The student's lead over the SFT control per metric, when that control was trained.
    control_sft_lead: dict[str, PairedLead] = Field(default_factory=dict)


class TrainingError(UserFixableError):
    """A training run that cannot go on, for a reason the job's author can act on."""


class TrainingDataError(TrainingError):
    """The answers dataset gives nothing to train on (every row dropped, or rows without logprobs)."""


class IncompatibleTokenizers(TrainingError):
    """A logit loss between a student and a teacher that do not share a vocabulary."""


class UnsupportedArchitecture(TrainingError):
    """A student (or full-logits teacher) whose architecture training cannot run through its forward."""


class TrainingDiverged(TrainingError):
    """The loss or the gradients became NaN or infinite."""
