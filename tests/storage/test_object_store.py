"""One suite, run on both backends (a local folder and SeaweedFS through the S3 API)."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import psutil
import pytest

from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.objectstore.objects import (
    AccessDenied,
    BucketNotFound,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    StoreUnavailable,
)
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings

MIB = 1024 * 1024
BIG_FILE_BYTES = 70 * MIB


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_s3(store: ObjectStore) -> bool:
    return store.uri("k").startswith("s3://")


def never_created(settings: ObjectStoreSettings) -> ObjectStore:
    return open_object_store(settings.model_copy(update={"bucket": settings.bucket + "-never"}))


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.bin"
    path.write_bytes(os.urandom(BIG_FILE_BYTES))
    return path


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Make every write past `limit` bytes fail with EFBIG: a disk that fills up in mid-download."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_put_get_stat_round_trip_keeps_sha256(object_store: ObjectStore, tmp_path: Path):
    data = b"hello, object store\n" * 100
    written = object_store.put_bytes("runs/1/report.txt", data, sha256=sha256_of(data))

    assert (written.key, written.size, written.sha256) == ("runs/1/report.txt", len(data), sha256_of(data))
    assert object_store.get_bytes("runs/1/report.txt") == data
    found = object_store.stat("runs/1/report.txt")
    assert (found.key, found.size, found.sha256) == ("runs/1/report.txt", len(data), sha256_of(data))
    assert found.last_modified.tzinfo is not None
    assert object_store.exists("runs/1/report.txt")
    assert not object_store.exists("runs/1/other.txt")

    source = tmp_path / "source.bin"
    source.write_bytes(b"\x00\x01" * 1000)
    object_store.put_file("runs/1/raw.bin", source, sha256="f" * 64)
    assert object_store.stat("runs/1/raw.bin").sha256 == "f" * 64
    object_store.put_file("runs/1/raw.bin", source)  # overwritten without a hash: the old one must not stick
    assert object_store.stat("runs/1/raw.bin").sha256 is None
    object_store.get_file("runs/1/raw.bin", tmp_path / "out" / "raw.bin")
    assert (tmp_path / "out" / "raw.bin").read_bytes() == source.read_bytes()
    assert object_store.put_bytes("empty", b"").size == 0
    assert object_store.get_bytes("empty") == b""


def test_overwrite_is_whole_object_either_way(object_store: ObjectStore):
    old, new = b"o" * MIB, b"n" * MIB
    object_store.put_bytes("model/weights.bin", old)
    seen = set()
    writer = threading.Thread(
        target=lambda: [object_store.put_bytes("model/weights.bin", body) for body in (new, old, new) * 3]
    )
    writer.start()
    while writer.is_alive():
        seen.add(object_store.get_bytes("model/weights.bin"))
    writer.join()

    assert seen <= {old, new}
    assert object_store.get_bytes("model/weights.bin") == new
    assert object_store.stat("model/weights.bin").sha256 == sha256_of(new)


def test_list_is_recursive_in_key_order_with_prefixes_and_nothing_else(object_store: ObjectStore):
    keys = ["b", "a0", "a/d/e", "a-c", "a/b", "é", "Z"]
    for key in keys:
        object_store.put_bytes(key, key.encode(), sha256=sha256_of(key.encode()))

    listed = list(object_store.list())
    assert [info.key for info in listed] == ["Z", "a-c", "a/b", "a/d/e", "a0", "b", "é"]
    assert {info.key: info.size for info in listed} == {key: len(key.encode()) for key in keys}
    assert [info.key for info in object_store.list("a/")] == ["a/b", "a/d/e"]
    assert [info.key for info in object_store.list("a")] == ["a-c", "a/b", "a/d/e", "a0"]
    assert [info.key for info in object_store.list("a/d")] == ["a/d/e"]
    assert list(object_store.list("zz/")) == []


def test_delete_ignores_missing_keys(object_store: ObjectStore):
    object_store.put_bytes("a/one", b"1")
    object_store.put_bytes("a/two", b"2")

    object_store.delete(["a/one", "a/never-there", "nowhere/at/all"])
    object_store.delete([])

    assert [info.key for info in object_store.list()] == ["a/two"]
    with pytest.raises(ObjectNotFound):
        object_store.stat("a/one")
    object_store.put_bytes("a/one", b"again")  # a deleted key can be written again
    assert object_store.get_bytes("a/one") == b"again"


def test_missing_object_and_missing_bucket_are_named(
    object_store: ObjectStore, object_store_settings: ObjectStoreSettings, tmp_path: Path
):
    for read in (
        object_store.stat,
        object_store.get_bytes,
        lambda key: object_store.get_file(key, tmp_path / "x"),
    ):
        with pytest.raises(
            ObjectNotFound, match=f"no object 'missing/key' in bucket '{object_store.bucket}'"
        ):
            read("missing/key")
    assert not (tmp_path / "x").exists()

    nowhere = never_created(object_store_settings)
    for call in (
        lambda: nowhere.stat("k"),
        lambda: nowhere.get_bytes("k"),
        lambda: nowhere.put_bytes("k", b"data"),
        lambda: list(nowhere.list()),
        lambda: nowhere.delete(["k"]),
    ):
        with pytest.raises(BucketNotFound, match=f"bucket '{nowhere.bucket}' does not exist"):
            call()
    nowhere.ensure_bucket()
    nowhere.ensure_bucket()
    assert list(nowhere.list()) == []


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a/../b", "nul\x00byte", ""])
def test_invalid_keys_are_refused_before_any_io(object_store_settings: ObjectStoreSettings, key: str):
    # The bucket does not exist: any I/O would raise BucketNotFound instead of InvalidKey.
    store = never_created(object_store_settings)
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, Path("/nonexistent")),
        lambda: store.get_bytes(key),
        lambda: store.get_file(key, Path("/nonexistent")),
        lambda: store.stat(key),
        lambda: store.delete(["fine", key]),
        lambda: store.presign_get(key, timedelta(minutes=1)),
        lambda: store.presign_put(key, timedelta(minutes=1)),
    ):
        with pytest.raises(InvalidKey):
            call()
    if key:  # the empty prefix is the whole bucket
        with pytest.raises(InvalidKey):
            store.list(key)


def test_big_file_round_trips_through_parallel_multipart(
    object_store: ObjectStore, big_file: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    digest = hashlib.sha256(big_file.read_bytes()).hexdigest()
    written = object_store.put_file("ckpt/big.bin", big_file, sha256=digest)
    assert written.size == BIG_FILE_BYTES
    assert object_store.stat("ckpt/big.bin").sha256 == digest
    if is_s3(object_store):
        # A multipart object's ETag is <md5 of the part md5s>-<part count>: 70 MiB in 16 MiB parts is 5.
        etag = (
            request.getfixturevalue("seaweedfs")
            .client()
            .stat_object(object_store.bucket, "ckpt/big.bin")
            .etag
        )
        assert etag.endswith("-5"), etag

    out = tmp_path / "down" / "big.bin"
    object_store.get_file("ckpt/big.bin", out)
    assert out.stat().st_size == BIG_FILE_BYTES
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def test_failed_download_leaves_no_partial_file(object_store: ObjectStore, big_file: Path, tmp_path: Path):
    object_store.put_file("ckpt/big.bin", big_file)
    folder = tmp_path / "down"
    folder.mkdir()
    (folder / "big.bin").write_bytes(b"previous")

    with file_size_limit(8 * MIB), pytest.raises(OSError):
        object_store.get_file("ckpt/big.bin", folder / "big.bin")

    assert [path.name for path in folder.iterdir()] == ["big.bin"]
    assert (folder / "big.bin").read_bytes() == b"previous"


def fetch(url: str) -> bytes:
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path)).read_bytes()
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return response.content


def send(url: str, data: bytes) -> None:
    if url.startswith("file://"):
        path = Path(unquote(urlparse(url).path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    httpx.put(url, content=data, timeout=10).raise_for_status()


def test_presigned_urls_read_and_write(object_store: ObjectStore):
    object_store.put_bytes("shared/in.jsonl", b'{"prompt": "hi"}\n')
    get_url = object_store.presign_get("shared/in.jsonl", timedelta(minutes=5))
    put_url = object_store.presign_put("shared/out dir/out.jsonl", timedelta(minutes=5))

    assert urlparse(get_url).scheme == ("http" if is_s3(object_store) else "file")
    assert fetch(get_url) == b'{"prompt": "hi"}\n'
    send(put_url, b'{"answer": "hello"}\n')
    assert object_store.get_bytes("shared/out dir/out.jsonl") == b'{"answer": "hello"}\n'
    assert [info.key for info in object_store.list("shared/")] == [
        "shared/in.jsonl",
        "shared/out dir/out.jsonl",
    ]


@pytest.mark.parametrize("wrong", ["secret_key", "access_key"])
def test_wrong_credentials_are_access_denied(seaweedfs, wrong: str):
    store = open_object_store(
        seaweedfs.settings(f"denied-{wrong.replace('_', '-')}", **{wrong: "not-the-right-one"})
    )
    with pytest.raises(AccessDenied, match="check the access key and secret key") as refused:
        store.stat("k")
    assert seaweedfs.secret_key not in str(refused.value)
    assert "not-the-right-one" not in str(refused.value)
    with pytest.raises(AccessDenied):
        store.put_bytes("k", b"x")


def test_endpoint_down_is_unavailable_within_seconds(free_port):
    port = free_port()
    store = open_object_store(
        ObjectStoreSettings(
            backend="s3", bucket="nobody-home", endpoint=f"127.0.0.1:{port}", access_key="a", secret_key="b"
        )
    )
    for call in (lambda: store.stat("k"), lambda: store.put_bytes("k", b"x"), lambda: list(store.list())):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"http://127.0.0.1:{port}"):
            call()
        assert time.monotonic() - started < 5


def test_seaweedfs_listens_only_on_the_ports_it_was_given(seaweedfs):
    listening = [
        conn.laddr
        for conn in psutil.Process(seaweedfs.pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert {address.ip for address in listening} == {"127.0.0.1"}
    assert {address.port for address in listening} <= seaweedfs.ports
    assert int(seaweedfs.endpoint.rsplit(":", 1)[1]) in {address.port for address in listening}


def test_local_store_specifics(tmp_path: Path):
    store = LocalObjectStore(tmp_path, "embedded")
    store.ensure_bucket()
    store.put_bytes("a/b", b"x")
    for clashing in ("a", "a/b/c", "a/"):
        with pytest.raises(InvalidKey):
            store.put_bytes(clashing, b"y")

    # A writer that opens the presigned path replaces the bytes behind the store's back: the recorded
    # sha256 no longer describes them, so it is not reported.
    store.put_bytes("shared/data.bin", b"old", sha256=sha256_of(b"old"))
    send(store.presign_put("shared/data.bin", timedelta(minutes=1)), b"newer bytes")
    assert store.stat("shared/data.bin").sha256 is None

    # What a crashed writer leaves behind is not an object.
    (tmp_path / "embedded" / "shared" / f".data.bin.{'0' * 32}.tmp").write_bytes(b"partial")
    assert [info.key for info in store.list()] == ["a/b", "shared/data.bin"]
    with pytest.raises(ValueError, match="invalid bucket name"):
        LocalObjectStore(tmp_path, "../escape")


def test_delete_prefix_deletes_a_folder_in_batches(
    object_store: ObjectStore, object_store_settings: ObjectStoreSettings, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("stillhouse.common.objectstore.objects.DELETE_BATCH", 2)
    for name in ("a", "b/c", "b/d", "e"):
        object_store.put_bytes(f"jobs/job-1/{name}", b"x")
    object_store.put_bytes("jobs/job-1x/kept", b"x")

    assert object_store.delete_prefix("jobs/job-1/") == 4
    assert [info.key for info in object_store.list()] == ["jobs/job-1x/kept"]
    assert object_store.delete_prefix("jobs/job-1/") == 0
    assert never_created(object_store_settings).delete_prefix("jobs/job-1/") == 0
    for folder in ("", "jobs/job-1x"):
        with pytest.raises(InvalidKey, match="must name a folder"):
            object_store.delete_prefix(folder)
