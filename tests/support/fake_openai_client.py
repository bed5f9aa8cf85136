"""Runs and steers tests/teacher/fake_openai.py, the fake OpenAI-compatible server, from a test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from background import background_server
from waiting import http_ok, pick_free_port

FAKE_OPENAI = Path(__file__).resolve().parents[1] / "teacher" / "fake_openai.py"


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
        """Queue a behaviour (`mode=...`), drop the queued ones (`clear=True`) and/or change settings."""
        httpx.post(f"{self.root}/_control", json=script, timeout=5).raise_for_status()

    def calls(self) -> dict:
        return httpx.get(f"{self.root}/_calls", timeout=5).json()

    def reset(self) -> None:
        httpx.post(f"{self.root}/_reset", timeout=5).raise_for_status()

    def vocab(self) -> list[str]:
        return httpx.get(f"{self.root}/_vocab", timeout=5).json()


@contextmanager
def running_fake_openai(log_path: Path, *args: str) -> Iterator[FakeOpenAI]:
    """A fake server on a free port for the block's duration; `args` are its command-line options."""
    server = FakeOpenAI(pick_free_port())
    argv = [sys.executable, str(FAKE_OPENAI), str(server.port), *args]
    with background_server(
        "the fake OpenAI server", argv, log_path, lambda: http_ok(f"{server.root}/_calls"), timeout=30
    ):
        yield server
