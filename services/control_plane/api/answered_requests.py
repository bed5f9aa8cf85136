"""After every HTTP request: its count and time by route template and status (metrics), and the audit
record of a mutating call (`audit.record_call`)."""

from __future__ import annotations

import time

import prometheus_client
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stillhouse.control_plane.audit import record_call

HTTP_REQUESTS = prometheus_client.Counter(
    "stillhouse_http_requests_total",
    "HTTP requests, by method, route and status.",
    ["method", "route", "status"],
)
HTTP_SECONDS = prometheus_client.Histogram(
    "stillhouse_http_request_seconds", "Time to answer an HTTP request.", ["method", "route"]
)


class AnsweredRequests:
    """A plain ASGI middleware: one built on BaseHTTPMiddleware would hide a client's disconnect from the
    handlers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            template = getattr(scope.get("route"), "path_format", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], template, status).inc()
            HTTP_SECONDS.labels(scope["method"], template).observe(time.perf_counter() - started)
            await record_call(Request(scope), status)
