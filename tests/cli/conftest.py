"""A small but real HTTP server that answers like the Stillhouse jobs API, for testing the CLI against."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from stillhouse.common.api_models import EstimateView, GenerationCost, PromptsEstimate, TeacherCost

TOKEN = "s3cret-test-token-never-printed"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job(job_id: str, phase: str = "Pending", **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "name": f"name-of-{job_id}",
        "phase": phase,
        "message": None,
        "cancelRequested": False,
        "createdAt": "2025-01-01T00:00:00Z",
        "updatedAt": "2025-01-01T00:00:05Z",
        "labels": {},
        "tenant": "default",
        "owner": None,
        "spec": {},
        "steps": [],
        **extra,
    }


# Scripted event streams: job id -> events as (type, data). Ids are their 1-based positions.
STREAMS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "job-ok": [
        ("phase", {"phase": "Pending", "message": None}),
        ("phase", {"phase": "Prompts", "message": None}),
        ("progress", {"stage": "prompts", "unit": "prompts", "done": 5, "total": 10, "message": "dedup"}),
        ("progress", {"stage": "prompts", "unit": "prompts", "done": 10, "total": 10, "message": "done"}),
        ("phase", {"phase": "Succeeded", "message": "student recovers 91% of the teacher"}),
    ],
    "job-fail": [
        ("phase", {"phase": "Teacher", "message": None}),
        ("error", {"message": "teacher unreachable"}),
        ("phase", {"phase": "Failed", "message": "teacher unreachable"}),
    ],
    "job-cancel": [
        ("phase", {"phase": "Training", "message": None}),
        ("phase", {"phase": "Cancelled", "message": "cancelled by request"}),
    ],
}
# Streams that the server drops after `DROP_AFTER` events (on the first connection only).
DROPPED = {"job-drop": "job-ok"}
DROP_AFTER = 2
# Streams that stay open without a terminal phase after their events.
HANGING = {"job-running": STREAMS["job-ok"][:3]}


@dataclass
class FakeApi:
    url: str
    token: str = TOKEN
    requests: list[dict[str, Any]] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)


def build_app(state: FakeApi) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        state.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": dict(request.query_params),
                "headers": dict(request.headers),
                "body": await request.body(),
            }
        )
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"message": "missing or invalid bearer token"}, status_code=401)
        return await call_next(request)

    @app.post("/v1/jobs")
    async def submit(request: Request) -> JSONResponse:
        body = await request.body()
        if b"epochs: 0" in body or b'"epochs": 0' in body:
            errors = [
                {"field": "spec.training.epochs", "message": "Input should be greater than 0", "type": "gt"},
                {"field": "spec.bogus", "message": "Extra inputs are not permitted", "type": "extra"},
            ]
            return JSONResponse({"message": "invalid DistillationJob", "errors": errors}, status_code=422)
        return JSONResponse(job("job-new"), status_code=201)

    @app.post("/v1/jobs:estimate")
    async def estimate() -> JSONResponse:
        view = EstimateView(
            estimate_id="estimate-1",
            prompts=PromptsEstimate(
                train=1800,
                holdout=40,
                collected=2000,
                removed_by_rule={"near_duplicate": 160},
                shortfall=0,
                warnings=[],
            ),
            teacher=TeacherCost(requests=1840, prompt_tokens=92000, completion_tokens=942080, cost_usd=1.04),
            generation=GenerationCost(
                requests=25, cached_requests=5, prompt_tokens=9000, completion_tokens=6000, cost_usd=0.02
            ),
            total_usd=1.06,
        )
        return JSONResponse(view.model_dump(mode="json"))

    @app.get("/v1/jobs")
    async def list_jobs(request: Request) -> JSONResponse:
        phase = request.query_params.get("phase")
        if request.query_params.get("pageToken") == "page-2":
            return JSONResponse(
                {"jobs": [job("job-old", "Failed", message="out of budget")], "nextPageToken": None}
            )
        jobs = [job("job-ok", "Succeeded"), job("job-running", "Teacher")]
        if phase:
            return JSONResponse({"jobs": [j for j in jobs if j["phase"] == phase], "nextPageToken": None})
        return JSONResponse({"jobs": jobs, "nextPageToken": "page-2"})

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        if job_id != "job-running":
            return JSONResponse({"message": f"job {job_id} not found"}, status_code=404)
        step = {
            "stage": "prompts",
            "operationId": "op-123",
            "state": "succeeded",
            "attempt": 1,
            "result": {"prompts": 10, "dataset": {"uri": "x"}},
            "error": None,
            "startedAt": "2025-01-01T00:00:00Z",
            "finishedAt": "2025-01-01T00:01:30Z",
        }
        return JSONResponse(job("job-running", "Teacher", steps=[step]))

    @app.post("/v1/jobs/{job_id}:cancel")
    async def cancel(job_id: str) -> JSONResponse:
        if job_id == "job-ok":
            return JSONResponse({"message": "job job-ok has already ended (Succeeded)"}, status_code=409)
        if job_id != "job-running":
            return JSONResponse({"message": f"job {job_id} not found"}, status_code=404)
        return JSONResponse(job("job-running", "Teacher", cancelRequested=True), status_code=202)

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> Any:
        after = int(request.headers.get("last-event-id") or 0)
        hang = job_id in HANGING
        script = HANGING.get(job_id) or STREAMS.get(DROPPED.get(job_id, job_id))
        if script is None:
            return JSONResponse({"message": f"job {job_id} not found"}, status_code=404)
        drop = job_id in DROPPED and job_id not in state.dropped
        state.dropped.add(job_id)

        async def stream():
            for number, (kind, data) in enumerate(script, start=1):
                if number <= after:
                    continue
                if drop and number > DROP_AFTER:
                    return
                # A keep-alive ping between events, as the real API sends one every 15 s.
                yield ": ping\n\n"
                yield f"id: {number}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            if hang:
                await asyncio.sleep(3600)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeApi]:
    port = free_port()
    state = FakeApi(url=f"http://127.0.0.1:{port}")
    config = uvicorn.Config(
        build_app(state), host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test API server did not start"
        time.sleep(0.02)
    yield state
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def api(fake_api: FakeApi) -> FakeApi:
    fake_api.requests.clear()
    return fake_api
