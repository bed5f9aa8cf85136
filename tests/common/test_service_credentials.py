"""The service credential: token files, the token check on a real grpc.aio server (unary and streaming
calls, rotation), the refusal to serve without a token, and mutual TLS with real certificates: on a real
service process, and the host names and key usages the Helm chart's shared certificate needs."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError
from service_token import SERVICE_TOKEN
from tls_certificates import CLIENT_AUTH, SERVER_AUTH, issue, make_ca

from stillhouse.common.config import GrpcServiceSettings, ServiceCallSettings
from stillhouse.common.grpc_server import OperationsServicer
from stillhouse.common.operations import OperationRegistry
from stillhouse.common.service_auth import ServiceTokenInterceptor, caller_check
from stillhouse.common.service_credentials import (
    ServiceCredentials,
    ServiceCredentialsError,
    read_service_tokens,
)
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

OLD_TOKEN = "old-token-" + "a" * 32
NEW_TOKEN = "new-token-" + "b" * 32


# --- token files --------------------------------------------------------------------------------


def test_every_line_is_a_token_and_the_first_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"\n{NEW_TOKEN}\n\n  {OLD_TOKEN}  \n")
    assert read_service_tokens(path) == (NEW_TOKEN, OLD_TOKEN)
    credentials = ServiceCredentials.load(GrpcServiceSettings(service_token_file=path))
    assert credentials.token == NEW_TOKEN
    assert NEW_TOKEN not in repr(credentials)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot read the service token file"),
        ("\n  \n", "holds no token"),
        (f"{NEW_TOKEN}\nshort-secret\n", "line 2 of the service token file"),
        ("with a space " + "c" * 32, "line 1 of the service token file"),
    ],
    ids=["missing", "empty", "short", "space"],
)
def test_unusable_token_files_are_refused_naming_the_file_not_the_token(
    tmp_path: Path, content: str | None, words: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ServiceCredentialsError) as refused:
        read_service_tokens(path)
    assert words in str(refused.value) and str(path) in str(refused.value)
    assert "short-secret" not in str(refused.value) and "c" * 32 not in str(refused.value)


def test_a_service_without_a_token_refuses_to_serve_unless_told_otherwise() -> None:
    settings = GrpcServiceSettings()
    with pytest.raises(
        ServiceCredentialsError, match=r"set service_token_file .* or set allow_unauthenticated"
    ):
        caller_check(settings, ServiceCredentials.load(settings))
    allowed = GrpcServiceSettings(allow_unauthenticated_calls=True)
    assert caller_check(allowed, ServiceCredentials.load(allowed)) is None


# --- the check on a real server -----------------------------------------------------------------


@dataclass
class CheckedServer:
    address: str

    def channel(self, token: str | None) -> grpc.aio.Channel:
        return ServiceCredentials(tokens=(token,) if token else (), tls=None).open_channel(self.address)


@pytest.fixture
async def checked_server(free_port) -> AsyncIterator[CheckedServer]:
    """Operations and health behind a token check that accepts the new token and the old one."""
    registry = OperationRegistry()
    server = grpc.aio.server(interceptors=[ServiceTokenInterceptor([NEW_TOKEN, OLD_TOKEN])])
    operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(registry), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"127.0.0.1:{free_port()}"
    assert server.add_insecure_port(address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    yield CheckedServer(address)
    await server.stop(None)


async def call_codes(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, grpc.StatusCode]:
    """The status of a unary call and of a streaming call that ask for an operation nobody started."""
    operations = operations_pb2_grpc.OperationsStub(channel)
    codes = []
    for call in (
        lambda: operations.GetOperation(operations_pb2.GetOperationRequest(operation_id="nope"), timeout=5),
        lambda: operations.WatchOperation(
            operations_pb2.WatchOperationRequest(operation_id="nope"), timeout=5
        ).read(),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        codes.append(caught.value.code())
    return codes[0], codes[1]


async def test_the_token_opens_unary_and_streaming_calls(checked_server: CheckedServer) -> None:
    async with checked_server.channel(NEW_TOKEN) as channel:
        # NOT_FOUND: the call got past the check to the servicer.
        assert await call_codes(channel) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("token", [None, "another-token-" + "d" * 32, NEW_TOKEN[:-1]])
async def test_a_missing_or_wrong_token_is_unauthenticated(checked_server: CheckedServer, token) -> None:
    async with checked_server.channel(token) as channel:
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        assert await call_codes(channel) == (unauthenticated, unauthenticated)
        health_stub = health_pb2_grpc.HealthStub(channel)
        reply = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_caller_still_sending_the_old_token_is_accepted_during_rotation(
    checked_server: CheckedServer,
) -> None:
    async with checked_server.channel(OLD_TOKEN) as channel:
        assert await call_codes(channel) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND)


# --- mutual TLS ----------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    """ca.pem, server.pem/.key and client.pem/.key, the leaves signed by the CA for localhost and
    127.0.0.1; other-ca.pem, and a client certificate it signed (stranger.pem/.key)."""
    folder = tmp_path / "tls"
    folder.mkdir()
    ca = make_ca(folder, "ca")
    issue(folder, "server", ca)
    issue(folder, "client", ca)
    issue(folder, "stranger", make_ca(folder, "other-ca"))
    return folder


def tls_caller(folder: Path, cert: str | None, token: str | None = SERVICE_TOKEN) -> ServiceCredentials:
    """A caller's credentials: the CA ca.pem, the certificate `cert` (none: no client certificate)."""
    settings = ServiceCallSettings(
        service_token_file=None,
        tls_ca_file=folder / "ca.pem",
        tls_cert_file=folder / f"{cert}.pem" if cert else None,
        tls_key_file=folder / f"{cert}.key" if cert else None,
    )
    return ServiceCredentials(tokens=(token,) if token else (), tls=ServiceCredentials.load(settings).tls)


async def storage_answer(credentials: ServiceCredentials, address: str) -> grpc.StatusCode:
    async with credentials.open_channel(address) as channel:
        stub = storage_pb2_grpc.StorageStub(channel)
        try:
            await stub.ListArtifacts(storage_pb2.ListArtifactsRequest(prefix="jobs/"), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
def tls_storage(processes, free_port, wait_until, tls_files, tmp_path) -> Callable[[], str]:
    port = free_port()
    argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", "storage", "--port", str(port)]
    env = {
        "STILLHOUSE_HOME": str(tmp_path / "home"),
        "STILLHOUSE_STORAGE_TLS_CERT_FILE": str(tls_files / "server.pem"),
        "STILLHOUSE_STORAGE_TLS_KEY_FILE": str(tls_files / "server.key"),
        "STILLHOUSE_STORAGE_TLS_CA_FILE": str(tls_files / "ca.pem"),
    }
    processes.start("storage", argv, env)
    wait_until(lambda: "serving" in processes.log("storage"), 30, "the storage service")
    assert '"tls": true' in processes.log("storage")
    return f"localhost:{port}"


async def test_mutual_tls_takes_callers_with_a_certificate_of_its_ca(tls_storage, tls_files) -> None:
    address = tls_storage
    assert await storage_answer(tls_caller(tls_files, "client"), address) == grpc.StatusCode.OK

    stranger = tls_caller(tls_files, "stranger")
    without_certificate = tls_caller(tls_files, None)
    plaintext = ServiceCredentials(tokens=(SERVICE_TOKEN,), tls=None)
    for refused in (stranger, without_certificate, plaintext):
        assert await storage_answer(refused, address) == grpc.StatusCode.UNAVAILABLE

    # TLS does not stand in for the token.
    no_token = tls_caller(tls_files, "client", token=None)
    assert await storage_answer(no_token, address) == grpc.StatusCode.UNAUTHENTICATED


def test_a_service_with_a_ca_but_no_certificate_of_its_own_is_refused(tls_files: Path) -> None:
    """It would require nothing of its callers: without a certificate its port is plaintext."""
    with pytest.raises(ValidationError, match="tls_ca_file needs its own certificate"):
        GrpcServiceSettings(tls_ca_file=tls_files / "ca.pem")
    # A caller may have a CA alone: it calls over TLS without a client certificate.
    assert tls_caller(tls_files, None).tls is not None


# The Helm chart's layout: one certificate, for every Service's name and both usages, in every pod; the
# pods call each other by Service name. Here a name override stands in for the cluster's DNS.
SERVICE_NAME = "demo-stillhouse-storage"
SERVICE_NAMES = (SERVICE_NAME, f"{SERVICE_NAME}.distil.svc", f"{SERVICE_NAME}.distil.svc.cluster.local")


@pytest.fixture
def chart_certificates(tmp_path: Path) -> Path:
    """ca.pem; shared.pem/.key, for the Service names (no IP address, no localhost) and both usages; and
    server-only.pem/.key, for the same names but server authentication only."""
    folder = tmp_path / "chart-tls"
    folder.mkdir()
    ca = make_ca(folder, "ca")
    issue(folder, "shared", ca, dns_names=SERVICE_NAMES, ip_addresses=(), usages=(SERVER_AUTH, CLIENT_AUTH))
    issue(folder, "server-only", ca, dns_names=SERVICE_NAMES, ip_addresses=(), usages=(SERVER_AUTH,))
    return folder


@pytest.fixture
async def shared_certificate_server(free_port, chart_certificates: Path) -> AsyncIterator[int]:
    """The port of a real grpc.aio server (health) serving mutual TLS with the shared certificate."""
    credentials = tls_caller(chart_certificates, "shared")
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server_credentials = credentials.server_credentials()
    assert server_credentials is not None
    port = server.add_secure_port(f"127.0.0.1:{free_port()}", server_credentials)
    await server.start()
    yield port
    await server.stop(None)


async def health_answer(credentials: ServiceCredentials, address: str, server_name: str | None) -> str:
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    async with credentials.open_channel(address, options=options) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
    return "OK"


async def test_a_caller_checks_that_the_certificate_names_the_host_it_calls(
    shared_certificate_server: int, chart_certificates: Path
) -> None:
    shared = tls_caller(chart_certificates, "shared")
    for name in SERVICE_NAMES:
        assert await health_answer(shared, f"127.0.0.1:{shared_certificate_server}", name) == "OK"
    # Called by an address or a name the certificate does not hold, the handshake fails.
    answer = await health_answer(shared, f"127.0.0.1:{shared_certificate_server}", None)
    assert answer.startswith("UNAVAILABLE") and "Hostname" in answer, answer
    for address, name in [
        (f"localhost:{shared_certificate_server}", None),
        (f"127.0.0.1:{shared_certificate_server}", "demo-stillhouse-teacher"),
    ]:
        answer = await health_answer(shared, address, name)
        assert answer.startswith("UNAVAILABLE"), answer


async def test_one_certificate_serves_and_calls_only_with_both_usages(
    shared_certificate_server: int, chart_certificates: Path
) -> None:
    address = f"127.0.0.1:{shared_certificate_server}"
    assert await health_answer(tls_caller(chart_certificates, "shared"), address, SERVICE_NAME) == "OK"
    # A certificate for server authentication alone is no client certificate: the service refuses it.
    server_only = tls_caller(chart_certificates, "server-only")
    assert (await health_answer(server_only, address, SERVICE_NAME)).startswith("UNAVAILABLE")
