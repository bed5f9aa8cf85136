"""Models in object storage load through the weights cache: downloaded once per version, by one worker
at a time, never used half-downloaded or damaged. Against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from s3_server import SeaweedFS, seaweedfs_server
from transformers import LlamaConfig, LlamaForCausalLM

from stillhouse.common.models.locator import ModelLocator
from stillhouse.common.models.model_loading import load_model, resolve_model_reference
from stillhouse.common.models.references import ModelReferenceRefused, S3ModelReference
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.models.weights_cache import RECORD_NAME, S3ModelCache
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings

FIELD = "spec.teacher.model"


class CountingStore:
    """A real object store that counts the objects fetched through it, and can be told to fail the
    download of one file (a connection lost halfway)."""

    def __init__(self, store: ObjectStore, fail_on: str | None = None) -> None:
        self._store = store
        self._fail_on = fail_on
        self.fetched: list[str] = []
        self._lock = threading.Lock()

    def list(self, prefix: str = ""):
        return self._store.list(prefix)

    def get_file(self, key: str, path: Path) -> None:
        with self._lock:
            self.fetched.append(key)
        if self._fail_on is not None and key.endswith(self._fail_on):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half a file")
            raise ConnectionResetError(f"lost the connection while fetching {key}")
        self._store.get_file(key, path)


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def object_store_settings(seaweedfs: SeaweedFS) -> ObjectStoreSettings:
    return seaweedfs.settings(f"models-{secrets.token_hex(4)}")


@pytest.fixture
def bucket(object_store_settings: ObjectStoreSettings) -> ObjectStore:
    store = open_object_store(object_store_settings)
    store.ensure_bucket()
    return store


def upload(store: ObjectStore, folder: Path, prefix: str) -> S3ModelReference:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            store.put_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path)
    return S3ModelReference(store.bucket, prefix)


def model_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name != RECORD_NAME)


def cache_of(tmp_path: Path, store: ObjectStore | CountingStore, **limits: int) -> S3ModelCache:
    return S3ModelCache(ModelSettings(cache_dir=tmp_path / "cache", **limits), lambda bucket: store)


def test_an_s3_model_downloads_once_and_loads(bucket, object_store_settings, tiny_model, tmp_path):
    reference = upload(bucket, tiny_model, "models/tiny")
    locator = ModelLocator(ModelSettings(cache_dir=tmp_path / "cache"), object_store_settings)

    folder = Path(locator.locate(str(reference), FIELD))
    model = load_model(resolve_model_reference(str(folder)), torch.device("cpu"))
    expected = LlamaForCausalLM.from_pretrained(tiny_model)
    torch.testing.assert_close(model.lm_head.weight, expected.lm_head.weight, rtol=0, atol=0)
    assert model_files(folder) == sorted(path.name for path in tiny_model.iterdir())
    modified = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    # The second load finds the same version there: not one file is written again.
    assert Path(locator.locate(str(reference), FIELD)) == folder
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == modified


def test_the_second_load_fetches_nothing(bucket, tiny_model, tmp_path):
    reference = upload(bucket, tiny_model, "models/tiny")
    counting = CountingStore(bucket)
    cache = cache_of(tmp_path, counting)

    first = cache.fetch(reference, FIELD)
    assert sorted(counting.fetched) == [f"models/tiny/{name}" for name in model_files(first)]
    counting.fetched.clear()

    assert cache.fetch(reference, FIELD) == first
    assert counting.fetched == []


def test_concurrent_loads_download_once(bucket, tiny_model, tmp_path):
    reference = upload(bucket, tiny_model, "models/tiny")
    counting = CountingStore(bucket)
    start = threading.Barrier(4)
    folders: list[Path] = []

    def load() -> None:
        cache = cache_of(tmp_path, counting)  # a cache of its own, as each worker process has
        start.wait()
        folders.append(cache.fetch(reference, FIELD))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert len(folders) == 4 and len(set(folders)) == 1
    assert sorted(counting.fetched) == [f"models/tiny/{name}" for name in model_files(folders[0])]


def test_a_download_that_dies_halfway_is_never_used(bucket, tiny_model, tmp_path):
    reference = upload(bucket, tiny_model, "models/tiny")
    with pytest.raises(ConnectionResetError):
        cache_of(tmp_path, CountingStore(bucket, fail_on="config.json")).fetch(reference, FIELD)
    model_dir = next(path for path in (tmp_path / "cache").iterdir() if path.is_dir())
    assert list(model_dir.iterdir()) == []  # neither a version nor its staging folder is left

    # A worker killed mid-download leaves its staging folder: the next download removes it.
    leftover = model_dir / ".partial-killed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{")
    counting = CountingStore(bucket)
    folder = cache_of(tmp_path, counting).fetch(reference, FIELD)

    assert not leftover.exists()
    assert [path.name for path in model_dir.iterdir()] == [folder.name]
    assert (folder / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    assert len(counting.fetched) == len(model_files(folder))


def test_a_damaged_copy_is_downloaded_again(bucket, tiny_model, tmp_path):
    reference = upload(bucket, tiny_model, "models/tiny")
    folder = cache_of(tmp_path, bucket).fetch(reference, FIELD)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file, as a full disk leaves

    counting = CountingStore(bucket)
    assert cache_of(tmp_path, counting).fetch(reference, FIELD) == folder

    assert weights.read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert len(counting.fetched) == len(model_files(folder))


def test_a_model_written_again_is_a_new_version(bucket, tiny_model, tmp_path):
    reference = upload(bucket, tiny_model, "models/tiny")
    cache = cache_of(tmp_path, bucket)
    old = cache.fetch(reference, FIELD)
    bucket.put_bytes("models/tiny/generation_config.json", b'{"do_sample": false}')

    new = cache.fetch(reference, FIELD)

    assert new != old and not old.exists()
    assert (new / "generation_config.json").read_bytes() == b'{"do_sample": false}'


def test_a_model_beyond_the_bounds_is_refused_before_any_download(bucket, tiny_model, tmp_path):
    reference = upload(bucket, tiny_model, "models/tiny")
    counting = CountingStore(bucket)

    with pytest.raises(ModelReferenceRefused, match=r"holds more than 1000 bytes") as too_big:
        cache_of(tmp_path, counting, max_download_bytes=1000).fetch(reference, FIELD)
    with pytest.raises(ModelReferenceRefused, match=r"holds more than 1 files"):
        cache_of(tmp_path, counting, max_download_files=1).fetch(reference, FIELD)
    with pytest.raises(ModelReferenceRefused, match=r"no model files under s3://.*/models/absent/"):
        cache_of(tmp_path, counting).fetch(S3ModelReference(bucket.bucket, "models/absent"), FIELD)

    assert too_big.value.field == FIELD
    assert counting.fetched == []


def test_an_object_path_that_would_leave_the_folder_is_refused(bucket, tmp_path):
    bucket.put_bytes("models/odd/config.json", b"{}")
    bucket.put_bytes(f"models/odd/{RECORD_NAME}", b"[]")

    with pytest.raises(ModelReferenceRefused, match="cannot be a file in a model folder"):
        cache_of(tmp_path, bucket).fetch(S3ModelReference(bucket.bucket, "models/odd"), FIELD)
