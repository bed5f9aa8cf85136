"""Which of the control planes sharing a database drives the jobs: the holder of a lease in PostgreSQL.

Every replica serves the API; only the leader runs the orchestrator. The lease is a row
(`control_plane_leases`) naming its holder and when it expires, by the database's clock, so no two
machines' clocks are compared. The leader renews it every quarter of its length. A leader killed
outright simply stops renewing, and a follower takes the lease once it has expired: within
`lease_seconds` and a quarter after the leader's last renewal. A leader that cannot renew (the database
is away, or a network partition cuts it off) stops driving jobs once four fifths of the lease, counted
from before it asked for its last renewal, have passed: before the lease can have expired in the
database, so two leaders never drive at once. A partition in the middle of a renewal leaves its
transaction open on the server, holding the lease row's lock; the server ends it once it has idled for
a quarter of the lease, so the lock never keeps a follower out. Each new holder starts a new term
(`epoch`); a holder whose term has been taken over cannot renew it. The leader's orchestrator writes
through a store fenced with its term (`JobStore.fenced`): should a leader be paused past its lease (a
frozen VM) and wake driving, its next write of a phase, step or event fails (`LeaseLost`) instead of
landing.

A control plane on SQLite (embedded mode) is the only one on its database and always leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog
from sqlalchemy import and_, case, func, or_, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from stillhouse.common.database_retry import describe
from stillhouse.control_plane.store import LeaseFence, LeaseRow

log = structlog.get_logger(__name__)

ORCHESTRATOR_LEASE = "orchestrator"
# Of the lease's length: how often it is renewed (or, by a follower, tried), and when a leader that
# could not renew stops driving, leaving the rest as a margin for stopping and for clock-rate drift.
RENEW_FRACTION = 0.25
STEP_DOWN_FRACTION = 0.8


def new_holder_id() -> str:
    """This process's name as a lease holder: unique, so a restarted process never renews a dead one's."""
    return uuid.uuid4().hex


def lease_quarter_ms(lease_seconds: float) -> int:
    """How often the leader renews a lease of `lease_seconds`, in milliseconds: also how long a transaction
    of the control plane may idle before the server ends it (and frees its locks)."""
    return max(1, int(lease_seconds * RENEW_FRACTION * 1000))


class DatabaseLease:
    """One lease in PostgreSQL, taken and renewed by `holder` for `seconds` at a time."""

    def __init__(self, engine: AsyncEngine, holder: str, seconds: float, name: str = ORCHESTRATOR_LEASE):
        self._engine = engine
        self.holder = holder
        self.seconds = seconds
        self.name = name
        # The term the leader's writes are fenced with (`JobStore.fenced`): set only while it leads.
        self.fence = LeaseFence(name, holder)

    async def acquire(self) -> int | None:
        """Renew the lease if this holder has it, or take it if it is free or expired: its epoch. None
        while another holder has it."""
        table = LeaseRow.__table__
        expires_at = func.now() + timedelta(seconds=self.seconds)
        held_by_me = and_(table.c.holder == self.holder, table.c.expires_at > func.now())
        statement = postgresql.insert(table).values(
            name=self.name, holder=self.holder, epoch=1, expires_at=expires_at
        )
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.name],
            set_={
                "holder": statement.excluded.holder,
                "epoch": case((held_by_me, table.c.epoch), else_=table.c.epoch + 1),
                "expires_at": statement.excluded.expires_at,
            },
            where=or_(held_by_me, table.c.expires_at <= func.now()),
        ).returning(table.c.epoch)
        async with self._engine.begin() as connection:
            await self._bound_waits(connection)
            return await connection.scalar(statement)

    async def _bound_waits(self, connection: AsyncConnection) -> None:
        """A row lock held by a fenced write or a lease call whose connection hangs makes a lease call wait;
        it gives up for this round instead. The server ends such a transaction once it idles for a quarter
        of the lease (the store's sessions are opened with that limit; the lease's own pool sets it here),
        so no lock outlives the lease."""
        await connection.execute(
            text(
                "SELECT set_config('lock_timeout', :limit, true),"
                " set_config('idle_in_transaction_session_timeout', :limit, true)"
            ),
            {"limit": str(lease_quarter_ms(self.seconds))},
        )

    async def close(self) -> None:
        await self._engine.dispose()

    async def release(self, epoch: int) -> None:
        """Let the lease expire now, if this holder still has it in term `epoch`."""
        table = LeaseRow.__table__
        async with self._engine.begin() as connection:
            await self._bound_waits(connection)
            await connection.execute(
                update(table)
                .where(table.c.name == self.name, table.c.holder == self.holder, table.c.epoch == epoch)
                .values(expires_at=func.now())
            )


Callback = Callable[[], Awaitable[None]]


class Leadership:
    """Runs `on_elected` when this process takes the lease and `on_deposed` when it must stop leading."""

    def __init__(self, lease: DatabaseLease, on_elected: Callback, on_deposed: Callback) -> None:
        self._lease = lease
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._epoch: int | None = None
        self._stop_at = 0.0  # event-loop time at which a leader that has not renewed stops driving
        self._task: asyncio.Task | None = None

    @property
    def leading(self) -> bool:
        return self._epoch is not None

    @property
    def epoch(self) -> int | None:
        return self._epoch

    async def start(self) -> None:
        """Start contending for the lease (and renewing it once held) in the background."""
        self._task = asyncio.create_task(self._hold(), name="leadership")

    async def stop(self) -> None:
        """Stop leading (if leading) and let the lease go at once, so that a follower takes over."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        epoch = self._epoch
        if epoch is not None:
            await self._step_down("shutting down")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._lease.release(epoch), self._lease.seconds * RENEW_FRACTION)
        await self._lease.close()

    async def _hold(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._lease.seconds * RENEW_FRACTION
        while True:
            asked_at = loop.time()
            answered, epoch = await self._ask(loop)
            if epoch is not None:
                self._stop_at = asked_at + self._lease.seconds * STEP_DOWN_FRACTION
                if epoch != self._epoch:
                    await self._take_term(epoch)
            elif self.leading and (answered or loop.time() >= self._stop_at):
                reason = "another holder has the lease" if answered else "cannot renew the lease"
                await self._step_down(reason)
            wait = interval
            if self.leading:
                wait = min(interval, max(0.0, self._stop_at - loop.time()))
            await asyncio.sleep(wait)

    async def _ask(self, loop: asyncio.AbstractEventLoop) -> tuple[bool, int | None]:
        """(whether the database answered, the epoch of this holder's term if it has the lease)."""
        patience = self._lease.seconds * RENEW_FRACTION
        if self.leading:
            patience = max(0.05, self._stop_at - loop.time())
        asking = asyncio.ensure_future(self._lease.acquire())
        # Not wait_for: behind a partition, even the cancelled call's clean-up (a ROLLBACK) hangs, and
        # the step-down must not wait for it.
        await asyncio.wait({asking}, timeout=patience)
        if not asking.done():
            asking.cancel()
            asking.add_done_callback(_forget)
            log.warning("the lease's database did not answer in time", seconds=round(patience, 2))
            return False, None
        try:
            return True, asking.result()
        except Exception as exc:  # any database error: unreachable for now, as far as leading goes
            log.warning("cannot reach the lease's database", error=describe(exc))
        return False, None

    async def _take_term(self, epoch: int) -> None:
        if self.leading:
            await self._step_down("the lease lapsed into a new term")
        self._epoch = self._lease.fence.epoch = epoch
        log.info("leading: driving the jobs", holder=self._lease.holder, epoch=epoch)
        try:
            await self._on_elected()
        except Exception as exc:
            log.warning("could not take up leading; trying again", error=describe(exc))
            await self._step_down("taking up leading failed")

    async def _step_down(self, reason: str) -> None:
        log.warning("no longer leading: stopped driving the jobs", reason=reason, epoch=self._epoch)
        self._epoch = self._lease.fence.epoch = None
        await self._on_deposed()


def _forget(task: asyncio.Future) -> None:
    """Retrieve the outcome of a call given up on, so that asyncio does not report it as never seen."""
    if not task.cancelled():
        task.exception()


class SoleLeader:
    """The only control plane on its database (SQLite, embedded mode): leads from start to stop."""

    def __init__(self, on_elected: Callback, on_deposed: Callback) -> None:
        self._on_elected = on_elected
        self._on_deposed = on_deposed

    async def start(self) -> None:
        await self._on_elected()

    async def stop(self) -> None:
        await self._on_deposed()
