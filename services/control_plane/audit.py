"""The audit log: every mutating call an authenticated principal makes (submit, estimate, cancel,
delete), with who made it, what it was, when, and the status it was answered with.

Each call becomes a row of the job store's `audit_log` (read by admins at `GET /v1/audit`) and a
structured log line. Neither ever holds a token: only the principal's name and tenant. A call refused
before it had a principal (401) is not a principal's call; it is logged as a refusal instead.
"""

from __future__ import annotations

import structlog
from fastapi import Request

from stillhouse.control_plane.principals import Principal
from stillhouse.control_plane.store import JobStore

log = structlog.get_logger(__name__)

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def record_call(request: Request, status: int) -> None:
    """Audit the answered request if it was a principal's mutating call."""
    principal: Principal | None = getattr(request.state, "principal", None)
    route = request.scope.get("route")
    if principal is None or route is None or request.method not in AUDITED_METHODS:
        return
    # The path's job, or the one a submit created.
    job_id = request.path_params.get("job_id") or getattr(request.state, "created_job_id", None)
    entry = {
        "principal": principal.name,
        "tenant": principal.tenant,
        "method": request.method,
        "route": getattr(route, "path_format", request.url.path),
        "job_id": job_id,
        "status": status,
    }
    log.info("audit", **entry)
    store: JobStore = request.app.state.store
    try:
        await store.record_audit(**entry)
    except Exception:  # the call has been answered: its log line above is the record that remains
        log.exception("audit record not stored", **entry)
