"""The teacher cache: every answer the teacher gave, keyed by the full identity of the call.

A resumed job, a retried step or another job asking the same thing reads the stored answer instead of
paying the teacher again. One code path over SQLite (embedded mode) and PostgreSQL (cluster mode); the
schema is owned by the Alembic migrations in `cache_migrations/`, and `TeacherCache.open` brings the
database to the latest revision, so the cache survives a restart of the service.

The first answer stored for a key wins: a later `put` of the same key is ignored, so concurrent
workers asking the same thing cannot make one job's dataset disagree with another's.

Writes are batched by `CacheWriter`: the stage hands it each answer and moves on; the answer is
durable once the writer has flushed it (by size, by age, or on `flush`/`close`), and the stage
flushes before it reports a result, so a reported result never names an answer the cache would
have to ask for again.

A cached answer is one row: the text, finish reason, token counts, latency and how its token ids were
captured as plain columns, the backend, model and revision for whoever inspects the table, and the
logprobs as one binary blob (`pack_logprobs`; see there for the layout).

Nothing leaves the cache unless the operator bounds it: `TeacherCache.expire` deletes answers older
than an age and the oldest beyond a number of entries, both by the time an answer was written (see
there for why not by last use). An expired answer is simply asked, and paid for, again.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import structlog
from alembic.config import Config
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from stillhouse.common import database
from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs
from stillhouse.teacher.calls import TeacherAnswer, TeacherCall, TokenIdSource

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).parent / "cache_migrations"
# Its own Alembic version table, so that the cache can share a database with the job store.
VERSION_TABLE = "teacher_cache_alembic_version"
# Keys per SELECT: well under SQLite's 32,766 and PostgreSQL's 65,535 bound parameters.
KEYS_PER_QUERY = 5_000
# Rows per DELETE when expiring: each is its own short transaction, so a large backlog never holds the
# table's locks (SQLite's write lock, PostgreSQL's row locks) for long.
ROWS_PER_DELETE = 10_000
# Any constant will do: it only has to be the same in every process migrating the same database.
_MIGRATION_LOCK_KEY = 0x5717_7EAC

metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    }
)

answers = Table(
    "teacher_answers",
    metadata,
    # TeacherCall.cache_key(): hex SHA-256 of the call's identity.
    Column("key", String(64), primary_key=True),
    Column("backend", String(64), nullable=False),
    Column("model", String(255), nullable=False),
    Column("revision", String(255), nullable=False),
    Column("text", Text, nullable=False),
    Column("finish_reason", String(32), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_seconds", Float, nullable=False),
    # pack_logprobs(); NULL when the call asked for no logprobs.
    Column("logprobs", LargeBinary, nullable=True),
    # How the ids were captured (TeacherAnswer's fields of the same names).
    Column("token_id_source", String(16), nullable=False),
    Column("masked_alternatives", Integer, nullable=False),
    Column("top1_mismatches", Integer, nullable=False),
    Column("stop_token_added", Boolean, nullable=False),
    # When the answer was written (put_many's clock; older rows: the database's): what expiry goes by.
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Expiry reads and deletes oldest first, and finds the n-th newest, without scanning the table.
    Index("ix_teacher_answers_created_at_key", "created_at", "key"),
)

_ANSWER_COLUMNS = (
    answers.c.key,
    answers.c.text,
    answers.c.finish_reason,
    answers.c.prompt_tokens,
    answers.c.completion_tokens,
    answers.c.latency_seconds,
    answers.c.logprobs,
    answers.c.token_id_source,
    answers.c.masked_alternatives,
    answers.c.top1_mismatches,
    answers.c.stop_token_added,
)


# --- The logprob blob -----------------------------------------------------------------------------
#
# Layout, version 1 (all integers little-endian):
#
#   offset  size  field
#   0       4     magic b"SHLP"
#   4       1     layout version (1)
#   5       1     codec of the payload: 0 none, 1 zstd
#   6       4     dtype code of token_ids, topk_ids, topk_logprobs, tail_logprob (see _DTYPES)
#   10      4     T, generated tokens (uint32)
#   14      4     k, alternatives per token (uint32)
#   18      4     payload size before compression (uint32)
#   22      ...   payload
#
# The payload is the four arrays in that order, each little-endian and byte-shuffled (all first
# bytes of its elements, then all second bytes, ...), so that the near-constant high bytes of ids and
# the exponents of logprobs sit together and zstd squeezes them. Values are stored exactly: an answer
# read back is bit-for-bit the answer the teacher gave, so a resumed job writes the same dataset.

_MAGIC = b"SHLP"
_LAYOUT_VERSION = 1
_HEADER = struct.Struct("<4sBB4sIII")
_CODEC_NONE = 0
_CODEC_ZSTD = 1
# Level 1: higher levels gain under 1% on logprob arrays and take twice as long.
_ZSTD = pa.Codec("zstd", compression_level=1)
_DTYPES = {
    1: np.dtype("<i4"),
    2: np.dtype("<i8"),
    3: np.dtype("<f2"),
    4: np.dtype("<f4"),
    5: np.dtype("<f8"),
    6: np.dtype("<i2"),
}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def pack_logprobs(logprobs: SparseLogprobs) -> bytes:
    """The blob stored for `logprobs`: a 22-byte header and the four arrays, shuffled and zstd'ed."""
    arrays = _arrays_of(logprobs)
    codes = bytes(_dtype_code(array.dtype) for array in arrays)
    raw = b"".join(_shuffle(array) for array in arrays)
    compressed = _ZSTD.compress(raw, asbytes=True)
    codec, payload = (_CODEC_ZSTD, compressed) if len(compressed) < len(raw) else (_CODEC_NONE, raw)
    header = _HEADER.pack(_MAGIC, _LAYOUT_VERSION, codec, codes, logprobs.num_tokens, logprobs.k, len(raw))
    return header + payload


def unpack_logprobs(blob: bytes) -> SparseLogprobs:
    """Back from `pack_logprobs`: the same values in the same dtypes."""
    magic, version, codec, codes, steps, k, raw_size = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _LAYOUT_VERSION:
        raise ValueError(f"not a version-{_LAYOUT_VERSION} logprob blob (magic {magic!r}, version {version})")
    payload = memoryview(blob)[_HEADER.size :]
    if codec == _CODEC_ZSTD:
        payload = memoryview(_ZSTD.decompress(payload, decompressed_size=raw_size, asbytes=True))
    elif codec != _CODEC_NONE:
        raise ValueError(f"logprob blob has unknown codec {codec}")
    dtypes = [_DTYPES[code] for code in codes]
    counts = (steps, steps * k, steps * k, steps)
    arrays, offset = [], 0
    for dtype, count in zip(dtypes, counts, strict=True):
        size = dtype.itemsize * count
        arrays.append(_unshuffle(payload[offset : offset + size], dtype, count))
        offset += size
    if offset != raw_size:
        raise ValueError(f"logprob blob holds {raw_size} bytes of arrays, the header accounts for {offset}")
    token_ids, topk_ids, topk_logprobs, tail_logprob = arrays
    return SparseLogprobs(
        token_ids=token_ids,
        topk_ids=topk_ids.reshape(steps, k),
        topk_logprobs=topk_logprobs.reshape(steps, k),
        tail_logprob=tail_logprob,
    )


def _arrays_of(logprobs: SparseLogprobs) -> tuple[np.ndarray, ...]:
    return (logprobs.token_ids, logprobs.topk_ids, logprobs.topk_logprobs, logprobs.tail_logprob)


def _dtype_code(dtype: np.dtype) -> int:
    code = _DTYPE_CODES.get(dtype.newbyteorder("<"))
    if code is None:
        raise ValueError(f"logprob arrays of dtype {dtype} cannot be cached")
    return code


def _shuffle(array: np.ndarray) -> bytes:
    little = np.ascontiguousarray(array.reshape(-1), dtype=array.dtype.newbyteorder("<"))
    return little.view(np.uint8).reshape(-1, little.dtype.itemsize).T.tobytes()


def _unshuffle(payload: memoryview, dtype: np.dtype, count: int) -> np.ndarray:
    planes = np.frombuffer(payload, dtype=np.uint8).reshape(dtype.itemsize, count)
    # Native byte order for the caller (a no-op on little-endian machines).
    return np.ascontiguousarray(planes.T).view(dtype).reshape(count).astype(dtype.newbyteorder("="))


# --- Rows -----------------------------------------------------------------------------------------


def _rows_of(
    entries: Iterable[tuple[TeacherCall, TeacherAnswer]], written_at: datetime
) -> list[dict[str, Any]]:
    """One row per distinct key (the first entry wins), in key order so that two concurrent batches
    lock their rows in the same order and cannot deadlock on PostgreSQL."""
    rows: dict[str, dict[str, Any]] = {}
    for call, answer in entries:
        key = call.cache_key()
        if key in rows:
            continue
        rows[key] = {
            "key": key,
            "backend": call.backend,
            "model": call.model,
            "revision": call.revision,
            "text": answer.text,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "latency_seconds": answer.latency_seconds,
            "logprobs": None if answer.logprobs is None else pack_logprobs(answer.logprobs),
            "token_id_source": answer.token_id_source.value,
            "masked_alternatives": answer.masked_alternatives,
            "top1_mismatches": answer.top1_mismatches,
            "stop_token_added": answer.stop_token_added,
            "created_at": written_at,
        }
    return [rows[key] for key in sorted(rows)]


def _answers_of(rows: Sequence[Any]) -> dict[str, TeacherAnswer]:
    return {
        row.key: TeacherAnswer(
            text=row.text,
            finish_reason=row.finish_reason,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            latency_seconds=row.latency_seconds,
            logprobs=None if row.logprobs is None else unpack_logprobs(row.logprobs),
            token_id_source=TokenIdSource(row.token_id_source),
            masked_alternatives=row.masked_alternatives,
            top1_mismatches=row.top1_mismatches,
            stop_token_added=row.stop_token_added,
            cached=True,
        )
        for row in rows
    }


# --- Connections and migrations -------------------------------------------------------------------


# A commit survives a crash of the process; only a crash of the machine can lose the last few, which
# costs no more than asking the teacher again.
SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={database.SQLITE_BUSY_TIMEOUT_MS}")


def alembic_config() -> Config:
    return database.alembic_config(MIGRATIONS)


def migrate(database_url: str) -> None:
    """Bring the cache's tables to the latest revision (blocking; idempotent)."""
    database.migrate(database_url, MIGRATIONS, lock_key=_MIGRATION_LOCK_KEY, sqlite_pragmas=SQLITE_PRAGMAS)


# --- The cache ------------------------------------------------------------------------------------


class TeacherCache:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._insert = insert(answers).on_conflict_do_nothing(index_elements=[answers.c.key])

    @classmethod
    async def open(cls, database_url: str) -> TeacherCache:
        """Migrate the cache's tables to the latest revision, then connect.
        `database_url`: sqlite:///PATH (embedded mode) or postgresql://USER@HOST:PORT/DB."""
        await asyncio.to_thread(migrate, database_url)
        return cls(database.create_engine_for(database_url, SQLITE_PRAGMAS))

    @property
    def engine(self) -> AsyncEngine:
        """The cache's database, which also keeps each job's budget (`budget.JobBudget`)."""
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    async def get_many(self, keys: Iterable[str]) -> dict[str, TeacherAnswer]:
        """The stored answers of those `keys` that have one (`cached=True`); the others are absent.
        One query per `KEYS_PER_QUERY` keys."""
        wanted = list(dict.fromkeys(keys))
        rows: list[Any] = []
        async with self._engine.connect() as connection:
            for start in range(0, len(wanted), KEYS_PER_QUERY):
                chunk = wanted[start : start + KEYS_PER_QUERY]
                result = await connection.execute(select(*_ANSWER_COLUMNS).where(answers.c.key.in_(chunk)))
                rows.extend(result.all())
        if not rows:
            return {}
        # Unpacking the logprobs is CPU work: keep it off the event loop.
        return await asyncio.to_thread(_answers_of, rows)

    async def put_many(self, entries: Iterable[tuple[TeacherCall, TeacherAnswer]]) -> None:
        """Store answers in one transaction, stamped with the time of writing. A key that already has an
        answer keeps it, and its time (first write wins), within the batch as across batches."""
        rows = await asyncio.to_thread(_rows_of, entries, datetime.now(UTC))
        if not rows:
            return
        async with self._engine.begin() as connection:
            await connection.execute(self._insert, rows)

    async def expire(
        self,
        *,
        max_age: timedelta | None = None,
        max_entries: int | None = None,
        batch_size: int = ROWS_PER_DELETE,
    ) -> int:
        """Delete the answers written more than `max_age` ago, then the oldest beyond the newest
        `max_entries`; return how many were deleted. None sets no bound of that kind.

        Both bounds go by the time an answer was written, not by when it was last read: recording every
        read would make each cache hit a write. The entry bound therefore evicts the least recently
        *written* answers, however often they are read; an evicted answer a job needs again is asked
        (and paid for) again, and written anew. Deletes remove `batch_size` rows per transaction, oldest
        first, so that a large backlog never holds a long lock and a sweep cut short has removed the
        oldest. Replicas may expire at once: the entry bound is a fixed boundary row, not a count, so
        two sweeps never delete more than one would; on PostgreSQL each skips the rows the other holds.
        """
        if batch_size < 1 or (max_entries is not None and max_entries < 1):
            raise ValueError(f"expire needs batch_size and max_entries >= 1; got {batch_size}, {max_entries}")
        removed = 0
        if max_age is not None:
            cutoff = datetime.now(UTC) - max_age
            removed += await self._delete_oldest(answers.c.created_at < cutoff, batch_size)
        if max_entries is not None and (beyond := await self._beyond_newest(max_entries)) is not None:
            removed += await self._delete_oldest(beyond, batch_size)
        return removed

    async def _beyond_newest(self, count: int) -> ColumnElement[bool] | None:
        """The rows older than the newest `count` (ties in time broken by key), or None if there are none.
        The boundary is compared inside the database, so that SQLite's text timestamps never round-trip."""
        async with self._engine.connect() as connection:
            key = await connection.scalar(
                select(answers.c.key)
                .order_by(answers.c.created_at.desc(), answers.c.key.desc())
                .offset(count)
                .limit(1)
            )
        if key is None:
            return None
        boundary = answers.alias("boundary")
        written = select(boundary.c.created_at).where(boundary.c.key == key).scalar_subquery()
        # `created_at <= written` bounds the index scan; the rest settles ties.
        created_at = answers.c.created_at
        return and_(created_at <= written, or_(created_at < written, answers.c.key <= key))

    async def _delete_oldest(self, condition: ColumnElement[bool], batch_size: int) -> int:
        removed = 0
        while True:
            doomed = (
                select(answers.c.key)
                .where(condition)
                .order_by(answers.c.created_at, answers.c.key)
                .limit(batch_size)
                .with_for_update(skip_locked=True)  # PostgreSQL only; SQLite has one writer anyway
            )
            async with self._engine.begin() as connection:
                result = await connection.execute(delete(answers).where(answers.c.key.in_(doomed)))
            removed += result.rowcount
            if result.rowcount < batch_size:
                return removed


async def expire_periodically(
    cache: TeacherCache, *, max_age: timedelta | None, max_entries: int | None, interval_seconds: float
) -> None:
    """`cache.expire` now and every `interval_seconds` until cancelled. A failed sweep is logged and
    tried again next time: the database may be down for a while, and the cache works meanwhile."""
    while True:
        try:
            removed = await cache.expire(max_age=max_age, max_entries=max_entries)
        except Exception:
            log.exception("teacher cache expiry failed")
        else:
            log.info("teacher cache expired", removed=removed)
        await asyncio.sleep(interval_seconds)


class CacheWriter:
    """Write-behind buffer in front of a `TeacherCache`, so that the hot path never waits on the
    database for one answer.

    `put` buffers an answer; a background task writes the buffer as one `put_many` once it holds
    `batch_size` answers or its oldest answer is `max_delay_seconds` old. An answer is durable once
    it is flushed: by that task, by `flush()` or by `close()`. The stage calls `flush()` before it
    reports a result. A failed background write keeps its answers buffered and is retried after
    `max_delay_seconds`; `flush()` and `close()` raise the error if the database still refuses.
    When `max_buffered` answers wait (the database is slow or down), `put` writes them itself before
    it returns, so memory stays bounded and a lasting failure reaches the caller.
    """

    def __init__(
        self,
        cache: TeacherCache,
        *,
        batch_size: int = 512,
        max_delay_seconds: float = 0.05,
        max_buffered: int = 16_384,
    ) -> None:
        if batch_size < 1 or max_buffered < batch_size or max_delay_seconds <= 0:
            raise ValueError(
                "CacheWriter needs batch_size >= 1, max_buffered >= batch_size and max_delay_seconds > 0; "
                f"got {batch_size}, {max_buffered} and {max_delay_seconds}"
            )
        self._cache = cache
        self._batch_size = batch_size
        self._max_delay = max_delay_seconds
        self._max_buffered = max_buffered
        self._buffer: list[tuple[TeacherCall, TeacherAnswer]] = []
        # One write at a time, so that answers reach the database in the order they were put.
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._written = 0
        self._put = 0
        # (number of answers put up to and including one, its waiter), oldest first: see `put_durable`.
        self._durable_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def written(self) -> int:
        """Answers flushed to the database so far."""
        return self._written

    @property
    def buffered(self) -> int:
        """Answers put and not yet flushed."""
        return len(self._buffer)

    async def put(self, call: TeacherCall, answer: TeacherAnswer) -> None:
        if self._closed:
            raise RuntimeError("put on a closed CacheWriter")
        self._buffer.append((call, answer))
        self._put += 1
        if len(self._buffer) >= self._max_buffered:
            await self.flush()
            return
        if self._task is None:
            self._task = asyncio.create_task(self._write_behind(), name="teacher-cache-writer")
        if len(self._buffer) >= self._batch_size:
            self._wake.set()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._wake.set)

    async def put_durable(self, call: TeacherCall, answer: TeacherAnswer) -> None:
        """`put`, then wait until the batch that holds the answer is written (a group commit: answers
        that come back together share one transaction). A shard counts an answer only once it is durable,
        so a shard retried on another worker finds it in the cache and never pays for it again."""
        await self.put(call, answer)
        if self._written >= self._put:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._durable_waiters.append((self._put, waiter))
        await waiter

    async def flush(self) -> None:
        """Write every answer put so far; raises if the database refuses them (they stay buffered)."""
        await self._write_buffered()

    async def close(self) -> None:
        """Flush, then stop the background task. Raises like `flush`."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            # Holding the lock, the task cannot be in the middle of a write: it stops at a wait.
            async with self._write_lock:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()

    async def __aenter__(self) -> CacheWriter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _write_behind(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            try:
                await self._write_buffered()
            except Exception as error:
                log.warning("teacher cache write failed; retrying", error=str(error), buffered=self.buffered)
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._wake.set)

    async def _write_buffered(self) -> None:
        async with self._write_lock:
            batch, self._buffer = self._buffer, []
            if not batch:
                return
            try:
                await self._cache.put_many(batch)
            except BaseException:
                self._buffer[:0] = batch
                raise
            self._written += len(batch)
            while self._durable_waiters and self._durable_waiters[0][0] <= self._written:
                _, waiter = self._durable_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
