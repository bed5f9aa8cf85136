"""The job summary reads the stages' results as `stage_calls.result_to_json` stores them."""

from __future__ import annotations

from datetime import UTC, datetime

from stillhouse.common.api_models import EvaluationSummary, TeacherSummary, TrainingSummary
from stillhouse.common.job_phases import Stage, StepState
from stillhouse.control_plane.stage_calls import result_to_json
from stillhouse.control_plane.store import StepRecord
from stillhouse.control_plane.summary import job_summary
from stillhouse.teacher.ledger import Ledger
from stillhouse.teacher.v1 import teacher_pb2
from stillhouse.trainer.v1 import trainer_pb2


def _succeeded(stage: Stage, result) -> StepRecord:
    return StepRecord(
        job_id="job",
        stage=stage,
        operation_id=f"op-{stage}",
        state=StepState.SUCCEEDED,
        attempt=1,
        result=result_to_json(result),
        error=None,
        started_at=datetime.now(UTC),
        finished_at=datetime.now(UTC),
    )


def test_the_teacher_summary_reports_how_token_ids_were_captured():
    ledger = Ledger(
        requests=3,
        prompt_tokens=30,
        completion_tokens=12,
        alternative_slots=60,
        masked_alternatives=7,
        top1_mismatches=1,
        stop_tokens_added=2,
    )
    result = teacher_pb2.AnswerPromptsResult(ledger=ledger.to_proto(), failed_prompts=1)

    teacher = job_summary([_succeeded(Stage.TEACHER, result)])["teacher"]

    assert (teacher["alternative_slots"], teacher["masked_alternatives"]) == (60, 7)
    assert (teacher["top1_mismatches"], teacher["stop_tokens_added"]) == (1, 2)
    assert teacher["failed_prompts"] == 1 and teacher["requests"] == 3
    assert TeacherSummary.model_validate(teacher).masked_alternatives == 7


SAMPLES = [
    trainer_pb2.AnswerSample(
        prompt_id="p-1",
        prompt="Why is the sky blue?",
        teacher="Rayleigh.",
        baseline="sky sky",
        student="Light.",
    ),
    trainer_pb2.AnswerSample(prompt_id="p-2", prompt="Name a prime.", teacher="7", baseline="", student="7"),
]


def test_the_evaluation_summary_carries_the_answers_side_by_side():
    result = trainer_pb2.EvaluateStudentResult(
        recovery_percent=40.0, student_metrics={"kl": 1.0}, teacher_metrics={"kl": 0.0}, samples=SAMPLES
    )

    evaluation = job_summary([_succeeded(Stage.EVALUATE, result)])["evaluation"]

    assert evaluation["samples"] == [
        {
            "prompt_id": "p-1",
            "prompt": "Why is the sky blue?",
            "teacher": "Rayleigh.",
            "baseline": "sky sky",
            "student": "Light.",
            "control_sft": None,
        },
        {
            "prompt_id": "p-2",
            "prompt": "Name a prime.",
            "teacher": "7",
            "baseline": "",
            "student": "7",
            "control_sft": None,
        },
    ]
    samples = EvaluationSummary.model_validate(evaluation).samples
    assert [(sample.prompt_id, sample.baseline, sample.control_sft) for sample in samples] == [
        ("p-1", "sky sky", None),
        ("p-2", "", None),
    ]


def test_a_trained_sft_control_answers_even_when_its_answer_is_empty():
    answered = trainer_pb2.AnswerSample()
    answered.CopyFrom(SAMPLES[0])
    answered.control_sft = "Scattering."
    samples = [answered, SAMPLES[1]]  # the control's answer to the second prompt is empty
    result = trainer_pb2.EvaluateStudentResult(
        student_metrics={"kl": 1.0}, control_sft_metrics={"kl": 0.5}, samples=samples
    )

    evaluation = job_summary([_succeeded(Stage.EVALUATE, result)])["evaluation"]

    assert [sample["control_sft"] for sample in evaluation["samples"]] == ["Scattering.", ""]
    assert [sample.control_sft for sample in EvaluationSummary.model_validate(evaluation).samples] == [
        "Scattering.",
        "",
    ]


def test_the_lead_over_the_sft_control_comes_through_typed():
    lead = trainer_pb2.PairedLead(difference=-0.25, low=-0.5, high=0.125)
    result = trainer_pb2.EvaluateStudentResult(
        student_metrics={"kl": 1.0}, control_sft_metrics={"kl": 1.25}, control_sft_lead={"kl": lead}
    )

    evaluation = job_summary([_succeeded(Stage.EVALUATE, result)])["evaluation"]

    assert evaluation["control_sft_lead"] == {"kl": {"difference": -0.25, "low": -0.5, "high": 0.125}}
    assert EvaluationSummary.model_validate(evaluation).control_sft_lead["kl"].high == 0.125
    assert evaluation["control_sft_lead_sentence"] == (
        "Against the SFT control, paired over the held-out answers: KL -0.250 (95% interval -0.500 to "
        "+0.125: no clear difference)."
    )
    no_control = trainer_pb2.EvaluateStudentResult(student_metrics={"kl": 1.0})
    summary = EvaluationSummary.model_validate(
        job_summary([_succeeded(Stage.EVALUATE, no_control)])["evaluation"]
    )
    assert summary.control_sft_lead is None and summary.control_sft_lead_sentence == ""


def test_the_headline_comes_in_the_words_of_the_report_for_either_kind_of_student():
    same_vocabulary = trainer_pb2.EvaluateStudentResult(
        gap_closed_percent={"kl": 80.25, "top1_agreement": 49.5}
    )
    other_vocabulary = trainer_pb2.EvaluateStudentResult(gap_closed_percent={"token_f1": 12.0})

    headlines = [
        EvaluationSummary.model_validate(
            job_summary([_succeeded(Stage.EVALUATE, result)])["evaluation"]
        ).headline
        for result in (same_vocabulary, other_vocabulary)
    ]

    assert headlines == [
        "The student closes 80.2% of the gap from a context-free unigram to the teacher on held-out KL, "
        "49.5% on top-1 agreement.",
        "The student closes 12.0% of the gap from a context-free unigram to the teacher on the token F1 of "
        "its greedy answers (KL and top-1 agreement are not defined here).",
    ]


def test_an_evaluation_without_samples_has_none():
    result = trainer_pb2.EvaluateStudentResult(student_metrics={"kl": 1.0}, teacher_metrics={"kl": 0.0})
    evaluation = job_summary([_succeeded(Stage.EVALUATE, result)])["evaluation"]
    assert evaluation["samples"] == [] and EvaluationSummary.model_validate(evaluation).samples == []


def test_the_training_summary_carries_the_whole_curve_of_each_model_in_order():
    def point(model: str, step: int, loss: float) -> trainer_pb2.TrainingCurvePoint:
        return trainer_pb2.TrainingCurvePoint(model=model, step=step, metrics={"loss": loss, "kd": loss / 2})

    curve = [point("student", 1, 3.0), point("student", 2, 2.5), point("control-sft", 1, 3.25)]
    result = trainer_pb2.TrainStudentResult(steps=2, tokens=10, curve=curve)

    training = TrainingSummary.model_validate(job_summary([_succeeded(Stage.TRAIN, result)])["training"])

    assert [(entry.model, entry.step, entry.metrics["loss"]) for entry in training.curve] == [
        ("student", 1, 3.0),
        ("student", 2, 2.5),
        ("control-sft", 1, 3.25),
    ]
    assert training.curve[1].metrics == {"loss": 2.5, "kd": 1.25}
    before_curves = trainer_pb2.TrainStudentResult(steps=2, tokens=10)  # a result stored before curves
    summary = job_summary([_succeeded(Stage.TRAIN, before_curves)])
    assert TrainingSummary.model_validate(summary["training"]).curve == []
