"""Probes and metrics: `/healthz` (the process is up), `/readyz` (it can serve) and `/metrics`."""

from __future__ import annotations

import prometheus_client
from fastapi import APIRouter, Depends, Response
from fastapi.responses import PlainTextResponse

from stillhouse.common.api_models import HealthStatus
from stillhouse.control_plane.api.dependencies import Store, current_principal

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthStatus, response_model_exclude_none=True)
async def healthz() -> HealthStatus:
    """The process is up."""
    return HealthStatus(status="ok")


@router.get(
    "/readyz",
    response_model=HealthStatus,
    response_model_exclude_none=True,
    responses={503: {"model": HealthStatus, "description": "The job store does not answer"}},
)
async def readyz(store: Store, response: Response) -> HealthStatus:
    """The job store answers, so this control plane can serve; a follower (one that does not drive the
    jobs, see `leadership`) is as ready as the leader."""
    try:
        await store.ping()
    except Exception as exc:
        response.status_code = 503
        return HealthStatus(status="unavailable", reason=f"job store: {exc}")
    return HealthStatus(status="ok")


@router.get(
    "/metrics",
    dependencies=[Depends(current_principal)],
    response_class=PlainTextResponse,
    # The metrics are text; a refusal is JSON, as on every other route.
    responses={
        401: {
            "description": "Missing or invalid bearer token",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
    },
)
async def metrics() -> PlainTextResponse:
    """Prometheus metrics of this process."""
    return PlainTextResponse(
        prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST
    )
