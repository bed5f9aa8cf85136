"""A service's check of its callers: every call but the standard health checks carries the service token.

Health checks stay open so that Kubernetes probes (which send no credentials) and `stillhouse up` can
ask whether a service is serving; they reveal nothing else. A refused call gets UNAUTHENTICATED; the
token presented is never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Sequence

import grpc
import structlog

from stillhouse.common.config import GrpcServiceSettings
from stillhouse.common.service_credentials import (
    AUTHORIZATION,
    BEARER,
    ServiceCredentials,
    ServiceCredentialsError,
)

log = structlog.get_logger(__name__)

OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"

MISSING = (
    "this service takes calls carrying the service token only: send the metadata "
    "`authorization: Bearer <token>`, the token being the first line of the file named by "
    "service_token_file"
)
MALFORMED = "the authorization metadata must be one `Bearer <service token>`"
MISMATCH = (
    "the service token sent is not one this service accepts: the caller and the service must read the "
    "same service token (service_token_file)"
)


class ServiceTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call whose bearer token is none of `tokens`."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("a service token check needs at least one token")
        self._accepted = [token.encode() for token in tokens]

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIX):
            return handler
        refusal = self._refusal(handler_call_details.invocation_metadata or ())
        if refusal is None:
            return handler
        return _refusing(handler, method, refusal)

    def _refusal(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[str, str] | None:
        """None for an accepted token, else (reason for the log, message for the caller)."""
        values = [value for key, value in metadata if key == AUTHORIZATION]
        if not values:
            return "missing", MISSING
        value = values[0]
        if len(values) > 1 or not isinstance(value, str) or value[: len(BEARER)].lower() != BEARER.lower():
            return "malformed", MALFORMED
        presented = value[len(BEARER) :].strip().encode()
        accepted = False
        for token in self._accepted:
            # Every token is compared, each in constant time, so timing tells nothing about any of them.
            accepted |= hmac.compare_digest(presented, token)
        return None if accepted else ("mismatch", MISMATCH)


def _refusing(handler: grpc.RpcMethodHandler, method: str, refusal: tuple[str, str]) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without running it."""
    reason, message = refusal

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        log.warning(
            "refused a call without a valid service token", method=method, reason=reason, peer=context.peer()
        )
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request_or_iterator, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await refuse(request_or_iterator, context)
        yield  # never reached (abort raises): a streaming handler is an async generator

    # No (de)serializers: the request is never read as a message, and nothing is sent back but the status.
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


def caller_check(
    settings: GrpcServiceSettings, credentials: ServiceCredentials
) -> ServiceTokenInterceptor | None:
    """The interceptor that checks callers' tokens; None only where the settings explicitly allow
    unauthenticated calls. ServiceCredentialsError when no token is configured and none is allowed."""
    if credentials.tokens:
        return ServiceTokenInterceptor(credentials.tokens)
    if not settings.allow_unauthenticated_calls:
        raise ServiceCredentialsError(
            "no service token: set service_token_file to the file holding the token every caller sends "
            "(a mounted Secret; `stillhouse up` generates one), or set allow_unauthenticated_calls to take "
            "calls from anyone who can reach the port"
        )
    log.warning("serving without a service token: any caller who can reach the port is accepted")
    return None
