"""The job summary reads the teacher stage's result as `stage_calls.result_to_json` stores it."""

from __future__ import annotations

from datetime import UTC, datetime

from stillhouse.common.api_models import TeacherSummary
from stillhouse.common.job_phases import Stage, StepState
from stillhouse.control_plane.stage_calls import result_to_json
from stillhouse.control_plane.store import StepRecord
from stillhouse.control_plane.summary import job_summary
from stillhouse.teacher.ledger import Ledger
from stillhouse.teacher.v1 import teacher_pb2


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
    step = StepRecord(
        job_id="job",
        stage=Stage.TEACHER,
        operation_id="op",
        state=StepState.SUCCEEDED,
        attempt=1,
        result=result_to_json(result),
        error=None,
        started_at=datetime.now(UTC),
        finished_at=datetime.now(UTC),
    )

    teacher = job_summary([step])["teacher"]

    assert (teacher["alternative_slots"], teacher["masked_alternatives"]) == (60, 7)
    assert (teacher["top1_mismatches"], teacher["stop_tokens_added"]) == (1, 2)
    assert teacher["failed_prompts"] == 1 and teacher["requests"] == 3
    assert TeacherSummary.model_validate(teacher).masked_alternatives == 7
