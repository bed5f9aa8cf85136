"""How the REST API refuses: every refusal is an `ErrorBody`, whatever raised it.

Handlers raise `ApiError` for what they refuse themselves; the other exceptions here are the store's,
FastAPI's and Starlette's, answered with the status that says why.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from stillhouse.common.api_models import ErrorBody, FieldError
from stillhouse.common.database_retry import DatabaseUnavailable
from stillhouse.control_plane.quotas import QuotaExceeded
from stillhouse.control_plane.spec_lines import field_lines
from stillhouse.control_plane.store import JobNotFound
from stillhouse.control_plane.views import field_errors, summarise, with_lines

# The request's attribute that holds the text of the job spec it sent, once read (`submitted_job`).
SPEC_TEXT = "spec_text"


class ApiError(Exception):
    """A refusal: its HTTP status, a message for the user, and the fields at fault, if any."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, errors=errors or [])
        self.headers = headers


def invalid(what: str, errors: list[FieldError]) -> ApiError:
    """The 422 that names every field of `what` at fault."""
    return ApiError(422, summarise(what, errors), errors=errors)


def error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"), headers=headers)


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> set[str]:
    """The methods of every route whose path matches the request's, in the included routers too."""
    methods: set[str] = set()
    for route in iter_route_contexts(app.routes):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods |= route.methods or set()
    return methods


async def _refused(request: Request, exc: ApiError) -> JSONResponse:
    body = exc.body
    spec_text = getattr(request.state, SPEC_TEXT, None)
    if exc.status == 422 and spec_text is not None and body.errors:
        # Whatever refused the spec (the schema, the input roots, a quota, the submit-time check), its
        # fields are the submitted text's. Reading up to a MiB of it is kept off the event loop.
        body = with_lines(body, await asyncio.to_thread(field_lines, spec_text))
    return error_response(exc.status, body, exc.headers)


async def _request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = field_errors(exc.errors())
    return error_response(422, ErrorBody(message=summarise("request", errors), errors=errors))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the first matching route's methods; a path can have several routes.
        headers["Allow"] = ", ".join(sorted(allowed_methods(request.app, request.scope)))
    return error_response(exc.status_code, ErrorBody(message=str(exc.detail)), headers)


async def _job_not_found(_: Request, exc: JobNotFound) -> JSONResponse:
    return error_response(404, ErrorBody(message=str(exc)))


async def _store_unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
    # The store has already retried for `database_retry_seconds`; the client may try again later.
    body = ErrorBody(message=f"the job store is unavailable: {exc}")
    return error_response(503, body, {"Retry-After": "10"})


async def _quota_exceeded(_: Request, exc: QuotaExceeded) -> JSONResponse:
    return error_response(429, ErrorBody(message=str(exc)))


EXCEPTION_HANDLERS: dict[type[Exception], Any] = {
    ApiError: _refused,
    RequestValidationError: _request_invalid,
    StarletteHTTPException: _http_error,
    JobNotFound: _job_not_found,
    DatabaseUnavailable: _store_unavailable,
    QuotaExceeded: _quota_exceeded,
}
