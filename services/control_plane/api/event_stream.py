"""A job's events as server-sent events: read from the store, woken by the event bus."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header
from sse_starlette import EventSourceResponse, ServerSentEvent

from stillhouse.common.job_phases import Phase
from stillhouse.control_plane.api.dependencies import Caller, EventBus, Store, visible_job
from stillhouse.control_plane.api.errors import ApiError
from stillhouse.control_plane.api.job_ids import JobId
from stillhouse.control_plane.api.openapi import JOB_ROUTE_ERRORS
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.store import JobStore

# Seconds between two looks at the store while nothing has been announced (another process may write).
EVENT_POLL_SECONDS = 1.0
# Seconds between two keep-alive comments on an idle stream.
PING_SECONDS = 15

router = APIRouter(tags=["jobs"])


# Event ids are the store's 64-bit keys.
MAX_EVENT_ID = 2**63 - 1


def resume_after(last_event_id: str) -> int:
    """The event id a client resumes after, from its Last-Event-ID header; 400 for one this API never
    gave out."""
    try:
        event_id = int(last_event_id)
    except ValueError:
        event_id = -1
    if not 0 <= event_id <= MAX_EVENT_ID:
        shown = repr(last_event_id[:64])
        raise ApiError(
            400, f"Last-Event-ID must be an event id (an integer from 0 to {MAX_EVENT_ID}), not {shown}"
        )
    return event_id


async def _events(
    store: JobStore, bus: JobEventBus, job_id: str, after: int
) -> AsyncIterator[ServerSentEvent]:
    """The job's events after the id `after`, until the one that puts it in a final phase."""
    while True:
        events = await store.events_after(job_id, after)
        for event in events:
            after = event.id
            yield ServerSentEvent(data=json.dumps(event.data), event=event.type, id=str(event.id))
            if event.type == "phase" and Phase(event.data["phase"]).is_terminal:
                return
        if not events:
            await bus.wait(EVENT_POLL_SECONDS)


@router.get(
    "/v1/jobs/{job_id:job_id}/events",
    responses={**JOB_ROUTE_ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: JobId,
    principal: Caller,
    store: Store,
    bus: EventBus,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """Server-sent events: `phase`, `progress` and `error`, from the start (or after Last-Event-ID).

    The stream ends after the event that puts the job in a final phase.
    """
    await visible_job(store, principal, job_id)
    after = resume_after(last_event_id) if last_event_id else 0
    return EventSourceResponse(_events(store, bus, job_id, after), ping=PING_SECONDS)
