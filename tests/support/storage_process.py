"""A real storage service process (`stillhouse serve storage`) over a given object store, for the tests
that need artifacts listed and presigned as the platform does."""

from __future__ import annotations

import sys

from pydantic import SecretStr

from stillhouse.common.objectstore.settings import ObjectStoreSettings


def object_store_env(settings: ObjectStoreSettings) -> dict[str, str]:
    """The settings as the service reads them from its environment."""
    env = {}
    for name, value in settings:
        if value is None:
            continue
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        env[f"STILLHOUSE_STORAGE_OBJECT_STORE__{name.upper()}"] = (
            str(plain).lower() if isinstance(plain, bool) else str(plain)
        )
    return env


def start_storage(processes, free_port, grpc_ready, wait_until, settings: ObjectStoreSettings) -> str:
    """Start the storage service (a test's `processes` stop it); its gRPC address once it serves."""
    port = free_port()
    argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", "storage", "--port", str(port)]
    processes.start(
        "storage", argv, object_store_env(settings) | {"STILLHOUSE_STORAGE_MAX_REQUEST_BYTES": "1048576"}
    )
    address = f"127.0.0.1:{port}"
    wait_until(lambda: grpc_ready(address), 20, "the storage service")
    return address
