"""One whole job through the embedded platform (`stillhouse up`, every service its own process) driven by
the SDK alone: submit, wait with a progress callback, read the summary, pull the student verified, and
load it with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
from embedded_platform import running_up
from tiny_job import tiny_job_spec
from transformers import AutoModelForCausalLM

from stillhouse.client import Client, DistillationJob, JobEvent, Phase, PhaseEvent, ProgressEvent

pytestmark = pytest.mark.long

STAGES = ["prompts", "teacher", "train", "evaluate"]


@pytest.mark.timeout(900)
def test_a_tiny_job_runs_end_to_end_through_the_sdk(tmp_path: Path, tiny_llama, free_port) -> None:
    teacher = tiny_llama(tmp_path / "teacher", layers=2, hidden=64, seed=1)
    inputs = tmp_path / "inputs"
    spec = DistillationJob.model_validate(tiny_job_spec(teacher, inputs, name="sdk-end-to-end"))

    with (
        running_up(tmp_path / "home", free_port(), "--input-root", str(inputs)) as platform,
        Client(url=platform.api_url, token=platform.token) as client,
    ):
        job = client.submit(spec)
        assert job.name == "sdk-end-to-end"
        seen: list[JobEvent] = []
        finished = client.wait(job.id, on_progress=seen.append, timeout=600)
        assert finished.phase is Phase.SUCCEEDED, f"{finished.message}\n{platform.logs()}"

        phases = [event.phase for event in seen if isinstance(event, PhaseEvent)]
        assert phases == ["Pending", "Prompts", "Teacher", "Training", "Evaluating", "Succeeded"]
        progress = [event for event in seen if isinstance(event, ProgressEvent)]
        stages_in_order = list(dict.fromkeys(event.stage for event in progress))
        assert stages_in_order == STAGES
        training = [event for event in progress if event.stage == "train" and "loss" in event.metrics]
        assert training and training[-1].done > 0, progress

        summary = finished.summary
        assert summary is not None and summary.evaluation is not None
        evaluation = summary.evaluation
        for row in (evaluation.student, evaluation.baseline, evaluation.teacher, evaluation.unigram):
            assert "kl" in row or "token_f1" in row, evaluation
        assert summary.training is not None and summary.training.steps > 0
        assert "student" in summary.artifacts

        pulled: list[str] = []
        folder = client.pull(job.id, tmp_path / "student", on_file=lambda path, size: pulled.append(path))
        assert "config.json" in pulled

    student = AutoModelForCausalLM.from_pretrained(folder)
    assert student.config.num_hidden_layers == 1
