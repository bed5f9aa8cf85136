"""Models in object storage (``s3://<bucket>/<prefix>``), downloaded once into a cache folder that the
processes of a machine (or of a shared volume) share.

Layout: ``<cache_dir>/<model>/<version>/``. `<model>` names the bucket and prefix (a readable tail and a
hash); `<version>` hashes the listing: every object's path, size and ETag. A model written again under
the same prefix is a new version: it is downloaded beside the old one, which is then removed. Every use
lists the prefix (one request) so that a changed model is never served stale; nothing else is fetched
when the version is already there.

A half-download is never used:
- an exclusive lock per model (``<cache_dir>/<model>.lock``, `flock`) is held while checking and
  downloading, so concurrent workers download a version once; the others wait, then find it there;
- files land in a staging folder renamed to `<version>` only once each has its listed size, with a record
  of the listing (`RECORD_NAME`) inside; a crash leaves a staging folder, which the next download removes;
- a version folder is used only when its record matches the listing and every file has its listed size;
  otherwise it is damaged, and is downloaded again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stillhouse.common.models.references import ModelReferenceRefused, S3ModelReference
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.objectstore.objects import ObjectStore

RECORD_NAME = ".stillhouse-download.json"
STAGING_PREFIX = ".partial-"
PARALLEL_FILES = 4


@dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the model folder
    size: int
    etag: str


class S3ModelCache:
    """`fetch` turns an s3:// model reference into a local folder holding a complete copy of it.

    `open_store(bucket)` gives the object store of a bucket, with the platform's credentials."""

    def __init__(self, settings: ModelSettings, open_store: Callable[[str], ObjectStore]) -> None:
        self._settings = settings
        self._open_store = open_store

    def fetch(
        self, reference: S3ModelReference, field: str, include: Callable[[str], bool] | None = None
    ) -> Path:
        """The local folder of the model's current version, downloading it if needed; only the files
        whose relative path `include` accepts (all by default). ModelReferenceRefused naming `field` when
        the prefix holds no files, too many, too many bytes, or a path that would leave the folder."""
        store = self._open_store(reference.bucket)
        files = self._listing(store, reference, field, include)
        model_dir = self._settings.cache_dir / _model_dir_name(reference)
        version_dir = model_dir / _version_name(files)
        with _exclusive_lock(model_dir.with_name(model_dir.name + ".lock")):
            if _is_complete(version_dir, files):
                return version_dir
            _remove_staging_leftovers(model_dir)
            shutil.rmtree(version_dir, ignore_errors=True)  # a damaged copy, if any
            self._download(store, reference, files, model_dir, version_dir)
            for old in model_dir.iterdir():
                if old != version_dir:
                    shutil.rmtree(old, ignore_errors=True)
        return version_dir

    def _listing(
        self,
        store: ObjectStore,
        reference: S3ModelReference,
        field: str,
        include: Callable[[str], bool] | None,
    ) -> list[ModelFile]:
        folder = f"{reference.prefix}/"
        files: list[ModelFile] = []
        total = 0
        for info in store.list(folder):
            path = info.key.removeprefix(folder)
            if not path or info.key.endswith("/") or (include is not None and not include(path)):
                continue  # folder markers, and files not asked for
            _check_relative_path(reference, path, field)
            files.append(ModelFile(path, info.size, info.etag or info.last_modified.isoformat()))
            total += info.size
            if len(files) > self._settings.max_download_files:
                raise ModelReferenceRefused(
                    field, f"{reference} holds more than {self._settings.max_download_files} files"
                )
            if total > self._settings.max_download_bytes:
                raise ModelReferenceRefused(
                    field,
                    f"{reference} holds more than {self._settings.max_download_bytes} bytes (the models "
                    "setting max_download_bytes)",
                )
        if not files:
            raise ModelReferenceRefused(field, f"no model files under {reference}/")
        return files

    def _download(
        self,
        store: ObjectStore,
        reference: S3ModelReference,
        files: list[ModelFile],
        model_dir: Path,
        version_dir: Path,
    ) -> None:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))

        def download(file: ModelFile) -> None:
            target = staging / file.path
            store.get_file(f"{reference.prefix}/{file.path}", target)
            if target.stat().st_size != file.size:
                raise OSError(
                    f"{reference}/{file.path} changed while downloading: {target.stat().st_size} bytes, "
                    f"listed with {file.size}"
                )

        try:
            with ThreadPoolExecutor(PARALLEL_FILES) as pool:
                list(pool.map(download, files))
            (staging / RECORD_NAME).write_text(_record(files), encoding="utf-8")
            staging.rename(version_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _check_relative_path(reference: S3ModelReference, path: str, field: str) -> None:
    segments = path.split("/")
    if path == RECORD_NAME or any(segment in ("", ".", "..") for segment in segments) or "\\" in path:
        raise ModelReferenceRefused(
            field, f"{reference} holds the object {path!r}, whose path cannot be a file in a model folder"
        )


def _model_dir_name(reference: S3ModelReference) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", reference.prefix.rsplit("/", 1)[-1])[:48]
    digest = hashlib.sha256(f"{reference.bucket}/{reference.prefix}".encode()).hexdigest()[:16]
    return f"{tail}-{digest}"


def _record(files: list[ModelFile]) -> str:
    return json.dumps([[file.path, file.size, file.etag] for file in sorted(files, key=lambda f: f.path)])


def _version_name(files: list[ModelFile]) -> str:
    return hashlib.sha256(_record(files).encode()).hexdigest()[:24]


def _is_complete(version_dir: Path, files: list[ModelFile]) -> bool:
    """Whether `version_dir` is a whole copy of `files`: its record matches and every size does."""
    try:
        if (version_dir / RECORD_NAME).read_text(encoding="utf-8") != _record(files):
            return False
        return all((version_dir / file.path).stat().st_size == file.size for file in files)
    except OSError:
        return False


def _remove_staging_leftovers(model_dir: Path) -> None:
    """Staging folders of downloads that died: the lock is held, so none is in progress."""
    if model_dir.is_dir():
        for leftover in model_dir.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
