"""The jobs API as requests to send and answers to read, with no I/O: both `Client` and `AsyncClient`
build their requests here and hand the answers back here to be parsed or turned into errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from stillhouse.client.endpoint import ApiEndpoint
from stillhouse.client.errors import (
    ApiUnavailable,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    StillhouseError,
    Unauthorized,
)
from stillhouse.client.specs import SpecInput, spec_body
from stillhouse.common.api_models import (
    ArtifactLinks,
    ErrorBody,
    EstimateView,
    FieldError,
    JobList,
    JobView,
    SpecValidation,
)

# Seconds to wait for an ordinary API answer.
REQUEST_TIMEOUT = 30.0
# The control plane waits up to 120 s for the trainer's submit-time check.
SUBMIT_TIMEOUT = 150.0
LIST_PAGE_SIZE = 100
# Without `follow`, an event stream quiet for this long has delivered everything recorded so far.
QUIET_STREAM_SECONDS = 1.0


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    params: dict[str, str | int] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # None: the client's own timeout; "forever": no timeout (an estimate may build prompts for long).
    timeout: float | str | None = None
    # The job the request names, for a NotFound that says which.
    job_id: str | None = None


def job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}"


def _spec_request(path: str, spec: SpecInput, timeout: float | str | None) -> ApiRequest:
    body, content_type = spec_body(spec)
    return ApiRequest("POST", path, content=body, headers={"Content-Type": content_type}, timeout=timeout)


def submit_request(spec: SpecInput) -> ApiRequest:
    return _spec_request("/v1/jobs", spec, SUBMIT_TIMEOUT)


def estimate_request(spec: SpecInput, timeout: float | None) -> ApiRequest:
    return _spec_request("/v1/jobs:estimate", spec, "forever" if timeout is None else timeout)


def validate_request(spec: SpecInput) -> ApiRequest:
    return _spec_request("/v1/jobs:validate", spec, None)


def list_request(phase: str | None, tenant: str | None, page_token: str | None) -> ApiRequest:
    params: dict[str, str | int] = {"pageSize": LIST_PAGE_SIZE}
    for name, value in (("phase", phase), ("tenant", tenant), ("pageToken", page_token)):
        if value:
            params[name] = str(value)
    return ApiRequest("GET", "/v1/jobs", params=params)


def get_request(job_id: str) -> ApiRequest:
    return ApiRequest("GET", job_path(job_id), job_id=job_id)


def cancel_request(job_id: str) -> ApiRequest:
    return ApiRequest("POST", f"{job_path(job_id)}:cancel", job_id=job_id)


def artifact_request(job_id: str, artifact: str) -> ApiRequest:
    return ApiRequest("GET", f"{job_path(job_id)}/artifacts/{quote(str(artifact), safe='')}")


def events_request(job_id: str, headers: dict[str, str]) -> ApiRequest:
    return ApiRequest("GET", f"{job_path(job_id)}/events", headers=headers, job_id=job_id)


def http_timeout(request: ApiRequest, default: httpx.Timeout) -> httpx.Timeout:
    if request.timeout == "forever":
        return httpx.Timeout(default.connect, read=None, write=default.write, pool=default.pool)
    if isinstance(request.timeout, int | float):
        return httpx.Timeout(request.timeout, connect=default.connect)
    return default


def request_arguments(request: ApiRequest, default: httpx.Timeout) -> dict[str, Any]:
    """The keyword arguments of the httpx client's `request` (sync or async) that sends `request`."""
    return {
        "method": request.method,
        "url": request.path,
        "params": request.params,
        "content": request.content,
        "headers": request.headers,
        "timeout": http_timeout(request, default),
    }


def stream_timeout(default: httpx.Timeout, follow: bool, remaining: float | None) -> httpx.Timeout:
    """A followed stream waits as long as the job runs (or until `remaining` seconds are up); one that
    is not followed stops when it goes quiet."""
    read = QUIET_STREAM_SECONDS if not follow else remaining
    return httpx.Timeout(default.connect, read=read, write=default.write, pool=default.pool)


# --- answers ------------------------------------------------------------------------------------


def error_for(status: int, body: bytes, reason: str, job_id: str | None = None) -> StillhouseError:
    """The error an unsuccessful answer means, carrying the API's own message."""
    parsed = _error_body(body)
    message = parsed.message if parsed else (body.decode(errors="replace").strip()[:200] or reason)
    if status == 401:
        return Unauthorized(message)
    if status == 403:
        return Forbidden(message)
    if status == 404:
        return NotFound(message, job_id=job_id)
    if status == 409:
        return Conflict(message)
    if status == 422:
        return InvalidRequest(message, parsed.errors if parsed else [])
    if status == 429:
        return QuotaExceeded(message)
    if status >= 500:
        return ApiUnavailable(message, status=status, text=f"the API failed ({status}): {message}")
    return StillhouseError(message, status=status)


def _error_body(body: bytes) -> ErrorBody | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    # The API's own errors carry `message`; a route it does not have answers FastAPI's `detail`.
    message = document.get("message", document.get("detail"))
    if not isinstance(message, str):
        return None
    errors = []
    for error in document.get("errors") or []:
        try:
            errors.append(FieldError.model_validate({"type": "", **error}))
        except (ValidationError, TypeError):
            continue
    return ErrorBody(message=message, errors=errors)


def check(response: httpx.Response, request: ApiRequest) -> None:
    """Raise the error an unsuccessful (already read) answer means."""
    if not response.is_success:
        raise error_for(response.status_code, response.content, response.reason_phrase, request.job_id)


def parse_job(response: httpx.Response) -> JobView:
    return JobView.model_validate_json(response.content)


def parse_job_list(response: httpx.Response) -> JobList:
    return JobList.model_validate_json(response.content)


def parse_estimate(response: httpx.Response) -> EstimateView:
    return EstimateView.model_validate_json(response.content)


def parse_artifact(response: httpx.Response) -> ArtifactLinks:
    return ArtifactLinks.model_validate_json(response.content)


def parse_validation(response: httpx.Response) -> SpecValidation:
    return SpecValidation.model_validate_json(response.content)


def unreachable(url: str, exc: httpx.TransportError) -> ApiUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        return ApiUnavailable(f"the Stillhouse API at {url} did not answer in time")
    reason = "connection refused" if "refused" in str(exc).lower() else str(exc) or type(exc).__name__
    return ApiUnavailable(f"cannot reach the Stillhouse API at {url}: {reason}")


def parse_answer(response: httpx.Response, request: ApiRequest, parser: Any) -> Any:
    check(response, request)
    try:
        return parser(response)
    except (ValidationError, ValueError) as exc:
        raise StillhouseError(
            f"the API's answer to {request.method} {request.path} is not what this SDK reads: {exc}",
            status=response.status_code,
        ) from exc


def http_options(endpoint: ApiEndpoint, timeout: float) -> dict[str, Any]:
    """The keyword arguments of the httpx client (sync or async) that talks to `endpoint`."""
    return {
        "base_url": endpoint.url,
        "headers": {"Authorization": f"Bearer {endpoint.token}", "User-Agent": "stillhouse-client"},
        "timeout": httpx.Timeout(timeout),
    }


class DeadlinePassed(Exception):
    """A followed event stream ran past the deadline its caller set (`wait`'s timeout)."""
