"""Artifacts: folders of files (a student model, a checkpoint) kept in object storage under one prefix.

An artifact is `<prefix>/<relative path>` for each file plus `<prefix>/artifact.json`, its manifest: every
file with its size and sha256, the lineage and the creation time. The manifest is written last, so an
artifact is visible only once all of its files are in place; downloads verify every file against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from stillhouse.common.objectstore.objects import (
    IntegrityError,
    ObjectStore,
    ObjectStoreError,
    validate_key,
    validate_prefix,
)

MANIFEST_NAME = "artifact.json"
MANIFEST_FORMAT = "stillhouse.artifact/v1"
HASH_CHUNK_BYTES = 1024 * 1024

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class ArtifactFileRecord:
    path: str  # relative to the artifact folder, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class ArtifactManifest:
    files: list[ArtifactFileRecord]
    lineage: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class ArtifactExists(ObjectStoreError):
    """Artifacts are immutable: a committed one is never overwritten in place."""


# Manifest (de)serialisation: pure functions.


def manifest_to_json(manifest: ArtifactManifest) -> bytes:
    document = {
        "format": MANIFEST_FORMAT,
        "created_at": manifest.created_at.isoformat(),
        "lineage": manifest.lineage,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files],
    }
    return json.dumps(document, indent=2, sort_keys=True).encode()


def manifest_from_json(data: bytes, where: str) -> ArtifactManifest:
    """Parse a manifest; `where` names it in errors. File paths that would leave the folder are refused."""
    try:
        document = json.loads(data)
        if document["format"] != MANIFEST_FORMAT:
            raise ValueError(f"unknown format {document['format']!r}")
        files = [
            ArtifactFileRecord(validate_key(f["path"]), int(f["size"]), str(f["sha256"]))
            for f in document["files"]
        ]
        return ArtifactManifest(
            files, dict(document["lineage"]), datetime.fromisoformat(document["created_at"])
        )
    except (ValueError, KeyError, TypeError, ObjectStoreError) as error:
        raise ObjectStoreError(f"{where} is not a valid artifact manifest: {error}") from error


# Moving artifacts in and out of a store.


def upload_folder(
    store: ObjectStore,
    artifact_prefix: str,
    folder: Path,
    *,
    lineage: Mapping[str, Any] | None = None,
    parallel_files: int = 4,
) -> list[ArtifactFileRecord]:
    """Upload every file under `folder` (in parallel, `parallel_files` at a time; pass the store settings'
    `parallel_uploads`), then commit the manifest. Raises ArtifactExists if `artifact_prefix` is committed."""
    prefix = _as_folder(artifact_prefix)
    paths = _relative_files(folder)
    if MANIFEST_NAME in paths:
        raise ValueError(f"{folder} has a top-level {MANIFEST_NAME}, which would clash with the manifest")
    if store.exists(prefix + MANIFEST_NAME):
        raise ArtifactExists(f"artifact {store.uri(prefix + MANIFEST_NAME)} is already committed")

    def upload(path: str) -> ArtifactFileRecord:
        # Hashed before its upload so that the object carries its sha256; files go up in parallel, so
        # hashing one file overlaps uploading others.
        size, sha256 = size_and_sha256(folder / path)
        store.put_file(prefix + path, folder / path, sha256=sha256)
        return ArtifactFileRecord(path, size, sha256)

    records = _in_parallel(upload, paths, parallel_files)
    manifest = ArtifactManifest(records, dict(lineage or {}))
    store.put_bytes(prefix + MANIFEST_NAME, manifest_to_json(manifest))
    return records


def list_artifacts(store: ObjectStore, prefix: str = "") -> dict[str, ArtifactManifest]:
    """Every committed artifact under `prefix`, by artifact id (its prefix without the trailing '/')."""
    suffix = "/" + MANIFEST_NAME
    return {
        info.key.removesuffix(suffix): read_artifact_manifest(store, info.key.removesuffix(MANIFEST_NAME))
        for info in store.list(validate_prefix(prefix))
        if info.key.endswith(suffix)
    }


def manifest_sha256(manifest: ArtifactManifest) -> str:
    return hashlib.sha256(manifest_to_json(manifest)).hexdigest()


def _path(record: ArtifactFileRecord) -> str:
    return record.path


def read_artifact_manifest(store: ObjectStore, artifact_prefix: str) -> ArtifactManifest:
    """The committed manifest; ObjectNotFound if the artifact is not (yet) committed."""
    key = _as_folder(artifact_prefix) + MANIFEST_NAME
    return manifest_from_json(store.get_bytes(key), store.uri(key))


def download_artifact(
    store: ObjectStore,
    artifact_prefix: str,
    dest_folder: Path,
    *,
    parallel_files: int = 4,
    include: Callable[[str], bool] | None = None,
) -> ArtifactManifest:
    """Download and verify every file of a committed artifact into `dest_folder` (absent or empty), or
    only those whose relative path `include` accepts.

    Files land in a temporary sibling folder that is renamed to `dest_folder` only once all of them are
    verified; on any failure (IntegrityError naming the file on a mismatch) nothing is left behind.
    """
    prefix = _as_folder(artifact_prefix)
    manifest = read_artifact_manifest(store, prefix)
    if dest_folder.exists() and any(dest_folder.iterdir()):
        raise FileExistsError(f"{dest_folder} is not empty")
    staging = dest_folder.with_name(f".{dest_folder.name}.{uuid.uuid4().hex}.partial")
    staging.mkdir(parents=True)

    def download(record: ArtifactFileRecord) -> None:
        target = staging / record.path
        store.get_file(prefix + record.path, target)
        size, sha256 = size_and_sha256(target)
        if (size, sha256) != (record.size, record.sha256):
            what = f"artifact file {record.path!r} ({store.uri(prefix + record.path)}, {size} bytes)"
            raise IntegrityError(what, record.sha256, sha256)

    try:
        chosen = [record for record in manifest.files if include is None or include(record.path)]
        _in_parallel(download, chosen, parallel_files)
        os.replace(staging, dest_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def size_and_sha256(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file, read in chunks (files may be many GB)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as source:
        while chunk := source.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _as_folder(artifact_prefix: str) -> str:
    prefix = validate_prefix(artifact_prefix)
    if not prefix:
        raise ValueError("an artifact needs a prefix of its own, not the whole bucket")
    return prefix if prefix.endswith("/") else prefix + "/"


def _relative_files(folder: Path) -> list[str]:
    """Every file under `folder` (following links to files, not to folders), '/'-separated, sorted."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    found = []
    for parent, _, names in os.walk(folder):
        found.extend(Path(parent, name).relative_to(folder).as_posix() for name in names)
    return sorted(path for path in found if (folder / path).is_file())


def _in_parallel(work: Callable[[Item], Result], items: Iterable[Item], workers: int) -> list[Result]:
    """`work` on every item in a thread pool, results in order; a failure cancels what has not started."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
