"""The console as an engineer uses it, in a real browser against the real embedded platform
(`stillhouse up`): log in, get a broken spec marked line by line, submit the tiny job, watch it run to
Succeeded with its curves, evaluation and answers side by side, and find it in the jobs list. Each key
moment is screenshotted into test-output/console/."""

from __future__ import annotations

import re

import httpx
import pytest
import yaml
from console_browser import console_browser, screenshot
from embedded_platform import running_up
from playwright.sync_api import expect
from tiny_job import tiny_job_spec
from waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.long, pytest.mark.timeout(900)]

NETWORK_NOISE = re.compile(r"Failed to load resource")
REFERENCE_ROWS = {"uniform", "unigram", "baseline", "student", "teacher"}
JOB_SECONDS = 480


def misspelled(spec_yaml: str) -> tuple[str, int]:
    """The spec with `epochs` misspelled, and the (1-based) line it is on."""
    lines = spec_yaml.splitlines()
    line = next(number for number, text in enumerate(lines, 1) if text.strip().startswith("epochs:"))
    lines[line - 1] = lines[line - 1].replace("epochs:", "epochz:")
    return "\n".join(lines) + "\n", line


def test_an_engineer_submits_and_follows_the_tiny_job(tmp_path, tiny_llama, free_port):
    inputs = tmp_path / "inputs"
    spec = tiny_job_spec(tiny_llama(tmp_path / "teacher", layers=2, hidden=64, seed=1), inputs)
    spec_yaml = yaml.safe_dump(spec, sort_keys=False)
    broken_yaml, broken_line = misspelled(spec_yaml)

    # The browser closes before the platform stops: stopping it kills every child process of the test.
    with (
        running_up(tmp_path / "home", free_port(), "--input-root", str(inputs)) as platform,
        console_browser() as (browser, problems),
    ):
        url = platform.api_url.rstrip("/")
        browser.goto(f"{url}/")
        expect(browser).to_have_url(f"{url}/login?next=%2F")
        browser.fill("#token", "not-the-token-0123456789")
        browser.click("#login-submit")
        expect(browser.locator("#login-error")).to_contain_text("not valid")
        screenshot(browser, "login")
        browser.fill("#token", platform.token)
        browser.click("#login-submit")
        expect(browser).to_have_url(f"{url}/")

        browser.click("#new-job")
        expect(browser).to_have_url(f"{url}/submit")
        browser.fill("#spec", broken_yaml)
        marker = browser.locator(f'#gutter .line.has-error[data-line="{broken_line}"]')
        expect(marker).to_have_attribute("data-message", re.compile("epochz"), timeout=15_000)
        expect(browser.locator("#gutter .line.has-error")).to_have_count(1)
        expect(browser.locator("#validation-status")).to_have_attribute("data-state", "invalid")
        expect(browser.locator(f'#notes .note[data-line="{broken_line}"]')).to_contain_text("not permitted")
        browser.click(f'#line-errors li[data-line="{broken_line}"] button')  # scrolls the line into view
        screenshot(browser, "submit-with-errors")

        browser.fill("#spec", spec_yaml)
        expect(browser.locator("#validation-status")).to_have_attribute("data-state", "valid", timeout=15_000)
        expect(browser.locator("#gutter .line.has-error")).to_have_count(0)
        browser.click("#submit")
        expect(browser).to_have_url(re.compile(rf"{re.escape(url)}/jobs/job-[0-9a-f]+$"), timeout=30_000)
        job_id = browser.url.rsplit("/", 1)[1]

        phase = browser.locator("#job-phase")
        expect(browser.locator("#job-name")).to_have_text("tiny-end-to-end")
        expect(browser.locator("#live-status")).to_have_attribute("data-state", "live")
        # Training, once its curves have a point (or the job has moved on: the tiny job trains briefly).
        wait_until(
            lambda: (
                browser.locator("#chart-loss polyline").count() > 0
                or phase.get_attribute("data-phase") not in {"Pending", "Prompts", "Teacher", "Training"}
            ),
            JOB_SECONDS,
            "the job to train",
            interval=0.25,
        )
        screenshot(browser, "job-running")

        try:
            expect(phase).to_have_attribute("data-phase", "Succeeded", timeout=JOB_SECONDS * 1000)
        except AssertionError:
            screenshot(browser, "job-not-succeeded")
            raise AssertionError(f"the job did not succeed in the console:{platform.logs()}") from None
        expect(browser.locator("#live-status")).to_have_attribute("data-state", "ended")
        expect(browser.locator("#cancel-job")).to_be_hidden()
        for stage in ("prompts", "teacher", "train", "evaluate"):
            expect(browser.locator(f'#timeline [data-stage="{stage}"]')).to_have_attribute(
                "data-state", "succeeded"
            )

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {platform.token}"}) as api:
            summary = api.get(f"/v1/jobs/{job_id}").json()["summary"]
        # Every step trained, however few of them the live progress showed (it samples a step a second).
        training = summary["training"]
        assert [point["step"] for point in training["curve"]] == list(range(1, training["steps"] + 1))
        loss = browser.locator('#chart-loss polyline[data-series="student loss"]')
        expect(loss).to_have_count(1)
        expect(loss).to_have_attribute("data-points", str(training["steps"]))
        assert training["steps"] > 1
        expect(browser.locator('#chart-lr polyline[data-series="student learning rate"]')).to_have_count(1)

        rows = browser.locator("#evaluation-table tbody tr")
        expect(rows.first).to_be_visible()
        assert {row.get_attribute("data-row") for row in rows.all()} >= REFERENCE_ROWS
        expect(browser.locator("#headline")).to_contain_text(
            "of the gap from a context-free unigram to the teacher on held-out KL"
        )

        samples = summary["evaluation"]["samples"]
        assert samples, "the job's summary has no held-out answers"
        first = browser.locator(f'#samples .sample[data-prompt-id="{samples[0]["promptId"]}"]')
        for model, title in [
            ("teacher", "Teacher"),
            ("baseline", "Untrained student"),
            ("student", "Student"),
        ]:
            answer = first.locator(f'[data-model="{model}"]')
            expect(answer.locator("h4")).to_have_text(title)
            expect(answer.locator("pre")).to_have_text(samples[0][model] or "(empty answer)")
        expect(browser.locator('#artifacts [data-artifact="student"] a').first).to_be_visible()
        report = browser.locator('#artifacts [data-artifact="report"] a', has_text="report.md")
        download = browser.request.get(f"{url}{report.get_attribute('href')}")  # with the session cookie
        assert download.status == 200 and len(download.body()) > 0
        screenshot(browser, "job-succeeded")

        browser.click("text=Jobs")
        expect(browser.locator(f'tr[data-job-id="{job_id}"]')).to_have_attribute("data-phase", "Succeeded")
        expect(browser.locator(f'tr[data-job-id="{job_id}"] .headline')).to_have_text(re.compile(r"%$"))
        screenshot(browser, "jobs-list")

    assert [message for message in problems.messages if not NETWORK_NOISE.search(message)] == []
