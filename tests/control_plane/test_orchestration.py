"""A job driven through its stages over real gRPC, by a real control plane process that may be killed."""

from __future__ import annotations

import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse
from scripted_jobs import MINIMAL_JOB, STAGE_RPCS, start_stages, submit, wait_for_phase
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.long


@pytest.fixture
def checking_trainer(processes, free_port, wait_until, grpc_ready, tmp_path) -> str:
    """The address of scripted stage services that only the trainer's submit-time check is asked of."""
    stages = start_stages(processes, free_port(), tmp_path / "checks.jsonl", 0.1)
    wait_until(lambda: grpc_ready(stages.address), 20, "the scripted stage services")
    return stages.address


@pytest.fixture
def platform(processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path, request):
    """Scripted stage services plus a control plane using them. Parametrize with (seconds, fail_rpc)."""
    seconds, fail_rpc = getattr(request, "param", (0.5, ""))
    stages = start_stages(processes, free_port(), tmp_path / "journal.jsonl", seconds, fail_rpc)
    wait_until(lambda: grpc_ready(stages.address), 20, "the scripted stage services")
    control_plane = control_plane_at(
        {name: stages.address for name in ("prompts", "teacher", "trainer", "storage")}
    )
    control_plane.start()
    return control_plane, stages


def test_job_runs_every_stage_once_and_passes_results_on(platform, wait_until):
    control_plane, stages = platform
    with control_plane.client() as client:
        job_id = submit(client)
        assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}) == "Succeeded"
        job = client.get(f"/v1/jobs/{job_id}").json()

    assert [step["stage"] for step in job["steps"]] == ["prompts", "teacher", "train", "evaluate"]
    assert all(step["state"] == "succeeded" and step["finishedAt"] for step in job["steps"])
    assert job["steps"][3]["result"]["recovery_percent"] == 87.5
    summary = job["summary"]
    assert summary["evaluation"]["recoveryPercent"] == 87.5
    assert summary["evaluation"]["gapClosed"] == {"kl": 87.5, "top1_agreement": 60.0}
    assert summary["evaluation"]["unigram"] == {"kl": 5.0, "top1_agreement": 0.06}
    assert summary["evaluation"]["uniform"] == {"kl": 9.0}
    assert summary["evaluation"]["controlSft"] is None  # no control was listed
    assert summary["evaluation"]["samples"] == [
        {
            "promptId": "p-1",
            "prompt": "Why is the sky blue?",
            "teacher": "Rayleigh.",
            "baseline": "",
            "student": "Light.",
            "controlSft": None,
        }
    ]
    assert summary["prompts"]["train"] == 90
    assert summary["cost"] == {"teacherUsd": 0.0, "generationUsd": 0.25, "totalUsd": 0.25, "gpuHours": 0.0}
    assert summary["artifacts"] == {"student": f"jobs/{job_id}/train/student"}
    for rpc in STAGE_RPCS:
        assert len(stages.new_starts(rpc)) == 1, rpc


def test_events_stream_phases_in_order_and_resume_after_last_event_id(platform, wait_until):
    control_plane, _ = platform
    with control_plane.client() as client:
        job_id = submit(client)
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", timeout=60) as source:
            events = [(int(event.id), event.event, json.loads(event.data)) for event in source.iter_sse()]
        # The stream ended by itself after the final phase.
        phases = [data["phase"] for _, kind, data in events if kind == "phase"]
        assert phases == ["Pending", "Prompts", "Teacher", "Training", "Evaluating", "Succeeded"]
        progress = [data for _, kind, data in events if kind == "progress"]
        assert {item["stage"] for item in progress} == {"prompts", "teacher", "train", "evaluate"}
        last_of_stage = {item["stage"]: item for item in progress}
        assert all(item["done"] == item["total"] == 10 for item in last_of_stage.values())
        assert all(item["state"] == "succeeded" for item in last_of_stage.values())

        middle = events[len(events) // 2][0]
        headers = {"Last-Event-ID": str(middle)}
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
            replayed = [int(event.id) for event in source.iter_sse()]
        assert replayed == [event_id for event_id, _, _ in events if event_id > middle]


@pytest.mark.parametrize("platform", [(3.0, "")], indirect=True)
def test_killed_control_plane_continues_the_job_after_restart(platform, wait_until):
    control_plane, stages = platform
    with control_plane.client() as client:
        job_id = submit(client)
        wait_for_phase(wait_until, client, job_id, {"Teacher"})
        wait_until(lambda: stages.new_starts("AnswerPrompts"), 10, "the teacher stage to start")

    control_plane.kill()
    before_restart = len(stages.journal())
    control_plane.start()

    with control_plane.client() as client:
        assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}, timeout=90) == "Succeeded"
        job = client.get(f"/v1/jobs/{job_id}").json()

    after_restart = stages.journal()[before_restart:]
    # The finished prompts stage was not asked again; the running teacher stage was re-attached by id.
    assert not [entry for entry in after_restart if entry.get("rpc") == "GeneratePrompts"]
    reattached = [entry for entry in after_restart if entry.get("rpc") == "AnswerPrompts"]
    assert reattached and not any(entry["new"] for entry in reattached)
    for rpc in STAGE_RPCS:
        assert len(stages.new_starts(rpc)) == 1, f"{rpc} ran {len(stages.new_starts(rpc))} times"
    assert [step["attempt"] for step in job["steps"]] == [1, 1, 1, 1]


@pytest.mark.parametrize("platform", [(5.0, "")], indirect=True)
def test_cancel_stops_the_running_operation_in_its_service(platform, wait_until):
    control_plane, stages = platform
    with control_plane.client() as client:
        job_id = submit(client)
        wait_for_phase(wait_until, client, job_id, {"Prompts"})
        wait_until(lambda: stages.new_starts("GeneratePrompts"), 10, "the prompts stage to start")
        response = client.post(f"/v1/jobs/{job_id}:cancel")
        assert response.status_code == 202
        assert response.json()["cancelRequested"] is True
        assert wait_for_phase(wait_until, client, job_id, {"Cancelled", "Failed", "Succeeded"}) == "Cancelled"
        again = client.post(f"/v1/jobs/{job_id}:cancel")
        job = client.get(f"/v1/jobs/{job_id}").json()

    assert again.status_code == 409
    assert {"cancelled": stages.new_starts("GeneratePrompts")[0]} in stages.journal()
    assert job["steps"][0]["state"] == "cancelled"
    assert not stages.new_starts("AnswerPrompts")


@pytest.mark.parametrize("platform", [(0.3, "TrainStudent")], indirect=True)
def test_a_failed_stage_fails_the_job_with_its_cause(platform, wait_until):
    control_plane, stages = platform
    with control_plane.client() as client:
        job_id = submit(client)
        assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}) == "Failed"
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["message"] == "trainer service: FAILED_PRECONDITION: scripted failure"
    assert [step["state"] for step in job["steps"]] == ["succeeded", "succeeded", "failed"]
    assert not stages.new_starts("EvaluateStudent")


def test_a_job_outlasts_a_database_outage_longer_than_the_stores_retries(
    processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path, postgres_database_url
):
    stages = start_stages(processes, free_port(), tmp_path / "journal.jsonl", 1.0)
    wait_until(lambda: grpc_ready(stages.address), 20, "the scripted stage services")
    # The control plane reaches PostgreSQL through a proxy, cut for longer than its store retries (1 s).
    database = make_url(postgres_database_url)
    with TcpProxy(database.host or "127.0.0.1", database.port or 5432) as network:
        proxied = database.set(port=network.port).render_as_string(hide_password=False)
        control_plane = control_plane_at(
            {name: stages.address for name in ("prompts", "teacher", "trainer", "storage")},
            STILLHOUSE_CONTROL_PLANE_DATABASE_URL=proxied,
            STILLHOUSE_CONTROL_PLANE_DATABASE_RETRY_SECONDS="1",
        )
        control_plane.start()
        with control_plane.client() as client:
            job_id = submit(client)
            wait_for_phase(wait_until, client, job_id, {"Teacher"})
            network.cut()
            wait_until(lambda: "database stayed unavailable" in control_plane.log, 30, "the store to give up")
            # Meanwhile the API answers 503 and when to try again, not a 500.
            during = client.get(f"/v1/jobs/{job_id}")
            assert during.status_code == 503, during.text
            assert during.headers["Retry-After"] == "10"
            assert during.json()["message"].startswith("the job store is unavailable: ")
            network.heal()
            assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}) == "Succeeded"
            job = client.get(f"/v1/jobs/{job_id}").json()

    assert network.dropped_connections > 0
    assert "job store unavailable; driving the job on after a pause" in control_plane.log
    assert [step["attempt"] for step in job["steps"]] == [1, 1, 1, 1]
    for rpc in STAGE_RPCS:
        assert len(stages.new_starts(rpc)) == 1, rpc


def test_a_real_stage_failure_reaches_the_job_with_its_cause(
    processes, free_port, control_plane_at, wait_until, grpc_ready, tmp_path, checking_trainer
):
    port = free_port()
    processes.start(
        "prompts",
        [sys.executable, "-m", "stillhouse.cli.main", "serve", "prompts", "--port", str(port)],
        {
            "STILLHOUSE_HOME": str(tmp_path / "home"),
            "STILLHOUSE_PROMPTS_INPUT_ROOTS": json.dumps([str(tmp_path)]),
        },
    )
    wait_until(lambda: grpc_ready(f"127.0.0.1:{port}"), 20, "the prompts service")
    control_plane = control_plane_at(
        {"prompts": f"127.0.0.1:{port}", "trainer": checking_trainer},
        STILLHOUSE_CONTROL_PLANE_INPUT_ROOTS=json.dumps([str(tmp_path)]),
    )
    control_plane.start()
    missing = tmp_path / "seeds.jsonl"
    job = {"spec": {**MINIMAL_JOB["spec"], "prompts": {"sources": [{"path": str(missing)}]}}}
    with control_plane.client() as client:
        job_id = submit(client, job)
        assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}) == "Failed"
        message = client.get(f"/v1/jobs/{job_id}").json()["message"]
    assert message.startswith("prompts service: FAILED_PRECONDITION:"), message
    assert str(missing) in message


def test_unreachable_service_fails_the_job_after_the_configured_patience(
    control_plane_at, free_port, wait_until, checking_trainer
):
    nowhere = f"127.0.0.1:{free_port()}"
    control_plane = control_plane_at(
        {"prompts": nowhere, "trainer": checking_trainer},
        STILLHOUSE_CONTROL_PLANE_SERVICE_UNAVAILABLE_TIMEOUT_SECONDS="2",
    )
    control_plane.start()
    with control_plane.client() as client:
        job_id = submit(client)
        assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}, timeout=30) == "Failed"
        message = client.get(f"/v1/jobs/{job_id}").json()["message"]
    assert message.startswith("prompts service unreachable for 2 s: UNAVAILABLE")


def stalling_platform(
    processes, free_port, wait_until, grpc_ready, control_plane_at, journal: Path, patience: str
):
    """Scripted stages that take 4 s each, and a control plane with short deadlines: a
    Start gets 2 s, a silent progress stream 6 s (a little over the services' 5 s heartbeat)."""
    stages = start_stages(processes, free_port(), journal, 4.0)
    wait_until(lambda: grpc_ready(stages.address), 20, "the scripted stage services")
    control_plane = control_plane_at(
        {name: stages.address for name in ("prompts", "teacher", "trainer", "storage")},
        STILLHOUSE_CONTROL_PLANE_SERVICE_UNAVAILABLE_TIMEOUT_SECONDS=patience,
        STILLHOUSE_CONTROL_PLANE_SERVICE_CALL_TIMEOUT_SECONDS="2",
        STILLHOUSE_CONTROL_PLANE_WATCH_IDLE_TIMEOUT_SECONDS="6",
    )
    control_plane.start()
    return control_plane, stages


@pytest.mark.timeout(120)
def test_a_stalled_service_fails_the_job_within_the_bound_naming_it(
    processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path
):
    control_plane, stages = stalling_platform(
        processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path / "journal.jsonl", "8"
    )
    with control_plane.client() as client:
        job_id = submit(client)
        wait_until(lambda: stages.new_starts("AnswerPrompts"), 60, "the teacher stage to start")
        # A stopped process keeps its connections open: only a deadline or a silence tells.
        processes.running["stages"].send_signal(signal.SIGSTOP)
        try:
            # 6 s of silence, then at most 8 s of failing re-attaches (plus the wait's own polling).
            assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}, timeout=40) == "Failed"
        finally:
            processes.running["stages"].send_signal(signal.SIGCONT)
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["message"].startswith("teacher service "), job["message"]
    assert "8 s" in job["message"] and "service_unavailable_timeout_seconds" in job["message"]
    assert [step["state"] for step in job["steps"]] == ["succeeded", "failed"]


@pytest.mark.timeout(120)
def test_a_service_that_resumes_within_the_bound_is_re_attached(
    processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path
):
    control_plane, stages = stalling_platform(
        processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path / "journal.jsonl", "120"
    )
    with control_plane.client() as client:
        job_id = submit(client)
        wait_until(lambda: stages.new_starts("AnswerPrompts"), 60, "the teacher stage to start")
        processes.running["stages"].send_signal(signal.SIGSTOP)
        before = len(stages.journal())
        time.sleep(8)  # past the 6 s idle bound: the control plane gives the stream up and re-attaches
        processes.running["stages"].send_signal(signal.SIGCONT)
        assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}, timeout=90) == "Succeeded"
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", timeout=60) as source:
            progress = [json.loads(event.data) for event in source.iter_sse() if event.event == "progress"]
    # Heartbeats and the re-attach repeat what the service said last: the job's events do not.
    repeats = [later for earlier, later in pairwise(progress) if later == earlier]
    assert repeats == []
    reattached = [entry for entry in stages.journal()[before:] if entry.get("rpc") == "AnswerPrompts"]
    assert reattached and not any(entry["new"] for entry in reattached)
    for rpc in STAGE_RPCS:
        assert len(stages.new_starts(rpc)) == 1, f"{rpc} ran {len(stages.new_starts(rpc))} times"


@pytest.mark.timeout(120)
def test_an_estimate_whose_service_stalls_is_re_attached_as_a_job_is(
    processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path
):
    control_plane, stages = stalling_platform(
        processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path / "journal.jsonl", "120"
    )
    with control_plane.client() as client, ThreadPoolExecutor(1) as background:
        estimating = background.submit(client.post, "/v1/jobs:estimate", json=MINIMAL_JOB, timeout=90)
        wait_until(lambda: stages.new_starts("GeneratePrompts"), 60, "the estimate's prompts to start")
        processes.running["stages"].send_signal(signal.SIGSTOP)
        before = len(stages.journal())
        time.sleep(8)  # past the 6 s idle bound: the control plane gives the stream up and re-attaches
        processes.running["stages"].send_signal(signal.SIGCONT)
        response = estimating.result()
    assert response.status_code == 200, response.text
    assert response.json()["prompts"]["train"] == 90
    reattached = [entry for entry in stages.journal()[before:] if entry.get("rpc") == "GeneratePrompts"]
    assert reattached and not any(entry["new"] for entry in reattached)
    assert len(stages.new_starts("GeneratePrompts")) == 1


def test_estimate_builds_the_prompts_and_prices_them_without_running_the_job(platform):
    control_plane, stages = platform
    with control_plane.client() as client:
        response = client.post("/v1/jobs:estimate", json=MINIMAL_JOB, timeout=60)
        assert response.status_code == 200, response.text
        estimate = response.json()
        again = client.post("/v1/jobs:estimate", json=MINIMAL_JOB, timeout=60).json()
        assert client.get("/v1/jobs").json()["jobs"] == []

    assert estimate["prompts"] == {
        "train": 90,
        "holdout": 10,
        "collected": 100,
        "removedByRule": {"exact_duplicate": 3},
        "shortfall": 0,
        "warnings": [],
    }
    # Train and holdout are both priced: 100 rows at one cent, plus what generating the prompts cost.
    assert estimate["teacher"] == {
        "requests": 100,
        "promptTokens": 2000,
        "completionTokens": 6400,
        "costUsd": pytest.approx(1.0),
    }
    assert estimate["generation"]["requests"] == 4
    assert estimate["totalUsd"] == pytest.approx(1.25)
    # Each estimate is its own: it builds its prompts, prices them, then deletes them.
    assert again["estimateId"] != estimate["estimateId"]
    assert again["prompts"] == estimate["prompts"] and again["totalUsd"] == estimate["totalUsd"]
    assert len(stages.new_starts("GeneratePrompts")) == 2
    assert stages.new_starts("AnswerPrompts") == []
    ids = [estimate["estimateId"], again["estimateId"]]
    after_pricing = [
        (entry["rpc"], entry.get("dataset_id") or entry["prefix"])
        for entry in stages.journal()
        if entry.get("rpc") in ("EstimateCost", "DeletePrefix")
    ]
    assert after_pricing[2::3] == [("DeletePrefix", f"jobs/{estimate_id}/") for estimate_id in ids]
    assert sorted(after_pricing[0:2] + after_pricing[3:5]) == sorted(
        ("EstimateCost", f"jobs/{estimate_id}/prompts/{part}")
        for estimate_id in ids
        for part in ("train", "holdout")
    )


@pytest.fixture
def slow_platform(processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path):
    """Scripted stages that take a minute each, behind a control plane that gives an estimate the
    deadline asked for."""

    def start(estimate_deadline: float):
        stages = start_stages(processes, free_port(), tmp_path / "journal.jsonl", 60)
        wait_until(lambda: grpc_ready(stages.address), 20, "the scripted stage services")
        control_plane = control_plane_at(
            {name: stages.address for name in ("prompts", "teacher", "trainer", "storage")},
            STILLHOUSE_CONTROL_PLANE_ESTIMATE_TIMEOUT_SECONDS=str(estimate_deadline),
        )
        control_plane.start()
        return control_plane, stages

    return start


def test_an_estimate_past_its_deadline_is_stopped_in_the_service(slow_platform, wait_until):
    control_plane, stages = slow_platform(estimate_deadline=2)
    with control_plane.client() as client:
        response = client.post("/v1/jobs:estimate", json=MINIMAL_JOB, timeout=60)
    assert response.status_code == 504, response.text
    assert "longer than 2 s and was stopped" in response.json()["message"]
    [operation] = stages.new_starts("GeneratePrompts")
    wait_until(lambda: {"cancelled": operation} in stages.journal(), 10, "the prompts operation cancelled")
    # Stopped first, then its datasets deleted: nothing is left behind, nor written after.
    estimate_id = operation.removesuffix(".prompts.1")
    cleaned = {"rpc": "DeletePrefix", "prefix": f"jobs/{estimate_id}/"}
    wait_until(lambda: cleaned in stages.journal(), 10, "the estimate's datasets deleted")
    assert stages.journal().index({"cancelled": operation}) < stages.journal().index(cleaned)


def test_an_estimate_whose_caller_goes_away_is_stopped_in_the_service(slow_platform, wait_until):
    control_plane, stages = slow_platform(estimate_deadline=600)
    with control_plane.client() as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/jobs:estimate", json=MINIMAL_JOB, timeout=httpx.Timeout(5, read=2))
    wait_until(lambda: stages.new_starts("GeneratePrompts"), 10, "the estimate's prompts operation")
    [operation] = stages.new_starts("GeneratePrompts")
    wait_until(lambda: {"cancelled": operation} in stages.journal(), 10, "the prompts operation cancelled")
    cleaned = {"rpc": "DeletePrefix", "prefix": f"jobs/{operation.removesuffix('.prompts.1')}/"}
    wait_until(lambda: cleaned in stages.journal(), 10, "the estimate's datasets deleted")


def test_estimate_and_submit_refuse_a_bad_spec_and_an_unreachable_trainer(control_plane_at, free_port):
    control_plane = control_plane_at(
        {name: f"127.0.0.1:{free_port()}" for name in ("prompts", "teacher", "trainer", "storage")}
    )
    control_plane.start()
    with control_plane.client() as client:
        bad = client.post("/v1/jobs:estimate", json={"spec": {"teacher": {"backend": "local"}}})
        assert bad.status_code == 422
        assert any(error["field"] == "spec.teacher.model" for error in bad.json()["errors"])
        down = client.post("/v1/jobs:estimate", json=MINIMAL_JOB, timeout=60)
        assert down.status_code == 503, down.text
        assert "trainer service could not check the job (UNAVAILABLE" in down.json()["message"]
        refused = client.post("/v1/jobs", json=MINIMAL_JOB)
        assert refused.status_code == 503, refused.text
        assert "nothing was started" in refused.json()["message"]
        assert client.get("/v1/jobs").json()["jobs"] == []


def test_estimate_names_an_unreachable_stage_service(control_plane_at, free_port, checking_trainer):
    control_plane = control_plane_at(
        {
            **{name: f"127.0.0.1:{free_port()}" for name in ("prompts", "teacher", "storage")},
            "trainer": checking_trainer,
        }
    )
    control_plane.start()
    with control_plane.client() as client:
        down = client.post("/v1/jobs:estimate", json=MINIMAL_JOB, timeout=60)
    assert down.status_code == 503, down.text
    assert "prompts service: UNAVAILABLE" in down.json()["message"]


def test_a_control_plane_with_another_service_token_is_refused_by_the_services(
    control_plane_at, checking_trainer, tmp_path
):
    other_token = tmp_path / "other-service-token"
    other_token.write_text("another-service-token-" + "e" * 32 + "\n")
    control_plane = control_plane_at(
        {"trainer": checking_trainer}, STILLHOUSE_CONTROL_PLANE_SERVICE_TOKEN_FILE=str(other_token)
    )
    control_plane.start()
    with control_plane.client() as client:
        response = client.post("/v1/jobs", json=MINIMAL_JOB)
    assert response.status_code == 503
    assert (
        "trainer service could not check the job (UNAUTHENTICATED: the service token sent"
        in (response.json()["message"])
    )
    assert "e" * 32 not in control_plane.log
