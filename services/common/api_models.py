"""The REST API's wire schema: what `/v1` answers, shared by the control plane (which builds these from its
records: `control_plane.views`) and the SDK (`stillhouse.client`), which reads them back."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from stillhouse.common.job_phases import Phase, Stage, StepState


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


class FieldError(WireModel):
    field: str = Field(description="Dotted path of the offending field, e.g. `spec.training.epochs`.")
    message: str
    type: str = Field(description="The kind of error; `preflight` for what the submit-time check found.")
    line: int | None = Field(
        default=None,
        description="The line of the submitted document (1-based) that holds the field, where it is known.",
    )


class StepView(WireModel):
    """One stage of a job, as it last ran."""

    model_config = ConfigDict(from_attributes=True)

    stage: Stage
    operation_id: str = Field(description="The stage service's operation that runs this attempt.")
    state: StepState
    attempt: int = Field(
        description="1 for the first run; a failed or cancelled stage that runs again counts up."
    )
    result: dict[str, Any] | None = Field(description="What the stage produced, once it succeeded.")
    error: str | None = Field(description="Why the attempt failed, when it did.")
    started_at: datetime
    finished_at: datetime | None = Field(description="None while the attempt runs.")


class LedgerView(WireModel):
    requests: int
    cached_requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class PromptsSummary(WireModel):
    train: int
    holdout: int
    collected: int
    removed_by_rule: dict[str, int]
    generation: LedgerView = Field(description="Teacher calls made to generate prompts.")


class TeacherSummary(LedgerView):
    answers: int
    failed_prompts: int
    stopped_reason: str | None
    alternative_slots: int = Field(description="Top-k slots of the generated tokens the teacher sent.")
    masked_alternatives: int = Field(
        description="Of those, slots whose token id could not be known or that the server did not send."
    )
    top1_mismatches: int = Field(
        description="At temperature 0, generated tokens that were not the most likely known alternative."
    )
    stop_tokens_added: int = Field(
        description="Answers given an end-of-sequence label because the server left its stop token out."
    )


class TrainingCurvePoint(WireModel):
    model: str = Field(description="What was trained: `student`, or a control (`control-sft`).")
    step: int
    metrics: dict[str, float] = Field(description="`loss`, `kd`, `ce` and `learning_rate` at that step.")


class TrainingSummary(WireModel):
    steps: int
    tokens: int
    gpu_hours: float
    final_metrics: dict[str, float]
    curve: list[TrainingCurvePoint] = Field(
        default_factory=list,
        description="Every step the training reported (thinned evenly to a few hundred for a long run): "
        "the student's, then each control's. Live progress events sample steps; this is the whole curve.",
    )


class AnswerSample(WireModel):
    """One held-out prompt with the teacher's answer and each model's greedy answer to it."""

    prompt_id: str
    prompt: str = Field(description="The prompt as the models saw it, before any chat template.")
    teacher: str = Field(description="The teacher's answer (the reference).")
    baseline: str = Field(description="The untrained student's greedy answer.")
    student: str = Field(description="The student's greedy answer.")
    control_sft: str | None = Field(default=None, description="The SFT control's, when it was trained.")


class PairedLead(WireModel):
    """The student's figure minus another model's on the same held-out answers, with its 95% interval
    from a bootstrap that resamples whole answers."""

    difference: float
    low: float
    high: float


class EvaluationSummary(WireModel):
    recovery_percent: float = Field(
        description="The headline: the share of the gap from a context-free unigram to the teacher that the "
        "student closes, in percent, on held-out KL (on token F1 when KL is not defined; see the report)."
    )
    gap_closed: dict[str, float] = Field(
        default_factory=dict,
        description="The share of the unigram-to-teacher gap the student closes, in percent, by metric "
        "(`kl`, `top1_agreement`, `token_f1`), where defined.",
    )
    uniform: dict[str, float] = Field(
        default_factory=dict, description="Reference row: uniform over the vocabulary."
    )
    unigram: dict[str, float] = Field(
        default_factory=dict, description="Reference row: token frequencies of the training answers."
    )
    student: dict[str, float]
    baseline: dict[str, float] = Field(description="The student before training.")
    control_sft: dict[str, float] | None = Field(
        default=None, description="The SFT control, when `evaluation.controls` lists `sft`."
    )
    control_sft_lead: dict[str, PairedLead] | None = Field(
        default=None,
        description="The student's lead over the SFT control by metric (`kl`, `top1_agreement`), when it was "
        "trained and the student shares the teacher's vocabulary.",
    )
    headline: str = Field(default="", description="`gapClosed` in words, as the report says it.")
    control_sft_lead_sentence: str = Field(default="", description="`controlSftLead` in words, or none.")
    teacher: dict[str, float]
    samples: list[AnswerSample] = Field(
        default_factory=list,
        description="The first held-out prompts with every model's answer side by side (texts bounded).",
    )


class CostSummary(WireModel):
    teacher_usd: float
    generation_usd: float
    total_usd: float
    gpu_hours: float


class JobSummary(WireModel):
    """What the job's finished stages produced; parts appear as their stages succeed."""

    prompts: PromptsSummary | None = None
    teacher: TeacherSummary | None = None
    training: TrainingSummary | None = None
    evaluation: EvaluationSummary | None = None
    artifacts: dict[str, str] = Field(description="Artifact ids by name (`student`, `report`), for `pull`.")
    cost: CostSummary


class JobView(WireModel):
    id: str
    name: str
    phase: Phase
    message: str | None = Field(description="Why the job is in its phase, e.g. the cause of a failure.")
    cancel_requested: bool
    labels: dict[str, str]
    tenant: str = Field(description="The tenant the job belongs to: only its users (and admins) see it.")
    owner: str | None = Field(
        description="The principal that submitted the job (null for jobs submitted before owners existed)."
    )
    created_at: datetime
    updated_at: datetime
    spec: dict[str, Any] = Field(description="The submitted DistillationJob with every default filled in.")
    steps: list[StepView] = Field(default_factory=list)
    summary: JobSummary | None = Field(default=None, description="Outcome so far (single-job views only).")
    warnings: list[FieldError] = Field(
        default_factory=list,
        description="What the submit-time check found that does not stop the job (in the answer to the "
        "submit only).",
    )


class JobList(WireModel):
    jobs: list[JobView]
    next_page_token: str | None = Field(description="Pass as `pageToken` for the next page; null at the end.")


class AuditEntry(WireModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime = Field(description="When the call was answered (UTC).")
    principal: str = Field(description="Who made the call (`system:expiry` for the expiry sweep).")
    tenant: str = Field(description="The principal's tenant; for the expiry sweep, the job's.")
    method: str
    route: str = Field(description="The route's template, e.g. `/v1/jobs/{job_id}:cancel`.")
    job_id: str | None = Field(description="The job the call named or created, if any.")
    status: int = Field(description="The HTTP status of the answer.")


class AuditList(WireModel):
    entries: list[AuditEntry]
    next_page_token: str | None = Field(description="Pass as `pageToken` for the next page; null at the end.")


class PromptsEstimate(WireModel):
    train: int = Field(description="Training prompts the job will send the teacher.")
    holdout: int = Field(description="Held-out prompts, answered too as the evaluation's reference.")
    collected: int = Field(description="Prompts read and generated, before cleaning.")
    removed_by_rule: dict[str, int]
    shortfall: int = Field(description="Prompts asked for but not reached.")
    warnings: list[str]


class TeacherCost(WireModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float

    @classmethod
    def of(cls, counts: Any) -> Self:
        """The counts of a teacher `Ledger` or `CostEstimate` message, read by field name."""
        return cls.model_validate(counts, from_attributes=True)


class GenerationCost(TeacherCost):
    cached_requests: int


class EstimateView(WireModel):
    estimate_id: str = Field(description="Same for every spec that yields the same prompts.")
    prompts: PromptsEstimate
    teacher: TeacherCost = Field(
        description="Answering every prompt once, none from the cache (an upper bound)."
    )
    generation: GenerationCost = Field(
        description="Teacher calls made to generate the prompts (already spent)."
    )
    total_usd: float
    warnings: list[FieldError] = Field(
        default_factory=list,
        description="What the submit-time check found that would not stop the job.",
    )


class SpecValidation(WireModel):
    valid: Literal[True] = Field(description="Always true: a spec that fails is answered with a 422 instead.")
    warnings: list[FieldError] = Field(
        default_factory=list, description="What the checks found that would not stop the job."
    )


class PhaseChange(WireModel):
    """The data of a `phase` event of `/v1/events`."""

    job_id: str
    phase: Phase
    message: str | None = None
    at: datetime = Field(description="When the job entered the phase.")


class ArtifactName(StrEnum):
    STUDENT = "student"
    BASELINE = "baseline"
    REPORT = "report"


class ArtifactFileLink(WireModel):
    path: str = Field(description="Path of the file inside the artifact folder.")
    size_bytes: int
    sha256: str
    url: str = Field(description="Time-limited URL to GET the file (file:// for a local object store).")


class ArtifactLinks(WireModel):
    artifact_id: str
    files: list[ArtifactFileLink]
    expires_in_seconds: int


class ErrorBody(WireModel):
    message: str
    errors: list[FieldError] = Field(default_factory=list)


class HealthStatus(WireModel):
    status: Literal["ok", "unavailable"]
    reason: str | None = Field(default=None, description="Why the process is not ready (not when `ok`).")
