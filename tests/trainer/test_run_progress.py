"""A run's progress records become its operation's progress and the trainer's training metrics (loss,
tokens per second, steps by model), with model names outside the known ones counted as "other"."""

from __future__ import annotations

import asyncio

import prometheus_client

from stillhouse.common.operations import OperationRegistry, ProgressReporter, State
from stillhouse.common.v1 import operations_pb2
from stillhouse.trainer.run_progress import train_progress

RECORDS = [
    {"kind": "train", "step": 1, "model": "control-sft", "loss": 3.5, "tokens_per_second": 400.0},
    {"kind": "train", "step": 1, "model": "student", "loss": 2.5, "tokens_per_second": 900.0},
    {"kind": "train", "step": 2, "model": "student", "loss": 2.0, "tokens_per_second": 1000.0, "epoch": 1.0},
    {"kind": "train", "step": 1, "model": "a name from the record", "loss": 9.0},
    {"message": "saving the checkpoint"},
]


def sample(name: str, model: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, {"model": model}) or 0.0


async def test_training_records_become_progress_and_metrics() -> None:
    steps_before = {model: sample("stillhouse_training_steps_total", model) for model in ("student", "other")}

    async def work(progress: ProgressReporter) -> operations_pb2.DatasetRef:
        on_record = train_progress(progress)
        for record in RECORDS:
            on_record(record)
        return operations_pb2.DatasetRef()

    registry = OperationRegistry()
    registry.start("op-train", kind="TrainStudent", job_id="job-1", fingerprint=b"", work=work)
    async with asyncio.timeout(5):
        final = [operation async for operation in registry.watch("op-train")][-1]

    assert final.state == State.OPERATION_STATE_SUCCEEDED
    assert final.progress.metrics["loss"] == 9.0 and final.progress.message == "saving the checkpoint"
    assert sample("stillhouse_training_loss", "student") == 2.0
    assert sample("stillhouse_training_tokens_per_second", "student") == 1000.0
    assert sample("stillhouse_training_loss", "control-sft") == 3.5
    assert sample("stillhouse_training_loss", "other") == 9.0
    assert sample("stillhouse_training_steps_total", "student") - steps_before["student"] == 2
    assert sample("stillhouse_training_steps_total", "other") - steps_before["other"] == 1
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "stillhouse_training_loss", {"model": "a name from the record"}
        )
        is None
    )
