"""Principals and tenants through a real control plane process: who sees which job, quotas, the audit
log and deleting jobs (with a real storage service over a local folder)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

SCRIPTED_STAGES = Path(__file__).with_name("scripted_stages.py")
TOKENS = {
    "alice": "alice-token-0123456789",
    "alice2": "alice2-token-0123456789",
    "bob": "bob-token-0123456789",
    "ops": "ops-token-0123456789",
}
PRINCIPALS = {
    "principals": [
        # The file may hold a token's hash only.
        {
            "name": "alice",
            "tenant": "team-a",
            "role": "user",
            "tokenSha256": hashlib.sha256(TOKENS["alice"].encode()).hexdigest(),
        },
        {"name": "alice2", "tenant": "team-a", "role": "user", "token": TOKENS["alice2"]},
        {"name": "bob", "tenant": "team-b", "role": "user", "token": TOKENS["bob"]},
        {"name": "ops", "tenant": "platform", "role": "admin", "token": TOKENS["ops"]},
    ],
    "tenants": {"team-a": {"maxConcurrentJobs": 2}, "team-b": {"maxTeacherSpendUsdPerDay": 10}},
}


def job(budget: float | None = None) -> dict:
    teacher = {"backend": "local", "model": "smollm2"} | ({"budgetUSD": budget} if budget else {})
    return {"spec": {"teacher": teacher, "student": {"init": {"config": {}}}}}


@dataclass
class Platform:
    control_plane: object
    objects: Path  # the storage service's bucket folder

    @property
    def log(self) -> str:
        return self.control_plane.log

    def client(self, who: str) -> httpx.Client:
        return self.control_plane.client(token=TOKENS.get(who) or self.control_plane.token)

    def submit(self, who: str, budget: float | None = None) -> str:
        with self.client(who) as client:
            response = client.post("/v1/jobs", json=job(budget))
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def cancel_and_wait(self, who: str, job_id: str, wait_until) -> None:
        with self.client(who) as client:
            assert client.post(f"/v1/jobs/{job_id}:cancel").status_code == 202
            wait_until(
                lambda: client.get(f"/v1/jobs/{job_id}").json()["phase"] == "Cancelled", 30, "cancellation"
            )


@pytest.fixture
def platform(control_plane_at, free_port, processes, grpc_ready, wait_until, tmp_path, request) -> Platform:
    """A control plane with the principals above, a scripted trainer (for the submit-time check), a real
    storage service, and no prompts or teacher service: jobs wait in Prompts until cancelled. An indirect
    parameter adds settings (environment variables) of the control plane."""
    trainer = f"127.0.0.1:{free_port()}"
    processes.start(
        "stages", [sys.executable, str(SCRIPTED_STAGES), trainer.split(":")[1], str(tmp_path / "j"), "0"]
    )
    storage = f"127.0.0.1:{free_port()}"
    processes.start(
        "storage",
        [sys.executable, "-m", "stillhouse.cli.main", "serve", "storage", "--port", storage.split(":")[1]],
        {"STILLHOUSE_STORAGE_OBJECT_STORE__LOCAL_ROOT": str(tmp_path / "objects")},
    )
    wait_until(lambda: grpc_ready(trainer) and grpc_ready(storage), 30, "the trainer and storage services")
    principals = tmp_path / "principals.yaml"
    principals.write_text(yaml.safe_dump(PRINCIPALS))
    services = {"prompts": f"127.0.0.1:{free_port()}", "teacher": f"127.0.0.1:{free_port()}"}
    control_plane = control_plane_at(
        {**services, "trainer": trainer, "storage": storage},
        STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE=str(principals),
        **getattr(request, "param", {}),
    )
    control_plane.start()
    return Platform(control_plane, tmp_path / "objects" / "stillhouse")


def test_a_user_sees_only_its_tenants_jobs_and_no_other_job_exists_for_it(platform: Platform):
    mine, theirs = platform.submit("alice"), platform.submit("bob", budget=1)

    with platform.client("alice") as alice:
        refused = [
            alice.get(f"/v1/jobs/{theirs}"),
            alice.post(f"/v1/jobs/{theirs}:cancel"),
            alice.get(f"/v1/jobs/{theirs}/events"),
            alice.get(f"/v1/jobs/{theirs}/artifacts/student"),
            alice.delete(f"/v1/jobs/{theirs}"),
        ]
        own = alice.get(f"/v1/jobs/{mine}").json()
        own_artifact = alice.get(f"/v1/jobs/{mine}/artifacts/student")
        listed = alice.get("/v1/jobs").json()["jobs"]
        listed_theirs = alice.get("/v1/jobs", params={"tenant": "team-b"}).json()["jobs"]
    with platform.client("alice2") as colleague:
        assert colleague.get(f"/v1/jobs/{mine}").status_code == 200
    with platform.client("bob") as bob:
        untouched = bob.get(f"/v1/jobs/{theirs}").json()
    with platform.client("ops") as admin:
        everything = {listed["id"] for listed in admin.get("/v1/jobs").json()["jobs"]}
        team_b = [
            listed["id"] for listed in admin.get("/v1/jobs", params={"tenant": "team-b"}).json()["jobs"]
        ]
        assert admin.get(f"/v1/jobs/{theirs}").status_code == 200
    with platform.client("legacy-admin") as legacy:  # the token file's token: an admin of `default`
        assert legacy.get(f"/v1/jobs/{mine}").status_code == 200

    # Exactly what a job that does not exist gets.
    assert [response.status_code for response in refused] == [404] * 5
    assert {response.json()["message"] for response in refused} == {f"no job with id {theirs!r}"}
    assert (own["owner"], own["tenant"]) == ("alice", "team-a")
    assert own_artifact.status_code == 404 and "has no student yet" in own_artifact.json()["message"]
    assert [listed["id"] for listed in listed] == [mine] and listed_theirs == []
    assert (untouched["cancelRequested"], untouched["phase"]) == (False, "Prompts")
    assert everything == {mine, theirs} and team_b == [theirs]


def test_a_submit_beyond_a_quota_is_429_naming_it(platform: Platform, wait_until):
    first = platform.submit("alice")
    platform.submit("alice2")
    with platform.client("alice") as alice:
        third = alice.post("/v1/jobs", json=job())
    platform.cancel_and_wait("alice", first, wait_until)
    platform.submit("alice")  # a place is free again

    with platform.client("bob") as bob:
        unbudgeted = bob.post("/v1/jobs", json=job())
        reserved = bob.post("/v1/jobs", json=job(budget=6)).json()["id"]
        too_much = bob.post("/v1/jobs", json=job(budget=5))
        assert bob.post("/v1/jobs", json=job(budget=4)).status_code == 201  # 6 + 4 is the whole day
    # A job that ended having spent nothing no longer holds its budget.
    platform.cancel_and_wait("bob", reserved, wait_until)
    platform.submit("bob", budget=5)

    assert third.status_code == 429
    assert "tenant 'team-a' has 2 unfinished jobs, its maxConcurrentJobs is 2" in third.json()["message"]
    assert unbudgeted.status_code == 422
    assert unbudgeted.json()["errors"][0]["field"] == "spec.teacher.budgetUSD"
    assert too_much.status_code == 429
    assert "maxTeacherSpendUsdPerDay of 10.00 USD" in too_much.json()["message"]
    assert "spent or reserved 6.00 USD" in too_much.json()["message"]


def test_every_mutating_call_is_audited_with_who_what_and_when_never_a_token(platform: Platform, wait_until):
    mine = platform.submit("alice")
    theirs = platform.submit("bob", budget=1)
    with platform.client("alice") as alice:
        statuses = {
            "estimate": alice.post("/v1/jobs:estimate", json=job()).status_code,
            "cancel theirs": alice.post(f"/v1/jobs/{theirs}:cancel").status_code,
            "delete running": alice.delete(f"/v1/jobs/{mine}").status_code,
        }
        assert alice.get("/v1/audit").status_code == 403
    platform.cancel_and_wait("alice", mine, wait_until)
    with platform.client("alice") as alice:
        statuses["delete"] = alice.delete(f"/v1/jobs/{mine}").status_code
    # Refused before there is a principal: logged as refusals, not audited.
    with httpx.Client(base_url=platform.control_plane.url) as anonymous:
        assert anonymous.post("/v1/jobs", json=job()).status_code == 401
        anonymous.headers["Authorization"] = "Bearer not-a-token-at-all"
        assert anonymous.post(f"/v1/jobs/{mine}:cancel").status_code == 401
    with platform.client("ops") as admin:
        entries = admin.get("/v1/audit", params={"pageSize": 500}).json()["entries"]
        bobs = admin.get("/v1/audit", params={"tenant": "team-b"}).json()["entries"]
        about_mine = admin.get("/v1/audit", params={"jobId": mine}).json()["entries"]

    rows = [(e["principal"], e["tenant"], e["method"], e["route"], e["jobId"], e["status"]) for e in entries]
    assert rows == [
        ("alice", "team-a", "DELETE", "/v1/jobs/{job_id}", mine, 204),
        ("alice", "team-a", "POST", "/v1/jobs/{job_id}:cancel", mine, 202),
        ("alice", "team-a", "DELETE", "/v1/jobs/{job_id}", mine, 409),
        ("alice", "team-a", "POST", "/v1/jobs/{job_id}:cancel", theirs, 404),
        ("alice", "team-a", "POST", "/v1/jobs:estimate", None, statuses["estimate"]),
        ("bob", "team-b", "POST", "/v1/jobs", theirs, 201),
        ("alice", "team-a", "POST", "/v1/jobs", mine, 201),
    ]
    assert statuses["cancel theirs"] == 404 and statuses["delete"] == 204
    assert [entry["principal"] for entry in bobs] == ["bob"]
    assert len(about_mine) == 4
    assert all(entry["createdAt"].endswith(("Z", "+00:00")) for entry in entries)
    log = platform.log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    logged = [
        (line["principal"], line["tenant"], line["method"], line["route"], line["job_id"], line["status"])
        for line in lines
        if line["event"] == "audit"
    ]
    assert logged == rows[::-1]
    for secret in [*TOKENS.values(), platform.control_plane.token, "not-a-token-at-all"]:
        assert secret not in log


def test_delete_removes_a_finished_jobs_objects_then_the_job(platform: Platform, wait_until, processes):
    doomed, kept = platform.submit("alice"), platform.submit("alice")
    with platform.client("alice") as alice:
        running = alice.delete(f"/v1/jobs/{doomed}")
    platform.cancel_and_wait("alice", doomed, wait_until)
    for job_id in (doomed, kept):
        for name in (
            "prompts/train/manifest.json",
            "prompts/train/shards/part-00000.parquet",
            "train/x/w.bin",
        ):
            path = platform.objects / "jobs" / job_id / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"data")

    with platform.client("alice") as alice:
        deleted = alice.delete(f"/v1/jobs/{doomed}")
        gone = alice.get(f"/v1/jobs/{doomed}")
        again = alice.delete(f"/v1/jobs/{doomed}")
        listed = [listed["id"] for listed in alice.get("/v1/jobs").json()["jobs"]]

    assert running.status_code == 409
    assert f"job {doomed} is Prompts: cancel it first" in running.json()["message"]
    assert deleted.status_code == 204 and deleted.content == b""
    assert gone.status_code == 404 and again.status_code == 404
    assert listed == [kept]
    assert not (platform.objects / "jobs" / doomed).exists()
    assert len(list((platform.objects / "jobs" / kept).rglob("*.*"))) == 3

    # Without the storage service nothing is deleted, and the job stays to be deleted later.
    platform.cancel_and_wait("alice", kept, wait_until)
    processes.stop("storage")
    with platform.client("alice") as alice:
        unavailable = alice.delete(f"/v1/jobs/{kept}")
        assert alice.get(f"/v1/jobs/{kept}").status_code == 200
    assert unavailable.status_code == 503
    assert "storage service: UNAVAILABLE" in unavailable.json()["message"]


@pytest.mark.parametrize(
    "platform",
    [
        {
            "STILLHOUSE_CONTROL_PLANE_FINISHED_JOB_MAX_AGE_HOURS": str(1 / 3600),
            "STILLHOUSE_CONTROL_PLANE_EXPIRY_SWEEP_INTERVAL_SECONDS": "0.2",
        }
    ],
    indirect=True,
)
def test_finished_jobs_expire_with_their_objects(platform: Platform, wait_until):
    finished, running = platform.submit("alice"), platform.submit("alice")
    for job_id in (finished, running):
        path = platform.objects / "jobs" / job_id / "prompts" / "train" / "manifest.json"
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    platform.cancel_and_wait("alice", finished, wait_until)

    with platform.client("alice") as alice:
        wait_until(lambda: alice.get(f"/v1/jobs/{finished}").status_code == 404, 30, "the expiry sweep")
        assert alice.get(f"/v1/jobs/{running}").json()["phase"] == "Prompts"
    with platform.client("ops") as admin:
        (expired,) = admin.get("/v1/audit", params={"jobId": finished, "pageSize": 1}).json()["entries"]

    assert not (platform.objects / "jobs" / finished).exists()
    assert (platform.objects / "jobs" / running / "prompts" / "train" / "manifest.json").exists()
    assert (expired["principal"], expired["tenant"], expired["method"], expired["status"]) == (
        "system:expiry",
        "team-a",
        "DELETE",
        204,
    )


def test_openapi_lists_the_new_routes_and_statuses(platform: Platform):
    paths = httpx.get(f"{platform.control_plane.url}/openapi.json").json()["paths"]
    assert {"204", "404", "409", "503"} <= set(paths["/v1/jobs/{job_id}"]["delete"]["responses"])
    assert {"201", "422", "429"} <= set(paths["/v1/jobs"]["post"]["responses"])
    assert {"200", "403"} <= set(paths["/v1/audit"]["get"]["responses"])
    assert "tenant" in json.dumps(paths["/v1/jobs"]["get"]["parameters"])
