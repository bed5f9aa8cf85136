"""The phase changes of every job the caller may see, as server-sent events: what keeps a list of jobs
current without asking for it again (`phase_feed`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import APIRouter, Header
from sse_starlette import EventSourceResponse, ServerSentEvent

from stillhouse.common.api_models import ErrorBody
from stillhouse.control_plane.api.dependencies import Caller, EventBus, Store
from stillhouse.control_plane.api.event_stream import PING_SECONDS, resume_after
from stillhouse.control_plane.api.openapi import UNAUTHENTICATED
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.phase_feed import FeedCursor, phase_change, phase_events
from stillhouse.control_plane.principals import Principal
from stillhouse.control_plane.store import JobStore

log = structlog.get_logger(__name__)

router = APIRouter(tags=["jobs"])


async def _stream(
    store: JobStore, bus: JobEventBus, cursor: FeedCursor, principal: Principal
) -> AsyncIterator[ServerSentEvent]:
    tenant = None if principal.is_admin else principal.tenant
    log.info("event feed opened", principal=principal.name, after=cursor.position)
    try:
        async for event in phase_events(store, bus, cursor, tenant):
            data = phase_change(event).model_dump_json()
            yield ServerSentEvent(data=data, event="phase", id=str(event.id))
    finally:
        # The client went away, or the server is stopping: either way the stream's task is cancelled.
        log.info("event feed closed", principal=principal.name, position=cursor.position)


@router.get(
    "/v1/events",
    responses={
        **UNAUTHENTICATED,
        200: {
            "content": {"text/event-stream": {}},
            "description": "`phase` events, each with the store's event id and `PhaseChange` as its data",
        },
        400: {"model": ErrorBody, "description": "A Last-Event-ID that is not an event id"},
    },
)
async def all_job_events(
    principal: Caller,
    store: Store,
    bus: EventBus,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume after this event id.")
    ] = None,
) -> EventSourceResponse:
    """Server-sent events: a `phase` event (data: jobId, phase, message, at) each time a job the caller
    may see changes phase (a user: its tenant's jobs; an admin: every job). From now on, or after
    Last-Event-ID; keep-alive comments in between. The stream never ends by itself."""
    after = resume_after(last_event_id) if last_event_id else await store.newest_event_id()
    return EventSourceResponse(_stream(store, bus, FeedCursor(after), principal), ping=PING_SECONDS)
