"""Presigned URLs for the host users reach (`object_store.public_endpoint`), against a real S3 server that
answers under two names: 127.0.0.1 (the services' endpoint) and localhost (the public one)."""

from __future__ import annotations

import secrets
import socket
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from pydantic import ValidationError
from s3_server import SeaweedFS

from stillhouse.common.objectstore.objects import AccessDenied, ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings

PAYLOAD = b"student weights \x00\x01\x02" * 1000


def public_endpoint_of(seaweedfs: SeaweedFS) -> str:
    return f"http://localhost:{seaweedfs.endpoint.rpartition(':')[2]}"


def store_with_public_endpoint(seaweedfs: SeaweedFS, public_endpoint: str) -> ObjectStore:
    store = open_object_store(
        seaweedfs.settings(f"link-{secrets.token_hex(6)}", region=None, public_endpoint=public_endpoint)
    )
    store.ensure_bucket()
    return store


def with_host(url: str, netloc: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=netloc))


def test_a_link_signed_for_the_public_endpoint_downloads_through_it(seaweedfs: SeaweedFS):
    public = public_endpoint_of(seaweedfs)
    store = store_with_public_endpoint(seaweedfs, public)
    store.put_bytes("jobs/j1/train/student/model.safetensors", PAYLOAD)

    url = store.presign_get("jobs/j1/train/student/model.safetensors", timedelta(minutes=5))

    assert url.startswith(f"{public}/")
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.content == PAYLOAD


def test_a_link_signed_for_the_internal_host_fails_through_the_public_one(seaweedfs: SeaweedFS):
    store = open_object_store(seaweedfs.settings(f"link-{secrets.token_hex(6)}"))
    store.ensure_bucket()
    store.put_bytes("jobs/j1/report.json", PAYLOAD)
    internal_url = store.presign_get("jobs/j1/report.json", timedelta(minutes=5))
    assert urlsplit(internal_url).netloc == seaweedfs.endpoint
    assert httpx.get(internal_url, timeout=10).content == PAYLOAD  # the link itself is good

    # The same link with only its host rewritten to the public name: the signature covers the host.
    rewritten = with_host(internal_url, urlsplit(public_endpoint_of(seaweedfs)).netloc)
    response = httpx.get(rewritten, timeout=10)

    assert response.status_code == 403
    assert b"SignatureDoesNotMatch" in response.content


def test_signing_asks_nothing_of_the_public_host(seaweedfs: SeaweedFS):
    """Reads and writes go to the internal endpoint, and signing a link needs no answer from the public
    host: here nothing listens there."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"https://127.0.0.1:{closed.getsockname()[1]}"
    store = store_with_public_endpoint(seaweedfs, unreachable)
    store.put_bytes("jobs/j2/data.parquet", PAYLOAD)

    url = store.presign_get("jobs/j2/data.parquet", timedelta(seconds=30))

    assert store.get_bytes("jobs/j2/data.parquet") == PAYLOAD
    assert url.startswith(f"{unreachable}/{store.bucket}/jobs/j2/data.parquet?")
    assert "X-Amz-Credential=" in url and "us-east-1" in url


@pytest.mark.parametrize(
    "bad",
    [
        "minio.example.com",
        "ftp://minio.example.com",
        "https://",
        "https://minio.example.com/bucket",
        "https://minio.example.com?x=1",
        "https://minio.example.com#top",
        "https://user:pw@minio.example.com",
        "https://minio.example.com:99999",
        "https://minio example.com",
    ],
)
def test_a_bad_public_endpoint_is_refused_naming_the_setting(bad: str):
    with pytest.raises(ValidationError) as caught:
        ObjectStoreSettings(
            backend="s3", endpoint="minio:9000", access_key="a", secret_key="b", public_endpoint=bad
        )
    assert "object_store.public_endpoint must be http:// or https://" in str(caught.value)


@pytest.mark.parametrize(
    "good", ["https://minio.example.com", "http://minio.example.com:9000/", "http://[::1]:9000"]
)
def test_a_public_endpoint_is_scheme_host_and_port(good: str):
    settings = ObjectStoreSettings(
        backend="s3", endpoint="minio:9000", access_key="a", secret_key="b", public_endpoint=good
    )
    assert settings.public_endpoint == good.rstrip("/")


def test_a_public_endpoint_needs_the_s3_backend():
    with pytest.raises(ValidationError, match="public_endpoint is for the s3 backend only"):
        ObjectStoreSettings(backend="local", public_endpoint="https://minio.example.com")


def test_credentials_from_the_environment_read_write_and_sign(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
):
    """`credentials: environment` (IRSA on EKS): no key in the settings; the process's own are used."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    settings = seaweedfs.settings(
        f"env-{secrets.token_hex(6)}",
        access_key=None,
        secret_key=None,
        credentials="environment",
        public_endpoint=public_endpoint_of(seaweedfs),
    )
    store = open_object_store(settings)
    store.ensure_bucket()
    store.put_bytes("jobs/j3/model.safetensors", PAYLOAD)

    url = store.presign_get("jobs/j3/model.safetensors", timedelta(minutes=5))

    assert store.get_bytes("jobs/j3/model.safetensors") == PAYLOAD
    assert httpx.get(url, timeout=10).content == PAYLOAD
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-one")
    with pytest.raises(AccessDenied):
        open_object_store(settings).get_bytes("jobs/j3/model.safetensors")


def test_credentials_from_the_environment_take_no_keys():
    with pytest.raises(ValidationError, match="credentials `environment` takes no access_key"):
        ObjectStoreSettings(
            backend="s3", endpoint="s3:443", credentials="environment", access_key="a", secret_key="b"
        )
