"""Object-store keys stay out of Ray jobs: a run leaves for Ray without them and gets them back from
the environment of the Ray node it lands on."""

from __future__ import annotations

import json

import pytest

from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer.ray_credentials import (
    ACCESS_KEY_ENV,
    SECRET_KEY_ENV,
    MissingObjectStoreKeys,
    key_environment,
    run_with_keys,
    run_without_keys,
)
from stillhouse.trainer.run_config import EvaluateRun, TrainRun

S3 = ObjectStoreSettings(
    backend="s3",
    bucket="stillhouse",
    endpoint="minio:9000",
    access_key="AKIA-test",
    secret_key="s3cr3t-value",
)


def train_run(store: ObjectStoreSettings) -> TrainRun:
    return TrainRun.model_validate(
        {
            "job_id": "job-1",
            "answers_dataset_id": "jobs/job-1/teacher/answers",
            "object_store": store,
            "teacher": {"backend": "local", "model": "/models/teacher"},
            "student": {"init": {"pretrained": "/models/student"}},
            "training": {},
            "output_prefix": "jobs/job-1/train",
        }
    )


def test_a_run_leaves_for_ray_without_the_keys():
    carried = run_without_keys(train_run(S3))
    assert "AKIA-test" not in carried and "s3cr3t-value" not in carried
    store = json.loads(carried)["object_store"]
    assert store["access_key"] is None and store["secret_key"] is None
    assert store["endpoint"] == "minio:9000"


def test_the_ray_node_gives_the_keys_back(monkeypatch):
    monkeypatch.setenv(ACCESS_KEY_ENV, "AKIA-test")
    monkeypatch.setenv(SECRET_KEY_ENV, "s3cr3t-value")
    run = train_run(S3)
    assert run_with_keys(TrainRun, run_without_keys(run)) == run


def test_a_node_without_keys_is_refused_naming_the_variables(monkeypatch):
    monkeypatch.delenv(ACCESS_KEY_ENV, raising=False)
    monkeypatch.setenv(SECRET_KEY_ENV, "s3cr3t-value")
    with pytest.raises(MissingObjectStoreKeys) as refused:
        run_with_keys(TrainRun, run_without_keys(train_run(S3)))
    assert ACCESS_KEY_ENV in str(refused.value) and SECRET_KEY_ENV in str(refused.value)


def test_a_local_store_needs_no_keys(monkeypatch, tmp_path):
    monkeypatch.delenv(ACCESS_KEY_ENV, raising=False)
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)
    local = ObjectStoreSettings(backend="local", local_root=tmp_path)
    run = EvaluateRun.model_validate(
        {
            "job_id": "job-1",
            "object_store": local,
            "teacher": {"backend": "local", "model": "/models/teacher"},
            "student_prefix": "jobs/job-1/student",
            "baseline_prefix": "jobs/job-1/baseline",
            "holdout_dataset_id": "jobs/job-1/teacher/holdout",
            "training_dataset_id": "jobs/job-1/teacher/train",
            "evaluation": {},
            "output_prefix": "jobs/job-1/evaluate",
        }
    )
    assert run_with_keys(EvaluateRun, run_without_keys(run)) == run
    assert key_environment(local) == {}


def test_a_head_is_started_with_the_keys_of_the_store():
    assert key_environment(S3) == {ACCESS_KEY_ENV: "AKIA-test", SECRET_KEY_ENV: "s3cr3t-value"}


def test_a_store_with_credentials_from_the_environment_takes_no_keys_from_the_node(monkeypatch):
    """IRSA: the Ray node's own role, not keys, even where the node happens to have key variables."""
    monkeypatch.setenv(ACCESS_KEY_ENV, "AKIA-test")
    monkeypatch.setenv(SECRET_KEY_ENV, "s3cr3t-value")
    from_role = ObjectStoreSettings(backend="s3", endpoint="s3.amazonaws.com", credentials="environment")
    run = train_run(from_role)
    assert key_environment(from_role) == {}
    assert run_with_keys(TrainRun, run_without_keys(run)) == run
