"""The training data: the teacher's answers, read by each worker from its slice of the dataset,
tokenized, packed into rows and cut into micro-batches.

Layout of one example (prompt P tokens, response R tokens): the row holds ``prompt + response`` without
its last token, and ``labels[t]`` is the token that follows position t, -100 on prompt positions. So
position ``P - 1 + j`` predicts response token j, and the teacher's top-k for its generated token j
(the distribution it sampled token j from) sits at that same position.

Packing: several examples share a row of at most ``max_seq_len`` positions. Attention must not cross
from one example into the one before it, so the model gets ``position_ids`` that restart at 0 for every
example and no ``attention_mask``: transformers (5.x) then finds the example boundaries from the
positions (`masking_utils.find_packed_sequence_indices`) and builds a block-diagonal causal mask for
the eager and sdpa attention kernels, or variable-length sequences for flash attention. Padding at the
end of a row continues the row's last example, labelled -100 everywhere. The model must be called with
``use_cache=False``: with a cache, transformers does not look for packed sequences.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedTokenizerBase

from stillhouse.common.datasets.sparse_logprobs import (
    LOGPROB_FLOOR,
    MASKED_ID,
    TAIL_LOGPROB,
    TOKEN_IDS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    SparseLogprobs,
    topk_of,
)
from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.objectstore.objects import ObjectStore

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedAnswer:
    prompt_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    # The teacher's top-k for each response token, aligned with `response_ids`; None when the response
    # was tokenized from its text or the teacher stored no logprobs. Read from a record batch, its
    # logprobs stay float16 as stored (`collate` widens them).
    teacher: SparseLogprobs | None

    @property
    def positions(self) -> int:
        """Positions the example takes in a row: every token but the last is an input."""
        return len(self.prompt_ids) + len(self.response_ids) - 1


@dataclass
class DataCounts:
    """What became of the rows a worker read."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0  # longer than max_seq_len: the response was cut
    dropped_too_long: int = 0  # the prompt alone leaves no room for a response token
    dropped_empty: int = 0  # no response tokens
    dropped_no_teacher: int = 0  # a loss that needs stored logprobs, and the row has none

    def as_metrics(self) -> dict[str, float]:
        return {f"data_{name}": float(value) for name, value in vars(self).items()}

    def add(self, other: DataCounts) -> DataCounts:
        return DataCounts(**{name: value + getattr(other, name) for name, value in vars(self).items()})

    def describe(self) -> str:
        return (
            f"{self.rows} rows read, {self.kept} kept, {self.truncated} truncated, "
            f"{self.dropped_too_long} dropped with a prompt too long, {self.dropped_empty} with an empty "
            f"response, {self.dropped_no_teacher} without teacher logprobs"
        )


# --- reading -------------------------------------------------------------------------------------------


# Rows become Python objects one record batch at a time: a small batch keeps that bounded.
ROW_BATCH_ROWS = 256


def read_answer_rows(store: ObjectStore, dataset_id: str, shards: range | None = None) -> Iterator[dict]:
    """The rows of an answers dataset (all shards, or the given ones), in order, as dicts."""
    reader = DatasetReader(store, dataset_id)
    for batch in reader.read_batches(shards=shards, batch_size=ROW_BATCH_ROWS):
        yield from batch.to_pylist()


def answers_topk(store: ObjectStore, dataset_id: str) -> int:
    """k of the teacher's stored top-k logprobs (0: none stored)."""
    return topk_of(DatasetReader(store, dataset_id).schema)


# --- tokenizing ----------------------------------------------------------------------------------------


def tokenize_answers(
    rows: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    use_teacher_tokens: bool,
    max_seq_len: int,
    counts: DataCounts | None = None,
) -> Iterator[TokenizedAnswer]:
    """Tokenize answers rows. The prompt is the conversation rendered by the tokenizer's chat template,
    with the opening of the assistant's turn. The response is the teacher's own token ids when
    `use_teacher_tokens` (the tokenizers are the same, so the stored logprobs line up with them) and the
    row has them; otherwise its text, tokenized, plus the end-of-sequence token when the teacher stopped
    on its own. An example longer than `max_seq_len` tokens keeps its prompt and the start of its
    response; one whose prompt leaves no room for a response token is dropped. `counts` (if given)
    tallies what happened to the rows."""
    counts = counts if counts is not None else DataCounts()
    for row in rows:
        prompt_ids = list(
            tokenizer.apply_chat_template(
                row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        teacher = SparseLogprobs.from_arrow(row) if use_teacher_tokens and row["token_ids"] else None
        example = _fitted_example(
            row["prompt_id"], prompt_ids, row, teacher, tokenizer, max_seq_len=max_seq_len, counts=counts
        )
        if example is not None:
            yield example


def tokenize_answer_batch(
    batch: pa.RecordBatch,
    tokenizer: PreTrainedTokenizerBase,
    *,
    use_teacher_tokens: bool,
    max_seq_len: int,
    counts: DataCounts,
) -> Iterator[TokenizedAnswer]:
    """`tokenize_answers` over a record batch: the chat template applied to the whole batch at once, and
    the teacher's top-k cut from the batch's columns as stored (logprobs float16), each example its own
    copy so that the batch can be freed. With `use_teacher_tokens` the batch needs the sparse logprob
    columns (`TEACHER_COLUMNS`); without, it needs only `TEXT_COLUMNS`."""
    if batch.num_rows == 0:
        return
    prompts = tokenizer.apply_chat_template(
        batch.column("messages").to_pylist(), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    teachers = _batch_teachers(batch) if use_teacher_tokens else itertools.repeat(None)
    texts = {name: batch.column(name).to_pylist() for name in ("prompt_id", "response", "finish_reason")}
    for index, (prompt_ids, teacher) in enumerate(zip(prompts, teachers, strict=False)):
        row = {name: values[index] for name, values in texts.items()}
        example = _fitted_example(
            row["prompt_id"],
            list(prompt_ids),
            row,
            teacher,
            tokenizer,
            max_seq_len=max_seq_len,
            counts=counts,
        )
        if example is not None:
            yield example


TEXT_COLUMNS = ("prompt_id", "messages", "response", "finish_reason")
TEACHER_COLUMNS = (*TEXT_COLUMNS, TOKEN_IDS, TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGPROB)


def _batch_teachers(batch: pa.RecordBatch) -> Iterator[SparseLogprobs | None]:
    """Each row's stored top-k (None for a row without teacher tokens), cut out of the flat columns."""
    # Offsets index a column's whole child array, even when the batch is a slice of it.
    flat = {
        name: (
            batch.column(name).offsets.to_numpy(),
            batch.column(name).values.to_numpy(zero_copy_only=False),
        )
        for name in (TOKEN_IDS, TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGPROB)
    }

    def cut(name: str, index: int) -> np.ndarray:
        offsets, values = flat[name]
        return values[offsets[index] : offsets[index + 1]].copy()

    for index in range(batch.num_rows):
        token_ids = cut(TOKEN_IDS, index)
        steps = token_ids.shape[0]
        if steps == 0:
            yield None
            continue
        topk_ids = cut(TOPK_IDS, index)
        yield SparseLogprobs(
            token_ids=token_ids,
            topk_ids=topk_ids.reshape(steps, -1),
            topk_logprobs=cut(TOPK_LOGPROBS, index).reshape(steps, -1),
            tail_logprob=cut(TAIL_LOGPROB, index),
        )


def _fitted_example(
    prompt_id: str,
    prompt_ids: list[int],
    row: dict[str, Any],
    teacher: SparseLogprobs | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    counts: DataCounts,
) -> TokenizedAnswer | None:
    """The example of one row, cut to `max_seq_len` (None when dropped), tallied in `counts`."""
    counts.rows += 1
    if teacher is not None:
        response_ids = teacher.token_ids.tolist()
    else:
        response_ids = tokenizer.encode(row["response"], add_special_tokens=False)
        if row["finish_reason"] == "stop" and tokenizer.eos_token_id is not None:
            response_ids.append(tokenizer.eos_token_id)
    if not response_ids:
        counts.dropped_empty += 1
        return None
    room = max_seq_len - len(prompt_ids)
    if room < 1:
        counts.dropped_too_long += 1
        return None
    if len(response_ids) > room:
        counts.truncated += 1
        response_ids = response_ids[:room]
        if teacher is not None:
            teacher = _first_tokens(teacher, room)
    counts.kept += 1
    return TokenizedAnswer(prompt_id, prompt_ids, response_ids, row["response"], teacher)


def _first_tokens(teacher: SparseLogprobs, count: int) -> SparseLogprobs:
    return SparseLogprobs(
        token_ids=teacher.token_ids[:count],
        topk_ids=teacher.topk_ids[:count],
        topk_logprobs=teacher.topk_logprobs[:count],
        tail_logprob=teacher.tail_logprob[:count],
    )


# --- packing and batching ------------------------------------------------------------------------------


Item = TypeVar("Item")


def pack_stream(
    items: Iterable[Item], size_of: Callable[[Item], int], max_seq_len: int
) -> Iterator[list[Item]]:
    """Items packed into rows of at most `max_seq_len` positions, in order: each item goes into the
    current row if it fits, else it starts the next one."""
    row: list[Item] = []
    used = 0
    for item in items:
        size = size_of(item)
        if row and used + size > max_seq_len:
            yield row
            row, used = [], 0
        row.append(item)
        used += size
    if row:
        yield row


def pack_rows(examples: Sequence[TokenizedAnswer], order: Iterable[int], max_seq_len: int) -> list[list[int]]:
    """Examples (indices into `examples`, in `order`) packed into rows (`pack_stream`)."""
    return list(pack_stream(order, lambda index: examples[index].positions, max_seq_len))


@dataclass(frozen=True)
class PackedBatch:
    """A micro-batch of packed rows, [B, T] (teacher top-k [B, T, K]). `tokens`: positions that hold an
    example (not padding); `label_tokens`: positions with a label."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    teacher_ids: torch.Tensor | None
    teacher_logprobs: torch.Tensor | None
    teacher_tail: torch.Tensor | None
    tokens: int
    label_tokens: int

    def answer_ids(self) -> torch.Tensor:
        """[B, T]: which packed example each position belongs to, numbered across the batch (an example
        starts at position id 0)."""
        return (self.position_ids.reshape(-1) == 0).cumsum(0).reshape(self.position_ids.shape)

    def to(self, device: torch.device) -> PackedBatch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return PackedBatch(
            move(self.input_ids),
            move(self.labels),
            move(self.position_ids),
            move(self.teacher_ids),
            move(self.teacher_logprobs),
            move(self.teacher_tail),
            self.tokens,
            self.label_tokens,
        )


def collate(
    examples: Sequence[TokenizedAnswer],
    rows: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    teacher_k: int | None,
    length: int | None = None,
) -> PackedBatch:
    """Tensors for packed `rows`, padded to `length` (default: the longest row). With `teacher_k`, every
    example must carry the teacher's top-k; positions without a teacher have every slot masked (id -1 at
    the logprob floor, all mass in the tail: nothing of the teacher known), and labels of -100 keep them
    out of every loss anyway."""
    length = length or max(sum(examples[index].positions for index in row) for row in rows)
    shape = (len(rows), length)
    input_ids = np.full(shape, pad_token_id, np.int64)
    labels = np.full(shape, IGNORE_INDEX, np.int64)
    position_ids = np.zeros(shape, np.int64)
    if teacher_k is not None:
        teacher_ids = np.full((*shape, teacher_k), MASKED_ID, np.int64)
        teacher_logprobs = np.full((*shape, teacher_k), LOGPROB_FLOOR, np.float32)
        teacher_tail = np.zeros(shape, np.float32)
    tokens = 0
    for row_index, row in enumerate(rows):
        start = 0
        for index in row:
            example = examples[index]
            sequence = example.prompt_ids + example.response_ids
            size = len(sequence) - 1
            end = start + size
            input_ids[row_index, start:end] = sequence[:-1]
            prompt_len = len(example.prompt_ids)
            labels[row_index, start + prompt_len - 1 : end] = example.response_ids
            position_ids[row_index, start:end] = np.arange(size)
            if teacher_k is not None:
                teacher = example.teacher
                if teacher is None:
                    raise ValueError(f"example {example.prompt_id} has no teacher logprobs")
                where = slice(start + prompt_len - 1, end)
                teacher_ids[row_index, where] = teacher.topk_ids
                teacher_logprobs[row_index, where] = teacher.topk_logprobs
                teacher_tail[row_index, where] = teacher.tail_logprob
            start = end
        tokens += start
        # Padding continues the last example's positions: it sees that example, which is harmless (its
        # labels are -100 and nothing comes after it), and a row holding one example stays one sequence,
        # which keeps the attention kernels on their plain causal path.
        last_start = start - (examples[row[-1]].positions if row else 0)
        position_ids[row_index, start:] = np.arange(start - last_start, length - last_start)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        teacher_ids=torch.from_numpy(teacher_ids) if teacher_k is not None else None,
        teacher_logprobs=torch.from_numpy(teacher_logprobs) if teacher_k is not None else None,
        teacher_tail=torch.from_numpy(teacher_tail) if teacher_k is not None else None,
        tokens=tokens,
        label_tokens=int((labels != IGNORE_INDEX).sum()),
    )


@dataclass(frozen=True)
class BatchPlan:
    """How `batch_tokens` per optimizer step (over all workers) becomes packed rows of `max_seq_len`:
    each worker takes `rows_per_step` rows per step, in micro-batches of at most `micro_batch_rows`
    (gradients accumulate over them)."""

    rows_per_step: int
    micro_batch_rows: int

    @classmethod
    def create(cls, batch_tokens: int, max_seq_len: int, world: int, micro_batch_tokens: int) -> BatchPlan:
        rows_per_step = max(1, round(batch_tokens / (world * max_seq_len)))
        micro_batch_rows = max(1, min(rows_per_step, micro_batch_tokens // max_seq_len))
        return cls(rows_per_step, micro_batch_rows)

    @property
    def accumulation_steps(self) -> int:
        return -(-self.rows_per_step // self.micro_batch_rows)

    def steps_per_epoch(self, rows: int) -> int:
        return -(-rows // self.rows_per_step)

    def step_batch(self, rows: Sequence[list[TokenizedAnswer]]) -> StepBatch:
        """A step's packed rows as its examples and micro-batches of rows (indices into the examples)."""
        examples: list[TokenizedAnswer] = []
        indexed: list[list[int]] = []
        for row in rows:
            indexed.append(list(range(len(examples), len(examples) + len(row))))
            examples.extend(row)
        micro_batches = [
            indexed[start : start + self.micro_batch_rows]
            for start in range(0, len(indexed), self.micro_batch_rows)
        ]
        return StepBatch(examples, micro_batches)


@dataclass(frozen=True)
class StepBatch:
    """One optimizer step of a worker: its examples, and its micro-batches as lists of packed rows, each
    row a list of indices into `examples` (what `collate` takes)."""

    examples: list[TokenizedAnswer]
    micro_batches: list[list[list[int]]]
