"""`submit`, `status`, `events` and `cancel` against a real HTTP server answering like the API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner, Result

from stillhouse.cli.main import app

if TYPE_CHECKING:
    from conftest import FakeApi

VALID_SPEC = "spec: {teacher: {backend: local, model: smollm2}, student: {init: {pruneTeacherDepth: 2}}}\n"


@pytest.fixture
def cli(api: FakeApi, tmp_path: Path):
    runner = CliRunner()

    def invoke(*args: str, url: str | None = None, token: str | None = api.token) -> Result:
        env = {
            "STILLHOUSE_HOME": str(tmp_path),
            "STILLHOUSE_API_URL": url or api.url,
            "STILLHOUSE_API_TOKEN": token,
            "COLUMNS": "200",
        }
        return runner.invoke(app, list(args), env=env)

    return invoke


def spec_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_submit_yaml(cli, api: FakeApi, tmp_path: Path) -> None:
    path = spec_file(tmp_path, "job.yaml", VALID_SPEC)
    result = cli("submit", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job job-new submitted (phase Pending)"
    request = api.requests[-1]
    assert (request["method"], request["path"]) == ("POST", "/v1/jobs")
    assert request["headers"]["content-type"] == "application/yaml"
    assert request["body"] == path.read_bytes()


def test_submit_json_quietly(cli, api: FakeApi, tmp_path: Path) -> None:
    path = spec_file(tmp_path, "job.json", json.dumps({"spec": {"teacher": {"model": "m"}}}))
    result = cli("submit", "--quiet", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == "job-new\n"
    assert api.requests[-1]["headers"]["content-type"] == "application/json"


def test_submit_invalid_spec_lists_each_field(cli, tmp_path: Path) -> None:
    path = spec_file(tmp_path, "bad.yaml", "spec: {training: {epochs: 0}}\n")
    result = cli("submit", str(path))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "spec.training.epochs: Input should be greater than 0",
        "spec.bogus: Extra inputs are not permitted",
    ]
    assert result.stdout == ""


def test_submit_missing_file_is_a_usage_error(cli, tmp_path: Path) -> None:
    result = cli("submit", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2


def test_wrong_token(cli, tmp_path: Path) -> None:
    result = cli("status", token="wrong-token-value")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "the API refused the token (401): check STILLHOUSE_API_TOKEN or the token file"
    )
    assert "wrong-token-value" not in result.output


def test_token_is_never_printed(cli, api: FakeApi) -> None:
    for args in (("status",), ("status", "job-running"), ("status", "-o", "json"), ("events", "job-ok")):
        assert api.token not in cli(*args).output


def test_unknown_job(cli) -> None:
    result = cli("status", "job-missing")
    assert result.exit_code == 1
    assert result.stderr.strip() == "no job job-missing"
    assert cli("events", "job-missing").stderr.strip() == "no job job-missing"
    assert cli("cancel", "job-missing").stderr.strip() == "no job job-missing"


def test_connection_refused_names_the_url(cli, free_port) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("status", url=url)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"cannot reach the Stillhouse API at {url}: connection refused"


def test_no_api_found(tmp_path: Path) -> None:
    env = {"STILLHOUSE_HOME": str(tmp_path), "STILLHOUSE_API_URL": None, "STILLHOUSE_API_TOKEN": None}
    result = CliRunner().invoke(app, ["status"], env=env)
    assert result.exit_code == 1
    assert "no Stillhouse API found: run `stillhouse up` or set STILLHOUSE_API_URL" in result.stderr


def test_status_table_follows_pages(cli, api: FakeApi) -> None:
    result = cli("status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "PHASE", "AGE", "MESSAGE"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["job-ok", "name-of-job-ok", "Succeeded"],
        ["job-running", "name-of-job-running", "Teacher"],
        ["job-old", "name-of-job-old", "Failed"],
    ]
    assert lines[3].endswith("out of budget")
    assert [request["query"].get("pageToken") for request in api.requests] == [None, "page-2"]


def test_status_filters_by_phase_as_json(cli, api: FakeApi) -> None:
    result = cli("status", "--phase", "teacher", "--output", "json")
    assert result.exit_code == 0, result.output
    assert [job["id"] for job in json.loads(result.stdout)] == ["job-running"]
    assert api.requests[-1]["query"]["phase"] == "Teacher"


def test_status_refuses_an_unknown_phase(cli) -> None:
    assert cli("status", "--phase", "Sleeping").exit_code == 2


def test_status_of_one_job_shows_its_steps(cli) -> None:
    result = cli("status", "job-running")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("job-running", "Teacher", "Steps", "prompts", "succeeded", "op-123", "1m", "prompts=10"):
        assert expected in text


def test_status_of_one_job_as_json(cli) -> None:
    result = cli("status", "job-running", "-o", "json")
    assert json.loads(result.stdout)["steps"][0]["operationId"] == "op-123"


@pytest.mark.parametrize(
    ("job_id", "phase", "code"),
    [("job-ok", "Succeeded", 0), ("job-fail", "Failed", 1), ("job-cancel", "Cancelled", 3)],
)
def test_events_exit_code_follows_the_final_phase(cli, job_id: str, phase: str, code: int) -> None:
    result = cli("events", job_id)
    assert result.exit_code == code, result.output
    assert f"job {job_id}: {phase}" in result.stdout


def test_events_show_phases_progress_and_errors(cli) -> None:
    ok = cli("events", "job-ok").stdout
    assert "job job-ok: Prompts" in ok
    assert "prompts 5/10 prompts  dedup" in ok
    assert "job job-ok: Succeeded - student recovers 91% of the teacher" in ok
    assert "error: teacher unreachable" in cli("events", "job-fail").stdout


def test_events_resume_after_a_dropped_stream(cli, api: FakeApi) -> None:
    api.dropped.discard("job-drop")
    result = cli("events", "job-drop")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("job job-drop: Prompts") == 1
    assert "job job-drop: Succeeded" in result.stdout
    resumed = [r for r in api.requests if r["path"].endswith("/events")]
    assert [r["headers"].get("last-event-id") for r in resumed] == [None, "2"]


def test_events_without_follow_stop_when_the_stream_goes_quiet(cli) -> None:
    started = time.monotonic()
    result = cli("events", "--no-follow", "job-running")
    assert result.exit_code == 0, result.output
    assert "job job-running: Prompts" in result.stdout
    assert time.monotonic() - started < 10


def test_cancel(cli, api: FakeApi) -> None:
    result = cli("cancel", "job-running")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job job-running: phase Teacher, cancel requested"
    assert api.requests[-1]["path"] == "/v1/jobs/job-running:cancel"


def test_cancel_a_finished_job(cli) -> None:
    result = cli("cancel", "job-ok")
    assert result.exit_code == 1
    assert result.stderr.strip() == "job job-ok has already ended (Succeeded)"


def test_estimate_prints_prompts_and_costs(cli, api: FakeApi, tmp_path: Path) -> None:
    path = spec_file(tmp_path, "job.yaml", VALID_SPEC)
    result = cli("estimate", str(path))
    assert result.exit_code == 0, result.output
    request = api.requests[-1]
    assert (request["method"], request["path"]) == ("POST", "/v1/jobs:estimate")
    assert request["body"] == path.read_bytes()
    lines = {" ".join(line.split()) for line in result.stdout.splitlines()}
    assert "Training prompts 1,800" in lines
    assert "Collected 2,000 (removed: near_duplicate 160)" in lines
    assert "Teacher cost (at most) $1.04" in lines
    assert "Spent generating prompts $0.02 (25 calls, 5 from the cache)" in lines
    assert "Total (at most) $1.06" in lines

    as_json = json.loads(cli("estimate", "--json", str(path)).stdout)
    assert as_json["teacher"]["completionTokens"] == 942080


def test_local_files_in_a_spec_are_sent_relative_to_the_spec(cli, api: FakeApi, tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    (specs / "seeds").mkdir(parents=True)
    (specs / "seeds" / "a.jsonl").write_text('{"prompt": "hi"}\n')
    (specs / "seeds" / "cities.txt").write_text("Oslo\n")
    path = spec_file(
        specs,
        "job.yaml",
        "spec:\n"
        "  prompts:\n"
        "    sources: [{path: seeds/a.jsonl}, {path: s3://bucket/b.jsonl}, {path: seeds/missing.jsonl}]\n"
        "    generate: {strategy: template, count: 2, template: '{{ city }}',\n"
        "               slotFiles: {city: seeds/cities.txt}}\n"
        "  teacher: {backend: local, model: smollm2}\n"
        "  student: {init: {pruneTeacherDepth: 2}}\n",
    )
    assert cli("submit", str(path)).exit_code == 0
    request = api.requests[-1]
    assert request["headers"]["content-type"] == "application/json"
    prompts = json.loads(request["body"])["spec"]["prompts"]
    assert [source["path"] for source in prompts["sources"]] == [
        str(specs / "seeds" / "a.jsonl"),
        "s3://bucket/b.jsonl",
        "seeds/missing.jsonl",
    ]
    assert prompts["generate"]["slotFiles"] == {"city": str(specs / "seeds" / "cities.txt")}


def test_model_folders_in_a_spec_are_sent_relative_to_the_spec(cli, api: FakeApi, tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    (specs / "models" / "student").mkdir(parents=True)
    (specs / "models" / "tokenizer").mkdir()
    path = spec_file(
        specs,
        "job.yaml",
        "spec:\n"
        "  teacher: {backend: openai, baseURL: 'https://api.example.com/v1', model: models/teacher-name,\n"
        "            tokenizer: models/tokenizer}\n"
        "  student: {init: {pretrained: models/student}}\n",
    )
    assert cli("submit", str(path)).exit_code == 0
    spec = json.loads(api.requests[-1]["body"])["spec"]
    # A folder next to the spec becomes its absolute path; a model name that is no path stays as it is.
    assert spec["student"]["init"]["pretrained"] == str(specs / "models" / "student")
    assert spec["teacher"]["tokenizer"] == str(specs / "models" / "tokenizer")
    assert spec["teacher"]["model"] == "models/teacher-name"
