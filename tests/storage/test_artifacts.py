"""Artifacts (folders of files) round-trip on both backends, are verified, and are visible only when whole."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from stillhouse.common.datasets.artifacts import (
    MANIFEST_NAME,
    ArtifactExists,
    ArtifactFileRecord,
    ArtifactManifest,
    download_artifact,
    manifest_from_json,
    manifest_to_json,
    read_artifact_manifest,
    upload_folder,
)
from stillhouse.common.objectstore.objects import (
    IntegrityError,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
)

LINEAGE = {"job": "support-bot-small", "stage": "train", "inputs": ["s3://stillhouse/datasets/d1/"]}


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "student"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 64}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (folder / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}')
    (folder / "tokenizer" / "empty.txt").write_bytes(b"")
    return folder


def test_folder_round_trips_with_manifest(object_store: ObjectStore, model_folder: Path, tmp_path: Path):
    records = upload_folder(object_store, "models/student-1", model_folder, lineage=LINEAGE, parallel_files=3)

    assert [record.path for record in records] == [
        "config.json",
        "model.safetensors",
        "tokenizer/empty.txt",
        "tokenizer/tokenizer.json",
    ]
    model = (model_folder / "model.safetensors").read_bytes()
    assert records[1] == ArtifactFileRecord(
        "model.safetensors", len(model), hashlib.sha256(model).hexdigest()
    )
    manifest = read_artifact_manifest(object_store, "models/student-1/")
    assert (manifest.files, manifest.lineage) == (records, LINEAGE)

    dest = tmp_path / "downloaded" / "student"
    download_artifact(object_store, "models/student-1", dest)
    for record in records:
        assert (dest / record.path).read_bytes() == (model_folder / record.path).read_bytes()
    assert sorted(path.name for path in dest.parent.iterdir()) == ["student"]
    with pytest.raises(ArtifactExists):
        upload_folder(object_store, "models/student-1", model_folder)


def test_tampered_file_fails_naming_it_and_leaves_nothing(
    object_store: ObjectStore, model_folder: Path, tmp_path: Path
):
    upload_folder(object_store, "models/student-2", model_folder)
    object_store.put_bytes("models/student-2/tokenizer/tokenizer.json", b'{"vocab": {"evil": 1}}')

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with pytest.raises(IntegrityError, match=r"tokenizer/tokenizer\.json"):
        download_artifact(object_store, "models/student-2", downloads / "student")
    assert list(downloads.iterdir()) == []


def test_artifact_without_manifest_is_not_readable(object_store: ObjectStore, tmp_path: Path):
    object_store.put_bytes("models/half-written/model.safetensors", b"weights")

    with pytest.raises(ObjectNotFound, match=MANIFEST_NAME):
        read_artifact_manifest(object_store, "models/half-written")
    with pytest.raises(ObjectNotFound):
        download_artifact(object_store, "models/half-written", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_manifest_json_round_trips_and_refuses_paths_out_of_the_folder():
    manifest = ArtifactManifest(
        [ArtifactFileRecord("a/b.bin", 3, "0" * 64)], {"job": "j"}, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    )
    assert manifest_from_json(manifest_to_json(manifest), "here") == manifest

    document = json.loads(manifest_to_json(manifest))
    document["files"][0]["path"] = "../../etc/passwd"
    with pytest.raises(ObjectStoreError, match="here is not a valid artifact manifest"):
        manifest_from_json(json.dumps(document).encode(), "here")
    with pytest.raises(ObjectStoreError, match="not a valid artifact manifest"):
        manifest_from_json(b"{}", "here")
