"""The phase changes of every job a reader may see, as they are stored: what `/v1/events` streams.

Event ids grow, but only one job's events are sure to commit in id order. On PostgreSQL an event of one
job may commit a moment after a later event of another job has been read; a reader that only asked for
ids above the last one it saw would miss it. So the reader also looks back over the ids it passed in the
last `LOOK_BACK_SECONDS` (`FeedCursor`), and delivers each event it finds there that it has not yet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from stillhouse.common.api_models import PhaseChange
from stillhouse.control_plane.events import JobEventBus
from stillhouse.control_plane.store import EventRecord, JobStore

# Seconds between two looks at the store while nothing has been announced (another process may write).
POLL_SECONDS = 1.0
# How long after an id was passed an event below it may still commit: far longer than the transaction
# that writes an event.
LOOK_BACK_SECONDS = 10.0
# Events read at once.
BATCH = 500
PHASE_EVENTS = ("phase",)


@dataclass
class FeedCursor:
    """Which events a reader has delivered: the highest id (`position`); below it, every event up to
    `settled` (the position of `LOOK_BACK_SECONDS` ago) and those in `delivered_since_settled`."""

    position: int
    clock: Callable[[], float] = time.monotonic
    delivered_since_settled: set[int] = field(default_factory=set)
    _marks: deque[tuple[float, int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._marks.append((self.clock(), self.position))

    @property
    def settled(self) -> int:
        return self._marks[0][1]

    def is_new(self, event_id: int) -> bool:
        return event_id > self.settled and event_id not in self.delivered_since_settled

    def delivered(self, event_id: int) -> None:
        self.delivered_since_settled.add(event_id)
        self.position = max(self.position, event_id)

    def tick(self) -> None:
        """Note the position now; ids below the position of `LOOK_BACK_SECONDS` ago are settled."""
        now = self.clock()
        self._marks.append((now, self.position))
        while len(self._marks) > 1 and self._marks[1][0] <= now - LOOK_BACK_SECONDS:
            self._marks.popleft()
        settled = self.settled
        self.delivered_since_settled = {
            event_id for event_id in self.delivered_since_settled if event_id > settled
        }


def phase_change(event: EventRecord) -> PhaseChange:
    return PhaseChange(
        job_id=event.job_id, phase=event.data["phase"], message=event.data.get("message"), at=event.created_at
    )


async def phase_events(
    store: JobStore, bus: JobEventBus, cursor: FeedCursor, tenant: str | None
) -> AsyncIterator[EventRecord]:
    """Phase events after `cursor` (of `tenant`'s jobs, or of every job when None), as they come; never
    ends by itself."""
    while True:
        cursor.tick()
        late: list[EventRecord] = []
        if cursor.settled < cursor.position:
            late = await store.events_of_all_jobs(
                cursor.settled, types=PHASE_EVENTS, tenant=tenant, up_to_id=cursor.position, limit=BATCH
            )
        fresh = await store.events_of_all_jobs(
            cursor.position, types=PHASE_EVENTS, tenant=tenant, limit=BATCH
        )
        for event in [*late, *fresh]:
            if cursor.is_new(event.id):
                cursor.delivered(event.id)
                yield event
        if len(fresh) < BATCH:
            await bus.wait(POLL_SECONDS)
