"""Container health check of the services image: asks the service that the entrypoint started the same
question as its Kubernetes probe — the standard gRPC health check of a stage service, GET /healthz of
the control plane. Exit status 0 when healthy, 1 when not.

Which service, and where it listens, come from the service's command line (`stillhouse serve <service>
[--host H] [--port P] [--config FILE]`): by default that of PID 1, or the words given as arguments. A
port not on the command line is read from the service's settings (config file, environment, default),
like the service does.

A stage service whose settings name a certificate (`tls_cert_file`) serves TLS, and with a CA requires
client certificates: the check then calls over TLS, presenting the service's own certificate, and checks
the service's certificate against its CA for the name in STILLHOUSE_HEALTHCHECK_TLS_SERVER_NAME (the
Helm chart sets the Service's name), or else for the loopback address it calls.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_SECONDS = 5.0
WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
SERVER_NAME_VARIABLE = "STILLHOUSE_HEALTHCHECK_TLS_SERVER_NAME"


@dataclass(frozen=True)
class Target:
    service: str
    host: str
    port: int
    config: Path | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def flag_value(words: list[str], flag: str) -> str | None:
    """The value of `--flag V` or `--flag=V` among `words`, if given."""
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def service_settings(service: str, config: Path | None) -> Any:
    """The service's settings as it reads them: its config file, then STILLHOUSE_<SERVICE>_* variables."""
    module = importlib.import_module(f"stillhouse.{service.replace('-', '_')}.config")
    settings_class = getattr(module, "".join(part.title() for part in service.split("-")) + "Settings")
    return settings_class.load(config)


def target_of(command: list[str]) -> Target:
    if "serve" not in command or command.index("serve") + 1 >= len(command):
        raise ValueError(f"not a `stillhouse serve <service>` command line: {' '.join(command)!r}")
    words = command[command.index("serve") + 1 :]
    service = words[0]
    host = flag_value(words, "--host") or "127.0.0.1"
    port = flag_value(words, "--port")
    config = Path(value) if (value := flag_value(words, "--config")) else None
    return Target(
        service,
        WILDCARD_TO_LOOPBACK.get(host, host),
        int(port) if port else service_settings(service, config).port,
        config,
    )


def grpc_channel(target: Target) -> Any:
    """A channel to a stage service: over TLS, with the service's own certificate, when it serves TLS."""
    import grpc

    from stillhouse.common.service_credentials import TlsFiles

    tls = TlsFiles.load(service_settings(target.service, target.config))
    if tls is None or tls.cert is None:
        return grpc.insecure_channel(target.address)
    server_name = os.environ.get(SERVER_NAME_VARIABLE)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target.address, tls.channel_credentials(), options=options)


def is_healthy(target: Target) -> bool:
    if target.service == "control-plane":
        import httpx

        try:
            return httpx.get(f"http://{target.address}/healthz", timeout=TIMEOUT_SECONDS).status_code == 200
        except httpx.HTTPError:
            return False
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    command = argv or Path("/proc/1/cmdline").read_bytes().decode().split("\0")
    target = target_of([word for word in command if word])
    healthy = is_healthy(target)
    print(f"{target.service} at {target.address}: {'healthy' if healthy else 'not healthy'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
