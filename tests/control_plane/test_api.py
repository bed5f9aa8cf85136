"""The REST API of a real control plane process: auth, spec validation, listing, errors, docs, metrics."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from monitoring_queries import metric_samples

VALID_YAML = """
apiVersion: stillhouse.dev/v1
kind: DistillationJob
metadata: {name: support-bot-small, labels: {team: support}}
spec:
  teacher: {backend: openai, baseURL: http://127.0.0.1:9/v1, model: deepseek-chat, apiKeySecret: deepseek,
            tokenizer: /models/tokenizers/deepseek-v3}
  student: {init: {pretrained: s3://stillhouse/models/qwen2.5-0.5b}}
  training: {loss: {kind: forward_kl, ceWeight: 0.5}, epochs: 2}
"""
MINIMAL = {"spec": {"teacher": {"backend": "local", "model": "smollm2"}, "student": {"init": {"config": {}}}}}


def post_job(client: httpx.Client, document: dict) -> httpx.Response:
    return client.post("/v1/jobs", json=document)


def test_health_needs_no_token_and_everything_else_does(api):
    assert httpx.get(f"{api.url}/healthz").status_code == 200
    assert httpx.get(f"{api.url}/readyz").json() == {"status": "ok"}
    for method, path in [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("GET", "/metrics"),
    ]:
        anonymous = httpx.request(method, f"{api.url}{path}")
        assert anonymous.status_code == 401, path
        assert anonymous.headers["www-authenticate"] == "Bearer"
        with api.client(token="wrong-token-4242") as client:
            assert client.request(method, path).status_code == 401, path


def test_tokens_never_reach_the_log(api):
    start = len(api.log)
    with api.client(token="guessed-token-4242") as client:
        client.get("/v1/jobs")
    with api.client() as client:
        client.get("/v1/jobs")
    assert "unauthenticated request refused" in api.log_since(start)
    assert "guessed-token-4242" not in api.log
    assert api.token not in api.log


def test_submit_yaml_fills_defaults_and_keeps_labels(api):
    with api.client() as client:
        response = client.post("/v1/jobs", content=VALID_YAML, headers={"Content-Type": "application/yaml"})
        assert response.status_code == 201, response.text
        job = response.json()
        assert client.get(f"/v1/jobs/{job['id']}").json()["name"] == "support-bot-small"
    assert job["phase"] == "Pending"
    assert job["labels"] == {"team": "support"}
    assert job["spec"]["spec"]["training"]["epochs"] == 2
    assert job["spec"]["spec"]["training"]["learningRate"] == 2.0e-5
    assert job["spec"]["spec"]["teacher"]["topLogprobs"] == 20


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (lambda spec: spec["spec"].update(bogus=1), "spec.bogus", "Extra inputs are not permitted"),
        (lambda spec: spec["spec"].update(training={"epochs": -1}), "spec.training.epochs", "greater than 0"),
        (lambda spec: spec["spec"].pop("teacher"), "spec.teacher", "Field required"),
        (
            lambda spec: spec["spec"]["teacher"].update(backend="openai"),
            "spec.teacher",
            "`baseURL` is required",
        ),
        (lambda spec: spec.update(kind="Deployment"), "kind", "DistillationJob"),
        (
            lambda spec: spec["spec"]["teacher"].update(apiKeySecret="../api-token"),
            "spec.teacher.apiKeySecret",
            "should match pattern",
        ),
        (
            lambda spec: spec["spec"]["teacher"].update(model="s3://models/../../etc"),
            "spec.teacher.model",
            "'.', '..' and empty path segments are not allowed",
        ),
        (
            lambda spec: spec["spec"]["student"].update(init={"pretrained": "s3://Models/qwen"}),
            "spec.student.init.pretrained",
            "the bucket must be 3-63 lower-case letters",
        ),
    ],
)
def test_bad_spec_is_refused_with_422_naming_the_field(api, change, field, words):
    document = json.loads(json.dumps(MINIMAL))
    change(document)
    with api.client() as client:
        response = post_job(client, document)
    assert response.status_code == 422
    body = response.json()
    assert field in [error["field"] for error in body["errors"]]
    assert words in body["message"]
    assert field in body["message"]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "words"),
    [
        (b"spec: [unclosed", "application/yaml", 400, "not valid YAML"),
        (b"{", "application/json", 400, "not valid JSON"),
        (b"spec: {}", "text/plain", 415, "application/yaml"),
        (b"[1, 2]", "application/json", 422, "must be a DistillationJob object"),
        (None, "application/json", 413, "at most"),
    ],
    ids=["bad-yaml", "bad-json", "plain-text", "not-an-object", "too-large"],
)
def test_unusable_body_gets_a_clear_4xx(api, content, content_type, status, words):
    content = content if content is not None else b" " * ((1 << 20) + 1)
    with api.client() as client:
        response = client.post("/v1/jobs", content=content, headers={"Content-Type": content_type})
    assert response.status_code == status
    assert words in response.json()["message"]


def test_list_filters_by_phase_and_pages_without_gaps(fresh_api, wait_until):
    with fresh_api.client() as client:
        ids = [post_job(client, MINIMAL).json()["id"] for _ in range(5)]
        client.post(f"/v1/jobs/{ids[0]}:cancel")
        wait_until(
            lambda: client.get(f"/v1/jobs/{ids[0]}").json()["phase"] == "Cancelled", 20, "cancellation"
        )

        seen, token = [], None
        while True:
            params = {"pageSize": 2} | ({"pageToken": token} if token else {})
            page = client.get("/v1/jobs", params=params).json()
            assert len(page["jobs"]) <= 2
            seen += [job["id"] for job in page["jobs"]]
            token = page["nextPageToken"]
            if token is None:
                break
        cancelled = client.get("/v1/jobs", params={"phase": "Cancelled"}).json()["jobs"]
        bad_phase = client.get("/v1/jobs", params={"phase": "Sleeping"})
        bad_size = client.get("/v1/jobs", params={"pageSize": 0})
        bad_token = client.get("/v1/jobs", params={"pageToken": "not-a-token"})

    assert seen == list(reversed(ids))
    assert [job["id"] for job in cancelled] == [ids[0]]
    assert bad_phase.status_code == 422 and "phase" in bad_phase.json()["message"]
    assert bad_size.status_code == 422 and "pageSize" in bad_size.json()["message"]
    assert bad_token.status_code == 400 and "pageToken" in bad_token.json()["message"]


def test_unknown_job_is_404_naming_it(api):
    with api.client() as client:
        for response in (
            client.get("/v1/jobs/job-missing"),
            client.post("/v1/jobs/job-missing:cancel"),
            client.get("/v1/jobs/job-missing/events"),
        ):
            assert response.status_code == 404
            assert "job-missing" in response.json()["message"]


def metric(exposition: str, sample: tuple[str, frozenset]) -> float:
    """The value of one sample (name, labels) of a /metrics text; 0 where it is absent."""
    return metric_samples(exposition).get(sample, 0.0)


SUBMITTED = ("stillhouse_jobs_submitted_total", frozenset())
POSTS_CREATED = (
    "stillhouse_http_requests_total",
    frozenset({"method": "POST", "route": "/v1/jobs", "status": "201"}.items()),
)


def test_openapi_documents_the_job_schema_and_metrics_count_jobs(api):
    with api.client() as client:
        before = client.get("/metrics").text
        post_job(client, MINIMAL)
        metrics = client.get("/metrics").text
    schema = httpx.get(f"{api.url}/openapi.json").json()
    assert httpx.get(f"{api.url}/docs").status_code == 200
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/yaml"}
    assert "epochs" in schema["components"]["schemas"]["TrainingSpec"]["properties"]
    # The process serves the module's other tests too: the submit counts one more than before it.
    assert metric(metrics, SUBMITTED) == metric(before, SUBMITTED) + 1
    assert metric(metrics, POSTS_CREATED) == metric(before, POSTS_CREATED) + 1


def test_yaml_and_json_bodies_are_the_same_job(api):
    document = yaml.safe_load(VALID_YAML)
    with api.client() as client:
        from_json = post_job(client, document).json()
        from_yaml = client.post(
            "/v1/jobs", content=VALID_YAML, headers={"Content-Type": "application/x-yaml; charset=utf-8"}
        ).json()
    assert from_json["spec"] == from_yaml["spec"]
