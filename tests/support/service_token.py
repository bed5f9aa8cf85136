"""The service token of the test suite: every service a test starts reads it (tests/conftest.py points
each service's `service_token_file` at it), and test clients send it."""

from __future__ import annotations

import grpc

from stillhouse.common.service_credentials import AUTHORIZATION, BEARER

SERVICE_TOKEN = "test-service-token-5f0c1d2e3a4b5c6d7e8f9a0b1c2d3e4f"
# Names the token file for test servers that take no STILLHOUSE_<SERVICE>_* settings.
TOKEN_FILE_VARIABLE = "STILLHOUSE_TEST_SERVICE_TOKEN_FILE"
SERVICE_PREFIXES = ("PROMPTS", "TEACHER", "STORAGE", "TRAINER", "CONTROL_PLANE")


def token_metadata(token: str = SERVICE_TOKEN) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"{BEARER}{token}"),)


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(token)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def authorized_channel(address: str, token: str = SERVICE_TOKEN) -> grpc.Channel:
    """A blocking channel to `address` whose every call carries `token`; closes like any channel."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _BearerToken(token))
