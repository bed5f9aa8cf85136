"""The routes the web console leans on, through a real control plane process with scripted stages and a
real storage service over a local folder: the phase changes of every visible job (`/v1/events`),
validating a spec with the line of each field at fault (`/v1/jobs:validate`, and the lines of submit's
and estimate's 422s), and downloading an artifact's file (`/files/{path}`), by bearer token and by the
console's session cookie."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from httpx_sse import EventSource, connect_sse
from waiting import grpc_serving, pick_free_port, wait_until

from stillhouse.common.datasets.artifacts import upload_folder
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.control_plane.api.session import CSRF_HEADER, SESSION_COOKIE

SCRIPTED_STAGES = Path(__file__).with_name("scripted_stages.py")
TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789",
    "ops": "ops-token-0123456789",
    # Each of these is the one user of its tenant, and only one test acts as it: on the control plane
    # the module's tests share, its tenant's jobs are that test's alone.
    "carol": "carol-token-0123456789",
    "dave": "dave-token-0123456789",
    "erin": "erin-token-0123456789",
}
PRINCIPALS = {
    "principals": [
        {"name": "alice", "tenant": "team-a", "role": "user", "token": TOKENS["alice"]},
        {"name": "bob", "tenant": "team-b", "role": "user", "token": TOKENS["bob"]},
        {"name": "ops", "tenant": "platform", "role": "admin", "token": TOKENS["ops"]},
        {"name": "carol", "tenant": "team-c", "role": "user", "token": TOKENS["carol"]},
        {"name": "dave", "tenant": "team-d", "role": "user", "token": TOKENS["dave"]},
        {"name": "erin", "tenant": "team-e", "role": "user", "token": TOKENS["erin"]},
    ]
}
MINIMAL = {"spec": {"teacher": {"backend": "local", "model": "smollm2"}, "student": {"init": {"config": {}}}}}
YAML = {"Content-Type": "application/yaml"}
PHASES = ["Pending", "Prompts", "Teacher", "Training", "Evaluating", "Succeeded"]


@dataclass
class Platform:
    control_plane: object
    objects: LocalObjectStore
    inputs: Path

    def client(self, who: str, **headers: str) -> httpx.Client:
        client = self.control_plane.client(token=TOKENS[who])
        client.headers.update(headers)
        client.timeout = httpx.Timeout(30)
        return client

    def session(self, who: str) -> httpx.Client:
        """A client that authenticates as the console does: by the session cookie alone."""
        return httpx.Client(
            base_url=self.control_plane.url, cookies={SESSION_COOKIE: TOKENS[who]}, timeout=httpx.Timeout(30)
        )

    def submit(self, who: str) -> str:
        with self.client(who) as client:
            response = client.post("/v1/jobs", json=MINIMAL)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def wait_for_success(self, who: str, job_id: str, wait_until) -> None:
        with self.client(who) as client:
            wait_until(
                lambda: client.get(f"/v1/jobs/{job_id}").json()["phase"] == "Succeeded", 60, f"job {job_id}"
            )


def start_platform(control_plane_at, processes, root: Path, database_url: str) -> Platform:
    """Every stage scripted (jobs run through at once), a real storage service over `root/objects`, and
    the job store at `database_url`."""
    stages = f"127.0.0.1:{pick_free_port()}"
    processes.start(
        "stages", [sys.executable, str(SCRIPTED_STAGES), stages.split(":")[1], str(root / "j"), "0"]
    )
    storage = f"127.0.0.1:{pick_free_port()}"
    processes.start(
        "storage",
        [sys.executable, "-m", "stillhouse.cli.main", "serve", "storage", "--port", storage.split(":")[1]],
        {"STILLHOUSE_STORAGE_OBJECT_STORE__LOCAL_ROOT": str(root / "objects")},
    )
    wait_until(lambda: grpc_serving(stages) and grpc_serving(storage), 30, "the stage and storage services")
    principals = root / "principals.yaml"
    principals.write_text(yaml.safe_dump(PRINCIPALS))
    inputs = root / "inputs"
    inputs.mkdir()
    control_plane = control_plane_at(
        {"prompts": stages, "teacher": stages, "trainer": stages, "storage": storage},
        STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE=str(principals),
        STILLHOUSE_CONTROL_PLANE_DATABASE_URL=database_url,
        STILLHOUSE_CONTROL_PLANE_INPUT_ROOTS=json.dumps([str(inputs)]),
    )
    control_plane.start()
    objects = LocalObjectStore(root / "objects", "stillhouse")
    objects.ensure_bucket()
    return Platform(control_plane, objects, inputs)


@pytest.fixture(scope="module")
def platform(module_control_plane_at, module_processes) -> Platform:
    """One platform (`start_platform`, the job store on SQLite) for the module's tests that need none of
    their own: each works on jobs of its own, and reads the log from where it began."""
    root = module_processes.log_dir
    return start_platform(
        module_control_plane_at, module_processes, root, f"sqlite:///{root / 'databases' / 'test.db'}"
    )


@pytest.fixture
def own_platform(control_plane_at, processes, tmp_path, database_url) -> Platform:
    """A platform of the test's own (`start_platform`), the job store on SQLite or on PostgreSQL: for a
    test that follows every event there is, or stops the control plane."""
    return start_platform(control_plane_at, processes, tmp_path, database_url)


def phase_events(source: EventSource) -> Iterator[tuple[int, dict]]:
    for event in source.iter_sse():
        assert event.event == "phase", event
        yield int(event.id), json.loads(event.data)


def until_succeeded(source: EventSource, job_ids: set[str]) -> list[tuple[int, dict]]:
    """The stream's events up to the one where the last of `job_ids` succeeds."""
    events, waiting = [], set(job_ids)
    for event_id, data in phase_events(source):
        events.append((event_id, data))
        if data["phase"] == "Succeeded":
            waiting.discard(data["jobId"])
        if not waiting:
            return events
    raise AssertionError(f"the stream ended before {waiting} succeeded")


# --- /v1/events ------------------------------------------------------------------------------------


def test_events_show_each_caller_the_phase_changes_of_the_jobs_it_may_see(own_platform: Platform, wait_until):
    platform = own_platform
    # Bob's job ends before Alice's starts: were Alice's stream to carry it, it would come first.
    with platform.client("alice") as alice, platform.client("ops") as admin:
        with (
            connect_sse(alice, "GET", "/v1/events") as alices,
            connect_sse(admin, "GET", "/v1/events") as admins,
        ):
            theirs = platform.submit("bob")
            platform.wait_for_success("bob", theirs, wait_until)
            mine = platform.submit("alice")
            seen_by_alice = until_succeeded(alices, {mine})
            seen_by_admin = until_succeeded(admins, {mine, theirs})

        # Resuming after an event gives what came after it, of the caller's jobs only.
        middle = seen_by_alice[2][0]
        with connect_sse(alice, "GET", "/v1/events", headers={"Last-Event-ID": str(middle)}) as resumed:
            replayed = until_succeeded(resumed, {mine})

        # Without Last-Event-ID a stream starts from now: none of the past, then the next job.
        with connect_sse(alice, "GET", "/v1/events") as fresh:
            later = platform.submit("alice")
            (first_id, first), *_ = until_succeeded(fresh, {later})

    assert [data["phase"] for _, data in seen_by_alice] == PHASES
    assert {data["jobId"] for _, data in seen_by_alice} == {mine}
    for phase in PHASES:
        assert sum(1 for _, data in seen_by_admin if (data["jobId"], data["phase"]) == (theirs, phase)) == 1
        assert sum(1 for _, data in seen_by_admin if (data["jobId"], data["phase"]) == (mine, phase)) == 1
    ids = [event_id for event_id, _ in seen_by_admin]
    assert ids == sorted(ids)
    assert all(set(data) == {"jobId", "phase", "message", "at"} for _, data in seen_by_alice)
    assert all(data["at"].endswith(("Z", "+00:00")) for _, data in seen_by_alice)
    assert replayed == [event for event in seen_by_alice if event[0] > middle]
    assert (first["jobId"], first["phase"]) == (later, "Pending") and first_id > seen_by_alice[-1][0]


@pytest.mark.parametrize("last_event_id", ["abc", "-1", "1.5", "9" * 30, "0x10"])
def test_a_last_event_id_that_is_not_an_event_id_is_400(platform: Platform, last_event_id):
    with platform.client("alice") as alice:
        for path in ("/v1/events", f"/v1/jobs/{platform.submit('alice')}/events"):
            response = alice.get(path, headers={"Last-Event-ID": last_event_id})
            assert response.status_code == 400, (path, response.text)
            assert "Last-Event-ID must be an event id" in response.json()["message"]


def test_events_stream_ends_when_its_client_goes_away(platform: Platform, wait_until):
    start = len(platform.control_plane.log)

    def logged(event: str) -> bool:
        """Whether the control plane logged `event` of erin's feed (no other test opens one)."""
        lines = platform.control_plane.log_since(start).splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]
        return any((record["event"], record.get("principal")) == (event, "erin") for record in records)

    with platform.client("erin") as erin, connect_sse(erin, "GET", "/v1/events") as source:
        assert source.response.status_code == 200
        wait_until(lambda: logged("event feed opened"), 10, "the feed to open")
    wait_until(lambda: logged("event feed closed"), 10, "the feed to close")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_events_stream_ends_when_the_control_plane_stops(own_platform: Platform, processes):
    platform = own_platform
    with platform.client("alice") as alice, connect_sse(alice, "GET", "/v1/events") as source:
        assert source.response.status_code == 200
        started = time.monotonic()
        processes.stop(platform.control_plane.name)
        stopped_in = time.monotonic() - started
        # The stream ends (the server closes it mid-stream), rather than hang until the read times out.
        with pytest.raises(httpx.RemoteProtocolError):
            list(source.iter_sse())
    assert stopped_in < 10


# --- validate, and the lines of a spec's 422 -------------------------------------------------------

TYPO_3_DEEP = """\
apiVersion: stillhouse.dev/v1
kind: DistillationJob
metadata:
  name: typo
spec:
  teacher: {backend: local, model: smollm2}
  student:
    init:
      config: {}
  training:
    epochs: 1
    loss:
      kind: forward_kl
      ceWieght: 0.5
"""
MISSING_TEACHER = """\
kind: DistillationJob

spec:
  student:
    init: {config: {}}
"""


def test_validate_accepts_a_good_spec_and_stores_nothing(platform: Platform):
    with platform.client("carol") as carol:
        as_json = carol.post("/v1/jobs:validate", json=MINIMAL)
        as_yaml = carol.post("/v1/jobs:validate", content=yaml.safe_dump(MINIMAL), headers=YAML)
        assert carol.get("/v1/jobs").json()["jobs"] == []
    assert as_json.status_code == as_yaml.status_code == 200, as_json.text
    assert as_json.json() == as_yaml.json() == {"valid": True, "warnings": []}


@pytest.mark.parametrize("route", ["/v1/jobs:validate", "/v1/jobs", "/v1/jobs:estimate"])
def test_every_422_of_a_spec_names_the_line_of_each_field(platform: Platform, route):
    with platform.client("alice") as alice:
        typo = alice.post(route, content=TYPO_3_DEEP, headers=YAML)
        missing = alice.post(route, content=MISSING_TEACHER, headers=YAML)
        in_json = alice.post(
            route,
            content=json.dumps({**MINIMAL, "spec": {**MINIMAL["spec"], "training": {"epochs": 0}}}, indent=2),
            headers={"Content-Type": "application/json"},
        )
        outside = platform.inputs.parent / "elsewhere.jsonl"
        prompts = f"{TYPO_3_DEEP.split('  training:')[0]}  prompts:\n    sources:\n      - path: {outside}\n"
        outside_roots = alice.post(route, content=prompts, headers=YAML)

    def errors(response: httpx.Response) -> list[tuple[str, int | None]]:
        assert response.status_code == 422, response.text
        return [(error["field"], error["line"]) for error in response.json()["errors"]]

    assert errors(typo) == [("spec.training.loss.ceWieght", 14)]
    # A missing field is where its mapping is.
    assert errors(missing) == [("spec.teacher", 3)]
    # {"spec": {"teacher": {...3 lines...}, "student": {...3 lines}, "training": {"epochs": 0}}}
    assert errors(in_json) == [("spec.training.epochs", 13)]
    assert errors(outside_roots) == [("spec.prompts.sources[0].path", 12)]


def test_validate_refuses_unusable_bodies_with_4xx(platform: Platform):
    with platform.client("alice") as alice:
        huge = alice.post("/v1/jobs:validate", content=b" " * ((1 << 20) + 1), headers=YAML)
        garbage = alice.post("/v1/jobs:validate", content=b"\xff\xfe: [", headers=YAML)
        deep = alice.post("/v1/jobs:validate", content="- " * 100_000 + "x", headers=YAML)
        listed = alice.post("/v1/jobs:validate", json=[1, 2])
    assert huge.status_code == 413 and "at most" in huge.json()["message"]
    assert garbage.status_code == 400 and "not valid YAML" in garbage.json()["message"]
    assert deep.status_code == 400 and "nested more than" in deep.json()["message"]
    assert listed.status_code == 422 and "must be a DistillationJob object" in listed.json()["message"]


# --- artifact files -------------------------------------------------------------------------------


def student_artifact(platform: Platform, job_id: str, folder: Path) -> dict[str, bytes]:
    """Commit an artifact where the scripted trainer said it put the job's student; its files' bytes."""
    files = {"model.safetensors": bytes(range(256)) * 64, "tokenizer/config.json": b'{"vocab": 3}'}
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    upload_folder(platform.objects, f"jobs/{job_id}/train/student", folder)
    return files


def test_an_artifacts_file_downloads_from_a_local_store_and_nothing_else_does(
    platform: Platform, wait_until, tmp_path
):
    mine = platform.submit("alice")
    platform.wait_for_success("alice", mine, wait_until)
    files = student_artifact(platform, mine, tmp_path / "student")
    base = f"/v1/jobs/{mine}/artifacts/student/files"
    with platform.client("alice") as alice:
        listed = alice.get(f"/v1/jobs/{mine}/artifacts/student").json()
        downloads = {path: alice.get(f"{base}/{path}") for path in files}
        refused = {
            "dot-dot": alice.get(f"{base}/%2E%2E/%2E%2E/prompts/train/manifest.json"),
            "manifest": alice.get(f"{base}/manifest.json"),
            "absent": alice.get(f"{base}/nope.bin"),
            "empty": alice.get(f"{base}/"),
            "baseline": alice.get(f"/v1/jobs/{mine}/artifacts/baseline/files/model.safetensors"),
        }
    with platform.client("bob") as bob:
        theirs = bob.get(f"{base}/model.safetensors")

    assert {entry["path"] for entry in listed["files"]} == set(files)
    for path, response in downloads.items():
        assert response.status_code == 200, response.text
        assert response.content == files[path]
        assert hashlib.sha256(response.content).hexdigest() == next(
            entry["sha256"] for entry in listed["files"] if entry["path"] == path
        )
        assert response.headers["content-type"] == "application/octet-stream"
    assert (
        downloads["tokenizer/config.json"].headers["content-disposition"]
        == 'attachment; filename="config.json"'
    )
    for case, response in refused.items():
        assert response.status_code == 404, (case, response.text)
    assert "has no file '../../prompts/train/manifest.json'" in refused["dot-dot"].json()["message"]
    assert f"/v1/jobs/{mine}/artifacts/student" in refused["absent"].json()["message"]
    assert theirs.status_code == 404 and theirs.json()["message"] == f"no job with id {mine!r}"


def test_a_local_object_replaced_by_a_link_elsewhere_is_not_served(platform: Platform, wait_until, tmp_path):
    mine = platform.submit("alice")
    platform.wait_for_success("alice", mine, wait_until)
    student_artifact(platform, mine, tmp_path / "student")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"x" * (256 * 64))  # the size the manifest recorded
    stored = Path(platform.objects.folder) / "jobs" / mine / "train" / "student" / "model.safetensors"
    stored.unlink()
    stored.symlink_to(secret)
    with platform.client("alice") as alice:
        response = alice.get(f"/v1/jobs/{mine}/artifacts/student/files/model.safetensors")
    assert response.status_code == 502
    assert "is not a plain file of the object store" in response.json()["message"]
    assert b"xxxx" not in response.content


# --- the console's session cookie ------------------------------------------------------------------


def test_the_session_cookie_works_on_these_routes_and_a_post_needs_the_console_header(
    platform: Platform, wait_until, tmp_path
):
    mine = platform.submit("dave")
    platform.wait_for_success("dave", mine, wait_until)
    files = student_artifact(platform, mine, tmp_path / "student")
    with platform.session("dave") as console:
        without_header = console.post("/v1/jobs:validate", json=MINIMAL)
        with_header = console.post("/v1/jobs:validate", json=MINIMAL, headers={CSRF_HEADER: "1"})
        download = console.get(f"/v1/jobs/{mine}/artifacts/student/files/model.safetensors")
        with connect_sse(console, "GET", "/v1/events", headers={"Last-Event-ID": "0"}) as source:
            first_id, first = next(phase_events(source))
    with httpx.Client(
        base_url=platform.control_plane.url, cookies={SESSION_COOKIE: "not-a-token"}
    ) as stranger:
        refused = stranger.get("/v1/events")

    assert without_header.status_code == 403 and CSRF_HEADER in without_header.json()["message"]
    assert with_header.status_code == 200 and with_header.json()["valid"] is True
    assert download.status_code == 200 and download.content == files["model.safetensors"]
    assert (first["jobId"], first["phase"]) == (mine, "Pending") and first_id > 0
    assert refused.status_code == 401


def test_openapi_documents_the_consoles_routes(platform: Platform):
    paths = httpx.get(f"{platform.control_plane.url}/openapi.json").json()["paths"]
    events = paths["/v1/events"]["get"]
    assert {"200", "400", "401"} <= set(events["responses"])
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert "Last-Event-ID" in json.dumps(events["parameters"])
    validate = paths["/v1/jobs:validate"]["post"]
    assert {"200", "400", "401", "413", "415", "422"} <= set(validate["responses"])
    assert validate["requestBody"]["content"]["application/yaml"]["schema"]["$ref"].endswith(
        "/DistillationJob"
    )
    download = paths["/v1/jobs/{job_id}/artifacts/{name}/files/{path}"]["get"]
    assert {"200", "307", "401", "404", "502", "503"} <= set(download["responses"])
    assert "application/octet-stream" in download["responses"]["200"]["content"]
