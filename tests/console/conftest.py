"""For the console's tests: a control plane with principals of two tenants and an admin, and a page in a
headless Chromium of each test's own (`console_browser`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from console_browser import BrowserProblems, console_browser
from console_principals import PRINCIPALS, ConsolePlatform
from playwright.sync_api import Page

SCRIPTED_STAGES = Path(__file__).resolve().parents[1] / "control_plane" / "scripted_stages.py"


@pytest.fixture
def start_console_platform(control_plane_at, free_port, processes, grpc_ready, wait_until, tmp_path):
    """Start a control plane with the principals of `console_principals` and scripted stage services
    that take `stage_seconds` each (`tests/control_plane/scripted_stages.py`). With `every_stage`, they
    serve Prompts and Teacher too, so jobs and estimates run through; otherwise only the trainer (its
    submit-time check passes) and a job waits in Prompts until it is cancelled. The `failing_rpc` (such
    as "TrainStudent") fails."""

    def start(
        *, every_stage: bool = False, stage_seconds: float = 0, failing_rpc: str | None = None
    ) -> ConsolePlatform:
        scripted = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, str(SCRIPTED_STAGES), scripted.split(":")[1], str(tmp_path / "j")]
        processes.start("stages", [*argv, str(stage_seconds), *([failing_rpc] if failing_rpc else [])])
        wait_until(lambda: grpc_ready(scripted), 30, "the scripted stage services")
        principals = tmp_path / "principals.yaml"
        principals.write_text(yaml.safe_dump(PRINCIPALS))
        services = {
            name: scripted if every_stage else f"127.0.0.1:{free_port()}" for name in ("prompts", "teacher")
        }
        control_plane = control_plane_at(
            {**services, "trainer": scripted}, STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE=str(principals)
        )
        control_plane.start()
        return ConsolePlatform(control_plane.url)

    return start


@pytest.fixture
def console_platform(start_console_platform) -> ConsolePlatform:
    """A control plane whose jobs wait in Prompts (see `start_console_platform`)."""
    return start_console_platform()


@pytest.fixture
def page() -> Iterator[tuple[Page, BrowserProblems]]:
    """A page in a headless Chromium of the test's own, and what it reports."""
    with console_browser() as opened:
        yield opened
