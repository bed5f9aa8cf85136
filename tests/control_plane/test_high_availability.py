"""Two real control plane processes on one PostgreSQL database, over real scripted stage services: one
leads and drives the jobs, both serve the API and the event streams, and the follower takes over when
the leader is killed, re-attaching to the running stage without starting any stage again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from httpx_sse import connect_sse
from scripted_jobs import STAGE_RPCS, start_stages, submit, wait_for_phase
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.long

LEASE_SECONDS = 2.0
LEADING = "leading: driving the jobs"
PHASES = ["Pending", "Prompts", "Teacher", "Training", "Evaluating", "Succeeded"]


def migrate(database_url: str) -> None:
    command = [sys.executable, "-m", "stillhouse.cli.main", "migrate", "--database-url", database_url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def control_plane_on(control_plane_at, services: dict[str, str], database_url: str, name: str):
    """A control plane (not started) that shares `database_url`, leaves the migrations to `stillhouse
    migrate`, holds the lead for LEASE_SECONDS, and finds other control planes' jobs by notification only
    (its look at the store comes too rarely to matter here)."""
    control_plane = control_plane_at(
        services,
        STILLHOUSE_CONTROL_PLANE_DATABASE_URL=database_url,
        STILLHOUSE_CONTROL_PLANE_MIGRATE_AT_START="false",
        STILLHOUSE_CONTROL_PLANE_LEADER_LEASE_SECONDS=str(LEASE_SECONDS),
        STILLHOUSE_CONTROL_PLANE_JOB_POLL_SECONDS="600",
    )
    control_plane.name = name
    return control_plane


@pytest.fixture
def pair(
    postgres_database_url, processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path, request
):
    """Scripted stage services taking `request.param` seconds a stage, and a leader and a follower on one
    migrated PostgreSQL database: (leader, follower, stages). The database is asked for first, so that
    it outlives the processes using it."""
    seconds = getattr(request, "param", 0.3)
    stages = start_stages(processes, free_port(), tmp_path / "journal.jsonl", seconds)
    wait_until(lambda: grpc_ready(stages.address), 20, "the scripted stage services")
    migrate(postgres_database_url)
    services = {name: stages.address for name in ("prompts", "teacher", "trainer", "storage")}
    leader = control_plane_on(control_plane_at, services, postgres_database_url, "leader")
    leader.start()
    wait_until(lambda: LEADING in leader.log, LEASE_SECONDS * 2, "the first control plane to lead")
    follower = control_plane_on(control_plane_at, services, postgres_database_url, "follower")
    follower.start()
    return leader, follower, stages


def drove(control_plane, job_id: str) -> bool:
    """Whether the control plane's log shows it moving the job through a phase."""
    return any("job phase" in line and job_id in line for line in control_plane.log.splitlines())


def test_a_job_submitted_to_the_follower_is_driven_by_the_leader_and_streamed_by_both(pair, wait_until):
    leader, follower, stages = pair
    with follower.client() as client:
        job_id = submit(client)
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", timeout=60) as source:
            events = [(event.event, json.loads(event.data)) for event in source.iter_sse()]
    with leader.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()

    assert job["phase"] == "Succeeded"
    assert [data["phase"] for kind, data in events if kind == "phase"] == PHASES
    assert {data["stage"] for kind, data in events if kind == "progress"} == {
        "prompts",
        "teacher",
        "train",
        "evaluate",
    }
    assert drove(leader, job_id) and not drove(follower, job_id)
    assert LEADING not in follower.log
    for rpc in STAGE_RPCS:
        assert len(stages.new_starts(rpc)) == 1, rpc


@pytest.mark.parametrize("pair", [5.0], indirect=True)
def test_a_cancel_asked_of_the_follower_stops_the_leaders_job(pair, wait_until):
    leader, follower, stages = pair
    with leader.client() as client:
        job_id = submit(client)
        wait_until(lambda: stages.new_starts("GeneratePrompts"), 10, "the prompts stage to start")
    with follower.client() as client:
        response = client.post(f"/v1/jobs/{job_id}:cancel")
        assert response.status_code == 202, response.text
        # Within the stage's 5 s: the notification, not the stage's end, brought the cancel over.
        ended = wait_for_phase(wait_until, client, job_id, {"Cancelled", "Failed", "Succeeded"}, 4)
        assert ended == "Cancelled"

    assert {"cancelled": stages.new_starts("GeneratePrompts")[0]} in stages.journal()
    assert not stages.new_starts("AnswerPrompts")
    assert not drove(follower, job_id)


@pytest.mark.parametrize("pair", [2.0], indirect=True)
def test_the_follower_takes_over_from_a_killed_leader_and_starts_no_stage_twice(pair, wait_until):
    leader, follower, stages = pair
    with leader.client() as client:
        job_id = submit(client)
        wait_for_phase(wait_until, client, job_id, {"Teacher"})
        wait_until(lambda: stages.new_starts("AnswerPrompts"), 10, "the teacher stage to start")

    leader.kill()
    killed_at = time.monotonic()
    before_takeover = len(stages.journal())
    wait_until(lambda: LEADING in follower.log, LEASE_SECONDS * 3, "the follower to take the lead", 0.02)
    took = time.monotonic() - killed_at

    with follower.client() as client:
        assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}, 60) == "Succeeded"
        job = client.get(f"/v1/jobs/{job_id}").json()

    # The lease had at most its length left, and a follower asks every quarter of it.
    assert took <= LEASE_SECONDS * 1.25 + 1.0, f"took the lead {took:.2f} s after the kill"
    after_takeover = stages.journal()[before_takeover:]
    assert not [entry for entry in after_takeover if entry.get("rpc") == "GeneratePrompts"]
    reattached = [entry for entry in after_takeover if entry.get("rpc") == "AnswerPrompts"]
    assert reattached and not any(entry["new"] for entry in reattached)
    for rpc in STAGE_RPCS:
        assert len(stages.new_starts(rpc)) == 1, f"{rpc} ran {len(stages.new_starts(rpc))} times"
    assert [step["attempt"] for step in job["steps"]] == [1, 1, 1, 1]
    assert drove(follower, job_id)


def logged_at(control_plane, event: str) -> str:
    """When the control plane first logged `event` (its JSON log's ISO timestamp)."""
    for line in control_plane.log.splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            return json.loads(line)["timestamp"]
    raise AssertionError(f"{control_plane.name} never logged {event!r}")


@pytest.mark.parametrize("partition", ["cut", "stall"])
def test_a_leader_cut_off_from_the_database_stops_driving_and_the_follower_carries_on(
    postgres_database_url, processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path, partition
):
    """`cut`: the leader's connections are dropped and refused; `stall`: they hang, answering nothing."""
    stages = start_stages(processes, free_port(), tmp_path / "journal.jsonl", 2.0)
    wait_until(lambda: grpc_ready(stages.address), 20, "the scripted stage services")
    migrate(postgres_database_url)
    services = {name: stages.address for name in ("prompts", "teacher", "trainer", "storage")}
    database = make_url(postgres_database_url)
    # The leader reaches PostgreSQL through a proxy that the test cuts; the stage services it still reaches.
    with TcpProxy(database.host or "127.0.0.1", database.port or 5432) as network:
        proxied = database.set(port=network.port).render_as_string(hide_password=False)
        leader = control_plane_on(control_plane_at, services, proxied, "leader")
        leader.start()
        wait_until(lambda: LEADING in leader.log, LEASE_SECONDS * 2, "the first control plane to lead")
        follower = control_plane_on(control_plane_at, services, postgres_database_url, "follower")
        follower.start()
        with follower.client() as client:
            job_id = submit(client)
            wait_for_phase(wait_until, client, job_id, {"Teacher"})
            getattr(network, partition)()
            wait_until(lambda: LEADING in follower.log, LEASE_SECONDS * 3, "the follower to take the lead")
            assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed"}, 60) == "Succeeded"

    assert logged_at(leader, "no longer leading: stopped driving the jobs") < logged_at(follower, LEADING)
    for rpc in STAGE_RPCS:
        assert len(stages.new_starts(rpc)) == 1, f"{rpc} ran {len(stages.new_starts(rpc))} times"


def test_a_replica_cut_off_in_the_middle_of_a_cancel_does_not_hold_the_jobs_row_against_the_leader(
    postgres_database_url, processes, free_port, wait_until, grpc_ready, control_plane_at, tmp_path
):
    """The replica's cancel writes the job's row, and its COMMIT is lost: PostgreSQL holds the row lock for
    the open transaction until the session's idle limit (a quarter of the lease, which the control plane
    gives its store) ends it. The leader's next write of that row then goes through, and the job goes on."""
    stages = start_stages(processes, free_port(), tmp_path / "journal.jsonl", 1.0)
    wait_until(lambda: grpc_ready(stages.address), 20, "the scripted stage services")
    migrate(postgres_database_url)
    services = {name: stages.address for name in ("prompts", "teacher", "trainer", "storage")}
    database = make_url(postgres_database_url)
    leader = control_plane_on(control_plane_at, services, postgres_database_url, "leader")
    leader.start()
    wait_until(lambda: LEADING in leader.log, LEASE_SECONDS * 2, "the first control plane to lead")
    with TcpProxy(database.host or "127.0.0.1", database.port or 5432) as network:
        proxied = database.set(port=network.port).render_as_string(hide_password=False)
        replica = control_plane_on(control_plane_at, services, proxied, "replica")
        replica.start()
        with (
            leader.client() as client,
            replica.client() as replica_client,
            ThreadPoolExecutor(1) as background,
        ):
            job_id = submit(client)
            wait_for_phase(wait_until, client, job_id, {"Prompts"})
            network.stall_at_commit_after(b"cancel_requested")
            cancel = background.submit(replica_client.post, f"/v1/jobs/{job_id}:cancel", timeout=3)
            wait_until(lambda: network.stalled, 10, "the replica's cancel to lose its COMMIT")
            assert wait_for_phase(wait_until, client, job_id, {"Succeeded", "Failed", "Cancelled"}, 30) == (
                "Succeeded"
            )
            with pytest.raises(httpx.TimeoutException):
                cancel.result()


def test_a_control_plane_that_leaves_migrating_to_the_command_waits_for_it(
    postgres_database_url, processes, free_port, control_plane_at
):
    services = {name: f"127.0.0.1:{free_port()}" for name in ("prompts", "teacher", "trainer", "storage")}
    control_plane = control_plane_on(control_plane_at, services, postgres_database_url, "control-plane")
    later = threading.Timer(3.0, migrate, [postgres_database_url])
    later.start()
    try:
        control_plane.start()  # ready only once `stillhouse migrate` has run
    finally:
        later.join()
    assert "waiting for the job store's migrations: run `stillhouse migrate`" in control_plane.log
    with control_plane.client() as client:
        assert client.get("/v1/jobs").status_code == 200
