"""A small REST client for the control plane's `/v1/jobs` API, and how the CLI finds that API.

Every failure a user can cause (no API running, a wrong token, an unknown job, an invalid spec) is raised
as an `ApiError` whose text is meant to be printed as is; the CLI turns it into an exit code.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, connect_sse

ENDPOINT_FILE = "endpoint.json"
NO_API_FOUND = (
    "no Stillhouse API found: run `stillhouse up` or set STILLHOUSE_API_URL and STILLHOUSE_API_TOKEN"
)
TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})

# Seconds to wait for an ordinary API answer; the event stream waits as long as the job runs.
REQUEST_TIMEOUT = 30.0
# The control plane waits up to 120 s for the trainer's submit-time check.
SUBMIT_TIMEOUT = 150.0
# A dropped event stream is reopened (from the last event seen) for this long at most: long enough for
# `stillhouse up` to restart a control plane that crashed.
STREAM_RECONNECT_SECONDS = 120.0


class ApiError(Exception):
    """A failure to print as one message; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ApiNotFound(ApiError):
    """No API URL or token could be found."""


class ApiUnreachable(ApiError):
    """Nothing answered at the API URL."""


class Unauthorized(ApiError):
    def __init__(self) -> None:
        super().__init__("the API refused the token (401): check STILLHOUSE_API_TOKEN or the token file")


class JobNotFound(ApiError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidRequest(ApiError):
    """422: the request (usually the job spec) failed validation; `errors` names each bad field."""

    exit_code = 2

    def __init__(self, message: str, errors: list[FieldError]) -> None:
        super().__init__(message)
        self.errors = errors

    def lines(self) -> list[str]:
        return [str(error) for error in self.errors] or [str(self)]


class ApiRefused(ApiError):
    """Any other error answer: a 4xx carries the server's own words for the user, a 5xx is its fault."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message if status < 500 else f"the API failed ({status}): {message}")
        self.status = status


@dataclass(frozen=True)
class ApiEndpoint:
    url: str
    token: str = field(repr=False)


def discover_endpoint(api_url: str | None, api_token: str | None, home: Path) -> ApiEndpoint:
    """The API to talk to: the URL given (flag or STILLHOUSE_API_URL) and token given
    (STILLHOUSE_API_TOKEN), each falling back to what `stillhouse up` wrote into `<home>/endpoint.json`."""
    if api_url and api_token:
        return ApiEndpoint(api_url.rstrip("/"), api_token)
    embedded = _read_endpoint_file(home)
    if embedded is None:
        if api_url:
            raise ApiNotFound(f"no API token for {api_url}: set STILLHOUSE_API_TOKEN")
        raise ApiNotFound(NO_API_FOUND)
    url = api_url or embedded["apiUrl"]
    if api_token:
        return ApiEndpoint(url.rstrip("/"), api_token)
    token_file = Path(embedded["tokenFile"])
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise ApiNotFound(f"cannot read the API token file {token_file}: {exc.strerror}") from exc
    if not token:
        raise ApiNotFound(f"the API token file {token_file} is empty")
    return ApiEndpoint(url.rstrip("/"), token)


def _read_endpoint_file(home: Path) -> dict[str, Any] | None:
    path = home / ENDPOINT_FILE
    try:
        endpoint = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ApiNotFound(f"cannot read {path}: {exc}") from exc
    if not isinstance(endpoint, dict) or not {"apiUrl", "tokenFile"} <= endpoint.keys():
        raise ApiNotFound(f"{path} is not an endpoint file written by `stillhouse up`")
    pid = endpoint.get("pid")
    if isinstance(pid, int) and not _process_exists(pid):
        raise ApiNotFound(
            f"the `stillhouse up` that wrote {path} (pid {pid}) is no longer running: run `stillhouse up`"
        )
    return endpoint


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def content_type_for(path: Path) -> str:
    """JSON for .json files; YAML otherwise (YAML reads JSON too, so a wrong guess stays harmless)."""
    return "application/json" if path.suffix.lower() == ".json" else "application/yaml"


class StillhouseClient:
    """Synchronous client of the jobs API. Use as a context manager."""

    def __init__(self, endpoint: ApiEndpoint, timeout: float = REQUEST_TIMEOUT) -> None:
        self.url = endpoint.url
        self._http = httpx.Client(
            base_url=endpoint.url,
            headers={"Authorization": f"Bearer {endpoint.token}"},
            timeout=timeout,
        )

    def __enter__(self) -> StillhouseClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def submit(self, body: bytes, content_type: str) -> dict[str, Any]:
        """The job as accepted; the API checks its models first (a GGUF tokenizer takes seconds to read)."""
        return self._call(
            "POST", "/v1/jobs", content=body, headers={"Content-Type": content_type}, timeout=SUBMIT_TIMEOUT
        )

    def estimate(self, body: bytes, content_type: str, timeout: float | None) -> dict[str, Any]:
        """The job's cost without running it; building its prompts may take a while (`timeout` None: wait)."""
        return self._call(
            "POST", "/v1/jobs:estimate", content=body, headers={"Content-Type": content_type}, timeout=timeout
        )

    def list_jobs(self, phase: str | None = None, page_size: int = 100) -> list[dict[str, Any]]:
        """Every job (following pagination), newest first as the API orders them."""
        jobs: list[dict[str, Any]] = []
        page_token: str | None = None
        while True:
            params: dict[str, Any] = {"pageSize": page_size}
            if phase:
                params["phase"] = phase
            if page_token:
                params["pageToken"] = page_token
            page = self._call("GET", "/v1/jobs", params=params)
            jobs += page["jobs"]
            page_token = page.get("nextPageToken")
            if not page_token:
                return jobs

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}", job_id=job_id)

    def artifact(self, job_id: str, name: str) -> dict[str, Any]:
        """The files of a job's artifact (`student`, `baseline`, `report`) with URLs to download them."""
        return self._call("GET", f"/v1/jobs/{job_id}/artifacts/{name}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}:cancel", job_id=job_id)

    def events(self, job_id: str, follow: bool = True) -> Iterator[ServerSentEvent]:
        """The job's events from the first one on. The stream ends after the terminal phase; a dropped
        connection is reopened from the last event seen. Without `follow`, stops once the events
        recorded so far have been read (the stream goes quiet for a moment)."""
        last_event_id: str | None = None
        reconnects = 0
        lost_since: float | None = None
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            read_timeout = None if follow else 1.0
            timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout)
            try:
                with connect_sse(
                    self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
                ) as source:
                    _raise_for_status(source.response, job_id)
                    for event in source.iter_sse():
                        if not event.data:
                            continue  # a keep-alive ping: a comment line, which carries no event
                        if event.id:
                            last_event_id = event.id
                        reconnects, lost_since = 0, None
                        yield event
                        if event.event == "phase" and event.json().get("phase") in TERMINAL_PHASES:
                            return
            except httpx.ReadTimeout:
                # Only a quiet stream without `follow` has a read timeout: everything so far is read.
                return
            except httpx.TransportError as exc:
                if reconnects == 0 and last_event_id is None:
                    raise ApiUnreachable(_unreachable_message(self.url, exc)) from exc
                # Otherwise the connection broke mid-stream: reopen it below.
            if not follow:
                return
            reconnects += 1
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > STREAM_RECONNECT_SECONDS:
                raise ApiUnreachable(
                    f"lost the event stream of job {job_id} at {self.url} for {STREAM_RECONNECT_SECONDS:g} s"
                )
            time.sleep(min(2.0, 0.2 * 2**reconnects))

    def _call(self, method: str, path: str, job_id: str | None = None, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiUnreachable(f"the Stillhouse API at {self.url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise ApiUnreachable(_unreachable_message(self.url, exc)) from exc
        _raise_for_status(response, job_id)
        return response.json()


def _unreachable_message(url: str, exc: httpx.TransportError) -> str:
    reason = "connection refused" if "refused" in str(exc).lower() else str(exc) or type(exc).__name__
    return f"cannot reach the Stillhouse API at {url}: {reason}"


def _raise_for_status(response: httpx.Response, job_id: str | None) -> None:
    if response.is_success:
        return
    status = response.status_code
    if status == 401:
        raise Unauthorized()
    body = _error_body(response)
    message = str(body.get("message") or response.reason_phrase)
    if status == 404 and job_id is not None:
        raise JobNotFound(job_id)
    if status == 422:
        errors = [
            FieldError(str(error.get("field", "")), str(error.get("message", "")))
            for error in body.get("errors") or []
            if isinstance(error, dict)
        ]
        raise InvalidRequest(message, errors)
    raise ApiRefused(status, message)


def _error_body(response: httpx.Response) -> dict[str, Any]:
    response.read()
    try:
        body = response.json()
    except ValueError:
        return {"message": response.text.strip()[:200] or None}
    return body if isinstance(body, dict) else {}
