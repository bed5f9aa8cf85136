"""`stillhouse up` as a user runs it: the real supervisor and every service as its own process, on
loopback ports in a temporary home; stopped with Ctrl-C (SIGINT) at the end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

STILLHOUSE = Path(sys.executable).with_name("stillhouse")


@dataclass
class Embedded:
    home: Path
    process: subprocess.Popen[str]
    endpoint: dict
    children: list[psutil.Process]
    # Every process under the supervisor, including anything a service started itself.
    descendants: list[psutil.Process]
    healthy_after: float

    @property
    def api_url(self) -> str:
        return self.endpoint["apiUrl"]

    @property
    def token(self) -> str:
        return Path(self.endpoint["tokenFile"]).read_text().strip()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "STILLHOUSE_HOME": str(self.home)}
        env.pop("STILLHOUSE_API_URL", None)
        env.pop("STILLHOUSE_API_TOKEN", None)
        return subprocess.run([str(STILLHOUSE), *args], env=env, capture_output=True, text=True, timeout=60)

    def output(self) -> str:
        stdout, stderr = self.process.communicate(timeout=30)
        return stdout + stderr

    def logs(self, lines: int = 30) -> str:
        """The last `lines` of every service's log, to explain a failure."""
        return "".join(
            f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in sorted((self.home / "logs").glob("*.log"))
        )


def start_up(
    home: Path,
    api_port: int,
    *extra: str,
    env: dict[str, str] | None = None,
    own_group: bool = False,
) -> subprocess.Popen[str]:
    command = [str(STILLHOUSE), "up", "--home", str(home), "--api-port", str(api_port), *extra]
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Like a shell job: Ctrl-C in a terminal signals the whole foreground process group.
        process_group=0 if own_group else None,
    )


def wait_for_endpoint(home: Path, process: subprocess.Popen[str], timeout: float) -> dict:
    path = home / "endpoint.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(f"stillhouse up exited with {process.returncode}:\n{stdout}\n{stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"stillhouse up wrote no endpoint.json within {timeout} s")
        time.sleep(0.1)
    return json.loads(path.read_text())


@contextlib.contextmanager
def running_up(
    home: Path, api_port: int, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Embedded]:
    """`stillhouse up` with `extra` arguments (e.g. `--input-root DIR`) until the block ends."""
    started = time.monotonic()
    # This process's servers from before (a session's S3 server, say) are not the platform's to clean up.
    already_running = {child.pid for child in psutil.Process().children(recursive=True)}
    process = start_up(home, api_port, *extra, env=env, own_group=True)
    try:
        endpoint = wait_for_endpoint(home, process, timeout=60)
        healthy_after = time.monotonic() - started
        supervisor = psutil.Process(process.pid)
        yield Embedded(
            home, process, endpoint, supervisor.children(), supervisor.children(recursive=True), healthy_after
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for child in psutil.Process().children(recursive=True):
            if child.pid not in already_running and child.pid != process.pid and child.is_running():
                child.kill()


def platform_processes() -> list[psutil.Process]:
    """This process's descendants that run the Stillhouse CLI (an exited child not yet reaped runs
    nothing, and is left out)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
            if "stillhouse.cli.main" in child.cmdline():
                found.append(child)
    return found


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `processes` still alive after `timeout` seconds."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive
