"""The object store on an S3 API (MinIO in the chart, AWS S3, anything that speaks it), through `minio`.

Every minio/urllib3 error becomes one of the typed errors of `objects.py`, with a message naming the endpoint
or the bucket and key; credentials never appear in a message.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from stillhouse.common.objectstore.local_store import COPY_CHUNK_BYTES, write_atomically
from stillhouse.common.objectstore.objects import (
    AccessDenied,
    BucketNotFound,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    StoreUnavailable,
    validate_key,
    validate_prefix,
)

SHA256_METADATA = "sha256"  # user metadata, sent as the header x-amz-meta-sha256
CREDENTIAL_ERRORS = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


# A dead endpoint fails after two reconnects and a silent one after two re-reads. 5xx answers are retried
# for about 7.5 s (waits of 0, 0.5, 1, 2 and 4 s, or what Retry-After asks), enough to ride out a server
# that is briefly overloaded or still allocating space for a bucket it has just created (SeaweedFS answers
# the first writes to a new bucket with 500 while it does).
S3_RETRIES = urllib3.Retry(
    total=7,
    connect=2,
    read=2,
    status=5,
    backoff_factor=0.25,
    status_forcelist=[500, 502, 503, 504],
)


def s3_http_pool(
    *, max_connections: int, connect_timeout_s: float = 2.0, read_timeout_s: float = 60.0
) -> urllib3.PoolManager:
    """HTTP connections for a minio client that give up on a dead endpoint in seconds, not minutes.

    Retries cover a refused or reset connection (a restarting server) and 5xx answers (honouring Retry-After);
    with no `ca_certs`, HTTPS trusts the system store (and SSL_CERT_FILE, through OpenSSL).
    """
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        maxsize=max_connections,
        cert_reqs="CERT_REQUIRED",
        retries=S3_RETRIES,
    )


class S3ObjectStore(ObjectStore):
    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        part_size: int,
        parallel_uploads: int,
        endpoint_label: str,
        link_signer: Minio | None = None,
    ) -> None:
        """`link_signer` signs presigned URLs for the host users reach (see `public_link_signer`); by
        default `client` signs them, for the endpoint the services use."""
        self.bucket = bucket
        self._client = client
        self._link_signer = link_signer or client
        self._part_size = part_size
        self._parallel_uploads = parallel_uploads
        self._endpoint = endpoint_label

    def __repr__(self) -> str:
        return f"S3ObjectStore({self._endpoint}, bucket={self.bucket!r})"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{validate_key(key)}"

    def ensure_bucket(self) -> None:
        with self._errors():
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as error:
                if error.code != "BucketAlreadyOwnedByYou":  # made by someone else meanwhile
                    raise

    def put_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> ObjectInfo:
        validate_key(key)
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        with self._errors(key):
            written = self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                metadata={SHA256_METADATA: sha256},
                part_size=self._part_size,
                num_parallel_uploads=self._parallel_uploads,
            )
        # A PUT answer carries no Last-Modified; the local clock is close enough for a fresh write.
        return ObjectInfo(key, len(data), written.last_modified or datetime.now(UTC), sha256)

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> ObjectInfo:
        validate_key(key)
        size = path.stat().st_size
        with self._errors(key):
            written = self._client.fput_object(
                self.bucket,
                key,
                str(path),
                metadata={SHA256_METADATA: sha256} if sha256 else None,
                part_size=self._part_size,
                num_parallel_uploads=self._parallel_uploads,
            )
        return ObjectInfo(key, size, written.last_modified or datetime.now(UTC), sha256)

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        with self._errors(key):
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_file(self, key: str, path: Path) -> None:
        # Not fget_object: it deletes an existing file at `path` before its rename, and leaves its
        # `.part.minio` file behind when a download fails.
        validate_key(key)
        with self._errors(key):
            response = self._client.get_object(self.bucket, key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(path, lambda out: _copy_body(response, out))
            finally:
                response.close()
                response.release_conn()

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        with self._errors(key):
            try:
                found = self._client.stat_object(self.bucket, key)
            except S3Error as error:
                # A HEAD answer has no body, so a missing bucket reads as a missing key: ask which it is.
                if error.code == "NoSuchKey" and not self._client.bucket_exists(self.bucket):
                    raise BucketNotFound(self.bucket) from None
                raise
        return ObjectInfo(
            key, found.size or 0, found.last_modified, found.metadata.get(f"x-amz-meta-{SHA256_METADATA}")
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        with self._errors():
            found = [
                ObjectInfo(item.object_name, item.size or 0, item.last_modified, etag=item.etag)
                for item in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            ]
        # S3 lists in UTF-8 byte order, but not every S3 server does (SeaweedFS lists folder by folder).
        return iter(sorted(found, key=lambda info: info.key))

    def delete(self, keys: Iterable[str]) -> None:
        targets = [DeleteObject(validate_key(key)) for key in keys]
        if not targets:
            return
        with self._errors():
            for failed in self._client.remove_objects(self.bucket, targets):
                if failed.code != "NoSuchKey":
                    raise self._translate(failed.code, failed.message, failed.name)

    def presign_get(self, key: str, expires: timedelta) -> str:
        validate_key(key)
        with self._errors(key):
            return self._link_signer.presigned_get_object(self.bucket, key, expires=expires)

    def presign_put(self, key: str, expires: timedelta) -> str:
        validate_key(key)
        with self._errors(key):
            return self._link_signer.presigned_put_object(self.bucket, key, expires=expires)

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except S3Error as error:
            raise self._translate(error.code, error.message, key) from error
        except ServerError as error:
            raise StoreUnavailable(
                f"object store at {self._endpoint} failed with HTTP {error.status_code}"
            ) from error
        except InvalidResponseError as error:
            raise StoreUnavailable(
                f"object store at {self._endpoint} does not answer as an S3 API: {error}"
            ) from error
        except urllib3.exceptions.HTTPError as error:
            reason = error.reason if isinstance(error, urllib3.exceptions.MaxRetryError) else error
            raise StoreUnavailable(f"object store at {self._endpoint} does not answer: {reason}") from error

    def _translate(self, code: str | None, message: str | None, key: str | None) -> ObjectStoreError:
        if code == "NoSuchBucket":
            return BucketNotFound(self.bucket)
        if code == "NoSuchKey" and key is not None:
            return ObjectNotFound(self.bucket, key)
        if code in CREDENTIAL_ERRORS:
            return AccessDenied(
                f"object store at {self._endpoint} refused access to bucket {self.bucket!r} ({code}): "
                "check the access key and secret key, and that they may use this bucket"
            )
        where = f"{self.bucket}/{key}" if key else self.bucket
        return ObjectStoreError(f"object store at {self._endpoint} answered {code} for {where}: {message}")


def _copy_body(response: urllib3.BaseHTTPResponse, out: BinaryIO) -> None:
    for chunk in response.stream(COPY_CHUNK_BYTES):
        out.write(chunk)
