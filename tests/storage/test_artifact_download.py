"""`stillhouse pull`: the API lists a job's artifact with presigned URLs from the real storage service, and
the CLI downloads it straight from object storage (a local folder or a real S3 server), verified."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from storage_process import start_storage
from typer.testing import CliRunner

from stillhouse.cli.main import app
from stillhouse.common.datasets.artifacts import upload_folder
from stillhouse.common.objectstore.open_store import open_object_store

SCRIPTED_STAGES = Path(__file__).parents[1] / "control_plane" / "scripted_stages.py"
JOB = {"spec": {"teacher": {"backend": "local", "model": "m"}, "student": {"init": {"pruneTeacherDepth": 2}}}}


@pytest.fixture
def finished_job(
    object_store_settings, processes, free_port, grpc_ready, wait_until, control_plane_at, tmp_path
):
    """A job run to Succeeded by scripted stage services, with a real storage service beside them."""
    storage = start_storage(processes, free_port, grpc_ready, wait_until, object_store_settings)
    stages_port = free_port()
    processes.start(
        "stages", [sys.executable, str(SCRIPTED_STAGES), str(stages_port), str(tmp_path / "journal"), "0.1"]
    )
    stages = f"127.0.0.1:{stages_port}"
    wait_until(lambda: grpc_ready(stages), 20, "the scripted stage services")
    control_plane = control_plane_at(
        {"prompts": stages, "teacher": stages, "trainer": stages, "storage": storage}
    )
    control_plane.start()
    with control_plane.client() as client:
        job_id = client.post("/v1/jobs", json=JOB).json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["phase"] == "Succeeded", 60, "the job")
    return control_plane, job_id, open_object_store(object_store_settings)


def pull(control_plane, *args: str):
    env = {
        "STILLHOUSE_API_URL": control_plane.url,
        "STILLHOUSE_API_TOKEN": control_plane.token,
        "COLUMNS": "200",
    }
    return CliRunner().invoke(app, ["pull", *args], env=env)


def test_pull_downloads_the_student_verified(finished_job, tmp_path):
    control_plane, job_id, store = finished_job
    # The trainer named the student, but nothing was committed there: the storage service says so.
    early = pull(control_plane, job_id, str(tmp_path / "early"))
    assert early.exit_code == 1
    assert "NOT_FOUND" in early.output
    assert not (tmp_path / "early").exists()

    model = tmp_path / "model"
    (model / "nested").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "nested" / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    upload_folder(store, f"jobs/{job_id}/train/student", model)

    with control_plane.client() as client:
        links = client.get(f"/v1/jobs/{job_id}/artifacts/student").json()
        assert client.get(f"/v1/jobs/{job_id}/artifacts/report").status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/artifacts/weights").status_code == 422
    assert links["artifactId"] == f"jobs/{job_id}/train/student"
    assert sorted(file["path"] for file in links["files"]) == ["config.json", "nested/weights.bin"]

    result = pull(control_plane, job_id, str(tmp_path / "pulled"))
    assert result.exit_code == 0, result.output
    for path in ("config.json", "nested/weights.bin"):
        assert (tmp_path / "pulled" / path).read_bytes() == (model / path).read_bytes()
    assert "from_pretrained" in result.stdout

    refused = pull(control_plane, job_id, str(tmp_path / "pulled"))
    assert refused.exit_code == 1
    assert "is not an empty folder" in refused.output


def test_a_file_that_differs_from_its_manifest_is_refused_and_nothing_is_left(finished_job, tmp_path):
    control_plane, job_id, store = finished_job
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    upload_folder(store, f"jobs/{job_id}/train/student", model)
    store.put_bytes(f"jobs/{job_id}/train/student/config.json", b'{"model_type": "gpt2"}')

    result = pull(control_plane, job_id, str(tmp_path / "pulled"))
    assert result.exit_code == 1
    assert "config.json" in result.output
    assert not (tmp_path / "pulled").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".pulled")] == []
