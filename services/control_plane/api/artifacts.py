"""A job's artifacts (`student`, `baseline`, `report`): their files, each with a time-limited URL to
download it straight from object storage (`artifact_links`), and each file for a browser
(`artifact_download`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from stillhouse.common.api_models import ArtifactLinks, ArtifactName, ErrorBody
from stillhouse.control_plane.api.dependencies import Caller, Channels, Store, visible_job
from stillhouse.control_plane.api.errors import ApiError
from stillhouse.control_plane.api.job_ids import JobId
from stillhouse.control_plane.api.openapi import JOB_ROUTE_ERRORS
from stillhouse.control_plane.artifact_download import DownloadRefused, Redirect, download_of
from stillhouse.control_plane.artifact_links import (
    ArtifactUnavailable,
    artifact_file_link,
    artifact_links,
    object_key,
)
from stillhouse.control_plane.principals import Principal
from stillhouse.control_plane.stage_results import StageResults
from stillhouse.control_plane.store import JobStore

router = APIRouter(tags=["jobs"])

STORAGE_ERRORS = {
    502: {"model": ErrorBody, "description": "The storage service failed, or named an object it should not"},
    503: {"model": ErrorBody, "description": "The storage service cannot be reached"},
}


async def _artifact_id(store: JobStore, principal: Principal, job_id: str, name: ArtifactName) -> str:
    job = await visible_job(store, principal, job_id)
    artifact_id = StageResults.of(await store.steps(job_id)).artifact_id(name)
    if artifact_id is None:
        raise ApiError(404, f"job {job_id} has no {name.value} yet (phase {job.phase.value})")
    return artifact_id


@router.get(
    "/v1/jobs/{job_id:job_id}/artifacts/{name}",
    response_model=ArtifactLinks,
    responses={**JOB_ROUTE_ERRORS, **STORAGE_ERRORS},
)
async def job_artifact(
    job_id: JobId, name: ArtifactName, principal: Caller, store: Store, channels: Channels
) -> ArtifactLinks:
    """The files of one of the job's artifacts (`student`, `baseline`, `report`), each with a
    time-limited URL to download it straight from object storage, and its size and sha256."""
    artifact_id = await _artifact_id(store, principal, job_id, name)
    try:
        return await artifact_links(channels, artifact_id)
    except ArtifactUnavailable as exc:
        raise ApiError(exc.status, f"cannot list the {name.value} of job {job_id}: {exc}") from exc


@router.get(
    "/v1/jobs/{job_id:job_id}/artifacts/{name}/files/{path:path}",
    response_class=Response,
    responses={
        **JOB_ROUTE_ERRORS,
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The file (a local object store), as an attachment",
        },
        307: {"description": "The file's time-limited URL in object storage, in `Location`"},
        404: {
            "model": ErrorBody,
            "description": "No such job (or another tenant's), no such artifact yet, or no such file in it",
        },
        **STORAGE_ERRORS,
    },
)
async def job_artifact_file(
    job_id: JobId, name: ArtifactName, path: str, principal: Caller, store: Store, channels: Channels
) -> Response:
    """One file of one of the job's artifacts, for a browser: a redirect to its time-limited URL in
    object storage, or the file itself (as an attachment) when the object store is a local folder.
    `path` is a path the artifact's file list (`/artifacts/{name}`) gives, and nothing else."""
    artifact_id = await _artifact_id(store, principal, job_id, name)
    try:
        link = await artifact_file_link(channels, artifact_id, path)
    except ArtifactUnavailable as exc:
        raise ApiError(exc.status, f"cannot list the {name.value} of job {job_id}: {exc}") from exc
    if link is None:
        shown = path[:200]
        raise ApiError(
            404,
            f"the {name.value} of job {job_id} has no file {shown!r}; its files are listed by "
            f"/v1/jobs/{job_id}/artifacts/{name.value}",
        )
    try:
        download = download_of(link, object_key(artifact_id, link.path))
    except DownloadRefused as exc:
        raise ApiError(
            exc.status, f"cannot serve {path!r} of the {name.value} of job {job_id}: {exc}"
        ) from exc
    if isinstance(download, Redirect):
        return RedirectResponse(download.url, status_code=307, headers={"Cache-Control": "no-store"})
    return FileResponse(download.path, media_type="application/octet-stream", filename=download.filename)
