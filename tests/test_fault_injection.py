"""Faults injected into a running job on `stillhouse up`: every process killed (-9) at every stage, and
one service stopped (SIGSTOP) mid-stage. The platform must finish the job as if nothing had happened.

The teacher is the fake OpenAI-compatible server (tests/teacher/fake_openai.py), which counts the answers
it sends per prompt; the student is a tiny random model. The test steers the server so that every kill
lands while the stage's calls are waiting in it (they are held, never answered), so "each prompt is
answered once" is exact: a call answered and then lost would be paid twice.

At each of the four stages all five service processes are killed at once; `stillhouse up` restarts them
(restart_policy.py) and the control plane re-attaches the job to its stage. In the teacher stage the
teacher service is also stopped; the supervisor's health checks find it and kill it. Afterwards the job
has Succeeded, its datasets hold each prompt exactly once, and each prompt was answered once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pyarrow.parquet as pq
import pytest
from fake_openai_client import FakeOpenAI, running_fake_openai
from waiting import grpc_serving, http_ok

pytestmark = pytest.mark.long

STILLHOUSE = [sys.executable, "-m", "stillhouse.cli.main"]
SERVICES = ("prompts", "teacher", "storage", "trainer", "control-plane")
SEEDS = [f"Question {number}: what is worth knowing about the number {number}?" for number in range(40)]
# Held calls wait in the fake server far longer than the test runs.
HOLD = {"mode": "slow", "delay": 3600}

# Quick health checks (a stopped service is found within seconds), quick restarts, and a control plane
# that gives a silent service 300 s before failing the job.
FAULT_TOLERANT_ENV = {
    "STILLHOUSE_UP_INITIAL_BACKOFF_SECONDS": "0.5",
    "STILLHOUSE_UP_PROBE_PERIOD_SECONDS": "1",
    "STILLHOUSE_UP_PROBE_TIMEOUT_SECONDS": "2",
    "STILLHOUSE_UP_PROBE_FAILURE_THRESHOLD": "3",
    "STILLHOUSE_CONTROL_PLANE_SERVICE_UNAVAILABLE_TIMEOUT_SECONDS": "300",
    "STILLHOUSE_CONTROL_PLANE_SERVICE_CALL_TIMEOUT_SECONDS": "10",
    "STILLHOUSE_CONTROL_PLANE_WATCH_IDLE_TIMEOUT_SECONDS": "10",
    "STILLHOUSE_CONTROL_PLANE_PROGRESS_EVENT_INTERVAL_SECONDS": "0.2",
}


@dataclass
class Platform:
    """A running `stillhouse up` and the API it serves."""

    home: Path
    supervisor: subprocess.Popen[str]
    api: httpx.Client
    addresses: dict[str, str]

    def service(self, name: str) -> psutil.Process:
        """The live process of service `name` (a killed one may linger as a zombie until reaped)."""
        for child in psutil.Process(self.supervisor.pid).children():
            try:
                if child.cmdline()[3:5] == ["serve", name]:
                    return child
            except psutil.Error:
                continue
        raise LookupError(f"no {name} process is running")

    def pids(self) -> dict[str, int]:
        return {name: self.service(name).pid for name in SERVICES}

    def healthy(self) -> bool:
        if not http_ok(str(self.api.base_url.join("/healthz"))):
            return False
        return all(grpc_serving(address) for address in self.addresses.values())

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/v1/jobs/{job_id}").json()

    def phase(self, job_id: str) -> str | None:
        try:
            return self.job(job_id)["phase"]
        except (httpx.HTTPError, KeyError, ValueError):
            return None  # the control plane is restarting

    def kill_everything(self) -> None:
        """SIGKILL all five services at once, and wait until the supervisor has them serving again."""
        before = self.pids()
        for name in SERVICES:
            self.service(name).kill()
        until(lambda: self.replaced(before) and self.healthy(), 180, "every service restarted")

    def replaced(self, before: dict[str, int]) -> bool:
        """Whether each service named in `before` runs as a new process now."""
        try:
            return all(self.service(name).pid != pid for name, pid in before.items())
        except (LookupError, psutil.Error):
            return False


def until(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


@contextmanager
def stillhouse_up(home: Path, api_port: int) -> Iterator[Platform]:
    supervisor = subprocess.Popen(
        [*STILLHOUSE, "up", "--home", str(home), "--api-port", str(api_port)],
        env={**os.environ, **FAULT_TOLERANT_ENV},
        stdout=subprocess.DEVNULL,
        stderr=(home.parent / "up.log").open("w"),
        text=True,
        process_group=0,
    )
    try:
        endpoint_file = home / "endpoint.json"
        until(lambda: endpoint_file.exists() or supervisor.poll() is not None, 120, "stillhouse up")
        assert supervisor.poll() is None, (home.parent / "up.log").read_text()
        endpoint = json.loads(endpoint_file.read_text())
        token = Path(endpoint["tokenFile"]).read_text().strip()
        with httpx.Client(
            base_url=endpoint["apiUrl"], headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as api:
            yield Platform(home, supervisor, api, endpoint["services"])
    finally:
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGINT)
            try:
                supervisor.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(supervisor.pid, signal.SIGKILL)


def job_spec(fake: FakeOpenAI, seeds: Path, student: Path) -> dict:
    return {
        "metadata": {"name": "faults"},
        "spec": {
            "prompts": {
                "sources": [{"path": str(seeds)}],
                # The fake server's answers hold no usable instructions, so generation adds no prompt;
                # its calls keep the prompts stage busy in the server, where the test holds them.
                "generate": {"strategy": "self_instruct", "count": 4, "fewShot": 2},
                "seed": 3,
            },
            "teacher": {
                "backend": "openai",
                "baseURL": fake.base_url,
                "model": "fake-teacher",
                "sampling": {"temperature": 0.0, "maxTokens": 8},
                "topLogprobs": 0,
                "limits": {"maxConcurrency": 2, "timeoutSeconds": 5},
            },
            "student": {"init": {"pretrained": str(student)}},
            "training": {
                "loss": {"kind": "sft"},
                "epochs": 1,
                "learningRate": 1.0e-3,
                "batchTokens": 512,
                "maxSeqLen": 96,
                "workers": 1,
            },
            "evaluation": {"holdoutFraction": 0.2, "maxNewTokens": 4},
        },
    }


def prompts_in(home: Path, dataset: str) -> list[str]:
    """The prompt (the last message's text) of every row of a committed dataset, read with pyarrow."""
    manifest = home / "objects/stillhouse" / dataset / "manifest.json"
    assert manifest.is_file(), f"{dataset} was not committed"
    shards = sorted((home / "objects/stillhouse" / dataset).rglob("*.parquet"))
    tables = [pq.read_table(shard, columns=["messages"]) for shard in shards]
    return [messages[-1]["content"] for table in tables for messages in table.column(0).to_pylist()]


def calls_arrived(fake: FakeOpenAI, after: int) -> bool:
    return fake.calls()["completions"] > after


@pytest.mark.timeout(1500)
def test_a_job_survives_every_process_killed_at_every_stage(tmp_path: Path, free_port, tiny_llama) -> None:
    student = tiny_llama(tmp_path / "student", layers=1, hidden=32)
    home = tmp_path / "home"
    seeds = home / "inputs" / "seeds.jsonl"  # `stillhouse up` lets jobs read its inputs folder
    seeds.parent.mkdir(parents=True)
    seeds.write_text("".join(json.dumps({"prompt": seed}) + "\n" for seed in SEEDS))

    with running_fake_openai(tmp_path / "fake-openai.log") as fake, stillhouse_up(home, free_port()) as up:
        fake.control(**HOLD)
        response = up.api.post("/v1/jobs", json=job_spec(fake, seeds, student))
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]

        # 1. Prompts: its first generation calls wait in the server.
        until(lambda: up.phase(job_id) == "Prompts" and calls_arrived(fake, 0), 120, "generation calls")
        up.kill_everything()
        # Answers flow again, slowly enough for the test to see the teacher stage begin.
        fake.control(clear=True)
        fake.control(mode="slow", delay=0.3)

        # 2. Teacher: hold its calls, let the answered ones reach the cache, then kill.
        until(lambda: up.phase(job_id) == "Teacher", 300, "the teacher stage")
        fake.control(clear=True)
        fake.control(**HOLD)
        arrived = fake.calls()["completions"]
        until(lambda: calls_arrived(fake, arrived), 60, "held teacher calls")
        time.sleep(1.0)  # answers sent before the hold are cached within 50 ms
        assert up.phase(job_id) == "Teacher"
        up.kill_everything()
        # The restarted teacher stage waits in the server again; now its service stops answering.
        arrived = fake.calls()["completions"]
        until(lambda: calls_arrived(fake, arrived), 120, "the re-attached teacher stage's calls")
        # The supervisor watches a service's health once it has seen it start (it checks every second).
        time.sleep(2.0)
        stopped = up.service("teacher")
        stopped.suspend()
        until(lambda: up.replaced({"teacher": stopped.pid}), 60, "the stopped teacher to be replaced")
        until(up.healthy, 120, "the teacher service to serve again")
        fake.control(clear=True)

        # 3. Training and 4. evaluation.
        until(lambda: up.phase(job_id) == "Training", 300, "the training stage")
        up.kill_everything()
        until(lambda: up.phase(job_id) == "Evaluating", 600, "the evaluation stage")
        up.kill_everything()

        final = until(
            lambda: (phase := up.phase(job_id)) in {"Succeeded", "Failed", "Cancelled"} and phase,
            600,
            "the job to end",
            interval=1.0,
        )
        job = up.job(job_id)
        answered = Counter(fake.calls()["answered_by_prompt"])

    assert final == "Succeeded", f"{job['message']}\n{(tmp_path / 'up.log').read_text()}"
    # Each stage re-attached under its first operation id: no step was started over as a new attempt.
    assert [(step["stage"], step["attempt"]) for step in job["steps"]] == [
        ("prompts", 1),
        ("teacher", 1),
        ("train", 1),
        ("evaluate", 1),
    ]
    output = (tmp_path / "up.log").read_text()
    for name in SERVICES:
        assert output.count(f"{name} exited unexpectedly (code -9)") >= 4, output
    assert "teacher did not answer 3 health checks in a row: killing it" in output

    # The datasets hold every prompt once: none lost, none repeated.
    prefix = f"jobs/{job_id}"
    train = prompts_in(home, f"{prefix}/prompts/train")
    holdout = prompts_in(home, f"{prefix}/prompts/holdout")
    assert sorted(train + holdout) == sorted(SEEDS)
    assert sorted(prompts_in(home, f"{prefix}/teacher/answers")) == sorted(train)
    assert sorted(prompts_in(home, f"{prefix}/teacher/holdout")) == sorted(holdout)
    # ...and the server answered each prompt, and each generation request, exactly once.
    assert {prompt: answered[prompt] for prompt in SEEDS} == dict.fromkeys(SEEDS, 1)
    assert [prompt for prompt, count in answered.items() if count > 1] == []
