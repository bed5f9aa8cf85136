"""The sparse top-k logprob layout: exactness of the top-k and tail, accuracy after storage, and
readability of the Parquet it makes without Stillhouse."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stillhouse.common.datasets import sparse_logprobs as sparse
from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs
from stillhouse.common.datasets.store import parquet_encodings


def exact_log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    values = values - values.max(axis=1, keepdims=True)
    return values - np.log(np.exp(values).sum(axis=1, keepdims=True))


def write_parquet(responses: list[SparseLogprobs], k: int, extra: dict[str, pa.Array] | None = None) -> bytes:
    schema = sparse.arrow_schema(k, [pa.field("response", pa.string())] if extra else [])
    table = pa.table({**(extra or {}), **sparse.rows_to_arrow(responses, k)}, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", **parquet_encodings(schema))
    return buffer.getvalue()


def read_back(data: bytes, k: int) -> list[SparseLogprobs]:
    return [SparseLogprobs.from_arrow(row, k) for row in pq.read_table(io.BytesIO(data)).to_pylist()]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 12),
    vocab=st.integers(2, 400),
    temperature=st.floats(0.05, 8.0),
    k=st.integers(0, 64),
)
def test_round_trip_is_within_1e3_in_probability_space(
    seed: int, steps: int, vocab: int, temperature: float, k: int
) -> None:
    k = min(k, vocab)
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((steps, vocab)) * 4 / temperature).astype(np.float32)
    exact = exact_log_softmax(logits)
    tokens = rng.integers(0, vocab, steps)
    computed = SparseLogprobs.from_dense_logits(logits, tokens, k)

    (stored,) = read_back(write_parquet([computed], k), k)

    assert stored.topk_ids.shape == stored.topk_logprobs.shape == (steps, k)
    np.testing.assert_array_equal(stored.token_ids, tokens)
    np.testing.assert_array_equal(stored.topk_ids, computed.topk_ids)
    # The ids are the k most likely, most likely first.
    expected_order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(
        np.take_along_axis(exact, stored.topk_ids, axis=1),
        np.take_along_axis(exact, expected_order, axis=1),
        atol=1e-6,
    )
    true = np.maximum(np.take_along_axis(exact, stored.topk_ids, axis=1), sparse.LOGPROB_FLOOR)
    assert np.all(np.abs(np.exp(stored.topk_logprobs.astype(np.float64)) - np.exp(true)) <= 1e-3)
    assert np.all(np.abs(stored.topk_logprobs - true) <= sparse.LOGPROB_TOLERANCE + 1e-9)
    true_tail = 1.0 - np.exp(true).sum(axis=1)
    assert np.all(np.abs(np.exp(stored.tail_logprob.astype(np.float64)) - true_tail) <= 1e-3)
    assert np.all(np.isfinite(stored.topk_logprobs)) and np.all(np.isfinite(stored.tail_logprob))


def test_tail_mass_matches_a_hand_computed_example() -> None:
    probabilities = np.array([[0.05, 0.5, 0.15, 0.3]])
    computed = SparseLogprobs.from_dense_logits(np.log(probabilities) + 7.0, np.array([1]), 2)
    assert computed.topk_ids.tolist() == [[1, 3]]
    np.testing.assert_allclose(np.exp(computed.topk_logprobs), [[0.5, 0.3]], rtol=1e-6)
    # Outside the top 2: 0.15 + 0.05.
    np.testing.assert_allclose(np.exp(computed.tail_logprob), [0.2], rtol=1e-6)


def test_tail_of_a_distribution_the_top_k_covers_is_tiny_but_finite() -> None:
    logits = np.array([[50.0, 0.0, -50.0]], dtype=np.float32)
    computed = SparseLogprobs.from_dense_logits(logits, np.array([0]), 1)
    assert math.isclose(float(computed.tail_logprob[0]), -50.0, abs_tol=1e-3)
    computed = SparseLogprobs.from_dense_logits(logits, np.array([0]), 3)
    assert computed.tail_logprob[0] == sparse.LOGPROB_FLOOR  # nothing left: log 0, clamped


def test_masked_logits_give_finite_values() -> None:
    logits = np.array([[1.0, -np.inf, 0.5, -np.inf]])
    computed = SparseLogprobs.from_dense_logits(logits, np.array([0]), 4)
    assert computed.topk_ids[0, :2].tolist() == [0, 2]
    assert (
        np.all(np.isfinite(computed.topk_logprobs)) and computed.topk_logprobs[0, 3] == sparse.LOGPROB_FLOOR
    )


def test_a_large_vocabulary_takes_the_blocked_top_k_path() -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 50_000)).astype(np.float32) * 3
    computed = SparseLogprobs.from_dense_logits(logits, np.zeros(5, np.int64), 20)
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(computed.topk_ids, expected)


def test_k_zero_means_no_logprobs() -> None:
    logits = np.random.default_rng(0).standard_normal((6, 30))
    computed = SparseLogprobs.from_dense_logits(logits, np.arange(6), 0)
    assert computed.topk_ids.shape == (6, 0) and computed.topk_logprobs.shape == (6, 0)
    np.testing.assert_array_equal(computed.tail_logprob, np.zeros(6))  # all mass is outside the top 0
    (stored,) = read_back(write_parquet([computed], 0), 0)
    assert stored.topk_ids.shape == (6, 0)
    np.testing.assert_array_equal(stored.token_ids, np.arange(6))


def test_from_arrow_reshapes_and_infers_k() -> None:
    rng = np.random.default_rng(1)
    computed = SparseLogprobs.from_dense_logits(rng.standard_normal((7, 100)), rng.integers(0, 100, 7), 64)
    table = pa.table(sparse.rows_to_arrow([computed], 64))
    stored = SparseLogprobs.from_arrow(table.to_pylist()[0])
    assert stored.k == 64 and stored.topk_ids.shape == (7, 64) and stored.tail_logprob.shape == (7,)
    scalar_row = {name: table.column(name)[0] for name in table.column_names}
    np.testing.assert_array_equal(SparseLogprobs.from_arrow(scalar_row).topk_ids, computed.topk_ids)
    one_row = pa.table(computed.to_arrow_columns()).to_pylist()[0]
    assert one_row == table.to_pylist()[0]
    with pytest.raises(ValueError, match="not a multiple"):
        SparseLogprobs.from_arrow({**table.to_pylist()[0], "topk_ids": [1, 2, 3]})


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"shape \[T=2, k\]"):
        SparseLogprobs(np.zeros(2, np.int32), np.zeros((3, 4), np.int32), np.zeros((3, 4)), np.zeros(2))
    with pytest.raises(ValueError, match="logits must have shape"):
        SparseLogprobs.from_dense_logits(np.zeros((3, 5)), np.zeros(2), 1)
    with pytest.raises(ValueError, match="more than the vocabulary"):
        SparseLogprobs.from_dense_logits(np.zeros((1, 5)), np.zeros(1), 6)
    with pytest.raises(ValueError, match="k must be"):
        sparse.arrow_fields(-1)


def test_storage_rounding_keeps_both_tolerances_at_the_extremes() -> None:
    values = np.array(
        [0.0, -1e-9, -1e-4, -0.001, -0.5, -1.0, -2.302, -6.9, -13.8, -59.99, -60.0, -1e4, -np.inf]
    )
    stored = sparse.storage_logprobs(values).astype(np.float64)
    clamped = np.maximum(values, sparse.LOGPROB_FLOOR)
    assert np.all(np.abs(np.exp(stored) - np.exp(clamped)) <= 1e-3)
    assert np.all(np.abs(stored - clamped) <= sparse.LOGPROB_TOLERANCE)
    assert np.all(np.isfinite(stored))


def test_parquet_is_readable_by_plain_pyarrow_and_by_hugging_face_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(2)
    responses = [
        SparseLogprobs.from_dense_logits(
            rng.standard_normal((steps, 500)) * 3, rng.integers(0, 500, steps), 20
        )
        for steps in (3, 9, 1)
    ]
    path = tmp_path / "teacher.parquet"
    path.write_bytes(write_parquet(responses, 20, {"response": pa.array(["a", "bc", "d"])}))

    table = pq.read_table(path)
    assert table.schema.metadata[b"stillhouse.topk"] == b"20"
    assert table.schema.field("topk_logprobs").metadata[b"stillhouse.topk"] == b"20"
    assert table.schema.field("topk_ids").type == pa.list_(pa.int32())
    assert sparse.topk_of(table.schema) == 20
    first = table.to_pylist()[1]
    assert np.asarray(first["topk_ids"]).reshape(-1, 20).shape == (9, 20)

    import datasets

    loaded = datasets.load_dataset(
        "parquet", data_files=[str(path)], split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded.num_rows == 3
    assert loaded.features["topk_logprobs"].feature.dtype == "float16"
    row = loaded[1]
    assert row["response"] == "bc"
    np.testing.assert_array_equal(np.asarray(row["topk_ids"]).reshape(9, 20), responses[1].topk_ids)
    np.testing.assert_allclose(
        np.exp(np.asarray(row["topk_logprobs"], dtype=np.float64)).reshape(9, 20),
        np.exp(responses[1].topk_logprobs),
        atol=1e-3,
    )


def test_bytes_per_token_reads_compressed_sizes_from_the_footer() -> None:
    rng = np.random.default_rng(4)
    responses = [
        SparseLogprobs.from_dense_logits(rng.standard_normal((40, 2000)) * 3, rng.integers(0, 2000, 40), 20)
        for _ in range(5)
    ]
    data = write_parquet(responses, 20)
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    compressed = {
        metadata.column(i).path_in_schema: metadata.column(i).total_compressed_size for i in range(4)
    }
    assert sparse.bytes_per_token(data) == pytest.approx(sum(compressed.values()) / 200)
    assert sparse.bytes_per_token(data, ["topk_ids"]) == pytest.approx(
        compressed["topk_ids.list.element"] / 200
    )
    assert sparse.bytes_per_token(data) < 100
