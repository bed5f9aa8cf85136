"""What the API answers, built from the store's records and the stages' results (the wire models are in
`stillhouse.common.api_models`, which the SDK shares), and how errors become field errors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from stillhouse.common.api_models import (
    AuditEntry,
    AuditList,
    ErrorBody,
    EstimateView,
    FieldError,
    GenerationCost,
    JobSummary,
    JobView,
    PromptsEstimate,
    StepView,
    TeacherCost,
)
from stillhouse.control_plane.store import AuditRecord, JobRecord, StepRecord
from stillhouse.control_plane.summary import job_summary

if TYPE_CHECKING:
    from stillhouse.control_plane.estimate import Estimate
    from stillhouse.prompts.v1 import prompts_pb2


def job_view(job: JobRecord, steps: list[StepRecord] | None = None) -> JobView:
    return JobView(
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
        steps=[StepView.model_validate(step, from_attributes=True) for step in steps or []],
        summary=JobSummary.model_validate(summary) if (summary := job_summary(steps or [])) else None,
    )


def audit_list(records: list[AuditRecord], next_page_token: str | None) -> AuditList:
    return AuditList(
        entries=[AuditEntry.model_validate(record, from_attributes=True) for record in records],
        next_page_token=next_page_token,
    )


def prompts_estimate(result: prompts_pb2.GeneratePromptsResult) -> PromptsEstimate:
    return PromptsEstimate(
        train=result.train.num_rows,
        holdout=result.holdout.num_rows,
        collected=result.collected,
        removed_by_rule=dict(result.removed_by_rule),
        shortfall=result.shortfall,
        warnings=list(result.warnings),
    )


def estimate_view(estimate: Estimate, warnings: list[FieldError]) -> EstimateView:
    generation = estimate.prompts.generation_ledger
    return EstimateView(
        estimate_id=estimate.estimate_id,
        prompts=prompts_estimate(estimate.prompts),
        teacher=TeacherCost.of(estimate.teacher),
        generation=GenerationCost.of(generation),
        total_usd=estimate.teacher.cost_usd + generation.cost_usd,
        warnings=warnings,
    )


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


def with_lines(body: ErrorBody, line_of: Callable[[str], int | None]) -> ErrorBody:
    """`body` with the line of each of its fields, by `line_of` (a field's path -> its line)."""
    errors = [error.model_copy(update={"line": error.line or line_of(error.field)}) for error in body.errors]
    return body.model_copy(update={"errors": errors})


def preflight_errors(findings: Iterable[Any]) -> list[FieldError]:
    """The trainer's `SpecFinding`s as field errors."""
    return [FieldError(field=found.field, message=found.message, type="preflight") for found in findings]


def summarise(what: str, errors: list[FieldError]) -> str:
    shown = "; ".join(f"{error.field}: {error.message}" for error in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"invalid {what}: {shown}{more}"
