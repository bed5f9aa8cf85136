"""The Prometheus metrics of jobs, recorded by the orchestrator where the events happen: each phase a job
enters (by tenant), each stage's time from its start to its end (by stage and outcome), and the stages
being followed now with how long each has gone without progress.

Labels are bounded: tenants come from the principals file, phases, stages and outcomes are enums; no job
id is a label. "Seconds since progress" is the most of any running stage of that stage kind, so a single
stalled job shows even while others progress.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stillhouse.common.job_phases import Phase, Stage

JOB_PHASE_TRANSITIONS = prometheus_client.Counter(
    "stillhouse_job_phase_transitions_total",
    "Jobs that entered a phase, by tenant and phase (Pending at submit, then each phase the orchestrator "
    "moves a job to).",
    ["tenant", "phase"],
)
STAGE_SECONDS = prometheus_client.Histogram(
    "stillhouse_stage_duration_seconds",
    "Time from a stage's start to its end, restarts of the control plane included, by stage and outcome "
    "(succeeded, failed, cancelled).",
    ["stage", "outcome"],
    buckets=(1, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200),
)
STAGE_PROGRESS_EVENTS = prometheus_client.Counter(
    "stillhouse_stage_progress_events_total",
    "Progress that a stage's service reported and the job recorded (heartbeats excluded), by stage.",
    ["stage"],
)


def entered_phase(tenant: str, phase: Phase) -> None:
    JOB_PHASE_TRANSITIONS.labels(tenant, phase.value).inc()


def stage_ended(stage: Stage, outcome: str, seconds: float) -> None:
    STAGE_SECONDS.labels(stage.value, outcome).observe(max(seconds, 0.0))


class RunningStages(Collector):
    """The stages this process follows now (one per job) and when each last reported progress."""

    def __init__(self) -> None:
        self._last_progress: dict[str, tuple[Stage, float]] = {}

    def began(self, job_id: str, stage: Stage) -> None:
        self._last_progress[job_id] = (stage, time.monotonic())

    def progressed(self, job_id: str, stage: Stage) -> None:
        # Only a stage still followed: a late report must not bring back one that has ended.
        if job_id in self._last_progress:
            self._last_progress[job_id] = (stage, time.monotonic())
        STAGE_PROGRESS_EVENTS.labels(stage.value).inc()

    def ended(self, job_id: str) -> None:
        self._last_progress.pop(job_id, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily(
            "stillhouse_stages_running", "Stages this control plane follows now, by stage.", labels=["stage"]
        )
        quiet = GaugeMetricFamily(
            "stillhouse_stage_seconds_since_progress",
            "Longest time any running stage of this kind has gone without reported progress, by stage.",
            labels=["stage"],
        )
        now = time.monotonic()
        for stage in Stage:
            times = [at for kind, at in list(self._last_progress.values()) if kind is stage]
            running.add_metric([stage.value], len(times))
            quiet.add_metric([stage.value], now - min(times) if times else 0.0)
        yield running
        yield quiet


RUNNING_STAGES = RunningStages()
prometheus_client.REGISTRY.register(RUNNING_STAGES)
