"""The local Ray head serves this machine only: every socket of every Ray process is bound to loopback,
every call needs the head's token, and the token is its owner's alone."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from ray_heads import short_temp_dir
from sockets import is_loopback, listening_sockets
from waiting import wait_until

from stillhouse.common.ray.cluster import LocalRayHead, auth_headers
from stillhouse.common.ray.settings import MAX_RAY_TEMP_DIR_CHARS, LocalRaySettings

# Any method of the GCS serves to see whether a call gets in: this one takes an empty request.
GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home") / "ray" / "auth-token"


@pytest.fixture(scope="module")
def head(token_file: Path) -> Iterator[LocalRayHead]:
    """A head whose folder is as long as the settings allow: every socket Ray opens must still fit."""
    with short_temp_dir() as short:
        longest = short / ("t" * (MAX_RAY_TEMP_DIR_CHARS - len(str(short)) - 1))
        settings = LocalRaySettings(temp_dir=longest, auth_token_file=token_file, num_cpus=1)
        assert len(str(settings.temp_dir)) == MAX_RAY_TEMP_DIR_CHARS
        ray_head = LocalRayHead(settings)
        ray_head.start()
        try:
            ray_head.wait_ready()
            yield ray_head
        finally:
            ray_head.stop()


def ray_processes(head: LocalRayHead) -> list[psutil.Process]:
    """This test's child processes (the head and all it started) and anything else that names the
    head's folder, with their children."""
    found = {process.pid: process for process in psutil.Process().children(recursive=True)}
    for process in psutil.process_iter(["cmdline"]):
        if str(head.temp_dir) in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
            found.update({child.pid: child for child in process.children(recursive=True)})
    return list(found.values())


def test_every_ray_socket_is_bound_to_loopback(head: LocalRayHead) -> None:
    # The agents start after the job API answers: wait for every kind of Ray server to listen, so the
    # check has something to check.
    servers = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}

    def all_listening() -> list[tuple[str, str, int]] | None:
        sockets = listening_sockets(ray_processes(head))
        return sockets if servers <= {name for name, _, _ in sockets} else None

    sockets = wait_until(all_listening, 60, f"{', '.join(sorted(servers))} to listen")
    assert int(head.address.rsplit(":", 1)[1]) in {port for _, _, port in sockets}
    assert [entry for entry in sockets if not is_loopback(entry[1])] == []


def test_the_job_api_wants_the_token(head: LocalRayHead) -> None:
    assert httpx.get(f"{head.address}/api/version", timeout=10).status_code == 401
    wrong = auth_headers("0" * 64)
    assert httpx.get(f"{head.address}/api/version", headers=wrong, timeout=10).status_code in (401, 403)
    assert httpx.get(f"{head.address}/api/version", headers=auth_headers(head.token), timeout=10).is_success


def test_the_gcs_refuses_a_client_without_the_token(head: LocalRayHead) -> None:
    (gcs_port,) = {port for name, _, port in listening_sockets(ray_processes(head)) if name == "gcs_server"}
    with grpc.insecure_channel(f"127.0.0.1:{gcs_port}") as channel:
        call = channel.unary_unary(GCS_METHOD)
        for metadata in [(), (("authorization", "Bearer " + "0" * 64),)]:
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", metadata=metadata, timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert call(b"", metadata=(("authorization", f"Bearer {head.token}"),), timeout=10) is not None


def test_the_token_and_the_head_files_are_private_to_their_owner(
    head: LocalRayHead, token_file: Path
) -> None:
    assert token_file.read_text().strip() == head.token and len(head.token) >= 64
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    # Ray opens its folders to everyone (0777); they, and the object store's socket, lie in a private one.
    assert stat.S_IMODE(head.temp_dir.stat().st_mode) == 0o700
    sockets = [path for path in head.temp_dir.rglob("*") if path.is_socket()]
    assert any(path.name == "plasma_store" for path in sockets), sockets
