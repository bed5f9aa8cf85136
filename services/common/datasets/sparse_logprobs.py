"""Per-token top-k teacher logprobs, stored sparsely in Parquet.

One row per teacher response, four list columns (T generated tokens, k alternatives per token):

- ``token_ids``     list<int32>,   length T: the tokens the teacher generated.
- ``topk_ids``      list<int32>,   length T*k: the k most likely tokens at each step, most likely first.
- ``topk_logprobs`` list<float16>, length T*k: their natural-log probabilities, in the same order.
- ``tail_logprob``  list<float16>, length T: log of the probability mass outside the top k,
  log(1 - sum(exp(topk_logprobs))), so that a loss can account for it (a full teacher distribution
  is the top k plus this one bucket).

k is in each field's metadata and in the schema metadata (``stillhouse.topk``); k = 0 means the
teacher gave no logprobs (``topk_*`` rows are empty, ``tail_logprob`` is 0: all mass is the tail).
The flat lists reshape to [T, k] with numpy (``np.asarray(row["topk_ids"]).reshape(-1, k)``);
nothing else is needed to read them, in pyarrow or ``datasets.load_dataset("parquet", ...)``.

Size: logprobs are float16, rounded before they are stored to as few significant bits as keep the
probability within ``PROBABILITY_TOLERANCE`` of the true one and the logprob within
``LOGPROB_TOLERANCE`` of the true one. Short mantissas compress well with zstd, and the values are
still plain float16 that need no decoding. Ids are int32 (Parquet stores any integer narrower than
32 bits as INT32 anyway) and compress well with the Parquet dictionary encoding; logprobs compress
best with BYTE_STREAM_SPLIT, which `DatasetWriter` uses for every floating-point column.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOPK_METADATA_KEY = b"stillhouse.topk"
LAYOUT_METADATA_KEY = b"stillhouse.layout"
LAYOUT_NAME = b"sparse-topk-logprobs/v1"

TOKEN_IDS = "token_ids"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TAIL_LOGPROB = "tail_logprob"
COLUMNS = (TOKEN_IDS, TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGPROB)

# Every stored probability is within this of the true one ...
PROBABILITY_TOLERANCE = 1e-3
# ... and every stored logprob within this of the true one, so that small probabilities stay within 3%
# (a reverse-KL loss takes their log).
LOGPROB_TOLERANCE = 0.03
# Logprobs are clamped to this so that they stay finite (exp(-60) is 1e-26: no loss can tell it from 0).
LOGPROB_FLOOR = -60.0
# The id of a masked top-k slot: an alternative whose id is not known, or one the teacher did not give.
# Masked slots hold LOGPROB_FLOOR, come after the known slots of their position, and their mass is part
# of the tail; a position with nothing known has every slot masked and a tail of 0.
MASKED_ID = -1

# Rounding aims inside a slightly smaller tolerance, so that float error in the logprobs the caller
# computed cannot push a stored value past the promised one.
_ROUNDING_SAFETY = 0.95
_FLOAT16_SIGNIFICANT_BITS = 11

_ID_TYPE = pa.int32()
_LOGPROB_TYPE = pa.float16()


def arrow_fields(k: int) -> list[pa.Field]:
    """The four fields of the layout for top-`k` logprobs, to put in a dataset schema."""
    _check_k(k)
    metadata = {TOPK_METADATA_KEY: str(k).encode(), LAYOUT_METADATA_KEY: LAYOUT_NAME}
    return [
        pa.field(TOKEN_IDS, pa.list_(_ID_TYPE), nullable=False, metadata=metadata),
        pa.field(TOPK_IDS, pa.list_(_ID_TYPE), nullable=False, metadata=metadata),
        pa.field(TOPK_LOGPROBS, pa.list_(_LOGPROB_TYPE), nullable=False, metadata=metadata),
        pa.field(TAIL_LOGPROB, pa.list_(_LOGPROB_TYPE), nullable=False, metadata=metadata),
    ]


def arrow_schema(k: int, other_fields: Iterable[pa.Field] = ()) -> pa.Schema:
    """A dataset schema: `other_fields` (prompt, response text, ...) then the layout's fields, with k
    in the schema metadata too."""
    return pa.schema(
        [*other_fields, *arrow_fields(k)],
        metadata={TOPK_METADATA_KEY: str(k).encode(), LAYOUT_METADATA_KEY: LAYOUT_NAME},
    )


def topk_of(schema: pa.Schema) -> int:
    """k of a schema that holds the layout; ValueError if it does not."""
    metadata = schema.metadata or {}
    if TOPK_METADATA_KEY not in metadata:
        raise ValueError(
            f"schema has no {TOPK_METADATA_KEY.decode()!r} metadata: not a sparse logprob layout"
        )
    return int(metadata[TOPK_METADATA_KEY])


@dataclass(frozen=True)
class SparseLogprobs:
    """Top-k logprobs of one teacher response of T tokens. Arrays, not lists: [T], [T, k], [T, k], [T]."""

    token_ids: np.ndarray  # int32 [T]
    topk_ids: np.ndarray  # int32 [T, k], most likely first
    topk_logprobs: np.ndarray  # float32 [T, k]
    tail_logprob: np.ndarray  # float32 [T]: log of the mass outside the top k

    def __post_init__(self) -> None:
        steps = self.token_ids.shape[0]
        if self.token_ids.ndim != 1 or self.tail_logprob.shape != (steps,):
            raise ValueError(
                f"token_ids and tail_logprob must both have shape [T]; got {self.token_ids.shape} "
                f"and {self.tail_logprob.shape}"
            )
        if (
            self.topk_ids.ndim != 2
            or self.topk_ids.shape[0] != steps
            or self.topk_logprobs.shape != self.topk_ids.shape
        ):
            raise ValueError(
                f"topk_ids and topk_logprobs must both have shape [T={steps}, k]; got {self.topk_ids.shape} "
                f"and {self.topk_logprobs.shape}"
            )

    @property
    def k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @classmethod
    def from_dense_logits(
        cls, logits: np.ndarray, token_ids: np.ndarray, k: int, *, rows_per_chunk: int = 32
    ) -> SparseLogprobs:
        """Top-k of the log-softmax of `logits` [T, V] (any float dtype; -inf masks a token), most likely
        first, with the log of the mass outside the top k. Computed in float32 (float64 for float64
        logits) with float64 sums, `rows_per_chunk` rows at a time to bound memory."""
        logits = np.asarray(logits)
        token_ids = np.asarray(token_ids, dtype=np.int32)
        if logits.ndim != 2 or logits.shape[0] != token_ids.shape[0]:
            raise ValueError(f"logits must have shape [T={token_ids.shape[0]}, V]; got {logits.shape}")
        _check_k(k)
        steps, vocab = logits.shape
        if k > vocab:
            raise ValueError(f"k={k} is more than the vocabulary ({vocab} tokens)")
        topk_ids = np.empty((steps, k), dtype=np.int32)
        topk_logprobs = np.empty((steps, k), dtype=np.float64)
        tail = np.empty(steps, dtype=np.float64)
        work_dtype = np.float64 if logits.dtype == np.float64 else np.float32
        for start in range(0, steps, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, steps))
            ids, logprobs, tail[rows] = _topk_log_softmax(logits[rows].astype(work_dtype, copy=False), k)
            topk_ids[rows], topk_logprobs[rows] = ids, logprobs
        return cls(
            token_ids=token_ids,
            topk_ids=topk_ids,
            topk_logprobs=np.maximum(topk_logprobs, LOGPROB_FLOOR).astype(np.float32),
            tail_logprob=np.maximum(tail, LOGPROB_FLOOR).astype(np.float32),
        )

    def to_arrow_columns(self) -> dict[str, pa.Array]:
        """One row of each of the layout's columns (length-1 list arrays), logprobs rounded for storage."""
        return {
            TOKEN_IDS: _list_of(pa.array(self.token_ids, _ID_TYPE)),
            TOPK_IDS: _list_of(pa.array(self.topk_ids.reshape(-1), _ID_TYPE)),
            TOPK_LOGPROBS: _list_of(
                pa.array(storage_logprobs(self.topk_logprobs).reshape(-1), _LOGPROB_TYPE)
            ),
            TAIL_LOGPROB: _list_of(pa.array(storage_logprobs(self.tail_logprob), _LOGPROB_TYPE)),
        }

    @classmethod
    def from_arrow(cls, row: Mapping[str, Any], k: int | None = None) -> SparseLogprobs:
        """Back from one row: a dict of lists (``table.to_pylist()``, a `datasets` row) or of Arrow
        list scalars. k comes from the row's length when not given."""
        token_ids = _to_numpy(row[TOKEN_IDS], np.int32)
        flat_ids = _to_numpy(row[TOPK_IDS], np.int32)
        flat_logprobs = _to_numpy(row[TOPK_LOGPROBS], np.float32)
        steps = token_ids.shape[0]
        if k is None:
            if steps == 0:
                raise ValueError("cannot tell k of an empty response: pass k")
            k, remainder = divmod(flat_ids.shape[0], steps)
            if remainder:
                raise ValueError(f"{TOPK_IDS} has {flat_ids.shape[0]} entries, not a multiple of T={steps}")
        if flat_ids.shape[0] != steps * k or flat_logprobs.shape[0] != steps * k:
            raise ValueError(
                f"expected {steps}*{k} top-k entries; "
                f"got {flat_ids.shape[0]} ids and {flat_logprobs.shape[0]} logprobs"
            )
        return cls(
            token_ids=token_ids,
            topk_ids=flat_ids.reshape(steps, k),
            topk_logprobs=flat_logprobs.reshape(steps, k),
            tail_logprob=_to_numpy(row[TAIL_LOGPROB], np.float32),
        )


def rows_to_arrow(rows: Iterable[SparseLogprobs], k: int) -> dict[str, pa.Array]:
    """Many responses as the layout's four columns (one row each), ready for `pa.table` with other
    columns. Every response must have `k` alternatives per token."""
    rows = list(rows)
    for row in rows:
        if row.k != k:
            raise ValueError(f"a response has k={row.k}, expected k={k}")
    token_counts = np.fromiter((row.num_tokens for row in rows), dtype=np.int64, count=len(rows))
    step_offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(token_counts, out=step_offsets[1:])

    def column(values: list[np.ndarray], offsets: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        flat = np.concatenate(values) if values else np.empty(0)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, arrow_type))

    return {
        TOKEN_IDS: column([row.token_ids for row in rows], step_offsets, _ID_TYPE),
        TOPK_IDS: column([row.topk_ids.reshape(-1) for row in rows], step_offsets * k, _ID_TYPE),
        TOPK_LOGPROBS: column(
            [storage_logprobs(row.topk_logprobs).reshape(-1) for row in rows], step_offsets * k, _LOGPROB_TYPE
        ),
        TAIL_LOGPROB: column(
            [storage_logprobs(row.tail_logprob) for row in rows], step_offsets, _LOGPROB_TYPE
        ),
    }


def storage_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """The float16 stored for each logprob (any shape): the true value rounded to as few significant
    bits as both tolerances allow (see the module docstring)."""
    true = np.clip(np.asarray(logprobs, dtype=np.float64), LOGPROB_FLOOR, 0.0)
    probability = np.exp(true)
    tolerance = _ROUNDING_SAFETY * PROBABILITY_TOLERANCE
    with np.errstate(divide="ignore"):
        low = np.maximum(np.log(np.maximum(probability - tolerance, 0.0)), true - LOGPROB_TOLERANCE)
        high = np.minimum(np.log(np.minimum(probability + tolerance, 1.0)), true + LOGPROB_TOLERANCE)
        # Rounding |x| = f * 2**e (0.5 <= f < 1) to b significant bits errs by at most 2**(e - b - 1).
        slack = np.minimum(true - low, high - true)
        fraction, exponent = np.frexp(true)
        bits = np.clip(np.ceil(exponent - 1 - np.log2(slack)), 1, _FLOAT16_SIGNIFICANT_BITS)
    # That bound is for the worse side; the tolerance is often wider on one side, so try shorter first.
    stored = true.astype(np.float16)
    settled = np.zeros(true.shape, dtype=bool)
    for fewer in (2, 1, 0):
        scale = np.exp2(np.maximum(bits - fewer, 1))
        candidate = np.ldexp(np.round(fraction * scale) / scale, exponent).astype(np.float16)
        # A value too close to 0 for a normal float16 loses bits in the cast: it keeps the nearest.
        fits = ~settled & (candidate >= low) & (candidate <= high)
        stored[fits] = candidate[fits]
        settled |= fits
    return stored


def _topk_log_softmax(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = logits.shape[0]
    peak = logits.max(axis=1, keepdims=True)
    if not np.isfinite(peak).all():
        raise ValueError("every row of logits needs at least one finite value, and none may be +inf or NaN")
    shifted = logits - peak
    exps = np.exp(shifted)
    total = exps.sum(axis=1, dtype=np.float64)
    log_total = np.log(total)
    if k == 0:
        return np.empty((steps, 0), np.int32), np.empty((steps, 0)), np.zeros(steps)
    candidates = _topk_candidates(shifted, k)
    values = np.take_along_axis(shifted, candidates, axis=1)
    # Most likely first; among equals, the lower token id first.
    order = np.lexsort((candidates, -values.astype(np.float64)), axis=1)[:, :k]
    ids = np.take_along_axis(candidates, order, axis=1)
    top_values = np.take_along_axis(values, order, axis=1).astype(np.float64)
    # The tail is summed directly, not as 1 - top mass, so that a tiny tail keeps its size.
    np.put_along_axis(exps, ids, 0.0, axis=1)
    rest = exps.sum(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        tail = np.log(rest) - log_total
    return ids.astype(np.int32), top_values - log_total[:, None], tail


_BLOCK = 64


def _topk_candidates(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of a superset of each row's top k, found without partitioning whole rows of a
    large vocabulary: the top k of a row lie in the k blocks of columns with the largest maxima."""
    steps, vocab = values.shape
    if vocab <= 4 * k * _BLOCK:
        return np.argpartition(values, vocab - k, axis=1)[:, vocab - k :]
    blocks = vocab // _BLOCK
    block_max = values[:, : blocks * _BLOCK].reshape(steps, blocks, _BLOCK).max(axis=2)
    top_blocks = np.argpartition(block_max, blocks - k, axis=1)[:, blocks - k :]
    columns = (top_blocks[:, :, None] * _BLOCK + np.arange(_BLOCK)).reshape(steps, -1)
    # The last, partial block always competes.
    columns = np.concatenate([columns, np.tile(np.arange(blocks * _BLOCK, vocab), (steps, 1))], axis=1)
    return columns


def bytes_per_token(parquet: str | Path | bytes | BinaryIO, columns: Iterable[str] = COLUMNS) -> float:
    """Compressed bytes of `columns` per generated token, from a Parquet file's column-chunk metadata
    (the sum over row groups of every leaf under each column), divided by the total length of
    ``token_ids``."""
    source = io.BytesIO(parquet) if isinstance(parquet, bytes) else parquet
    parquet_file = pq.ParquetFile(source)
    wanted = set(columns)
    metadata = parquet_file.metadata
    compressed = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            if chunk.path_in_schema.split(".", 1)[0] in wanted:
                compressed += chunk.total_compressed_size
    tokens = 0
    for batch in parquet_file.iter_batches(columns=[TOKEN_IDS]):
        tokens += len(batch.column(0).flatten())
    if tokens == 0:
        raise ValueError("the file holds no generated tokens")
    return compressed / tokens


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a whole number >= 0; got {k!r}")


def _list_of(values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def _to_numpy(values: Any, dtype: type) -> np.ndarray:
    if isinstance(values, pa.Scalar):
        values = values.values if values.values is not None else []
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return np.asarray(values, dtype=dtype)
