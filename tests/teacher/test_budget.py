"""A job's budget in the cache database, on SQLite and PostgreSQL: reservations from many tasks and many
connections (as from many workers) never pass the limit together; settling records the real cost."""

from __future__ import annotations

import asyncio

import pytest

from stillhouse.common import database
from stillhouse.teacher.budget import JobBudget
from stillhouse.teacher.cache import SQLITE_PRAGMAS, TeacherCache


async def test_concurrent_reservations_from_many_workers_never_exceed_the_limit(database_url):
    cache = await TeacherCache.open(database_url)
    # Four engines: four worker processes, each with its own connections, racing on the same row.
    engines = [database.create_engine_for(database_url, SQLITE_PRAGMAS) for _ in range(4)]
    try:
        budgets = [await JobBudget(engine, "job-1", "scope-a", 5.0).open() for engine in engines]
        granted = await asyncio.gather(
            *(budgets[task % 4].reserve(0.3) for task in range(40))
        )  # 40 calls of 0.30 USD want 12 USD of a 5 USD budget
        spent, reserved = await budgets[0].committed_usd()
        assert sum(granted) == 16 and reserved == pytest.approx(4.8) and spent == 0.0

        await asyncio.gather(*(budgets[task % 4].settle(0.3, 0.1) for task in range(16)))
        spent, reserved = await budgets[0].committed_usd()
        assert spent == pytest.approx(1.6) and reserved == pytest.approx(0.0, abs=1e-9)
        # What settling freed can be reserved again, up to the limit and no further.
        again = await asyncio.gather(*(budgets[task % 4].reserve(0.3) for task in range(40)))
        assert sum(again) == 11
    finally:
        for engine in engines:
            await engine.dispose()
        await cache.close()


async def test_each_job_and_scope_has_its_own_spend_which_outlives_a_run(database_url):
    cache = await TeacherCache.open(database_url)
    try:
        first = await JobBudget(cache.engine, "job-1", "scope-a", 1.0).open()
        assert await first.reserve(0.8)
        await first.settle(0.8, 0.7)
        # Another job, or the same job under another scope, starts from nothing.
        assert await (await JobBudget(cache.engine, "job-2", "scope-a", 1.0).open()).reserve(0.8)
        assert await (await JobBudget(cache.engine, "job-1", "scope-b", 1.0).open()).reserve(0.8)
        # A later run of job-1 sees its 0.70 USD spent.
        resumed = await JobBudget(cache.engine, "job-1", "scope-a", 1.0).open()
        assert await resumed.committed_usd() == pytest.approx((0.7, 0.0))
        assert not await resumed.reserve(0.31)
        assert await resumed.reserve(0.3)
    finally:
        await cache.close()


async def test_a_cancelled_reservation_is_handed_back(database_url):
    cache = await TeacherCache.open(database_url)
    try:
        budget = await JobBudget(cache.engine, "job-1", "scope-a", 1.0).open()
        for _ in range(20):
            reserving = asyncio.ensure_future(budget.reserve(0.5))
            await asyncio.sleep(0)
            reserving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reserving
        assert await budget.committed_usd() == pytest.approx((0.0, 0.0), abs=1e-9)
    finally:
        await cache.close()


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="0 USD or more"):
        JobBudget(None, "job-1", "scope-a", -1.0)  # type: ignore[arg-type]
