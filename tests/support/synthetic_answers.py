"""Synthetic answers datasets of any size, in the teacher stage's schema, built column by column with
numpy and pyarrow (no Python loop over rows): a million rows take seconds.

Every row: a one-message conversation ``"question <n>"``, an answer of `answer_tokens` random tokens
below `vocab`, and at each of them a top-k holding the answer token first, with logprobs that sum to
90% of the mass (the tail holds the rest).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import MESSAGE, answers_schema
from stillhouse.common.datasets.store import DatasetWriter
from stillhouse.common.objectstore.objects import ObjectStore

LINEAGE = Lineage(job_id="synthetic", stage="teacher")


def synthetic_answers(
    rows: int,
    *,
    top_k: int = 20,
    answer_tokens: int = 32,
    vocab: int = 1000,
    seed: int = 0,
    first_row: int = 0,
) -> pa.Table:
    """`rows` answers, numbered from `first_row` (the number is in the prompt and its id)."""
    generator = np.random.default_rng([seed, first_row])
    numbers = pa.array(np.arange(first_row, first_row + rows))
    text = pc.cast(numbers, pa.string())
    contents = pc.binary_join_element_wise("question", text, " ")
    messages = pa.ListArray.from_arrays(
        pa.array(np.arange(rows + 1, dtype=np.int32)),
        pa.StructArray.from_arrays([pa.array(["user"] * rows), contents], fields=list(MESSAGE)),
    )
    tokens = generator.integers(1, vocab, (rows, answer_tokens), dtype=np.int32)
    topk_ids = generator.integers(1, vocab, (rows, answer_tokens, top_k), dtype=np.int32)
    topk_ids[:, :, 0] = tokens
    shape = np.exp(-np.arange(top_k) / 3.0)
    logprobs = np.log(0.9 * shape / shape.sum()).astype(np.float16)
    token_offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * answer_tokens)
    topk_offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * answer_tokens * top_k)

    def listed(offsets: pa.Array, values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))

    constant = np.zeros(rows, dtype=np.int32)
    schema = answers_schema(top_k)
    columns = {
        "prompt_id": pc.binary_join_element_wise("synthetic", text, "-"),
        "messages": messages,
        "response": pa.array(["synthetic answer"] * rows),
        "finish_reason": pa.array(["length"] * rows),
        "prompt_tokens": pa.array(constant),
        "completion_tokens": pa.array(constant + answer_tokens),
        "latency_seconds": pa.array(np.zeros(rows, dtype=np.float32)),
        "token_id_source": pa.array(["local"] * rows),
        "masked_alternatives": pa.array(constant),
        "top1_mismatches": pa.array(constant),
        "stop_token_added": pa.array(np.zeros(rows, dtype=bool)),
        "token_ids": listed(token_offsets, tokens),
        "topk_ids": listed(topk_offsets, topk_ids),
        "topk_logprobs": listed(topk_offsets, np.broadcast_to(logprobs, topk_ids.shape)),
        "tail_logprob": listed(token_offsets, np.full((rows, answer_tokens), np.log(0.1), np.float16)),
    }
    return pa.Table.from_arrays(
        [columns[name].cast(schema.field(name).type) for name in schema.names], schema=schema
    )


def write_synthetic_answers(
    store: ObjectStore,
    dataset_id: str,
    rows: int,
    *,
    max_shard_rows: int = 1_000_000,
    chunk_rows: int = 100_000,
    **options,
) -> None:
    """Commit `rows` synthetic answers as dataset `dataset_id`, generated `chunk_rows` at a time."""
    with DatasetWriter(
        store, dataset_id, answers_schema(options.get("top_k", 20)), LINEAGE, max_shard_rows=max_shard_rows
    ) as writer:
        for first_row in range(0, rows, chunk_rows):
            writer.write_batch(
                synthetic_answers(min(chunk_rows, rows - first_row), first_row=first_row, **options)
            )
        writer.commit()
