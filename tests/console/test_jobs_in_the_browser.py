"""The jobs list and a job's page in a real browser, against a control plane whose jobs wait in Prompts:
logging in, following a job, and cancelling it from its page; the list follows without a reload."""

from __future__ import annotations

import re

import pytest
from console_browser import screenshot
from console_principals import TOKENS, ConsolePlatform
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

# The browser logs every 4xx answer it gets (the console's checks expect some): not a problem in itself.
NETWORK_NOISE = re.compile(r"Failed to load resource")


def test_a_user_logs_in_follows_and_cancels_a_job(console_platform: ConsolePlatform, page):
    browser, problems = page
    job_id = console_platform.submit("alice", "waiting-job")
    other_id = console_platform.submit("alice", "cancelled-elsewhere")
    hidden_id = console_platform.submit("bob", "bobs-job")

    browser.goto(f"{console_platform.url}/jobs/{job_id}")
    expect(browser).to_have_url(re.compile(r"/login\?next=%2Fjobs%2F" + job_id))
    browser.fill("#token", TOKENS["alice"])
    browser.click("#login-submit")
    expect(browser).to_have_url(f"{console_platform.url}/jobs/{job_id}")

    expect(browser.locator("#job-name")).to_have_text("waiting-job")
    expect(browser.locator("#who-name")).to_have_text("alice")
    expect(browser.locator("#job-labels")).to_contain_text("team=console")
    expect(browser.locator("#job-phase")).to_have_attribute("data-phase", re.compile("Pending|Prompts"))
    expect(browser.locator('#timeline [data-stage="prompts"]')).to_have_attribute(
        "data-state", re.compile("running|starting")
    )
    expect(browser.locator("#job-spec")).to_contain_text("kind: DistillationJob")
    cancel = browser.locator("#cancel-job")
    expect(cancel).to_be_visible()

    browser.once("dialog", lambda dialog: dialog.accept())
    cancel.click()
    expect(browser.locator("#job-phase")).to_have_attribute("data-phase", "Cancelled", timeout=30_000)
    expect(cancel).to_be_hidden()
    expect(browser.locator("#live-status")).to_have_attribute("data-state", "ended")

    browser.goto(f"{console_platform.url}/")
    rows = browser.locator("#jobs-body tr")
    expect(rows).to_have_count(2)
    expect(browser.locator(f'tr[data-job-id="{job_id}"]')).to_have_attribute("data-phase", "Cancelled")
    expect(browser.locator(f'tr[data-job-id="{hidden_id}"]')).to_have_count(0)

    # Cancelled through the API, by someone else: the open list follows.
    with console_platform.api("alice") as api:
        assert api.post(f"/v1/jobs/{other_id}:cancel").status_code == 202
    expect(browser.locator(f'tr[data-job-id="{other_id}"]')).to_have_attribute(
        "data-phase", "Cancelled", timeout=30_000
    )

    screenshot(browser, "jobs-list-cancelled")

    # The filters: by text, then by phase.
    browser.fill("#filter-text", "elsewhere")
    expect(rows).to_have_count(1)
    browser.fill("#filter-text", "")
    browser.select_option("#filter-phase", "Succeeded")
    expect(rows).to_have_count(0)
    expect(browser).to_have_url(f"{console_platform.url}/?phase=Succeeded")
    expect(browser.locator("#jobs-empty")).to_have_text("No job matches these filters.")

    browser.click("#logout")
    expect(browser).to_have_url(f"{console_platform.url}/login")
    browser.goto(f"{console_platform.url}/")
    expect(browser).to_have_url(re.compile(r"/login\?next=%2F$"))

    assert [message for message in problems.messages if not NETWORK_NOISE.search(message)] == []


def test_a_failed_job_says_why_on_its_page(start_console_platform, page):
    platform = start_console_platform(every_stage=True, stage_seconds=0.5, failing_rpc="TrainStudent")
    browser, problems = page
    job_id = platform.submit("bob", "fails-in-training")

    browser.goto(f"{platform.url}/login?next=/jobs/{job_id}")
    browser.fill("#token", TOKENS["bob"])
    browser.click("#login-submit")
    expect(browser.locator("#job-phase")).to_have_attribute("data-phase", "Failed", timeout=60_000)
    expect(browser.locator("#job-error")).to_contain_text("The job failed: ")
    expect(browser.locator("#job-error")).to_contain_text("scripted failure")
    train = browser.locator('#timeline [data-stage="train"]')
    expect(train).to_have_attribute("data-state", "failed")
    expect(train.locator(".error")).to_contain_text("scripted failure")
    expect(browser.locator('#timeline [data-stage="evaluate"]')).to_have_attribute("data-state", "waiting")
    expect(browser.locator("#cancel-job")).to_be_hidden()
    expect(browser.locator("#headline")).to_have_text("The job ended without an evaluation.")
    screenshot(browser, "job-failed")

    assert [message for message in problems.messages if not NETWORK_NOISE.search(message)] == []
