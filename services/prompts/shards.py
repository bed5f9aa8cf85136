"""The parallel half of the prompts stage: shards that read, render or generate prompts and judge each
one on its own. The stage merges their outputs in shard order (`merge`).

A shard is one slice of the stage's input: rows `start..stop` of one source, positions `start..stop` of
the template's prompts, or one part of a teacher-driven generation (`GENERATION_PART_PROMPTS` prompts or
more, fixed by `generate.count` alone, so that the prompts never depend on how the stage is sharded). It
reads or makes its prompts, gives them the system prompt and their id, and prepares them for cleaning
(`PromptCleaner.prepare`: the length and language rules, the exact hash, the MinHash signature). The
survivors, in order, go to one Parquet object (`CANDIDATES_SCHEMA`); then a small JSON summary of the
shard's counts is put beside it, last: the summary is the shard's commit point, and a re-run finds it and
skips the shard (resume per shard), answering with the summary the shard wrote.

A generation part works as the single-process generation did, on its own: its candidates pass a cleaner of
its own, which knows the seed pool (the seed prompts shown to the teacher) and the part's earlier prompts,
so that it stops at its share of `count`; what duplicates prompts elsewhere (other parts, seed prompts
outside the pool) the merge removes, and that adds to the stage's shortfall.

Payloads are JSON and hold no secrets. `prepare_shard` is the entry a Ray worker imports: it builds the
object store, input roots and teacher client from its own environment (`PromptsSettings()`).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf import json_format

from stillhouse.common.datasets.records import MESSAGE, prompt_id
from stillhouse.common.fanout.plan import ShardReport
from stillhouse.common.input_roots import InputRoots
from stillhouse.common.jobspec import GenerationStrategy, PromptsSpec
from stillhouse.common.objectstore.objects import ObjectNotFound, ObjectStore
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.prompts.cleaning import PreparedPrompts, PromptCleaner
from stillhouse.prompts.generation import Completer, GenerationOutcome, evol_instruct, self_instruct
from stillhouse.prompts.sources import RowMark, iter_source, read_lines
from stillhouse.prompts.split import source_group, template_group
from stillhouse.prompts.stage_errors import stage_errors
from stillhouse.prompts.templates import TemplateError, render_templates
from stillhouse.teacher.v1 import teacher_pb2

Conversation = list[dict[str, str]]

SHARD_FUNCTION = "stillhouse.prompts.shards:prepare_shard"
# Prompts read, prepared and written at once.
CHUNK_PROMPTS = 2048
# A teacher-driven generation is cut into parts of this many prompts at least (more for a count beyond
# MAX_GENERATION_PARTS parts of it).
GENERATION_PART_PROMPTS = 256
MAX_GENERATION_PARTS = 4096
NUM_PERM = 128
CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("messages", pa.list_(MESSAGE), nullable=False),
        # The held-out split's group key (see `split`): the row's group, the template concept, or the id.
        pa.field("split_key", pa.string(), nullable=False),
        pa.field("digest", pa.uint64(), nullable=False),
        pa.field("signature", pa.list_(pa.uint32(), NUM_PERM), nullable=False),
    ]
)


def user_text(conversation: Conversation) -> str:
    """The text that cleaning and the split judge: what the user says."""
    return "\n".join(message["content"] for message in conversation if message["role"] == "user")


def with_system_prompt(conversation: Conversation, system: str | None) -> Conversation:
    if system is None or (conversation and conversation[0]["role"] == "system"):
        return conversation
    return [{"role": "system", "content": system}, *conversation]


def generation_parts(count: int) -> list[int]:
    """How many prompts each part of a teacher-driven generation of `count` prompts asks for."""
    size = max(GENERATION_PART_PROMPTS, -(-count // MAX_GENERATION_PARTS))
    return [min(size, count - start) for start in range(0, count, size)] or [0]


# --- what a shard is handed -----------------------------------------------------------------------------


class LedgeredCompleter(Completer, Protocol):
    ledger: teacher_pb2.Ledger


# (job id, tenant, spec.teacher) -> a completer for one shard, with a ledger of its own.
OpenCompleter = Callable[[str, str, dict[str, Any]], AbstractAsyncContextManager[LedgeredCompleter]]


@dataclass(frozen=True)
class ShardResources:
    """What a shard works with, built by the service (in this process) or by a Ray worker."""

    store: ObjectStore
    input_roots: InputRoots
    open_completer: OpenCompleter | None = None


@dataclass(frozen=True)
class ShardSummary:
    """A shard's counts: what it read or made, and what it removed before the merge."""

    key: str
    collected: int
    candidates: int
    removed: dict[str, int]  # by the cleaning rules (length, language; a generation part's duplicates)
    eliminated: dict[str, int]  # by generation's checks
    ledger: dict[str, Any]  # a generation part's teacher ledger (JSON of `teacher_pb2.Ledger`)
    shortfall: int = 0
    stopped_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "collected": self.collected,
            "candidates": self.candidates,
            "removed": self.removed,
            "eliminated": self.eliminated,
            "ledger": self.ledger,
            "shortfall": self.shortfall,
            "stopped_reason": self.stopped_reason,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ShardSummary:
        return cls(**document)

    def teacher_ledger(self) -> teacher_pb2.Ledger:
        return json_format.ParseDict(self.ledger, teacher_pb2.Ledger())


def candidates_key(key: str) -> str:
    return f"{key}.parquet"


def summary_key(key: str) -> str:
    return f"{key}.json"


# --- the shard function ---------------------------------------------------------------------------------


async def run_shard(
    payload: dict[str, Any], report: ShardReport, *, resources: ShardResources
) -> dict[str, Any]:
    """Answer one shard's payload (see the module docstring); returns its `ShardSummary` as JSON.

    A payload is {"run": key of the run's JSON object, "key": the shard's output key, "input": its slice};
    the run's object holds job_id, tenant, spec (spec.prompts), teacher (spec.teacher or None), and the
    generation's concurrency and patience."""
    store = resources.store
    key = payload["key"]
    with stage_errors():
        committed = await asyncio.to_thread(_committed_summary, store, key)
        if committed is not None:
            report({"prompts": committed.collected, **_ledger_counters(committed.teacher_ledger())})
            return committed.to_json()
        # What every shard of the run shares, beside this shard's own slice.
        payload = {**json.loads(await asyncio.to_thread(store.get_bytes, payload["run"])), **payload}
        spec = PromptsSpec.model_validate(payload["spec"])
        kind = payload["input"]["kind"]
        if kind == "generation":
            summary = await _generate_part(payload, spec, report, resources)
        else:
            loop = asyncio.get_running_loop()

            def report_from_thread(counters: Mapping[str, float]) -> None:
                loop.call_soon_threadsafe(report, dict(counters))

            summary = await asyncio.to_thread(_prepare_rows, payload, spec, report_from_thread, resources)
        await asyncio.to_thread(
            store.put_bytes, summary_key(key), json.dumps(summary.to_json(), sort_keys=True).encode()
        )
    return summary.to_json()


async def prepare_shard(payload: dict[str, Any], report: ShardReport) -> dict[str, Any]:
    """The shard function a Ray worker runs: everything it needs comes from its environment."""
    from stillhouse.common.objectstore.open_store import open_object_store
    from stillhouse.prompts.config import PromptsSettings

    settings = PromptsSettings()
    completers = None
    if payload["input"]["kind"] == "generation":  # only generation calls the teacher
        credentials = ServiceCredentials.load(settings)
        completers = teacher_completers(
            settings.teacher_address, credentials, settings.teacher_timeout_seconds
        )
    resources = ShardResources(
        store=open_object_store(settings.object_store),
        input_roots=InputRoots.of(settings.input_roots),
        open_completer=completers,
    )
    return await run_shard(payload, report, resources=resources)


def teacher_completers(
    address: str, credentials: ServiceCredentials, timeout_seconds: float
) -> OpenCompleter:
    """Completers that call the teacher service at `address`, one client (and ledger) per shard."""
    from stillhouse.prompts.teacher_client import TeacherClient

    @asynccontextmanager
    async def open_completer(
        job_id: str, tenant: str, teacher: dict[str, Any]
    ) -> AsyncIterator[LedgeredCompleter]:
        async with TeacherClient(
            address,
            credentials=credentials,
            job_id=job_id,
            tenant=tenant,
            teacher=teacher,
            timeout_seconds=timeout_seconds,
        ) as client:
            yield client

    return open_completer


def _committed_summary(store: ObjectStore, key: str) -> ShardSummary | None:
    try:
        return ShardSummary.from_json(json.loads(store.get_bytes(summary_key(key))))
    except ObjectNotFound:
        return None


def _ledger_counters(ledger: teacher_pb2.Ledger) -> dict[str, float]:
    return {"teacher_calls": float(ledger.requests - ledger.cached_requests), "cost_usd": ledger.cost_usd}


# --- rows of a source, prompts of the template ----------------------------------------------------------


@dataclass(frozen=True)
class _Prompt:
    conversation: Conversation
    split_group: str | None  # the split's group key; None: the prompt's own id


def _prepare_rows(
    payload: dict[str, Any],
    spec: PromptsSpec,
    report: ShardReport,
    resources: ShardResources,
) -> ShardSummary:
    cleaner = PromptCleaner(spec.filters, num_perm=NUM_PERM)
    removed: Counter[str] = Counter()
    collected = candidates = 0
    with (
        _prompts_of(payload, spec, resources) as prompts,
        CandidatesWriter(resources.store, payload["key"]) as out,
    ):
        while chunk := list(islice(prompts, CHUNK_PROMPTS)):
            collected += len(chunk)
            prepared = cleaner.prepare([user_text(prompt.conversation) for prompt in chunk])
            removed.update(rule for rule in prepared.rules if rule is not None)
            survivors = [chunk[position] for position in prepared.survivors]
            out.write(survivors, prepared, spec.system_prompt)
            candidates += len(survivors)
            report({"prompts": float(collected)})
        out.commit()
    return ShardSummary(payload["key"], collected, candidates, dict(removed), {}, {})


def _prompts_of(payload: dict[str, Any], spec: PromptsSpec, resources: ShardResources) -> _Closing:
    selected = payload["input"]
    start, stop = selected["start"], selected["stop"]
    if selected["kind"] == "source":
        index = selected["index"]
        source = spec.sources[index]
        rows = None if stop is None else range(start, stop)
        mark = None if selected["mark"] is None else RowMark(*selected["mark"])
        found = iter_source(
            source, resources.store, spec.seed, index=index, roots=resources.input_roots, rows=rows, mark=mark
        )
        return _Closing(
            _Prompt(p.conversation, None if p.group is None else source_group(p.group)) for p in found
        )
    generation = spec.generate
    rendered = render_templates(
        generation, template_slot_values(spec, resources), spec.seed, positions=range(start, stop)
    )
    prompts = (
        _Prompt(
            [{"role": "user", "content": p.text}], template_group(generation.template, p.first_slot_value)
        )
        for p in rendered
    )
    return _Closing(prompts, rendered.close)


class _Closing:
    """An iterator in a `with` block that ends what feeds it (the template renderer process)."""

    def __init__(self, items: Iterator[_Prompt], close: Callable[[], None] = lambda: None) -> None:
        self._items = items
        self._close = close

    def __enter__(self) -> Iterator[_Prompt]:
        return self._items

    def __exit__(self, *exc_info: object) -> None:
        self._close()


def template_slot_values(spec: PromptsSpec, resources: ShardResources) -> dict[str, list[str]]:
    """`slots` and the values read from `slotFiles`, merged."""
    generation = spec.generate
    both = sorted(set(generation.slots) & set(generation.slot_files))
    if both:
        raise TemplateError(f"slot {both[0]!r} is given in both slots and slotFiles: give it once")
    from_files = {
        name: read_lines(path, resources.store, resources.input_roots)
        for name, path in generation.slot_files.items()
    }
    return {**generation.slots, **from_files}


# --- a part of a teacher-driven generation --------------------------------------------------------------


async def _generate_part(
    payload: dict[str, Any],
    spec: PromptsSpec,
    report: ShardReport,
    resources: ShardResources,
) -> ShardSummary:
    if resources.open_completer is None:
        raise RuntimeError("a generation shard needs a teacher: the shard resources have no completer")
    selected = payload["input"]
    generation = spec.generate
    seeds: list[str] = json.loads(await asyncio.to_thread(resources.store.get_bytes, selected["seed_pool"]))
    cleaner = PromptCleaner(spec.filters, num_perm=NUM_PERM)
    await asyncio.to_thread(cleaner.admit_batch, seeds)  # the pool is kept: the part's prompts must differ
    baseline = Counter(cleaner.removed_by_rule)
    kept: list[str] = []
    strategy = self_instruct if generation.strategy is GenerationStrategy.SELF_INSTRUCT else evol_instruct

    async def admit(texts: list[str]) -> list[str | None]:
        verdicts = await asyncio.to_thread(cleaner.admit_batch, texts)
        kept.extend(text for text, verdict in zip(texts, verdicts, strict=True) if verdict is None)
        return verdicts

    async with resources.open_completer(
        payload["job_id"], payload["tenant"], payload["teacher"]
    ) as completer:

        def on_progress(outcome: GenerationOutcome) -> None:
            report({"prompts": float(len(outcome.prompts)), **_ledger_counters(completer.ledger)})

        outcome = await strategy(
            generation,
            seeds,
            completer,
            admit,
            seed=spec.seed,
            concurrency=payload["concurrency"],
            patience=payload["patience"],
            on_progress=on_progress,
            part=selected["part"],
            count=selected["count"],
        )
        ledger = json_format.MessageToDict(completer.ledger, preserving_proto_field_name=True)
        report({"prompts": float(len(outcome.prompts)), **_ledger_counters(completer.ledger)})

    def write() -> None:
        with CandidatesWriter(resources.store, payload["key"]) as out:
            prompts = [_Prompt([{"role": "user", "content": text}], None) for text in kept]
            out.write(prompts, cleaner.prepare(kept), spec.system_prompt)
            out.commit()

    await asyncio.to_thread(write)
    removed = Counter(cleaner.removed_by_rule)
    removed.subtract(baseline)
    eliminated = dict(outcome.eliminated)
    collected = len(kept) + sum(removed.values()) + sum(eliminated.values())
    return ShardSummary(
        payload["key"],
        collected,
        len(kept),
        {rule: count for rule, count in removed.items() if count},
        eliminated,
        ledger,
        outcome.shortfall,
        outcome.stopped_reason,
    )


# --- the candidates object ------------------------------------------------------------------------------


class CandidatesWriter:
    """A shard's candidates, written to a local Parquet file and put whole into the store on `commit`."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self._store = store
        self._key = candidates_key(key)
        self._folder = tempfile.TemporaryDirectory(prefix="prompt-candidates-")
        self._path = Path(self._folder.name) / "candidates.parquet"
        # Hashes and signatures are random: dictionaries and statistics would cost time and save nothing.
        self._parquet = pq.ParquetWriter(
            self._path, CANDIDATES_SCHEMA, compression="zstd", use_dictionary=False, write_statistics=False
        )

    def __enter__(self) -> CandidatesWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._parquet.close()
        self._folder.cleanup()

    def write(self, prompts: list[_Prompt], prepared: PreparedPrompts, system_prompt: str | None) -> None:
        """The survivors of `prepared`, which are `prompts`, in order."""
        if not prompts:
            return
        messages = [with_system_prompt(prompt.conversation, system_prompt) for prompt in prompts]
        identities = [prompt_id(conversation) for conversation in messages]
        split_keys = [
            prompt.split_group or identity for prompt, identity in zip(prompts, identities, strict=True)
        ]
        signatures = pa.FixedSizeListArray.from_arrays(pa.array(prepared.signatures.reshape(-1)), NUM_PERM)
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(identities, pa.string()),
                pa.array(messages, pa.list_(MESSAGE)),
                pa.array(split_keys, pa.string()),
                pa.array(prepared.digests, pa.uint64()),
                signatures,
            ],
            schema=CANDIDATES_SCHEMA,
        )
        self._parquet.write_batch(batch)

    def commit(self) -> None:
        self._parquet.close()
        self._store.put_file(self._key, self._path)


def read_candidates(store: ObjectStore, key: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A committed shard's candidates, in order, `batch_rows` at a time (from a local copy)."""
    with tempfile.TemporaryDirectory(prefix="prompt-candidates-") as folder:
        path = Path(folder) / "candidates.parquet"
        store.get_file(candidates_key(key), path)
        candidates = pq.ParquetFile(path)
        # Row group by row group (each a batch the shard wrote): a reader that reads ahead would hold
        # much of a big shard in memory.
        for group in range(candidates.num_row_groups):
            yield from candidates.read_row_group(group).to_batches(max_chunksize=batch_rows)
