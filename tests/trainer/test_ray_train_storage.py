"""Ray Train's own storage: a given shared path, or the run's folder in object storage that every Ray
node reaches (a real S3 server here)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import SeaweedFS, seaweedfs_server

from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer.ray_train_storage import ray_train_storage


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def test_a_given_path_wins(tmp_path: Path):
    store = ObjectStoreSettings(backend="local", local_root=tmp_path)
    storage = ray_train_storage("/mnt/shared/ray-train", store, "jobs/job-1/train")
    assert storage.path == "/mnt/shared/ray-train" and storage.filesystem is None


def test_a_local_store_keeps_it_in_the_runs_folder(tmp_path: Path):
    store = ObjectStoreSettings(backend="local", bucket="stillhouse", local_root=tmp_path)
    storage = ray_train_storage(None, store, "jobs/job-1/train")
    assert Path(storage.path) == tmp_path / "stillhouse" / "jobs/job-1/train/ray"
    assert storage.filesystem is None


def test_an_s3_store_keeps_it_in_the_runs_folder_of_the_bucket(s3: SeaweedFS):
    settings = s3.settings(f"ray-{secrets.token_hex(4)}")
    store = open_object_store(settings)
    store.ensure_bucket()
    storage = ray_train_storage(None, settings, "jobs/job-1/train")

    with storage.filesystem.open_output_stream(f"{storage.path}/run-1/state.json") as out:
        out.write(b'{"epoch": 1}')

    assert store.get_bytes("jobs/job-1/train/ray/run-1/state.json") == b'{"epoch": 1}'
