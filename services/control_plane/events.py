"""Wakes the readers of job event streams when new events are stored.

Events live in the store (so a reader can replay them and a restarted control plane keeps them); this
only saves readers from polling in between. Events another control plane writes wake it too, through the
database's notifications (`notifications`, PostgreSQL only); readers still poll now and then, in case a
notification was lost.
"""

from __future__ import annotations

import asyncio
import contextlib


class JobEventBus:
    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._version = 0

    def notify(self) -> None:
        self._version += 1
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._condition:
            self._condition.notify_all()

    async def wait(self, timeout: float) -> None:
        """Return after the next notification, or after `timeout` seconds."""
        seen = self._version
        async with self._condition:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._condition.wait_for(lambda: self._version != seen), timeout)
