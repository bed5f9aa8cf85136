"""The teacher cache on SQLite and PostgreSQL: identity, first write wins, durability, batching, expiry."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import event, func, select, update

from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs
from stillhouse.control_plane.store import JobStore
from stillhouse.teacher.cache import CacheWriter, TeacherCache, answers, pack_logprobs, unpack_logprobs
from stillhouse.teacher.calls import ChatMessage, TeacherAnswer, TeacherCall, TokenIdSource, cache_scope

BASE_CALL = TeacherCall(
    backend="openai",
    base_url="https://api.deepseek.com/v1",
    model="deepseek-chat",
    revision="2025-01-01",
    messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "What is distillation?")),
    temperature=0.7,
    top_p=1.0,
    max_tokens=512,
    seed=7,
    top_logprobs=20,
    scope=cache_scope("team-a", "sk-one"),
)


def call(number: int = 0, **changes: object) -> TeacherCall:
    messages = (ChatMessage("user", f"prompt {number}"),) if number else BASE_CALL.messages
    return dataclasses.replace(BASE_CALL, messages=messages, **changes)


def logprobs(tokens: int = 64, k: int = 20, seed: int = 0) -> SparseLogprobs:
    rng = np.random.default_rng(seed)
    topk_ids = rng.integers(0, 150_000, size=(tokens, k), dtype=np.int32)
    topk_logprobs = np.sort(-rng.exponential(3.0, size=(tokens, k)).astype(np.float32), axis=1)[:, ::-1]
    return SparseLogprobs(
        token_ids=topk_ids[:, 0].copy(),
        topk_ids=topk_ids,
        topk_logprobs=np.ascontiguousarray(topk_logprobs),
        tail_logprob=-rng.exponential(5.0, size=tokens).astype(np.float32),
    )


def answer(text: str = "Training a small model on a big one's outputs.", **changes: object) -> TeacherAnswer:
    return dataclasses.replace(
        TeacherAnswer(
            text=text,
            finish_reason="stop",
            prompt_tokens=21,
            completion_tokens=64,
            latency_seconds=0.8125,
            logprobs=logprobs(),
        ),
        **changes,
    )


def assert_same_logprobs(got: SparseLogprobs | None, want: SparseLogprobs | None) -> None:
    assert got is not None and want is not None
    for name in ("token_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
        got_array, want_array = getattr(got, name), getattr(want, name)
        assert got_array.dtype == want_array.dtype, name
        assert got_array.shape == want_array.shape, name
        assert got_array.tobytes() == want_array.tobytes(), name


@pytest.fixture
async def cache(database_url: str) -> AsyncIterator[TeacherCache]:
    opened = await TeacherCache.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def test_an_answer_with_logprobs_comes_back_exactly_and_marked_cached(cache: TeacherCache) -> None:
    stored = answer(
        token_id_source=TokenIdSource.RETOKENIZED,
        masked_alternatives=17,
        top1_mismatches=2,
        stop_token_added=True,
    )
    plain = answer("No logprobs asked for.", logprobs=None)
    await cache.put_many([(call(), stored), (call(1, top_logprobs=0), plain)])

    found = await cache.get_many([call().cache_key(), call(1, top_logprobs=0).cache_key()])

    got = found[call().cache_key()]
    assert got.cached and not stored.cached
    assert (got.text, got.finish_reason, got.prompt_tokens, got.completion_tokens, got.latency_seconds) == (
        stored.text,
        "stop",
        21,
        64,
        0.8125,
    )
    assert_same_logprobs(got.logprobs, stored.logprobs)
    assert (got.token_id_source, got.masked_alternatives, got.top1_mismatches, got.stop_token_added) == (
        TokenIdSource.RETOKENIZED,
        17,
        2,
        True,
    )
    got_plain = found[call(1, top_logprobs=0).cache_key()]
    assert got_plain.logprobs is None and got_plain.text == "No logprobs asked for." and got_plain.cached


@pytest.mark.parametrize(
    "change",
    [
        {"backend": "vllm"},
        {"base_url": "https://api.openai.com/v1"},
        {"model": "deepseek-reasoner"},
        {"revision": "2025-02-01"},
        {"messages": (ChatMessage("system", "Be brief."), ChatMessage("user", "What is distillation!"))},
        {"messages": (ChatMessage("user", "Be brief."), ChatMessage("user", "What is distillation?"))},
        {"temperature": 0.8},
        {"top_p": 0.95},
        {"max_tokens": 256},
        {"seed": 8},
        {"seed": None},
        {"top_logprobs": 5},
        {"scope": cache_scope("team-b", "sk-one")},
        {"scope": cache_scope("team-a", "sk-two")},
        {"scope": cache_scope("team-a", None)},
        {"precision": "bf16"},
    ],
    ids=lambda change: "-".join(change),
)
async def test_a_call_differing_in_any_identity_field_misses(
    cache: TeacherCache, change: dict[str, object]
) -> None:
    await cache.put_many([(call(), answer())])
    other = dataclasses.replace(call(), **change)
    assert other.cache_key() != call().cache_key()

    found = await cache.get_many([other.cache_key(), call().cache_key()])

    assert set(found) == {call().cache_key()}


def test_a_server_call_keeps_the_key_it_had_before_local_teachers_named_their_precision() -> None:
    """Adding `precision` to the identity must not orphan every answer already paid for."""
    assert BASE_CALL.precision == ""
    assert BASE_CALL.cache_key() == "2bfd8868e08f34b658c4ce3dc17ee2ee894469c2cb83afb25cff2417d38cedf4"


def test_a_scope_names_the_key_by_its_hash_only() -> None:
    scope = cache_scope("team-a", "sk-secret-key")
    assert "sk-secret-key" not in scope
    assert scope == cache_scope("team-a", "sk-secret-key") != cache_scope("team-a", "sk-secret-kez")


async def test_the_first_answer_stored_for_a_key_wins(cache: TeacherCache) -> None:
    first, second, third = answer("first"), answer("second"), answer("third")
    await cache.put_many([(call(), first), (call(), second)])
    await cache.put_many([(call(), third)])

    found = await cache.get_many([call().cache_key()])

    assert found[call().cache_key()].text == "first"


async def test_concurrent_writers_of_overlapping_keys_agree(database_url: str) -> None:
    caches = [await TeacherCache.open(database_url) for _ in range(2)]
    try:
        calls = [call(number) for number in range(1, 201)]
        batches = [
            [(each, answer(f"{writer}", logprobs=None)) for each in (calls if writer == 0 else calls[::-1])]
            for writer in range(2)
        ]
        await asyncio.gather(*(cache.put_many(batch) for cache, batch in zip(caches, batches, strict=True)))

        found = await caches[0].get_many(each.cache_key() for each in calls)
    finally:
        for cache in caches:
            await cache.close()

    assert len(found) == 200
    assert {each.text for each in found.values()} <= {"0", "1"}


async def test_answers_survive_closing_and_reopening_the_cache(database_url: str) -> None:
    cache = await TeacherCache.open(database_url)
    await cache.put_many([(call(), answer())])
    await cache.close()

    reopened = await TeacherCache.open(database_url)
    try:
        found = await reopened.get_many([call().cache_key()])
    finally:
        await reopened.close()

    assert_same_logprobs(found[call().cache_key()].logprobs, answer().logprobs)


async def test_a_thousand_keys_are_read_in_one_query(cache: TeacherCache) -> None:
    stored = [call(number) for number in range(1, 1001, 2)]
    await cache.put_many((each, answer(f"answer {each.messages[0].content}")) for each in stored)
    statements: list[str] = []
    engine = cache._engine.sync_engine
    listener = lambda *args: statements.append(args[2])  # noqa: E731

    event.listen(engine, "before_cursor_execute", listener)
    try:
        found = await cache.get_many(call(number).cache_key() for number in range(1, 1001))
    finally:
        event.remove(engine, "before_cursor_execute", listener)

    assert set(found) == {each.cache_key() for each in stored}
    assert found[call(7).cache_key()].text == "answer prompt 7"
    assert [statement.split()[0].upper() for statement in statements] == ["SELECT"]


async def test_the_cache_shares_a_database_with_the_job_store(database_url: str) -> None:
    jobs = await JobStore.open(database_url)
    cache = await TeacherCache.open(database_url)
    try:
        await jobs.create_job("job-1", "support-bot", {}, {}, owner="alice", tenant="team-a")
        await cache.put_many([(call(), answer())])
        assert call().cache_key() in await cache.get_many([call().cache_key()])
        assert (await jobs.get_job("job-1")).name == "support-bot"
    finally:
        await cache.close()
        await jobs.close()
    # Each keeps its own migration history: opening both again finds both at head.
    for store in (await JobStore.open(database_url), await TeacherCache.open(database_url)):
        await store.close()


# Expiry


async def stored_calls(cache: TeacherCache, count: int) -> list[TeacherCall]:
    calls = [call(number) for number in range(1, count + 1)]
    await cache.put_many(
        (each, answer(f"answer {number}", logprobs=None)) for number, each in enumerate(calls)
    )
    return calls


async def set_written(cache: TeacherCache, times: dict[TeacherCall, datetime]) -> None:
    """Backdate answers, as if they had been written at those times."""
    async with cache._engine.begin() as connection:
        for each, when in times.items():
            await connection.execute(
                update(answers).where(answers.c.key == each.cache_key()).values(created_at=when)
            )


async def kept(cache: TeacherCache, calls: Iterable[TeacherCall]) -> set[TeacherCall]:
    calls = list(calls)
    found = await cache.get_many(each.cache_key() for each in calls)
    return {each for each in calls if each.cache_key() in found}


async def stored_count(cache: TeacherCache) -> int:
    async with cache._engine.connect() as connection:
        return await connection.scalar(select(func.count()).select_from(answers))


async def test_answers_are_stamped_with_the_time_they_were_written(cache: TeacherCache) -> None:
    before = datetime.now(UTC)
    (stored,) = await stored_calls(cache, 1)
    async with cache._engine.connect() as connection:
        written = await connection.scalar(
            select(answers.c.created_at).where(answers.c.key == stored.cache_key())
        )
    written = written if written.tzinfo else written.replace(tzinfo=UTC)  # SQLite keeps no zone: UTC
    assert before - timedelta(seconds=1) <= written <= datetime.now(UTC) + timedelta(seconds=1)


async def test_expiry_by_age_deletes_answers_written_before_it_and_keeps_the_rest(
    cache: TeacherCache,
) -> None:
    calls = await stored_calls(cache, 6)
    now = datetime.now(UTC)
    await set_written(cache, {each: now - timedelta(days=10) for each in calls[:3]})
    await set_written(cache, {each: now - timedelta(days=4, hours=23) for each in calls[3:5]})

    assert await cache.expire(max_age=timedelta(days=5)) == 3

    assert await kept(cache, calls) == set(calls[3:])
    assert await cache.expire(max_age=timedelta(days=5)) == 0
    # An expired answer asked again is stored again, as new.
    await cache.put_many([(calls[0], answer("asked again", logprobs=None))])
    assert (await cache.get_many([calls[0].cache_key()]))[calls[0].cache_key()].text == "asked again"
    assert await cache.expire(max_age=timedelta(days=5)) == 0


async def test_expiry_by_count_deletes_the_oldest_written_down_to_the_limit(cache: TeacherCache) -> None:
    calls = await stored_calls(cache, 12)
    # Written in an order unrelated to the keys', with three answers in the same instant at the limit.
    order = random.Random(3).sample(calls, len(calls))
    start = datetime.now(UTC) - timedelta(days=1)
    minutes = [0, 1, 2, 3, 4, 5, 6, 6, 6, 7, 8, 9]
    await set_written(
        cache, {each: start + timedelta(minutes=m) for each, m in zip(order, minutes, strict=True)}
    )

    assert await cache.expire(max_entries=5) == 7

    survivors = await kept(cache, calls)
    assert len(survivors) == 5
    assert set(order[-3:]) <= survivors  # the three written last
    assert survivors <= set(order[6:9]) | set(order[-3:])  # and two of the three written at minute 6
    assert await cache.expire(max_entries=5) == 0
    assert await cache.expire(max_entries=100) == 0
    assert await kept(cache, calls) == survivors


async def test_age_and_count_bounds_apply_together(cache: TeacherCache) -> None:
    calls = await stored_calls(cache, 8)
    now = datetime.now(UTC)
    await set_written(cache, {each: now - timedelta(days=30 - number) for number, each in enumerate(calls)})

    # Two are older than 28.5 days; of the six left, the oldest two go for the limit of four.
    assert await cache.expire(max_age=timedelta(days=28, hours=12), max_entries=4) == 4

    assert await kept(cache, calls) == set(calls[4:])


async def test_expiry_deletes_in_batches_until_every_expired_answer_is_gone(cache: TeacherCache) -> None:
    calls = await stored_calls(cache, 27)
    old = datetime.now(UTC) - timedelta(days=10)
    await set_written(cache, {each: old + timedelta(seconds=number) for number, each in enumerate(calls)})
    deleted: list[int] = []
    engine = cache._engine.sync_engine

    def count_deleted(_connection, cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deleted.append(cursor.rowcount)

    event.listen(engine, "after_cursor_execute", count_deleted)
    try:
        assert await cache.expire(max_entries=3, batch_size=4) == 24
        assert deleted == [4, 4, 4, 4, 4, 4, 0]
        deleted.clear()
        assert await cache.expire(max_age=timedelta(days=1), batch_size=2) == 3
        assert deleted == [2, 1]
    finally:
        event.remove(engine, "after_cursor_execute", count_deleted)

    assert await stored_count(cache) == 0


async def test_expiry_without_bounds_deletes_nothing(cache: TeacherCache) -> None:
    calls = await stored_calls(cache, 3)
    await set_written(cache, {each: datetime.now(UTC) - timedelta(days=3650) for each in calls})

    assert await cache.expire() == 0

    assert await kept(cache, calls) == set(calls)
    with pytest.raises(ValueError, match="max_entries"):
        await cache.expire(max_entries=0)


# CacheWriter


async def eventually(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_the_writer_flushes_a_full_batch_without_being_asked(cache: TeacherCache) -> None:
    writer = CacheWriter(cache, batch_size=10, max_delay_seconds=60)
    calls = [call(number) for number in range(1, 21)]
    for each in calls[:9]:
        await writer.put(each, answer(logprobs=None))
    await asyncio.sleep(0.2)
    assert writer.written == 0 and writer.buffered == 9

    await writer.put(calls[9], answer(logprobs=None))
    await eventually(lambda: writer.written == 10)

    assert len(await cache.get_many(each.cache_key() for each in calls)) == 10
    await writer.close()


async def test_the_writer_flushes_an_old_answer_without_being_asked(cache: TeacherCache) -> None:
    writer = CacheWriter(cache, batch_size=1000, max_delay_seconds=0.05)
    await writer.put(call(), answer())
    assert writer.written == 0

    await eventually(lambda: writer.written == 1)

    assert call().cache_key() in await cache.get_many([call().cache_key()])
    await writer.close()


async def test_a_durable_put_returns_once_its_answer_is_stored(cache: TeacherCache) -> None:
    writer = CacheWriter(cache, batch_size=1000, max_delay_seconds=0.05)
    calls = [call(number) for number in range(1, 6)]

    await asyncio.gather(*(writer.put_durable(each, answer()) for each in calls))

    assert writer.written == 5 and writer.buffered == 0  # one batch: they came back together
    assert len(await cache.get_many(each.cache_key() for each in calls)) == 5
    await writer.close()


async def test_closing_the_writer_flushes_what_it_holds(database_url: str) -> None:
    cache = await TeacherCache.open(database_url)
    calls = [call(number) for number in range(1, 6)]
    async with CacheWriter(cache, batch_size=1000, max_delay_seconds=60) as writer:
        for each in calls:
            await writer.put(each, answer())
        assert writer.written == 0
    await cache.close()

    reopened = await TeacherCache.open(database_url)
    try:
        assert len(await reopened.get_many(each.cache_key() for each in calls)) == 5
    finally:
        await reopened.close()
    with pytest.raises(RuntimeError, match="closed"):
        await writer.put(call(), answer())


class FlakyCache:
    """Refuses the first `failures` writes, then stores batches in order."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.batches: list[list[str]] = []

    async def put_many(self, entries: Iterable[tuple[TeacherCall, TeacherAnswer]]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database is down")
        self.batches.append([answer.text for _, answer in entries])


async def test_a_failed_write_keeps_its_answers_and_flush_reports_the_failure() -> None:
    flaky = FlakyCache(failures=1)
    writer = CacheWriter(flaky, batch_size=1000, max_delay_seconds=60)  # type: ignore[arg-type]
    await writer.put(call(1), answer("a"))
    await writer.put(call(2), answer("b"))

    with pytest.raises(ConnectionError, match="down"):
        await writer.flush()
    assert writer.buffered == 2 and writer.written == 0

    await writer.put(call(3), answer("c"))
    await writer.close()
    assert flaky.batches == [["a", "b", "c"]] and writer.written == 3


async def test_a_full_buffer_makes_put_write_it() -> None:
    # The background writes fail, so answers pile up until put writes them itself.
    flaky = FlakyCache(failures=10**6)
    writer = CacheWriter(flaky, batch_size=2, max_delay_seconds=60, max_buffered=4)  # type: ignore[arg-type]
    for number in range(1, 4):
        await writer.put(call(number), answer(str(number)))
    await asyncio.sleep(0.05)
    assert writer.buffered == 3

    with pytest.raises(ConnectionError):
        await writer.put(call(4), answer("4"))
    flaky.failures = 0
    await writer.close()
    assert [text for batch in flaky.batches for text in batch] == ["1", "2", "3", "4"]


# The blob


def test_the_logprob_blob_keeps_every_dtype_and_is_compact() -> None:
    original = logprobs(tokens=64, k=20)
    blob = pack_logprobs(original)
    raw_bytes = sum(
        array.nbytes
        for array in (original.token_ids, original.topk_ids, original.topk_logprobs, original.tail_logprob)
    )
    assert len(blob) < raw_bytes
    assert_same_logprobs(unpack_logprobs(blob), original)

    wide = SparseLogprobs(
        token_ids=original.token_ids.astype(np.int64),
        topk_ids=original.topk_ids.astype(np.int64),
        topk_logprobs=original.topk_logprobs.astype(np.float16),
        tail_logprob=original.tail_logprob.astype(np.float64),
    )
    assert_same_logprobs(unpack_logprobs(pack_logprobs(wide)), wide)
    empty = logprobs(tokens=0, k=20)
    assert_same_logprobs(unpack_logprobs(pack_logprobs(empty)), empty)


def test_a_blob_of_another_layout_is_refused() -> None:
    blob = bytearray(pack_logprobs(logprobs()))
    blob[4] = 99
    with pytest.raises(ValueError, match="version"):
        unpack_logprobs(bytes(blob))
