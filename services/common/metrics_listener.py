"""A process's Prometheus metrics on a port of their own: what a scraper reads without the API's token,
and what NetworkPolicies can open to the scraper alone.

The API port never serves metrics without a token; the metrics port serves nothing else.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import prometheus_client


@dataclass
class MetricsListener:
    """The metrics endpoint of this process, `http://<host>:<port>/metrics`, served from a thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_listener(host: str, port: int) -> MetricsListener:
    """Serve the process's default registry on `host:port` (0: a free port); OSError naming the address
    when it cannot listen there."""
    try:
        server, thread = prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
    return MetricsListener(server, thread)
