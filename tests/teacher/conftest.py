"""Fixtures for teacher tests: a fake OpenAI-compatible server. The cache tests run on SQLite and on
PostgreSQL through the `database_url` fixture of tests/conftest.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from background import background_server
from waiting import http_ok, pick_free_port

# --- a fake OpenAI-compatible server ---------------------------------------------------------------

FAKE_OPENAI = Path(__file__).with_name("fake_openai.py")


@dataclass
class FakeOpenAI:
    """The server in fake_openai.py, running as its own process; see that file for its behaviours."""

    port: int

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def control(self, **script: object) -> None:
        """Queue a behaviour (`mode=...`) and/or change settings (`api_key`, `flavor`, ...)."""
        httpx.post(f"{self.root}/_control", json=script, timeout=5).raise_for_status()

    def calls(self) -> dict:
        return httpx.get(f"{self.root}/_calls", timeout=5).json()

    def reset(self) -> None:
        httpx.post(f"{self.root}/_reset", timeout=5).raise_for_status()

    def vocab(self) -> list[str]:
        return httpx.get(f"{self.root}/_vocab", timeout=5).json()


@pytest.fixture(scope="session")
def fake_openai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(pick_free_port())
    argv = [sys.executable, str(FAKE_OPENAI), str(server.port)]
    log_path = tmp_path_factory.mktemp("fake-openai") / "server.log"
    with background_server(
        "the fake OpenAI server", argv, log_path, lambda: http_ok(f"{server.root}/_calls"), timeout=30
    ):
        yield server


@pytest.fixture
def fake_openai(fake_openai_server: FakeOpenAI) -> FakeOpenAI:
    """The session's fake server, with no calls counted, no behaviours queued and default settings."""
    fake_openai_server.reset()
    return fake_openai_server
