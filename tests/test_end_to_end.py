"""One job through the whole platform, as `make demo` runs it: `stillhouse run` starts every service as
its own process, the job goes REST → prompts → teacher → storage → Ray training → evaluation →
Succeeded, and what it leaves in storage opens with pyarrow and transformers alone.

The default test uses a tiny random teacher (seconds per stage; Ray start-up dominates); the slow one
runs the shipped example with the real SmolLM2 teacher and checks that the student learned from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from tiny_job import tiny_job_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.common.datasets.artifacts import download_artifact
from stillhouse.common.objectstore.local_store import LocalObjectStore

pytestmark = pytest.mark.long

REPO = Path(__file__).resolve().parents[1]
STILLHOUSE = [sys.executable, "-m", "stillhouse.cli.main"]


def run_job(spec_file: Path, home: Path, api_port: int, timeout: float) -> tuple[str, str]:
    """`stillhouse run` to the end; the job id and everything it printed."""
    result = subprocess.run(
        [*STILLHOUSE, "run", str(spec_file), "--home", str(home), "--api-port", str(api_port)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output + _logs(home)
    assert "Succeeded" in output, output
    return re.search(r"job (job-[0-9a-f]+) submitted", output).group(1), output


def _logs(home: Path) -> str:
    return "".join(
        f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        for log in sorted((home / "logs").glob("*.log"))
    )


def teacher_calls(output: str) -> tuple[int, int]:
    """(calls, of which from the cache) as the run's summary prints them."""
    found = re.search(r"Teacher\s+([\d,]+) calls \(([\d,]+) from the cache\)", output)
    assert found, output
    return int(found.group(1).replace(",", "")), int(found.group(2).replace(",", ""))


def stored_report(home: Path, job_id: str) -> dict:
    return json.loads((home / "objects/stillhouse/jobs" / job_id / "evaluate/report/report.json").read_text())


@pytest.mark.timeout(1500)
def test_a_tiny_job_runs_end_to_end_and_a_repeat_pays_the_teacher_nothing(
    tmp_path: Path, tiny_llama, free_port
) -> None:
    teacher = tiny_llama(tmp_path / "teacher", layers=2, hidden=64, seed=1)
    spec = tiny_job_spec(teacher, tmp_path)
    # As a user writes them: the prompt files beside the spec, named relative to it.
    spec["spec"]["prompts"]["sources"] = [{"path": "seeds.jsonl"}]
    spec["spec"]["prompts"]["generate"]["slotFiles"] = {"topic": "topics.txt"}
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"

    job_id, output = run_job(spec_file, home, free_port(), timeout=600)
    calls, cached = teacher_calls(output)
    assert calls > 0 and cached == 0, output
    assert "of the gap from a context-free unigram to the teacher" in output

    store = LocalObjectStore(home / "objects", "stillhouse")
    train_prompts = pq.read_table(
        sorted((home / "objects/stillhouse/jobs" / job_id / "prompts/train").rglob("*.parquet"))
    )
    answers = pq.read_table(
        sorted((home / "objects/stillhouse/jobs" / job_id / "teacher/answers").rglob("*.parquet"))
    )
    assert train_prompts.num_rows == answers.num_rows > 20
    student = tmp_path / "student"
    download_artifact(store, f"jobs/{job_id}/student", student)
    model = AutoModelForCausalLM.from_pretrained(student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    assert model.config.num_hidden_layers == 1
    assert "Evaluation" in (student / "README.md").read_text()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert model.generate(chat, max_new_tokens=4, do_sample=False).shape[1] > chat.shape[1]
    # Learning itself is shown on real data by the slow test below and by the trainer's own tests.
    metrics = stored_report(home, job_id)["metrics"]
    assert set(metrics) == {"teacher", "baseline", "student", "uniform", "unigram"}
    assert metrics["teacher"]["kl"] == 0
    assert metrics["student"]["kl"] != metrics["baseline"]["kl"]

    # The same spec again: every teacher answer (and every generation call) comes from the cache.
    _, again = run_job(spec_file, home, free_port(), timeout=600)
    assert teacher_calls(again) == (calls, calls)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_example_distils_smollm2_into_a_student_ahead_of_its_untrained_self(
    tmp_path: Path, free_port
) -> None:
    home = tmp_path / "home"
    job_id, _ = run_job(REPO / "examples" / "smollm2-local.yaml", home, free_port(), timeout=1800)
    report = stored_report(home, job_id)
    metrics = report["metrics"]
    student, baseline, control = metrics["student"], metrics["baseline"], metrics["control-sft"]
    assert student["kl"] < baseline["kl"]
    assert student["top1_agreement"] > baseline["top1_agreement"]
    assert student["perplexity"] < baseline["perplexity"]
    assert student["token_f1"] >= baseline["token_f1"]
    # Distillation earns its keep: most of the unigram-to-teacher gap closed on KL, and the teacher's
    # distributions beat its text alone (the SFT control, same batches and steps).
    assert report["recovery"]["gap_closed"]["kl"] >= 50
    assert student["top1_agreement"] >= 0.5
    assert student["kl"] < control["kl"] and student["top1_agreement"] > control["top1_agreement"]
    # The KL lead holds across the held-out answers: its whole interval is below 0.
    assert report["leads"]["control-sft"]["kl"]["high"] < 0
    # A real compression: at most half of the teacher's non-embedding parameters.
    assert report["model_size"]["student_to_teacher"] <= 0.5
    # Its greedy answers do not loop: repeated 4-grams at most twice as often as in the teacher's.
    assert student["repeated_4grams"] <= 2 * metrics["teacher"]["repeated_4grams"]
