"""The teacher stage of a job: ask the teacher every prompt of the prompts datasets, write the answers
datasets.

The stage runs as shards (`shards.py`): consecutive row ranges of the prompts dataset and of the holdout
dataset, each answered by one shard function, in this process or as Ray tasks on the cluster's CPU
workers (`fanout_for`, one switch: `TeacherSettings.fanout`). The stage service stays the control
surface: it plans the shards, reports their summed counters as its progress, and once every shard has
committed, commits the final answers, holdout answers and failures datasets from the shards' outcomes, in
prompt order. The final manifests name the Parquet files the shards wrote under the final datasets'
folders: nothing is copied. A re-run skips the shards already committed and pays only for prompts the
cache does not hold; the budget is the job's, shared by every shard (`budget.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import FAILURES_SCHEMA, answers_schema
from stillhouse.common.datasets.references import dataset_reference
from stillhouse.common.datasets.store import DatasetReader, commit_shards
from stillhouse.common.fanout.choice import fanout_for, plan_for, row_ranges
from stillhouse.common.fanout.plan import FanoutPlan, ShardFunction
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.operations import ProgressReporter
from stillhouse.common.v1 import operations_pb2
from stillhouse.teacher import call_metrics
from stillhouse.teacher.budget import budget_stopped_reason
from stillhouse.teacher.ledger import Budget, Ledger
from stillhouse.teacher.shards import SHARD_FUNCTION, ShardOutcome, ShardPayload
from stillhouse.teacher.v1 import teacher_pb2

log = structlog.get_logger(__name__)

# Shards answered at once in this process: the next shard's calls overlap the last answers of the one
# before, so that the teacher never idles at a shard's end. The teacher's own slots bound the calls.
LOCAL_PARALLEL_SHARDS = 2


@dataclass(frozen=True)
class _Input:
    dataset_id: str
    output: str  # "answers" or "holdout"
    rows: int


@dataclass(kw_only=True)
class AnswerPromptsStage:
    """One run of the teacher stage for one job."""

    store: ObjectStore
    spec: TeacherSpec
    job_id: str
    scope: str
    fanout: FanoutSettings
    progress: ProgressReporter
    _total_prompts: int = field(default=0, init=False)
    # What the shards have spent so far, as their counters say: for the running-budgets gauge.
    _spent: Ledger = field(default_factory=Ledger, init=False)

    def output_id(self, name: str) -> str:
        return f"jobs/{self.job_id}/teacher/{name}"

    async def run(
        self, operation_id: str, prompts_id: str, holdout_id: str, local_shards: ShardFunction
    ) -> teacher_pb2.AnswerPromptsResult:
        """Answer both datasets through the shards, on Ray or in this process (`local_shards`)."""
        inputs = await asyncio.to_thread(self._inputs, prompts_id, holdout_id)
        self._total_prompts = sum(item.rows for item in inputs)
        plan = self.plan(inputs)
        self.on_progress({})
        fanout = fanout_for(
            self.fanout, self._total_prompts, local_shards, local_parallel=LOCAL_PARALLEL_SHARDS
        )
        call_metrics.RUNNING_BUDGETS.began(Budget(self.spec.budget_usd), self._spent)
        try:
            results = await fanout.run(operation_id, plan, self.on_progress)
        finally:
            call_metrics.RUNNING_BUDGETS.ended(self._spent)
        return await asyncio.to_thread(self._commit, inputs, plan, results)

    def _inputs(self, prompts_id: str, holdout_id: str) -> list[_Input]:
        named = [(prompts_id, "answers")] + ([(holdout_id, "holdout")] if holdout_id else [])
        return [
            _Input(dataset_id, output, DatasetReader(self.store, dataset_id).manifest.num_rows)
            for dataset_id, output in named
        ]

    def plan(self, inputs: Sequence[_Input]) -> FanoutPlan:
        spec_json = self.spec.model_dump(mode="json", by_alias=True)
        shards = []
        for item in inputs:
            for rows in row_ranges(item.rows, self.fanout):
                index = len(shards)
                # The range is in the outcome's name: a plan cut differently never takes another's outcome.
                outcome_key = (
                    f"jobs/{self.job_id}/teacher/shard-outcomes/{item.output}-{rows.start}-{rows.stop}.json"
                )
                payload = ShardPayload(
                    index=index,
                    job_id=self.job_id,
                    spec=spec_json,
                    scope=self.scope,
                    input_id=item.dataset_id,
                    start=rows.start,
                    stop=rows.stop,
                    answers_id=self.output_id(item.output),
                    failures_id=self.output_id("failures"),
                    outcome_key=outcome_key,
                )
                shards.append(payload.to_json())
        return plan_for(self.fanout, SHARD_FUNCTION, shards)

    def on_progress(self, counters: dict[str, float]) -> None:
        """The shards' summed counters (`shards.shard_counters`) as the stage's progress."""
        budget_stopped = counters.get("budget_stops", 0.0) > 0 and self.spec.budget_usd is not None
        self._spent.cost_usd = counters.get("cost_usd", 0.0)
        metrics = {
            name: counters.get(name, 0.0)
            for name in (
                "teacher_calls",
                "cached_answers",
                "failed_prompts",
                "prompt_tokens",
                "completion_tokens",
                "cost_usd",
                "masked_alternatives",
                "top1_mismatches",
            )
        }
        self.progress.update(
            unit="prompts",
            done=int(counters.get("done", 0.0)),
            total=self._total_prompts,
            message=(
                budget_stopped_reason(self.spec.budget_usd or 0.0)
                if budget_stopped
                else f"asking {self.spec.model}"
            ),
            metrics=metrics,
        )

    # --- the final datasets -------------------------------------------------------------------------

    def _commit(
        self, inputs: Sequence[_Input], plan: FanoutPlan, results: Sequence[dict[str, Any]]
    ) -> teacher_pb2.AnswerPromptsResult:
        outcomes = [ShardOutcome.from_json(result) for result in results]
        answers_ids = [shard["answers_id"] for shard in plan.shards]
        outputs: dict[str, operations_pb2.DatasetRef] = {}
        for item in inputs:
            output_id = self.output_id(item.output)
            records = [
                record
                for outcome, answers_id in zip(outcomes, answers_ids, strict=True)
                if answers_id == output_id
                for record in outcome.answers
            ]
            lineage = Lineage(job_id=self.job_id, stage="teacher", input_ids=[item.dataset_id])
            committed = commit_shards(
                self.store, output_id, records, answers_schema(self.spec.top_logprobs), lineage
            )
            outputs[item.output] = dataset_reference(self.store, committed)
        failures = [record for outcome in outcomes for record in outcome.failures]
        if failures:
            lineage = Lineage(job_id=self.job_id, stage="teacher", input_ids=[inputs[0].dataset_id])
            commit_shards(self.store, self.output_id("failures"), failures, FAILURES_SCHEMA, lineage)
        ledger = Ledger()
        for outcome in outcomes:
            ledger.add(outcome.ledger)
        failed = sum(outcome.failed for outcome in outcomes)
        stopped_reason = next((o.stopped_reason for o in outcomes if o.stopped_reason), "")
        log.info(
            "teacher stage finished",
            job_id=self.job_id,
            prompts=self._total_prompts,
            shards=len(outcomes),
            failed=failed,
            cost_usd=round(ledger.cost_usd, 6),
            stopped_reason=stopped_reason or None,
        )
        return teacher_pb2.AnswerPromptsResult(
            answers=outputs["answers"],
            holdout_answers=outputs.get("holdout"),
            ledger=ledger.to_proto(),
            failed_prompts=failed,
            stopped_reason=stopped_reason,
        )
