"""The job store on an empty database (every store test runs on SQLite and on PostgreSQL), and a control
plane process to send requests to."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stillhouse.control_plane.store import JobStore

SCRIPTED_STAGES = Path(__file__).with_name("scripted_stages.py")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[JobStore]:
    """A migrated job store on an empty database."""
    job_store = await JobStore.open(database_url)
    try:
        yield job_store
    finally:
        await job_store.close()


@pytest.fixture
def start_api(control_plane_at, free_port, processes, grpc_ready, wait_until, tmp_path):
    """Start a control plane process whose stage services are scripted; local inputs may come from
    `tmp_path/inputs`. With `every_stage`, the scripted process serves Prompts and Teacher as well, so
    jobs and estimates run through (in no time); otherwise only the trainer (its submit-time check finds
    nothing) and jobs wait in Prompts, retrying. `extra_env` goes to the control plane's environment."""

    def start(*, every_stage: bool = False, **extra_env: str):
        scripted = f"127.0.0.1:{free_port()}"
        processes.start(
            "stages", [sys.executable, str(SCRIPTED_STAGES), scripted.split(":")[1], str(tmp_path / "j"), "0"]
        )
        wait_until(lambda: grpc_ready(scripted), 20, "the scripted stage services")
        services = {
            name: scripted if every_stage else f"127.0.0.1:{free_port()}" for name in ("prompts", "teacher")
        }
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        control_plane = control_plane_at(
            {**services, "trainer": scripted},
            STILLHOUSE_CONTROL_PLANE_INPUT_ROOTS=json.dumps([str(inputs)]),
            **extra_env,
        )
        control_plane.start()
        return control_plane

    return start


@pytest.fixture
def api(start_api):
    """A control plane process whose trainer is scripted, the other stages absent."""
    return start_api()
