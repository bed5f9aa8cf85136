"""Fixtures shared by the whole suite: free ports, and real processes that are always cleaned up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def pick_free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll `condition` until it returns something truthy; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Processes:
    """Child processes of one test; whatever is still running at teardown is killed."""

    log_dir: Path
    running: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to clean up, as in a crash or an OOM kill."""
        process = self.running.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self, name: str) -> int:
        process = self.running.pop(name)
        process.terminate()
        return process.wait(20)

    def stop_all(self) -> None:
        for name in list(self.running):
            process = self.running.pop(name)
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    group = Processes(log_dir=tmp_path)
    yield group
    group.stop_all()


def serve_argv(service: str, port: int) -> list[str]:
    return [sys.executable, "-m", "stillhouse.cli.main", "serve", service, "--port", str(port)]


# Test modules cannot import this file (it is not a package module), so helpers come as fixtures.
@pytest.fixture
def free_port() -> Callable[[], int]:
    return pick_free_port


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    return wait_until


@dataclass
class ControlPlane:
    """A real control plane process (`stillhouse serve control-plane`) that a test can kill and restart."""

    processes: Processes
    home: Path
    port: int
    services: dict[str, str]
    token: str = "test-token-0123456789"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.processes.log("control-plane")

    def start(self) -> None:
        token_file = self.home / "api-token"
        token_file.write_text(self.token + "\n")
        env = {
            "STILLHOUSE_HOME": str(self.home),
            "STILLHOUSE_CONTROL_PLANE_API_TOKEN_FILE": str(token_file),
            "STILLHOUSE_CONTROL_PLANE_DATABASE_URL": f"sqlite:///{self.home / 'stillhouse.db'}",
            "STILLHOUSE_CONTROL_PLANE_PROGRESS_EVENT_INTERVAL_SECONDS": "0.2",
            **{
                f"STILLHOUSE_CONTROL_PLANE_SERVICES__{name.upper()}": address
                for name, address in self.services.items()
            },
            **self.extra_env,
        }
        self.processes.start("control-plane", serve_argv("control-plane", self.port), env)
        wait_until(lambda: http_ready(self.url), 30, "the control plane to become ready")

    def kill(self) -> None:
        self.processes.kill("control-plane")

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token or self.token}"}, timeout=10
        )


@pytest.fixture
def control_plane_at(processes: Processes, tmp_path: Path) -> Callable[..., ControlPlane]:
    """Make (not start) a control plane talking to the given stage service addresses."""

    def make(services: dict[str, str], **extra_env: str) -> ControlPlane:
        return ControlPlane(processes, tmp_path, pick_free_port(), services, extra_env=extra_env)

    return make


@pytest.fixture
def grpc_ready() -> Callable[[str], bool]:
    return grpc_serving
