"""The console tests' principals (two tenants' users and an admin) and a control plane seen as they see
it: through the API with a bearer token, or through the console with a session."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

TOKENS = {
    "alice": "alice-console-token-0123456789",
    "bob": "bob-console-token-0123456789",
    "ops": "ops-console-token-0123456789",
}
PRINCIPALS = {
    "principals": [
        {"name": "alice", "tenant": "team-a", "role": "user", "token": TOKENS["alice"]},
        {"name": "bob", "tenant": "team-b", "role": "user", "token": TOKENS["bob"]},
        {"name": "ops", "tenant": "platform", "role": "admin", "token": TOKENS["ops"]},
    ]
}


def job_document(name: str) -> dict:
    return {
        "metadata": {"name": name, "labels": {"team": "console"}},
        "spec": {"teacher": {"backend": "local", "model": "smollm2"}, "student": {"init": {"config": {}}}},
    }


@dataclass
class ConsolePlatform:
    url: str

    def api(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKENS[who]}"}, timeout=10)

    def submit(self, who: str, name: str) -> str:
        with self.api(who) as client:
            response = client.post("/v1/jobs", json=job_document(name))
        assert response.status_code == 201, response.text
        return response.json()["id"]

    @contextmanager
    def signed_in(self, who: str) -> Iterator[httpx.Client]:
        """A client holding `who`'s console session (logged in through the form)."""
        with httpx.Client(base_url=self.url, timeout=10) as client:
            response = client.post("/login", data={"token": TOKENS[who], "next": "/"})
            assert response.status_code == 303, response.text
            yield client
