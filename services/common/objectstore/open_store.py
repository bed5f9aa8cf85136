"""Build the object store that `ObjectStoreSettings` describe."""

from __future__ import annotations

from minio import Minio

from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.s3_store import S3ObjectStore, s3_http_pool
from stillhouse.common.objectstore.settings import ObjectStoreSettings

MIB = 1024 * 1024


def open_object_store(settings: ObjectStoreSettings) -> ObjectStore:
    if settings.backend == "local":
        return LocalObjectStore(settings.local_root, settings.bucket)
    scheme = "https" if settings.secure else "http"
    return S3ObjectStore(
        minio_client(settings),
        settings.bucket,
        part_size=settings.part_size_mb * MIB,
        parallel_uploads=settings.parallel_uploads,
        endpoint_label=f"{scheme}://{settings.endpoint}",
    )


def minio_client(settings: ObjectStoreSettings) -> Minio:
    endpoint = settings.endpoint or ""
    if "://" in endpoint or "/" in endpoint:
        raise ValueError(
            f"object_store.endpoint must be host:port, got {endpoint!r}; set object_store.secure for HTTPS"
        )
    assert settings.access_key is not None and settings.secret_key is not None  # the settings check this
    return Minio(
        endpoint,
        access_key=settings.access_key.get_secret_value(),
        secret_key=settings.secret_key.get_secret_value(),
        secure=settings.secure,
        region=settings.region,
        # Artifact uploads run files in parallel and each file's parts in parallel.
        http_client=s3_http_pool(max_connections=max(10, settings.parallel_uploads**2)),
    )
