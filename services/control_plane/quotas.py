"""Per-tenant quotas at submit: how many jobs may run at once, and what the teacher may cost a day.

Pure: the store hands `admit` the tenant's usage inside the transaction that stores the new job (see
`JobStore.create_job`), so the check and the insert are one step among the tenant's submits.

What counts against `maxTeacherSpendUsdPerDay`, for the jobs of the tenant submitted since 00:00 UTC
today (a job's spend counts on the day it was submitted, whenever it is spent):

- what each job's teacher calls have cost as the job recorded it: prompt generation (the prompts
  step's `generation_ledger`) plus answering (the teacher step's `ledger`); for a step that did not
  succeed, the cost its last progress event reported (that of its final state when it ended);
- for a job not yet in a final phase, its `teacher.budgetUSD` in place of the answering cost when that
  is larger, since the job may still spend up to it;
- and for the job being submitted, its `teacher.budgetUSD`, which a tenant with this quota must set.

Prompt generation is not bounded by `budgetUSD`, so it counts only as it is recorded. Estimates
(`POST /v1/jobs:estimate`) are not jobs and do not count.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from stillhouse.common.job_phases import Stage, StepState
from stillhouse.control_plane.principals import TenantQuota
from stillhouse.control_plane.store import JobActivity, TenantUsage

# Where each stage that calls the teacher records what its calls cost, in its result.
LEDGER_OF_STAGE = {Stage.PROMPTS: "generation_ledger", Stage.TEACHER: "ledger"}


class QuotaExceeded(Exception):
    """The submit would take the tenant beyond a quota; the message names the quota and the numbers."""


class BudgetRequired(ValueError):
    """The tenant has a spend quota and the job sets no `teacher.budgetUSD`."""


def start_of_day(now: datetime) -> datetime:
    """00:00 UTC of `now`'s day: where a day of spend begins."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def budget_of(spec: Mapping[str, Any]) -> float | None:
    """`spec.teacher.budgetUSD` of a job document's spec (camelCase, as stored)."""
    budget = spec.get("teacher", {}).get("budgetUSD")
    return None if budget is None else float(budget)


def require_budget(quota: TenantQuota, tenant: str, spec: Mapping[str, Any]) -> None:
    if quota.max_teacher_spend_usd_per_day is not None and budget_of(spec) is None:
        raise BudgetRequired(
            f"spec.teacher.budgetUSD is required: tenant {tenant!r} has a teacher spend quota "
            f"(maxTeacherSpendUsdPerDay {quota.max_teacher_spend_usd_per_day:g} USD)"
        )


def _recorded_usd(activity: JobActivity, stage: Stage) -> float:
    step = next((step for step in activity.steps if step.stage is stage), None)
    if step is None:
        return 0.0
    if step.state is StepState.SUCCEEDED:
        return float(((step.result or {}).get(LEDGER_OF_STAGE[stage]) or {}).get("cost_usd", 0))
    progress = activity.last_progress
    # Stages run one after another, so the job's latest progress is this step's unless a later one began.
    if progress is not None and progress.data.get("stage") == stage.value:
        return float((progress.data.get("metrics") or {}).get("cost_usd", 0))
    return 0.0


def counted_spend_usd(activity: JobActivity) -> float:
    """What one job counts against its tenant's day of teacher spend (see the module docstring)."""
    generation = _recorded_usd(activity, Stage.PROMPTS)
    answering = _recorded_usd(activity, Stage.TEACHER)
    if not activity.job.phase.is_terminal:
        answering = max(answering, budget_of(activity.job.document.get("spec", {})) or 0.0)
    return generation + answering


def check_admission(quota: TenantQuota, tenant: str, usage: TenantUsage, budget_usd: float | None) -> None:
    """Raise QuotaExceeded if one more job of `budget_usd` takes `tenant` beyond `quota`."""
    if quota.max_concurrent_jobs is not None and usage.unfinished_jobs >= quota.max_concurrent_jobs:
        raise QuotaExceeded(
            f"tenant {tenant!r} has {usage.unfinished_jobs} unfinished jobs, its maxConcurrentJobs is "
            f"{quota.max_concurrent_jobs}: wait for one to finish or cancel one"
        )
    limit = quota.max_teacher_spend_usd_per_day
    if limit is None:
        return
    counted = sum(counted_spend_usd(activity) for activity in usage.jobs_since)
    budget = budget_usd or 0.0
    if counted + budget > limit:
        raise QuotaExceeded(
            f"tenant {tenant!r} has spent or reserved {counted:.2f} USD of teacher calls today (UTC); this "
            f"job's teacher.budgetUSD of {budget:.2f} would exceed its maxTeacherSpendUsdPerDay of "
            f"{limit:.2f} USD"
        )
