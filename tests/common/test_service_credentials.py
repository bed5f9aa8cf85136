"""The service credential: token files, the token check on a real grpc.aio server (unary and streaming
calls, rotation), the refusal to serve without a token, and mutual TLS on a real service process."""

from __future__ import annotations

import datetime
import ipaddress
import stat
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from service_token import SERVICE_TOKEN

from stillhouse.common.config import GrpcServiceSettings
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


# --- mutual TLS on a service process --------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    folder: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate (a CA when `issuer` is None) and its key, written as NAME.pem and NAME.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer[0].subject if issuer else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (folder / f"{name}.key").chmod(stat.S_IRUSR)
    return certificate, key


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    """ca.pem, server.pem/.key and client.pem/.key, the leaves signed by the CA; other-ca.pem, and a
    client certificate it signed (stranger.pem/.key)."""
    folder = tmp_path / "tls"
    folder.mkdir()
    ca = _certificate(folder, "ca", None)
    _certificate(folder, "server", ca)
    _certificate(folder, "client", ca)
    other = _certificate(folder, "other-ca", None)
    _certificate(folder, "stranger", other)
    return folder


def tls_caller(folder: Path, cert: str | None) -> ServiceCredentials:
    settings = GrpcServiceSettings(
        service_token_file=None,
        tls_ca_file=folder / "ca.pem",
        tls_cert_file=folder / f"{cert}.pem" if cert else None,
        tls_key_file=folder / f"{cert}.key" if cert else None,
    )
    return ServiceCredentials(tokens=(SERVICE_TOKEN,), tls=ServiceCredentials.load(settings).tls)


async def storage_answer(credentials: ServiceCredentials, address: str) -> grpc.StatusCode:
    async with credentials.open_channel(address) as channel:
        stub = storage_pb2_grpc.StorageStub(channel)
        try:
            await stub.ListDatasets(storage_pb2.ListDatasetsRequest(prefix="jobs/"), timeout=5)
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
    no_token = ServiceCredentials(tokens=(), tls=tls_caller(tls_files, "client").tls)
    assert await storage_answer(no_token, address) == grpc.StatusCode.UNAUTHENTICATED
