"""What handlers take from FastAPI: the principal that makes the call, and the state the app keeps on
`app.state` (set by `app.create_app`, and by `lifespan` for what lives while the app serves).

Every `/v1` call is made by a principal (`principals.py`): a `user` sees only its tenant's jobs, and any
other job is 404 to it, exactly as a job that does not exist; an `admin` sees every job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from stillhouse.common.input_roots import InputRoots
from stillhouse.control_plane.api.errors import ApiError
from stillhouse.control_plane.api.session import CSRF_HEADER, needs_csrf_header, session_token
from stillhouse.control_plane.config import ControlPlaneSettings
from stillhouse.control_plane.dispatch import JobDispatch
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.orchestrator import ServiceChannels
from stillhouse.control_plane.principals import AccessControl, Principal
from stillhouse.control_plane.store import JobNotFound, JobRecord, JobStore

log = structlog.get_logger(__name__)

# Module level: FastAPI resolves the annotations of dependencies against the module's names.
bearer = HTTPBearer(auto_error=False)


async def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The principal of the bearer token, or of the console's session cookie when there is no bearer
    token; else 401. Kept on the request for the audit log."""
    access: AccessControl = request.app.state.access
    cookie_token = None if credentials else session_token(request)
    token = credentials.credentials if credentials else cookie_token
    principal = access.authenticate(token) if token else None
    if principal is None:
        log.warning("unauthenticated request refused", path=request.url.path, had_token=token is not None)
        raise ApiError(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
    if cookie_token is not None and needs_csrf_header(request):
        raise ApiError(403, f"a console session must send the header {CSRF_HEADER}: 1 with {request.method}")
    request.state.principal = principal
    return principal


async def known_query_parameters_only(request: Request) -> None:
    """Refuse a query parameter the route does not take, as the spec refuses an unknown field: a typo
    must not quietly fall back to a default."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = {param.alias for param in route.dependant.query_params}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        taken = ", ".join(sorted(known)) or "none"
        listed = ", ".join(repr(name[:64]) for name in unknown[:8])
        raise ApiError(422, f"unknown query parameter {listed}; this route takes: {taken}")


def app_state(attribute: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that gives what the app keeps on `app.state` under `attribute`."""

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, attribute)

    return dependency


Caller = Annotated[Principal, Depends(current_principal)]
Settings = Annotated[ControlPlaneSettings, Depends(app_state("settings"))]
Access = Annotated[AccessControl, Depends(app_state("access"))]
Roots = Annotated[InputRoots, Depends(app_state("input_roots"))]
Store = Annotated[JobStore, Depends(app_state("store"))]
Channels = Annotated[ServiceChannels, Depends(app_state("channels"))]
EventBus = Annotated[JobEventBus, Depends(app_state("bus"))]
Dispatch = Annotated[JobDispatch, Depends(app_state("dispatch"))]


async def visible_job(store: JobStore, principal: Principal, job_id: str) -> JobRecord:
    """The job, if `principal` may see it; another tenant's job is not found, as if it did not exist."""
    job = await store.get_job(job_id)
    if not principal.sees(job.tenant):
        raise JobNotFound(job_id)
    return job
