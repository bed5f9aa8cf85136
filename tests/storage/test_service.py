"""The storage service as a real process over real gRPC, on the local folder and on a real S3 server."""

from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr
from service_token import authorized_channel

from stillhouse.common.datasets.artifacts import download_artifact
from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

SCHEMA = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
LINEAGE = storage_pb2.Lineage(job_id="job-1", stage="teacher", input_ids=["jobs/job-1/prompts/train"])
DATASET_ID = "jobs/job-1/teacher/answers"


def object_store_env(settings: ObjectStoreSettings) -> dict[str, str]:
    """The settings as the service reads them from its environment."""
    env = {}
    for name, value in settings:
        if value is None:
            continue
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        env[f"STILLHOUSE_STORAGE_OBJECT_STORE__{name.upper()}"] = (
            str(plain).lower() if isinstance(plain, bool) else str(plain)
        )
    return env


@dataclass
class StorageService:
    stub: storage_pb2_grpc.StorageStub
    store: ObjectStore
    settings: ObjectStoreSettings


def start_storage(processes, free_port, grpc_ready, wait_until, settings: ObjectStoreSettings) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", "storage", "--port", str(port)]
    processes.start(
        "storage", argv, object_store_env(settings) | {"STILLHOUSE_STORAGE_MAX_REQUEST_BYTES": "1048576"}
    )
    address = f"127.0.0.1:{port}"
    wait_until(lambda: grpc_ready(address), 20, "the storage service")
    return address


@pytest.fixture
def service(object_store_settings, processes, free_port, grpc_ready, wait_until):
    address = start_storage(processes, free_port, grpc_ready, wait_until, object_store_settings)
    with authorized_channel(address) as channel:
        yield StorageService(
            storage_pb2_grpc.StorageStub(channel),
            open_object_store(object_store_settings),
            object_store_settings,
        )


def parquet_shard(rows: int, start: int = 0) -> bytes:
    table = pa.table(
        {
            "prompt": [f"prompt {i}" for i in range(start, start + rows)],
            "answer": [f"answer {i}" for i in range(rows)],
        },
        schema=SCHEMA,
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def upload_shards(service: StorageService, dataset_id: str, sizes: list[int]) -> list[storage_pb2.Shard]:
    """Write shards straight to object storage, as a stage service does; nothing passes through gRPC."""
    upload = service.stub.CreateDataset(
        storage_pb2.CreateDatasetRequest(dataset_id=dataset_id, lineage=LINEAGE)
    )
    assert upload.prefix.endswith(f"{dataset_id}/shards/")
    shards, start = [], 0
    for index, rows in enumerate(sizes):
        data = parquet_shard(rows, start)
        start += rows
        path = f"shards/part-{index:05d}-0a1b2c3d.parquet"
        digest = hashlib.sha256(data).hexdigest()
        service.store.put_bytes(f"{dataset_id}/{path}", data, sha256=digest)
        shards.append(storage_pb2.Shard(path=path, num_rows=rows, size_bytes=len(data), sha256=digest))
    return shards


def commit_request(shards, dataset_id: str = DATASET_ID, schema: pa.Schema = SCHEMA):
    return storage_pb2.CommitDatasetRequest(
        dataset_id=dataset_id, shards=shards, arrow_schema=schema.serialize().to_pybytes(), lineage=LINEAGE
    )


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        call(request)
    return failure.value


def test_service_creates_its_bucket(service: StorageService) -> None:
    service.store.put_bytes("probe", b"the bucket is there")
    assert service.store.get_bytes("probe") == b"the bucket is there"


def test_dataset_is_visible_only_once_committed(service: StorageService) -> None:
    shards = upload_shards(service, DATASET_ID, [3, 2])
    missing = rpc_error(service.stub.GetDataset, storage_pb2.GetDatasetRequest(dataset_id=DATASET_ID))
    assert missing.code() is grpc.StatusCode.NOT_FOUND and DATASET_ID in missing.details()
    assert not service.stub.ListDatasets(storage_pb2.ListDatasetsRequest(prefix="jobs/job-1/")).datasets

    committed = service.stub.CommitDataset(commit_request(shards))
    fetched = service.stub.GetDataset(storage_pb2.GetDatasetRequest(dataset_id=DATASET_ID))
    listed = service.stub.ListDatasets(storage_pb2.ListDatasetsRequest(prefix="jobs/job-1/")).datasets

    assert committed.ref.num_rows == 5 and fetched.ref == committed.ref
    assert committed.ref.manifest_uri.endswith(f"{DATASET_ID}/manifest.json")
    assert [item.ref.dataset_id for item in listed] == [DATASET_ID]
    assert list(fetched.lineage.input_ids) == ["jobs/job-1/prompts/train"]
    assert pa.ipc.read_schema(pa.py_buffer(fetched.arrow_schema)).equals(SCHEMA)
    rows = DatasetReader(service.store, DATASET_ID).read_table()
    assert rows.column("prompt").to_pylist() == [f"prompt {i}" for i in range(5)]


def test_commit_is_idempotent_and_refuses_a_different_schema(service: StorageService) -> None:
    shards = upload_shards(service, DATASET_ID, [2])
    first = service.stub.CommitDataset(commit_request(shards))
    again = service.stub.CommitDataset(commit_request(shards))
    other = pa.schema([("prompt", pa.string())])
    conflict = rpc_error(service.stub.CommitDataset, commit_request(shards, schema=other))
    assert again.ref.manifest_sha256 == first.ref.manifest_sha256
    assert conflict.code() is grpc.StatusCode.ALREADY_EXISTS and DATASET_ID in conflict.details()


def test_commit_checks_every_shard(service: StorageService) -> None:
    shards = upload_shards(service, DATASET_ID, [2, 2])
    wrong_size = list(shards)
    wrong_size[1] = storage_pb2.Shard(
        path=shards[1].path, num_rows=2, size_bytes=shards[1].size_bytes + 1, sha256=shards[1].sha256
    )
    gone = [
        *shards,
        storage_pb2.Shard(
            path="shards/part-00009-0a1b2c3d.parquet", num_rows=1, size_bytes=10, sha256="0" * 64
        ),
    ]

    corrupt = rpc_error(service.stub.CommitDataset, commit_request(wrong_size))
    missing = rpc_error(service.stub.CommitDataset, commit_request(gone))

    assert corrupt.code() is grpc.StatusCode.DATA_LOSS and shards[1].path in corrupt.details()
    assert missing.code() is grpc.StatusCode.NOT_FOUND and "part-00009" in missing.details()
    assert not service.stub.ListDatasets(storage_pb2.ListDatasetsRequest()).datasets


def test_a_tampered_shard_is_caught_on_read(service: StorageService) -> None:
    shards = upload_shards(service, DATASET_ID, [4])
    service.stub.CommitDataset(commit_request(shards))
    service.store.put_bytes(f"{DATASET_ID}/{shards[0].path}", parquet_shard(4, start=100))
    with pytest.raises(Exception, match=shards[0].path.split("/")[-1]):
        DatasetReader(service.store, DATASET_ID).read_table()


def test_delete_removes_the_dataset(service: StorageService) -> None:
    service.stub.CommitDataset(commit_request(upload_shards(service, DATASET_ID, [1])))
    service.stub.DeleteDataset(storage_pb2.DeleteDatasetRequest(dataset_id=DATASET_ID))
    gone = rpc_error(service.stub.GetDataset, storage_pb2.GetDatasetRequest(dataset_id=DATASET_ID))
    assert gone.code() is grpc.StatusCode.NOT_FOUND
    assert not list(service.store.list(f"{DATASET_ID}/"))


def test_delete_prefix_removes_one_jobs_objects_and_can_be_repeated(service: StorageService) -> None:
    service.stub.CommitDataset(commit_request(upload_shards(service, DATASET_ID, [1, 2])))
    service.store.put_bytes("jobs/job-1/train/student/model.safetensors", b"weights")
    service.store.put_bytes("jobs/job-10/prompts/train/manifest.json", b"{}")  # a job whose id extends it
    service.store.put_bytes("seeds/support.jsonl", b"{}")

    deleted = service.stub.DeletePrefix(storage_pb2.DeletePrefixRequest(prefix="jobs/job-1/"))
    again = service.stub.DeletePrefix(storage_pb2.DeletePrefixRequest(prefix="jobs/job-1/"))

    assert deleted.deleted_objects == 4  # two shards, the manifest, the weights
    assert again.deleted_objects == 0
    assert [info.key for info in service.store.list()] == [
        "jobs/job-10/prompts/train/manifest.json",
        "seeds/support.jsonl",
    ]


@pytest.mark.parametrize(
    ("call", "request_message", "words"),
    [
        ("DeletePrefix", storage_pb2.DeletePrefixRequest(prefix=""), "must name a folder"),
        ("DeletePrefix", storage_pb2.DeletePrefixRequest(prefix="jobs/job-1"), "must name a folder"),
        ("DeletePrefix", storage_pb2.DeletePrefixRequest(prefix="jobs/../"), "'..'"),
        ("GetDataset", storage_pb2.GetDatasetRequest(dataset_id="../etc/passwd"), "../etc/passwd"),
        (
            "CreateDataset",
            storage_pb2.CreateDatasetRequest(dataset_id="jobs/job-2/teacher/x", lineage=LINEAGE),
            "jobs/job-1/teacher/",
        ),
        (
            "Presign",
            storage_pb2.PresignRequest(method=storage_pb2.PresignRequest.METHOD_GET, key="../other-bucket/x"),
            "other-bucket",
        ),
        (
            "Presign",
            storage_pb2.PresignRequest(
                method=storage_pb2.PresignRequest.METHOD_GET, key="jobs/job-1/a", expires_seconds=3601
            ),
            "expires_seconds must be between 1 and 3600",
        ),
        ("Presign", storage_pb2.PresignRequest(key="a"), "METHOD_GET"),
        ("GetArtifact", storage_pb2.GetArtifactRequest(artifact_id="/abs"), "/abs"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_input(service, call, request_message, words) -> None:
    error = rpc_error(getattr(service.stub, call), request_message)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.details()


def test_an_oversize_request_is_refused(service: StorageService) -> None:
    huge = storage_pb2.CommitDatasetRequest(dataset_id=DATASET_ID, arrow_schema=b"x" * (2 * 1024 * 1024))
    assert rpc_error(service.stub.CommitDataset, huge).code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_artifact_commit_get_list_and_verified_download(service: StorageService, tmp_path: Path) -> None:
    artifact_id = "jobs/job-1/train/student"
    lineage = storage_pb2.Lineage(job_id="job-1", stage="train")
    service.stub.CreateArtifact(storage_pb2.CreateArtifactRequest(artifact_id=artifact_id, lineage=lineage))
    files = {"config.json": b'{"layers": 2}', "weights/model.safetensors": b"\x00\x01" * 5000}
    records = []
    for path, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        service.store.put_bytes(f"{artifact_id}/{path}", data, sha256=digest)
        records.append(storage_pb2.ArtifactFile(path=path, size_bytes=len(data), sha256=digest))
    assert rpc_error(
        service.stub.GetArtifact, storage_pb2.GetArtifactRequest(artifact_id=artifact_id)
    ).code() is (grpc.StatusCode.NOT_FOUND)

    committed = service.stub.CommitArtifact(
        storage_pb2.CommitArtifactRequest(artifact_id=artifact_id, files=records, lineage=lineage)
    )
    listed = service.stub.ListArtifacts(storage_pb2.ListArtifactsRequest(prefix="jobs/job-1/")).artifacts
    download_artifact(service.store, artifact_id, tmp_path / "student")

    assert committed.ref.size_bytes == sum(map(len, files.values()))
    assert [item.ref.artifact_id for item in listed] == [artifact_id]
    assert committed.lineage.stage == "train"
    assert (tmp_path / "student" / "weights" / "model.safetensors").read_bytes() == files[
        "weights/model.safetensors"
    ]


def test_presigned_get_reads_the_object_without_credentials(service: StorageService) -> None:
    service.store.put_bytes("jobs/job-1/report.json", b'{"recovery": 91.5}')
    url = service.stub.Presign(
        storage_pb2.PresignRequest(method=storage_pb2.PresignRequest.METHOD_GET, key="jobs/job-1/report.json")
    ).url
    if service.settings.backend == "local":
        assert Path(url.removeprefix("file://")).read_bytes() == b'{"recovery": 91.5}'
    else:
        assert httpx.get(url).content == b'{"recovery": 91.5}'


def test_presign_signs_downloads_of_job_objects_only(service: StorageService) -> None:
    def refusal(method, key: str) -> grpc.RpcError:
        return rpc_error(service.stub.Presign, storage_pb2.PresignRequest(method=method, key=key))

    get, put = storage_pb2.PresignRequest.METHOD_GET, storage_pb2.PresignRequest.METHOD_PUT
    upload = refusal(put, "jobs/job-1/train/student/model.safetensors")
    assert upload.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "download URLs only (METHOD_GET)" in upload.details()
    for key in ("models/base/config.json", "jobs/report.json", "teacher-cache.db"):
        outside = refusal(get, key)
        assert outside.code() is grpc.StatusCode.PERMISSION_DENIED, key
        assert f"keys under 'jobs/<job-id>/'), not {key!r}" in outside.details()

    url = service.stub.Presign(storage_pb2.PresignRequest(method=get, key="jobs/job-1/report.json")).url
    if service.settings.backend == "s3":
        assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["3600"]


@pytest.mark.parametrize("fault", ["wrong-secret", "endpoint-down"])
def test_object_store_faults_become_clear_statuses(
    seaweedfs, fault, processes, free_port, grpc_ready, wait_until
):
    overrides = (
        {"secret_key": "not-the-secret-4242"}
        if fault == "wrong-secret"
        else {"endpoint": f"127.0.0.1:{free_port()}"}
    )
    settings = seaweedfs.settings("stillhouse-faults", **overrides)
    address = start_storage(processes, free_port, grpc_ready, wait_until, settings)
    with authorized_channel(address) as channel:
        stub = storage_pb2_grpc.StorageStub(channel)
        error = rpc_error(
            stub.CreateDataset, storage_pb2.CreateDatasetRequest(dataset_id=DATASET_ID, lineage=LINEAGE)
        )
    expected = grpc.StatusCode.PERMISSION_DENIED if fault == "wrong-secret" else grpc.StatusCode.UNAVAILABLE
    assert error.code() is expected
    assert "not-the-secret-4242" not in error.details()
    assert (
        ("access key" in error.details())
        if fault == "wrong-secret"
        else (settings.endpoint in error.details())
    )
