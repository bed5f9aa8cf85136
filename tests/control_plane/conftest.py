"""The job store on an empty database (every store test runs on SQLite and on PostgreSQL), and a control
plane process to send requests to (`start_module_api` and `start_api`, in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from stillhouse.control_plane.store import JobStore


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[JobStore]:
    """A migrated job store on an empty database."""
    job_store = await JobStore.open(database_url)
    try:
        yield job_store
    finally:
        await job_store.close()


@pytest.fixture(scope="module")
def api(start_module_api):
    """A control plane process whose trainer is scripted, the other stages absent; one for the module's
    tests, so that each works on jobs and files of its own (and reads the log from where it began)."""
    return start_module_api()


@pytest.fixture
def fresh_api(start_api):
    """As `api`, but a process of the test's own: for a test that counts every job or metric there is."""
    return start_api()
