"""A job's outcome in one place: prompts, what the teacher cost, training, and the evaluation's rows
and headline (the share of the unigram-to-teacher gap the student closes).

Pure: read from the results the stages returned (proto field names, as `stage_calls.result_to_json`
stores them; 64-bit integers arrive as strings there, as protobuf's JSON mapping writes them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from stillhouse.control_plane.phases import Stage
from stillhouse.control_plane.store import StepRecord, StepState

LEDGER_FIELDS = ("requests", "cached_requests", "prompt_tokens", "completion_tokens")
# How the teacher's token ids were captured (the teacher ledger's counts).
CAPTURE_FIELDS = ("alternative_slots", "masked_alternatives", "top1_mismatches", "stop_tokens_added")


def _int(value: Any) -> int:
    return int(value or 0)


def _ledger(ledger: Mapping[str, Any] | None) -> dict[str, Any]:
    ledger = ledger or {}
    return {
        **{name: _int(ledger.get(name)) for name in LEDGER_FIELDS},
        "cost_usd": float(ledger.get("cost_usd", 0)),
    }


def _metrics(values: Mapping[str, Any] | None) -> dict[str, float]:
    return {name: float(value) for name, value in (values or {}).items()}


def _artifact(result: Mapping[str, Any] | None, field: str) -> str | None:
    return (result or {}).get(field, {}).get("artifact_id") or None


def job_summary(steps: Iterable[StepRecord]) -> dict[str, Any] | None:
    """The summary of the stages that succeeded so far (snake_case, for `JobSummary`); None before any."""
    results = {step.stage: step.result or {} for step in steps if step.state is StepState.SUCCEEDED}
    if not results:
        return None
    summary: dict[str, Any] = {}
    generation_usd = teacher_usd = 0.0
    if (prompts := results.get(Stage.PROMPTS)) is not None:
        generation = _ledger(prompts.get("generation_ledger"))
        generation_usd = generation["cost_usd"]
        summary["prompts"] = {
            "train": _int(prompts.get("train", {}).get("num_rows")),
            "holdout": _int(prompts.get("holdout", {}).get("num_rows")),
            "collected": _int(prompts.get("collected")),
            "removed_by_rule": {
                rule: _int(count) for rule, count in prompts.get("removed_by_rule", {}).items()
            },
            "generation": generation,
        }
    if (teacher := results.get(Stage.TEACHER)) is not None:
        ledger = _ledger(teacher.get("ledger"))
        teacher_usd = ledger["cost_usd"]
        capture = {name: _int((teacher.get("ledger") or {}).get(name)) for name in CAPTURE_FIELDS}
        summary["teacher"] = {
            **ledger,
            **capture,
            "answers": _int(teacher.get("answers", {}).get("num_rows")),
            "failed_prompts": _int(teacher.get("failed_prompts")),
            "stopped_reason": teacher.get("stopped_reason") or None,
        }
    gpu_hours = 0.0
    if (train := results.get(Stage.TRAIN)) is not None:
        gpu_hours = float(train.get("gpu_hours", 0))
        summary["training"] = {
            "steps": _int(train.get("steps")),
            "tokens": _int(train.get("tokens")),
            "gpu_hours": gpu_hours,
            "final_metrics": _metrics(train.get("final_metrics")),
        }
    if (evaluation := results.get(Stage.EVALUATE)) is not None:
        summary["evaluation"] = {
            "recovery_percent": float(evaluation.get("recovery_percent", 0)),
            "gap_closed": _metrics(evaluation.get("gap_closed_percent")),
            "uniform": _metrics(evaluation.get("uniform_metrics")),
            "unigram": _metrics(evaluation.get("unigram_metrics")),
            "student": _metrics(evaluation.get("student_metrics")),
            "baseline": _metrics(evaluation.get("baseline_metrics")),
            "teacher": _metrics(evaluation.get("teacher_metrics")),
        }
        if control := evaluation.get("control_sft_metrics"):
            summary["evaluation"]["control_sft"] = _metrics(control)
    summary["artifacts"] = {
        name: artifact_id
        for name, artifact_id in (
            # The published student once evaluated, else the trained one.
            ("student", _artifact(evaluation, "student") or _artifact(train, "student")),
            ("report", _artifact(evaluation, "report")),
        )
        if artifact_id
    }
    summary["cost"] = {
        "teacher_usd": teacher_usd,
        "generation_usd": generation_usd,
        "total_usd": teacher_usd + generation_usd,
        "gpu_hours": gpu_hours,
    }
    return summary
