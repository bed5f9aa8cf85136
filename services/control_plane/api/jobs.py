"""Jobs: submit, list, inspect, cancel and delete. A job belongs to the tenant of the principal that
submitted it; mutating calls are audited (`audit`)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import prometheus_client
import structlog
from fastapi import APIRouter, Query, Request, Response

from stillhouse.common.api_models import ErrorBody, FieldError, JobList, JobView
from stillhouse.common.job_phases import IllegalTransition, Phase
from stillhouse.common.jobspec import DistillationJob
from stillhouse.control_plane.api.dependencies import (
    Access,
    Caller,
    Channels,
    Dispatch,
    EventBus,
    Store,
    visible_job,
)
from stillhouse.control_plane.api.errors import ApiError
from stillhouse.control_plane.api.job_ids import JobId, new_job_id
from stillhouse.control_plane.api.openapi import (
    BODY_ERRORS,
    JOB_ROUTE_ERRORS,
    PAGE_TOKEN_ERRORS,
    UNAUTHENTICATED,
)
from stillhouse.control_plane.api.submitted_job import SubmittedJob, preflight_warnings
from stillhouse.control_plane.job_metrics import entered_phase
from stillhouse.control_plane.job_removal import RemovalFailed, remove_job
from stillhouse.control_plane.principals import Principal, TenantQuota
from stillhouse.control_plane.quotas import (
    BudgetRequired,
    budget_of,
    check_admission,
    require_budget,
    start_of_day,
)
from stillhouse.control_plane.store import JobNotFinished, JobRecord, JobStore, TenantUsage
from stillhouse.control_plane.views import job_view

log = structlog.get_logger(__name__)

JOBS_SUBMITTED = prometheus_client.Counter("stillhouse_jobs_submitted_total", "Jobs accepted by the API.")

router = APIRouter(tags=["jobs"])


def _check_budget(quota: TenantQuota, tenant: str, spec: Mapping[str, Any]) -> None:
    """Refuse a job without `teacher.budgetUSD` from a tenant with a spend quota."""
    try:
        require_budget(quota, tenant, spec)
    except BudgetRequired as exc:
        error = FieldError(field="spec.teacher.budgetUSD", message=str(exc), type="quota")
        raise ApiError(422, str(exc), errors=[error]) from exc


async def _stored(
    store: JobStore,
    job: DistillationJob,
    document: dict[str, Any],
    principal: Principal,
    quota: TenantQuota,
) -> JobRecord:
    """The job (`document` is its stored form), under a new id if the tenant's quotas admit it
    (QuotaExceeded if not)."""

    def admit(usage: TenantUsage) -> None:
        check_admission(quota, principal.tenant, usage, budget_of(document["spec"]))

    job_id = new_job_id()
    return await store.create_job(
        job_id,
        job.metadata.name or job_id,
        document,
        dict(job.metadata.labels),
        owner=principal.name,
        tenant=principal.tenant,
        admit=admit if quota.max_concurrent_jobs or quota.max_teacher_spend_usd_per_day else None,
        usage_since=start_of_day(datetime.now(UTC)),
    )


@router.post(
    "/v1/jobs",
    status_code=201,
    response_model=JobView,
    responses={
        **JOB_ROUTE_ERRORS,
        **BODY_ERRORS,
        422: {
            "model": ErrorBody,
            "description": "The spec breaks the schema, or the models it names fail the submit-time "
            "check, or it sets no `teacher.budgetUSD` while the tenant has a spend quota; each error "
            "names its field",
        },
        429: {
            "model": ErrorBody,
            "description": "The tenant's quota (maxConcurrentJobs or maxTeacherSpendUsdPerDay) would be "
            "exceeded; the message names it",
        },
        503: {"model": ErrorBody, "description": "The trainer service cannot check the job"},
    },
)
async def submit_job(
    request: Request,
    principal: Caller,
    job: SubmittedJob,
    access: Access,
    store: Store,
    channels: Channels,
    dispatch: Dispatch,
    bus: EventBus,
) -> JobView:
    """Submit a DistillationJob, as JSON or YAML. It is checked first (the schema, then the models it
    names: tokenizers, chat templates, context), then against the tenant's quotas; a job that passes
    starts at once: follow it with `/events`. The job belongs to the caller's tenant."""
    document = job.to_document()
    quota = access.quota(principal.tenant)
    _check_budget(quota, principal.tenant, document["spec"])
    warnings = await preflight_warnings(channels, document["spec"])
    record = await _stored(store, job, document, principal, quota)
    request.state.created_job_id = record.id
    JOBS_SUBMITTED.inc()
    entered_phase(record.tenant, record.phase)
    log.info(
        "job submitted", job_id=record.id, name=record.name, owner=principal.name, tenant=principal.tenant
    )
    dispatch.job_submitted(record.id)
    bus.notify()
    return job_view(record).model_copy(update={"warnings": warnings})


@router.get("/v1/jobs", response_model=JobList, responses={**UNAUTHENTICATED, **PAGE_TOKEN_ERRORS})
async def list_jobs(
    principal: Caller,
    store: Store,
    phase: Phase | None = None,
    tenant: Annotated[
        str | None,
        Query(description="Only this tenant's jobs (a user's list holds its own tenant's only)."),
    ] = None,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=500)] = 50,
    page_token: Annotated[str | None, Query(alias="pageToken")] = None,
) -> JobList:
    """Jobs the caller may see, newest first, optionally only those in one phase or tenant."""
    if not principal.is_admin:
        if tenant not in (None, principal.tenant):
            return JobList(jobs=[], next_page_token=None)
        tenant = principal.tenant
    try:
        jobs, next_token = await store.list_jobs(
            phase=phase, tenant=tenant, limit=page_size, page_token=page_token
        )
    except ValueError as exc:
        raise ApiError(400, f"pageToken: {exc}") from exc
    return JobList(jobs=[job_view(job) for job in jobs], next_page_token=next_token)


@router.post(
    "/v1/jobs/{job_id:job_id}:cancel",
    status_code=202,
    response_model=JobView,
    responses={**JOB_ROUTE_ERRORS, 409: {"model": ErrorBody, "description": "The job has already ended"}},
)
async def cancel_job(job_id: JobId, principal: Caller, store: Store, dispatch: Dispatch) -> JobView:
    """Ask a job to stop. The running stage is cancelled in its service; the job ends Cancelled."""
    await visible_job(store, principal, job_id)
    try:
        record = await store.request_cancel(job_id)
    except IllegalTransition as exc:
        raise ApiError(409, f"job {job_id} has already ended ({exc.current})") from exc
    dispatch.cancel_requested(job_id)
    log.info("job cancel requested", job_id=job_id)
    return job_view(record, await store.steps(job_id))


@router.get("/v1/jobs/{job_id:job_id}", response_model=JobView, responses=JOB_ROUTE_ERRORS)
async def get_job(job_id: JobId, principal: Caller, store: Store) -> JobView:
    """One job, with the steps it has run."""
    return job_view(await visible_job(store, principal, job_id), await store.steps(job_id))


@router.delete(
    "/v1/jobs/{job_id:job_id}",
    status_code=204,
    response_class=Response,
    responses={
        **JOB_ROUTE_ERRORS,
        409: {"model": ErrorBody, "description": "The job has not finished: cancel it first"},
        502: {"model": ErrorBody, "description": "The storage service failed to delete the job's objects"},
        503: {"model": ErrorBody, "description": "The storage service cannot be reached"},
    },
)
async def delete_job(job_id: JobId, principal: Caller, store: Store, channels: Channels) -> Response:
    """Delete a finished job: its objects in object storage (everything under `jobs/<id>/`: prompts,
    answers, checkpoints, the student, the report), then the job with its steps and events. A delete
    that fails midway can be asked again."""
    await visible_job(store, principal, job_id)
    try:
        await remove_job(store, channels, job_id)
    except JobNotFinished as exc:
        raise ApiError(
            409, f"job {job_id} is {exc.phase.value}: cancel it first (POST /v1/jobs/{job_id}:cancel)"
        ) from exc
    except RemovalFailed as exc:
        raise ApiError(exc.status, f"cannot delete the objects of job {job_id}: {exc}") from exc
    return Response(status_code=204)
