"""A job's outcome in one place: prompts, what the teacher cost, training, and the evaluation's rows
and headline (the share of the unigram-to-teacher gap the student closes).

Pure: read from the results the stages returned, as their own messages (`stage_results`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stillhouse.common.headline import gap_closed_sentence, lead_sentence
from stillhouse.control_plane.stage_results import StageResults
from stillhouse.control_plane.store import StepRecord
from stillhouse.prompts.v1 import prompts_pb2
from stillhouse.teacher.v1 import teacher_pb2
from stillhouse.trainer.v1 import trainer_pb2

# The texts of a held-out answer sample that every evaluation has (the SFT control's only when trained).
SAMPLE_FIELDS = ("prompt_id", "prompt", "teacher", "baseline", "student")
LEAD_FIELDS = ("difference", "low", "high")
LEDGER_FIELDS = ("requests", "cached_requests", "prompt_tokens", "completion_tokens", "cost_usd")
# How the teacher's token ids were captured (the teacher ledger's counts).
CAPTURE_FIELDS = ("alternative_slots", "masked_alternatives", "top1_mismatches", "stop_tokens_added")
# The artifacts a summary names, for `pull`.
SUMMARY_ARTIFACTS = ("student", "report")


def _fields(message: Any, names: Iterable[str]) -> dict[str, Any]:
    return {name: getattr(message, name) for name in names}


def _prompts(result: prompts_pb2.GeneratePromptsResult) -> dict[str, Any]:
    return {
        "train": result.train.num_rows,
        "holdout": result.holdout.num_rows,
        "collected": result.collected,
        "removed_by_rule": dict(result.removed_by_rule),
        "generation": _fields(result.generation_ledger, LEDGER_FIELDS),
    }


def _teacher(result: teacher_pb2.AnswerPromptsResult) -> dict[str, Any]:
    return {
        **_fields(result.ledger, LEDGER_FIELDS + CAPTURE_FIELDS),
        "answers": result.answers.num_rows,
        "failed_prompts": result.failed_prompts,
        "stopped_reason": result.stopped_reason or None,
    }


def _training(result: trainer_pb2.TrainStudentResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "gpu_hours": result.gpu_hours,
        "final_metrics": dict(result.final_metrics),
        "curve": [_curve_point(point) for point in result.curve],
    }


def _curve_point(point: trainer_pb2.TrainingCurvePoint) -> dict[str, Any]:
    return {"model": point.model, "step": point.step, "metrics": dict(point.metrics)}


def _evaluation(result: trainer_pb2.EvaluateStudentResult) -> dict[str, Any]:
    gap_closed = dict(result.gap_closed_percent)
    evaluation = {
        "recovery_percent": result.recovery_percent,
        "gap_closed": gap_closed,
        "headline": gap_closed_sentence(gap_closed),
        "uniform": dict(result.uniform_metrics),
        "unigram": dict(result.unigram_metrics),
        "student": dict(result.student_metrics),
        "baseline": dict(result.baseline_metrics),
        "teacher": dict(result.teacher_metrics),
    }
    if result.control_sft_metrics:
        evaluation["control_sft"] = dict(result.control_sft_metrics)
    if result.control_sft_lead:
        evaluation["control_sft_lead"] = {
            metric: _fields(lead, LEAD_FIELDS) for metric, lead in result.control_sft_lead.items()
        }
        evaluation["control_sft_lead_sentence"] = lead_sentence(
            evaluation["control_sft_lead"], "the SFT control"
        )
    evaluation["samples"] = [
        # An empty answer of a trained control is an answer; without the control there is none.
        {
            **_fields(sample, SAMPLE_FIELDS),
            "control_sft": sample.control_sft if result.control_sft_metrics else None,
        }
        for sample in result.samples
    ]
    return evaluation


def _cost(results: StageResults) -> dict[str, float]:
    teacher_usd = results.teacher.ledger.cost_usd if results.teacher is not None else 0.0
    generation_usd = results.prompts.generation_ledger.cost_usd if results.prompts is not None else 0.0
    return {
        "teacher_usd": teacher_usd,
        "generation_usd": generation_usd,
        "total_usd": teacher_usd + generation_usd,
        "gpu_hours": results.train.gpu_hours if results.train is not None else 0.0,
    }


def job_summary(steps: Iterable[StepRecord]) -> dict[str, Any] | None:
    """The summary of the stages that succeeded so far (snake_case, for `JobSummary`); None before any."""
    results = StageResults.of(steps)
    if results.empty:
        return None
    summary: dict[str, Any] = {}
    if results.prompts is not None:
        summary["prompts"] = _prompts(results.prompts)
    if results.teacher is not None:
        summary["teacher"] = _teacher(results.teacher)
    if results.train is not None:
        summary["training"] = _training(results.train)
    if results.evaluate is not None:
        summary["evaluation"] = _evaluation(results.evaluate)
    artifacts = {name: results.artifact_id(name) for name in SUMMARY_ARTIFACTS}
    summary["artifacts"] = {name: artifact_id for name, artifact_id in artifacts.items() if artifact_id}
    summary["cost"] = _cost(results)
    return summary
