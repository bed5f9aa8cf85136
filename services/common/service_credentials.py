"""The credential every internal gRPC call carries: a shared service token, and TLS where configured.

Read once at start-up from a process's `ServiceCallSettings`. A caller opens its channels with
`open_channel`, which sends `authorization: Bearer <token>` on every call; a service checks that header
with `ServiceTokenInterceptor` (service_auth.py). The token file may hold several tokens, one a line:
the first is the one sent, and any of them is accepted, so a new token can be rolled out beside the old.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from stillhouse.common import grpc_keepalive as keepalive
from stillhouse.common.config import ServiceCallSettings

AUTHORIZATION = "authorization"
BEARER = "Bearer "
# Long enough that guessing is hopeless; `stillhouse up` and the Helm chart generate 43 and 48 characters.
MIN_TOKEN_CHARS = 32


class ServiceCredentialsError(ValueError):
    """A token or TLS file named by the settings cannot be used; the message names the file and why."""


def read_service_tokens(path: Path) -> tuple[str, ...]:
    """The tokens in `path`, one per non-empty line, each checked; never shown in a message."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ServiceCredentialsError(f"cannot read the service token file {path}: {exc.strerror}") from exc
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token:
            continue
        if len(token) < MIN_TOKEN_CHARS or any(char.isspace() or not char.isprintable() for char in token):
            raise ServiceCredentialsError(
                f"line {number} of the service token file {path} is not a usable token: it must be at "
                f"least {MIN_TOKEN_CHARS} printable characters without spaces"
            )
        tokens.append(token)
    if not tokens:
        raise ServiceCredentialsError(f"the service token file {path} holds no token")
    return tuple(tokens)


def _read_pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ServiceCredentialsError(f"cannot read {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True, repr=False)
class TlsFiles:
    """PEM contents of the TLS settings: this process's certificate and key, and the peers' CA."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None

    @classmethod
    def load(cls, settings: ServiceCallSettings) -> TlsFiles | None:
        """The files the settings name; None when they name no certificate and no CA (plaintext)."""
        if settings.tls_cert_file is None and settings.tls_ca_file is None:
            return None
        return cls(
            cert=_read_pem(settings.tls_cert_file, "tls_cert_file"),
            key=_read_pem(settings.tls_key_file, "tls_key_file"),
            ca=_read_pem(settings.tls_ca_file, "tls_ca_file"),
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS for a caller's channel: the server's certificate must chain to the CA (the system's roots
        without one) and name the host called; this process's certificate, if any, is its client's."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


@dataclass(frozen=True, repr=False)
class ServiceCredentials:
    tokens: tuple[str, ...]
    tls: TlsFiles | None

    @classmethod
    def load(cls, settings: ServiceCallSettings) -> ServiceCredentials:
        """Read the token and TLS files the settings name; ServiceCredentialsError if one is unusable."""
        tokens = read_service_tokens(settings.service_token_file) if settings.service_token_file else ()
        return cls(tokens, TlsFiles.load(settings))

    @property
    def token(self) -> str | None:
        """The token this process sends, None when it has none."""
        return self.tokens[0] if self.tokens else None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS for a service's port (None: plaintext); a CA makes client certificates required."""
        if self.tls is None or self.tls.cert is None or self.tls.key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)],
            root_certificates=self.tls.ca,
            require_client_auth=self.tls.ca is not None,
        )

    def open_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A channel to the service at `address` whose every call carries this process's token, and whose
        connections are kept alive (a peer that vanishes is noticed)."""
        interceptors = bearer_interceptors(self.token) if self.token else []
        options = [*keepalive.CHANNEL_OPTIONS, *options]
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(
            address, self.tls.channel_credentials(), options=options, interceptors=interceptors
        )

    def __repr__(self) -> str:
        return f"ServiceCredentials(tokens={len(self.tokens)}, tls={self.tls is not None})"


def _with_token(details: grpc.aio.ClientCallDetails, authorization: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[AUTHORIZATION] = authorization
    return details._replace(metadata=metadata)


class _Bearer:
    """Passes each call on with the `authorization` header added to its metadata."""

    def __init__(self, authorization: str) -> None:
        self._authorization = authorization

    async def _pass_on(self, continuation, client_call_details, request_or_iterator):
        return await continuation(_with_token(client_call_details, self._authorization), request_or_iterator)


class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _Bearer._pass_on


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _Bearer._pass_on


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _Bearer._pass_on


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _Bearer._pass_on


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add `authorization: Bearer <token>` to calls of every kind (grpc.aio
    files an interceptor under one kind only, so there is one per kind)."""
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    return [kind(f"{BEARER}{token}") for kind in kinds]
