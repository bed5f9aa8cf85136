"""The job API of a Ray cluster: submit one job per operation, follow its progress lines, stop it, read why
it failed.

A job's submission id is `<operation id>-<attempt>`. Submitting for an operation first looks for its
attempts: a running one is re-attached to (a restarted service never starts the work twice), a stopped
or failed one is followed by the next attempt, which resumes from what the previous one left.

The program inside a job prints progress as `STILLHOUSE_PROGRESS {json}` lines and its failure as a
`STILLHOUSE_ERROR {json}` line; everything else in the logs is Ray's and the program's.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import tenacity
from ray.job_submission import JobStatus, JobSubmissionClient

from stillhouse.common.ray.cluster import check_reachable

PROGRESS_PREFIX = "STILLHOUSE_PROGRESS "
ERROR_PREFIX = "STILLHOUSE_ERROR "

_ACTIVE = frozenset({JobStatus.PENDING, JobStatus.RUNNING})
# Ray job submission ids: letters, digits, '-' and '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class JobEnd:
    submission_id: str
    status: JobStatus


def submission_id(operation_id: str, attempt: int) -> str:
    return f"{_UNSAFE.sub('_', operation_id)}-{attempt}"


def parse_progress(line: str) -> dict[str, Any] | None:
    """The progress record of a log line (worker lines carry Ray's `(RayTrainWorker pid=...)` prefix)."""
    _, found, payload = line.partition(PROGRESS_PREFIX)
    if not found:
        return None
    try:
        record = json.loads(payload)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def failure_reason(logs: str, fallback: str) -> str:
    """Why a job failed: the run's last STILLHOUSE_ERROR line, else the last line that names an error,
    else `fallback` (Ray's own message)."""
    payload = error_payload(logs)
    if payload is not None:
        message = error_field(payload, "message")
        return payload.strip() if message is None else message
    for line in reversed(logs.splitlines()):
        if re.search(r"(Error|Exception|Killed|out of memory)\b", line):
            return line.strip()
    return fallback


def error_payload(logs: str) -> str | None:
    """The JSON of the run's last STILLHOUSE_ERROR line; None when it printed none."""
    for line in reversed(logs.splitlines()):
        _, found, payload = line.partition(ERROR_PREFIX)
        if found:
            return payload
    return None


def error_field(payload: str, name: str) -> str | None:
    try:
        return str(json.loads(payload)[name])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _agent_not_ready(error: BaseException) -> bool:
    """Ray's answer to a submission that came before the head's job agent was up."""
    return isinstance(error, RuntimeError) and "No available agent to submit job" in str(error)


class RayJobs:
    """The job API of one Ray cluster. Blocking calls (HTTP via `requests`) belong on a worker thread;
    `follow` is a coroutine."""

    def __init__(
        self,
        address: str,
        *,
        headers: Mapping[str, str] | None = None,
        connect_timeout_seconds: float = 10.0,
        poll_seconds: float = 1.0,
        agent_wait_seconds: float = 60.0,
    ) -> None:
        self.address = address
        self._agent_wait_seconds = agent_wait_seconds
        self._headers = dict(headers or {})
        self._connect_timeout = connect_timeout_seconds
        self._poll_seconds = poll_seconds
        self._client: JobSubmissionClient | None = None

    def check_reachable(self) -> str:
        """Ray's version; RayUnreachable within the connect timeout when the cluster does not answer."""
        return check_reachable(self.address, self._connect_timeout, self._headers)

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            self.check_reachable()
            self._client = JobSubmissionClient(self.address, headers=self._headers)
        return self._client

    def submit(
        self,
        operation_id: str,
        command: str,
        env: Mapping[str, str],
        *,
        num_gpus: float = 0,
    ) -> str:
        """The submission id of the operation's running attempt, or of a new attempt submitted now."""
        attempt = 1
        while (info := self._info(submission_id(operation_id, attempt))) is not None:
            if info.status in _ACTIVE or info.status is JobStatus.SUCCEEDED:
                return info.submission_id
            attempt += 1
        # A head that has just started can answer before its job agent is up; it says to try again.
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_agent_not_ready),
            wait=tenacity.wait_exponential(multiplier=0.5, max=5),
            stop=tenacity.stop_after_delay(self._agent_wait_seconds),
            reraise=True,
        )
        return retrying(
            self.client.submit_job,
            entrypoint=command,
            submission_id=submission_id(operation_id, attempt),
            runtime_env={"env_vars": dict(env)},
            entrypoint_num_cpus=0,
            entrypoint_num_gpus=num_gpus or None,
            metadata={"stillhouse_operation_id": operation_id},
        )

    async def follow(
        self,
        sub_id: str,
        on_progress: Callable[[dict[str, Any]], None],
        finished: Callable[[], bool] = lambda: False,
    ) -> JobEnd:
        """Feed every progress record of the job to `on_progress` until the job ends, or until `finished`
        says the records received are all the caller needs (the job then counts as succeeded: what is
        left of it is its own shutdown)."""
        pending = ""
        try:
            async for chunk in self.client.tail_job_logs(sub_id):
                lines = (pending + chunk).split("\n")
                pending = lines.pop()
                for line in lines:
                    if (record := parse_progress(line)) is not None:
                        on_progress(record)
                if finished():
                    return JobEnd(sub_id, JobStatus.SUCCEEDED)
        except (RuntimeError, aiohttp.ClientError):
            pass  # the log stream broke (dashboard restarted, cluster gone); the job's status decides
        if (record := parse_progress(pending)) is not None:
            on_progress(record)
        while (status := await asyncio.to_thread(self.client.get_job_status, sub_id)) in _ACTIVE:
            await asyncio.sleep(self._poll_seconds)
        return JobEnd(sub_id, status)

    def stop(self, sub_id: str) -> None:
        self.client.stop_job(sub_id)

    def failure_logs(self, sub_id: str) -> tuple[str, str]:
        """Ray's own message on the ended job, and the job's logs ("" when they are gone)."""
        info = self.client.get_job_info(sub_id)
        fallback = info.message or f"the Ray job {sub_id} ended {info.status.value}"
        try:
            logs = self.client.get_job_logs(sub_id)
        except RuntimeError:
            logs = ""
        return fallback, logs

    def _info(self, sub_id: str):
        try:
            return self.client.get_job_info(sub_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return None
            raise
