"""The teacher stage of a job: ask the teacher every prompt of the prompts datasets, write the answers
datasets.

The prompts are read in order and answered by a sliding window of concurrent calls, so the answers
dataset keeps the prompts' order. Every call goes through the cache first: a resumed or repeated stage
pays only for what was never answered. Calls start only while the budget allows them; once it does not,
the stage finishes what is in flight, commits what it has and says why it stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
import pyarrow as pa
import structlog

from stillhouse.common.datasets.manifest import DatasetManifest, Lineage, manifest_key, manifest_sha256
from stillhouse.common.datasets.records import FAILURES_SCHEMA, answers_schema
from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs, rows_to_arrow
from stillhouse.common.datasets.store import DatasetReader, DatasetWriter
from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.operations import OperationError, ProgressReporter
from stillhouse.common.v1 import operations_pb2
from stillhouse.teacher import call_metrics
from stillhouse.teacher.cache import CacheWriter, TeacherCache
from stillhouse.teacher.calls import ChatMessage, FailureKind, TeacherAnswer, TeacherCall, TeacherCallError
from stillhouse.teacher.estimate import call_estimate_usd, prompt_tokens
from stillhouse.teacher.ledger import Budget, Ledger, Price
from stillhouse.teacher.v1 import teacher_pb2

log = structlog.get_logger(__name__)

# Failures after which every other call would fail the same way: the stage stops with this status.
FATAL_FAILURES = {
    FailureKind.UNAUTHENTICATED: grpc.StatusCode.FAILED_PRECONDITION,
    FailureKind.MODEL_NOT_FOUND: grpc.StatusCode.FAILED_PRECONDITION,
    FailureKind.CIRCUIT_OPEN: grpc.StatusCode.UNAVAILABLE,
    FailureKind.UNREACHABLE: grpc.StatusCode.UNAVAILABLE,
    FailureKind.EGRESS_REFUSED: grpc.StatusCode.PERMISSION_DENIED,
}
# Prompts read and looked up in the cache at once.
READ_CHUNK_ROWS = 512
# Rows handed to the dataset writer at once.
WRITE_CHUNK_ROWS = 512
PROGRESS_INTERVAL_SECONDS = 0.5


class Teacher(Protocol):
    async def answer(self, call: TeacherCall, estimated_tokens: int) -> TeacherAnswer: ...


@dataclass
class StageTotals:
    ledger: Ledger = field(default_factory=Ledger)
    failed: int = 0
    done: int = 0
    stopped_reason: str = ""
    in_flight_usd: float = 0.0


def call_for(spec: TeacherSpec, messages: Sequence[dict[str, str]], *, scope: str) -> TeacherCall:
    """The call that asks `messages` of the teacher of `spec`, cached within `scope` (`cache_scope`)."""
    return TeacherCall(
        backend=spec.backend.value,
        base_url=spec.base_url or "",
        model=spec.model,
        revision=spec.revision or "",
        messages=tuple(ChatMessage(role=m["role"], content=m["content"]) for m in messages),
        temperature=spec.sampling.temperature,
        top_p=spec.sampling.top_p,
        max_tokens=spec.sampling.max_tokens,
        seed=spec.sampling.seed,
        top_logprobs=spec.top_logprobs,
        extra_body=tuple(sorted(spec.sampling.extra_body.items())),
        scope=scope,
    )


def no_logprobs(k: int) -> SparseLogprobs:
    """What an answer without logprobs (k = 0, or a teacher that gave none) stores: zero tokens."""
    return SparseLogprobs(
        token_ids=np.zeros(0, np.int32),
        topk_ids=np.zeros((0, k), np.int32),
        topk_logprobs=np.zeros((0, k), np.float32),
        tail_logprob=np.zeros(0, np.float32),
    )


def answers_table(
    rows: list[dict[str, Any]], answers: list[TeacherAnswer], schema: pa.Schema, k: int
) -> pa.Table:
    logprobs = rows_to_arrow([answer.logprobs or no_logprobs(k) for answer in answers], k)
    columns = {
        "prompt_id": [row["prompt_id"] for row in rows],
        "messages": [row["messages"] for row in rows],
        "response": [answer.text for answer in answers],
        "finish_reason": [answer.finish_reason for answer in answers],
        "prompt_tokens": [answer.prompt_tokens for answer in answers],
        "completion_tokens": [answer.completion_tokens for answer in answers],
        "latency_seconds": [answer.latency_seconds for answer in answers],
        "token_id_source": [answer.token_id_source.value for answer in answers],
        "masked_alternatives": [answer.masked_alternatives for answer in answers],
        "top1_mismatches": [answer.top1_mismatches for answer in answers],
        "stop_token_added": [answer.stop_token_added for answer in answers],
        **logprobs,
    }
    return pa.Table.from_pydict(columns, schema=schema)


class AnswerPromptsRun:
    """One run of the teacher stage for one job."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        cache: TeacherCache,
        teacher: Teacher,
        spec: TeacherSpec,
        price: Price,
        job_id: str,
        progress: ProgressReporter,
        scope: str,
    ) -> None:
        self._store = store
        self._cache = cache
        self._teacher = teacher
        self._spec = spec
        self._price = price
        self._job_id = job_id
        self._progress = progress
        self._scope = scope
        self._budget = Budget(spec.budget_usd)
        # Enough calls queued behind the ones in flight that a slow answer does not idle the teacher.
        self._window = 4 * spec.limits.max_concurrency
        self._totals = StageTotals()
        self._total_prompts = 0
        self._last_progress = 0.0
        self._failures: list[dict[str, str]] = []

    async def run(self, prompts_id: str, holdout_id: str) -> teacher_pb2.AnswerPromptsResult:
        inputs = [(prompts_id, "answers")] + ([(holdout_id, "holdout")] if holdout_id else [])
        readers = [
            await asyncio.to_thread(DatasetReader, self._store, dataset_id) for dataset_id, _ in inputs
        ]
        self._total_prompts = sum(reader.manifest.num_rows for reader in readers)
        self._report(force=True)
        outputs: dict[str, operations_pb2.DatasetRef] = {}
        call_metrics.RUNNING_BUDGETS.began(self._budget, self._totals.ledger)
        try:
            async with CacheWriter(self._cache) as cache_writer:
                for reader, (dataset_id, name) in zip(readers, inputs, strict=True):
                    outputs[name] = await self._answer_dataset(reader, dataset_id, name, cache_writer)
        finally:
            call_metrics.RUNNING_BUDGETS.ended(self._totals.ledger)
        if self._failures:
            await self._commit_failures(prompts_id)
        self._report(force=True)
        totals = self._totals
        log.info(
            "teacher stage finished",
            job_id=self._job_id,
            prompts=totals.done,
            failed=totals.failed,
            cost_usd=round(totals.ledger.cost_usd, 6),
            stopped_reason=totals.stopped_reason or None,
        )
        return teacher_pb2.AnswerPromptsResult(
            answers=outputs["answers"],
            holdout_answers=outputs.get("holdout"),
            ledger=totals.ledger.to_proto(),
            failed_prompts=totals.failed,
            stopped_reason=totals.stopped_reason,
        )

    # --- one dataset ---------------------------------------------------------------------------------

    async def _answer_dataset(
        self, reader: DatasetReader, input_id: str, name: str, cache_writer: CacheWriter
    ) -> operations_pb2.DatasetRef:
        output_id = f"jobs/{self._job_id}/teacher/{name}"
        k = self._spec.top_logprobs
        schema = answers_schema(k)
        lineage = Lineage(job_id=self._job_id, stage="teacher", input_ids=[input_id], code_version="")
        writer = await asyncio.to_thread(DatasetWriter, self._store, output_id, schema, lineage)
        with writer:
            if writer.already_committed:  # a previous run of this step finished it
                self._totals.done += reader.manifest.num_rows
            else:
                rows: list[dict[str, Any]] = []
                answers: list[TeacherAnswer] = []
                async for row, answer in self._answers(reader, cache_writer):
                    rows.append(row)
                    answers.append(answer)
                    if len(rows) >= WRITE_CHUNK_ROWS:
                        await asyncio.to_thread(writer.write_batch, answers_table(rows, answers, schema, k))
                        rows, answers = [], []
                if rows:
                    await asyncio.to_thread(writer.write_batch, answers_table(rows, answers, schema, k))
            # Answers are durable in the cache before the dataset that holds them is visible.
            await cache_writer.flush()
            committed = await asyncio.to_thread(writer.commit)
        return self._reference(committed)

    async def _answers(
        self, reader: DatasetReader, cache_writer: CacheWriter
    ) -> AsyncIterator[tuple[dict[str, Any], TeacherAnswer]]:
        """Answers in prompt order; failed prompts are recorded and skipped."""
        pending: deque[tuple[dict[str, Any], asyncio.Future[TeacherAnswer | None]]] = deque()
        try:
            async for chunk in self._prompt_chunks(reader):
                calls = [call_for(self._spec, row["messages"], scope=self._scope) for row in chunk]
                hits = await self._cache.get_many([call.cache_key() for call in calls])
                for row, call in zip(chunk, calls, strict=True):
                    while len(pending) >= self._window:
                        if (item := await self._next_done(pending)) is not None:
                            yield item
                    pending.append((row, self._schedule(row, call, hits.get(call.cache_key()), cache_writer)))
            while pending:
                if (item := await self._next_done(pending)) is not None:
                    yield item
        finally:
            for _, future in pending:
                future.cancel()

    async def _prompt_chunks(self, reader: DatasetReader) -> AsyncIterator[list[dict[str, Any]]]:
        batches = reader.read_batches(columns=["prompt_id", "messages"])
        while not self._totals.stopped_reason:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                return
            rows = batch.to_pylist()
            for start in range(0, len(rows), READ_CHUNK_ROWS):
                yield rows[start : start + READ_CHUNK_ROWS]

    async def _next_done(self, pending: deque) -> tuple[dict[str, Any], TeacherAnswer] | None:
        row, future = pending.popleft()
        answer = await future
        self._totals.done += 1
        self._report()
        return None if answer is None else (row, answer)

    def _schedule(
        self, row: dict[str, Any], call: TeacherCall, cached: TeacherAnswer | None, cache_writer: CacheWriter
    ) -> asyncio.Future[TeacherAnswer | None]:
        if cached is not None:
            self._totals.ledger.record(cached, self._price, cached=True)
            call_metrics.answered(self._spec, cached, self._price, cached=True)
            future: asyncio.Future[TeacherAnswer | None] = asyncio.get_running_loop().create_future()
            future.set_result(cached)
            return future
        estimate = call_estimate_usd(call.messages, call.max_tokens, self._price)
        if self._totals.stopped_reason or self._budget.would_exceed(
            self._totals.ledger, estimate, self._totals.in_flight_usd
        ):
            if not self._totals.stopped_reason:
                self._totals.stopped_reason = self._budget.stopped_reason
                call_metrics.budget_stopped(self._spec)
            return self._skipped()
        self._totals.in_flight_usd += estimate
        return asyncio.ensure_future(self._ask(row, call, estimate, cache_writer))

    @staticmethod
    def _skipped() -> asyncio.Future[TeacherAnswer | None]:
        future: asyncio.Future[TeacherAnswer | None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def _ask(
        self, row: dict[str, Any], call: TeacherCall, estimate_usd: float, cache_writer: CacheWriter
    ) -> TeacherAnswer | None:
        estimated_tokens = prompt_tokens(call.messages) + call.max_tokens
        try:
            answer = await self._teacher.answer(call, estimated_tokens)
        except TeacherCallError as exc:
            call_metrics.failed(self._spec, exc.kind)
            if exc.kind in FATAL_FAILURES:
                raise OperationError(
                    FATAL_FAILURES[exc.kind], f"the teacher {self._spec.model!r}: {exc}"
                ) from exc
            self._totals.failed += 1
            self._failures.append(
                {"prompt_id": row["prompt_id"], "kind": exc.kind.value, "message": exc.message}
            )
            return None
        finally:
            self._totals.in_flight_usd -= estimate_usd
        self._totals.ledger.record(answer, self._price, cached=False)
        call_metrics.answered(self._spec, answer, self._price, cached=False)
        await cache_writer.put(call, answer)
        return answer

    # --- bookkeeping -------------------------------------------------------------------------------

    async def _commit_failures(self, prompts_id: str) -> None:
        failures_id = f"jobs/{self._job_id}/teacher/failures"
        lineage = Lineage(job_id=self._job_id, stage="teacher", input_ids=[prompts_id], code_version="")

        def commit() -> None:
            with DatasetWriter(self._store, failures_id, FAILURES_SCHEMA, lineage) as writer:
                writer.write_rows(self._failures)
                writer.commit()

        await asyncio.to_thread(commit)

    def _reference(self, committed: DatasetManifest) -> operations_pb2.DatasetRef:
        return operations_pb2.DatasetRef(
            dataset_id=committed.dataset_id,
            manifest_uri=self._store.uri(manifest_key(committed.dataset_id)),
            manifest_sha256=manifest_sha256(committed.to_json()),
            num_rows=committed.num_rows,
        )

    def _report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_SECONDS:
            return
        self._last_progress = now
        totals, ledger = self._totals, self._totals.ledger
        self._progress.update(
            unit="prompts",
            done=totals.done,
            total=self._total_prompts,
            message=totals.stopped_reason or f"asking {self._spec.model}",
            metrics={
                "teacher_calls": float(ledger.requests - ledger.cached_requests),
                "cached_answers": float(ledger.cached_requests),
                "failed_prompts": float(totals.failed),
                "prompt_tokens": float(ledger.prompt_tokens),
                "completion_tokens": float(ledger.completion_tokens),
                "cost_usd": ledger.cost_usd,
                "masked_alternatives": float(ledger.masked_alternatives),
                "top1_mismatches": float(ledger.top1_mismatches),
            },
        )
