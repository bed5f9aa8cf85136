"""The control plane's REST API: submit, list, inspect, follow and cancel distillation jobs.

Handlers translate between HTTP and the store/orchestrator; the wire schema is in `api_models`, the
job spec in `stillhouse.common.jobspec`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import prometheus_client
import structlog
import uvicorn
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from stillhouse.common.input_roots import InputRefused, InputRoots, check_prompt_inputs
from stillhouse.common.jobspec import DistillationJob
from stillhouse.common.logging import configure_logging
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.control_plane.api_models import (
    ArtifactLinks,
    ArtifactName,
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
from stillhouse.control_plane.config import ControlPlaneSettings
from stillhouse.control_plane.estimate import EstimateFailed, estimate_job
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.orchestrator import Orchestrator, ServiceChannels
from stillhouse.control_plane.phases import IllegalTransition, Phase
from stillhouse.control_plane.preflight import PreflightRefused, PreflightUnavailable, check_job
from stillhouse.control_plane.spec_body import (
    MAX_DEPTH,
    MAX_EXPANDED_VALUES,
    MAX_SPEC_BYTES,
    BodyRefused,
    parse_document,
    read_capped,
)
from stillhouse.control_plane.store import JobNotFound, JobStore

log = structlog.get_logger(__name__)

# Seconds between two looks at the store while nothing has been announced (another process may write).
EVENT_POLL_SECONDS = 1.0

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


def _error(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"), headers=headers)


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
    schema["paths"]["/v1/jobs"]["post"]["requestBody"] = {
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
    accepted_tokens = [token.encode() for token in settings.accepted_tokens()]
    service_credentials = ServiceCredentials.load(settings)
    input_roots = InputRoots.of(settings.input_roots)
    if not accepted_tokens:
        raise ValueError("no API token configured: the token file is empty")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await JobStore.open(settings.database_url)
        channels = ServiceChannels(settings.services.model_dump(), service_credentials)
        bus = JobEventBus()
        orchestrator = Orchestrator(
            store,
            channels,
            bus,
            unavailable_timeout_seconds=settings.service_unavailable_timeout_seconds,
            progress_interval_seconds=settings.progress_event_interval_seconds,
        )
        app.state.store, app.state.bus, app.state.orchestrator = store, bus, orchestrator
        app.state.channels = channels
        await orchestrator.resume_unfinished()
        log.info("control plane ready", address=f"{settings.host}:{settings.port}")
        try:
            yield
        finally:
            await orchestrator.stop()
            await channels.close()
            await store.close()

    app = FastAPI(
        title="Stillhouse",
        version="v1",
        description="Distil big teacher LLMs into small, cheap students. Every `/v1` route and `/metrics` "
        "need `Authorization: Bearer <token>`.",
        lifespan=lifespan,
    )
    app.openapi = lambda: _openapi_with_job_schema(app)

    async def require_token(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> None:
        given = credentials.credentials.encode() if credentials else b""
        # Compare against every token so the time taken does not tell which one was close.
        matches = [secrets.compare_digest(given, token) for token in accepted_tokens]
        if not any(matches):
            log.warning("unauthenticated request refused", path=request.url.path, had_token=bool(given))
            raise ApiError(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})

    authenticated = [Depends(require_token)]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, ErrorBody(message=exc.message), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc.errors())
        return _error(422, ErrorBody(message=summarise("request", errors), errors=errors))

    @app.exception_handler(JobNotFound)
    async def job_not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return _error(404, ErrorBody(message=str(exc)))

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        HTTP_REQUESTS.labels(request.method, template, response.status_code).inc()
        HTTP_SECONDS.labels(request.method, template).observe(time.perf_counter() - started)
        return response

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

    @app.get("/metrics", tags=["health"], dependencies=authenticated, response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics of this process."""
        return PlainTextResponse(
            prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
        )

    error_responses = {
        401: {"model": ErrorBody, "description": "Missing or invalid bearer token"},
        404: {"model": ErrorBody, "description": "No such job"},
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
        dependencies=authenticated,
        tags=["jobs"],
        responses={
            **error_responses,
            **body_responses,
            422: {
                "model": ErrorBody,
                "description": "The spec breaks the schema, or the models it names fail the submit-time "
                "check; each error names its field",
            },
            503: {"model": ErrorBody, "description": "The trainer service cannot check the job"},
        },
    )
    async def submit_job(request: Request) -> JobView | JSONResponse:
        """Submit a DistillationJob, as JSON or YAML. It is checked first (the schema, then the models it
        names: tokenizers, chat templates, context); a job that passes starts at once: follow it with
        `/events`."""
        job = await _job_from_body(request, input_roots)
        if isinstance(job, JSONResponse):
            return job
        warnings = await _preflight(request, job.to_document()["spec"])
        if isinstance(warnings, JSONResponse):
            return warnings
        job_id = new_job_id()
        record = await request.app.state.store.create_job(
            job_id, job.metadata.name or job_id, job.to_document(), dict(job.metadata.labels)
        )
        JOBS_SUBMITTED.inc()
        log.info("job submitted", job_id=job_id, name=record.name)
        request.app.state.orchestrator.run(job_id)
        request.app.state.bus.notify()
        return JobView.of(record).model_copy(update={"warnings": warnings})

    @app.post(
        "/v1/jobs:estimate",
        response_model=EstimateView,
        dependencies=authenticated,
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
        },
    )
    async def estimate(request: Request) -> EstimateView | JSONResponse:
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
            estimate = await estimate_job(request.app.state.channels, spec)
            return EstimateView.model_validate({**estimate, "warnings": warnings})
        except EstimateFailed as exc:
            raise ApiError(503 if exc.retryable else 422, f"cannot estimate the job: {exc}") from exc

    @app.get(
        "/v1/jobs",
        response_model=JobList,
        dependencies=authenticated,
        tags=["jobs"],
        responses=error_responses,
    )
    async def list_jobs(
        request: Request,
        phase: Phase | None = None,
        page_size: Annotated[int, Query(alias="pageSize", ge=1, le=500)] = 50,
        page_token: Annotated[str | None, Query(alias="pageToken")] = None,
    ) -> JobList:
        """Jobs, newest first, optionally only those in one phase."""
        try:
            jobs, next_token = await request.app.state.store.list_jobs(
                phase=phase, limit=page_size, page_token=page_token
            )
        except ValueError as exc:
            raise ApiError(400, f"pageToken: {exc}") from exc
        return JobList(jobs=[JobView.of(job) for job in jobs], next_page_token=next_token)

    @app.post(
        "/v1/jobs/{job_id}:cancel",
        status_code=202,
        response_model=JobView,
        dependencies=authenticated,
        tags=["jobs"],
        responses={**error_responses, 409: {"model": ErrorBody, "description": "The job has already ended"}},
    )
    async def cancel_job(job_id: str, request: Request) -> JobView:
        """Ask a job to stop. The running stage is cancelled in its service; the job ends Cancelled."""
        store: JobStore = request.app.state.store
        try:
            record = await store.request_cancel(job_id)
        except IllegalTransition as exc:
            raise ApiError(409, f"job {job_id} has already ended ({exc.current})") from exc
        request.app.state.orchestrator.request_cancel(job_id)
        log.info("job cancel requested", job_id=job_id)
        return JobView.of(record, await store.steps(job_id))

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=JobView,
        dependencies=authenticated,
        tags=["jobs"],
        responses=error_responses,
    )
    async def get_job(job_id: str, request: Request) -> JobView:
        """One job, with the steps it has run."""
        store: JobStore = request.app.state.store
        return JobView.of(await store.get_job(job_id), await store.steps(job_id))

    @app.get(
        "/v1/jobs/{job_id}/artifacts/{name}",
        response_model=ArtifactLinks,
        dependencies=authenticated,
        tags=["jobs"],
        responses={
            **error_responses,
            503: {"model": ErrorBody, "description": "The storage service cannot be reached"},
        },
    )
    async def job_artifact(job_id: str, name: ArtifactName, request: Request) -> ArtifactLinks:
        """The files of one of the job's artifacts (`student`, `baseline`, `report`), each with a
        time-limited URL to download it straight from object storage, and its size and sha256."""
        store: JobStore = request.app.state.store
        job = await store.get_job(job_id)
        results = {step.stage: step.result or {} for step in await store.steps(job_id) if step.result}
        artifact_id = artifact_id_of(results, name.value)
        if artifact_id is None:
            raise ApiError(404, f"job {job_id} has no {name.value} yet (phase {job.phase.value})")
        try:
            return ArtifactLinks.model_validate(await artifact_links(request.app.state.channels, artifact_id))
        except ArtifactUnavailable as exc:
            raise ApiError(exc.status, f"cannot list the {name.value} of job {job_id}: {exc}") from exc

    @app.get(
        "/v1/jobs/{job_id}/events",
        dependencies=authenticated,
        tags=["jobs"],
        responses={**error_responses, 200: {"content": {"text/event-stream": {}}}},
    )
    async def job_events(
        job_id: str,
        request: Request,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> EventSourceResponse:
        """Server-sent events: `phase`, `progress` and `error`, from the start (or after Last-Event-ID).

        The stream ends after the event that puts the job in a final phase.
        """
        store: JobStore = request.app.state.store
        bus: JobEventBus = request.app.state.bus
        await store.get_job(job_id)
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

    return app


def run(settings: ControlPlaneSettings) -> None:
    """Blocking entry point of `stillhouse serve control-plane`."""
    configure_logging(settings.log_level, settings.log_format, service="control-plane")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, lifespan="on")
