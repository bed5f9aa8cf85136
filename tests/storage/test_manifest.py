"""Manifests and the dataset layout: pure, no store."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stillhouse.common.datasets.manifest import (
    DatasetManifest,
    Lineage,
    ShardRecord,
    manifest_key,
    manifest_sha256,
    parse_shard_key,
    shard_key,
    validate_dataset_id,
)

SCHEMA = pa.schema(
    [pa.field("text", pa.string()), pa.field("ids", pa.list_(pa.int32()))], metadata={b"k": b"1"}
)
LINEAGE = Lineage(
    job_id="job-1a2b", stage="teacher", input_ids=["jobs/job-1a2b/prompts/train"], code_version="abc"
)


def shard(index: int, rows: int, size: int = 100) -> ShardRecord:
    return ShardRecord(f"shards/part-{index:05d}-0a1b2c3d.parquet", rows, size, f"{index:064x}")


def manifest(rows: list[int]) -> DatasetManifest:
    return DatasetManifest.create(
        "jobs/job-1a2b/teacher/train",
        [shard(i, n) for i, n in enumerate(rows)],
        SCHEMA,
        LINEAGE,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


@pytest.mark.parametrize("dataset_id", ["jobs/job-1a2b/prompts/train", "a", "x/y.z_1-2", "0/shard"])
def test_valid_dataset_ids(dataset_id: str) -> None:
    assert validate_dataset_id(dataset_id) == dataset_id


@pytest.mark.parametrize(
    "dataset_id",
    [
        "",
        "/abs",
        "trailing/",
        "a//b",
        "Upper",
        "a/../b",
        "a/./b",
        "-dash",
        "sp ace",
        "a/shards",
        "a/manifest.json",
    ],
)
def test_invalid_dataset_ids_are_refused_by_name(dataset_id: str) -> None:
    with pytest.raises(ValueError, match="invalid dataset id"):
        validate_dataset_id(dataset_id)


def test_layout_keys() -> None:
    assert manifest_key("jobs/j-1/teacher") == "jobs/j-1/teacher/manifest.json"
    key = shard_key("jobs/j-1/teacher", "0a1b2c3d", 7)
    assert key == "jobs/j-1/teacher/shards/part-00007-0a1b2c3d.parquet"
    parsed = parse_shard_key(key)
    assert parsed is not None
    assert (parsed.dataset_id, parsed.index, parsed.writer_token) == ("jobs/j-1/teacher", 7, "0a1b2c3d")
    assert parse_shard_key("jobs/j-1/teacher/manifest.json") is None
    assert parse_shard_key("Bad/shards/part-00000-0a1b2c3d.parquet") is None


def test_json_is_deterministic_compact_and_round_trips() -> None:
    first = manifest([10, 20])
    data = first.to_json()
    assert data == manifest([10, 20]).to_json()
    document = json.loads(data)
    assert data == json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert document["schema_fields"] == [
        {"name": "text", "type": "string"},
        {"name": "ids", "type": "list<item: int32>"},
    ]
    again = DatasetManifest.from_json(data)
    assert again == first
    assert again.to_json() == data
    assert manifest_sha256(data) == manifest_sha256(again.to_json())
    assert again.arrow_schema().equals(SCHEMA, check_metadata=True)
    assert again.num_rows == 30
    assert again.shard_keys()[1] == "jobs/job-1a2b/teacher/train/shards/part-00001-0a1b2c3d.parquet"


def _broken(change) -> bytes:
    document = json.loads(manifest([5]).to_json())
    change(document)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (_broken(lambda d: d.pop("lineage")), "has no 'lineage'"),
        (_broken(lambda d: d.update(num_rows="5")), "'num_rows' must be a JSON int"),
        (_broken(lambda d: d.update(num_rows=6)), "num_rows=6, but its shards hold 5"),
        (_broken(lambda d: d.update(format_version=99)), "format_version 99"),
        (_broken(lambda d: d["shards"][0].update(sha256="xyz")), r"shards\[0\].*sha256"),
        (_broken(lambda d: d["shards"][0].update(path="../elsewhere.parquet")), "invalid shard path"),
        (_broken(lambda d: d["shards"][0].pop("size_bytes")), r"shards\[0\] has no 'size_bytes'"),
        (_broken(lambda d: d.update(schema="not base64!")), "schema is not a base64 Arrow IPC schema"),
        (_broken(lambda d: d.update(created_at="yesterday")), "created_at"),
        (_broken(lambda d: d.update(created_at="2026-01-02T03:04:05+02:00")), "created_at"),
        (_broken(lambda d: d.update(dataset_id="Bad Id")), "invalid dataset id"),
        (_broken(lambda d: d["lineage"].update(input_ids=[1])), "input_ids must be a list of strings"),
    ],
)
def test_malformed_manifests_are_refused_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        DatasetManifest.from_json(data, what="manifest 'x/manifest.json'")
    assert str(caught.value).startswith("manifest 'x/manifest.json'")


def test_shard_range_splits_contiguously_and_covers_every_shard_once() -> None:
    ranges = [manifest([10, 10, 10, 10, 10, 10]).shard_range(worker, 3) for worker in range(3)]
    assert ranges == [range(0, 2), range(2, 4), range(4, 6)]
    ranges = [manifest([100, 1, 1, 1, 1]).shard_range(worker, 2) for worker in range(2)]
    assert ranges == [range(0, 1), range(1, 5)]
    # One shard, three workers: the worker whose share holds its middle row reads it.
    assert [manifest([5]).shard_range(worker, 3) for worker in range(3)] == [
        range(0, 0),
        range(0, 1),
        range(1, 1),
    ]
    with pytest.raises(ValueError, match="worker_index"):
        manifest([5]).shard_range(3, 3)


@given(rows=st.lists(st.integers(0, 1000), min_size=1, max_size=40), workers=st.integers(1, 12))
def test_shard_range_is_balanced_by_rows(rows: list[int], workers: int) -> None:
    dataset = manifest(rows)
    ranges = [dataset.shard_range(worker, workers) for worker in range(workers)]
    assert ranges == [dataset.shard_range(worker, workers) for worker in range(workers)]  # deterministic
    assert [index for part in ranges for index in part] == list(range(len(rows)))
    if sum(rows):
        share = sum(rows) / workers
        for part in ranges:
            assert abs(sum(rows[index] for index in part) - share) <= max(rows)
