"""The S3 client's retry policy, against an HTTP server that answers 503 SlowDown a set number of times."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3

from stillhouse.common.objectstore.s3_store import S3_RETRIES, s3_http_pool


class SlowDownFirst(ThreadingHTTPServer):
    """Answers the first `busy_answers` PUTs with 503 SlowDown (Retry-After: 0, as S3 may), then 200."""

    def __init__(self, busy_answers: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.busy_answers = busy_answers
        self.requests = 0


class _Handler(BaseHTTPRequestHandler):
    server: SlowDownFirst

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests += 1
        busy = self.server.requests <= self.server.busy_answers
        self.send_response(503 if busy else 200)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_down_server(request: pytest.FixtureRequest) -> Iterator[SlowDownFirst]:
    server = SlowDownFirst(busy_answers=request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("slow_down_server", [S3_RETRIES.status], indirect=True)
def test_a_put_outlasts_as_many_busy_answers_as_the_policy_retries(slow_down_server: SlowDownFirst) -> None:
    url = f"http://127.0.0.1:{slow_down_server.server_port}/bucket/key"
    answer = s3_http_pool(max_connections=1).request("PUT", url, body=b"x")
    assert answer.status == 200
    assert slow_down_server.requests == S3_RETRIES.status + 1


@pytest.mark.parametrize("slow_down_server", [S3_RETRIES.status + 1], indirect=True)
def test_one_busy_answer_more_gives_up(slow_down_server: SlowDownFirst) -> None:
    url = f"http://127.0.0.1:{slow_down_server.server_port}/bucket/key"
    with pytest.raises(urllib3.exceptions.MaxRetryError, match="too many 503 error responses"):
        s3_http_pool(max_connections=1).request("PUT", url, body=b"x")
    assert slow_down_server.requests == S3_RETRIES.status + 1
