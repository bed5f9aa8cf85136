"""The REST API's wire schema: what `/v1/jobs` answers. Handlers only translate store records to these."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from stillhouse.control_plane.phases import Phase, Stage
from stillhouse.control_plane.store import AuditRecord, JobRecord, StepRecord, StepState
from stillhouse.control_plane.summary import job_summary

if TYPE_CHECKING:
    from stillhouse.control_plane.estimate import Estimate
    from stillhouse.prompts.v1 import prompts_pb2


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


class FieldError(WireModel):
    field: str = Field(description="Dotted path of the offending field, e.g. `spec.training.epochs`.")
    message: str
    type: str = Field(description="The kind of error; `preflight` for what the submit-time check found.")


class StepView(WireModel):
    model_config = ConfigDict(from_attributes=True)

    stage: Stage
    operation_id: str
    state: StepState
    attempt: int
    result: dict[str, Any] | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


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


class TrainingSummary(WireModel):
    steps: int
    tokens: int
    gpu_hours: float
    final_metrics: dict[str, float]


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
    teacher: dict[str, float]


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

    @classmethod
    def of(cls, job: JobRecord, steps: list[StepRecord] | None = None) -> JobView:
        return cls(
            id=job.id,
            name=job.name,
            phase=job.phase,
            message=job.message,
            cancel_requested=job.cancel_requested,
            labels=job.labels,
            tenant=job.tenant,
            owner=job.owner,
            created_at=job.created_at,
            updated_at=job.updated_at,
            spec=job.document,
            steps=[StepView.model_validate(step) for step in steps or []],
            summary=JobSummary.model_validate(summary) if (summary := job_summary(steps or [])) else None,
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

    @classmethod
    def of(cls, records: list[AuditRecord], next_page_token: str | None) -> AuditList:
        return cls(
            entries=[AuditEntry.model_validate(record) for record in records], next_page_token=next_page_token
        )


class PromptsEstimate(WireModel):
    train: int = Field(description="Training prompts the job will send the teacher.")
    holdout: int = Field(description="Held-out prompts, answered too as the evaluation's reference.")
    collected: int = Field(description="Prompts read and generated, before cleaning.")
    removed_by_rule: dict[str, int]
    shortfall: int = Field(description="Prompts asked for but not reached.")
    warnings: list[str]

    @classmethod
    def of(cls, result: prompts_pb2.GeneratePromptsResult) -> PromptsEstimate:
        return cls(
            train=result.train.num_rows,
            holdout=result.holdout.num_rows,
            collected=result.collected,
            removed_by_rule=dict(result.removed_by_rule),
            shortfall=result.shortfall,
            warnings=list(result.warnings),
        )


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

    @classmethod
    def of(cls, estimate: Estimate, warnings: list[FieldError]) -> EstimateView:
        generation = estimate.prompts.generation_ledger
        return cls(
            estimate_id=estimate.estimate_id,
            prompts=PromptsEstimate.of(estimate.prompts),
            teacher=TeacherCost.of(estimate.teacher),
            generation=GenerationCost.of(generation),
            total_usd=estimate.teacher.cost_usd + generation.cost_usd,
            warnings=warnings,
        )


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


def _field_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(body)"


def field_errors(errors: Iterable[Mapping[str, Any]]) -> list[FieldError]:
    """Pydantic's error list (from a ValidationError or FastAPI's request validation), one per field."""
    return [
        FieldError(field=_field_path(tuple(error["loc"])), message=error["msg"], type=error["type"])
        for error in errors
    ]


def preflight_errors(findings: Iterable[Any]) -> list[FieldError]:
    """The trainer's `SpecFinding`s as field errors."""
    return [FieldError(field=found.field, message=found.message, type="preflight") for found in findings]


def summarise(what: str, errors: list[FieldError]) -> str:
    shown = "; ".join(f"{error.field}: {error.message}" for error in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"invalid {what}: {shown}{more}"
