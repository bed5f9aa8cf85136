"""The control plane's REST API: submit, list, inspect, follow, cancel and delete distillation jobs; and
the web console that drives it from a browser.

`create_app` assembles it: the routers of `api` (one per resource) and of `console` (its pages, outside
the API's schema, and its static files), the state they share on `app.state`, the middleware and the
exception handlers. The wire schema is in `api_models`, the job spec in `stillhouse.common.jobspec`.
"""

from __future__ import annotations

import structlog
import uvicorn
from fastapi import Depends, FastAPI

from stillhouse.common.api_models import ErrorBody
from stillhouse.common.input_roots import InputRoots
from stillhouse.common.logging import configure_logging
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.control_plane.api import (
    artifacts,
    audit_log,
    estimates,
    event_feed,
    event_stream,
    health,
    jobs,
    spec_validation,
)
from stillhouse.control_plane.api.answered_requests import AnsweredRequests
from stillhouse.control_plane.api.dependencies import known_query_parameters_only
from stillhouse.control_plane.api.errors import EXCEPTION_HANDLERS
from stillhouse.control_plane.api.openapi import openapi_with_job_schema
from stillhouse.control_plane.config import ControlPlaneSettings
from stillhouse.control_plane.console import login, pages
from stillhouse.control_plane.console.static_files import STATIC_PREFIX, console_static_files
from stillhouse.control_plane.lifespan import lifespan

log = structlog.get_logger(__name__)

DESCRIPTION = (
    "Distil big teacher LLMs into small, cheap students. Every `/v1` route and `/metrics` need "
    "`Authorization: Bearer <token>`; a `user` token sees its tenant's jobs only (any other job is 404), "
    "an `admin` token every job and `/v1/audit`."
)


def create_app(settings: ControlPlaneSettings) -> FastAPI:
    app = FastAPI(
        title="Stillhouse",
        version="v1",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(known_query_parameters_only)],
        responses={
            422: {"model": ErrorBody, "description": "A parameter refused, or one not taken"},
            503: {"model": ErrorBody, "description": "The job store is unavailable for now: try again later"},
        },
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.openapi = lambda: openapi_with_job_schema(app)
    app.state.settings = settings
    app.state.access = settings.access_control()
    app.state.service_credentials = ServiceCredentials.load(settings)
    app.state.input_roots = InputRoots.of(settings.input_roots)
    app.add_middleware(AnsweredRequests)
    api = (health, jobs, estimates, spec_validation, artifacts, event_stream, event_feed, audit_log)
    for module in (*api, login, pages):
        app.include_router(module.router)
    app.mount(STATIC_PREFIX, console_static_files(), name="console-static")
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
