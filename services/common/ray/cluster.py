"""Where Ray jobs run: a Ray cluster's job-submission address, or a Ray head this process starts itself.

The local head is `ray start --head --block` as a child process. Ray ties the head's own processes to
that child (they die with it), and the kernel tells the child to exit when this process dies
(PR_SET_PDEATHSIG), so a killed service leaves no Ray behind.

The head serves this machine only: every Ray process binds 127.0.0.1 (Ray otherwise puts its GCS, raylet
and agents on all interfaces, and its client server on the machine's network address), it wants its
auth token on every call, and its files are its owner's alone (umask 077).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from stillhouse.common.ray.settings import LocalRaySettings

LOOPBACK = "127.0.0.1"
HEAD_LOG_FILE = "ray-head.log"
RAY_DIR = "r"  # short: Ray's socket paths under it are limited (see config.MAX_RAY_TEMP_DIR_CHARS)
STOP_GRACE_SECONDS = 15.0
PRIVATE_UMASK = 0o077


class RayUnreachable(Exception):
    """No Ray job API answers at an address (down, wrong address, refused, timed out)."""


class RayHeadError(Exception):
    """The local Ray head could not be started."""


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_reachable(address: str, timeout_seconds: float, headers: dict[str, str] | None = None) -> str:
    """The Ray version serving the job API at `address`; RayUnreachable, within the timeout, if none."""
    try:
        reply = httpx.get(f"{address.rstrip('/')}/api/version", headers=headers, timeout=timeout_seconds)
        reply.raise_for_status()
        return str(reply.json()["ray_version"])
    except httpx.TimeoutException:
        reason = f"no answer within {timeout_seconds:g} s"
    except httpx.HTTPStatusError as exc:
        reason = f"HTTP {exc.response.status_code} from /api/version"
        if exc.response.status_code in (401, 403):
            reason += " (the cluster wants a Ray auth token: set ray_auth_token_file)"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        reason = str(exc) or type(exc).__name__
    raise RayUnreachable(f"cannot reach the Ray cluster at {address}: {reason}")


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


# Run as `python -c _DIE_WITH_PARENT <parent pid> <program> <args...>`: asks the kernel to SIGTERM this
# process when its parent dies, then becomes <program> (the request survives exec). A preexec_fn would do
# the same between fork and exec, which is unsafe in a process with threads (gRPC's).
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _dying_with_this_process(command: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


class LocalRayHead:
    """A one-node Ray cluster owned by this process. `start` must run on a thread that lives as long as
    the head (the event loop's), because the kernel's parent-death signal follows the starting thread."""

    def __init__(self, settings: LocalRaySettings, extra_env: Mapping[str, str] | None = None) -> None:
        self._settings = settings
        self._extra_env = dict(extra_env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.token: str | None = None

    @property
    def temp_dir(self) -> Path:
        return self._settings.temp_dir

    @property
    def ray_dir(self) -> Path:
        """Ray's own temp dir, which Ray opens to everyone (mode 0777): inside the private `temp_dir`, only
        its owner reaches the sockets (the object store's takes no token) and files under it."""
        return self.temp_dir / RAY_DIR

    @property
    def log_path(self) -> Path:
        return self.temp_dir / HEAD_LOG_FILE

    def start(self) -> None:
        """Spawn the head; `wait_ready` then waits for its job API."""
        settings = self._settings
        self.temp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.temp_dir.chmod(0o700)
        gcs_port, client_port, agent_port, free_dashboard_port = _free_ports(4)
        dashboard_port = settings.dashboard_port or free_dashboard_port
        env = {
            **{name: value for name, value in os.environ.items() if name != "RAY_AUTH_TOKEN"},
            **self._extra_env,
            "RAY_AUTH_MODE": settings.auth_mode,
            # Ray's single-machine mode: `ray start` would otherwise replace --node-ip-address=127.0.0.1
            # with the machine's network address, and its servers would bind every interface.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # SIGTERM stops the head at once: it runs nothing that needs draining.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        if settings.auth_mode == "token":
            self.token = self._ensure_token()
            env["RAY_AUTH_TOKEN_PATH"] = str(settings.auth_token_file)
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--temp-dir={self.ray_dir}",
            f"--node-ip-address={LOOPBACK}",
            f"--port={gcs_port}",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={client_port}",
            f"--dashboard-agent-listen-port={agent_port}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ]
        if settings.num_cpus is not None:
            command.append(f"--num-cpus={settings.num_cpus}")
        if settings.num_gpus is not None:
            command.append(f"--num-gpus={settings.num_gpus}")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                _dying_with_this_process(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                umask=PRIVATE_UMASK,
            )
        self.address = f"http://{LOOPBACK}:{dashboard_port}"

    def wait_ready(self) -> None:
        """Block until the head's job API answers; RayHeadError (with the head's last log lines) if it
        exits or does not answer within the start-up timeout."""
        deadline = time.monotonic() + self._settings.startup_timeout_seconds
        while True:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise RayHeadError(f"the local Ray head exited during start-up (code {code}): {self._tail()}")
            try:
                check_reachable(self.address, 2.0, auth_headers(self.token))
                return
            except RayUnreachable:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RayHeadError(
                    f"the local Ray head did not answer at {self.address} within "
                    f"{self._settings.startup_timeout_seconds:g} s: {self._tail()}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM the head (it stops its own processes), SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def _ensure_token(self) -> str:
        """The head's token, from its file (created, mode 0600, in a folder created 0700, if missing)."""
        path = self._settings.auth_token_file
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists() or not path.read_text().strip():
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as token_file:
                token_file.write(secrets.token_hex(32))
        path.chmod(0o600)
        return path.read_text().strip()

    def _tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())
