"""How the SDK (and so the CLI) finds the API: URL and token given or from the environment first, then
the endpoint file `stillhouse up` wrote."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from stillhouse.client import Client
from stillhouse.client.endpoint import NO_API_FOUND, ApiEndpoint, discover_endpoint
from stillhouse.client.errors import EndpointNotFound


def write_endpoint(
    home: Path, pid: int, url: str = "http://127.0.0.1:8123", token: str = "from-file"
) -> None:
    token_file = home / "api-token"
    token_file.write_text(token + "\n")
    endpoint = {"apiUrl": url, "tokenFile": str(token_file), "pid": pid, "services": {}}
    (home / "endpoint.json").write_text(json.dumps(endpoint))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_url_and_token_from_the_environment_win(tmp_path: Path) -> None:
    write_endpoint(tmp_path, os.getpid())
    endpoint = discover_endpoint("http://api.example:9000/", "from-env", tmp_path)
    assert endpoint == ApiEndpoint("http://api.example:9000", "from-env")


def test_endpoint_file_of_a_running_up(tmp_path: Path) -> None:
    write_endpoint(tmp_path, os.getpid())
    assert discover_endpoint(None, None, tmp_path) == ApiEndpoint("http://127.0.0.1:8123", "from-file")


def test_url_from_the_environment_token_from_the_file(tmp_path: Path) -> None:
    write_endpoint(tmp_path, os.getpid())
    endpoint = discover_endpoint("http://127.0.0.1:9999", None, tmp_path)
    assert endpoint == ApiEndpoint("http://127.0.0.1:9999", "from-file")


def test_token_from_the_environment_url_from_the_file(tmp_path: Path) -> None:
    write_endpoint(tmp_path, os.getpid())
    assert discover_endpoint(None, "from-env", tmp_path) == ApiEndpoint("http://127.0.0.1:8123", "from-env")


def test_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(EndpointNotFound) as caught:
        discover_endpoint(None, None, tmp_path)
    assert str(caught.value) == NO_API_FOUND


def test_url_without_any_token(tmp_path: Path) -> None:
    with pytest.raises(EndpointNotFound, match="STILLHOUSE_API_TOKEN"):
        discover_endpoint("http://api.example:9000", None, tmp_path)


def test_endpoint_file_left_by_a_dead_up(tmp_path: Path) -> None:
    pid = dead_pid()
    write_endpoint(tmp_path, pid)
    with pytest.raises(EndpointNotFound, match=rf"pid {pid}\) is no longer running"):
        discover_endpoint(None, None, tmp_path)


def test_unreadable_token_file_is_named(tmp_path: Path) -> None:
    write_endpoint(tmp_path, os.getpid())
    (tmp_path / "api-token").unlink()
    with pytest.raises(EndpointNotFound, match="api-token"):
        discover_endpoint(None, None, tmp_path)


def test_the_token_stays_out_of_repr() -> None:
    assert "hush" not in repr(ApiEndpoint("http://x", "hush"))


def test_the_client_reads_the_environment_then_the_file(tmp_path: Path, monkeypatch) -> None:
    write_endpoint(tmp_path, os.getpid())
    monkeypatch.delenv("STILLHOUSE_API_URL", raising=False)
    monkeypatch.setenv("STILLHOUSE_API_TOKEN", "from-env")
    with Client(home=tmp_path) as client:
        assert client.url == "http://127.0.0.1:8123"
    monkeypatch.setenv("STILLHOUSE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("STILLHOUSE_API_TOKEN")
    with pytest.raises(EndpointNotFound) as caught:
        Client()
    assert str(caught.value) == NO_API_FOUND
