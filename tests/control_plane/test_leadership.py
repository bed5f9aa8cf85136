"""The orchestrator's lease on real PostgreSQL: two holders, expiry, renewal, terms, and a leader cut
off from the database that stops driving before another can take over; and the notifications that
carry what one control plane writes to the others."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from stillhouse.common import database
from stillhouse.common.job_phases import Phase, Stage, StepState
from stillhouse.control_plane.leadership import DatabaseLease, Leadership, lease_quarter_ms
from stillhouse.control_plane.notifications import (
    CANCEL_REQUESTED,
    EVENTS_WRITTEN,
    JOB_SUBMITTED,
    DatabaseListener,
)
from stillhouse.control_plane.store import JobStore, LeaseLost

LEASE_SECONDS = 2.0


@pytest.fixture
async def lease_for(postgres_database_url: str) -> AsyncIterator[Callable[..., DatabaseLease]]:
    """Factory: `lease_for(holder, seconds=LEASE_SECONDS, url=...)`, a lease client on its own engine."""
    await (await JobStore.open(postgres_database_url)).close()
    leases: list[DatabaseLease] = []

    def make(holder: str, seconds: float = LEASE_SECONDS, url: str = postgres_database_url) -> DatabaseLease:
        leases.append(DatabaseLease(database.create_engine_for(url), holder, seconds))
        return leases[-1]

    yield make
    for lease in leases:
        await lease.close()


async def test_one_holder_at_a_time_and_renewal_keeps_the_term(lease_for) -> None:
    first, second = lease_for("first"), lease_for("second")
    assert await first.acquire() == 1
    assert await second.acquire() is None
    for _ in range(3):
        await asyncio.sleep(LEASE_SECONDS / 2)
        assert await first.acquire() == 1  # renewed within its length: the same term
        assert await second.acquire() is None


async def test_an_expired_lease_passes_to_another_holder_in_a_new_term_and_fences_the_old(
    lease_for,
) -> None:
    first, second = lease_for("first"), lease_for("second")
    assert await first.acquire() == 1
    taken_at = time.monotonic()
    while (epoch := await second.acquire()) is None:
        await asyncio.sleep(0.05)
    waited = time.monotonic() - taken_at

    assert epoch == 2
    assert LEASE_SECONDS * 0.9 <= waited <= LEASE_SECONDS + 1.0
    # The old holder's renewal finds its term taken: refused, however soon it asks.
    assert await first.acquire() is None
    await first.release(1)  # releasing a term it no longer holds changes nothing
    assert await second.acquire() == 2


async def test_a_fenced_write_left_hanging_in_its_transaction_does_not_keep_the_follower_out(
    postgres_database_url, lease_for
) -> None:
    """A leader whose connection goes silent in the middle of a fenced write holds the lease row's lock;
    the server ends that transaction after the store's idle limit, and the follower takes the lease."""
    first, second = lease_for("first"), lease_for("second")
    # As the control plane opens its store: idle transactions ended after a quarter of the lease.
    store = await JobStore.open(
        postgres_database_url, idle_transaction_limit_ms=lease_quarter_ms(LEASE_SECONDS)
    )
    fenced = store.fenced(first.fence)
    first.fence.epoch = await first.acquire()
    locked = asyncio.Event()

    async def write_and_go_silent() -> None:
        async with fenced._sessions() as session, session.begin():
            await fenced._check_fence(session)  # the lease row, share-locked as every fenced write does
            locked.set()
            await asyncio.Event().wait()

    hanging = asyncio.create_task(write_and_go_silent())
    try:
        await locked.wait()
        started = time.monotonic()
        epoch = None
        while epoch is None and time.monotonic() - started < LEASE_SECONDS * 3:
            epoch = await asyncio.wait_for(second.acquire(), LEASE_SECONDS * 3)
            await asyncio.sleep(0.05)
        assert epoch == 2, "the follower never took the lease"
        assert time.monotonic() - started <= LEASE_SECONDS * 1.25 + 1.0
    finally:
        hanging.cancel()
        await asyncio.gather(hanging, return_exceptions=True)
        await store.close()


async def test_a_released_lease_is_free_at_once(lease_for) -> None:
    first, second = lease_for("first"), lease_for("second", seconds=60)
    first_long = lease_for("first", seconds=60)
    assert await first_long.acquire() == 1
    await first_long.release(1)
    assert await second.acquire() == 2
    assert await first.acquire() is None


async def test_a_fenced_store_writes_only_under_its_term_of_the_lease(
    postgres_database_url, lease_for
) -> None:
    first, second = lease_for("first"), lease_for("second")
    store = await JobStore.open(postgres_database_url)
    fenced = store.fenced(first.fence)
    try:
        await store.create_job("job-1", "a", {"spec": {}}, {}, owner="alice", tenant="team-a")
        with pytest.raises(LeaseLost):  # a fence without a term: not leading yet
            await fenced.set_phase("job-1", Phase.PROMPTS)
        first.fence.epoch = await first.acquire()
        await fenced.set_phase("job-1", Phase.PROMPTS)
        await fenced.begin_step("job-1", Stage.PROMPTS, "job-1.prompts.1")
        await fenced.append_event("job-1", "progress", {"done": 1})

        await asyncio.sleep(LEASE_SECONDS + 0.2)  # expired, though nobody has taken it yet
        with pytest.raises(LeaseLost):
            await fenced.append_event("job-1", "progress", {"done": 2})
        assert await second.acquire() == 2
        with pytest.raises(LeaseLost):
            await fenced.finish_step("job-1", Stage.PROMPTS, StepState.SUCCEEDED, result={})
        with pytest.raises(LeaseLost):
            await fenced.set_phase("job-1", Phase.TEACHER)

        # Nothing of the old term's late writes landed; the store without a fence still writes.
        assert (await store.get_job("job-1")).phase is Phase.PROMPTS
        assert (await store.get_step("job-1", Stage.PROMPTS)).state is StepState.RUNNING
        assert [event.data for event in await store.events_after("job-1") if event.type == "progress"] == [
            {"done": 1}
        ]
        await store.finish_step("job-1", Stage.PROMPTS, StepState.SUCCEEDED, result={})
    finally:
        await store.close()


class Recorder:
    """The callbacks of one Leadership, with when each ran."""

    def __init__(self) -> None:
        self.elected: list[float] = []
        self.deposed: list[float] = []

    async def on_elected(self) -> None:
        self.elected.append(time.monotonic())

    async def on_deposed(self) -> None:
        self.deposed.append(time.monotonic())

    @property
    def leading(self) -> bool:
        return len(self.elected) > len(self.deposed)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_follower_takes_over_when_the_leader_stops_and_at_once_when_it_lets_go(lease_for) -> None:
    first, second = Recorder(), Recorder()
    leader = Leadership(lease_for("first"), first.on_elected, first.on_deposed)
    follower = Leadership(lease_for("second"), second.on_elected, second.on_deposed)
    await leader.start()
    await wait_for(lambda: first.leading, LEASE_SECONDS, "the first to lead")
    await follower.start()
    await asyncio.sleep(LEASE_SECONDS * 1.5)  # renewals keep the lead where it is
    assert first.leading and not second.leading and leader.epoch == 1

    await leader.stop()  # a clean shutdown lets the lease go
    took = await wait_for(lambda: second.leading, LEASE_SECONDS, "the follower to take over")
    assert took < LEASE_SECONDS * 0.5 and follower.epoch == 2
    assert first.deposed and not first.leading
    await follower.stop()


@pytest.mark.parametrize("partition", ["cut", "stall", "stall_at_next_commit"])
async def test_a_leader_cut_off_from_the_database_stops_driving_before_another_can_lead(
    postgres_database_url: str, lease_for, partition: str
) -> None:
    """`cut`: its connections are dropped and refused; `stall`: they hang, answering nothing;
    `stall_at_next_commit`: they hang in the middle of a renewal, its row lock on the lease held."""
    url = make_url(postgres_database_url)
    first, second = Recorder(), Recorder()
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as network:
        proxied = url.set(port=network.port).render_as_string(hide_password=False)
        leader = Leadership(lease_for("first", url=proxied), first.on_elected, first.on_deposed)
        follower = Leadership(lease_for("second"), second.on_elected, second.on_deposed)
        await leader.start()
        await wait_for(lambda: first.leading, LEASE_SECONDS, "the first to lead")
        await follower.start()
        await asyncio.sleep(LEASE_SECONDS / 2)

        getattr(network, partition)()
        cut_at = time.monotonic()
        await wait_for(lambda: second.leading, LEASE_SECONDS * 3, "the follower to take over")
        network.heal()

        # The cut-off leader stopped on its own, within its lease, and before the follower led.
        assert first.deposed and first.deposed[0] - cut_at < LEASE_SECONDS
        assert first.deposed[0] < second.elected[0]
        assert not leader.leading and follower.epoch == 2
        # Once it reaches the database again, it finds the lease taken and stays a follower.
        await asyncio.sleep(LEASE_SECONDS)
        assert not first.leading and len(first.elected) == 1
        await leader.stop()
        await follower.stop()


async def test_what_one_store_writes_is_announced_to_a_listener_of_another_process(
    postgres_database_url: str,
) -> None:
    heard: dict[str, list[str]] = {JOB_SUBMITTED: [], CANCEL_REQUESTED: [], EVENTS_WRITTEN: []}
    handlers = {channel: heard[channel].append for channel in heard}
    listener = DatabaseListener(postgres_database_url, handlers)
    store = await JobStore.open(postgres_database_url)
    listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        await store.create_job("job-1", "a", {"spec": {}}, {}, owner="alice", tenant="team-a")
        await store.append_event("job-1", "progress", {"done": 1})
        await store.request_cancel("job-1")
        await wait_for(
            lambda: len(heard[EVENTS_WRITTEN]) >= 2 and heard[CANCEL_REQUESTED], 5, "notifications"
        )
    finally:
        await listener.stop()
        await store.close()
    assert heard[JOB_SUBMITTED] == ["job-1"]
    assert heard[CANCEL_REQUESTED] == ["job-1"]
    assert set(heard[EVENTS_WRITTEN]) == {"job-1"}  # the Pending phase event, then the progress event
