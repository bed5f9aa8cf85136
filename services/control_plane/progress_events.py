"""Which of the states a stage's service sends become the job's progress events.

A service sends its operation's state on every change and, unchanged, as a heartbeat; a re-attach
repeats it too. The job gets at most one event per interval (progress arrives faster), always the final
state, and never an event that repeats what the last one said.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from stillhouse.common.operations import FINAL_STATES
from stillhouse.common.v1 import operations_pb2


class ProgressEvents:
    """The progress events of one stage operation, written through `write`."""

    def __init__(
        self, write: Callable[[operations_pb2.Operation], Awaitable[None]], interval_seconds: float
    ) -> None:
        self._write = write
        self._interval = interval_seconds
        self._last_written_at = 0.0
        # What the last event said: its state and progress.
        self._last_said: tuple[int, bytes] | None = None

    async def seen(self, operation: operations_pb2.Operation) -> None:
        """Write `operation` as an event when it says something new and is final or due."""
        now = time.monotonic()
        final = operation.state in FINAL_STATES
        said = (operation.state, operation.progress.SerializeToString(deterministic=True))
        due = now - self._last_written_at >= self._interval
        if said != self._last_said and (final or due):
            self._last_written_at, self._last_said = now, said
            await self._write(operation)
