"""The embedded-mode object store: a bucket is the folder `root/<bucket>`, an object the file `<key>` in it.

Embedded mode has no HTTP server, so presigned URLs are `file://` URLs of the object path: readers and
writers on the same machine open the path directly, and the expiry does not apply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from stillhouse.common.objectstore.objects import (
    BucketNotFound,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    validate_key,
    validate_prefix,
)

# The sha256 given to put_* lives in a JSON sidecar under `root/.sha256/<bucket>/<key>`, outside the bucket
# folder (xattrs are Linux-only in Python); it counts only while it matches the file's inode, size and mtime.
SIDECAR_FOLDER = ".sha256"
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")
COPY_CHUNK_BYTES = 1024 * 1024


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file next to `path` with `write`, then rename it onto `path`: `path` is never partial."""
    temp = _write_temp(path, write)
    try:
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _write_temp(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temp.open("xb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _modified(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime, tz=UTC)


def _fingerprint(stat: os.stat_result) -> dict[str, int]:
    return {"inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class LocalObjectStore(ObjectStore):
    def __init__(self, root: Path, bucket: str) -> None:
        if not BUCKET_NAME.fullmatch(bucket):
            raise ValueError(
                f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, '.' and '-'"
            )
        self.root = root.expanduser().resolve()
        self.bucket = bucket
        self.folder = self.root / bucket

    def __repr__(self) -> str:
        return f"LocalObjectStore({self.folder})"

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def ensure_bucket(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def put_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> ObjectInfo:
        return self._put(key, sha256 or hashlib.sha256(data).hexdigest(), lambda out: out.write(data))

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> ObjectInfo:
        def copy(out: BinaryIO) -> None:
            with path.open("rb") as source:
                shutil.copyfileobj(source, out, COPY_CHUNK_BYTES)

        return self._put(key, sha256, copy)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key) from None

    def get_file(self, key: str, path: Path) -> None:
        source_path = self._path(key)
        try:
            source = source_path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key) from None
        with source:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda out: shutil.copyfileobj(source, out, COPY_CHUNK_BYTES))

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key) from None
        if not S_ISREG(stat.st_mode):
            raise self._missing(key)
        return ObjectInfo(key, stat.st_size, _modified(stat), self._recorded_sha256(key, stat))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        self._require_bucket()
        start = self.folder / prefix if prefix.endswith("/") or not prefix else (self.folder / prefix).parent
        found = []
        for key in sorted(key for key in self._keys_under(start) if key.startswith(prefix)):
            try:
                stat = (self.folder / key).stat()
            except FileNotFoundError:  # deleted since the walk
                continue
            found.append(ObjectInfo(key, stat.st_size, _modified(stat)))
        return iter(found)

    def delete(self, keys: Iterable[str]) -> None:
        paths = {key: self._path(key) for key in keys}
        self._require_bucket()
        for key, path in paths.items():
            try:
                path.unlink(missing_ok=True)
            except (IsADirectoryError, NotADirectoryError):
                continue  # a folder of other objects, not an object
            self._sidecar(key).unlink(missing_ok=True)
            _remove_empty_folders(path.parent, self.folder)
            _remove_empty_folders(self._sidecar(key).parent, self.root / SIDECAR_FOLDER)

    def presign_get(self, key: str, expires: timedelta) -> str:
        return self.uri(key)

    def presign_put(self, key: str, expires: timedelta) -> str:
        return self.uri(key)

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.endswith("/"):
            raise InvalidKey(key, "a local store keeps objects as files, so a key cannot end with '/'")
        return self.folder / key

    def _sidecar(self, key: str) -> Path:
        return self.root / SIDECAR_FOLDER / self.bucket / key

    def _require_bucket(self) -> None:
        if not self.folder.is_dir():
            raise BucketNotFound(self.bucket)

    def _missing(self, key: str) -> ObjectNotFound:
        """The error for a key with no file: BucketNotFound (raised here) if the bucket is gone too."""
        self._require_bucket()
        return ObjectNotFound(self.bucket, key)

    def _put(self, key: str, sha256: str | None, write: Callable[[BinaryIO], object]) -> ObjectInfo:
        target = self._path(key)
        self._require_bucket()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise _folder_clash(key) from None
        temp = _write_temp(target, write)
        stat = temp.stat()
        try:
            os.replace(temp, target)
        except IsADirectoryError:
            raise _folder_clash(key) from None
        finally:
            temp.unlink(missing_ok=True)
        # Recorded after the rename: until then the old record does not match the new file and reads as None.
        self._record_sha256(key, sha256, stat)
        return ObjectInfo(key, stat.st_size, _modified(stat), sha256)

    def _record_sha256(self, key: str, sha256: str | None, stat: os.stat_result) -> None:
        sidecar = self._sidecar(key)
        if sha256 is None:
            sidecar.unlink(missing_ok=True)
            return
        record = json.dumps({"sha256": sha256, **_fingerprint(stat)}).encode()
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(sidecar, lambda out: out.write(record))

    def _recorded_sha256(self, key: str, stat: os.stat_result) -> str | None:
        try:
            record = json.loads(self._sidecar(key).read_bytes())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            return None
        sha256 = record.pop("sha256", None)
        return sha256 if record == _fingerprint(stat) else None

    def _keys_under(self, start: Path) -> Iterator[str]:
        for folder, _, files in os.walk(start):
            for name in files:
                if not TEMP_NAME.fullmatch(name):
                    yield Path(folder, name).relative_to(self.folder).as_posix()


def _folder_clash(key: str) -> InvalidKey:
    return InvalidKey(key, "a local store keeps objects as files, so no key can also be a folder of others")


def _remove_empty_folders(folder: Path, stop: Path) -> None:
    """Remove `folder` and its parents up to (not including) `stop` while they are empty."""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            return
        folder = folder.parent
