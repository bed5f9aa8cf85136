"""HTTP/2 keepalive for every internal gRPC connection, the same on both ends.

A peer that vanishes without closing its connections (a stopped process, a node that drops off the
network) is otherwise only noticed when the next call times out. With keepalive pings the caller's
channel finds the connection dead within `PING_SECONDS + PING_TIMEOUT_SECONDS` and fails its calls as
UNAVAILABLE, so they are retried on a new connection. The server must accept pings at least that often,
or it would answer them with GOAWAY ("too_many_pings").
"""

from __future__ import annotations

PING_SECONDS = 20
PING_TIMEOUT_SECONDS = 10

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", PING_SECONDS * 1000),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_SECONDS * 1000),
    # A channel waiting for its next call (e.g. a re-attach) learns of a dead peer too.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", PING_SECONDS * 1000),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_SECONDS * 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", PING_SECONDS * 1000 // 2),
    ("grpc.http2.max_ping_strikes", 0),
]
