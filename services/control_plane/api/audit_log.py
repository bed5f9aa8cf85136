"""The audit log (`audit`), for admins: who made each mutating call, what it was, when, and how it was
answered."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from stillhouse.common.api_models import AuditList, ErrorBody
from stillhouse.control_plane.api.dependencies import Caller, Store
from stillhouse.control_plane.api.errors import ApiError
from stillhouse.control_plane.api.openapi import PAGE_TOKEN_ERRORS, UNAUTHENTICATED
from stillhouse.control_plane.views import audit_list

router = APIRouter(tags=["audit"])


@router.get(
    "/v1/audit",
    response_model=AuditList,
    responses={
        **UNAUTHENTICATED,
        **PAGE_TOKEN_ERRORS,
        403: {"model": ErrorBody, "description": "The caller is not an admin"},
    },
)
async def list_audit(
    principal: Caller,
    store: Store,
    tenant: str | None = None,
    job_id: Annotated[str | None, Query(alias="jobId")] = None,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=500)] = 50,
    page_token: Annotated[str | None, Query(alias="pageToken")] = None,
) -> AuditList:
    """The audit log, newest first (admins only): who made each mutating call (submit, estimate,
    cancel, delete), what it was, when, and how it was answered; optionally of one tenant or job."""
    if not principal.is_admin:
        raise ApiError(403, f"the audit log is for admins; {principal.name} is a {principal.role.value}")
    try:
        entries, next_token = await store.list_audit(
            tenant=tenant, job_id=job_id, limit=page_size, page_token=page_token
        )
    except ValueError as exc:
        raise ApiError(400, f"pageToken: {exc}") from exc
    return audit_list(entries, next_token)
