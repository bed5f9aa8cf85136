"""Datasets in object storage: Parquet shards, then a manifest that commits them (layout: manifest.py).

Writing: `DatasetWriter` encodes rows into Parquet shards in memory and uploads each from a background
thread while the next one is encoded; `commit()` writes the manifest last, so a dataset is visible
exactly when it is whole. A service that did not write the shards itself commits them with
`commit_shards`. Both are idempotent: committing an id that is already committed with the same schema
returns the committed manifest, and a different schema is a `DatasetConflict`.

Reading: `DatasetReader` checks each shard's size and sha256 against the manifest as it downloads it.

Housekeeping: `list_datasets` (committed only), `delete_dataset`, and `collect_garbage` for the shards
that crashed writers left behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from stillhouse.common.datasets.artifacts import size_and_sha256
from stillhouse.common.datasets.manifest import (
    MANIFEST_NAME,
    SHARDS_FOLDER,
    DatasetManifest,
    Lineage,
    ShardRecord,
    manifest_key,
    manifest_sha256,
    parse_shard_key,
    shard_key,
    shard_path,
    validate_dataset_id,
)
from stillhouse.common.objectstore.objects import (
    IntegrityError,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
)

log = structlog.get_logger(__name__)

DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHARD_ROWS = 1_000_000
ROW_GROUPS_PER_SHARD = 4
# However well the data compresses, a shard never gathers more than this many Arrow bytes in memory.
MAX_SHARD_ARROW_BYTES = 512 * 1024 * 1024
# Encoding is the CPU-heavy part of a write: a machine with cores to spare encodes shards in parallel.
DEFAULT_ENCODE_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) // 2))
DEFAULT_UPLOAD_THREADS = 1 if DEFAULT_ENCODE_THREADS == 1 else 4
# The first shard is 1/16 of max_shard_bytes and each next one 1.5 times bigger up to the maximum
# (4, 6, 9, ... 45, 64 MiB): uploads start as soon as the first small shard is encoded, and each
# shard is encoded by the time the ones before it are uploaded.
RAMP_START = 1 / 16
RAMP_GROWTH = 1.5


class DatasetError(Exception):
    """Base of the errors about whole datasets."""


class DatasetNotFound(DatasetError):
    def __init__(self, dataset_id: str) -> None:
        super().__init__(f"dataset {dataset_id!r} does not exist (no committed manifest)")
        self.dataset_id = dataset_id


class DatasetConflict(DatasetError):
    """The id is already committed with a different schema."""

    def __init__(self, dataset_id: str, committed: pa.Schema, offered: pa.Schema) -> None:
        super().__init__(
            f"dataset {dataset_id!r} is already committed with a different schema: committed "
            f"{_describe(committed)}, offered {_describe(offered)}"
        )
        self.dataset_id = dataset_id


class ShardSizeMismatch(IntegrityError):
    """A shard's object is not the size its record says (no need to hash it to know it is wrong)."""

    def __init__(self, what: str, expected_size: int, actual_size: int) -> None:
        ObjectStoreError.__init__(
            self, f"{what} is corrupt: it is {actual_size} bytes, but {expected_size} bytes were recorded"
        )
        self.expected = f"{expected_size} bytes"
        self.actual = f"{actual_size} bytes"


def _describe(schema: pa.Schema) -> str:
    fields = ", ".join(f"{item.name}: {item.type}" for item in schema)
    return f"({fields})" + (f" with metadata {dict(schema.metadata)}" if schema.metadata else "")


def _shard_what(dataset_id: str, key: str) -> str:
    return f"shard {key!r} of dataset {dataset_id!r}"


# --- writing ---------------------------------------------------------------------------------------------


class DatasetWriter:
    """Writes one dataset as Parquet shards, then commits it. Use as a context manager::

        with DatasetWriter(store, "jobs/job-1a2b/teacher/train", schema, lineage) as writer:
            writer.write_rows(rows)
            manifest = writer.commit()

    Rows keep their order: shard 0 holds the first rows written. A shard holds at most `max_shard_rows`
    rows and about `max_shard_bytes` of Parquet (the writer cuts shards by the compression ratio it has
    seen so far, so the first shards come out smaller and a sudden change in the data can overshoot).

    Pipeline: the caller's thread only gathers rows; `encode_threads` threads encode whole shards
    (Parquet, zstd, four row groups each) and hash them while `upload_threads` threads upload the ones
    already encoded. At most ``encode_threads + upload_threads`` shards are in flight, so memory stays
    bounded by about that many shards, plus the rows gathered for the next one. On a machine of up to
    three cores the defaults are one and one: two shards, shard N+1 encoded while shard N uploads. A
    bigger machine encodes on half its cores (up to 8) and uploads four shards at a time: encoding a
    shard takes a core several times longer than uploading it.

    Leaving the block without `commit()` deletes what the writer uploaded. If the id is already
    committed when the writer opens, with the same schema, writing does nothing and `commit()` returns
    the committed manifest (a re-run pays nothing); with a different schema the writer refuses to open
    (`DatasetConflict`).
    """

    def __init__(
        self,
        store: ObjectStore,
        dataset_id: str,
        schema: pa.Schema,
        lineage: Lineage,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS,
        compression: str = "zstd",
        compression_level: int | None = None,
        encode_threads: int = DEFAULT_ENCODE_THREADS,
        upload_threads: int = DEFAULT_UPLOAD_THREADS,
    ) -> None:
        validate_dataset_id(dataset_id)
        if min(max_shard_bytes, max_shard_rows, encode_threads, upload_threads) < 1:
            raise ValueError(
                "max_shard_bytes, max_shard_rows, encode_threads and upload_threads must be >= 1"
            )
        self.store = store
        self.dataset_id = dataset_id
        self.schema = schema
        self.lineage = lineage
        self.max_shard_bytes = max_shard_bytes
        self.max_shard_rows = max_shard_rows
        self.writer_token = secrets.token_hex(4)
        store.ensure_bucket()
        self._committed_before = _load_manifest(store, dataset_id)
        if self._committed_before is not None:
            _require_same_schema(self._committed_before, schema)
        self._parquet_options: dict[str, Any] = {
            "compression": compression,
            "compression_level": compression_level,
            **parquet_encodings(schema),
        }
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._shards_cut = 0
        self._in_flight: list[Future[Future[ShardRecord]]] = []  # oldest first: encode, then upload
        self._records: list[ShardRecord] = []
        # Arrow bytes in and Parquet bytes out of every shard encoded so far: the compression ratio.
        self._ratio_lock = threading.Lock()
        self._arrow_bytes_encoded = 0
        self._parquet_bytes_encoded = 0
        self._encoders = ThreadPoolExecutor(max_workers=encode_threads, thread_name_prefix="dataset-encode")
        self._uploader = ThreadPoolExecutor(max_workers=upload_threads, thread_name_prefix="dataset-upload")
        self._max_in_flight = encode_threads + upload_threads
        self._manifest: DatasetManifest | None = None
        self._closed = False

    @property
    def already_committed(self) -> bool:
        """True when the id was committed (same schema) before this writer opened: writes are ignored."""
        return self._committed_before is not None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._closed:
            return
        self.abort()
        if exc_type is None:
            raise RuntimeError(
                f"the writer of dataset {self.dataset_id!r} was closed without commit(): "
                "nothing was committed and its shards were deleted"
            )

    def write_batch(self, data: pa.RecordBatch | pa.Table) -> None:
        """Add rows. Their schema must be the writer's, or cast to it safely."""
        self._require_open()
        table = self._conform(data)
        if self._committed_before is not None or table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._pending_bytes += table.nbytes
        while True:
            target = self._shard_arrow_bytes()
            if self._pending_rows < self.max_shard_rows and self._pending_bytes < target:
                return
            rows = min(self.max_shard_rows, max(1, self._pending_rows * target // self._pending_bytes))
            self._cut_shard(rows)

    def write_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add rows given as dicts of column name to value."""
        self._require_open()
        try:
            table = pa.Table.from_pylist(list(rows), schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"rows for dataset {self.dataset_id!r} do not fit its schema: {exc}") from None
        self.write_batch(table)

    def commit(self) -> DatasetManifest:
        """Encode the last shard, wait for every upload, check the shards, and write the manifest.

        Returns the committed manifest: this writer's, or the one already committed under this id (same
        schema; this writer's shards are then deleted). Calling it again returns the same manifest.
        """
        if self._manifest is not None:
            return self._manifest
        self._require_open()
        if self._committed_before is None:
            self._finish_uploads()
            committed = _commit(self.store, self.dataset_id, self._records, self.schema, self.lineage)
            if committed.shards != self._records:  # another writer committed this id first
                self._delete_uploaded()
            log.info(
                "dataset committed",
                dataset_id=self.dataset_id,
                rows=committed.num_rows,
                shards=len(committed.shards),
                bytes=committed.size_bytes,
            )
        else:
            committed = self._committed_before
        self._shutdown(cancel=False)
        self._manifest = committed
        self._closed = True
        return committed

    def seal(self) -> list[ShardRecord]:
        """Encode the last shard and wait for every upload, without committing: the records of this
        writer's shards, for a later `commit_shards` of the dataset together with other writers' shards
        (a stage whose shards are written by many workers); none when the id was already committed
        before this writer opened (the dataset is whole without them). The writer is closed afterwards;
        its shards stay until the dataset is committed (or `collect_garbage` finds them orphaned)."""
        self._require_open()
        if self._committed_before is None:
            self._finish_uploads()
        self._shutdown(cancel=False)
        self._closed = True
        return list(self._records)

    def abort(self) -> None:
        """Stop without committing and delete what this writer uploaded (best effort)."""
        if self._closed:
            return
        self._closed = True
        self._pending = []
        self._shutdown(cancel=True)
        self._delete_uploaded()

    # Shards ----------------------------------------------------------------------------------------

    def _shard_arrow_bytes(self) -> int:
        """How many Arrow bytes make the next shard (about max_shard_bytes of Parquet once ramped up),
        by the compression ratio seen so far."""
        if self._shards_cut == 1 and self._in_flight:
            # The first shard is small: its compression ratio is worth the wait before cutting more.
            self._in_flight[0].result()
        with self._ratio_lock:
            encoded, parquet = self._arrow_bytes_encoded, self._parquet_bytes_encoded
        ratio = encoded / parquet if parquet else 1.0
        ramp = min(1.0, RAMP_START * RAMP_GROWTH**self._shards_cut)
        return int(min(max(self.max_shard_bytes * ramp * ratio, 1), MAX_SHARD_ARROW_BYTES))

    def _cut_shard(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        shard, rest = pending.slice(0, rows), pending.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._pending_bytes = rest.nbytes if rest.num_rows else 0
        while len(self._in_flight) >= self._max_in_flight:
            self._finish_oldest()
        index = self._shards_cut
        self._shards_cut += 1
        self._in_flight.append(self._encoders.submit(self._encode_shard, index, shard))

    def _encode_shard(self, index: int, table: pa.Table) -> Future[ShardRecord]:
        sink = pa.BufferOutputStream()
        row_group_rows = max(1, -(-table.num_rows // ROW_GROUPS_PER_SHARD))
        with pq.ParquetWriter(sink, self.schema, **self._parquet_options) as parquet:
            parquet.write_table(table, row_group_size=row_group_rows)
        data = sink.getvalue()
        with self._ratio_lock:
            self._arrow_bytes_encoded += table.nbytes
            self._parquet_bytes_encoded += data.size
        record = ShardRecord(
            path=shard_path(self.writer_token, index),
            num_rows=table.num_rows,
            size_bytes=data.size,
            sha256=hashlib.sha256(data).hexdigest(),
        )
        return self._uploader.submit(self._upload_shard, record, data)

    def _upload_shard(self, record: ShardRecord, data: pa.Buffer) -> ShardRecord:
        self.store.put_bytes(record.key(self.dataset_id), data.to_pybytes(), sha256=record.sha256)
        return record

    def _finish_uploads(self) -> None:
        """Encode the rows not yet in a shard and wait until every shard is uploaded."""
        if self._pending_rows:
            self._cut_shard(self._pending_rows)
        while self._in_flight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        encoded = self._in_flight.pop(0)
        self._records.append(encoded.result().result())

    def _shutdown(self, cancel: bool) -> None:
        self._encoders.shutdown(wait=True, cancel_futures=cancel)
        self._uploader.shutdown(wait=True, cancel_futures=cancel)

    def _delete_uploaded(self) -> None:
        keys = [shard_key(self.dataset_id, self.writer_token, index) for index in range(self._shards_cut)]
        try:
            self.store.delete(keys)
        except ObjectStoreError as exc:
            log.warning(
                "could not delete the shards of an abandoned dataset write; collect_garbage will",
                dataset_id=self.dataset_id,
                writer_token=self.writer_token,
                error=str(exc),
            )

    def _conform(self, data: pa.RecordBatch | pa.Table) -> pa.Table:
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        elif not isinstance(data, pa.Table):
            raise TypeError(f"write_batch takes a pyarrow RecordBatch or Table, not {type(data).__name__}")
        if data.schema.equals(self.schema, check_metadata=True):
            return data
        try:
            return data.cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as exc:
            raise ValueError(
                f"rows for dataset {self.dataset_id!r} do not fit its schema {_describe(self.schema)}: "
                f"got {_describe(data.schema)} ({exc})"
            ) from None

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the writer of dataset {self.dataset_id!r} is already committed or aborted")


def parquet_encodings(schema: pa.Schema) -> dict[str, list[str]]:
    """Parquet writer options per column: BYTE_STREAM_SPLIT for floating-point columns (with zstd it
    beats a dictionary by far on logprobs), a dictionary for every other column (ids, strings), and
    statistics only for columns outside lists (min and max of a list's elements filter nothing)."""
    floats, others, statistics = [], [], []
    for path, arrow_type in _leaf_columns(schema):
        (floats if pa.types.is_floating(arrow_type) else others).append(path)
        if ".list." not in path:
            statistics.append(path)
    return {"use_dictionary": others, "use_byte_stream_split": floats, "write_statistics": statistics}


def _leaf_columns(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    """Parquet column paths of a schema's leaves, as the writer options name them."""

    def leaves(path: str, arrow_type: pa.DataType) -> list[tuple[str, pa.DataType]]:
        if (
            pa.types.is_list(arrow_type)
            or pa.types.is_large_list(arrow_type)
            or pa.types.is_fixed_size_list(arrow_type)
        ):
            return leaves(f"{path}.list.element", arrow_type.value_type)
        if pa.types.is_struct(arrow_type):
            return [leaf for child in arrow_type for leaf in leaves(f"{path}.{child.name}", child.type)]
        if pa.types.is_map(arrow_type):
            return [
                *leaves(f"{path}.key_value.key", arrow_type.key_type),
                *leaves(f"{path}.key_value.value", arrow_type.item_type),
            ]
        return [(path, arrow_type)]

    return [leaf for item in schema for leaf in leaves(item.name, item.type)]


# --- committing ------------------------------------------------------------------------------------------


def commit_shards(
    store: ObjectStore, dataset_id: str, shards: Sequence[ShardRecord], schema: pa.Schema, lineage: Lineage
) -> DatasetManifest:
    """Commit shards that someone else uploaded under ``<dataset_id>/shards/``.

    Every shard must exist with its stated size, and its stated sha256 when the store recorded one
    (`ObjectNotFound` / `IntegrityError` naming the shard otherwise). Idempotent like `DatasetWriter`:
    an id committed with the same schema returns that manifest; a different schema is a DatasetConflict.
    """
    validate_dataset_id(dataset_id)
    return _commit(store, dataset_id, list(shards), schema, lineage)


def _commit(
    store: ObjectStore, dataset_id: str, shards: list[ShardRecord], schema: pa.Schema, lineage: Lineage
) -> DatasetManifest:
    committed = _load_manifest(store, dataset_id)
    if committed is not None:
        _require_same_schema(committed, schema)
        return committed
    for shard in shards:
        key = shard.key(dataset_id)
        found = store.stat(key)
        if found.size != shard.size_bytes:
            raise ShardSizeMismatch(_shard_what(dataset_id, key), shard.size_bytes, found.size)
        if found.sha256 is not None and found.sha256 != shard.sha256:
            raise IntegrityError(_shard_what(dataset_id, key), expected=shard.sha256, actual=found.sha256)
    manifest = DatasetManifest.create(dataset_id, shards, schema, lineage)
    data = manifest.to_json()
    # The commit point: everything the manifest names is in place before it appears.
    store.put_bytes(manifest_key(dataset_id), data, sha256=manifest_sha256(data))
    return manifest


def _require_same_schema(committed: DatasetManifest, schema: pa.Schema) -> None:
    existing = committed.arrow_schema()
    if not existing.equals(schema, check_metadata=True):
        raise DatasetConflict(committed.dataset_id, existing, schema)


def _load_manifest(store: ObjectStore, dataset_id: str) -> DatasetManifest | None:
    key = manifest_key(dataset_id)
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return None
    manifest = DatasetManifest.from_json(data, what=f"manifest {key!r}")
    if manifest.dataset_id != dataset_id:
        raise ValueError(f"manifest {key!r} names dataset {manifest.dataset_id!r}, not {dataset_id!r}")
    return manifest


# --- reading ---------------------------------------------------------------------------------------------


class DatasetReader:
    """A committed dataset. Each shard is checked against the manifest's size and sha256 as it is
    downloaded; the next shard downloads while the current one is decoded."""

    def __init__(self, store: ObjectStore, dataset_id: str) -> None:
        validate_dataset_id(dataset_id)
        self.store = store
        self.dataset_id = dataset_id
        manifest = _load_manifest(store, dataset_id)
        if manifest is None:
            raise DatasetNotFound(dataset_id)
        self.manifest = manifest
        self.schema = manifest.arrow_schema()

    def read_batches(
        self,
        columns: Sequence[str] | None = None,
        shards: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of the given shards (all by default), in the given order, with the given
        columns; `batch_size` rows at most each (default: Parquet's)."""
        for _, batches in self.read_shards(columns, shards, batch_size):
            yield from batches

    def read_shards(
        self,
        columns: Sequence[str] | None = None,
        shards: Sequence[int] | None = None,
        batch_size: int | None = None,
        spool_dir: Path | None = None,
    ) -> Iterator[tuple[int, Iterator[pa.RecordBatch]]]:
        """Each of the given shards (all by default), in the given order: its index and its record
        batches (read them before asking for the next shard). Memory holds the shard being read and the
        next one, downloading; with `spool_dir`, both are files there instead (deleted once read), and
        memory holds only what decoding a record batch needs."""
        indices = self._shard_indices(shards)
        columns = self._columns(columns)
        if not indices:
            return
        options = {} if batch_size is None else {"batch_size": batch_size}
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True)

        def fetch(index: int) -> bytes | Path:
            return self.read_shard_bytes(index) if spool_dir is None else self.spool_shard(index, spool_dir)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataset-download") as downloader:
            upcoming = downloader.submit(fetch, indices[0])
            try:
                for position, index in enumerate(indices):
                    source = upcoming.result()
                    if position + 1 < len(indices):
                        upcoming = downloader.submit(fetch, indices[position + 1])
                    try:
                        yield index, _record_batches(source, columns, options)
                    finally:
                        _discard(source)
            finally:
                if not upcoming.cancel() and upcoming.exception() is None:
                    _discard(upcoming.result())

    def spool_shard(self, index: int, folder: Path) -> Path:
        """Download shard `index` into a file in `folder`, checked against the manifest; its path."""
        shard = self.manifest.shards[index]
        key = shard.key(self.dataset_id)
        path = folder / f"shard-{index:06d}-{secrets.token_hex(4)}.parquet"
        self.store.get_file(key, path)
        size, sha256 = size_and_sha256(path)
        if (size, sha256) != (shard.size_bytes, shard.sha256):
            path.unlink()
            if size != shard.size_bytes:
                raise ShardSizeMismatch(_shard_what(self.dataset_id, key), shard.size_bytes, size)
            raise IntegrityError(_shard_what(self.dataset_id, key), expected=shard.sha256, actual=sha256)
        return path

    def read_table(
        self, columns: Sequence[str] | None = None, shards: Sequence[int] | None = None
    ) -> pa.Table:
        columns = self._columns(columns)
        schema = (
            self.schema
            if columns is None
            else pa.schema([self.schema.field(name) for name in columns], metadata=self.schema.metadata)
        )
        return pa.Table.from_batches(list(self.read_batches(columns, shards)), schema=schema)

    def read_rows(self, rows: range, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of the rows `rows` (a step-1 range of row numbers), in order: only the shards that
        hold some of them are downloaded."""
        if rows.step != 1 or rows.start < 0 or rows.stop > self.manifest.num_rows:
            raise ValueError(
                f"dataset {self.dataset_id!r} has {self.manifest.num_rows} rows; rows={rows!r} is not a "
                "range of them"
            )
        first_row = 0
        wanted: list[int] = []
        starts: list[int] = []
        for index, shard in enumerate(self.manifest.shards):
            if first_row < rows.stop and first_row + shard.num_rows > rows.start:
                wanted.append(index)
                starts.append(first_row)
            first_row += shard.num_rows
        if not wanted:
            return
        row = starts[0]
        for batch in self.read_batches(columns, range(wanted[0], wanted[-1] + 1)):
            begin, end = max(rows.start - row, 0), min(rows.stop - row, batch.num_rows)
            row += batch.num_rows
            if begin < end:
                yield batch.slice(begin, end - begin)

    def read_shard_bytes(self, index: int) -> bytes:
        """The Parquet bytes of shard `index`, checked against the manifest."""
        shard = self.manifest.shards[index]
        key = shard.key(self.dataset_id)
        data = self.store.get_bytes(key)
        if len(data) != shard.size_bytes:
            raise ShardSizeMismatch(_shard_what(self.dataset_id, key), shard.size_bytes, len(data))
        actual = hashlib.sha256(data).hexdigest()
        if actual != shard.sha256:
            raise IntegrityError(_shard_what(self.dataset_id, key), expected=shard.sha256, actual=actual)
        return data

    def shard_range(self, worker_index: int, num_workers: int) -> range:
        """The shards worker `worker_index` of `num_workers` reads (see DatasetManifest.shard_range)."""
        return self.manifest.shard_range(worker_index, num_workers)

    def _shard_indices(self, shards: Sequence[int] | None) -> list[int]:
        count = len(self.manifest.shards)
        if shards is None:
            return list(range(count))
        indices = list(shards)
        if any(not 0 <= index < count for index in indices):
            raise ValueError(
                f"dataset {self.dataset_id!r} has {count} shards; shards={shards!r} is out of range"
            )
        return indices

    def _columns(self, columns: Sequence[str] | None) -> list[str] | None:
        if columns is None:
            return None
        unknown = [name for name in columns if name not in self.schema.names]
        if unknown:
            raise ValueError(
                f"dataset {self.dataset_id!r} has no column {unknown[0]!r}; it has {self.schema.names}"
            )
        return list(columns)


# Reading a spooled shard: a column chunk streams through a buffer this big, not whole into memory.
SPOOLED_READ_BUFFER_BYTES = 1024 * 1024


def _record_batches(
    source: bytes | Path, columns: list[str] | None, options: dict[str, Any]
) -> Iterator[pa.RecordBatch]:
    if isinstance(source, Path):
        parquet = pq.ParquetFile(source, buffer_size=SPOOLED_READ_BUFFER_BYTES)
    else:
        parquet = pq.ParquetFile(pa.BufferReader(source))
    with parquet:
        yield from parquet.iter_batches(columns=columns, **options)


def _discard(source: bytes | Path) -> None:
    if isinstance(source, Path):
        source.unlink(missing_ok=True)


# --- housekeeping ----------------------------------------------------------------------------------------


def list_datasets(store: ObjectStore, prefix: str = "") -> list[DatasetManifest]:
    """The committed datasets whose id starts with `prefix`, in id order."""
    suffix = f"/{MANIFEST_NAME}"
    found = []
    for info in store.list(prefix):
        if not info.key.endswith(suffix):
            continue
        dataset_id = info.key[: -len(suffix)]
        try:
            validate_dataset_id(dataset_id)
        except ValueError:
            continue  # some other object called manifest.json, not a dataset
        manifest = _load_manifest(store, dataset_id)
        if manifest is not None:  # deleted since the listing
            found.append(manifest)
    return sorted(found, key=lambda manifest: manifest.dataset_id)


def delete_dataset(store: ObjectStore, dataset_id: str) -> None:
    """Delete the manifest first (the dataset disappears at once), then every shard under its folder.
    DatasetNotFound if it is not committed."""
    if _load_manifest(store, dataset_id) is None:
        raise DatasetNotFound(dataset_id)
    store.delete([manifest_key(dataset_id)])
    store.delete([info.key for info in store.list(f"{dataset_id}/{SHARDS_FOLDER}/")])


@dataclass
class GarbageReport:
    deleted_keys: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    # Unreferenced shards kept because their writer wrote within `older_than` and may still be running.
    kept_recent_keys: list[str] = field(default_factory=list)


def collect_garbage(
    store: ObjectStore, prefix: str = "", *, older_than: timedelta, now: datetime | None = None
) -> GarbageReport:
    """Delete shards that no manifest will ever reference.

    - Committed datasets: shards their manifest does not list (a crashed writer, or one that lost a
      race to commit the same id).
    - Uncommitted datasets: the shards of each writer (told apart by the writer token) whose newest
      shard is older than `older_than`. A writer still running keeps uploading, so its newest shard is
      younger; make `older_than` much longer than a writer takes to encode one shard.
    """
    now = now or datetime.now(UTC)
    by_dataset: dict[str, list[tuple[ObjectInfo, str]]] = {}
    for info in store.list(prefix):
        parsed = parse_shard_key(info.key)
        if parsed is not None:
            by_dataset.setdefault(parsed.dataset_id, []).append((info, parsed.writer_token))
    report = GarbageReport()
    for dataset_id, shards in sorted(by_dataset.items()):
        manifest = _load_manifest(store, dataset_id)
        if manifest is not None:
            referenced = set(manifest.shard_keys())
            doomed = [info for info, _ in shards if info.key not in referenced]
        else:
            newest: dict[str, datetime] = {}
            for info, token in shards:
                newest[token] = max(newest.get(token, info.last_modified), info.last_modified)
            doomed = [info for info, token in shards if now - newest[token] > older_than]
            report.kept_recent_keys += [
                info.key for info, token in shards if now - newest[token] <= older_than
            ]
        if doomed:
            store.delete([info.key for info in doomed])
            report.deleted_keys += [info.key for info in doomed]
            report.deleted_bytes += sum(info.size for info in doomed)
    if report.deleted_keys:
        log.info(
            "garbage collected", prefix=prefix, objects=len(report.deleted_keys), bytes=report.deleted_bytes
        )
    return report
