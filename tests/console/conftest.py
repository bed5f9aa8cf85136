"""For the console's tests: a control plane with principals of two tenants and an admin, and a page in a
headless Chromium of each test's own (`console_browser`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from console_browser import BrowserProblems, console_browser
from console_principals import PRINCIPALS, ConsolePlatform
from playwright.sync_api import Page


@pytest.fixture
def start_console_platform(start_api, tmp_path):
    """Start a control plane with the principals of `console_principals` and scripted stage services
    (`start_api`: with `every_stage` jobs and estimates run through, each stage `stage_seconds` long;
    otherwise a job waits in Prompts until it is cancelled; the `failing_rpc` fails)."""

    def start(
        *, every_stage: bool = False, stage_seconds: float = 0, failing_rpc: str | None = None
    ) -> ConsolePlatform:
        principals = tmp_path / "principals.yaml"
        principals.write_text(yaml.safe_dump(PRINCIPALS))
        control_plane = start_api(
            every_stage=every_stage,
            stage_seconds=stage_seconds,
            failing_rpc=failing_rpc,
            STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE=str(principals),
        )
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
