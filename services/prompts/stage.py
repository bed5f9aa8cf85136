"""The prompts stage of a job: read the seed prompts, generate more, clean them, split off the
held-out prompts and write both datasets.

The stage runs in two halves. The parallel half fans out over shards (`shards`): each reads a slice of a
source, renders a slice of the template or generates a part of the teacher-driven prompts, and judges each
prompt on its own (length, language, exact hash, MinHash signature), committing its candidates as an
object of its own. The order-dependent half (`merge`) then passes over the shards' candidates in shard
order: exact and near-duplicate removal, the split by group (a template prompt with the others of its
first slot's value, a source row with the others of its `group`: see `split`), and the writing of both
datasets. The datasets are the same whether the stage ran as one shard or many, and become visible only
when both are whole. Teacher-driven generation shows the teacher a seeded sample of the kept seed
prompts, so its shards start once the sources are merged.

`fanout_for` runs the shards in this process (small jobs, embedded mode) or as Ray tasks. A re-run after
a crash plans the same shards under the same key (a fingerprint of the spec and the plan), skips the
ones that committed, and finds the datasets if they were committed. The shards' objects are deleted once
the datasets are.

Accounting: `collected` is every prompt read or generated; each one that is not in a dataset was
removed by exactly one rule of `removed_by_rule` (generation checks, cleaning, the split).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack
from functools import partial
from typing import Any

import grpc
import structlog

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import PROMPTS_SCHEMA
from stillhouse.common.datasets.references import dataset_reference
from stillhouse.common.datasets.store import DatasetWriter
from stillhouse.common.fanout.choice import fanout_for, plan_for, row_ranges
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.jobspec import GenerationStrategy, PromptSource, PromptsSpec
from stillhouse.common.operations import OperationError, ProgressReporter
from stillhouse.prompts.cleaning import PromptCleaner
from stillhouse.prompts.generation import DEFAULT_CONCURRENCY, DEFAULT_PATIENCE
from stillhouse.prompts.merge import SIDES, CandidateMerge, SeedPool
from stillhouse.prompts.shards import (
    NUM_PERM,
    SHARD_FUNCTION,
    ShardResources,
    ShardSummary,
    generation_parts,
    run_shard,
    template_slot_values,
)
from stillhouse.prompts.sources import count_rows
from stillhouse.prompts.split import HoldoutSplitter
from stillhouse.prompts.stage_errors import stage_errors
from stillhouse.prompts.teacher_client import add_ledger
from stillhouse.prompts.templates import render_templates
from stillhouse.prompts.v1 import prompts_pb2
from stillhouse.teacher.v1 import teacher_pb2

log = structlog.get_logger(__name__)

PROGRESS_INTERVAL_SECONDS = 0.5
TEACHER_STRATEGIES = (GenerationStrategy.SELF_INSTRUCT, GenerationStrategy.EVOL_INSTRUCT)
# Parquet shards of the prompts datasets: smaller than the writer's default, since the rows waiting for
# the next shard are in memory beside the deduplication indexes.
DATASET_SHARD_BYTES = 16 * 2**20
# Bumped when what a shard writes changes, so that a re-run never reads another version's shards.
SHARD_FORMAT = 1


def source_label(index: int, source: PromptSource) -> str:
    return source.path if source.path is not None else f"inline source #{index}"


def refuse_unworkable(spec: PromptsSpec, *, has_teacher: bool) -> None:
    """Refuse, before any work, a spec that cannot give prompts (INVALID_ARGUMENT naming the cause)."""
    strategy = spec.generate.strategy
    if not spec.sources and strategy in (GenerationStrategy.NONE, *TEACHER_STRATEGIES):
        raise OperationError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec.prompts has no sources"
            + (" and generates no prompts" if strategy is GenerationStrategy.NONE else "")
            + f": {strategy.value} needs seed prompts; add spec.prompts.sources",
        )
    if strategy in TEACHER_STRATEGIES and not has_teacher:
        raise OperationError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{strategy.value} generates prompts through the teacher: spec.teacher is required",
        )


class GeneratePromptsRun:
    """One run of the prompts stage for one job."""

    def __init__(
        self,
        *,
        resources: ShardResources,
        spec: PromptsSpec,
        holdout_fraction: float,
        job_id: str,
        progress: ProgressReporter,
        operation_id: str = "",
        tenant: str = "",
        teacher: dict[str, Any] | None = None,
        fanout: FanoutSettings | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        patience: int = DEFAULT_PATIENCE,
    ) -> None:
        """`resources`: what shards run in this process work with (a Ray worker builds its own);
        `teacher`: the job's `spec.teacher` as JSON, which teacher-driven generation calls through
        `resources.open_completer`."""
        self._resources = resources
        self._store = resources.store
        self._spec = spec
        self._job_id = job_id
        self._operation_id = operation_id or f"prompts-{job_id}"
        self._tenant = tenant
        self._teacher = teacher
        self._fanout = fanout or FanoutSettings()
        self._concurrency = concurrency
        self._patience = patience
        self._progress = progress
        self._holdout_fraction = holdout_fraction
        cleaner = PromptCleaner(spec.filters, num_perm=NUM_PERM)
        splitter = HoldoutSplitter(
            holdout_fraction, spec.seed, spec.filters.near_dup_threshold, num_perm=NUM_PERM
        )
        self._writers: dict[str, DatasetWriter] = {}
        self._merge = CandidateMerge(self._store, cleaner, splitter, self._writers)
        self._ledger = teacher_pb2.Ledger()
        self._eliminated: Counter[str] = Counter()  # by the generation checks
        self._collected = 0
        self._warnings: list[str] = []
        self._shortfall = 0
        self._last_progress = 0.0
        self._folder = f"jobs/{job_id}/prompts/candidates"

    async def run(self) -> prompts_pb2.GeneratePromptsResult:
        refuse_unworkable(self._spec, has_teacher=self._teacher is not None)
        with stage_errors(), ExitStack() as open_writers:
            for side in SIDES:
                self._writers[side] = open_writers.enter_context(await asyncio.to_thread(self._open, side))
            await self._prepare_and_merge()
            self._require_training_prompts()
            self._report("writing the datasets", force=True)
            committed = {side: await asyncio.to_thread(self._writers[side].commit) for side in SIDES}
            await asyncio.to_thread(self._store.delete_prefix, f"{self._folder}/")
        if committed["holdout"].num_rows == 0:
            self._warnings.append(
                f"no prompt fell in the held-out split ({committed['train'].num_rows} prompts in all): "
                "raise evaluation.holdoutFraction or add prompts to evaluate the student on"
            )
        log.info(
            "prompts stage finished",
            job_id=self._job_id,
            collected=self._collected,
            train=committed["train"].num_rows,
            holdout=committed["holdout"].num_rows,
            removed=dict(self._removed_by_rule()),
            shortfall=self._shortfall,
        )
        kept = committed["train"].num_rows + committed["holdout"].num_rows
        self._report("done", force=True, done=kept, total=kept)
        return prompts_pb2.GeneratePromptsResult(
            train=dataset_reference(self._store, committed["train"]),
            holdout=dataset_reference(self._store, committed["holdout"]),
            collected=self._collected,
            removed_by_rule=self._removed_by_rule(),
            generation_ledger=self._ledger,
            shortfall=self._shortfall,
            warnings=self._warnings,
        )

    async def _prepare_and_merge(self) -> None:
        generation = self._spec.generate
        inputs, total = await asyncio.to_thread(self._plan_rows)
        teacher_driven = generation.strategy in TEACHER_STRATEGIES
        seed_pool = SeedPool(self._spec.seed) if teacher_driven else None
        summaries = await self._run_shards("rows", inputs, total, "reading and cleaning the prompts")
        template_kept = 0
        for number, (selected, summary) in enumerate(zip(inputs, summaries, strict=True), start=1):
            self._report(f"merging shard {number} of {len(summaries)}", force=True)
            kept = await asyncio.to_thread(
                self._merge_shard, summary, seed_pool if selected["kind"] == "source" else None
            )
            template_kept += kept if selected["kind"] == "template" else 0
        if generation.strategy is GenerationStrategy.TEMPLATE and template_kept < generation.count:
            self._shortfall += generation.count - template_kept
            self._warnings.append(
                f"template gave {template_kept} of generate.count {generation.count} prompts: the slot "
                "combinations ran out, or rendered duplicates or filtered prompts"
            )
        if teacher_driven and seed_pool is not None:
            await self._generate(seed_pool)

    async def _generate(self, seed_pool: SeedPool) -> None:
        generation = self._spec.generate
        name = generation.strategy.value
        pool_key = f"{self._run_folder()}/seed-pool.json"
        await asyncio.to_thread(self._store.put_bytes, pool_key, json.dumps(seed_pool.texts).encode())
        inputs = [
            {"kind": "generation", "part": part, "count": count, "seed_pool": pool_key}
            for part, count in enumerate(generation_parts(generation.count))
        ]
        summaries = await self._run_shards(
            "generation", inputs, generation.count, f"generating prompts with {name}"
        )
        generated = 0
        for summary in summaries:
            add_ledger(self._ledger, summary.teacher_ledger())
            self._eliminated.update(summary.eliminated)
            self._collected += sum(summary.eliminated.values())
            generated += await asyncio.to_thread(self._merge_shard, summary, None)
        if generated < generation.count:
            self._shortfall += generation.count - generated
            reasons = sorted({summary.stopped_reason for summary in summaries if summary.stopped_reason})
            because = "; ".join(reasons) or (
                f"{generated} of {generation.count} generated prompts were kept: the others duplicated "
                "prompts of other parts of the generation or of the sources"
            )
            self._warnings.append(f"{name} stopped short of generate.count: {because}")

    def _merge_shard(self, summary: ShardSummary, seed_pool: SeedPool | None) -> int:
        self._collected += summary.collected - sum(summary.eliminated.values())
        return self._merge.merge(summary, seed_pool)

    # --- planning and running the shards -----------------------------------------------------------

    def _plan_rows(self) -> tuple[list[dict[str, Any]], int]:
        """The slices of the sources and of the template, in the stage's arrival order, and how many
        prompts they hold in all."""
        inputs: list[dict[str, Any]] = []
        total = 0
        for index, source in enumerate(self._spec.sources):
            size = count_rows(source, self._store, index=index, roots=self._resources.input_roots)
            if source.limit is not None:  # a sample is drawn over the whole source: one shard reads it
                inputs.append({"kind": "source", "index": index, "start": 0, "stop": None, "mark": None})
                total += min(size.rows, source.limit)
                continue
            for part in row_ranges(size.rows, self._fanout):
                mark = size.mark_before(part.start)
                inputs.append(
                    {
                        "kind": "source",
                        "index": index,
                        "start": part.start,
                        "stop": part.stop,
                        "mark": None if mark is None else list(mark),
                    }
                )
            total += size.rows
        generation = self._spec.generate
        if generation.strategy is GenerationStrategy.TEMPLATE:
            values = template_slot_values(self._spec, self._resources)
            with render_templates(generation, values, self._spec.seed) as rendered:  # checks the template
                prompts = rendered.total
            inputs += [
                {"kind": "template", "start": part.start, "stop": part.stop}
                for part in row_ranges(prompts, self._fanout)
            ]
            total += prompts
        return inputs, total

    async def _run_shards(
        self, phase: str, inputs: list[dict[str, Any]], total: int, message: str
    ) -> list[ShardSummary]:
        folder = self._run_folder()
        run = {
            "job_id": self._job_id,
            "tenant": self._tenant,
            "spec": self._spec_json(),
            "teacher": self._teacher,
            "concurrency": self._concurrency,
            "patience": self._patience,
        }
        run_key = f"{folder}/run.json"
        await asyncio.to_thread(self._store.put_bytes, run_key, json.dumps(run, sort_keys=True).encode())
        # Payloads stay small (a plan of thousands travels in one Ray job): what every shard shares is
        # read from the run's object.
        payloads = [
            {"run": run_key, "key": f"{folder}/{phase}-{number:05d}", "input": selected}
            for number, selected in enumerate(inputs)
        ]
        plan = plan_for(self._fanout, SHARD_FUNCTION, payloads)
        local = partial(run_shard, resources=self._resources)
        fanout = fanout_for(self._fanout, total, local)

        def on_progress(counters: Mapping[str, float]) -> None:
            done = int(counters.get("prompts", 0))
            self._report(
                f"{message}: {done} of {total}",
                done=done,
                total=total,
                teacher_calls=counters.get("teacher_calls", 0.0),
                cost_usd=counters.get("cost_usd", 0.0),
            )

        self._report(message, force=True, done=0, total=total)
        results = await fanout.run(f"{self._operation_id}-{phase}", plan, on_progress)
        return [ShardSummary.from_json(result) for result in results]

    def _spec_json(self) -> dict[str, Any]:
        return self._spec.model_dump(mode="json", by_alias=True)

    def _run_folder(self) -> str:
        """Where this run's shards go: named by everything their outputs depend on, so that a re-run of
        the same stage finds them and a changed spec or sharding never does."""
        identity = json.dumps(
            [
                SHARD_FORMAT,
                self._spec_json(),
                self._holdout_fraction,
                self._teacher,
                self._patience,
                self._fanout.shard_rows,
                self._fanout.max_shards,
            ],
            sort_keys=True,
        )
        return f"{self._folder}/{hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()}"

    # --- the datasets -------------------------------------------------------------------------------

    def _open(self, side: str) -> DatasetWriter:
        lineage = Lineage(job_id=self._job_id, stage="prompts", input_ids=[], code_version="")
        dataset_id = f"jobs/{self._job_id}/prompts/{side}"
        return DatasetWriter(
            self._store, dataset_id, PROMPTS_SCHEMA, lineage, max_shard_bytes=DATASET_SHARD_BYTES
        )

    def _require_training_prompts(self) -> None:
        if self._merge.written["train"]:
            return
        removed = ", ".join(
            f"{rule}: {count}" for rule, count in sorted(self._removed_by_rule().items()) if count
        )
        raise OperationError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"no prompts left after cleaning: {self._collected} collected, "
            f"{self._merge.written['holdout']} held out, removed {removed or 'none'}; "
            "add prompts or loosen spec.prompts.filters",
        )

    def _removed_by_rule(self) -> dict[str, int]:
        return {
            **self._merge.cleaner.removed_by_rule,
            **self._merge.splitter.dropped_by_rule,
            **self._eliminated,
        }

    # --- reporting ----------------------------------------------------------------------------------

    def _report(
        self,
        message: str,
        *,
        force: bool = False,
        done: int | None = None,
        total: int | None = None,
        teacher_calls: float | None = None,
        cost_usd: float | None = None,
    ) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_SECONDS:
            return
        self._last_progress = now
        kept = self._merge.written["train"] + self._merge.written["holdout"]
        self._progress.update(
            unit="prompts",
            done=kept if done is None else done,
            total=0 if total is None else total,
            message=message,
            metrics={
                "collected": float(self._collected),
                "kept": float(kept),
                "removed": float(sum(self._removed_by_rule().values())),
                "teacher_calls": float(self._ledger.requests - self._ledger.cached_requests)
                if teacher_calls is None
                else teacher_calls,
                "cost_usd": self._ledger.cost_usd if cost_usd is None else cost_usd,
            },
        )
