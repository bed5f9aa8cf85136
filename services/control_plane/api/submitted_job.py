"""A DistillationJob sent to submit or estimate: read from the body (JSON or YAML), checked against the
schema and the input roots, then by the submit-time check (`preflight`), before anything is paid."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import ValidationError

from stillhouse.common.api_models import FieldError
from stillhouse.common.input_roots import InputRefused, check_prompt_inputs
from stillhouse.common.jobspec import DistillationJob
from stillhouse.control_plane.api.dependencies import Roots
from stillhouse.control_plane.api.errors import SPEC_TEXT, ApiError, invalid
from stillhouse.control_plane.orchestrator import ServiceChannels
from stillhouse.control_plane.preflight import PreflightRefused, PreflightUnavailable, check_job
from stillhouse.control_plane.spec_body import BodyRefused, parse_document, read_capped
from stillhouse.control_plane.views import field_errors, preflight_errors


async def job_from_body(request: Request, roots: Roots) -> DistillationJob:
    """The DistillationJob in the request body; a 422 names its errors: those of the schema, or a local
    input outside the input roots. The text is kept on the request (`SPEC_TEXT`), so that any 422 about
    the spec can say on which line each field sits."""
    try:
        raw = await read_capped(request.stream(), request.headers.get("content-length"))
        document = parse_document(request.headers.get("content-type", ""), raw)
    except BodyRefused as refused:
        raise ApiError(refused.status, refused.message) from None
    setattr(request.state, SPEC_TEXT, raw.decode("utf-8", errors="replace"))
    if not isinstance(document, dict):
        raise ApiError(422, "the body must be a DistillationJob object (apiVersion, kind, metadata, spec)")
    try:
        job = DistillationJob.model_validate(document)
    except ValidationError as exc:
        raise invalid("DistillationJob", field_errors(exc.errors(include_url=False))) from None
    try:
        check_prompt_inputs(job.spec.prompts, roots)
    except InputRefused as refused:
        error = FieldError(field=refused.field, message=refused.message, type="input_root")
        raise ApiError(422, str(refused), errors=[error]) from None
    return job


SubmittedJob = Annotated[DistillationJob, Depends(job_from_body)]


async def preflight_warnings(channels: ServiceChannels, spec: Mapping[str, Any]) -> list[FieldError]:
    """What the submit-time check found that does not stop the job; a 422 names the fields it refuses,
    a 503 says it could not be made."""
    try:
        checked = await check_job(channels, spec)
    except PreflightRefused as exc:
        raise ApiError(422, f"invalid DistillationJob: {exc}") from exc
    except PreflightUnavailable as exc:
        raise ApiError(503, str(exc)) from exc
    if checked.violations:
        raise invalid("DistillationJob", preflight_errors(checked.violations))
    return preflight_errors(checked.warnings)
