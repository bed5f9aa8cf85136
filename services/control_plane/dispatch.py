"""Hands jobs to the orchestrator while this control plane leads (`leadership`).

On the leader, a job submitted or cancelled through its own API reaches the orchestrator at once; one
submitted or cancelled through another control plane reaches it through the store: a database
notification wakes it (`notifications`), and a look at the store every `poll_seconds` picks up whatever
a lost notification left behind. A follower drives nothing: the store holds what it was asked.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from stillhouse.common.database_retry import describe
from stillhouse.control_plane.orchestrator import Orchestrator

log = structlog.get_logger(__name__)


class JobDispatch:
    def __init__(self, orchestrator: Orchestrator, poll_seconds: float) -> None:
        self._orchestrator = orchestrator
        self._poll_seconds = poll_seconds
        self._poller: asyncio.Task | None = None
        self.leading = False

    async def lead(self) -> None:
        """Take up driving: resume the unfinished jobs, then keep looking for new ones."""
        self.leading = True
        await self._orchestrator.resume_unfinished()
        self._poller = asyncio.create_task(self._poll(), name="job poll")

    async def follow(self) -> None:
        """Stop driving; the jobs stay as they are in the store for the next leader."""
        self.leading = False
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self._orchestrator.stop()

    def job_submitted(self, job_id: str) -> None:
        if self.leading:
            self._orchestrator.run(job_id)

    def cancel_requested(self, job_id: str) -> None:
        if self.leading:
            self._orchestrator.run(job_id)
            self._orchestrator.request_cancel(job_id)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self._orchestrator.resume_unfinished()
            except Exception as exc:  # the store is away for now: the next look tries again
                log.warning("cannot look for unfinished jobs", error=describe(exc))
