"""A control plane for the console's tests, with principals of two tenants and an admin, and a headless
Chromium (Debian's, driven by Playwright) whose pages are screenshotted into test-output/console/."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from console_principals import PRINCIPALS, ConsolePlatform
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-output" / "console"
SCRIPTED_STAGES = REPO / "tests" / "control_plane" / "scripted_stages.py"
CHROMIUM = os.environ.get("STILLHOUSE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def console_platform(
    control_plane_at, free_port, processes, grpc_ready, wait_until, tmp_path
) -> ConsolePlatform:
    """A control plane with the principals above and a scripted trainer (its submit-time check passes);
    there is no prompts service, so a job waits in Prompts until it is cancelled."""
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


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run deploy/local/ensure-browser.sh, or point "
            "STILLHOUSE_TEST_CHROMIUM at one",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class BrowserProblems:
    """What the page reported that a console must never cause: script errors, refused resources (a
    Content-Security-Policy violation is one), console errors."""

    messages: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.messages.append(f"console: {message.text}")

    def on_page_error(self, error: Exception) -> None:
        self.messages.append(f"page error: {error}")


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, BrowserProblems]]:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    opened = context.new_page()
    problems = BrowserProblems()
    opened.on("console", problems.on_console)
    opened.on("pageerror", problems.on_page_error)
    yield opened, problems
    context.close()


@pytest.fixture
def screenshot() -> Callable[[Page, str], Path]:
    """`screenshot(page, name)`: the whole page as test-output/console/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(page: Page, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
