"""How `stillhouse up` keeps its services running, as Kubernetes keeps a pod's containers running.

A service that exits is started again after a delay that doubles from `initial_backoff_seconds` up to
`max_backoff_seconds`, and starts from the beginning again once the service stayed up
`reset_after_seconds`. A service that stops answering its health check (a deadlock, a stopped process)
is killed after `probe_failure_threshold` failed checks in a row, one every `probe_period_seconds`, and
so restarted; one that never answers within `start_timeout_seconds` of a restart is killed too.

Read once from the environment (`STILLHOUSE_UP_*`). Pure: the supervisor does the starting and killing.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RestartPolicy(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STILLHOUSE_UP_", extra="ignore", frozen=True)

    initial_backoff_seconds: float = Field(default=1.0, gt=0, le=300)
    max_backoff_seconds: float = Field(default=30.0, gt=0, le=300)
    reset_after_seconds: float = Field(default=60.0, gt=0, le=3600)
    probe_period_seconds: float = Field(default=10.0, gt=0, le=300)
    probe_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    probe_failure_threshold: int = Field(default=3, ge=1, le=100)
    start_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)

    def backoff_seconds(self, crashes_in_a_row: int) -> float:
        """The delay before restarting a service that has now crashed `crashes_in_a_row` times (≥ 1)
        without staying up `reset_after_seconds` in between."""
        return min(self.max_backoff_seconds, self.initial_backoff_seconds * 2 ** max(0, crashes_in_a_row - 1))

    def crashes_in_a_row(self, previous: int, uptime_seconds: float) -> int:
        """The crash count after a crash that ended `uptime_seconds` of running."""
        return 1 if uptime_seconds >= self.reset_after_seconds else previous + 1
