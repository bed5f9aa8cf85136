"""Validating a DistillationJob without submitting it: the schema and the input roots only, fast enough
to be asked as the user types (the submit-time check of the models it names is the submit's)."""

from __future__ import annotations

from fastapi import APIRouter

from stillhouse.common.api_models import ErrorBody, SpecValidation
from stillhouse.control_plane.api.dependencies import Caller
from stillhouse.control_plane.api.openapi import BODY_ERRORS, UNAUTHENTICATED
from stillhouse.control_plane.api.submitted_job import SubmittedJob

router = APIRouter(tags=["jobs"])


@router.post(
    "/v1/jobs:validate",
    response_model=SpecValidation,
    responses={
        **UNAUTHENTICATED,
        **BODY_ERRORS,
        403: {"model": ErrorBody, "description": "A console session's call without its header"},
        422: {
            "model": ErrorBody,
            "description": "The spec breaks the schema, or names a local input outside the input roots; "
            "each error names its field and the line of the text it is on",
        },
    },
)
async def validate_job(principal: Caller, job: SubmittedJob) -> SpecValidation:
    """Check a DistillationJob, as JSON or YAML, as a submit checks it first (the schema, then the input
    roots), and nothing more: nothing is stored, no service is asked. A spec that fails is refused with
    the same 422 as a submit, each field error with its `line` in the text sent."""
    return SpecValidation(valid=True, warnings=[])
