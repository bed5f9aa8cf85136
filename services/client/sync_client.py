"""`Client`: the jobs API from synchronous code, over the requests and answers of `protocol`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from stillhouse.client import protocol as api
from stillhouse.client.base import HttpApiClient
from stillhouse.client.downloads import DOWNLOAD_TIMEOUT, ArtifactStaging, fetch
from stillhouse.client.errors import WaitTimeout
from stillhouse.client.events import JobEvent, PhaseEvent, SseDecoder, StreamCursor
from stillhouse.client.specs import SpecInput
from stillhouse.common.api_models import ArtifactLinks, EstimateView, JobView, SpecValidation


class Client(HttpApiClient[httpx.Client]):
    """The Stillhouse jobs API. Without `url` and `token`, finds the API as the CLI does:
    STILLHOUSE_API_URL and STILLHOUSE_API_TOKEN, else the endpoint file `stillhouse up` wrote in `home`
    ($STILLHOUSE_HOME or ~/.stillhouse). Use it as a context manager, or call `close`."""

    http_class = httpx.Client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- jobs -----------------------------------------------------------------------------------

    def submit(self, spec: SpecInput) -> JobView:
        """Submit a job: a dict, YAML or JSON text, a spec file's Path, or a DistillationJob. The API
        checks its models first, which may take seconds."""
        return self._call(api.submit_request(spec), api.parse_job)

    def validate(self, spec: SpecInput) -> SpecValidation:
        """Check a spec without submitting it; InvalidSpec lists what is wrong, with lines."""
        return self._call(api.validate_request(spec), api.parse_validation)

    def estimate(self, spec: SpecInput, timeout: float | None = None) -> EstimateView:
        """What the job would cost, without running it; building its prompts may take a while (`timeout`
        None: wait as long as it takes)."""
        return self._call(api.estimate_request(spec, timeout), api.parse_estimate)

    def get(self, job_id: str) -> JobView:
        return self._call(api.get_request(job_id), api.parse_job)

    def iter_jobs(self, phase: str | None = None, tenant: str | None = None) -> Iterator[JobView]:
        """Every job the token may see, newest first, fetching pages as they are reached."""
        page_token: str | None = None
        while True:
            page = self._call(api.list_request(phase, tenant, page_token), api.parse_job_list)
            yield from page.jobs
            page_token = page.next_page_token
            if not page_token:
                return

    def list(self, phase: str | None = None, tenant: str | None = None) -> list[JobView]:
        """Every job the token may see (every page), newest first; `phase` and `tenant` filter."""
        return [*self.iter_jobs(phase, tenant)]

    def cancel(self, job_id: str) -> JobView:
        """Ask the job to stop; Conflict when it has already ended."""
        return self._call(api.cancel_request(job_id), api.parse_job)

    def artifact(self, job_id: str, artifact: str = "student") -> ArtifactLinks:
        """The files of a job's artifact (`student`, `baseline`, `report`) with URLs to download them."""
        return self._call(api.artifact_request(job_id, artifact), api.parse_artifact)

    # --- following a job ------------------------------------------------------------------------

    def events(self, job_id: str, follow: bool = True) -> Iterator[JobEvent]:
        """The job's events from the first one on, typed. Ends after the terminal phase; a dropped
        connection is reopened from the last event seen. Without `follow`, stops once the events recorded
        so far have been read."""
        return self._events(job_id, follow, deadline=None)

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[JobEvent], Any] | None = None,
        timeout: float | None = None,
    ) -> JobView:
        """Follow the job to its end, calling `on_progress` with each event; the final job. WaitTimeout
        after `timeout` seconds (the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        phase = None
        try:
            for event in self._events(job_id, True, deadline):
                if isinstance(event, PhaseEvent):
                    phase = event.phase
                if on_progress is not None:
                    on_progress(event)
        except api.DeadlinePassed:
            raise WaitTimeout(job_id, timeout or 0.0, phase) from None
        return self.get(job_id)

    def pull(
        self,
        job_id: str,
        destination: Path | str,
        artifact: str = "student",
        on_file: Callable[[str, int], Any] | None = None,
    ) -> Path:
        """Download a job's artifact into `destination` (a new or empty folder), each file checked
        against its size and sha256; the folder appears only once every file is in it. `on_file` is
        called with each file's path and size."""
        links = self.artifact(job_id, artifact)
        with (
            ArtifactStaging(Path(destination)) as staging,
            httpx.Client(timeout=DOWNLOAD_TIMEOUT, follow_redirects=True) as http,
        ):
            for file in links.files:
                path = staging.destination(file)
                fetch(http, file, path)
                size = staging.verify(file, path)
                if on_file is not None:
                    on_file(file.path, size)
            return staging.commit()

    # --- transport ------------------------------------------------------------------------------

    def _call(self, request: api.ApiRequest, parser: Callable[[httpx.Response], Any]) -> Any:
        try:
            response = self._http.request(**api.request_arguments(request, self._http.timeout))
        except httpx.TransportError as exc:
            raise api.unreachable(self.url, exc) from exc
        return api.parse_answer(response, request, parser)

    def _events(self, job_id: str, follow: bool, deadline: float | None) -> Iterator[JobEvent]:
        cursor = StreamCursor(job_id, self.url)
        while True:
            remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
            request = api.events_request(job_id, cursor.headers())
            timeout = api.stream_timeout(self._http.timeout, follow, remaining)
            try:
                with self._http.stream(
                    request.method, request.path, headers=request.headers, timeout=timeout
                ) as response:
                    if not response.is_success:
                        response.read()
                        api.check(response, request)
                    decoder = SseDecoder()
                    for line in response.iter_lines():
                        if deadline is not None and time.monotonic() > deadline:
                            raise api.DeadlinePassed()
                        if (event := cursor.receive(decoder, line)) is not None:
                            yield event
                        if cursor.ended:
                            return
            except httpx.ReadTimeout:
                if not follow:
                    return  # a quiet stream: everything recorded so far is read
                raise api.DeadlinePassed() from None
            except httpx.TransportError as exc:
                if not cursor.started:
                    raise api.unreachable(self.url, exc) from exc
            if not follow:
                return
            time.sleep(cursor.dropped(time.monotonic()))
