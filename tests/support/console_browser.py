"""A headless Chromium for the console's tests: Debian's (never a downloaded one), driven by
Playwright, with a record of what the page reported that a console must never cause.

Each test starts its own browser and closes it before anything stops the processes it started: the
embedded platform's clean-up kills every child process of the test, Playwright's driver and Chromium
included."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, Page, sync_playwright

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-output" / "console"
CHROMIUM = os.environ.get("STILLHOUSE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1366, "height": 900}  # a laptop screen


@dataclass
class BrowserProblems:
    """Script errors and console errors (a Content-Security-Policy violation is one) the page reported."""

    messages: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.messages.append(f"console: {message.text}")

    def on_page_error(self, error: Exception) -> None:
        self.messages.append(f"page error: {error}")


@contextmanager
def console_browser() -> Iterator[tuple[Page, BrowserProblems]]:
    """A page in a fresh headless Chromium, closed at the end of the block."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run deploy/local/ensure-browser.sh, or point "
            "STILLHOUSE_TEST_CHROMIUM at one",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = chromium.new_context(viewport=VIEWPORT).new_page()
            problems = BrowserProblems()
            page.on("console", problems.on_console)
            page.on("pageerror", problems.on_page_error)
            yield page, problems
        finally:
            chromium.close()


def screenshot(page: Page, name: str) -> Path:
    """The whole page as test-output/console/<name>.png (kept as the tests' output)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
