"""A job's artifacts (`student`, `baseline`, `report`): their files, each with a time-limited URL to
download it straight from object storage (`artifact_links`)."""

from __future__ import annotations

from fastapi import APIRouter

from stillhouse.common.api_models import ArtifactLinks, ArtifactName, ErrorBody
from stillhouse.control_plane.api.dependencies import Caller, Channels, Store, visible_job
from stillhouse.control_plane.api.errors import ApiError
from stillhouse.control_plane.api.job_ids import JobId
from stillhouse.control_plane.api.openapi import JOB_ROUTE_ERRORS
from stillhouse.control_plane.artifact_links import ArtifactUnavailable, artifact_links
from stillhouse.control_plane.stage_results import StageResults

router = APIRouter(tags=["jobs"])


@router.get(
    "/v1/jobs/{job_id:job_id}/artifacts/{name}",
    response_model=ArtifactLinks,
    responses={
        **JOB_ROUTE_ERRORS,
        503: {"model": ErrorBody, "description": "The storage service cannot be reached"},
    },
)
async def job_artifact(
    job_id: JobId, name: ArtifactName, principal: Caller, store: Store, channels: Channels
) -> ArtifactLinks:
    """The files of one of the job's artifacts (`student`, `baseline`, `report`), each with a
    time-limited URL to download it straight from object storage, and its size and sha256."""
    job = await visible_job(store, principal, job_id)
    artifact_id = StageResults.of(await store.steps(job_id)).artifact_id(name)
    if artifact_id is None:
        raise ApiError(404, f"job {job_id} has no {name.value} yet (phase {job.phase.value})")
    try:
        return await artifact_links(channels, artifact_id)
    except ArtifactUnavailable as exc:
        raise ApiError(exc.status, f"cannot list the {name.value} of job {job_id}: {exc}") from exc
