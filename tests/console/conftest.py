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
def console_platform(
    control_plane_at, free_port, processes, grpc_ready, wait_until, tmp_path
) -> ConsolePlatform:
    """A control plane with the principals of `console_principals` and a scripted trainer (its
    submit-time check passes); there is no prompts service, so a job waits in Prompts until it is
    cancelled."""
    trainer = f"127.0.0.1:{free_port()}"
    processes.start(
        "stages", [sys.executable, str(SCRIPTED_STAGES), trainer.split(":")[1], str(tmp_path / "j"), "0"]
    )
    wait_until(lambda: grpc_ready(trainer), 30, "the scripted trainer")
    principals = tmp_path / "principals.yaml"
    principals.write_text(yaml.safe_dump(PRINCIPALS))
    absent = {name: f"127.0.0.1:{free_port()}" for name in ("prompts", "teacher")}
    control_plane = control_plane_at(
        {**absent, "trainer": trainer}, STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE=str(principals)
    )
    control_plane.start()
    return ConsolePlatform(control_plane.url)


@pytest.fixture
def page() -> Iterator[tuple[Page, BrowserProblems]]:
    """A page in a headless Chromium of the test's own, and what it reports."""
    with console_browser() as opened:
        yield opened
