"""What the control plane runs while it serves: the job store, the channels to the stage services, the
orchestrator that drives jobs while this control plane leads (resuming the unfinished ones when it
takes the lead), the listener for what other control planes on the same PostgreSQL database write, the
listener that serves the metrics without a token on `metrics_port` and, when configured, the sweep that
deletes old jobs. Opened at startup onto `app.state`, closed at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import structlog
from fastapi import FastAPI

from stillhouse.common import database
from stillhouse.common.database_retry import RetryPolicy
from stillhouse.common.metrics_listener import start_metrics_listener
from stillhouse.control_plane.config import ControlPlaneSettings
from stillhouse.control_plane.dispatch import JobDispatch
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.job_removal import ExpirySweep
from stillhouse.control_plane.leadership import (
    DatabaseLease,
    Leadership,
    SoleLeader,
    lease_quarter_ms,
    new_holder_id,
)
from stillhouse.control_plane.notifications import (
    CANCEL_REQUESTED,
    EVENTS_WRITTEN,
    JOB_SUBMITTED,
    DatabaseListener,
)
from stillhouse.control_plane.orchestrator import Orchestrator, ServiceChannels
from stillhouse.control_plane.start_and_follow import FollowBounds
from stillhouse.control_plane.store import JobStore

log = structlog.get_logger(__name__)


def _dispatch(
    settings: ControlPlaneSettings, store: JobStore, channels: ServiceChannels, bus: JobEventBus
) -> JobDispatch:
    orchestrator = Orchestrator(
        store, channels, bus, progress_interval_seconds=settings.progress_event_interval_seconds
    )
    return JobDispatch(orchestrator, settings.job_poll_seconds)


def _shares_database(settings: ControlPlaneSettings) -> bool:
    """Whether other control planes may share this one's database (PostgreSQL), or none can (SQLite)."""
    return database.database_urls(settings.database_url)[0].get_backend_name() == "postgresql"


def _lease(settings: ControlPlaneSettings) -> DatabaseLease | None:
    """The orchestrator's lease, on a connection pool of its own (busy jobs never hold up a renewal)."""
    if not _shares_database(settings):
        return None
    engine = database.create_engine_for(settings.database_url)
    return DatabaseLease(engine, new_holder_id(), settings.leader_lease_seconds)


def _listener(
    settings: ControlPlaneSettings, dispatch: JobDispatch, bus: JobEventBus
) -> DatabaseListener | None:
    if not _shares_database(settings):
        return None
    handlers = {
        JOB_SUBMITTED: dispatch.job_submitted,
        CANCEL_REQUESTED: dispatch.cancel_requested,
        EVENTS_WRITTEN: lambda _job_id: bus.notify(),
    }
    return DatabaseListener(settings.database_url, handlers)


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
    store = await JobStore.open(
        settings.database_url,
        RetryPolicy(settings.database_retry_seconds),
        migrate_first=settings.migrate_at_start,
        idle_transaction_limit_ms=lease_quarter_ms(settings.leader_lease_seconds),
    )
    channels = ServiceChannels(
        settings.services.model_dump(), app.state.service_credentials, FollowBounds.of(settings)
    )
    bus = JobEventBus()
    lease = _lease(settings)
    dispatch = _dispatch(settings, store if lease is None else store.fenced(lease.fence), channels, bus)
    app.state.store, app.state.bus, app.state.dispatch = store, bus, dispatch
    app.state.channels = channels
    listener = _listener(settings, dispatch, bus)
    if listener is not None:
        listener.start()
    leadership = (
        SoleLeader(dispatch.lead, dispatch.follow)
        if lease is None
        else Leadership(lease, dispatch.lead, dispatch.follow)
    )
    await leadership.start()
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
        await leadership.stop()
        if listener is not None:
            await listener.stop()
        await channels.close()
        await store.close()
