"""The storage service as a real process over real gRPC, on the local folder and on a real S3 server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from service_token import authorized_channel
from storage_process import start_storage

from stillhouse.common.datasets.artifacts import download_artifact, upload_folder
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

ARTIFACT_ID = "jobs/job-1/train/student"


@dataclass
class StorageService:
    stub: storage_pb2_grpc.StorageStub
    store: ObjectStore
    settings: ObjectStoreSettings


@pytest.fixture
def service(object_store_settings, processes, free_port, grpc_ready, wait_until):
    address = start_storage(processes, free_port, grpc_ready, wait_until, object_store_settings)
    with authorized_channel(address) as channel:
        yield StorageService(
            storage_pb2_grpc.StorageStub(channel),
            open_object_store(object_store_settings),
            object_store_settings,
        )


def upload_student(service: StorageService, folder: Path) -> dict[str, bytes]:
    """Upload and commit a small model folder through the shared library, as the trainer does."""
    files = {"config.json": b'{"layers": 2}', "weights/model.safetensors": b"\x00\x01" * 5000}
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    upload_folder(service.store, ARTIFACT_ID, folder, lineage={"job_id": "job-1", "stage": "train"})
    return files


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        call(request)
    return failure.value


def test_service_creates_its_bucket(service: StorageService) -> None:
    service.store.put_bytes("probe", b"the bucket is there")
    assert service.store.get_bytes("probe") == b"the bucket is there"


def test_delete_prefix_removes_one_jobs_objects_and_can_be_repeated(service: StorageService) -> None:
    service.store.put_bytes("jobs/job-1/teacher/answers/manifest.json", b"{}")
    service.store.put_bytes("jobs/job-1/teacher/answers/shards/part-00000.parquet", b"rows")
    service.store.put_bytes("jobs/job-1/teacher/answers/shards/part-00001.parquet", b"rows")
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
        ("GetArtifact", storage_pb2.GetArtifactRequest(artifact_id="../etc/passwd"), "../etc/passwd"),
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
    huge = storage_pb2.ListArtifactsRequest(prefix="jobs/" + "x" * (2 * 1024 * 1024))
    assert rpc_error(service.stub.ListArtifacts, huge).code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_committed_artifact_is_listed_and_downloads_verified(
    service: StorageService, tmp_path: Path
) -> None:
    missing = rpc_error(service.stub.GetArtifact, storage_pb2.GetArtifactRequest(artifact_id=ARTIFACT_ID))
    assert missing.code() is grpc.StatusCode.NOT_FOUND

    files = upload_student(service, tmp_path / "upload")
    fetched = service.stub.GetArtifact(storage_pb2.GetArtifactRequest(artifact_id=ARTIFACT_ID))
    listed = service.stub.ListArtifacts(storage_pb2.ListArtifactsRequest(prefix="jobs/job-1/")).artifacts
    download_artifact(service.store, ARTIFACT_ID, tmp_path / "student")

    assert fetched.ref.size_bytes == sum(map(len, files.values()))
    assert sorted(file.path for file in fetched.files) == sorted(files)
    assert [item.ref.artifact_id for item in listed] == [ARTIFACT_ID]
    assert fetched.lineage.stage == "train"
    assert (tmp_path / "student" / "weights" / "model.safetensors").read_bytes() == files[
        "weights/model.safetensors"
    ]


def test_artifact_listing_pages(service: StorageService, tmp_path: Path) -> None:
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.json").write_text("{}")
    ids = [f"jobs/job-1/evaluate/report-{index}" for index in range(3)]
    for artifact_id in ids:
        upload_folder(service.store, artifact_id, folder)

    first = service.stub.ListArtifacts(storage_pb2.ListArtifactsRequest(prefix="jobs/job-1/", page_size=2))
    second = service.stub.ListArtifacts(
        storage_pb2.ListArtifactsRequest(prefix="jobs/job-1/", page_size=2, page_token=first.next_page_token)
    )

    assert [item.ref.artifact_id for item in first.artifacts] == ids[:2]
    assert [item.ref.artifact_id for item in second.artifacts] == ids[2:]
    assert second.next_page_token == ""


def test_presigned_get_reads_the_object_without_credentials(service: StorageService) -> None:
    service.store.put_bytes("jobs/job-1/report.json", b'{"recovery": 91.5}')
    url = service.stub.Presign(
        storage_pb2.PresignRequest(method=storage_pb2.PresignRequest.METHOD_GET, key="jobs/job-1/report.json")
    ).url
    if service.settings.backend == "local":
        assert Path(url.removeprefix("file://")).read_bytes() == b'{"recovery": 91.5}'
    else:
        assert httpx.get(url).content == b'{"recovery": 91.5}'


def test_presigned_links_are_signed_for_the_public_endpoint(
    seaweedfs, processes, free_port, grpc_ready, wait_until
) -> None:
    """STILLHOUSE_STORAGE_OBJECT_STORE__PUBLIC_ENDPOINT: the service reaches S3 at 127.0.0.1 and signs
    links for localhost, the name users reach it by here."""
    public = f"http://localhost:{seaweedfs.endpoint.rpartition(':')[2]}"
    settings = seaweedfs.settings("public-links", public_endpoint=public)
    address = start_storage(processes, free_port, grpc_ready, wait_until, settings)
    store = open_object_store(settings)
    store.ensure_bucket()
    store.put_bytes("jobs/job-2/report.json", b'{"recovery": 88.0}')

    with authorized_channel(address) as channel:
        url = (
            storage_pb2_grpc.StorageStub(channel)
            .Presign(
                storage_pb2.PresignRequest(
                    method=storage_pb2.PresignRequest.METHOD_GET, key="jobs/job-2/report.json"
                )
            )
            .url
        )

    assert url.startswith(f"{public}/public-links/jobs/job-2/report.json?")
    assert httpx.get(url).content == b'{"recovery": 88.0}'


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
        error = rpc_error(stub.ListArtifacts, storage_pb2.ListArtifactsRequest(prefix="jobs/job-1/"))
    expected = grpc.StatusCode.PERMISSION_DENIED if fault == "wrong-secret" else grpc.StatusCode.UNAVAILABLE
    assert error.code() is expected
    assert "not-the-secret-4242" not in error.details()
    assert (
        ("access key" in error.details())
        if fault == "wrong-secret"
        else (settings.endpoint in error.details())
    )
