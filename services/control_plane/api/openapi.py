"""What the OpenAPI document says beyond what FastAPI derives from the routes: the job body, which the
handlers parse themselves to accept YAML as well as JSON, and the refusals that routes share."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from stillhouse.common.api_models import ErrorBody
from stillhouse.common.jobspec import DistillationJob
from stillhouse.control_plane.spec_body import MAX_DEPTH, MAX_EXPANDED_VALUES, MAX_SPEC_BYTES

# The routes that take a DistillationJob as their body.
JOB_BODY_PATHS = ("/v1/jobs", "/v1/jobs:estimate", "/v1/jobs:validate")

UNAUTHENTICATED = {401: {"model": ErrorBody, "description": "Missing or invalid bearer token"}}
JOB_ROUTE_ERRORS = {
    **UNAUTHENTICATED,
    404: {"model": ErrorBody, "description": "No such job, or another tenant's (users see their own)"},
}
PAGE_TOKEN_ERRORS = {
    400: {"model": ErrorBody, "description": "A pageToken this API did not give out"},
}
BODY_ERRORS = {
    400: {
        "model": ErrorBody,
        "description": f"Unparseable body, nested more than {MAX_DEPTH} levels, or expanding (YAML "
        f"aliases) to more than {MAX_EXPANDED_VALUES} values",
    },
    413: {"model": ErrorBody, "description": f"Body larger than {MAX_SPEC_BYTES} bytes"},
    415: {"model": ErrorBody, "description": "Unsupported content type"},
}


def openapi_with_job_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, with the DistillationJob schema as the body of JOB_BODY_PATHS."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    job_schema = DistillationJob.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(job_schema.pop("$defs", {}))
    components["DistillationJob"] = job_schema
    reference = {"schema": {"$ref": "#/components/schemas/DistillationJob"}}
    for path in JOB_BODY_PATHS:
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": reference, "application/yaml": reference},
        }
    app.openapi_schema = schema
    return schema
