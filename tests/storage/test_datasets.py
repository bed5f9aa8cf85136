"""Datasets on both backends (a local folder and a real S3 server): write, commit, read, crash, re-run."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stillhouse.common.datasets import sparse_logprobs as sparse
from stillhouse.common.datasets.manifest import Lineage, ShardRecord, manifest_key, manifest_sha256, shard_key
from stillhouse.common.datasets.store import (
    DatasetConflict,
    DatasetNotFound,
    DatasetReader,
    DatasetWriter,
    collect_garbage,
    commit_shards,
    delete_dataset,
    list_datasets,
)
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.objectstore.objects import IntegrityError, ObjectNotFound, ObjectStore
from stillhouse.common.objectstore.settings import ObjectStoreSettings

DATASET = "jobs/job-1a2b/teacher/train"
LINEAGE = Lineage(
    job_id="job-1a2b", stage="teacher", input_ids=["jobs/job-1a2b/prompts/train"], code_version="t"
)
SCHEMA = sparse.arrow_schema(5, [pa.field("prompt_id", pa.int64()), pa.field("response", pa.string())])
SMALL_SHARD = 6_000  # bytes: a few hundred rows make several shards


def teacher_rows(count: int, start: int = 0) -> pa.Table:
    rng = np.random.default_rng(start)
    responses = [
        sparse.SparseLogprobs.from_dense_logits(
            rng.standard_normal((steps, 300)) * 3, rng.integers(0, 300, steps), 5
        )
        for steps in rng.integers(1, 12, count)
    ]
    columns = {
        "prompt_id": pa.array(range(start, start + count), pa.int64()),
        "response": pa.array([f"answer {i} " * (i % 5) for i in range(start, start + count)]),
        **sparse.rows_to_arrow(responses, 5),
    }
    return pa.table(columns, schema=SCHEMA)


def write(store: ObjectStore, table: pa.Table, dataset_id: str = DATASET, **options):
    with DatasetWriter(
        store, dataset_id, table.schema, LINEAGE, max_shard_bytes=SMALL_SHARD, **options
    ) as writer:
        for batch in table.to_batches(max_chunksize=50):
            writer.write_batch(batch)
        return writer.commit()


def shard_objects(store: ObjectStore, dataset_id: str = DATASET) -> list[str]:
    return [info.key for info in store.list(f"{dataset_id}/shards/")]


def test_write_commit_and_read_back(object_store: ObjectStore) -> None:
    table = teacher_rows(400)
    manifest = write(object_store, table)

    assert manifest.num_rows == 400 and len(manifest.shards) >= 3
    assert [shard.num_rows for shard in manifest.shards] and sum(s.num_rows for s in manifest.shards) == 400
    assert manifest.lineage == LINEAGE
    assert shard_objects(object_store) == sorted(manifest.shard_keys())
    for record, key in zip(manifest.shards, manifest.shard_keys(), strict=True):
        data = object_store.get_bytes(key)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record.size_bytes, record.sha256)
    stored_manifest = object_store.get_bytes(manifest_key(DATASET))
    assert stored_manifest == manifest.to_json()
    assert manifest_sha256(stored_manifest) == hashlib.sha256(manifest.to_json()).hexdigest()

    reader = DatasetReader(object_store, DATASET)
    assert reader.manifest == manifest
    read = reader.read_table()
    assert read.schema.equals(SCHEMA, check_metadata=True)
    assert read.equals(table)
    assert reader.read_table(columns=["prompt_id", "topk_logprobs"]).equals(
        table.select(["prompt_id", "topk_logprobs"])
    )
    first, second = reader.shard_range(0, 2), reader.shard_range(1, 2)
    assert first.stop == second.start and second.stop == len(manifest.shards)
    halves = [reader.read_table(shards=part) for part in (first, second)]
    assert pa.concat_tables(halves).equals(table)
    assert sum(batch.num_rows for batch in reader.read_batches(shards=second)) == halves[1].num_rows
    with pytest.raises(ValueError, match="no column 'nope'"):
        reader.read_table(columns=["nope"])


def test_write_rows_and_an_empty_dataset(object_store: ObjectStore) -> None:
    schema = pa.schema([pa.field("text", pa.string()), pa.field("score", pa.float32())])
    with DatasetWriter(object_store, "jobs/job-1a2b/prompts/rows", schema, LINEAGE) as writer:
        writer.write_rows([{"text": "a", "score": 0.5}, {"text": "b", "score": None}])
        with pytest.raises(ValueError, match="do not fit its schema"):
            writer.write_rows([{"text": 3, "score": "high"}])
        writer.commit()
    assert DatasetReader(object_store, "jobs/job-1a2b/prompts/rows").read_table().to_pylist() == [
        {"text": "a", "score": 0.5},
        {"text": "b", "score": None},
    ]
    with DatasetWriter(object_store, "jobs/job-1a2b/prompts/empty", schema, LINEAGE) as writer:
        empty = writer.commit()
    assert empty.shards == [] and empty.num_rows == 0
    assert (
        DatasetReader(object_store, "jobs/job-1a2b/prompts/empty").read_table().equals(schema.empty_table())
    )


def test_a_batch_of_another_schema_is_refused(object_store: ObjectStore) -> None:
    with DatasetWriter(object_store, DATASET, SCHEMA, LINEAGE) as writer:
        with pytest.raises(ValueError, match=f"rows for dataset '{DATASET}' do not fit its schema"):
            writer.write_batch(pa.table({"prompt_id": [1]}))
        writer.commit()


def test_nothing_is_visible_before_the_commit(object_store: ObjectStore) -> None:
    with DatasetWriter(object_store, DATASET, SCHEMA, LINEAGE, max_shard_bytes=SMALL_SHARD) as writer:
        writer.write_batch(teacher_rows(300))
        assert list_datasets(object_store) == []
        with pytest.raises(DatasetNotFound, match=DATASET):
            DatasetReader(object_store, DATASET)
        manifest = writer.commit()
    assert list_datasets(object_store) == [manifest]


def test_leaving_without_commit_deletes_the_shards(object_store: ObjectStore) -> None:
    writer = DatasetWriter(object_store, DATASET, SCHEMA, LINEAGE, max_shard_bytes=SMALL_SHARD)
    with pytest.raises(RuntimeError, match="boom"), writer:
        for batch in teacher_rows(300).to_batches(max_chunksize=50):
            writer.write_batch(batch)
        raise RuntimeError("boom")
    assert shard_objects(object_store) == []
    writer = DatasetWriter(object_store, DATASET, SCHEMA, LINEAGE, max_shard_bytes=SMALL_SHARD)
    with pytest.raises(RuntimeError, match="without commit"), writer:
        writer.write_batch(teacher_rows(300))
    assert shard_objects(object_store) == []
    assert list_datasets(object_store) == []


# A writer in another process that is SIGKILLed after it has uploaded three shards, before its commit.
CRASHING_WRITER = """
import json, os, signal, sys
import pyarrow as pa
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.common.datasets.store import DatasetWriter
from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.objectstore.open_store import open_object_store

store = open_object_store(ObjectStoreSettings.model_validate(json.loads(os.environ["TEST_OBJECT_STORE"])))
schema = pa.schema([pa.field("i", pa.int64()), pa.field("text", pa.string())])
writer = DatasetWriter(store, sys.argv[1], schema, Lineage("job-1a2b", "teacher"), max_shard_bytes=2_000)
for start in range(0, 1_000_000, 200):
    writer.write_rows([{"i": i, "text": f"row {i} " * 20} for i in range(start, start + 200)])
    if len(list(store.list(sys.argv[1] + "/shards/"))) >= 3:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def settings_json(settings: ObjectStoreSettings) -> str:
    document = settings.model_dump(mode="json")
    for secret in ("access_key", "secret_key"):
        value = getattr(settings, secret)
        document[secret] = value.get_secret_value() if value is not None else None
    return json.dumps(document)


def test_a_killed_writer_leaves_nothing_visible_and_its_shards_are_collected(
    object_store: ObjectStore, object_store_settings: ObjectStoreSettings
) -> None:
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, DATASET],
        env={"TEST_OBJECT_STORE": settings_json(object_store_settings), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=120,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    orphans = shard_objects(object_store)
    assert len(orphans) >= 3
    assert list_datasets(object_store) == []
    with pytest.raises(DatasetNotFound):
        DatasetReader(object_store, DATASET)

    # A writer that may still be running (its newest shard is recent) is left alone ...
    report = collect_garbage(object_store, "jobs/", older_than=timedelta(hours=1))
    assert report.deleted_keys == [] and report.kept_recent_keys == orphans
    # ... one silent for longer than older_than is dead: its shards go.
    later = datetime.now(UTC) + timedelta(minutes=10)
    report = collect_garbage(object_store, "jobs/", older_than=timedelta(minutes=5), now=later)
    assert report.deleted_keys == orphans and report.deleted_bytes > 0
    assert shard_objects(object_store) == []


def test_garbage_of_a_committed_dataset_is_what_its_manifest_does_not_list(object_store: ObjectStore) -> None:
    manifest = write(object_store, teacher_rows(200))
    orphan = shard_key(DATASET, "dead0001", 0)
    object_store.put_bytes(orphan, b"left by a crashed writer")
    report = collect_garbage(object_store, older_than=timedelta(days=1))
    assert report.deleted_keys == [orphan]
    assert shard_objects(object_store) == sorted(manifest.shard_keys())
    assert DatasetReader(object_store, DATASET).read_table().num_rows == 200


def test_rewriting_a_committed_id_is_idempotent(object_store: ObjectStore) -> None:
    first = write(object_store, teacher_rows(300))
    with DatasetWriter(object_store, DATASET, SCHEMA, LINEAGE, max_shard_bytes=SMALL_SHARD) as writer:
        assert writer.already_committed
        writer.write_batch(teacher_rows(300))
        assert writer.commit() == first
    assert shard_objects(object_store) == sorted(first.shard_keys())

    # A writer that opened before the first commit loses the race: it gets the committed manifest back
    # and its own shards are deleted.
    late = DatasetWriter(
        object_store, "jobs/job-1a2b/teacher/race", SCHEMA, LINEAGE, max_shard_bytes=SMALL_SHARD
    )
    late.write_batch(teacher_rows(300))
    winner = write(object_store, teacher_rows(100), "jobs/job-1a2b/teacher/race")
    assert late.commit() == winner
    assert shard_objects(object_store, "jobs/job-1a2b/teacher/race") == sorted(winner.shard_keys())


def test_a_different_schema_for_a_committed_id_is_a_conflict(object_store: ObjectStore) -> None:
    write(object_store, teacher_rows(50))
    other = pa.schema([pa.field("prompt_id", pa.int64())])
    with pytest.raises(
        DatasetConflict, match=f"dataset '{DATASET}' is already committed with a different schema"
    ):
        DatasetWriter(object_store, DATASET, other, LINEAGE)
    other_k = sparse.arrow_schema(6, [pa.field("prompt_id", pa.int64()), pa.field("response", pa.string())])
    with pytest.raises(DatasetConflict):
        DatasetWriter(object_store, DATASET, other_k, LINEAGE)


def test_a_tampered_shard_fails_the_read_naming_it(object_store: ObjectStore) -> None:
    manifest = write(object_store, teacher_rows(300))
    key = manifest.shard_keys()[1]
    original = object_store.get_bytes(key)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    object_store.put_bytes(key, bytes(flipped))
    reader = DatasetReader(object_store, DATASET)
    with pytest.raises(IntegrityError, match=f"shard '{key}' of dataset '{DATASET}' is corrupt: sha256"):
        reader.read_table()
    object_store.put_bytes(key, original[:-10])
    with pytest.raises(IntegrityError, match=f"shard '{key}'.* is {len(original) - 10} bytes"):
        list(reader.read_batches(shards=range(1, 2)))
    object_store.put_bytes(key, original)
    assert reader.read_table().num_rows == 300


def test_shards_read_through_spooled_files_in_any_order(object_store: ObjectStore, tmp_path: Path) -> None:
    table = teacher_rows(300)
    manifest = write(object_store, table)
    reader = DatasetReader(object_store, DATASET)
    order = list(reversed(range(len(manifest.shards))))
    spool = tmp_path / "spool"
    read = {
        index: pa.Table.from_batches(list(batches), schema=SCHEMA)
        for index, batches in reader.read_shards(shards=order, batch_size=7, spool_dir=spool)
    }
    assert list(read) == order
    assert pa.concat_tables([read[index] for index in sorted(read)]).equals(table)
    assert not any(spool.iterdir())  # every file deleted once read
    # Leaving in the middle deletes the shard being read and the one downloading.
    shards = reader.read_shards(shards=order, spool_dir=spool)
    next(shards)
    shards.close()
    assert not any(spool.iterdir())
    key = manifest.shard_keys()[order[1]]
    object_store.put_bytes(key, object_store.get_bytes(key)[:-10])
    with pytest.raises(IntegrityError, match=f"shard '{key}'"):
        for _, batches in reader.read_shards(shards=order, spool_dir=spool):
            list(batches)
    assert not any(spool.iterdir())


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def test_commit_shards_checks_every_shard(object_store: ObjectStore) -> None:
    tables = [teacher_rows(20, start) for start in (0, 20)]
    records = []
    for index, table in enumerate(tables):
        data = parquet_bytes(table)
        key = shard_key(DATASET, "c0ffee00", index)
        object_store.put_bytes(key, data)
        records.append(ShardRecord(key.split("/", 4)[4], 20, len(data), hashlib.sha256(data).hexdigest()))
    assert records[0].path == "shards/part-00000-c0ffee00.parquet"

    missing = ShardRecord("shards/part-00009-c0ffee00.parquet", 1, 10, "0" * 64)
    with pytest.raises(ObjectNotFound, match=r"part-00009-c0ffee00\.parquet"):
        commit_shards(object_store, DATASET, [*records, missing], SCHEMA, LINEAGE)
    wrong_size = ShardRecord(records[1].path, 20, records[1].size_bytes + 1, records[1].sha256)
    with pytest.raises(IntegrityError, match=r"part-00001-c0ffee00\.parquet.*bytes were recorded"):
        commit_shards(object_store, DATASET, [records[0], wrong_size], SCHEMA, LINEAGE)
    wrong_hash = ShardRecord(records[1].path, 20, records[1].size_bytes, "f" * 64)
    with pytest.raises(IntegrityError, match=r"part-00001-c0ffee00\.parquet.*sha256"):
        commit_shards(object_store, DATASET, [records[0], wrong_hash], SCHEMA, LINEAGE)
    assert list_datasets(object_store) == []

    committed = commit_shards(object_store, DATASET, records, SCHEMA, LINEAGE)
    assert committed.num_rows == 40
    assert commit_shards(object_store, DATASET, records[:1], SCHEMA, LINEAGE) == committed
    with pytest.raises(DatasetConflict):
        commit_shards(object_store, DATASET, records, pa.schema([pa.field("x", pa.int8())]), LINEAGE)
    assert DatasetReader(object_store, DATASET).read_table().equals(pa.concat_tables(tables))


def test_list_and_delete(object_store: ObjectStore) -> None:
    write(object_store, teacher_rows(30), "jobs/job-1/teacher/train")
    write(object_store, teacher_rows(30), "jobs/job-1/teacher/train/sample")
    write(object_store, teacher_rows(30), "jobs/job-10/teacher/train")
    assert [m.dataset_id for m in list_datasets(object_store, "jobs/job-1/")] == [
        "jobs/job-1/teacher/train",
        "jobs/job-1/teacher/train/sample",
    ]
    assert len(list_datasets(object_store, "jobs/job-1")) == 3
    delete_dataset(object_store, "jobs/job-1/teacher/train")
    assert [m.dataset_id for m in list_datasets(object_store, "jobs/job-1/")] == [
        "jobs/job-1/teacher/train/sample"
    ]
    assert shard_objects(object_store, "jobs/job-1/teacher/train") == []
    assert DatasetReader(object_store, "jobs/job-1/teacher/train/sample").read_table().num_rows == 30
    with pytest.raises(DatasetNotFound, match="jobs/job-1/teacher/train"):
        delete_dataset(object_store, "jobs/job-1/teacher/train")


def test_committed_shards_are_readable_without_stillhouse(
    object_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = teacher_rows(200)
    manifest = write(object_store, table)
    if isinstance(object_store, LocalObjectStore):
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        import datasets

        files = [str(object_store.folder / key) for key in manifest.shard_keys()]
        loaded = datasets.load_dataset(
            "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
        )
        assert loaded.num_rows == 200
        assert loaded["prompt_id"] == table.column("prompt_id").to_pylist()
        assert loaded[7]["topk_ids"] == table.column("topk_ids")[7].as_py()
    else:
        shards = [
            pq.read_table(pa.BufferReader(object_store.get_bytes(key))) for key in manifest.shard_keys()
        ]
        assert pa.concat_tables(shards).equals(table)


def test_shards_sealed_by_separate_writers_commit_as_one_dataset_in_their_order(object_store: ObjectStore):
    table = teacher_rows(300)
    records = []
    for part in (table.slice(0, 170), table.slice(170)):
        with DatasetWriter(object_store, DATASET, SCHEMA, LINEAGE, max_shard_bytes=SMALL_SHARD) as writer:
            for batch in part.to_batches(max_chunksize=50):
                writer.write_batch(batch)
            records += writer.seal()
    with pytest.raises(DatasetNotFound):  # sealed is not committed
        DatasetReader(object_store, DATASET)

    manifest = commit_shards(object_store, DATASET, records, SCHEMA, LINEAGE)

    assert manifest.num_rows == 300 and len({record.path.rsplit("-", 1)[1] for record in records}) == 2
    assert DatasetReader(object_store, DATASET).read_table().equals(table)


def test_a_row_range_is_read_across_shard_boundaries(object_store: ObjectStore):
    table = teacher_rows(400)
    manifest = write(object_store, table)
    reader = DatasetReader(object_store, DATASET)
    assert len(manifest.shards) >= 3

    for start, stop in [(0, 400), (37, 251), (0, 1), (399, 400), (120, 120)]:
        rows = pa.Table.from_batches(list(reader.read_rows(range(start, stop))), schema=SCHEMA)
        assert rows.equals(table.slice(start, stop - start)), (start, stop)
    with pytest.raises(ValueError, match="has 400 rows"):
        list(reader.read_rows(range(350, 401)))
