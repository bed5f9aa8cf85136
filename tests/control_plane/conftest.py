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
def api(control_plane_at, free_port, processes, grpc_ready, wait_until, tmp_path):
    """A control plane process whose trainer is scripted; local inputs may come from `tmp_path/inputs`."""
    # The stage services are absent: jobs wait in Prompts, retrying, which is all these tests need. The
    # trainer's submit-time check is scripted to find nothing.
    trainer = f"127.0.0.1:{free_port()}"
    processes.start(
        "stages", [sys.executable, str(SCRIPTED_STAGES), trainer.split(":")[1], str(tmp_path / "j"), "0"]
    )
    wait_until(lambda: grpc_ready(trainer), 20, "the scripted stage services")
    services = {name: f"127.0.0.1:{free_port()}" for name in ("prompts", "teacher")}
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    control_plane = control_plane_at(
        {**services, "trainer": trainer}, STILLHOUSE_CONTROL_PLANE_INPUT_ROOTS=json.dumps([str(inputs)])
    )
    control_plane.start()
    return control_plane
