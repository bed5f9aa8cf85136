"""Dataset manifests and the bucket layout of a dataset. Pure: no I/O.

A dataset `<id>` is the objects

    <id>/manifest.json                                  written last: the dataset exists iff it exists
    <id>/shards/part-<index:05d>-<writer token>.parquet  written first, one per shard

The writer token is random per writer, so the shards of a writer that crashed before its commit are told
apart from those of the writer that committed, and garbage-collected.

The manifest is JSON with sorted keys and no spaces, so the same manifest always has the same bytes
and the same `manifest_sha256`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_FOLDER = "shards"
MAX_DATASET_ID_LENGTH = 512

_SEGMENT = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_WRITER_TOKEN = re.compile(r"[0-9a-f]{4,64}")
# <id>/shards/part-00012-1a2b3c4d.parquet: the id, the index and the writer token.
_SHARD_KEY = re.compile(
    rf"(?P<dataset_id>.+)/{SHARDS_FOLDER}/part-(?P<index>[0-9]{{5,}})-(?P<writer_token>[0-9a-f]{{4,64}})\.parquet"
)


def validate_dataset_id(dataset_id: str) -> str:
    """Return `dataset_id` if it is a valid id; ValueError naming the id and the rule otherwise.

    An id is a relative path of segments of lowercase letters, digits, '.', '_' and '-', each starting
    with a letter or digit, e.g. ``jobs/job-1a2b/prompts/train``. ``shards`` and ``manifest.json`` are
    not allowed as segments: they are the dataset's own layout.
    """
    if not isinstance(dataset_id, str) or not dataset_id:
        raise ValueError(f"invalid dataset id {dataset_id!r}: it must be a non-empty string")
    if len(dataset_id) > MAX_DATASET_ID_LENGTH:
        raise ValueError(f"invalid dataset id {dataset_id!r}: longer than {MAX_DATASET_ID_LENGTH} characters")
    for segment in dataset_id.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"invalid dataset id {dataset_id!r}: segment {segment!r} must be lowercase letters, digits, "
                "'.', '_' or '-', starting with a letter or digit (segments are separated by single '/')"
            )
        if segment in (SHARDS_FOLDER, MANIFEST_NAME):
            raise ValueError(
                f"invalid dataset id {dataset_id!r}: {segment!r} is reserved for the dataset layout"
            )
    return dataset_id


def manifest_key(dataset_id: str) -> str:
    return f"{validate_dataset_id(dataset_id)}/{MANIFEST_NAME}"


def shard_path(writer_token: str, index: int) -> str:
    """Where a shard lives relative to its dataset's folder, as `ShardRecord.path` records it."""
    if not _WRITER_TOKEN.fullmatch(writer_token):
        raise ValueError(f"invalid writer token {writer_token!r}: 4 to 64 lowercase hex digits")
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{SHARDS_FOLDER}/part-{index:05d}-{writer_token}.parquet"


def shard_key(dataset_id: str, writer_token: str, index: int) -> str:
    return f"{validate_dataset_id(dataset_id)}/{shard_path(writer_token, index)}"


@dataclass(frozen=True)
class ParsedShardKey:
    dataset_id: str
    index: int
    writer_token: str


def parse_shard_key(key: str) -> ParsedShardKey | None:
    """The parts of a key made by `shard_key`, or None if `key` is not a shard of a valid dataset id."""
    match = _SHARD_KEY.fullmatch(key)
    if match is None:
        return None
    try:
        validate_dataset_id(match["dataset_id"])
    except ValueError:
        return None
    return ParsedShardKey(match["dataset_id"], int(match["index"]), match["writer_token"])


@dataclass(frozen=True)
class ShardRecord:
    path: str  # relative to the dataset's folder: "shards/part-00000-1a2b3c4d.parquet"
    num_rows: int
    size_bytes: int
    sha256: str

    def __post_init__(self) -> None:
        parts = self.path.split("/")
        if len(parts) != 2 or parts[0] != SHARDS_FOLDER or not _SEGMENT.fullmatch(parts[1]):
            raise ValueError(
                f"invalid shard path {self.path!r}: "
                f"it must be '{SHARDS_FOLDER}/<name>', relative to the dataset's folder"
            )
        for name in ("num_rows", "size_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"shard {self.path!r}: {name} must be a whole number >= 0, got {value!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(
                f"shard {self.path!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}"
            )

    def key(self, dataset_id: str) -> str:
        """The shard's object key in the bucket."""
        return f"{dataset_id}/{self.path}"


@dataclass(frozen=True)
class Lineage:
    """Which job and stage produced a dataset, from which inputs (dataset ids), with which code."""

    job_id: str
    stage: str
    input_ids: list[str] = field(default_factory=list)
    code_version: str = ""


@dataclass(frozen=True)
class SchemaField:
    """A column as people read it in the manifest; the exact schema is `DatasetManifest.schema`."""

    name: str
    type: str


@dataclass(frozen=True)
class DatasetManifest:
    format_version: int
    dataset_id: str
    num_rows: int
    shards: list[ShardRecord]
    schema: str  # base64 of the Arrow IPC serialisation of the schema
    schema_fields: list[SchemaField]
    lineage: Lineage
    created_at: str  # UTC, ISO 8601

    def __post_init__(self) -> None:
        validate_dataset_id(self.dataset_id)
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"manifest of {self.dataset_id!r} has format_version {self.format_version!r}; "
                f"this Stillhouse reads version {FORMAT_VERSION}"
            )
        if self.num_rows != sum(shard.num_rows for shard in self.shards):
            raise ValueError(
                f"manifest of {self.dataset_id!r} says num_rows={self.num_rows}, but its shards hold "
                f"{sum(shard.num_rows for shard in self.shards)}"
            )
        paths = [shard.path for shard in self.shards]
        if len(set(paths)) != len(paths):
            raise ValueError(f"manifest of {self.dataset_id!r} lists a shard more than once")
        self.arrow_schema()  # raises if the schema does not decode
        try:
            created = datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            created = None
        if created is None or created.utcoffset() is None or created.utcoffset().total_seconds() != 0:
            raise ValueError(
                f"manifest of {self.dataset_id!r}: created_at must be an ISO 8601 UTC time, "
                f"got {self.created_at!r}"
            )

    @classmethod
    def create(
        cls,
        dataset_id: str,
        shards: Sequence[ShardRecord],
        schema: pa.Schema,
        lineage: Lineage,
        created_at: datetime | None = None,
    ) -> DatasetManifest:
        when = (created_at or datetime.now(UTC)).astimezone(UTC)
        return cls(
            format_version=FORMAT_VERSION,
            dataset_id=dataset_id,
            num_rows=sum(shard.num_rows for shard in shards),
            shards=list(shards),
            schema=encode_schema(schema),
            schema_fields=[SchemaField(item.name, str(item.type)) for item in schema],
            lineage=lineage,
            created_at=when.isoformat(timespec="microseconds"),
        )

    def arrow_schema(self) -> pa.Schema:
        return decode_schema(self.schema, self.dataset_id)

    def shard_keys(self) -> list[str]:
        return [shard.key(self.dataset_id) for shard in self.shards]

    @property
    def size_bytes(self) -> int:
        return sum(shard.size_bytes for shard in self.shards)

    def shard_range(self, worker_index: int, num_workers: int) -> range:
        """The shards worker `worker_index` of `num_workers` reads, for splitting a dataset across Ray
        workers: contiguous, the same for the same manifest, every shard read by exactly one worker,
        and balanced by rows. A shard goes to the worker whose equal share of the rows holds the
        shard's middle row, so each worker's rows differ from an equal share by less than the largest
        shard. With fewer shards than workers some workers get an empty range."""
        if num_workers < 1 or not 0 <= worker_index < num_workers:
            raise ValueError(
                f"worker_index must be in [0, {num_workers}) with num_workers >= 1; got {worker_index}"
            )
        shards = self.shards
        total = self.num_rows
        owners = []
        before = 0
        for position, shard in enumerate(shards):
            if total:
                # floor(middle row * workers / rows), in integers: (2*before + rows) * W // (2 * total)
                owners.append(
                    min(num_workers - 1, (2 * before + shard.num_rows) * num_workers // (2 * total))
                )
            else:
                owners.append(position * num_workers // len(shards))
            before += shard.num_rows
        start = sum(1 for owner in owners if owner < worker_index)
        stop = sum(1 for owner in owners if owner <= worker_index)
        return range(start, stop)

    def to_json(self) -> bytes:
        document = {
            "format_version": self.format_version,
            "dataset_id": self.dataset_id,
            "num_rows": self.num_rows,
            "shards": [
                {"path": s.path, "num_rows": s.num_rows, "size_bytes": s.size_bytes, "sha256": s.sha256}
                for s in self.shards
            ],
            "schema": self.schema,
            "schema_fields": [{"name": f.name, "type": f.type} for f in self.schema_fields],
            "lineage": {
                "job_id": self.lineage.job_id,
                "stage": self.lineage.stage,
                "input_ids": list(self.lineage.input_ids),
                "code_version": self.lineage.code_version,
            },
            "created_at": self.created_at,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, what: str = "manifest") -> DatasetManifest:
        """Parse a manifest; ValueError naming `what` (e.g. its key) and the problem if it is malformed."""
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{what} is not valid JSON: {exc}") from None
        try:
            reader = _Fields(document, what)
            lineage = _Fields(reader.get("lineage", dict), f"{what}: lineage")
            return cls(
                format_version=reader.get("format_version", int),
                dataset_id=reader.get("dataset_id", str),
                num_rows=reader.get("num_rows", int),
                shards=[
                    _shard(item, f"{what}: shards[{index}]")
                    for index, item in enumerate(reader.get("shards", list))
                ],
                schema=reader.get("schema", str),
                schema_fields=[
                    SchemaField(
                        **_Fields(item, f"{what}: schema_fields[{index}]").only({"name": str, "type": str})
                    )
                    for index, item in enumerate(reader.get("schema_fields", list))
                ],
                lineage=Lineage(
                    job_id=lineage.get("job_id", str),
                    stage=lineage.get("stage", str),
                    input_ids=_strings(lineage.get("input_ids", list), f"{what}: lineage.input_ids"),
                    code_version=lineage.get("code_version", str),
                ),
                created_at=reader.get("created_at", str),
            )
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith(what) else f"{what}: {message}") from None


def manifest_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def decode_schema(encoded: str, dataset_id: str = "") -> pa.Schema:
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded, validate=True)))
    except (binascii.Error, ValueError, pa.ArrowException) as exc:
        raise ValueError(
            f"manifest of {dataset_id!r}: schema is not a base64 Arrow IPC schema ({exc})"
        ) from None


class _Fields:
    """Typed access to one JSON object of a manifest, with errors that name where the problem is."""

    def __init__(self, document: Any, where: str) -> None:
        if not isinstance(document, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(document).__name__}")
        self.document = document
        self.where = where

    def get(self, name: str, kind: type) -> Any:
        if name not in self.document:
            raise ValueError(f"{self.where} has no {name!r}")
        value = self.document[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{self.where}: {name!r} must be a JSON {kind.__name__}, got {value!r}")
        return value

    def only(self, kinds: dict[str, type]) -> dict[str, Any]:
        return {name: self.get(name, kind) for name, kind in kinds.items()}


def _shard(document: Any, where: str) -> ShardRecord:
    values = _Fields(document, where).only({"path": str, "num_rows": int, "size_bytes": int, "sha256": str})
    try:
        return ShardRecord(**values)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _strings(values: list, where: str) -> list[str]:
    if not all(isinstance(value, str) for value in values):
        raise ValueError(f"{where} must be a list of strings")
    return list(values)
