"""Object storage as Stillhouse uses it: one bucket, keys inside it, whole objects in and out.

`ObjectStore` is the one interface; `LocalObjectStore` (a folder, embedded mode) and `S3ObjectStore`
(MinIO or any S3 API) implement it and pass the same test suite. Errors a user or operator can cause
(missing bucket, wrong credentials, endpoint down, a key that leaves the bucket) are the typed
`ObjectStoreError`s below, each with a message naming what is wrong.
"""

from __future__ import annotations

import abc
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

# How a spec names an object of the platform's store: s3://<bucket>/<key>.
S3_SCHEME = "s3://"
MAX_KEY_BYTES = 1024
# Keys per delete call: S3's DeleteObjects takes at most 1,000.
DELETE_BATCH = 1000


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime
    # sha256 recorded when the object was written through Stillhouse, if the backend keeps it.
    sha256: str | None = None
    # The S3 ETag from a listing: it changes whenever the object is written again (None on a local store).
    etag: str | None = None


class ObjectStoreError(Exception):
    """Base of every error an object store reports."""


class ObjectKeyError(ObjectStoreError):
    """An error about one object key, which it keeps in `key`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class ObjectNotFound(ObjectKeyError):
    def __init__(self, bucket: str, key: str) -> None:
        super().__init__(key, f"no object {key!r} in bucket {bucket!r}")


class BucketNotFound(ObjectStoreError):
    def __init__(self, bucket: str) -> None:
        super().__init__(f"bucket {bucket!r} does not exist")
        self.bucket = bucket


class AccessDenied(ObjectStoreError):
    """Wrong or missing credentials, or no permission on the bucket."""


class StoreUnavailable(ObjectStoreError):
    """The endpoint does not answer (down, wrong address, network)."""


class InvalidKey(ObjectKeyError):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, f"invalid object key {key!r}: {reason}")


class IntegrityError(ObjectStoreError):
    """Bytes read back do not match the hash recorded when they were written."""

    def __init__(self, what: str, expected: str, actual: str, *, measure: str = "sha256") -> None:
        super().__init__(f"{what} is corrupt: {measure} {actual} does not match the recorded {expected}")
        self.expected = expected
        self.actual = actual


def validate_key(key: str) -> str:
    """Return `key` if it names an object inside the bucket; raise InvalidKey otherwise."""
    if not key:
        raise InvalidKey(key, "empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKey(key, f"longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidKey(key, "must be relative to the bucket (no leading '/')")
    if "\\" in key or "\x00" in key:
        raise InvalidKey(key, "backslashes and NUL characters are not allowed")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts[:-1]) or parts[-1] in (".", ".."):
        raise InvalidKey(key, "'.', '..' and empty path segments are not allowed")
    if posixpath.normpath(key) != key.rstrip("/"):
        raise InvalidKey(key, "not a normalised path")
    return key


def validate_prefix(prefix: str) -> str:
    """Like validate_key, but the empty prefix (the whole bucket) and a trailing '/' are allowed."""
    return (
        prefix if prefix == "" else validate_key(prefix.rstrip("/")) + ("/" if prefix.endswith("/") else "")
    )


class ObjectStore(abc.ABC):
    """One bucket of an object store. Every method validates its keys with `validate_key`."""

    bucket: str

    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """Where the object lives, for people and manifests: s3://bucket/key or file:///path."""

    @abc.abstractmethod
    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> ObjectInfo:
        """Write a whole object atomically: readers see the old object or the new one, never part."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> ObjectInfo:
        """Upload a file of any size (multipart with parallel parts on S3)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download to `path` (written whole: a partial download never sits at `path`)."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Raise ObjectNotFound if there is no such object."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, recursively, in key order."""

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete these objects; keys that do not exist are ignored."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder `prefix` (not empty, ending in '/'); return how many.
        A missing bucket holds nothing to delete."""
        if not prefix.endswith("/") or validate_prefix(prefix) == "":
            raise InvalidKey(prefix, "a prefix to delete must name a folder: not empty, ending in '/'")
        try:
            keys = [info.key for info in self.list(prefix)]
        except BucketNotFound:
            return 0
        for start in range(0, len(keys), DELETE_BATCH):
            self.delete(keys[start : start + DELETE_BATCH])
        return len(keys)

    @abc.abstractmethod
    def presign_get(self, key: str, expires: timedelta) -> str: ...

    @abc.abstractmethod
    def presign_put(self, key: str, expires: timedelta) -> str: ...
