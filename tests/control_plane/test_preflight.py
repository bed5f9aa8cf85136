"""The submit-time check through a real control plane and a real trainer service: a job whose tokenizers,
chat templates or context would fail training is refused with a 422 naming the field, by the submit and
by the estimate alike, and never stored; a compatible one is accepted. The shipped cluster example is
refused as it used to read, and accepted as it reads now where the files it names exist."""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from stillhouse.common.datasets.artifacts import upload_folder
from stillhouse.common.objectstore.local_store import LocalObjectStore

CLUSTER_EXAMPLE = Path(__file__).parents[2] / "examples" / "gpu-cluster.yaml"
OTHER_TEMPLATE = "{% for message in messages %}[{{ message['content'] }}]{% endfor %}"


@dataclass
class Platform:
    api: httpx.Client
    store: LocalObjectStore

    def jobs(self) -> list[dict]:
        return self.api.get("/v1/jobs").json()["jobs"]


@pytest.fixture
def platform(processes, free_port, grpc_ready, wait_until, control_plane_at, tmp_path_factory):
    home = tmp_path_factory.mktemp("trainer-home")
    port = free_port()
    environment = {
        "STILLHOUSE_HOME": str(home),
        "STILLHOUSE_TRAINER_LOG_FORMAT": "console",
        # A cluster, as in the cluster example: the check never calls it, and it may autoscale.
        "STILLHOUSE_TRAINER_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",
    }
    argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", "trainer", "--port", str(port)]
    processes.start("trainer", argv, environment)
    wait_until(lambda: grpc_ready(f"127.0.0.1:{port}"), 60, "the trainer service")
    # Prompts and teacher are absent: an accepted job waits in Prompts, which is all these tests need.
    absent = {name: f"127.0.0.1:{free_port()}" for name in ("prompts", "teacher")}
    control_plane = control_plane_at({**absent, "trainer": f"127.0.0.1:{port}"})
    control_plane.start()
    store = LocalObjectStore(home / "objects", "stillhouse")
    store.ensure_bucket()
    with control_plane.client() as client:
        client.timeout = httpx.Timeout(60)
        yield Platform(client, store)


def job(teacher: Path, student: Path, **training) -> dict:
    return {
        "spec": {
            "teacher": {"backend": "local", "model": str(teacher)},
            "student": {"init": {"pretrained": str(student)}},
            "training": {"maxSeqLen": 256, **training},
        }
    }


def refusal(response: httpx.Response) -> tuple[list[str], str]:
    assert response.status_code == 422, response.text
    body = response.json()
    return [error["field"] for error in body["errors"]], body["message"]


# What would fail training, as the student's tokenizer or config, and the field the refusal names.
# (Each case in one test: starting the two services takes longer than checking all of them.)
FAILING_STUDENTS = [
    ({"extra": ("only-in-the-student",)}, "spec.student.init.pretrained", "vocabulary"),
    ({"eos": "<pad>"}, "spec.student.init.pretrained", "end-of-sequence tokens differ"),
    ({"chat_template": None}, "spec.student.init.pretrained", "no chat template"),
    ({"context": 128}, "spec.training.maxSeqLen", "context of 128 tokens"),
]


def test_a_student_that_would_fail_training_is_refused_at_submit_and_in_the_estimate(
    platform, tokenizer_only_model, tmp_path
):
    teacher = tokenizer_only_model(tmp_path / "teacher")
    for case, (student_kwargs, field, words) in enumerate(FAILING_STUDENTS):
        student = tokenizer_only_model(tmp_path / f"student-{case}", **student_kwargs)
        document = job(teacher, student)
        for route in ("/v1/jobs", "/v1/jobs:estimate"):
            fields, message = refusal(platform.api.post(route, json=document))
            assert fields == [field], (route, student_kwargs)
            assert message.startswith(f"invalid DistillationJob: {field}: "), (route, message)
            assert words in message, (route, message)
    assert platform.jobs() == []


@pytest.mark.slow
def test_a_compatible_student_is_accepted_with_the_warnings_of_the_check(
    platform, tokenizer_only_model, tmp_path
):
    teacher = tokenizer_only_model(tmp_path / "teacher")
    same = tokenizer_only_model(tmp_path / "same")
    accepted = platform.api.post("/v1/jobs", json=job(teacher, same))
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["warnings"] == []

    other_template = tokenizer_only_model(tmp_path / "other", chat_template=OTHER_TEMPLATE)
    warned = platform.api.post("/v1/jobs", json=job(teacher, other_template))
    assert warned.status_code == 201, warned.text
    (warning,) = warned.json()["warnings"]
    assert warning["field"] == "spec.student.init.pretrained"
    assert "chat template differs" in warning["message"]
    assert {entry["id"] for entry in platform.jobs()} == {accepted.json()["id"], warned.json()["id"]}


def test_the_cluster_example_is_refused_as_it_shipped_and_accepted_where_its_files_exist(
    platform, tokenizer_only_model, tmp_path
):
    example = yaml.safe_load(CLUSTER_EXAMPLE.read_text())
    as_shipped = copy.deepcopy(example)
    del as_shipped["spec"]["teacher"]["tokenizer"]
    fields, message = refusal(platform.api.post("/v1/jobs", json=as_shipped))
    assert fields == ["spec"]
    assert "training.loss.kind `jsd`" in message and "set teacher.tokenizer" in message

    # On a cluster without the files it names, the check says which one is missing.
    fields, message = refusal(platform.api.post("/v1/jobs", json=example))
    assert fields == ["spec.teacher.tokenizer"]
    assert example["spec"]["teacher"]["tokenizer"] in message

    tokenizer = tokenizer_only_model(tmp_path / "teacher-tokenizer")
    student = tokenizer_only_model(tmp_path / "student", context=32768)
    bucket, _, prefix = example["spec"]["student"]["init"]["pretrained"].removeprefix("s3://").partition("/")
    assert bucket == "stillhouse"
    upload_folder(platform.store, prefix, student)
    example["spec"]["teacher"]["tokenizer"] = str(tokenizer)
    accepted = platform.api.post(
        "/v1/jobs", content=json.dumps(example), headers={"Content-Type": "application/json"}
    )
    assert accepted.status_code == 201, accepted.text
    assert [entry["name"] for entry in platform.jobs()] == ["qwen-coder-1p5b"]
