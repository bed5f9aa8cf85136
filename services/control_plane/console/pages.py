"""The console's pages: the jobs list, a job, and the submit editor. Each is a shell rendered here with
what the server knows at once (who is signed in, the job's name and spec); its script fills in the rest
from the `/v1` API and keeps it live. A page asked for without a session sends the browser to log in."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import RedirectResponse, Response

from stillhouse.common.job_phases import Phase
from stillhouse.control_plane.api.dependencies import visible_job
from stillhouse.control_plane.api.job_ids import JOB_ID_REGEX
from stillhouse.control_plane.console.navigation import login_url
from stillhouse.control_plane.console.rendering import not_found, page, signed_in
from stillhouse.control_plane.console.resubmit import resubmittable_yaml
from stillhouse.control_plane.store import JobNotFound, JobStore

EXAMPLE_JOB = Path(__file__).with_name("example_job.yaml")
MAX_FILTER_LENGTH = 256
JOB_ID = re.compile(JOB_ID_REGEX)

router = APIRouter(include_in_schema=False)

FilterText = Annotated[str | None, Query(max_length=MAX_FILTER_LENGTH)]


def sign_in_first(request: Request) -> Response:
    return RedirectResponse(login_url(request.url), status_code=303)


@router.get("/")
async def jobs_page(
    request: Request, phase: FilterText = None, q: FilterText = None, tenant: FilterText = None
) -> Response:
    principal = signed_in(request)
    if principal is None:
        return sign_in_first(request)
    return page(
        request,
        "jobs.html.j2",
        principal,
        phases=[phase.value for phase in Phase],
        phase=phase if phase in {known.value for known in Phase} else "",
        q=q or "",
        tenant=tenant or "",
    )


@router.get("/jobs/{job_id:job_id}")
async def job_page(request: Request, job_id: str) -> Response:
    principal = signed_in(request)
    if principal is None:
        return sign_in_first(request)
    store: JobStore = request.app.state.store
    try:
        job = await visible_job(store, principal, job_id)
    except JobNotFound:
        return not_found(request, principal, f"There is no job {job_id} that you may see.")
    return page(request, "job.html.j2", principal, job=job, spec_yaml=resubmittable_yaml(job.document))


@router.get("/jobs/{anything:path}")
async def not_a_job_page(request: Request, anything: str) -> Response:
    principal = signed_in(request)
    if principal is None:
        return sign_in_first(request)
    return not_found(
        request, principal, f"{anything[:80]!r} is not a job id: ids look like job-1a2b3c4d5e6f."
    )


@router.get("/submit")
async def submit_page(
    request: Request, from_job: Annotated[str | None, Query(alias="from", max_length=64)] = None
) -> Response:
    principal = signed_in(request)
    if principal is None:
        return sign_in_first(request)
    if from_job is None:
        return page(request, "submit.html.j2", principal, spec_yaml=EXAMPLE_JOB.read_text(), from_job=None)
    store: JobStore = request.app.state.store
    try:
        if not JOB_ID.fullmatch(from_job):
            raise JobNotFound(from_job)
        job = await visible_job(store, principal, from_job)
    except JobNotFound:
        return not_found(request, principal, f"There is no job {from_job} that you may see to resubmit.")
    return page(
        request, "submit.html.j2", principal, spec_yaml=resubmittable_yaml(job.document), from_job=job
    )
