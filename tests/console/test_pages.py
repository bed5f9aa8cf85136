"""The console's pages over plain HTTP against a real control plane: signing in and out, where a browser
is sent, the security headers, and who sees which job's page."""

from __future__ import annotations

import html
import re

import httpx
import pytest
import yaml
from console_principals import TOKENS, ConsolePlatform

from stillhouse.common.jobspec import DistillationJob

PAGES = ["/", "/submit"]


@pytest.fixture
def console_platform(module_console_platform: ConsolePlatform) -> ConsolePlatform:
    """The module's control plane: every test here signs in afresh and looks at jobs of its own."""
    return module_console_platform


def test_a_page_without_a_session_sends_the_browser_to_log_in_and_back(console_platform: ConsolePlatform):
    with httpx.Client(base_url=console_platform.url) as browser:
        for path, next_path in [
            ("/", "%2F"),
            ("/jobs/job-0123456789ab", "%2Fjobs%2Fjob-0123456789ab"),
            ("/submit?from=job-0123456789ab", "%2Fsubmit%3Ffrom%3Djob-0123456789ab"),
        ]:
            response = browser.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == f"/login?next={next_path}"

        form = browser.get("/login", params={"next": "/submit?from=job-0123456789ab"})
        assert form.status_code == 200
        assert 'name="next" value="/submit?from=job-0123456789ab"' in form.text

        signed_in = browser.post(
            "/login", data={"token": TOKENS["alice"], "next": "/submit?from=job-0123456789ab"}
        )
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == "/submit?from=job-0123456789ab"
        cookie = signed_in.headers["set-cookie"]
        assert cookie.startswith("stillhouse_session=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie

        jobs = browser.get("/")
        assert jobs.status_code == 200
        assert ">alice<" in jobs.text and ">team-a<" in jobs.text
        # Signed in already: the login page goes straight on.
        assert browser.get("/login", params={"next": "/submit"}).headers["location"] == "/submit"

        logged_out = browser.post("/logout")
        assert logged_out.status_code == 303 and logged_out.headers["location"] == "/login"
        assert browser.get("/").status_code == 303


REFUSED_TOKENS = [
    ("", "Enter your API token."),
    ("   ", "Enter your API token."),
    ("x" * 513, "tokens are at most 512 characters"),
    ("not-a-token-of-anyone-here", "That token is not valid."),
]
NEXT_PATHS = [
    ("/jobs/job-0123456789ab?tab=x", "/jobs/job-0123456789ab?tab=x"),
    ("//evil.example/path", "/"),
    ("https://evil.example/", "/"),
    ("/\\evil.example", "/"),
    ("javascript:alert(1)", "/"),
    ("/login", "/"),
    ("/ok\r\nSet-Cookie: x=y", "/"),
    ("", "/"),
]


def test_a_refused_token_is_told_and_starts_no_session(console_platform):
    with httpx.Client(base_url=console_platform.url) as browser:
        for token, message in REFUSED_TOKENS:
            response = browser.post("/login", data={"token": token, "next": "/"})
            assert response.status_code == 401, token
            assert message in html.unescape(response.text)
            assert "set-cookie" not in response.headers
            assert browser.get("/").status_code == 303


def test_login_goes_back_only_to_a_path_of_this_site(console_platform):
    with httpx.Client(base_url=console_platform.url) as browser:
        for next_path, sent_to in NEXT_PATHS:
            response = browser.post("/login", data={"token": TOKENS["bob"], "next": next_path})
            assert response.status_code == 303
            assert response.headers["location"] == sent_to, next_path


def test_a_login_form_posted_from_another_site_is_refused(console_platform):
    with httpx.Client(base_url=console_platform.url) as browser:
        response = browser.post(
            "/login", data={"token": TOKENS["bob"]}, headers={"Origin": "https://evil.example"}
        )
        assert response.status_code == 403
        assert "set-cookie" not in response.headers
        same_site = browser.post(
            "/login", data={"token": TOKENS["bob"]}, headers={"Origin": console_platform.url}
        )
        assert same_site.status_code == 303


def test_every_page_forbids_inline_scripts_and_framing(console_platform):
    job_id = console_platform.submit("alice", "headers")
    with console_platform.signed_in("alice") as browser:
        answers = [browser.get(path) for path in [*PAGES, f"/jobs/{job_id}", f"/submit?from={job_id}"]]
        answers.append(httpx.get(f"{console_platform.url}/login"))
    for response in answers:
        assert response.status_code == 200, response.url
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        # Scripts are files of this site only: no inline <script> body, no inline event handler.
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", response.text) == []
        assert re.search(r"\son[a-z]+\s*=", response.text) is None


def test_the_console_files_are_served_with_their_types(console_platform):
    for name, media_type in [("jobs.js", "text/javascript"), ("style.css", "text/css")]:
        response = httpx.get(f"{console_platform.url}/console/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media_type)
        assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{console_platform.url}/console/static/../app.py").status_code == 404


def test_a_job_page_shows_to_its_tenant_and_admins_only(console_platform):
    job_id = console_platform.submit("alice", "alices-job")
    with console_platform.signed_in("alice") as alice:
        own = alice.get(f"/jobs/{job_id}")
        not_an_id = alice.get("/jobs/Not_A_Job!")
    with console_platform.signed_in("bob") as bob:
        theirs = bob.get(f"/jobs/{job_id}")
        resubmit_theirs = bob.get("/submit", params={"from": job_id})
        missing = bob.get("/jobs/job-000000000000")
    with console_platform.signed_in("ops") as admin:
        as_admin = admin.get(f"/jobs/{job_id}")

    assert own.status_code == 200
    assert f'data-job-id="{job_id}"' in own.text and "alices-job" in own.text
    assert as_admin.status_code == 200
    for refused in (theirs, resubmit_theirs, missing):
        assert refused.status_code == 404
        assert "alices-job" not in refused.text
    assert f"There is no job {job_id} that you may see" in theirs.text
    assert not_an_id.status_code == 404 and "is not a job id" in not_an_id.text


def test_resubmitting_a_job_starts_from_the_same_job(console_platform):
    job_id = console_platform.submit("alice", "to-resubmit")
    with console_platform.signed_in("alice") as alice:
        page = alice.get("/submit", params={"from": job_id})
        stored = alice.get(f"/v1/jobs/{job_id}").json()["spec"]
    assert page.status_code == 200
    text = html.unescape(re.search(r"<textarea[^>]*>(.*?)</textarea>", page.text, re.DOTALL).group(1))
    assert "null" not in text
    assert DistillationJob.model_validate(yaml.safe_load(text)) == DistillationJob.model_validate(stored)


def test_the_example_spec_of_the_submit_page_is_a_valid_job(console_platform):
    with console_platform.signed_in("bob") as bob:
        page = bob.get("/submit")
    text = html.unescape(re.search(r"<textarea[^>]*>(.*?)</textarea>", page.text, re.DOTALL).group(1))
    DistillationJob.model_validate(yaml.safe_load(text))


def test_the_pages_are_not_part_of_the_api_schema(console_platform):
    paths = httpx.get(f"{console_platform.url}/openapi.json").json()["paths"]
    console = {"/", "/login", "/logout", "/submit", "/jobs/{job_id}", "/jobs/{anything}"}
    assert not console & set(paths)
    assert not [path for path in paths if path.startswith("/console")]


def test_only_an_admin_gets_the_tenant_filter(console_platform):
    with console_platform.signed_in("ops") as admin:
        as_admin = admin.get("/", params={"tenant": "team-a", "phase": "Prompts"})
    with console_platform.signed_in("alice") as alice:
        as_user = alice.get("/")
    assert 'id="filter-tenant" value="team-a"' in as_admin.text
    assert '<option value="Prompts" selected>' in as_admin.text
    assert 'data-admin="true"' in as_admin.text and ">admin<" in as_admin.text
    assert "filter-tenant" not in as_user.text and 'data-admin="false"' in as_user.text
