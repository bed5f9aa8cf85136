"""For the console's tests: a control plane with principals of two tenants and an admin, and a page in a
headless Chromium of each test's own (`console_browser`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from console_browser import BrowserProblems, console_browser
from console_principals import PRINCIPALS, ConsolePlatform
from playwright.sync_api import Page


def console_platform_starter(start_api, folder: Path):
    def start(
        *, every_stage: bool = False, stage_seconds: float = 0, failing_rpc: str | None = None
    ) -> ConsolePlatform:
        principals = folder / "principals.yaml"
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
def start_console_platform(start_api, tmp_path):
    """Start a control plane with the principals of `console_principals` and scripted stage services
    (`start_api`: with `every_stage` jobs and estimates run through, each stage `stage_seconds` long;
    otherwise a job waits in Prompts until it is cancelled; the `failing_rpc` fails)."""
    return console_platform_starter(start_api, tmp_path)


@pytest.fixture
def console_platform(start_console_platform) -> ConsolePlatform:
    """A control plane whose jobs wait in Prompts (see `start_console_platform`)."""
    return start_console_platform()


@pytest.fixture(scope="module")
def module_console_platform(start_module_api, tmp_path_factory) -> ConsolePlatform:
    """As `console_platform`, one for the module's tests: for tests that each see only jobs of their own
    and need no pristine control plane."""
    return console_platform_starter(start_module_api, tmp_path_factory.mktemp("principals"))()


@pytest.fixture
def page() -> Iterator[tuple[Page, BrowserProblems]]:
    """A page in a headless Chromium of the test's own, and what it reports."""
    with console_browser() as opened:
        yield opened
