"""`AsyncClient`: the jobs API from asyncio code, over the same requests and answers as `Client`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from stillhouse.client import protocol as api
from stillhouse.client.base import HttpApiClient
from stillhouse.client.downloads import DOWNLOAD_TIMEOUT, ArtifactStaging, afetch
from stillhouse.client.errors import WaitTimeout
from stillhouse.client.events import JobEvent, PhaseEvent, SseDecoder, StreamCursor
from stillhouse.client.specs import SpecInput
from stillhouse.common.api_models import ArtifactLinks, EstimateView, JobView, SpecValidation


class AsyncClient(HttpApiClient[httpx.AsyncClient]):
    """The Stillhouse jobs API for asyncio; finds the API as `Client` does. Use it as an async context
    manager, or await `aclose`."""

    http_class = httpx.AsyncClient

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- jobs -----------------------------------------------------------------------------------

    async def submit(self, spec: SpecInput) -> JobView:
        """Submit a job: a dict, YAML or JSON text, a spec file's Path, or a DistillationJob."""
        return await self._call(api.submit_request(spec), api.parse_job)

    async def validate(self, spec: SpecInput) -> SpecValidation:
        """Check a spec without submitting it; InvalidSpec lists what is wrong, with lines."""
        return await self._call(api.validate_request(spec), api.parse_validation)

    async def estimate(self, spec: SpecInput, timeout: float | None = None) -> EstimateView:
        """What the job would cost, without running it (`timeout` None: wait as long as it takes)."""
        return await self._call(api.estimate_request(spec, timeout), api.parse_estimate)

    async def get(self, job_id: str) -> JobView:
        return await self._call(api.get_request(job_id), api.parse_job)

    async def iter_jobs(self, phase: str | None = None, tenant: str | None = None) -> AsyncIterator[JobView]:
        """Every job the token may see, newest first, fetching pages as they are reached."""
        page_token: str | None = None
        while True:
            page = await self._call(api.list_request(phase, tenant, page_token), api.parse_job_list)
            for job in page.jobs:
                yield job
            page_token = page.next_page_token
            if not page_token:
                return

    async def list(self, phase: str | None = None, tenant: str | None = None) -> list[JobView]:
        """Every job the token may see (every page), newest first; `phase` and `tenant` filter."""
        return [job async for job in self.iter_jobs(phase, tenant)]

    async def cancel(self, job_id: str) -> JobView:
        """Ask the job to stop; Conflict when it has already ended."""
        return await self._call(api.cancel_request(job_id), api.parse_job)

    async def artifact(self, job_id: str, artifact: str = "student") -> ArtifactLinks:
        return await self._call(api.artifact_request(job_id, artifact), api.parse_artifact)

    # --- following a job ------------------------------------------------------------------------

    async def events(self, job_id: str, follow: bool = True) -> AsyncIterator[JobEvent]:
        """The job's events from the first one on, typed (`async for`); as `Client.events`."""
        cursor = StreamCursor(job_id, self.url)
        while True:
            request = api.events_request(job_id, cursor.headers())
            timeout = api.stream_timeout(self._http.timeout, follow, None)
            try:
                async with self._http.stream(
                    request.method, request.path, headers=request.headers, timeout=timeout
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        api.check(response, request)
                    decoder = SseDecoder()
                    async for line in response.aiter_lines():
                        if (event := cursor.receive(decoder, line)) is not None:
                            yield event
                        if cursor.ended:
                            return
            except httpx.ReadTimeout:
                return  # only a stream that is not followed has a read timeout: everything is read
            except httpx.TransportError as exc:
                if not cursor.started:
                    raise api.unreachable(self.url, exc) from exc
            if not follow:
                return
            await asyncio.sleep(cursor.dropped(time.monotonic()))

    async def wait(
        self,
        job_id: str,
        on_progress: Callable[[JobEvent], Awaitable[Any] | Any] | None = None,
        timeout: float | None = None,
    ) -> JobView:
        """Follow the job to its end, calling (or awaiting) `on_progress` with each event; the final job.
        WaitTimeout after `timeout` seconds (the job goes on)."""
        phase = None
        try:
            async with asyncio.timeout(timeout):
                async for event in self.events(job_id):
                    if isinstance(event, PhaseEvent):
                        phase = event.phase
                    if on_progress is not None and asyncio.iscoroutine(reply := on_progress(event)):
                        await reply
        except TimeoutError:
            raise WaitTimeout(job_id, timeout or 0.0, phase) from None
        return await self.get(job_id)

    async def pull(
        self,
        job_id: str,
        destination: Path | str,
        artifact: str = "student",
        on_file: Callable[[str, int], Any] | None = None,
    ) -> Path:
        """Download a job's artifact into `destination`, verified; as `Client.pull`."""
        links = await self.artifact(job_id, artifact)
        with ArtifactStaging(Path(destination)) as staging:
            async with httpx.AsyncClient(timeout=DOWNLOAD_TIMEOUT, follow_redirects=True) as http:
                for file in links.files:
                    path = staging.destination(file)
                    await afetch(http, file, path)
                    size = await asyncio.to_thread(staging.verify, file, path)
                    if on_file is not None:
                        on_file(file.path, size)
            return staging.commit()

    # --- transport ------------------------------------------------------------------------------

    async def _call(self, request: api.ApiRequest, parser: Callable[[httpx.Response], Any]) -> Any:
        try:
            response = await self._http.request(**api.request_arguments(request, self._http.timeout))
        except httpx.TransportError as exc:
            raise api.unreachable(self.url, exc) from exc
        return api.parse_answer(response, request, parser)
