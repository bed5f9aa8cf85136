"""Estimates: what a DistillationJob would cost, without running it (see `estimate`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request

from stillhouse.common.api_models import ErrorBody, EstimateView
from stillhouse.control_plane.api.dependencies import Caller, Channels, Settings
from stillhouse.control_plane.api.errors import ApiError
from stillhouse.control_plane.api.openapi import BODY_ERRORS, JOB_ROUTE_ERRORS
from stillhouse.control_plane.api.submitted_job import SubmittedJob, preflight_warnings
from stillhouse.control_plane.estimate import EstimateFailed, EstimateTimedOut, estimate_job
from stillhouse.control_plane.views import estimate_view

# How often a long request looks whether its caller is still there.
DISCONNECT_POLL_SECONDS = 1.0
T = TypeVar("T")

router = APIRouter(tags=["jobs"])


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


@router.post(
    "/v1/jobs:estimate",
    response_model=EstimateView,
    responses={
        **JOB_ROUTE_ERRORS,
        **BODY_ERRORS,
        422: {
            "model": ErrorBody,
            "description": "The spec breaks the schema, the models it names fail the submit-time "
            "check, or its prompts cannot be built",
        },
        503: {"model": ErrorBody, "description": "A stage service cannot be reached"},
        504: {"model": ErrorBody, "description": "The estimate passed its deadline and was stopped"},
    },
)
async def estimate(
    request: Request, principal: Caller, job: SubmittedJob, channels: Channels, settings: Settings
) -> EstimateView:
    """What a DistillationJob would cost, without running it: it is checked as a submit checks it
    (and refused the same way), then its prompts are built (deterministically, as the job will build
    them) and the teacher's answers to them priced. Teacher calls that prompt
    generation makes are real and cached, so the job itself does not pay for them again."""
    spec = job.to_document()["spec"]
    warnings = await preflight_warnings(channels, spec)
    try:
        estimated = await until_disconnected(
            request, estimate_job(channels, spec, principal.tenant, settings.estimate_timeout_seconds)
        )
    except EstimateFailed as exc:
        raise ApiError(503 if exc.retryable else 422, f"cannot estimate the job: {exc}") from exc
    except EstimateTimedOut as exc:
        raise ApiError(504, str(exc)) from exc
    return estimate_view(estimated, warnings)
