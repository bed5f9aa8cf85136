"""The teacher's egress policy: which addresses a baseURL may reach, the allow-list setting, and the HTTP
client that connects only to addresses it checked (DNS rebinding, TLS still for the URL's host).
Real resolution is used for IP literals and `localhost` only; names resolve through injected resolvers."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from stillhouse.teacher.backends.openai_http import OpenAICompatibleBackend
from stillhouse.teacher.calls import ChatMessage, FailureKind, TeacherAnswer, TeacherCall, TeacherCallError
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.egress import EgressPolicy, EgressRefused

SETTING = "STILLHOUSE_TEACHER_EGRESS_ALLOW"


def resolver(table: dict[str, Sequence[str]]) -> Callable[[str, int], Sequence[str]]:
    def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


async def refusal(policy: EgressPolicy, url: str) -> EgressRefused:
    with pytest.raises(EgressRefused) as refused:
        await policy.check_url(url)
    return refused.value


# --- what the default policy refuses -----------------------------------------------------------------

REFUSED = [
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254", "link-local"),
    ("http://[fd00:ec2::254]/latest", "fd00:ec2::254", "private"),
    ("http://127.0.0.1:8000/v1", "127.0.0.1", "loopback"),
    ("http://[::1]:8000/v1", "::1", "loopback"),
    ("http://localhost:8000/v1", None, "loopback"),
    ("http://10.0.0.5/v1", "10.0.0.5", "private"),
    ("http://172.16.3.4/v1", "172.16.3.4", "private"),
    ("https://192.168.1.10/v1", "192.168.1.10", "private"),
    ("http://100.64.0.1/v1", "100.64.0.1", "shared (carrier-grade NAT)"),
    ("http://0.0.0.0:8000/v1", "0.0.0.0", "unspecified"),
    ("http://224.0.0.1/v1", "224.0.0.1", "multicast"),
    ("http://240.0.0.1/v1", "240.0.0.1", "reserved"),
    ("http://[::ffff:169.254.169.254]/v1", "::ffff:169.254.169.254", "link-local"),
    ("http://[::ffff:127.0.0.1]:8000/v1", "::ffff:127.0.0.1", "loopback"),
    ("http://[2002:a9fe:a9fe::1]/v1", "2002:a9fe:a9fe::1", "link-local"),  # 6to4 around the metadata
    ("http://2852039166/v1", "169.254.169.254", "link-local"),  # 169.254.169.254 as one number
    ("http://0xa9.0xfe.0xa9.0xfe/v1", "169.254.169.254", "link-local"),
    ("http://169.254.43518/v1", "169.254.169.254", "link-local"),
]


@pytest.mark.parametrize(("url", "address", "kind"), REFUSED, ids=[case[0] for case in REFUSED])
async def test_the_default_policy_refuses_every_non_public_address(url: str, address: str | None, kind: str):
    refused = await refusal(EgressPolicy(), url)

    host = httpx.URL(url).host
    assert refused.host == host and refused.kind == kind
    if address is not None:
        assert refused.address == ipaddress.ip_address(address)
    message = str(refused)
    assert f"host {host} " in message and f"a {kind} address" in message and SETTING in message


async def test_a_refusal_names_the_host_address_kind_and_setting_and_nothing_else():
    url = "http://user:sk-secret@teacher.internal:8000/v1/private-path?key=abc"
    policy = EgressPolicy(resolve=resolver({"teacher.internal": ["10.1.2.3"]}))

    message = str(await refusal(policy, url))

    assert message == (
        "teacher egress refused: the baseURL host teacher.internal resolves to 10.1.2.3, a private address; "
        f"only public addresses may be reached unless {SETTING} lists the host name or a network that "
        "holds the address (e.g. 10.1.2.3/32)"
    )
    literal = str(await refusal(EgressPolicy(), "http://169.254.169.254/v1"))
    assert literal.startswith(
        "teacher egress refused: the baseURL host 169.254.169.254 is a link-local address;"
    )


@pytest.mark.parametrize(
    "url", ["http://8.8.8.8/v1", "https://[2606:4700:4700::1111]/v1", "http://[::ffff:8.8.8.8]/v1"]
)
async def test_public_addresses_pass(url: str):
    await EgressPolicy().check_url(url)


async def test_a_name_is_refused_when_any_of_its_addresses_is_not_public():
    for addresses in (["93.184.215.14", "10.0.0.7"], ["10.0.0.7", "93.184.215.14"]):
        policy = EgressPolicy(resolve=resolver({"mixed.example": addresses}))
        refused = await refusal(policy, "https://mixed.example/v1")
        assert refused.address == ipaddress.ip_address("10.0.0.7") and refused.kind == "private"
    public = EgressPolicy(resolve=resolver({"api.example": ["93.184.215.14", "2606:2800:21f:cb07::1"]}))
    await public.check_url("https://api.example/v1")


async def test_a_host_that_does_not_resolve_passes_the_url_check_but_has_nothing_to_connect_to():
    policy = EgressPolicy(resolve=resolver({}))
    await policy.check_url("https://nowhere.example/v1")
    with pytest.raises(OSError):
        policy.addresses_to_connect("nowhere.example", 443)


@pytest.mark.parametrize("url", ["ftp://api.example/v1", "api.example/v1", "http://0251.0376.0251.0376/v1"])
async def test_what_is_not_an_http_url_is_refused_as_such(url: str):
    with pytest.raises(ValueError, match="baseURL"):
        await EgressPolicy().check_url(url)


# --- the allow-list ------------------------------------------------------------------------------------


async def test_allow_listed_networks_pass_and_nothing_else_does():
    policy = EgressPolicy.from_entries(["127.0.0.0/8", "::1/128", "10.8.0.0/16"])

    for url in ["http://127.0.0.1:8000/v1", "http://[::1]:8000/v1", "http://localhost:8000/v1"]:
        await policy.check_url(url)
    await policy.check_url("http://10.8.3.4/v1")
    await policy.check_url("http://[::ffff:127.0.0.1]/v1")  # the mapped form of an allowed address
    assert (await refusal(policy, "http://10.9.0.1/v1")).kind == "private"
    assert (await refusal(policy, "http://169.254.169.254/v1")).kind == "link-local"


async def test_an_allow_listed_host_name_passes_whatever_it_resolves_to_and_only_that_name():
    addresses = ["10.8.0.4", "fd00::4"]
    resolve = resolver(
        {"vllm.models.svc.cluster.local": addresses, "other.models.svc.cluster.local": addresses}
    )
    policy = EgressPolicy.from_entries(["vllm.models.svc.cluster.local"], resolve=resolve)

    await policy.check_url("http://vllm.models.svc.cluster.local:8000/v1")
    await policy.check_url("http://VLLM.models.svc.cluster.local.:8000/v1")  # case and a final dot
    assert policy.addresses_to_connect("vllm.models.svc.cluster.local", 8000) == [
        ipaddress.ip_address(address) for address in addresses
    ]
    refused = await refusal(policy, "http://other.models.svc.cluster.local:8000/v1")
    assert refused.address == ipaddress.ip_address("10.8.0.4")


def test_the_setting_takes_a_json_list_of_networks_and_host_names(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(SETTING, '["10.8.0.0/16", "fd00::/8", "192.168.1.7", "vllm.models.svc.cluster.local"]')

    settings = TeacherSettings.load()

    assert settings.egress_allow == [
        "10.8.0.0/16",
        "fd00::/8",
        "192.168.1.7",
        "vllm.models.svc.cluster.local",
    ]
    monkeypatch.delenv(SETTING)
    assert TeacherSettings().egress_allow == []


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "http://vllm:8000", "*.svc.cluster.local", "vllm_host", ""])
def test_the_setting_refuses_an_entry_that_is_neither_a_network_nor_a_host_name(entry: str):
    with pytest.raises(ValidationError) as refused:
        TeacherSettings(egress_allow=["127.0.0.0/8", entry])
    message = str(refused.value)
    assert f"egress allow-list entry {entry!r}" in message and "CIDR" in message and "host name" in message


# --- connections -----------------------------------------------------------------------------------------


def make_call(base_url: str) -> TeacherCall:
    return TeacherCall(
        backend="openai",
        base_url=base_url,
        model="fake-teacher",
        revision="",
        messages=(ChatMessage("user", "Say hello."),),
        temperature=0.0,
        top_p=1.0,
        max_tokens=8,
        seed=None,
        top_logprobs=0,
    )


async def ask_once(base_url: str, policy: EgressPolicy) -> TeacherAnswer:
    """One call through a backend of its own, closed afterwards."""
    backend = OpenAICompatibleBackend(base_url, None, egress=policy)
    try:
        return await backend.answer(make_call(base_url))
    finally:
        await backend.aclose()


async def failed_call(base_url: str, policy: EgressPolicy) -> TeacherCallError:
    """Why one call through a backend of its own got no answer."""
    with pytest.raises(TeacherCallError) as failed:
        await ask_once(base_url, policy)
    return failed.value


async def test_the_client_connects_to_the_address_it_checked(fake_openai):
    """A name that only the policy's resolver knows: the call can succeed only by connecting there."""
    base_url = f"http://teacher.test:{fake_openai.port}/v1"
    policy = EgressPolicy.from_entries(["127.0.0.0/8"], resolve=resolver({"teacher.test": ["127.0.0.1"]}))
    answer = await ask_once(base_url, policy)
    assert answer.text and fake_openai.calls()["completions"] == 1


async def test_a_name_that_turns_private_after_the_check_is_refused_at_connect_time(fake_openai):
    """DNS rebinding: public when the baseURL is checked, loopback (where a server waits) on connect."""
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])
    policy = EgressPolicy(resolve=lambda host, port: next(answers))
    base_url = f"http://rebind.test:{fake_openai.port}/v1"
    await policy.check_url(base_url)
    failure = await failed_call(base_url, policy)
    assert failure.kind is FailureKind.EGRESS_REFUSED and not failure.retryable
    assert "rebind.test resolves to 127.0.0.1, a loopback address" in failure.message
    assert fake_openai.calls()["completions"] == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "2130706433"])
async def test_an_address_in_the_url_is_checked_at_connect_time_too(fake_openai, host: str):
    """An IP literal, which the HTTP client would connect to without resolving it, in any spelling."""
    base_url = f"http://{host}:{fake_openai.port}/v1"
    failure = await failed_call(base_url, EgressPolicy())
    assert failure.kind is FailureKind.EGRESS_REFUSED
    assert "a loopback address" in failure.message
    assert fake_openai.calls()["completions"] == 0


async def test_proxies_named_by_the_environment_are_not_used(fake_openai):
    """Through a proxy, the address connected to would be the proxy's, not the one checked."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{probe.getsockname()[1]}"
    base_url = f"http://teacher.test:{fake_openai.port}/v1"
    policy = EgressPolicy.from_entries(["127.0.0.0/8"], resolve=resolver({"teacher.test": ["127.0.0.1"]}))
    with pytest.MonkeyPatch.context() as environment:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            environment.setenv(name, nowhere)
        environment.delenv("NO_PROXY", raising=False)
        environment.delenv("no_proxy", raising=False)
        answer = await ask_once(base_url, policy)
    assert answer.text and fake_openai.calls()["completions"] == 1


def self_signed_certificate(folder: Path, host: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture
async def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[int, dict]]:
    """An HTTPS server on 127.0.0.1 whose certificate names only teacher.test (trusted through
    SSL_CERT_FILE); it records the TLS server name and Host header it was sent."""
    cert_file, key_file = self_signed_certificate(tmp_path, "teacher.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    seen: dict = {}
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)

    def record_server_name(sock: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        seen["sni"] = server_name

    context.sni_callback = record_server_name

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        seen["host"] = next(
            line.split(":", 1)[1].strip() for line in head.splitlines() if line.lower().startswith("host:")
        )
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1], seen


async def _tls_failure(host: str, port: int) -> TeacherCallError:
    """The backend's failure to get an answer from `host`, which the policy resolves to 127.0.0.1."""
    table = {"teacher.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    policy = EgressPolicy.from_entries(["127.0.0.0/8"], resolve=resolver(table))
    return await failed_call(f"https://{host}:{port}/v1", policy)


async def test_tls_sends_and_verifies_the_url_host_while_connecting_to_the_checked_address(tls_server):
    port, seen = tls_server
    # The server's "ok" is no chat completion, but it came back over TLS verified for teacher.test.
    failure = await _tls_failure("teacher.test", port)
    assert failure.kind is FailureKind.MALFORMED_RESPONSE and "not JSON" in failure.message
    assert seen == {"sni": "teacher.test", "host": f"teacher.test:{port}"}
    # The same address under a name the certificate does not hold: verification fails, nothing is sent.
    seen.clear()
    failure = await _tls_failure("other.test", port)
    assert failure.kind is FailureKind.UNREACHABLE and "certificate" in failure.message.lower()
    assert seen == {"sni": "other.test"}
