"""A real S3 server (SeaweedFS `weed mini`) for the session, and an empty bucket per test on every backend."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import SeaweedFS, seaweedfs_server

from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS server with its S3 API on a free loopback port, stopped (with its children) at the end."""
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def fresh_bucket_name() -> str:
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture(params=["local", "s3"])
def object_store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStoreSettings:
    """Settings for a fresh bucket (not yet created) on each backend; the s3 one starts SeaweedFS."""
    if request.param == "local":
        return ObjectStoreSettings(
            backend="local", bucket=fresh_bucket_name(), local_root=tmp_path / "objects"
        )
    return request.getfixturevalue("seaweedfs").settings(fresh_bucket_name())


@pytest.fixture
def object_store(object_store_settings: ObjectStoreSettings) -> ObjectStore:
    """An empty bucket of its own on each backend."""
    store = open_object_store(object_store_settings)
    store.ensure_bucket()
    return store
