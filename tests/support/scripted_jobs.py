"""Scripted stage services (tests/control_plane/scripted_stages.py) as a test starts them, their journal
of Start calls, and a job submitted to a control plane and waited for: what the orchestration tests of
one control plane and of several share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

SCRIPTED_STAGES = Path(__file__).resolve().parent.parent / "control_plane" / "scripted_stages.py"
MINIMAL_JOB = {
    "spec": {
        "teacher": {"backend": "local", "model": "smollm2"},
        "student": {"init": {"pruneTeacherDepth": 2}},
    }
}
STAGE_RPCS = ["GeneratePrompts", "AnswerPrompts", "TrainStudent", "EvaluateStudent"]


class Stages:
    def __init__(self, address: str, journal: Path) -> None:
        self.address = address
        self.journal_path = journal

    def journal(self) -> list[dict]:
        if not self.journal_path.exists():
            return []
        return [json.loads(line) for line in self.journal_path.read_text().splitlines()]

    def new_starts(self, rpc: str) -> list[str]:
        return [entry["operation_id"] for entry in self.journal() if entry.get("rpc") == rpc and entry["new"]]


def start_stages(processes, port: int, journal: Path, seconds: float, fail_rpc: str = "") -> Stages:
    argv = [sys.executable, str(SCRIPTED_STAGES), str(port), str(journal), str(seconds)]
    processes.start("stages", argv + ([fail_rpc] if fail_rpc else []))
    return Stages(f"127.0.0.1:{port}", journal)


def submit(client: httpx.Client, job: dict = MINIMAL_JOB) -> str:
    response = client.post("/v1/jobs", json=job)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def phase_of(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/v1/jobs/{job_id}").json()["phase"]


def wait_for_phase(wait_until, client, job_id: str, phases: set[str], timeout: float = 60) -> str:
    return wait_until(
        lambda: (phase := phase_of(client, job_id)) in phases and phase, timeout, f"phase in {phases}"
    )
