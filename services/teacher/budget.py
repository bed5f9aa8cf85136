"""A job's teacher budget, shared by every shard and worker of its teacher stage through the cache database.

One row per job and cache scope holds what the job has spent and what its calls in flight have reserved.
Before a paid call, a shard reserves the call's estimate (`reserve`) with one conditional UPDATE:

    UPDATE teacher_budget_spend SET reserved_usd = reserved_usd + :estimate
    WHERE job_id = :job AND scope = :scope AND spent_usd + reserved_usd + :estimate <= :limit

which both databases apply atomically (SQLite has one writer; PostgreSQL re-checks the condition on the
row it locked), so shards racing on many workers never reserve past the limit together. When the answer
comes back the shard settles: the estimate leaves `reserved_usd`, the real cost joins `spent_usd`. A call
that failed or was cancelled settles at no cost. A worker that dies mid-call never settles: its
reservations stay, counted as spent, because the teacher may have charged for calls it had sent; the
budget errs towards stopping early, never towards overspending.

The row outlives a run of the stage, so a resumed stage sees what the job already spent.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import Column, Float, String, Table, and_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from stillhouse.teacher.cache import metadata

# Sums of float dollars drift by a few ulps; a call that fits to within this fits (as `ledger.Budget`).
USD_TOLERANCE = 1e-9

spend = Table(
    "teacher_budget_spend",
    metadata,
    Column("job_id", String(255), primary_key=True),
    # The cache scope (tenant and API key) the job's calls are paid under.
    Column("scope", String(255), primary_key=True),
    Column("spent_usd", Float, nullable=False),
    Column("reserved_usd", Float, nullable=False),
)


def budget_stopped_reason(limit_usd: float) -> str:
    """The `AnswerPromptsResult.stopped_reason` of a stage the budget stopped."""
    return f"budget of {limit_usd:.2f} USD reached"


class JobBudget:
    """The budget `limit_usd` of job `job_id`'s calls in `scope`, kept in the cache database."""

    def __init__(self, engine: AsyncEngine, job_id: str, scope: str, limit_usd: float) -> None:
        if not limit_usd >= 0:
            raise ValueError(f"a budget must be 0 USD or more, not {limit_usd}")
        self._engine = engine
        self._job_id = job_id
        self._scope = scope
        self.limit_usd = limit_usd
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._create = insert(spend).on_conflict_do_nothing(index_elements=[spend.c.job_id, spend.c.scope])
        self._row = and_(spend.c.job_id == job_id, spend.c.scope == scope)

    @property
    def stopped_reason(self) -> str:
        return budget_stopped_reason(self.limit_usd)

    async def open(self) -> JobBudget:
        """Create the job's row if this is its first run (idempotent, race-free)."""
        async with self._engine.begin() as connection:
            await connection.execute(
                self._create,
                {"job_id": self._job_id, "scope": self._scope, "spent_usd": 0.0, "reserved_usd": 0.0},
            )
        return self

    async def reserve(self, estimate_usd: float) -> bool:
        """Reserve `estimate_usd` for a call about to start; False (nothing reserved) if it does not fit.
        Cancel-safe: a reserve cancelled while its UPDATE is on its way hands back what it reserved."""
        reserving = asyncio.ensure_future(self._reserve(estimate_usd))
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            if await reserving:
                await self.settle(estimate_usd, 0.0)
            raise

    async def _reserve(self, estimate_usd: float) -> bool:
        statement = (
            update(spend)
            .where(
                self._row,
                spend.c.spent_usd + spend.c.reserved_usd + estimate_usd <= self.limit_usd + USD_TOLERANCE,
            )
            .values(reserved_usd=spend.c.reserved_usd + estimate_usd)
        )
        async with self._engine.begin() as connection:
            result = await connection.execute(statement)
        return result.rowcount == 1

    async def settle(self, estimate_usd: float, cost_usd: float) -> None:
        """Turn a reservation of `estimate_usd` into the call's real cost (0 for a call that failed)."""
        statement = (
            update(spend)
            .where(self._row)
            .values(
                reserved_usd=spend.c.reserved_usd - estimate_usd,
                spent_usd=spend.c.spent_usd + cost_usd,
            )
        )
        async with self._engine.begin() as connection:
            await connection.execute(statement)

    async def committed_usd(self) -> tuple[float, float]:
        """(spent, reserved) so far, for reports and tests."""
        async with self._engine.connect() as connection:
            row = (
                await connection.execute(select(spend.c.spent_usd, spend.c.reserved_usd).where(self._row))
            ).one_or_none()
        return (0.0, 0.0) if row is None else (row.spent_usd, row.reserved_usd)
