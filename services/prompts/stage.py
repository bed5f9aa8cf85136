"""The prompts stage of a job: read the seed prompts, generate more, clean them, split off the
held-out prompts and write both datasets.

Prompts stream through in chunks: read (or generated), cleaned (duplicates, lengths, languages), given
the system prompt and their id, assigned to train or holdout by group (a template prompt with the others
of its first slot's value, a source row with the others of its `group`: see `split`), and written.
Memory holds one chunk, what deduplication must remember, and a bounded sample of seed prompts for the
strategies that show the teacher examples. The datasets become visible only when both are whole; a
re-run after a crash computes the same prompts and finds what was already committed.

Accounting: `collected` is every prompt read or generated; each one that is not in a dataset was
removed by exactly one rule of `removed_by_rule` (generation checks, cleaning, the split).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from itertools import islice

import grpc
import structlog

from stillhouse.common.datasets.manifest import DatasetManifest, Lineage, manifest_key, manifest_sha256
from stillhouse.common.datasets.records import PROMPTS_SCHEMA, prompt_id
from stillhouse.common.datasets.store import DatasetConflict, DatasetWriter
from stillhouse.common.input_roots import NO_LOCAL_FILES, InputRoots
from stillhouse.common.jobspec import GenerationStrategy, PromptSource, PromptsSpec
from stillhouse.common.objectstore.objects import ObjectStore, ObjectStoreError
from stillhouse.common.operations import OperationError, ProgressReporter
from stillhouse.common.v1 import operations_pb2
from stillhouse.prompts.cleaning import PromptCleaner
from stillhouse.prompts.generation import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PATIENCE,
    Completer,
    GenerationError,
    GenerationOutcome,
    evol_instruct,
    self_instruct,
)
from stillhouse.prompts.sources import PromptSourceError, SourcePrompt, iter_source, read_lines
from stillhouse.prompts.split import HoldoutSplitter, source_group, template_group
from stillhouse.prompts.templates import TemplateError, render_templates
from stillhouse.prompts.v1 import prompts_pb2
from stillhouse.teacher.v1 import teacher_pb2

log = structlog.get_logger(__name__)

Conversation = list[dict[str, str]]

# Prompts read, cleaned and split at once.
CHUNK_PROMPTS = 512
# Seed prompts kept (a seeded uniform sample) for the strategies that show the teacher examples.
SEED_POOL_LIMIT = 10_000
# The verdict for a prompt the held-out split dropped (the splitter counts them by rule).
SPLIT_DROPPED = "split"
PROGRESS_INTERVAL_SECONDS = 0.5
SIDES = ("train", "holdout")
TEACHER_STRATEGIES = (GenerationStrategy.SELF_INSTRUCT, GenerationStrategy.EVOL_INSTRUCT)


def user_text(conversation: Conversation) -> str:
    """The text that cleaning and the split judge: what the user says."""
    return "\n".join(message["content"] for message in conversation if message["role"] == "user")


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


@contextmanager
def stage_errors() -> Iterator[None]:
    """Failures a user can cause, as the status codes the operation fails with."""
    try:
        yield
    except PromptSourceError as exc:
        # Only a missing file or object is not the spec's fault.
        code = grpc.StatusCode.FAILED_PRECONDITION if exc.missing else grpc.StatusCode.INVALID_ARGUMENT
        raise OperationError(code, str(exc)) from exc
    except (TemplateError, GenerationError) as exc:
        raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    except DatasetConflict as exc:
        raise OperationError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
    except ObjectStoreError as exc:
        raise OperationError(grpc.StatusCode.UNAVAILABLE, f"object storage: {exc}") from exc


class GeneratePromptsRun:
    """One run of the prompts stage for one job."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        spec: PromptsSpec,
        holdout_fraction: float,
        job_id: str,
        progress: ProgressReporter,
        completer: Completer | None = None,
        generation_ledger: teacher_pb2.Ledger | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        patience: int = DEFAULT_PATIENCE,
        input_roots: InputRoots = NO_LOCAL_FILES,
    ) -> None:
        """`input_roots`: the folders local sources and slot files may be read from."""
        self._store = store
        self._input_roots = input_roots
        self._spec = spec
        self._job_id = job_id
        self._progress = progress
        self._completer = completer
        self._ledger = generation_ledger or teacher_pb2.Ledger()
        self._concurrency = concurrency
        self._patience = patience
        self._cleaner = PromptCleaner(spec.filters)
        self._splitter = HoldoutSplitter(holdout_fraction, spec.seed, spec.filters.near_dup_threshold)
        self._writers: dict[str, DatasetWriter] = {}
        self._written: Counter[str] = Counter()
        self._eliminated: Counter[str] = Counter()  # by the generation checks
        self._collected = 0
        self._seed_pool: list[str] = []
        self._seeds_seen = 0
        self._seed_sampler = random.Random(f"seed-pool:{spec.seed}")
        self._warnings: list[str] = []
        self._shortfall = 0
        self._last_progress = 0.0

    async def run(self) -> prompts_pb2.GeneratePromptsResult:
        refuse_unworkable(self._spec, has_teacher=self._completer is not None)
        with stage_errors(), ExitStack() as open_writers:
            for side in SIDES:
                self._writers[side] = open_writers.enter_context(await asyncio.to_thread(self._open, side))
            for index, source in enumerate(self._spec.sources):
                await self._read_source(index, source)
            await self._generate()
            self._require_training_prompts()
            self._report("writing the datasets", force=True)
            committed = {side: await asyncio.to_thread(self._writers[side].commit) for side in SIDES}
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
            train=self._reference(committed["train"]),
            holdout=self._reference(committed["holdout"]),
            collected=self._collected,
            removed_by_rule=self._removed_by_rule(),
            generation_ledger=self._ledger,
            shortfall=self._shortfall,
            warnings=self._warnings,
        )

    # --- reading ------------------------------------------------------------------------------------

    async def _read_source(self, index: int, source: PromptSource) -> None:
        label = source_label(index, source)
        message = f"reading and cleaning source {index + 1}/{len(self._spec.sources)}: {label}"
        self._report(message, force=True)
        conversations = iter_source(
            source, self._store, self._spec.seed, index=index, roots=self._input_roots
        )
        while await asyncio.to_thread(self._ingest_next_chunk, conversations):
            self._report(message)

    def _ingest_next_chunk(self, prompts: Iterator[SourcePrompt]) -> int:
        read = list(islice(prompts, CHUNK_PROMPTS))
        self._collected += len(read)
        chunk = [prompt.conversation for prompt in read]
        verdicts = self._ingest(chunk, [None if p.group is None else source_group(p.group) for p in read])
        if self._spec.generate.strategy in TEACHER_STRATEGIES:
            for conversation, verdict in zip(chunk, verdicts, strict=True):
                if verdict is None:
                    self._remember_seed(user_text(conversation))
        return len(chunk)

    def _remember_seed(self, text: str) -> None:
        """Reservoir sampling: every kept source prompt is equally likely to be in the pool."""
        self._seeds_seen += 1
        if len(self._seed_pool) < SEED_POOL_LIMIT:
            self._seed_pool.append(text)
        elif (slot := self._seed_sampler.randrange(self._seeds_seen)) < SEED_POOL_LIMIT:
            self._seed_pool[slot] = text

    # --- generating ---------------------------------------------------------------------------------

    async def _generate(self) -> None:
        generation = self._spec.generate
        if generation.strategy is GenerationStrategy.NONE:
            return
        if generation.strategy is GenerationStrategy.TEMPLATE:
            kept = await self._render_templates()
            if kept < generation.count:
                self._shortfall += generation.count - kept
                self._warnings.append(
                    f"template gave {kept} of generate.count {generation.count} prompts: the slot "
                    "combinations ran out, or rendered duplicates or filtered prompts"
                )
            return
        strategy = self_instruct if generation.strategy is GenerationStrategy.SELF_INSTRUCT else evol_instruct
        assert self._completer is not None  # run() checks it
        name = generation.strategy.value

        async def admit(texts: list[str]) -> list[str | None]:
            self._collected += len(texts)
            return await asyncio.to_thread(self._ingest_texts, texts)

        def on_progress(outcome: GenerationOutcome) -> None:
            self._report(
                f"generating prompts with {name}: {len(outcome.prompts)} of {generation.count}",
                done=len(outcome.prompts),
                total=generation.count,
            )

        self._report(f"generating prompts with {name}", force=True, done=0, total=generation.count)
        outcome = await strategy(
            generation,
            self._seed_pool,
            self._completer,
            admit,
            seed=self._spec.seed,
            concurrency=self._concurrency,
            patience=self._patience,
            on_progress=on_progress,
        )
        eliminated = sum(outcome.eliminated.values())
        self._collected += eliminated
        self._eliminated.update(outcome.eliminated)
        if outcome.shortfall:
            self._shortfall += outcome.shortfall
            self._warnings.append(f"{name} stopped short of generate.count: {outcome.stopped_reason}")

    async def _render_templates(self) -> int:
        generation = self._spec.generate

        def slot_values() -> dict[str, list[str]]:
            both = sorted(set(generation.slots) & set(generation.slot_files))
            if both:
                raise TemplateError(f"slot {both[0]!r} is given in both slots and slotFiles: give it once")
            from_files = {
                name: read_lines(path, self._store, self._input_roots)
                for name, path in generation.slot_files.items()
            }
            return {**generation.slots, **from_files}

        self._report("rendering the templates", force=True, done=0, total=generation.count)
        values = await asyncio.to_thread(slot_values)
        kept = 0
        # Leaving the block (also when the job is cancelled) ends the renderer process.
        with render_templates(generation, values, self._spec.seed) as rendered:
            while prompts := await asyncio.to_thread(lambda: list(islice(rendered, CHUNK_PROMPTS))):
                self._collected += len(prompts)
                texts = [prompt.text for prompt in prompts]
                groups = [template_group(generation.template, prompt.first_slot_value) for prompt in prompts]
                verdicts = await asyncio.to_thread(self._ingest_texts, texts, groups)
                kept += sum(verdict is None for verdict in verdicts)
                self._report(f"rendering the templates: {kept} kept", done=kept, total=generation.count)
        return kept

    # --- cleaning, splitting, writing ---------------------------------------------------------------

    def _ingest(
        self, conversations: list[Conversation], group_keys: list[str | None] | None = None
    ) -> list[str | None]:
        """Clean, split and write; for each conversation None if written, else the rule
        that removed it. `group_keys`: each conversation's group key for the split (None: its own id).
        Runs in a worker thread, one call at a time."""
        if not conversations:
            return []
        texts = [user_text(conversation) for conversation in conversations]
        groups = group_keys or [None] * len(conversations)
        verdicts = self._cleaner.admit_batch(texts)
        kept = [position for position, verdict in enumerate(verdicts) if verdict is None]
        messages = [self._with_system_prompt(conversations[position]) for position in kept]
        identities = [prompt_id(conversation) for conversation in messages]
        sides = self._splitter.assign_batch(
            identities, [texts[position] for position in kept], [groups[position] for position in kept]
        )
        rows: dict[str, list[dict]] = {side: [] for side in SIDES}
        for position, conversation, identity, side in zip(kept, messages, identities, sides, strict=True):
            if side == "dropped":
                verdicts[position] = SPLIT_DROPPED  # counted by rule in the splitter
            else:
                rows[side].append({"prompt_id": identity, "messages": conversation})
        for side in SIDES:
            if rows[side]:
                self._writers[side].write_rows(rows[side])
                self._written[side] += len(rows[side])
        return verdicts

    def _ingest_texts(self, texts: list[str], group_keys: list[str | None] | None = None) -> list[str | None]:
        return self._ingest([[{"role": "user", "content": text}] for text in texts], group_keys)

    def _with_system_prompt(self, conversation: Conversation) -> Conversation:
        system = self._spec.system_prompt
        if system is None or (conversation and conversation[0]["role"] == "system"):
            return conversation
        return [{"role": "system", "content": system}, *conversation]

    def _open(self, side: str) -> DatasetWriter:
        lineage = Lineage(job_id=self._job_id, stage="prompts", input_ids=[], code_version="")
        return DatasetWriter(self._store, f"jobs/{self._job_id}/prompts/{side}", PROMPTS_SCHEMA, lineage)

    def _require_training_prompts(self) -> None:
        if self._written["train"]:
            return
        removed = ", ".join(
            f"{rule}: {count}" for rule, count in sorted(self._removed_by_rule().items()) if count
        )
        raise OperationError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"no prompts left after cleaning: {self._collected} collected, "
            f"{self._written['holdout']} held out, removed {removed or 'none'}; "
            "add prompts or loosen spec.prompts.filters",
        )

    def _removed_by_rule(self) -> dict[str, int]:
        return {**self._cleaner.removed_by_rule, **self._splitter.dropped_by_rule, **self._eliminated}

    # --- reporting ----------------------------------------------------------------------------------

    def _reference(self, committed: DatasetManifest) -> operations_pb2.DatasetRef:
        return operations_pb2.DatasetRef(
            dataset_id=committed.dataset_id,
            manifest_uri=self._store.uri(manifest_key(committed.dataset_id)),
            manifest_sha256=manifest_sha256(committed.to_json()),
            num_rows=committed.num_rows,
        )

    def _report(
        self, message: str, *, force: bool = False, done: int | None = None, total: int | None = None
    ) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_SECONDS:
            return
        self._last_progress = now
        kept = self._written["train"] + self._written["holdout"]
        self._progress.update(
            unit="prompts",
            done=kept if done is None else done,
            total=0 if total is None else total,
            message=message,
            metrics={
                "collected": float(self._collected),
                "kept": float(kept),
                "removed": float(sum(self._removed_by_rule().values())),
                "teacher_calls": float(self._ledger.requests - self._ledger.cached_requests),
                "cost_usd": self._ledger.cost_usd,
            },
        )
