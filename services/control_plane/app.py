"""The control plane's REST API: submit, list, inspect, follow, cancel and delete distillation jobs.

Handlers translate between HTTP and the store/orchestrator; the wire schema is in `api_models`, the
job spec in `stillhouse.common.jobspec`. Every `/v1` call is made by a principal (`principals.py`): a
`user` sees only its tenant's jobs, and any other job is 404 to it, exactly as a job that does not
exist; an `admin` sees every job and the audit log. Mutating calls are audited (`audit`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import prometheus_client
import structlog
import uvicorn
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stillhouse.common.database_retry import DatabaseUnavailable, RetryPolicy
from stillhouse.common.input_roots import InputRefused, InputRoots, check_prompt_inputs
from stillhouse.common.jobspec import DistillationJob
from stillhouse.common.logging import configure_logging
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.control_plane.api_models import (
    ArtifactLinks,
    ArtifactName,
    AuditList,
    ErrorBody,
    EstimateView,
    FieldError,
    JobList,
    JobView,
    field_errors,
    preflight_errors,
    summarise,
)
from stillhouse.control_plane.artifact_links import ArtifactUnavailable, artifact_id_of, artifact_links
from stillhouse.control_plane.audit import record_call
from stillhouse.control_plane.config import ControlPlaneSettings
from stillhouse.control_plane.estimate import EstimateFailed, EstimateTimedOut, estimate_job
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.job_removal import ExpirySweep, RemovalFailed, remove_job
from stillhouse.control_plane.orchestrator import Orchestrator, ServiceChannels
from stillhouse.control_plane.phases import IllegalTransition, Phase
from stillhouse.control_plane.preflight import PreflightRefused, PreflightUnavailable, check_job
from stillhouse.control_plane.principals import AccessControl, Principal
from stillhouse.control_plane.quotas import (
    BudgetRequired,
    QuotaExceeded,
    budget_of,
    check_admission,
    require_budget,
    start_of_day,
)
from stillhouse.control_plane.spec_body import (
    MAX_DEPTH,
    MAX_EXPANDED_VALUES,
    MAX_SPEC_BYTES,
    BodyRefused,
    parse_document,
    read_capped,
)
from stillhouse.control_plane.start_and_follow import FollowBounds
from stillhouse.control_plane.store import JobNotFinished, JobNotFound, JobRecord, JobStore, TenantUsage

log = structlog.get_logger(__name__)

# Seconds between two looks at the store while nothing has been announced (another process may write).
EVENT_POLL_SECONDS = 1.0

# How often a long request looks whether its caller is still there.
DISCONNECT_POLL_SECONDS = 1.0
T = TypeVar("T")

# Module level: FastAPI resolves the annotations of dependencies against the module's names.
bearer = HTTPBearer(auto_error=False)

JOBS_SUBMITTED = prometheus_client.Counter("stillhouse_jobs_submitted_total", "Jobs accepted by the API.")
HTTP_REQUESTS = prometheus_client.Counter(
    "stillhouse_http_requests_total",
    "HTTP requests, by method, route and status.",
    ["method", "route", "status"],
)
HTTP_SECONDS = prometheus_client.Histogram(
    "stillhouse_http_request_seconds", "Time to answer an HTTP request.", ["method", "route"]
)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


# What a job id may look like in a path: the ids `new_job_id` makes, and nothing with ':' so that
# `/v1/jobs/{id}:cancel` is never read as the job `{id}:cancel`.
JOB_ID_REGEX = "[a-z0-9][a-z0-9-]{0,62}"
JobId = Annotated[str, Path(pattern=f"^{JOB_ID_REGEX}$", description="A job id, such as job-1a2b3c4d5e6f.")]


class _JobIdConvertor(Convertor[str]):
    regex = JOB_ID_REGEX

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", _JobIdConvertor())


async def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The principal of the bearer token, or 401. Kept on the request for the audit log."""
    access: AccessControl = request.app.state.access
    principal = access.authenticate(credentials.credentials) if credentials else None
    if principal is None:
        log.warning(
            "unauthenticated request refused", path=request.url.path, had_token=credentials is not None
        )
        raise ApiError(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    request.state.principal = principal
    return principal


Caller = Annotated[Principal, Depends(current_principal)]


async def visible_job(store: JobStore, principal: Principal, job_id: JobId) -> JobRecord:
    """The job, if `principal` may see it; another tenant's job is not found, as if it did not exist."""
    job = await store.get_job(job_id)
    if not principal.sees(job.tenant):
        raise JobNotFound(job_id)
    return job


def _error(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"), headers=headers)


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


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or its cancellation once the client has gone (an HTTP handler is not cancelled
    when its caller disconnects)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                break
        return await task
    finally:
        task.cancel()


class AnsweredRequests:
    """After every HTTP request: its count and time by route template and status (metrics), and the
    audit record of a mutating call (`audit.record_call`). A plain ASGI middleware: one built on
    BaseHTTPMiddleware would hide a client's disconnect from the handlers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            template = getattr(scope.get("route"), "path_format", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], template, status).inc()
            HTTP_SECONDS.labels(scope["method"], template).observe(time.perf_counter() - started)
            await record_call(Request(scope), status)


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> set[str]:
    """The methods of every route whose path matches the request's."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods


def _openapi_with_job_schema(app: FastAPI) -> dict[str, Any]:
    """Document the job body, which the handler parses itself to accept YAML as well as JSON."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    job_schema = DistillationJob.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(job_schema.pop("$defs", {}))
    components["DistillationJob"] = job_schema
    reference = {"schema": {"$ref": "#/components/schemas/DistillationJob"}}
    for path in ("/v1/jobs", "/v1/jobs:estimate"):
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": reference, "application/yaml": reference},
        }
    app.openapi_schema = schema
    return schema


async def _job_from_body(request: Request, input_roots: InputRoots) -> DistillationJob | JSONResponse:
    """The DistillationJob in the request body (JSON or YAML), or the 422 response that names its errors:
    those of the schema, or a local input outside the input roots."""
    try:
        raw = await read_capped(request.stream(), request.headers.get("content-length"))
        document = parse_document(request.headers.get("content-type", ""), raw)
    except BodyRefused as refused:
        raise ApiError(refused.status, refused.message) from None
    if not isinstance(document, dict):
        raise ApiError(422, "the body must be a DistillationJob object (apiVersion, kind, metadata, spec)")
    try:
        job = DistillationJob.model_validate(document)
    except ValidationError as exc:
        errors = field_errors(exc.errors(include_url=False))
        return _error(422, ErrorBody(message=summarise("DistillationJob", errors), errors=errors))
    try:
        check_prompt_inputs(job.spec.prompts, input_roots)
    except InputRefused as refused:
        error = FieldError(field=refused.field, message=refused.message, type="input_root")
        return _error(422, ErrorBody(message=str(refused), errors=[error]))
    return job


async def _preflight(request: Request, spec: dict[str, Any]) -> list[FieldError] | JSONResponse:
    """The warnings of the submit-time check, or the 422 response that names the fields it refuses."""
    try:
        checked = await check_job(request.app.state.channels, spec)
    except PreflightRefused as exc:
        raise ApiError(422, f"invalid DistillationJob: {exc}") from exc
    except PreflightUnavailable as exc:
        raise ApiError(503, str(exc)) from exc
    if checked.violations:
        errors = preflight_errors(checked.violations)
        return _error(422, ErrorBody(message=summarise("DistillationJob", errors), errors=errors))
    return preflight_errors(checked.warnings)


def create_app(settings: ControlPlaneSettings) -> FastAPI:
    access = settings.access_control()
    service_credentials = ServiceCredentials.load(settings)
    input_roots = InputRoots.of(settings.input_roots)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await JobStore.open(settings.database_url, RetryPolicy(settings.database_retry_seconds))
        channels = ServiceChannels(
            settings.services.model_dump(), service_credentials, FollowBounds.of(settings)
        )
        bus = JobEventBus()
        orchestrator = Orchestrator(
            store, channels, bus, progress_interval_seconds=settings.progress_event_interval_seconds
        )
        app.state.store, app.state.bus, app.state.orchestrator = store, bus, orchestrator
        app.state.channels = channels
        await orchestrator.resume_unfinished()
        sweep = None
        if settings.finished_job_max_age_hours is not None:
            sweep = ExpirySweep(
                store,
                channels,
                max_age=timedelta(hours=settings.finished_job_max_age_hours),
                interval_seconds=settings.expiry_sweep_interval_seconds,
            )
            sweep.start()
        log.info("control plane ready", address=f"{settings.host}:{settings.port}")
        try:
            yield
        finally:
            if sweep is not None:
                await sweep.stop()
            await orchestrator.stop()
            await channels.close()
            await store.close()

    app = FastAPI(
        title="Stillhouse",
        version="v1",
        description="Distil big teacher LLMs into small, cheap students. Every `/v1` route and `/metrics` "
        "need `Authorization: Bearer <token>`; a `user` token sees its tenant's jobs only (any other job is "
        "404), an `admin` token every job and `/v1/audit`.",
        lifespan=lifespan,
        dependencies=[Depends(known_query_parameters_only)],
        responses={
            422: {"model": ErrorBody, "description": "A parameter refused, or one not taken"},
            503: {"model": ErrorBody, "description": "The job store is unavailable for now: try again later"},
        },
    )
    app.openapi = lambda: _openapi_with_job_schema(app)
    app.state.access = access

    authenticated = [Depends(current_principal)]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, ErrorBody(message=exc.message), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc.errors())
        return _error(422, ErrorBody(message=summarise("request", errors), errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; a path can have several routes.
            headers["Allow"] = ", ".join(sorted(allowed_methods(request.app, request.scope)))
        return _error(exc.status_code, ErrorBody(message=str(exc.detail)), headers)

    @app.exception_handler(JobNotFound)
    async def job_not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return _error(404, ErrorBody(message=str(exc)))

    @app.exception_handler(DatabaseUnavailable)
    async def store_unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        # The store has already retried for `database_retry_seconds`; the client may try again later.
        return _error(503, ErrorBody(message=f"the job store is unavailable: {exc}"), {"Retry-After": "10"})

    @app.exception_handler(QuotaExceeded)
    async def quota_exceeded(_: Request, exc: QuotaExceeded) -> JSONResponse:
        return _error(429, ErrorBody(message=str(exc)))

    app.add_middleware(AnsweredRequests)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        """The job store answers and jobs are being driven."""
        try:
            await request.app.state.store.ping()
        except Exception as exc:
            return JSONResponse(
                status_code=503, content={"status": "unavailable", "reason": f"job store: {exc}"}
            )
        return JSONResponse(content={"status": "ok"})

    @app.get(
        "/metrics",
        tags=["health"],
        dependencies=authenticated,
        response_class=PlainTextResponse,
        # The metrics are text; a refusal is JSON, as on every other route.
        responses={
            401: {
                "description": "Missing or invalid bearer token",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
        },
    )
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics of this process."""
        return PlainTextResponse(
            prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
        )

    error_responses = {
        401: {"model": ErrorBody, "description": "Missing or invalid bearer token"},
        404: {"model": ErrorBody, "description": "No such job, or another tenant's (users see their own)"},
    }
    page_token_responses = {
        400: {"model": ErrorBody, "description": "A pageToken this API did not give out"},
    }
    body_responses = {
        400: {
            "model": ErrorBody,
            "description": f"Unparseable body, nested more than {MAX_DEPTH} levels, or expanding (YAML "
            f"aliases) to more than {MAX_EXPANDED_VALUES} values",
        },
        413: {"model": ErrorBody, "description": f"Body larger than {MAX_SPEC_BYTES} bytes"},
        415: {"model": ErrorBody, "description": "Unsupported content type"},
    }

    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=JobView,
        tags=["jobs"],
        responses={
            **error_responses,
            **body_responses,
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
    async def submit_job(request: Request, principal: Caller) -> JobView | JSONResponse:
        """Submit a DistillationJob, as JSON or YAML. It is checked first (the schema, then the models it
        names: tokenizers, chat templates, context), then against the tenant's quotas; a job that passes
        starts at once: follow it with `/events`. The job belongs to the caller's tenant."""
        job = await _job_from_body(request, input_roots)
        if isinstance(job, JSONResponse):
            return job
        document = job.to_document()
        quota = access.quota(principal.tenant)
        try:
            require_budget(quota, principal.tenant, document["spec"])
        except BudgetRequired as exc:
            error = FieldError(field="spec.teacher.budgetUSD", message=str(exc), type="quota")
            return _error(422, ErrorBody(message=str(exc), errors=[error]))
        warnings = await _preflight(request, document["spec"])
        if isinstance(warnings, JSONResponse):
            return warnings

        def admit(usage: TenantUsage) -> None:
            check_admission(quota, principal.tenant, usage, budget_of(document["spec"]))

        job_id = new_job_id()
        record = await request.app.state.store.create_job(
            job_id,
            job.metadata.name or job_id,
            document,
            dict(job.metadata.labels),
            owner=principal.name,
            tenant=principal.tenant,
            admit=admit if quota.max_concurrent_jobs or quota.max_teacher_spend_usd_per_day else None,
            usage_since=start_of_day(datetime.now(UTC)),
        )
        request.state.created_job_id = job_id
        JOBS_SUBMITTED.inc()
        log.info(
            "job submitted", job_id=job_id, name=record.name, owner=principal.name, tenant=principal.tenant
        )
        request.app.state.orchestrator.run(job_id)
        request.app.state.bus.notify()
        return JobView.of(record).model_copy(update={"warnings": warnings})

    @app.post(
        "/v1/jobs:estimate",
        response_model=EstimateView,
        tags=["jobs"],
        responses={
            **error_responses,
            **body_responses,
            422: {
                "model": ErrorBody,
                "description": "The spec breaks the schema, the models it names fail the submit-time "
                "check, or its prompts cannot be built",
            },
            503: {"model": ErrorBody, "description": "A stage service cannot be reached"},
            504: {"model": ErrorBody, "description": "The estimate passed its deadline and was stopped"},
        },
    )
    async def estimate(request: Request, principal: Caller) -> EstimateView | JSONResponse:
        """What a DistillationJob would cost, without running it: it is checked as a submit checks it
        (and refused the same way), then its prompts are built (deterministically, as the job will build
        them) and the teacher's answers to them priced. Teacher calls that prompt
        generation makes are real and cached, so the job itself does not pay for them again."""
        job = await _job_from_body(request, input_roots)
        if isinstance(job, JSONResponse):
            return job
        spec = job.to_document()["spec"]
        warnings = await _preflight(request, spec)
        if isinstance(warnings, JSONResponse):
            return warnings
        try:
            estimate = await until_disconnected(
                request,
                estimate_job(
                    request.app.state.channels, spec, principal.tenant, settings.estimate_timeout_seconds
                ),
            )
            return EstimateView.model_validate({**estimate, "warnings": warnings})
        except EstimateFailed as exc:
            raise ApiError(503 if exc.retryable else 422, f"cannot estimate the job: {exc}") from exc
        except EstimateTimedOut as exc:
            raise ApiError(504, str(exc)) from exc

    @app.get(
        "/v1/jobs",
        response_model=JobList,
        tags=["jobs"],
        responses={
            401: error_responses[401],
            **page_token_responses,
        },
    )
    async def list_jobs(
        request: Request,
        principal: Caller,
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
            jobs, next_token = await request.app.state.store.list_jobs(
                phase=phase, tenant=tenant, limit=page_size, page_token=page_token
            )
        except ValueError as exc:
            raise ApiError(400, f"pageToken: {exc}") from exc
        return JobList(jobs=[JobView.of(job) for job in jobs], next_page_token=next_token)

    @app.post(
        "/v1/jobs/{job_id:job_id}:cancel",
        status_code=202,
        response_model=JobView,
        tags=["jobs"],
        responses={**error_responses, 409: {"model": ErrorBody, "description": "The job has already ended"}},
    )
    async def cancel_job(job_id: JobId, request: Request, principal: Caller) -> JobView:
        """Ask a job to stop. The running stage is cancelled in its service; the job ends Cancelled."""
        store: JobStore = request.app.state.store
        await visible_job(store, principal, job_id)
        try:
            record = await store.request_cancel(job_id)
        except IllegalTransition as exc:
            raise ApiError(409, f"job {job_id} has already ended ({exc.current})") from exc
        request.app.state.orchestrator.request_cancel(job_id)
        log.info("job cancel requested", job_id=job_id)
        return JobView.of(record, await store.steps(job_id))

    @app.get(
        "/v1/jobs/{job_id:job_id}",
        response_model=JobView,
        tags=["jobs"],
        responses=error_responses,
    )
    async def get_job(job_id: JobId, request: Request, principal: Caller) -> JobView:
        """One job, with the steps it has run."""
        store: JobStore = request.app.state.store
        return JobView.of(await visible_job(store, principal, job_id), await store.steps(job_id))

    @app.delete(
        "/v1/jobs/{job_id:job_id}",
        status_code=204,
        response_class=Response,
        tags=["jobs"],
        responses={
            **error_responses,
            409: {"model": ErrorBody, "description": "The job has not finished: cancel it first"},
            502: {
                "model": ErrorBody,
                "description": "The storage service failed to delete the job's objects",
            },
            503: {"model": ErrorBody, "description": "The storage service cannot be reached"},
        },
    )
    async def delete_job(job_id: JobId, request: Request, principal: Caller) -> Response:
        """Delete a finished job: its objects in object storage (everything under `jobs/<id>/`: prompts,
        answers, checkpoints, the student, the report), then the job with its steps and events. A delete
        that fails midway can be asked again."""
        store: JobStore = request.app.state.store
        await visible_job(store, principal, job_id)
        try:
            await remove_job(store, request.app.state.channels, job_id)
        except JobNotFinished as exc:
            raise ApiError(
                409, f"job {job_id} is {exc.phase.value}: cancel it first (POST /v1/jobs/{job_id}:cancel)"
            ) from exc
        except RemovalFailed as exc:
            raise ApiError(exc.status, f"cannot delete the objects of job {job_id}: {exc}") from exc
        return Response(status_code=204)

    @app.get(
        "/v1/jobs/{job_id:job_id}/artifacts/{name}",
        response_model=ArtifactLinks,
        tags=["jobs"],
        responses={
            **error_responses,
            503: {"model": ErrorBody, "description": "The storage service cannot be reached"},
        },
    )
    async def job_artifact(
        job_id: JobId, name: ArtifactName, request: Request, principal: Caller
    ) -> ArtifactLinks:
        """The files of one of the job's artifacts (`student`, `baseline`, `report`), each with a
        time-limited URL to download it straight from object storage, and its size and sha256."""
        store: JobStore = request.app.state.store
        job = await visible_job(store, principal, job_id)
        results = {step.stage: step.result or {} for step in await store.steps(job_id) if step.result}
        artifact_id = artifact_id_of(results, name.value)
        if artifact_id is None:
            raise ApiError(404, f"job {job_id} has no {name.value} yet (phase {job.phase.value})")
        try:
            return ArtifactLinks.model_validate(await artifact_links(request.app.state.channels, artifact_id))
        except ArtifactUnavailable as exc:
            raise ApiError(exc.status, f"cannot list the {name.value} of job {job_id}: {exc}") from exc

    @app.get(
        "/v1/jobs/{job_id:job_id}/events",
        tags=["jobs"],
        responses={**error_responses, 200: {"content": {"text/event-stream": {}}}},
    )
    async def job_events(
        job_id: JobId,
        request: Request,
        principal: Caller,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> EventSourceResponse:
        """Server-sent events: `phase`, `progress` and `error`, from the start (or after Last-Event-ID).

        The stream ends after the event that puts the job in a final phase.
        """
        store: JobStore = request.app.state.store
        bus: JobEventBus = request.app.state.bus
        await visible_job(store, principal, job_id)
        try:
            after = int(last_event_id) if last_event_id else 0
        except ValueError as exc:
            raise ApiError(
                400, f"Last-Event-ID must be an event id (an integer), not {last_event_id!r}"
            ) from exc

        async def stream() -> AsyncIterator[ServerSentEvent]:
            nonlocal after
            while True:
                events = await store.events_after(job_id, after)
                for event in events:
                    after = event.id
                    yield ServerSentEvent(data=json.dumps(event.data), event=event.type, id=str(event.id))
                    if event.type == "phase" and Phase(event.data["phase"]).is_terminal:
                        return
                if not events:
                    await bus.wait(EVENT_POLL_SECONDS)

        return EventSourceResponse(stream(), ping=15)

    @app.get(
        "/v1/audit",
        response_model=AuditList,
        tags=["audit"],
        responses={
            401: error_responses[401],
            **page_token_responses,
            403: {"model": ErrorBody, "description": "The caller is not an admin"},
        },
    )
    async def list_audit(
        request: Request,
        principal: Caller,
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
            entries, next_token = await request.app.state.store.list_audit(
                tenant=tenant, job_id=job_id, limit=page_size, page_token=page_token
            )
        except ValueError as exc:
            raise ApiError(400, f"pageToken: {exc}") from exc
        return AuditList.of(entries, next_token)

    return app


def run(settings: ControlPlaneSettings) -> None:
    """Blocking entry point of `stillhouse serve control-plane`."""
    configure_logging(settings.log_level, settings.log_format, service="control-plane")
    try:
        app = create_app(settings)
    except (ValueError, OSError) as exc:
        log.error("cannot start the control plane", error=str(exc))
        raise SystemExit(2) from None
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, lifespan="on")
