"""Build the object store that `ObjectStoreSettings` describe."""

from __future__ import annotations

from minio import Minio
from minio.credentials import ChainedProvider, EnvAWSProvider, IamAwsProvider, Provider, StaticProvider

from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.s3_store import S3ObjectStore, s3_http_pool
from stillhouse.common.objectstore.settings import ObjectStoreSettings, check_public_endpoint

MIB = 1024 * 1024
# The region a link signer states when the settings name none: MinIO's and most S3 servers' default.
DEFAULT_SIGNING_REGION = "us-east-1"


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
        link_signer=public_link_signer(settings),
    )


def public_link_signer(settings: ObjectStoreSettings) -> Minio | None:
    """A client that signs presigned URLs for `public_endpoint` (None when unset), never for a request
    of its own. The region is explicit: without one, signing would first ask the server for the bucket's
    location, through a host this process may not reach."""
    if settings.public_endpoint is None:
        return None
    host, secure = check_public_endpoint(settings.public_endpoint)
    return Minio(
        host,
        credentials=credentials(settings),
        secure=secure,
        region=settings.region or DEFAULT_SIGNING_REGION,
    )


def credentials(settings: ObjectStoreSettings) -> Provider:
    """The keys of the settings, or for `environment` those of the process (see the setting)."""
    if settings.credentials == "environment":
        return ChainedProvider([EnvAWSProvider(), IamAwsProvider()])
    assert settings.access_key is not None and settings.secret_key is not None  # the settings check this
    return StaticProvider(settings.access_key.get_secret_value(), settings.secret_key.get_secret_value())


def minio_client(settings: ObjectStoreSettings) -> Minio:
    endpoint = settings.endpoint or ""
    if "://" in endpoint or "/" in endpoint:
        raise ValueError(
            f"object_store.endpoint must be host:port, got {endpoint!r}; set object_store.secure for HTTPS"
        )
    return Minio(
        endpoint,
        credentials=credentials(settings),
        secure=settings.secure,
        region=settings.region,
        # Artifact uploads run files in parallel and each file's parts in parallel.
        http_client=s3_http_pool(max_connections=max(10, settings.parallel_uploads**2)),
    )
