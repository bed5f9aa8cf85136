"""The trainer service as a real process (`stillhouse serve trainer`): requests checked before any Ray
work, an unreachable Ray cluster reported within seconds, and training and evaluation end to end on the
local Ray head it starts."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from service_token import authorized_channel
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.common.datasets.artifacts import download_artifact, upload_folder
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.trainer.data import read_answer_rows
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

State = operations_pb2.OperationState
JOB = "job-s1"
ANSWERS = f"jobs/{JOB}/teacher/answers"
HOLDOUT = f"jobs/{JOB}/teacher/holdout"
TOPICS = ["cats", "dogs", "rain", "the sea", "mountains", "bread", "music", "trains"]


@dataclass
class TrainerService:
    address: str
    store: LocalObjectStore

    def call(self, rpc: str, request) -> operations_pb2.Operation:
        with authorized_channel(self.address) as channel:
            return getattr(trainer_pb2_grpc.TrainerStub(channel), rpc)(request, timeout=30)

    def watch(self, operation_id: str, seen: list | None = None) -> operations_pb2.Operation:
        with authorized_channel(self.address) as channel:
            stub = operations_pb2_grpc.OperationsStub(channel)
            final = None
            for operation in stub.WatchOperation(
                operations_pb2.WatchOperationRequest(operation_id=operation_id)
            ):
                if seen is not None:
                    seen.append(operation)
                final = operation
            return final


@pytest.fixture
def start_trainer(processes, free_port, grpc_ready, wait_until, tmp_path_factory):
    def start(**env: str) -> TrainerService:
        # A short home: Ray's unix sockets live under it and their paths are limited to 107 bytes.
        home = tmp_path_factory.mktemp("home")
        port = free_port()
        environment = {
            "STILLHOUSE_HOME": str(home),
            "STILLHOUSE_TRAINER_LOG_FORMAT": "console",
            "STILLHOUSE_TRAINER_LOCAL_RAY__NUM_CPUS": "2",
            "STILLHOUSE_TRAINER_RAY_POLL_SECONDS": "0.5",
            **env,
        }
        argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", "trainer", "--port", str(port)]
        processes.start("trainer", argv, environment)
        wait_until(lambda: grpc_ready(f"127.0.0.1:{port}"), 30, "the trainer service")
        store = LocalObjectStore(home / "objects", "stillhouse")
        store.ensure_bucket()
        return TrainerService(f"127.0.0.1:{port}", store)

    return start


def struct(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def train_request(
    operation_id: str, teacher: Path, student: Path, evaluation: dict | None = None, **training
) -> trainer_pb2.TrainStudentRequest:
    return trainer_pb2.TrainStudentRequest(
        operation_id=operation_id,
        job_id=JOB,
        answers=operations_pb2.DatasetRef(dataset_id=ANSWERS),
        teacher=struct({"backend": "local", "model": str(teacher), "topLogprobs": 20}),
        student=struct({"init": {"pretrained": str(student)}}),
        training=struct(
            {
                "loss": {"kind": "forward_kl"},
                "learningRate": 3e-3,
                "batchTokens": 256,
                "maxSeqLen": 128,
                "workers": 2,
                **training,
            }
        ),
        evaluation=struct(evaluation or {}),
    )


def test_a_bad_spec_is_refused_naming_the_field(start_trainer, tmp_path):
    service = start_trainer()
    request = train_request("op-bad", tmp_path / "t", tmp_path / "s", workers=0)
    with pytest.raises(grpc.RpcError) as refused:
        service.call("TrainStudent", request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.training.workers" in refused.value.details()

    request.training.update({"workers": 1, "loss": {"kind": "forward_kl", "teacherLogits": "full"}})
    request.teacher.update({"backend": "openai", "baseURL": "http://127.0.0.1:1/v1"})
    with pytest.raises(grpc.RpcError) as refused:
        service.call("TrainStudent", request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "teacherLogits `full` needs a `local` teacher" in refused.value.details()


def test_an_evaluation_needs_the_training_answers_and_a_listed_control(
    start_trainer, tmp_path, tiny_llama, answers_dataset
):
    service = start_trainer()
    request = trainer_pb2.EvaluateStudentRequest(
        operation_id="op-evaluate-refs",
        job_id=JOB,
        student=operations_pb2.ArtifactRef(artifact_id=f"jobs/{JOB}/train/student"),
        baseline=operations_pb2.ArtifactRef(artifact_id=f"jobs/{JOB}/train/baseline"),
        holdout_answers=operations_pb2.DatasetRef(dataset_id=HOLDOUT),
        teacher=struct({"backend": "local", "model": str(tmp_path / "teacher")}),
        evaluation=struct({"controls": ["sft"]}),
    )
    with pytest.raises(grpc.RpcError) as refused:
        service.call("EvaluateStudent", request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_answers.dataset_id must be set" in refused.value.details()

    # Everything there but the SFT control that evaluation.controls lists: refused before any Ray work.
    model = tiny_llama(tmp_path / "model")
    for dataset_id in (HOLDOUT, ANSWERS):
        answers_dataset(service.store, dataset_id, model, ["why?"], max_new_tokens=2)
    for name in ("student", "baseline"):
        upload_folder(service.store, f"jobs/{JOB}/train/{name}", model)
    request.training_answers.dataset_id = ANSWERS
    service.call("EvaluateStudent", request)
    final = service.watch("op-evaluate-refs")
    assert final.state == State.OPERATION_STATE_FAILED
    assert final.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert f"control-sft: no committed artifact 'jobs/{JOB}/train/control-sft'" in final.error.message


def test_a_missing_answers_dataset_fails_the_operation_before_ray(start_trainer, tmp_path, tiny_llama):
    service = start_trainer()
    model = tiny_llama(tmp_path / "model")
    service.call("TrainStudent", train_request("op-missing", model, model))

    final = service.watch("op-missing")

    assert final.state == State.OPERATION_STATE_FAILED
    assert final.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert ANSWERS in final.error.message


def test_an_unreachable_ray_cluster_fails_within_seconds(
    start_trainer, tmp_path, tiny_llama, answers_dataset, free_port
):
    closed = f"http://127.0.0.1:{free_port()}"
    service = start_trainer(
        STILLHOUSE_TRAINER_RAY_ADDRESS=closed, STILLHOUSE_TRAINER_RAY_CONNECT_TIMEOUT_SECONDS="3"
    )
    model = tiny_llama(tmp_path / "model")
    answers_dataset(service.store, ANSWERS, model, TOPICS[:2], max_new_tokens=4)
    started = time.monotonic()
    service.call("TrainStudent", train_request("op-unreachable", model, model, loss={"kind": "sft"}))

    final = service.watch("op-unreachable")

    assert time.monotonic() - started < 10
    assert final.state == State.OPERATION_STATE_FAILED
    assert final.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert final.error.message.startswith(f"cannot reach the Ray cluster at {closed}")


def test_a_logit_loss_with_another_vocabulary_is_refused_before_ray(
    start_trainer, tmp_path, tiny_llama, answers_dataset
):
    service = start_trainer(STILLHOUSE_TRAINER_RAY_ADDRESS="http://127.0.0.1:1")
    teacher = tiny_llama(tmp_path / "teacher")
    student = tiny_llama(tmp_path / "student", seed=1)
    # One token more, and the student's vocabulary is no longer the teacher's.
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.add_tokens(["<only-in-the-student>"])
    tokenizer.save_pretrained(student)
    answers_dataset(service.store, ANSWERS, teacher, TOPICS[:2], max_new_tokens=4)
    service.call("TrainStudent", train_request("op-vocab", teacher, student))

    final = service.watch("op-vocab")

    assert final.state == State.OPERATION_STATE_FAILED
    assert final.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "forward_kl" in final.error.message and "fallbackToSft" in final.error.message


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_student_end_to_end_on_the_local_ray(start_trainer, tmp_path, tiny_llama, answers_dataset):
    service = start_trainer()
    teacher = tiny_llama(tmp_path / "teacher", seed=1)
    student = tiny_llama(tmp_path / "student", seed=0)
    prompts = [f"question {i}: tell me about {topic}" for i, topic in enumerate(TOPICS * 2)]
    answers_dataset(service.store, ANSWERS, teacher, prompts, max_new_tokens=16, rows_per_shard=4)

    # Two DDP workers, each generating for its own rows on the on-policy steps; then the SFT control.
    request = train_request(
        "op-train",
        teacher,
        student,
        evaluation={"controls": ["sft"]},
        epochs=3,
        onPolicy={"fraction": 0.5, "maxNewTokens": 4},
    )
    service.call("TrainStudent", request)
    seen: list[operations_pb2.Operation] = []
    final = service.watch("op-train", seen)

    assert final.state == State.OPERATION_STATE_SUCCEEDED, final.error.message
    result = trainer_pb2.TrainStudentResult()
    final.result.Unpack(result)
    assert result.steps > 0 and result.tokens > 0 and result.gpu_hours == 0
    assert "loss" in result.final_metrics
    assert 0 < result.final_metrics["on_policy_steps"] < result.steps
    assert result.sft_control.artifact_id == f"jobs/{JOB}/train/control-sft" and result.sft_control.sha256
    messages = {op.progress.message.split(":")[0] for op in seen}
    assert {"training the student", "training the control-sft"} <= messages
    progressed = [op.progress for op in seen if op.progress.done > 0]
    assert progressed and progressed[0].unit == "steps"
    assert {"loss", "learning_rate", "tokens_per_second"} <= set(progressed[0].metrics)
    downloaded = tmp_path / "trained"
    download_artifact(service.store, result.student.artifact_id, downloaded)
    assert AutoModelForCausalLM.from_pretrained(downloaded).config.num_hidden_layers == 2
    assert result.baseline.artifact_id == f"jobs/{JOB}/train/baseline" and result.baseline.sha256

    # The whole curve: every step the student's training log has, then the control's.
    logged = [json.loads(line) for line in (downloaded / "training_log.jsonl").read_text().splitlines()]
    student_curve = [point for point in result.curve if point.model == "student"]
    assert [point.step for point in student_curve] == [int(entry["step"]) for entry in logged]
    assert [point.metrics["loss"] for point in student_curve] == [entry["loss"] for entry in logged]
    assert student_curve[-1].step == result.steps
    assert student_curve[-1].metrics["loss"] == result.final_metrics["loss"]
    assert [point.model for point in result.curve[len(student_curve) :]] == ["control-sft"] * (
        len(result.curve) - len(student_curve)
    ) and len(result.curve) > len(student_curve)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluate_student_end_to_end_on_the_local_ray(start_trainer, tmp_path, tiny_llama, answers_dataset):
    service = start_trainer()
    teacher = tiny_llama(tmp_path / "teacher", seed=1)
    answers_dataset(service.store, HOLDOUT, teacher, ["what about snow?", "and cheese?"], max_new_tokens=8)
    answers_dataset(service.store, ANSWERS, teacher, ["what about rain?", "and bread?"], max_new_tokens=8)
    refs = {}
    for name, seed in (("student", 2), ("baseline", 0)):
        prefix = f"jobs/{JOB}/train/{name}"
        upload_folder(service.store, prefix, tiny_llama(tmp_path / name, seed=seed))
        refs[name] = operations_pb2.ArtifactRef(artifact_id=prefix)

    service.call(
        "EvaluateStudent",
        trainer_pb2.EvaluateStudentRequest(
            operation_id="op-evaluate",
            job_id=JOB,
            student=refs["student"],
            baseline=refs["baseline"],
            holdout_answers=operations_pb2.DatasetRef(dataset_id=HOLDOUT),
            training_answers=operations_pb2.DatasetRef(dataset_id=ANSWERS),
            teacher=struct({"backend": "local", "model": str(teacher), "topLogprobs": 20}),
            evaluation=struct({"maxNewTokens": 8}),
        ),
    )
    final = service.watch("op-evaluate")

    assert final.state == State.OPERATION_STATE_SUCCEEDED, final.error.message
    evaluation = trainer_pb2.EvaluateStudentResult()
    final.result.Unpack(evaluation)
    assert evaluation.report.artifact_id.startswith(f"jobs/{JOB}/evaluate")
    published = evaluation.student
    assert published.artifact_id != refs["student"].artifact_id and published.sha256 and published.size_bytes
    assert evaluation.student_metrics and evaluation.baseline_metrics and evaluation.teacher_metrics
    assert "kl" in evaluation.unigram_metrics and "kl" in evaluation.uniform_metrics
    assert not evaluation.control_sft_metrics and not evaluation.control_sft_lead  # none listed
    assert evaluation.gap_closed_percent["kl"] == pytest.approx(evaluation.recovery_percent)
    # Both held-out prompts side by side, in order, with the teacher's answers; no control was trained.
    holdout_rows = list(read_answer_rows(service.store, HOLDOUT))
    assert [sample.prompt_id for sample in evaluation.samples] == [row["prompt_id"] for row in holdout_rows]
    assert {sample.prompt for sample in evaluation.samples} == {"what about snow?", "and cheese?"}
    assert [sample.teacher for sample in evaluation.samples] == [row["response"] for row in holdout_rows]
    assert not any(sample.control_sft for sample in evaluation.samples)
