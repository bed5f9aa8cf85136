"""The running stages a control plane follows, as its metrics show them: how many of each stage, and the
longest any of them has gone without progress."""

from __future__ import annotations

import time

from stillhouse.common.job_phases import Stage
from stillhouse.control_plane.job_metrics import RunningStages


def gauges(stages: RunningStages) -> dict[tuple[str, str], float]:
    return {
        (family.name, sample.labels["stage"]): sample.value
        for family in stages.collect()
        for sample in family.samples
    }


def test_a_quiet_stage_shows_beside_one_that_progresses() -> None:
    stages = RunningStages()
    stages.began("job-quiet", Stage.TEACHER)
    stages.began("job-busy", Stage.TEACHER)
    stages.began("job-train", Stage.TRAIN)
    time.sleep(0.2)
    stages.progressed("job-busy", Stage.TEACHER)
    stages.progressed("job-train", Stage.TRAIN)

    shown = gauges(stages)
    assert shown[("stillhouse_stages_running", "teacher")] == 2
    assert shown[("stillhouse_stages_running", "prompts")] == 0
    assert shown[("stillhouse_stage_seconds_since_progress", "teacher")] >= 0.2
    assert shown[("stillhouse_stage_seconds_since_progress", "train")] < 0.2

    stages.ended("job-quiet")
    shown = gauges(stages)
    assert shown[("stillhouse_stages_running", "teacher")] == 1
    assert shown[("stillhouse_stage_seconds_since_progress", "teacher")] < 0.2


def test_a_report_after_the_stage_ended_does_not_bring_it_back() -> None:
    stages = RunningStages()
    stages.began("job-1", Stage.PROMPTS)
    stages.ended("job-1")
    stages.progressed("job-1", Stage.PROMPTS)
    assert gauges(stages)[("stillhouse_stages_running", "prompts")] == 0
