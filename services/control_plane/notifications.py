"""What the control planes sharing a PostgreSQL database tell each other, through LISTEN/NOTIFY.

The store sends a notification in the transaction that makes the change (so it arrives once the change
is committed), its payload the job's id: a job was submitted, its cancel was requested, or events of it
were written. Notifications are wake-ups only: one lost while a listener reconnects costs a delay, since
the leader also looks at the store every few seconds and event streams poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import psycopg
import structlog

from stillhouse.common.database import libpq_url

log = structlog.get_logger(__name__)

JOB_SUBMITTED = "stillhouse_job_submitted"
CANCEL_REQUESTED = "stillhouse_cancel_requested"
EVENTS_WRITTEN = "stillhouse_events_written"

# Seconds between two tries to (re)connect the listening connection.
RECONNECT_SECONDS = 2.0
# Seconds libpq waits for a connection, and the TCP keepalive that notices a silent peer.
CONNECT_TIMEOUT_SECONDS = 10
KEEPALIVE_IDLE_SECONDS = 10

JobHandler = Callable[[str], None]


class DatabaseListener:
    """Listens to `handlers`' channels on one connection of its own, calling the channel's handler with
    each notification's job id; reconnects when the connection breaks."""

    def __init__(self, database_url: str, handlers: Mapping[str, JobHandler]) -> None:
        self._url = libpq_url(database_url)
        self._handlers = dict(handlers)
        self._task: asyncio.Task | None = None
        self.listening = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_on(), name="database listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _listen_on(self) -> None:
        while True:
            try:
                await self._listen()
            except Exception as exc:  # a lost connection above all; whatever it was, listen again
                self.listening.clear()
                log.warning("database notifications interrupted; reconnecting", error=str(exc))
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self._url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            keepalives=1,
            keepalives_idle=KEEPALIVE_IDLE_SECONDS,
            keepalives_interval=KEEPALIVE_IDLE_SECONDS,
            keepalives_count=3,
        ) as connection:
            for channel in self._handlers:
                await connection.execute(f"LISTEN {channel}")
            self.listening.set()
            async for notification in connection.notifies():
                self._handlers[notification.channel](notification.payload)
