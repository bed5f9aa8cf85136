"""The outcome printed when a job ends: the evaluation table, the recovery, costs and where artifacts are."""

from __future__ import annotations

from rich.console import Console

from stillhouse.cli.display import job_outcome

JOB = {
    "id": "job-1",
    "summary": {
        "prompts": {"train": 250, "holdout": 28, "collected": 300, "removedByRule": {}, "generation": {}},
        "teacher": {
            "requests": 278,
            "cachedRequests": 278,
            "promptTokens": 9000,
            "completionTokens": 17000,
            "costUsd": 0.0,
            "answers": 250,
            "failedPrompts": 0,
            "stoppedReason": None,
        },
        "training": {"steps": 40, "tokens": 51234, "gpuHours": 0.0, "finalMetrics": {"loss": 1.2}},
        "evaluation": {
            "recoveryPercent": 61.25,
            "student": {"kl_to_teacher": 0.41, "top1_agreement": 0.62},
            "baseline": {"kl_to_teacher": 1.06, "top1_agreement": 0.31},
            "teacher": {"kl_to_teacher": 0.0, "top1_agreement": 1.0},
        },
        "artifacts": {"student": "jobs/job-1/student", "report": "jobs/job-1/evaluate/report"},
        "cost": {"teacherUsd": 0.0, "generationUsd": 0.0, "totalUsd": 0.0, "gpuHours": 0.0},
    },
}


def rendered(job: dict) -> list[str]:
    console = Console(width=160, record=True)
    console.print(job_outcome(job))
    return [" ".join(line.replace("│", " ").split()) for line in console.export_text().splitlines()]


def test_outcome_compares_teacher_and_student_before_and_after() -> None:
    lines = rendered(JOB)
    assert any("kl_to_teacher 0 1.06 0.41" in line for line in lines), lines
    assert any("top1_agreement 1 0.31 0.62" in line for line in lines), lines
    assert "The student recovers 61.2% of the teacher." in lines
    assert "Teacher 278 calls (278 from the cache), 9,000 prompt + 17,000 completion tokens" in lines
    assert "Student jobs/job-1/student (stillhouse pull job-1 DIR --artifact student)" in lines


def test_no_outcome_before_any_stage_finished() -> None:
    assert job_outcome({"id": "job-2", "summary": None}) is None
