"""Metrics on a port of their own: a real control plane process serves them there without a token, while
its API port still refuses `/metrics` without one; and every metric the chart's alerts and Grafana
dashboard query exists in the real registries of the control plane and of each stage service (or is one
of Ray's, listed in `monitoring_queries.RAY_METRICS`)."""

from __future__ import annotations

import sys

import httpx
import pytest
from monitoring_queries import RAY_METRICS, exposed_metric_names, metric_samples, queried_metric_names

JOB = {
    "spec": {
        "teacher": {"backend": "local", "model": "smollm2"},
        "student": {"init": {"pruneTeacherDepth": 2}},
    }
}
STAGES = ["prompts", "teacher", "train", "evaluate"]
STAGE_SERVICES = ["prompts", "teacher", "storage", "trainer"]


@pytest.fixture
def control_plane(start_api, free_port):
    """A control plane with scripted stages that run jobs through, and its metrics URL."""
    metrics_port = free_port()
    api = start_api(every_stage=True, STILLHOUSE_CONTROL_PLANE_METRICS_PORT=str(metrics_port))
    return api, f"http://127.0.0.1:{metrics_port}/metrics"


def run_a_job(api, wait_until) -> None:
    with api.client() as client:
        response = client.post("/v1/jobs", json=JOB)
        assert response.status_code == 201, response.text
        job = f"/v1/jobs/{response.json()['id']}"
        wait_until(lambda: client.get(job).json()["phase"] == "Succeeded", 60, "the job to succeed")


def test_the_metrics_port_needs_no_token_and_the_api_port_still_does(control_plane, wait_until) -> None:
    api, metrics_url = control_plane
    run_a_job(api, wait_until)

    anonymous = httpx.get(metrics_url, timeout=10)
    assert anonymous.status_code == 200
    assert anonymous.headers["content-type"].startswith("text/plain")
    recorded = metric_samples(anonymous.text)
    for phase in ["Pending", "Prompts", "Teacher", "Training", "Evaluating", "Succeeded"]:
        labels = frozenset({"tenant": "default", "phase": phase}.items())
        assert recorded[("stillhouse_job_phase_transitions_total", labels)] == 1, phase
    for stage in STAGES:
        finished = frozenset({"stage": stage, "outcome": "succeeded"}.items())
        assert recorded[("stillhouse_stage_duration_seconds_count", finished)] == 1, stage
        assert recorded[("stillhouse_stage_progress_events_total", frozenset({"stage": stage}.items()))] >= 1
        assert recorded[("stillhouse_stages_running", frozenset({"stage": stage}.items()))] == 0

    refused = httpx.get(f"{api.url}/metrics", timeout=10)
    assert refused.status_code == 401
    assert "stillhouse_" not in refused.text
    with api.client() as client:
        assert client.get("/metrics").status_code == 200


def stage_service_expositions(processes, free_port, wait_until, grpc_ready) -> list[str]:
    """/metrics of each stage service, run for real (`stillhouse serve <service> --metrics-port`)."""
    started = {}
    for service in STAGE_SERVICES:
        port, metrics_port = free_port(), free_port()
        argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", service]
        process = processes.start(service, [*argv, "--port", str(port), "--metrics-port", str(metrics_port)])
        started[service] = (process, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    expositions = []
    for service, (process, address, metrics_url) in started.items():

        def up(process=process, address=address) -> bool:
            return grpc_ready(address) or process.poll() is not None

        wait_until(up, 60, f"the {service} service")
        assert process.poll() is None, processes.log(service)
        expositions.append(httpx.get(metrics_url, timeout=10).text)
    return expositions


def test_every_metric_the_alerts_and_dashboard_query_exists(
    control_plane, wait_until, processes, free_port, grpc_ready
) -> None:
    api, metrics_url = control_plane
    run_a_job(api, wait_until)
    exposed = exposed_metric_names(httpx.get(metrics_url, timeout=10).text)
    for exposition in stage_service_expositions(processes, free_port, wait_until, grpc_ready):
        exposed |= exposed_metric_names(exposition)

    queried = queried_metric_names()
    ours = {name for name in queried if name.startswith("stillhouse_")}
    assert ours, "the chart queries no Stillhouse metric"
    assert ours <= exposed, f"queried but no process has them: {sorted(ours - exposed)}"
    assert queried - ours == RAY_METRICS
