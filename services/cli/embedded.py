"""`stillhouse up`: every service on this machine, as child processes on loopback ports, under one supervisor.

The supervisor starts the four stage services and the control plane (each one `stillhouse serve ...`),
waits until every one answers its health check, writes `<home>/endpoint.json` for the CLI to find the
API, and then watches, as Kubernetes would (restart_policy.py): a service that exits is started again
with backoff, and one that stops answering its health check is killed and started again; jobs carry on
(the control plane re-attaches to their running stages). On Ctrl-C or SIGTERM it stops them all.
Children are told by the kernel to exit when the supervisor does (PR_SET_PDEATHSIG), so even a killed
supervisor leaves nothing behind.

Jobs read local files only from the input roots the supervisor gives the control plane and the prompts
service: `<home>/inputs` and the folders it was given (`stillhouse run` gives the spec's folder).

Everything listens on loopback only, and every internal call carries the service token the supervisor
keeps in `<home>/service-token`. The home folder and all it holds are its owner's alone: folders 0700,
files 0600, and the services (and the Ray head the trainer starts) run with umask 077.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from stillhouse.cli.display import endpoint_panel
from stillhouse.cli.restart_policy import RestartPolicy
from stillhouse.client.endpoint import ENDPOINT_FILE, ApiEndpoint

STAGE_SERVICES = ("prompts", "teacher", "storage", "trainer")
SECRETS_DIR = "secrets"
INPUTS_DIR = "inputs"  # always an input root of `stillhouse up`
CONTROL_PLANE = "control-plane"
TOKEN_FILE = "api-token"
SERVICE_TOKEN_FILE = "service-token"
LOOPBACK = "127.0.0.1"
PRIVATE_UMASK = 0o077

# After SIGTERM, children get this long in all to stop before they are killed.
STOP_GRACE_SECONDS = 10.0
# ...of which the control plane gets at most this much alone, so it stops handing out work first.
CONTROL_PLANE_GRACE_SECONDS = 5.0
LOG_TAIL_LINES = 20
POLL_SECONDS = 0.2

_PR_SET_PDEATHSIG = 1


class EmbeddedError(Exception):
    """A reason `stillhouse up` cannot start, worded for the user."""


@dataclass
class Child:
    """One service process of the embedded platform."""

    name: str
    port: int
    log_path: Path
    metrics_port: int | None = None
    host: str = LOOPBACK
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    # Where this run's output starts in the (appended) log file.
    log_offset: int = 0
    # Keeping it running: when this run started, crashes without a long enough run in between, when
    # the next start is due (set while it waits to be restarted), failed health checks in a row, and
    # whether this run has answered one yet.
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float | None = None
    probe_failures: int = 0
    answered: bool = False
    next_probe_at: float = 0.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "stillhouse.cli.main", "serve", self.name]
        command += ["--host", self.host, "--port", str(self.port)]
        if self.metrics_port is not None:
            command += ["--metrics-port", str(self.metrics_port)]
        return command

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last lines this run wrote to the log (reads at most the last 64 KiB)."""
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self.log_offset, size - 65536))
                text = log.read().decode(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]


def restart_policy_from_environment() -> RestartPolicy:
    """The `STILLHOUSE_UP_*` settings; EmbeddedError naming each one that is refused, and why."""
    from pydantic import ValidationError

    try:
        return RestartPolicy()
    except ValidationError as exc:
        problems = "; ".join(
            f"STILLHOUSE_UP_{'_'.join(map(str, error['loc'])).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise EmbeddedError(f"cannot use the restart settings: {problems}") from None


def ensure_token_file(path: Path) -> Path:
    """`path`, created (mode 0600) with a fresh random token unless one is already there."""
    if path.exists() and path.read_text().strip():
        path.chmod(0o600)
        return path
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as token_file:
        token_file.write(secrets.token_urlsafe(32) + "\n")
    return path


def ensure_api_token(home: Path) -> Path:
    """`<home>/api-token`: the token the CLI sends to the REST API."""
    return ensure_token_file(home / TOKEN_FILE)


def ensure_service_token(home: Path) -> Path:
    """`<home>/service-token`: the token every internal gRPC call carries."""
    return ensure_token_file(home / SERVICE_TOKEN_FILE)


def ensure_private_dir(path: Path) -> Path:
    """`path`, created if missing, and kept readable by its owner only (mode 0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def check_loopback(host: str) -> str:
    """`host` if it is a loopback address; EmbeddedError otherwise: embedded mode serves this machine only."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise EmbeddedError(
            f"--host {host} is not a loopback address: `stillhouse up` serves this machine only "
            "(127.0.0.1, ::1 or localhost); to serve others, install the Helm chart on a cluster"
        )
    return host


def ensure_secrets_dir(home: Path) -> Path:
    """`<home>/secrets`, the embedded teacher's key folder (`apiKeySecret: NAME` reads the file NAME):
    created, and kept, readable by its owner only (mode 0700)."""
    return ensure_private_dir(home / SECRETS_DIR)


def check_port_free(host: str, port: int) -> None:
    """Raise EmbeddedError naming the port and the flag to change it if `port` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Like uvicorn: a port only held by connections in TIME_WAIT is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise EmbeddedError(
                f"cannot use port {port} on {host} for the API ({exc.strerror}): "
                f"choose another with --api-port"
            ) from exc


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct ports the OS reports free on 127.0.0.1 (held together so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def api_url_for(host: str, port: int) -> str:
    """The URL a local client uses to reach the API listening on `host`."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_endpoint_file(home: Path, endpoint: dict[str, Any]) -> Path:
    """Write `<home>/endpoint.json` (mode 0600) atomically, so a reader never sees half of it."""
    path = home / ENDPOINT_FILE
    tmp = path.with_name(f".{ENDPOINT_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as endpoint_file:
        endpoint_file.write(json.dumps(endpoint, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def running_instance(home: Path) -> dict[str, Any] | None:
    """The endpoint of a `stillhouse up` still running from `home`, if there is one."""
    try:
        endpoint = json.loads((home / ENDPOINT_FILE).read_text())
        pid = int(endpoint["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return endpoint


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM the child when the supervisor dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    # Loaded before fork: the child should do as little as possible between fork and exec.
    libc = ctypes.CDLL(None, use_errno=True)
    supervisor_pid = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The supervisor may have died before prctl took effect: then nobody would ever signal us.
        if os.getppid() != supervisor_pid:
            os._exit(1)

    return preexec


@dataclass
class Supervisor:
    home: Path
    api_port: int = 8080
    host: str = LOOPBACK
    startup_timeout: float = 60.0
    # Folders jobs may read local prompt sources and slot files from, besides $STILLHOUSE_HOME/inputs.
    input_roots: tuple[Path, ...] = ()
    restart_policy: RestartPolicy = field(default_factory=restart_policy_from_environment)
    console: Console = field(default_factory=Console)
    err_console: Console = field(default_factory=lambda: Console(stderr=True))

    children: list[Child] = field(default_factory=list, init=False)
    # The environment the services start from: this process's, as it was before `run` changed it.
    _child_env: dict[str, str] = field(default_factory=dict, init=False)
    _stop_signals: int = field(default=0, init=False)

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def api_url(self) -> str:
        return api_url_for(self.host, self.api_port)

    def run(self, session: Callable[[ApiEndpoint], int] | None = None) -> int:
        """Start everything and serve until asked to stop, or, given a `session`, until the session
        (run in a thread against the API) returns; the process exit code."""
        check_loopback(self.host)
        ensure_private_dir(self.home)
        ensure_private_dir(self.logs_dir)
        running = running_instance(self.home)
        if running is not None:
            raise EmbeddedError(
                f"Stillhouse is already running from {self.home} (pid {running['pid']}, "
                f"API {running.get('apiUrl')}): stop it, or give another --home"
            )
        check_port_free(self.host, self.api_port)
        self._child_env = dict(os.environ)
        # Children are forked while the health probes' gRPC threads run; gRPC's fork handlers then abort
        # a child now and then before it can exec. Nothing here uses gRPC after a fork, so they are off.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        token_file = ensure_api_token(self.home)
        service_token_file = ensure_service_token(self.home)

        with self._stop_on_signals():
            try:
                self._start_children(token_file, service_token_file)
                failed = self._wait_until_healthy()
                if failed is not None:
                    self._report_failure(*failed)
                    return 1
                if self._stop_signals:
                    return 0
                self._publish_endpoint(token_file)
                if session is None:
                    self._watch()
                else:
                    endpoint = ApiEndpoint(self.api_url, token_file.read_text().strip())
                    outcome: dict[str, int] = {}
                    worker = threading.Thread(
                        target=lambda: outcome.update(code=session(endpoint)), name="session", daemon=True
                    )
                    worker.start()
                    self._watch(until=lambda: not worker.is_alive())
                if session is not None:
                    # Stopped by Ctrl-C before the session ended: the shell's code for an interrupt.
                    return outcome.get("code", 130)
                return 0
            finally:
                self._stop_children()
                (self.home / ENDPOINT_FILE).unlink(missing_ok=True)

    # --- start-up -------------------------------------------------------------------------------

    def _start_children(self, token_file: Path, service_token_file: Path) -> None:
        ports = free_loopback_ports(2 * len(STAGE_SERVICES))
        services = [
            Child(name, port=port, metrics_port=metrics_port, log_path=self.logs_dir / f"{name}.log")
            for name, port, metrics_port in zip(STAGE_SERVICES, ports[::2], ports[1::2], strict=True)
        ]
        control_plane = Child(
            CONTROL_PLANE, port=self.api_port, host=self.host, log_path=self.logs_dir / f"{CONTROL_PLANE}.log"
        )
        base_env = {**self._child_env, "STILLHOUSE_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        control_plane_env = {
            **base_env,
            "STILLHOUSE_CONTROL_PLANE_API_TOKEN_FILE": str(token_file),
            "STILLHOUSE_CONTROL_PLANE_SERVICE_TOKEN_FILE": str(service_token_file),
            "STILLHOUSE_CONTROL_PLANE_DATABASE_URL": f"sqlite:///{self.home / 'stillhouse.db'}",
            **{f"STILLHOUSE_CONTROL_PLANE_SERVICES__{svc.name.upper()}": svc.address for svc in services},
        }
        roots = json.dumps([str(folder) for folder in self._input_roots()])
        control_plane_env["STILLHOUSE_CONTROL_PLANE_INPUT_ROOTS"] = roots
        by_name = {child.name: child for child in services}
        service_env = {
            "prompts": {
                # Prompt generation (self_instruct, evol_instruct) goes through the teacher service.
                "STILLHOUSE_PROMPTS_TEACHER_ADDRESS": by_name["teacher"].address,
                "STILLHOUSE_PROMPTS_INPUT_ROOTS": roots,
            },
        }
        if "STILLHOUSE_TEACHER_API_KEY_DIR" not in base_env:
            service_env["teacher"] = {"STILLHOUSE_TEACHER_API_KEY_DIR": str(ensure_secrets_dir(self.home))}
        if "STILLHOUSE_TEACHER_EGRESS_ALLOW" not in base_env:
            # On one machine, an OpenAI-compatible server on loopback (llama.cpp, vLLM) is a normal teacher.
            loopback = json.dumps(["127.0.0.0/8", "::1/128"])
            service_env.setdefault("teacher", {})["STILLHOUSE_TEACHER_EGRESS_ALLOW"] = loopback
        for child in services:
            prefix = f"STILLHOUSE_{child.name.upper()}_"
            credential_env = {
                f"{prefix}SERVICE_TOKEN_FILE": str(service_token_file),
                # Handy on one machine (grpcurl); still behind the service token.
                f"{prefix}REFLECTION": "true",
            }
            child.env = {**base_env, **credential_env, **service_env.get(child.name, {})}
            self.children.append(child)
            self._spawn(child)
        control_plane.env = control_plane_env
        self.children.append(control_plane)
        self._spawn(control_plane)

    def _input_roots(self) -> list[Path]:
        return [ensure_private_dir(self.home / INPUTS_DIR), *self.input_roots]

    def _spawn(self, child: Child) -> None:
        fd = os.open(child.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "ab") as log:
            child.log_offset = log.tell()
            started = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"=== stillhouse up: starting {child.name} on {child.address} at {started}\n".encode())
            log.flush()
            child.process = subprocess.Popen(
                child.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child.env,
                preexec_fn=_die_with_parent(),
                umask=PRIVATE_UMASK,
            )
        child.started_at = time.monotonic()
        child.restart_at = None
        child.probe_failures = 0
        child.answered = False
        child.next_probe_at = child.started_at + self.restart_policy.probe_period_seconds

    def _wait_until_healthy(self) -> tuple[list[Child], str] | None:
        """None once every child answers healthy (or a stop was asked for); else the culprits and why."""
        pending = {child.name: child for child in self.children}
        deadline = time.monotonic() + self.startup_timeout
        with HealthProbe(self.api_url) as probe, self.err_console.status("starting Stillhouse...") as status:
            while pending and not self._stop_signals:
                for name, child in list(pending.items()):
                    if child.exit_code() is not None:
                        return [child], f"{name} exited during start-up (code {child.exit_code()})"
                    if probe.answers(child, timeout=1.0, ready=True):
                        child.answered = True
                        del pending[name]
                status.update(f"starting Stillhouse... waiting for {', '.join(pending) or 'nothing'}")
                if not pending:
                    break
                if time.monotonic() > deadline:
                    reason = f"{', '.join(pending)} did not become healthy within {self.startup_timeout:g} s"
                    return list(pending.values()), reason
                time.sleep(POLL_SECONDS)
        return None

    def _publish_endpoint(self, token_file: Path) -> None:
        write_endpoint_file(
            self.home,
            {
                "apiUrl": self.api_url,
                "tokenFile": str(token_file),
                "pid": os.getpid(),
                "services": {
                    child.name: child.address for child in self.children if child.name != CONTROL_PLANE
                },
            },
        )
        self.console.print(endpoint_panel(self.api_url, str(token_file), str(self.logs_dir)))

    # --- running and stopping -------------------------------------------------------------------

    def _watch(self, until: Callable[[], bool] = lambda: False) -> None:
        """Keep every child running until a stop is asked for or `until()` holds. Health checks run side
        by side in threads, so a child that hangs its check delays no other child's."""
        with (
            HealthProbe(self.api_url) as probe,
            ThreadPoolExecutor(len(self.children), thread_name_prefix="health-check") as checks,
        ):
            running: dict[str, tuple[int, Future[bool]]] = {}
            while not self._stop_signals and not until():
                for child in self.children:
                    if self._stop_signals:
                        break
                    self._keep_running(child, probe, checks, running)
                time.sleep(POLL_SECONDS)

    def _keep_running(
        self,
        child: Child,
        probe: HealthProbe,
        checks: ThreadPoolExecutor,
        running: dict[str, tuple[int, Future[bool]]],
    ) -> None:
        """One look at `child`: restart it when due, note that it exited, or check its health."""
        policy = self.restart_policy
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                self._spawn(child)
            return
        code = child.exit_code()
        if code is not None:
            child.crashes = policy.crashes_in_a_row(child.crashes, now - child.started_at)
            delay = policy.backoff_seconds(child.crashes)
            child.restart_at = now + delay
            self.err_console.print(
                Text(
                    f"{child.name} exited unexpectedly (code {code}): restarting it in {delay:g} s "
                    f"(crash {child.crashes} in a row; its log is {child.log_path})",
                    style="bold yellow",
                ),
                highlight=False,
            )
            return
        assert child.process is not None
        if child.name not in running:
            if now >= child.next_probe_at:
                child.next_probe_at = now + policy.probe_period_seconds
                check = checks.submit(probe.answers, child, timeout=policy.probe_timeout_seconds)
                running[child.name] = (child.process.pid, check)
            return
        pid, check = running[child.name]
        if not check.done():
            return
        del running[child.name]
        if pid != child.process.pid:
            return  # a check of the process before a restart
        if check.result():
            child.answered, child.probe_failures = True, 0
            return
        if child.answered:
            child.probe_failures += 1
            if child.probe_failures < policy.probe_failure_threshold:
                return
            reason = f"did not answer {child.probe_failures} health checks in a row"
        elif now - child.started_at > policy.start_timeout_seconds:
            reason = f"did not answer its health check within {policy.start_timeout_seconds:g} s of starting"
        else:
            return
        warning = Text(f"{child.name} {reason}: killing it", style="bold yellow")
        self.err_console.print(warning, highlight=False)
        _send(child, signal.SIGKILL)
        # A stopped process takes SIGKILL at once; reap it so the next look sees it exited.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=5)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        def on_signal(signum: int, frame: object) -> None:
            self._stop_signals += 1

        previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_children(self) -> None:
        """SIGTERM (the control plane first), wait up to STOP_GRACE_SECONDS, SIGKILL what is left.
        A second Ctrl-C skips the wait."""
        running = [child for child in self.children if child.is_running()]
        if not running:
            return
        self.err_console.print("stopping Stillhouse...")
        signals_seen = self._stop_signals
        deadline = time.monotonic() + STOP_GRACE_SECONDS

        def wait(children: list[Child], until: float) -> None:
            while any(child.is_running() for child in children) and time.monotonic() < until:
                if self._stop_signals > signals_seen:
                    return
                time.sleep(0.05)

        first = [child for child in running if child.name == CONTROL_PLANE]
        for child in first:
            _send(child, signal.SIGTERM)
        wait(first, min(deadline, time.monotonic() + CONTROL_PLANE_GRACE_SECONDS))
        for child in running:
            if child not in first:
                _send(child, signal.SIGTERM)
        wait(running, deadline)
        for child in running:
            if child.is_running():
                self.err_console.print(f"{child.name} did not stop in time: killing it")
                _send(child, signal.SIGKILL)
        for child in running:
            assert child.process is not None
            child.process.wait()
        self.err_console.print("Stillhouse stopped")

    def _report_failure(self, culprits: list[Child], reason: str) -> None:
        self.err_console.print(Text(reason, style="bold red"))
        for child in culprits:
            tail = child.log_tail()
            if tail:
                self.err_console.print(f"last {len(tail)} lines of {child.log_path}:")
                for line in tail:
                    self.err_console.print(Text(f"  {line}", style="dim"), highlight=False)


class HealthProbe:
    """Asks each child whether it is alive: the gRPC health service of a stage service, `/healthz` (or
    `/readyz` at start-up) of the control plane. Holds one channel per child for as long as it is open."""

    def __init__(self, api_url: str) -> None:
        self._api_url = api_url
        self._channels: dict[str, Any] = {}
        self._http: Any = None

    def __enter__(self) -> HealthProbe:
        import httpx

        self._http = httpx.Client()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for channel in self._channels.values():
            channel.close()
        self._http.close()

    def answers(self, child: Child, *, timeout: float, ready: bool = False) -> bool:
        if child.name == CONTROL_PLANE:
            path = "/readyz" if ready else "/healthz"
            return _http_ok(self._http, f"{self._api_url}{path}", timeout)
        return _grpc_serving(self._channel(child), timeout)

    def _channel(self, child: Child) -> Any:
        import grpc

        if child.name not in self._channels:
            # Short reconnect backoff: the default (1 s growing to 2 min) notices a restarted server late.
            options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
            self._channels[child.name] = grpc.insecure_channel(child.address, options=options)
        return self._channels[child.name]


def _send(child: Child, signum: signal.Signals) -> None:
    if child.process is not None and child.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signum)


def _grpc_serving(channel: Any, timeout: float) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _http_ok(http: Any, url: str, timeout: float) -> bool:
    import httpx

    try:
        return http.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
