"""The outcome printed when a job ends: the evaluation table with its reference rows, the share of the
unigram-to-teacher gap the student closes, costs and where artifacts are."""

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
            "recoveryPercent": 27.2,
            "gapClosed": {"kl": 27.2, "top1_agreement": 14.89},
            "uniform": {"kl": 9.1, "perplexity": 49152.0},
            "unigram": {"kl": 5.0, "top1_agreement": 0.06, "perplexity": 900.0},
            "student": {"kl": 3.64, "top1_agreement": 0.2, "perplexity": 31.0},
            "baseline": {"kl": 15.0, "top1_agreement": 0.01, "perplexity": 90000.0},
            "controlSft": None,
            "teacher": {"kl": 0.0, "top1_agreement": 1.0, "perplexity": 1.8},
        },
        "artifacts": {"student": "jobs/job-1/student", "report": "jobs/job-1/evaluate/report"},
        "cost": {"teacherUsd": 0.0, "generationUsd": 0.0, "totalUsd": 0.0, "gpuHours": 0.0},
    },
}


def rendered(job: dict) -> list[str]:
    console = Console(width=160, record=True)
    console.print(job_outcome(job))
    return [
        " ".join(line.replace("│", " ").replace("┃", " ").split())
        for line in console.export_text().splitlines()
    ]


def test_outcome_shows_every_row_and_the_gap_closed_from_the_unigram() -> None:
    lines = rendered(JOB)
    assert "metric uniform unigram untrained student teacher" in lines, lines
    assert "kl 9.1 5 15 3.64 0" in lines, lines
    assert "top1_agreement - 0.06 0.01 0.2 1" in lines, lines  # the uniform has no top-1
    assert "perplexity 49,152 900 90,000 31 1.8" in lines, lines
    assert (
        "The student closes 27.2% of the gap from a context-free unigram to the teacher on held-out KL, "
        "14.9% on top-1 agreement."
    ) in lines
    assert "Teacher 278 calls (278 from the cache), 9,000 prompt + 17,000 completion tokens" in lines
    assert "Student jobs/job-1/student (stillhouse pull job-1 DIR --artifact student)" in lines


def test_the_sft_control_is_a_column_when_it_was_trained() -> None:
    evaluation = {**JOB["summary"]["evaluation"], "controlSft": {"kl": 3.79, "top1_agreement": 0.199}}
    lines = rendered({**JOB, "summary": {**JOB["summary"], "evaluation": evaluation}})
    assert "metric uniform unigram untrained SFT control student teacher" in lines, lines
    assert "kl 9.1 5 15 3.79 3.64 0" in lines, lines
    assert not any(line.startswith("Against the SFT control") for line in lines)


def test_the_lead_over_the_sft_control_is_told_with_its_intervals() -> None:
    lead = {
        "kl": {"difference": -0.15, "low": -0.21, "high": -0.09},
        "top1_agreement": {"difference": 0.001, "low": -0.012, "high": 0.013},
    }
    evaluation = {
        **JOB["summary"]["evaluation"],
        "controlSft": {"kl": 3.79, "top1_agreement": 0.199},
        "controlSftLead": lead,
    }
    text = " ".join(rendered({**JOB, "summary": {**JOB["summary"], "evaluation": evaluation}}))
    assert (
        "Against the SFT control, paired over the held-out answers: KL -0.150 (95% interval -0.210 to "
        "-0.090: ahead), top-1 agreement +0.001 (95% interval -0.012 to +0.013: no clear difference)."
    ) in text


def test_no_outcome_before_any_stage_finished() -> None:
    assert job_outcome({"id": "job-2", "summary": None}) is None
