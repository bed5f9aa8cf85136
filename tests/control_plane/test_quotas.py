"""What a tenant's quotas count, on hand-made usage (the store gathers it; see test_store_tenancy.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from stillhouse.common.job_phases import Phase, Stage
from stillhouse.control_plane.principals import TenantQuota
from stillhouse.control_plane.quotas import (
    BudgetRequired,
    QuotaExceeded,
    check_admission,
    counted_spend_usd,
    require_budget,
    start_of_day,
)
from stillhouse.control_plane.store import (
    EventRecord,
    JobActivity,
    JobRecord,
    StepRecord,
    StepState,
    TenantUsage,
)

NOW = datetime(2026, 12, 2, 15, 30, tzinfo=UTC)


def job(phase: Phase, budget: float | None = None) -> JobRecord:
    teacher = {"model": "deepseek-chat"} | ({"budgetUSD": budget} if budget is not None else {})
    return JobRecord(
        id="job-1",
        name="job-1",
        document={"spec": {"teacher": teacher}},
        labels={},
        phase=phase,
        message=None,
        cancel_requested=False,
        created_at=NOW,
        updated_at=NOW,
        tenant="team-a",
        owner="alice",
    )


def step(stage: Stage, state: StepState, result: dict | None = None) -> StepRecord:
    return StepRecord("job-1", stage, f"job-1.{stage}.1", state, 1, result, None, NOW, None)


def progress(stage: Stage, cost_usd: float) -> EventRecord:
    return EventRecord(9, "job-1", "progress", {"stage": stage.value, "metrics": {"cost_usd": cost_usd}}, NOW)


PROMPTS_DONE = step(Stage.PROMPTS, StepState.SUCCEEDED, {"generation_ledger": {"cost_usd": 0.5}})


@pytest.mark.parametrize(
    ("activity", "counted"),
    [
        # Finished: what its steps recorded, generation plus answering.
        (
            JobActivity(
                job(Phase.SUCCEEDED, budget=10),
                [PROMPTS_DONE, step(Stage.TEACHER, StepState.SUCCEEDED, {"ledger": {"cost_usd": 2.25}})],
                progress(Stage.EVALUATE, 0),
            ),
            2.75,
        ),
        # Failed in the teacher stage: what its last progress said it had spent.
        (
            JobActivity(
                job(Phase.FAILED, budget=10),
                [PROMPTS_DONE, step(Stage.TEACHER, StepState.FAILED)],
                progress(Stage.TEACHER, 3.0),
            ),
            3.5,
        ),
        # Running: its budget is reserved while it has spent less ...
        (
            JobActivity(
                job(Phase.TEACHER, budget=10),
                [PROMPTS_DONE, step(Stage.TEACHER, StepState.RUNNING)],
                progress(Stage.TEACHER, 3.0),
            ),
            10.5,
        ),
        # ... and what it has spent once that is more (a job from before the quota, without a budget).
        (
            JobActivity(
                job(Phase.TEACHER),
                [PROMPTS_DONE, step(Stage.TEACHER, StepState.RUNNING)],
                progress(Stage.TEACHER, 3.0),
            ),
            3.5,
        ),
        # Generating prompts: their cost so far, and the budget ahead.
        (
            JobActivity(
                job(Phase.PROMPTS, budget=4),
                [step(Stage.PROMPTS, StepState.RUNNING)],
                progress(Stage.PROMPTS, 1.25),
            ),
            5.25,
        ),
        # Cancelled before any stage ran: nothing.
        (JobActivity(job(Phase.CANCELLED, budget=10), [], None), 0.0),
    ],
    ids=[
        "succeeded",
        "failed-in-teacher",
        "running-under-budget",
        "running-no-budget",
        "generating",
        "cancelled",
    ],
)
def test_what_a_job_counts_against_the_day(activity: JobActivity, counted: float) -> None:
    assert counted_spend_usd(activity) == pytest.approx(counted)


def test_a_submit_is_refused_beyond_either_quota_naming_it() -> None:
    spent = JobActivity(
        job(Phase.SUCCEEDED), [step(Stage.TEACHER, StepState.SUCCEEDED, {"ledger": {"cost_usd": 7}})], None
    )
    usage = TenantUsage(unfinished_jobs=2, jobs_since=[spent])

    check_admission(
        TenantQuota(max_concurrent_jobs=3, max_teacher_spend_usd_per_day=10), "team-a", usage, 3.0
    )
    with pytest.raises(QuotaExceeded, match="'team-a' has 2 unfinished jobs, its maxConcurrentJobs is 2"):
        check_admission(TenantQuota(max_concurrent_jobs=2), "team-a", usage, None)
    with pytest.raises(
        QuotaExceeded, match=r"7\.00 USD .*budgetUSD of 3\.01 .*maxTeacherSpendUsdPerDay of 10\.00"
    ):
        check_admission(TenantQuota(max_teacher_spend_usd_per_day=10), "team-a", usage, 3.01)
    check_admission(TenantQuota(), "team-a", usage, None)


def test_a_budget_is_required_only_under_a_spend_quota() -> None:
    spec = {"teacher": {"model": "deepseek-chat"}}
    require_budget(TenantQuota(max_concurrent_jobs=1), "team-a", spec)
    require_budget(TenantQuota(max_teacher_spend_usd_per_day=5), "team-a", {"teacher": {"budgetUSD": 1}})
    with pytest.raises(BudgetRequired, match=r"spec\.teacher\.budgetUSD is required: tenant 'team-a'"):
        require_budget(TenantQuota(max_teacher_spend_usd_per_day=5), "team-a", spec)


def test_a_day_starts_at_midnight_utc() -> None:
    assert start_of_day(NOW) == datetime(2026, 12, 2, tzinfo=UTC)
    late_in_new_york = datetime.fromisoformat("2026-12-01T22:00:00-05:00")  # 03:00 UTC on the 2nd
    assert start_of_day(late_in_new_york) == datetime(2026, 12, 2, tzinfo=UTC)
