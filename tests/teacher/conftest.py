"""Fixtures for teacher tests: a fake OpenAI-compatible server. The cache tests run on SQLite and on
PostgreSQL through the `database_url` fixture of tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_openai_client import FakeOpenAI, running_fake_openai

# --- a fake OpenAI-compatible server ---------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_openai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeOpenAI]:
    with running_fake_openai(tmp_path_factory.mktemp("fake-openai") / "server.log") as server:
        yield server


@pytest.fixture
def fake_openai(fake_openai_server: FakeOpenAI) -> FakeOpenAI:
    """The session's fake server, with no calls counted, no behaviours queued and default settings."""
    fake_openai_server.reset()
    return fake_openai_server
