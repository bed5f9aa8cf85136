"""One shard of the teacher stage: ask the teacher a range of rows of one prompts dataset.

A shard is the whole pipeline over its rows: the prompts are read in order and answered by a sliding
window of concurrent calls, so its answers keep the prompts' order. Every call goes through the cache
first; a paid call starts only once the job's budget (`budget.JobBudget`, shared by every shard of the
job) has reserved its estimate. An answer counts only once it is durable in the cache, so a shard that is
retried (its worker died) reads it from the cache instead of paying again.

Output: the shard writes its answers (and failures) as Parquet shards under the final datasets' folders
with writers of its own (`DatasetWriter.seal`), then commits an outcome object naming them: the shard's
commit point. A shard whose outcome exists is skipped. The stage (`stage.py`) commits the final
datasets from every shard's outcome, in shard order, without copying a byte.

The same `ShardAnswerer` runs in the service's process (`InProcessFanout`) and on Ray workers
(`answer_shard`, which builds the service's objects once per worker process from the environment).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
import pyarrow as pa
import structlog

from stillhouse.common.datasets.manifest import Lineage, ShardRecord
from stillhouse.common.datasets.records import FAILURES_SCHEMA, answers_schema
from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs, rows_to_arrow
from stillhouse.common.datasets.store import DatasetReader, DatasetWriter
from stillhouse.common.fanout.plan import ShardReport
from stillhouse.common.jobspec import TeacherBackend, TeacherSpec
from stillhouse.common.objectstore.objects import ObjectNotFound, ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.operations import OperationError
from stillhouse.teacher import call_metrics
from stillhouse.teacher.budget import JobBudget
from stillhouse.teacher.cache import CacheWriter, TeacherCache
from stillhouse.teacher.calls import ChatMessage, FailureKind, TeacherAnswer, TeacherCall, TeacherCallError
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.estimate import call_estimate_usd, prompt_tokens
from stillhouse.teacher.ledger import Ledger, Price, PriceTable
from stillhouse.teacher.teachers import TeacherPool

log = structlog.get_logger(__name__)

# What Ray workers import (`FanoutPlan.function`).
SHARD_FUNCTION = "stillhouse.teacher.shards:answer_shard"
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
REPORT_INTERVAL_SECONDS = 0.5
# How long an answer may wait for the answers that come back with it to share its cache transaction.
DURABLE_WRITE_DELAY_SECONDS = 0.01


class Teacher(Protocol):
    async def answer(self, call: TeacherCall, estimated_tokens: int) -> TeacherAnswer: ...


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
        precision=spec.precision.value if spec.backend is TeacherBackend.LOCAL else "",
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


# --- what a shard is given and what it leaves -----------------------------------------------------------


@dataclass(frozen=True)
class ShardPayload:
    """One shard, as JSON: no secrets (the worker resolves the API key named by the spec itself)."""

    index: int
    job_id: str
    spec: dict[str, Any]  # TeacherSpec as JSON, by alias
    scope: str
    input_id: str
    start: int
    stop: int
    answers_id: str
    failures_id: str
    outcome_key: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ShardPayload:
        return cls(**document)


@dataclass(frozen=True)
class ShardOutcome:
    """What a committed shard wrote (its object at `outcome_key` is its commit point), and what this run
    of it paid (`ledger`: nothing for a shard that was already committed)."""

    index: int
    rows: int
    answers: list[ShardRecord]
    failures: list[ShardRecord]
    failed: int
    stopped_reason: str
    ledger: Ledger

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "rows": self.rows,
            "answers": [asdict(record) for record in self.answers],
            "failures": [asdict(record) for record in self.failures],
            "failed": self.failed,
            "stopped_reason": self.stopped_reason,
            "ledger": asdict(self.ledger),
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ShardOutcome:
        return cls(
            index=document["index"],
            rows=document["rows"],
            answers=[ShardRecord(**record) for record in document["answers"]],
            failures=[ShardRecord(**record) for record in document["failures"]],
            failed=document["failed"],
            stopped_reason=document["stopped_reason"],
            ledger=Ledger(**document["ledger"]),
        )


def shard_counters(done: int, ledger: Ledger, failed: int, budget_stopped: bool) -> dict[str, float]:
    """A shard's progress, as the fan-out sums it over shards (the stage's progress metrics)."""
    return {
        "done": float(done),
        "teacher_calls": float(ledger.requests - ledger.cached_requests),
        "cached_answers": float(ledger.cached_requests),
        "failed_prompts": float(failed),
        "prompt_tokens": float(ledger.prompt_tokens),
        "completion_tokens": float(ledger.completion_tokens),
        "cost_usd": ledger.cost_usd,
        "masked_alternatives": float(ledger.masked_alternatives),
        "top1_mismatches": float(ledger.top1_mismatches),
        "budget_stops": float(budget_stopped),
    }


# --- one shard ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ShardRun:
    """One run of one shard, its counters told to `report_to` as it goes."""

    store: ObjectStore
    cache: TeacherCache
    teacher: Teacher
    spec: TeacherSpec
    price: Price
    shard: ShardPayload
    report_to: ShardReport
    _budget: JobBudget | None = field(init=False)
    # Enough calls queued behind the ones in flight that a slow answer does not idle the teacher.
    _window: int = field(init=False)
    _ledger: Ledger = field(default_factory=Ledger, init=False)
    _done: int = field(default=0, init=False)
    _stopped_reason: str = field(default="", init=False)
    _failures: list[dict[str, str]] = field(default_factory=list, init=False)
    _last_report: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._budget = (
            None
            if self.spec.budget_usd is None
            else JobBudget(self.cache.engine, self.shard.job_id, self.shard.scope, self.spec.budget_usd)
        )
        self._window = 4 * self.spec.limits.max_concurrency

    async def run(self) -> ShardOutcome:
        shard = self.shard
        committed = await asyncio.to_thread(self._committed_outcome)
        if committed is not None:  # a previous run of this shard finished it
            self.report_to(shard_counters(committed.rows, Ledger(), committed.failed, False))
            return committed
        if self._budget is not None:
            await self._budget.open()
        self._report(force=True)
        reader = await asyncio.to_thread(DatasetReader, self.store, shard.input_id)
        lineage = Lineage(job_id=shard.job_id, stage="teacher", input_ids=[shard.input_id], code_version="")
        answer_records = await self._write_answers(reader, lineage)
        failure_records = await asyncio.to_thread(self._write_failures, lineage)
        outcome = ShardOutcome(
            index=shard.index,
            rows=shard.stop - shard.start,
            answers=answer_records,
            failures=failure_records,
            failed=len(self._failures),
            stopped_reason=self._stopped_reason,
            ledger=self._ledger,
        )
        # The commit point: the shard's Parquet shards are all in place before its outcome appears.
        data = json.dumps({**outcome.to_json(), "ledger": asdict(Ledger())}).encode()
        await asyncio.to_thread(self.store.put_bytes, shard.outcome_key, data)
        self._report(force=True)
        return outcome

    async def _write_answers(self, reader: DatasetReader, lineage: Lineage) -> list[ShardRecord]:
        """The shard's answers in prompt order, as Parquet shards of its own writer: sealed."""
        k = self.spec.top_logprobs
        schema = answers_schema(k)
        async with CacheWriter(self.cache, max_delay_seconds=DURABLE_WRITE_DELAY_SECONDS) as cache:
            answers_id = self.shard.answers_id
            writer = await asyncio.to_thread(DatasetWriter, self.store, answers_id, schema, lineage)
            with writer:
                rows: list[dict[str, Any]] = []
                answers: list[TeacherAnswer] = []
                async for row, answer in self._answers(reader, cache):
                    rows.append(row)
                    answers.append(answer)
                    if len(rows) >= WRITE_CHUNK_ROWS:
                        await asyncio.to_thread(writer.write_batch, answers_table(rows, answers, schema, k))
                        rows, answers = [], []
                if rows:
                    await asyncio.to_thread(writer.write_batch, answers_table(rows, answers, schema, k))
                return await asyncio.to_thread(writer.seal)

    def _committed_outcome(self) -> ShardOutcome | None:
        try:
            return ShardOutcome.from_json(json.loads(self.store.get_bytes(self.shard.outcome_key)))
        except ObjectNotFound:
            return None

    def _write_failures(self, lineage: Lineage) -> list[ShardRecord]:
        if not self._failures:
            return []
        with DatasetWriter(self.store, self.shard.failures_id, FAILURES_SCHEMA, lineage) as writer:
            writer.write_rows(self._failures)
            return writer.seal()

    async def _answers(
        self, reader: DatasetReader, cache: CacheWriter
    ) -> AsyncIterator[tuple[dict[str, Any], TeacherAnswer]]:
        """Answers in prompt order; failed prompts are recorded and skipped."""
        pending: deque[tuple[dict[str, Any], asyncio.Future[TeacherAnswer | None]]] = deque()
        try:
            async for chunk in self._prompt_chunks(reader):
                calls = [call_for(self.spec, row["messages"], scope=self.shard.scope) for row in chunk]
                hits = await self.cache.get_many([call.cache_key() for call in calls])
                for row, call in zip(chunk, calls, strict=True):
                    while len(pending) >= self._window:
                        if (item := await self._next_done(pending)) is not None:
                            yield item
                    pending.append((row, self._schedule(row, call, hits.get(call.cache_key()), cache)))
            while pending:
                if (item := await self._next_done(pending)) is not None:
                    yield item
        finally:
            for _, future in pending:
                future.cancel()

    async def _prompt_chunks(self, reader: DatasetReader) -> AsyncIterator[list[dict[str, Any]]]:
        rows = range(self.shard.start, self.shard.stop)
        batches = reader.read_rows(rows, columns=["prompt_id", "messages"])
        while not self._stopped_reason:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                return
            prompts = batch.to_pylist()
            for start in range(0, len(prompts), READ_CHUNK_ROWS):
                yield prompts[start : start + READ_CHUNK_ROWS]

    async def _next_done(self, pending: deque) -> tuple[dict[str, Any], TeacherAnswer] | None:
        row, future = pending.popleft()
        answer = await future
        self._done += 1
        self._report()
        return None if answer is None else (row, answer)

    def _schedule(
        self, row: dict[str, Any], call: TeacherCall, cached: TeacherAnswer | None, cache: CacheWriter
    ) -> asyncio.Future[TeacherAnswer | None]:
        if cached is not None:
            self._ledger.record(cached, self.price, cached=True)
            call_metrics.answered(self.spec, cached, self.price, cached=True)
            return _resolved(cached)
        if self._stopped_reason:
            return _resolved(None)
        return asyncio.ensure_future(self._ask(row, call, cache))

    async def _ask(self, row: dict[str, Any], call: TeacherCall, cache: CacheWriter) -> TeacherAnswer | None:
        estimate = call_estimate_usd(call.messages, call.max_tokens, self.price)
        if self._budget is not None and (self._stopped_reason or not await self._budget.reserve(estimate)):
            self._stop_for_budget()
            return None
        cost = 0.0
        try:
            answer = await self.teacher.answer(call, prompt_tokens(call.messages) + call.max_tokens)
            # Durable before it counts: a retry of this shard finds it in the cache.
            await cache.put_durable(call, answer)
            cost = self._ledger.record(answer, self.price, cached=False)
        except TeacherCallError as exc:
            call_metrics.failed(self.spec, exc.kind)
            if exc.kind in FATAL_FAILURES:
                raise OperationError(
                    FATAL_FAILURES[exc.kind], f"the teacher {self.spec.model!r}: {exc}"
                ) from exc
            self._failures.append(
                {"prompt_id": row["prompt_id"], "kind": exc.kind.value, "message": exc.message}
            )
            return None
        finally:
            if self._budget is not None:
                # Shielded: a cancelled call still hands back its reservation.
                await asyncio.shield(self._budget.settle(estimate, cost))
        call_metrics.answered(self.spec, answer, self.price, cached=False)
        return answer

    def _stop_for_budget(self) -> None:
        if not self._stopped_reason and self._budget is not None:
            self._stopped_reason = self._budget.stopped_reason
            call_metrics.budget_stopped(self.spec)

    def _report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < REPORT_INTERVAL_SECONDS:
            return
        self._last_report = now
        self.report_to(
            shard_counters(self._done, self._ledger, len(self._failures), bool(self._stopped_reason))
        )


def _resolved(answer: TeacherAnswer | None) -> asyncio.Future[TeacherAnswer | None]:
    future: asyncio.Future[TeacherAnswer | None] = asyncio.get_running_loop().create_future()
    future.set_result(answer)
    return future


# --- the shard function -----------------------------------------------------------------------------------


class TeacherSource(Protocol):
    async def get(self, spec: TeacherSpec) -> Teacher: ...


@dataclass
class ShardAnswerer:
    """The teacher stage's shard function over one process's objects: the service's own in-process, or
    those a Ray worker builds for itself (`answer_shard`)."""

    store: ObjectStore
    cache: TeacherCache
    teachers: TeacherSource
    prices: PriceTable

    async def __call__(self, payload: dict[str, Any], report: ShardReport) -> dict[str, Any]:
        shard = ShardPayload.from_json(payload)
        spec = TeacherSpec.model_validate(shard.spec)
        run = ShardRun(
            store=self.store,
            cache=self.cache,
            teacher=await self.teachers.get(spec),
            spec=spec,
            price=self.prices.price(spec.model),
            shard=shard,
            report_to=report,
        )
        outcome = await run.run()
        log.info(
            "teacher shard finished",
            job_id=shard.job_id,
            shard=shard.index,
            rows=outcome.rows,
            paid=outcome.ledger.requests - outcome.ledger.cached_requests,
        )
        return outcome.to_json()


# A Ray worker runs each task under a fresh `asyncio.run`, while database connections and HTTP clients
# belong to the event loop that made them: so the worker's objects live on one loop of its own, in a
# thread, built once per worker process from its environment (STILLHOUSE_TEACHER_*).
_worker_loop: asyncio.AbstractEventLoop | None = None
_worker_answerer: ShardAnswerer | None = None
_worker_loop_lock = threading.Lock()


async def answer_shard(payload: dict[str, Any], report: ShardReport) -> dict[str, Any]:
    """The teacher stage's shard function on a Ray worker (`SHARD_FUNCTION`)."""
    running = asyncio.run_coroutine_threadsafe(_answer_on_worker_loop(payload, report), _worker_event_loop())
    return await asyncio.wrap_future(running)


def _worker_event_loop() -> asyncio.AbstractEventLoop:
    global _worker_loop
    with _worker_loop_lock:
        if _worker_loop is None:
            _worker_loop = asyncio.new_event_loop()
            threading.Thread(target=_worker_loop.run_forever, name="teacher-shards", daemon=True).start()
        return _worker_loop


async def _answer_on_worker_loop(payload: dict[str, Any], report: ShardReport) -> dict[str, Any]:
    global _worker_answerer
    if _worker_answerer is None:
        settings = TeacherSettings()
        _worker_answerer = ShardAnswerer(
            open_object_store(settings.object_store),
            await TeacherCache.open(settings.cache_url),
            TeacherPool(settings),
            PriceTable.load(settings.price_table),
        )
    return await _worker_answerer(payload, report)
