"""What the control plane runs while it serves: the job store, the channels to the stage services, the
orchestrator that drives jobs (resuming the unfinished ones at start) and, when configured, the sweep
that deletes old jobs and the listener that serves the metrics without a token on `metrics_port`. Opened
at startup onto `app.state`, closed at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import structlog
from fastapi import FastAPI

from stillhouse.common.database_retry import RetryPolicy
from stillhouse.common.metrics_listener import start_metrics_listener
from stillhouse.control_plane.config import ControlPlaneSettings
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.job_removal import ExpirySweep
from stillhouse.control_plane.orchestrator import Orchestrator, ServiceChannels
from stillhouse.control_plane.start_and_follow import FollowBounds
from stillhouse.control_plane.store import JobStore

log = structlog.get_logger(__name__)


def _orchestrator(
    settings: ControlPlaneSettings, store: JobStore, channels: ServiceChannels, bus: JobEventBus
) -> Orchestrator:
    return Orchestrator(
        store, channels, bus, progress_interval_seconds=settings.progress_event_interval_seconds
    )


def _expiry_sweep(
    settings: ControlPlaneSettings, store: JobStore, channels: ServiceChannels
) -> ExpirySweep | None:
    if settings.finished_job_max_age_hours is None:
        return None
    return ExpirySweep(
        store,
        channels,
        max_age=timedelta(hours=settings.finished_job_max_age_hours),
        interval_seconds=settings.expiry_sweep_interval_seconds,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open what the app serves with from `app.state.settings` and `app.state.service_credentials`."""
    settings: ControlPlaneSettings = app.state.settings
    store = await JobStore.open(settings.database_url, RetryPolicy(settings.database_retry_seconds))
    channels = ServiceChannels(
        settings.services.model_dump(), app.state.service_credentials, FollowBounds.of(settings)
    )
    bus = JobEventBus()
    orchestrator = _orchestrator(settings, store, channels, bus)
    app.state.store, app.state.bus, app.state.orchestrator = store, bus, orchestrator
    app.state.channels = channels
    await orchestrator.resume_unfinished()
    sweep = _expiry_sweep(settings, store, channels)
    if sweep is not None:
        sweep.start()
    metrics = None
    try:
        if settings.metrics_port is not None:
            metrics = start_metrics_listener(settings.host, settings.metrics_port)
        log.info(
            "control plane ready",
            address=f"{settings.host}:{settings.port}",
            metrics_port=metrics.port if metrics else None,
        )
        yield
    finally:
        if metrics is not None:
            metrics.close()
        if sweep is not None:
            await sweep.stop()
        await orchestrator.stop()
        await channels.close()
        await store.close()
