"""The submit page in a real browser, against a control plane whose stages are scripted (seconds each):
the example spec checked as it loads, estimated, submitted and followed to Succeeded, then opened again
to resubmit."""

from __future__ import annotations

import re

import pytest
from console_browser import screenshot
from console_principals import TOKENS, job_document
from playwright.sync_api import expect
from waiting import wait_until

pytestmark = pytest.mark.browser

NETWORK_NOISE = re.compile(r"Failed to load resource")


def test_a_user_estimates_submits_and_resubmits_the_example_job(start_console_platform, page):
    platform = start_console_platform(every_stage=True, stage_seconds=2)
    browser, problems = page

    browser.goto(f"{platform.url}/submit")
    expect(browser).to_have_url(f"{platform.url}/login?next=%2Fsubmit")
    browser.fill("#token", TOKENS["bob"])
    browser.click("#login-submit")
    expect(browser).to_have_url(f"{platform.url}/submit")
    expect(browser.locator("#spec")).to_have_value(re.compile("name: my-first-student"))
    line_count = len(browser.locator("#spec").input_value().split("\n"))
    expect(browser.locator("#gutter .line")).to_have_count(line_count)
    expect(browser.locator("#validation-status")).to_have_attribute("data-state", "valid", timeout=15_000)

    browser.click("#estimate")
    result = browser.locator("#estimate-result")
    expect(result).to_be_visible(timeout=60_000)
    expect(browser.locator("#busy")).to_be_hidden()
    expect(result.locator('[data-fact="training prompts"] td')).to_have_text("90")
    expect(result.locator('[data-fact="teacher requests"] td')).to_have_text("100")
    expect(result.locator('[data-fact="total"] td')).to_have_text("$1.25")
    screenshot(browser, "submit-estimate")

    browser.click("#submit")
    expect(browser).to_have_url(re.compile(rf"{re.escape(platform.url)}/jobs/job-[0-9a-f]+$"), timeout=30_000)
    job_id = browser.url.rsplit("/", 1)[1]
    expect(browser.locator("#job-phase")).to_have_attribute("data-phase", "Succeeded", timeout=60_000)
    loss = browser.locator('#chart-loss polyline[data-series="student loss"]')
    expect(loss).to_have_count(1)
    # The whole curve of the training's result, where the live progress reported ten steps.
    with platform.api("bob") as api:
        curve = api.get(f"/v1/jobs/{job_id}").json()["summary"]["training"]["curve"]
    assert len(curve) > 10
    expect(loss).to_have_attribute("data-points", str(len(curve)))
    expect(browser.locator("#headline")).to_have_text(
        "The student closes 87.5% of the gap from a context-free unigram to the teacher on held-out KL, "
        "60.0% on top-1 agreement."
    )
    expect(browser.locator('#evaluation-table tr[data-row="student"] td[data-metric="kl"]')).to_have_text(
        "0.625"
    )
    expect(browser.locator("#job-labels")).to_contain_text("team=research")
    sample = browser.locator('#samples .sample[data-prompt-id="p-1"]')
    expect(sample.locator(".prompt")).to_contain_text("Why is the sky blue?")
    expect(sample.locator('[data-model="teacher"] pre')).to_have_text("Rayleigh.")
    expect(sample.locator('[data-model="baseline"] pre')).to_have_text("(empty answer)")
    expect(sample.locator('[data-model="student"] pre')).to_have_text("Light.")

    browser.click("#resubmit")
    expect(browser).to_have_url(f"{platform.url}/submit?from={job_id}")
    expect(browser.locator("#from-job")).to_contain_text(job_id)
    expect(browser.locator("#spec")).to_have_value(re.compile(r"pruneTeacherDepth: 15"))

    assert [message for message in problems.messages if not NETWORK_NOISE.search(message)] == []


def test_a_job_with_an_sft_control_tells_the_students_lead_over_it(start_console_platform, page):
    platform = start_console_platform(every_stage=True, stage_seconds=1)
    browser, problems = page
    document = job_document("with-control")
    document["spec"]["evaluation"] = {"controls": ["sft"]}
    with platform.api("bob") as api:
        response = api.post("/v1/jobs", json=document)
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        wait_until(
            lambda: api.get(f"/v1/jobs/{job_id}").json()["phase"] == "Succeeded", 60, "the job to succeed"
        )

    browser.goto(f"{platform.url}/login?next=%2Fjobs%2F{job_id}")
    browser.fill("#token", TOKENS["bob"])
    browser.click("#login-submit")
    expect(browser.locator("#headline")).to_have_text(
        "The student closes 87.5% of the gap from a context-free unigram to the teacher on held-out KL, "
        "60.0% on top-1 agreement. Against the SFT control, paired over the held-out answers: KL -0.125 "
        "(95% interval -0.200 to -0.050: ahead), "
        "top-1 agreement +0.050 (95% interval -0.010 to +0.110: no clear difference)."
    )
    expect(browser.locator('#evaluation-table tr[data-row="controlSft"] td[data-metric="kl"]')).to_have_text(
        "0.75"
    )
    assert [message for message in problems.messages if not NETWORK_NOISE.search(message)] == []
