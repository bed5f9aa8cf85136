"""`stillhouse up`: the real supervisor and real service processes, on loopback ports in a temp home."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from embedded_platform import STILLHOUSE, Embedded, platform_processes, running_up, start_up, wait_gone
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from service_token import authorized_channel, token_metadata
from sockets import is_loopback, listening_sockets
from typer.testing import CliRunner
from waiting import grpc_serving

from stillhouse.cli.embedded import (
    EmbeddedError,
    api_url_for,
    check_loopback,
    check_port_free,
    ensure_api_token,
    ensure_secrets_dir,
    ensure_service_token,
    write_endpoint_file,
)
from stillhouse.cli.main import app
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc

pytestmark = pytest.mark.long

INVALID_SPEC = (
    "spec: {teacher: {backend: local, model: smollm2, temprature: 0.5}, "
    "student: {init: {pruneTeacherDepth: 1}}}\n"
)


def valid_spec(make_model, folder: Path) -> str:
    """A job on a teacher that the submit-time check finds (its tokenizer and config; no weights)."""
    teacher = make_model(folder, context=2048)
    return json.dumps(
        {
            "spec": {
                "teacher": {"backend": "local", "model": str(teacher)},
                "student": {"init": {"pruneTeacherDepth": 1}},
            }
        }
    )


SERVICES = {"prompts", "teacher", "storage", "trainer", "control-plane"}


# --- the pieces -----------------------------------------------------------------------------------


def test_api_token_is_private_and_kept(tmp_path: Path) -> None:
    path = ensure_api_token(tmp_path)
    token = path.read_text().strip()
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_api_token(tmp_path).read_text().strip() == token


def test_the_teacher_key_folder_is_private(tmp_path: Path) -> None:
    folder = ensure_secrets_dir(tmp_path)
    assert folder == tmp_path / "secrets" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)
    (folder / "deepseek").write_text("sk-kept")
    assert ensure_secrets_dir(tmp_path) == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (folder / "deepseek").read_text() == "sk-kept"


def test_empty_token_file_gets_a_token(tmp_path: Path) -> None:
    (tmp_path / "api-token").write_text("")
    assert ensure_api_token(tmp_path).read_text().strip()


def test_busy_api_port_names_port_and_flag() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedError, match=rf"port {port} .*--api-port"):
            check_port_free("127.0.0.1", port)


def test_up_refuses_a_busy_api_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["up", "--home", str(tmp_path), "--api-port", str(port)])
    assert result.exit_code == 1
    assert f"cannot use port {port} on 127.0.0.1" in result.stderr
    assert "--api-port" in result.stderr
    assert not (tmp_path / "endpoint.json").exists()


def test_endpoint_file_is_replaced_whole(tmp_path: Path) -> None:
    write_endpoint_file(tmp_path, {"apiUrl": "old"})
    write_endpoint_file(tmp_path, {"apiUrl": "new"})
    assert json.loads((tmp_path / "endpoint.json").read_text()) == {"apiUrl": "new"}
    assert [path.name for path in tmp_path.iterdir()] == ["endpoint.json"]


def test_api_url_of_a_loopback_host() -> None:
    assert api_url_for("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert api_url_for("::1", 8080) == "http://[::1]:8080"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com"])
def test_up_listens_on_loopback_only(tmp_path: Path, host: str) -> None:
    with pytest.raises(EmbeddedError, match=f"--host {host} is not a loopback address"):
        check_loopback(host)
    result = CliRunner().invoke(app, ["up", "--home", str(tmp_path / "home"), "--host", host])
    assert result.exit_code == 1
    assert "is not a loopback address" in result.stderr and "Helm chart" in result.stderr
    assert not (tmp_path / "home").exists()
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert check_loopback(loopback) == loopback


def test_the_service_token_is_private_and_kept(tmp_path: Path) -> None:
    path = ensure_service_token(tmp_path)
    token = path.read_text().strip()
    assert path == tmp_path / "service-token" and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_service_token(tmp_path).read_text().strip() == token
    assert token != ensure_api_token(tmp_path).read_text().strip()


# --- the whole platform ---------------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path: Path, free_port) -> Iterator[Embedded]:
    with running_up(tmp_path / "home", free_port()) as platform:
        yield platform


# Health checks every second, two missed in a row kill a service: a stall is found within seconds.
QUICK_PROBES = {
    "STILLHOUSE_UP_PROBE_PERIOD_SECONDS": "1",
    "STILLHOUSE_UP_PROBE_TIMEOUT_SECONDS": "1",
    "STILLHOUSE_UP_PROBE_FAILURE_THRESHOLD": "2",
}


@pytest.fixture
def probed(tmp_path: Path, free_port) -> Iterator[Embedded]:
    with running_up(tmp_path / "home", free_port(), env=QUICK_PROBES) as platform:
        yield platform


def test_up_serves_jobs_and_stops_cleanly(embedded: Embedded, tokenizer_only_model, tmp_path: Path) -> None:
    assert embedded.healthy_after < 30
    assert embedded.endpoint["pid"] == embedded.process.pid
    assert embedded.endpoint["tokenFile"] == str(embedded.home / "api-token")
    assert set(embedded.endpoint["services"]) == {"prompts", "teacher", "storage", "trainer"}
    assert len(embedded.children) == 5
    commands = {child.cmdline()[4] for child in embedded.children}
    assert commands == SERVICES

    spec = tmp_path / "job.yaml"
    spec.write_text(valid_spec(tokenizer_only_model, tmp_path / "teacher"))
    submitted = embedded.cli("submit", "--quiet", str(spec))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id

    status = embedded.cli("status", job_id, "--output", "json")
    assert status.returncode == 0, status.stderr
    job = json.loads(status.stdout)
    assert job["id"] == job_id
    assert job["phase"] in {"Pending", "Prompts", "Teacher", "Training", "Evaluating", "Failed", "Succeeded"}

    listed = embedded.cli("status")
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout

    spec.write_text(INVALID_SPEC)
    refused = embedded.cli("submit", str(spec))
    assert refused.returncode == 2
    assert "spec.teacher.temprature" in refused.stderr
    assert embedded.process.poll() is None

    assert_only_loopback_listeners(embedded)
    assert_internal_calls_need_the_service_token(embedded)
    assert_home_is_private(embedded.home)

    embedded.process.send_signal(signal.SIGINT)
    assert wait_gone(embedded.descendants, timeout=15) == []
    assert embedded.process.wait(timeout=15) == 0
    assert not (embedded.home / "endpoint.json").exists()
    gone = embedded.cli("status")
    assert gone.returncode == 1
    assert "no Stillhouse API found" in gone.stderr


def assert_only_loopback_listeners(embedded: Embedded) -> None:
    """Every socket the platform's processes listen on is bound to a loopback address."""
    listening = listening_sockets([psutil.Process(embedded.process.pid), *embedded.descendants])
    ports = {port for _, _, port in listening}
    api_port = int(embedded.endpoint["apiUrl"].rsplit(":", 1)[1])
    service_ports = {int(address.rsplit(":", 1)[1]) for address in embedded.endpoint["services"].values()}
    assert {api_port, *service_ports} <= ports, listening
    assert [entry for entry in listening if not is_loopback(entry[1])] == []


def assert_internal_calls_need_the_service_token(embedded: Embedded) -> None:
    token = (embedded.home / "service-token").read_text().strip()
    get = operations_pb2.GetOperationRequest(operation_id="nope")
    for address in embedded.endpoint["services"].values():
        with grpc.insecure_channel(address) as channel:
            operations = operations_pb2_grpc.OperationsStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                operations.GetOperation(get, timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED, address
            with pytest.raises(grpc.RpcError) as passed:
                operations.GetOperation(get, metadata=token_metadata(token), timeout=10)
            assert passed.value.code() is grpc.StatusCode.NOT_FOUND, address
        # Reflection is on in embedded mode, behind the token.
        with authorized_channel(address, token) as channel:
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "stillhouse.common.v1.Operations" in services


def assert_home_is_private(home: Path) -> None:
    """The home and everything the platform wrote in it: folders 0700, files 0600 (or stricter)."""
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    written = list(home.rglob("*"))
    assert {"api-token", "service-token", "endpoint.json", "stillhouse.db", "logs"} <= {
        p.name for p in written
    }
    open_to_others = [
        (str(path), oct(stat.S_IMODE(path.lstat().st_mode)))
        for path in written
        if not path.is_symlink() and stat.S_IMODE(path.lstat().st_mode) & 0o077
    ]
    assert open_to_others == []


def test_sigterm_stops_everything(embedded: Embedded) -> None:
    embedded.process.terminate()
    assert wait_gone(embedded.descendants, timeout=15) == []
    assert embedded.process.wait(timeout=15) == 0


def test_killed_supervisor_leaves_no_orphans(embedded: Embedded) -> None:
    embedded.process.kill()
    embedded.process.wait(timeout=5)
    assert wait_gone(embedded.descendants, timeout=15) == []
    stale = embedded.cli("status")
    assert stale.returncode == 1
    assert "is no longer running" in stale.stderr


def service_process(embedded: Embedded, name: str) -> psutil.Process:
    """The running process of service `name` under the supervisor (a restart makes a new one)."""
    return next(
        child for child in psutil.Process(embedded.process.pid).children() if child.cmdline()[4:5] == [name]
    )


def restarted(embedded: Embedded, name: str, old_pid: int, timeout: float = 60) -> psutil.Process:
    """The new process of `name` once it serves again."""
    address = embedded.endpoint["services"].get(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert embedded.process.poll() is None, embedded.output()
        with contextlib.suppress(StopIteration, psutil.Error):
            process = service_process(embedded, name)
            if process.pid != old_pid and (address is None or grpc_serving(address)):
                return process
        time.sleep(0.2)
    pytest.fail(f"{name} was not serving again within {timeout} s")


def test_a_killed_service_is_restarted_with_backoff(embedded: Embedded) -> None:
    first = service_process(embedded, "teacher")
    first.kill()
    second = restarted(embedded, "teacher", first.pid)
    second.kill()  # at once: a second crash in a row waits twice as long
    restarted(embedded, "teacher", second.pid)
    # The rest kept running throughout, and the CLI still finds the API.
    assert embedded.cli("status").returncode == 0
    others = {name: service_process(embedded, name).pid for name in SERVICES - {"teacher"}}
    assert others == {child.cmdline()[4]: child.pid for child in embedded.children if child.pid != first.pid}
    embedded.process.send_signal(signal.SIGINT)
    assert embedded.process.wait(timeout=30) == 0
    output = embedded.output()
    assert "teacher exited unexpectedly (code -9): restarting it in 1 s (crash 1 in a row" in output
    assert "teacher exited unexpectedly (code -9): restarting it in 2 s (crash 2 in a row" in output
    assert wait_gone(embedded.descendants, timeout=5) == []


def test_a_killed_control_plane_is_restarted_and_the_api_answers_again(embedded: Embedded) -> None:
    first = service_process(embedded, "control-plane")
    first.kill()
    restarted(embedded, "control-plane", first.pid)
    deadline = time.monotonic() + 30
    while (status := embedded.cli("status")).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status.returncode == 0, status.stderr


def test_a_stopped_service_is_killed_and_restarted(probed: Embedded) -> None:
    stalled = service_process(probed, "storage")
    stalled.suspend()  # SIGSTOP: it keeps its port and connections, and answers nothing
    restarted(probed, "storage", stalled.pid)
    assert not stalled.is_running() or stalled.status() == psutil.STATUS_ZOMBIE
    probed.process.send_signal(signal.SIGINT)
    assert probed.process.wait(timeout=30) == 0
    output = probed.output()
    assert "storage did not answer 2 health checks in a row: killing it" in output
    assert "storage exited unexpectedly (code -9): restarting it in 1 s" in output


def test_a_second_up_on_the_same_home_is_refused(embedded: Embedded, free_port) -> None:
    second = start_up(embedded.home, free_port())
    assert second.wait(timeout=30) == 1
    _, stderr = second.communicate()
    assert f"Stillhouse is already running from {embedded.home}" in stderr


def test_a_service_that_cannot_start_is_reported(tmp_path: Path, free_port) -> None:
    process = start_up(tmp_path, free_port(), env={"STILLHOUSE_STORAGE_LOG_LEVEL": "loud"})
    assert process.wait(timeout=60) == 1
    _, stderr = process.communicate()
    assert "storage exited during start-up (code 2)" in stderr
    assert re.search(rf"last \d+ lines of {re.escape(str(tmp_path / 'logs' / 'storage.log'))}:", stderr)
    assert "log_level: Input should be" in stderr
    assert not (tmp_path / "endpoint.json").exists()
    assert platform_processes() == []


def test_ctrl_c_in_a_terminal_stops_cleanly(embedded: Embedded) -> None:
    os.killpg(embedded.process.pid, signal.SIGINT)
    assert embedded.process.wait(timeout=15) == 0
    assert "exited unexpectedly" not in embedded.output()
    assert wait_gone(embedded.descendants, timeout=5) == []
    assert not (embedded.home / "endpoint.json").exists()


def test_start_up_timeout_is_reported(tmp_path: Path, free_port) -> None:
    process = start_up(tmp_path, free_port(), "--timeout", "0.2")
    assert process.wait(timeout=30) == 1
    _, stderr = process.communicate()
    assert "did not become healthy within 0.2 s" in stderr
    assert not (tmp_path / "endpoint.json").exists()
    assert platform_processes() == []


# --- stillhouse run: one job, start to end, in one command -----------------------------------------


def run_job(tmp_path: Path, spec: str, api_port: int) -> subprocess.CompletedProcess:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(spec)
    home = tmp_path / "home"
    return subprocess.run(
        [str(STILLHOUSE), "run", str(spec_file), "--home", str(home), "--api-port", str(api_port)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_run_follows_the_job_to_its_end_and_stops_everything(
    tmp_path: Path, free_port, tokenizer_only_model
) -> None:
    result = run_job(tmp_path, valid_spec(tokenizer_only_model, tmp_path / "teacher"), free_port())
    output = result.stdout + result.stderr
    # A spec with no prompt sources and nothing to generate passes the schema but not the prompts stage:
    # the job must end Failed, with the service's reason.
    assert result.returncode == 1, output
    assert re.search(r"job job-[0-9a-f]+ submitted", output)
    assert "Failed" in output and "prompts service: INVALID_ARGUMENT" in output
    assert "Stillhouse stopped" in output
    assert not (tmp_path / "home" / "endpoint.json").exists()


def test_run_refuses_a_bad_spec_naming_the_field(tmp_path: Path, free_port) -> None:
    result = run_job(tmp_path, INVALID_SPEC, free_port())
    assert result.returncode == 2, result.stdout + result.stderr
    assert "spec.teacher.temprature" in result.stderr


def test_a_bad_restart_setting_is_refused_naming_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STILLHOUSE_UP_PROBE_PERIOD_SECONDS", "-1")
    result = CliRunner().invoke(app, ["up", "--home", str(tmp_path / "home")])
    assert result.exit_code == 1
    assert "STILLHOUSE_UP_PROBE_PERIOD_SECONDS: Input should be greater than 0" in result.stderr
    assert not (tmp_path / "home").exists()
