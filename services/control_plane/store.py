"""The job store: jobs (each owned by a principal of a tenant), the steps each job has run, the events it
has emitted, and the audit log of the API's mutating calls.

One code path over SQLite (embedded mode) and PostgreSQL (cluster mode). The schema is owned by the
Alembic migrations beside this module; `JobStore.open` brings the database to the latest revision.
Callers get frozen records, never ORM objects, so no session ever leaves this module.

Every call outlasts transient database errors (a dropped connection, a failover, a locked SQLite file)
under the store's `RetryPolicy`; each retried unit is one transaction, run again from the start. A write
whose commit landed but whose answer was lost is therefore run twice: conditional updates make the second
run a no-op, and the writes that check what they find recognise their own earlier attempt by the
timestamp the call wrote.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    delete,
    false,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from stillhouse.common import database
from stillhouse.common.database_retry import (
    DEFAULT_RETRY_POLICY,
    RetryPolicy,
    describe,
    is_transient,
    retry_transient,
)
from stillhouse.common.job_phases import (
    TERMINAL_PHASES,
    IllegalTransition,
    Phase,
    Stage,
    StepState,
    check_transition,
)
from stillhouse.control_plane.notifications import CANCEL_REQUESTED, EVENTS_WRITTEN, JOB_SUBMITTED

MIGRATIONS = Path(__file__).parent / "migrations"
MAX_JOB_ID_LENGTH = 64
MAX_OWNER_LENGTH = 128
MAX_TENANT_LENGTH = 63
# Seconds between two looks at a database whose schema is still behind (until `stillhouse migrate` ran).
SCHEMA_WAIT_SECONDS = 2.0
# Any constant will do: it only has to be the same in every process migrating the same database.
_MIGRATION_LOCK_KEY = 0x5717_1405

log = structlog.get_logger(__name__)


# --- Records handed to callers ------------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    document: dict[str, Any]
    labels: dict[str, str]
    phase: Phase
    message: str | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    tenant: str
    # The principal that submitted the job; None for jobs submitted before jobs had owners.
    owner: str | None


@dataclass(frozen=True)
class StepRecord:
    job_id: str
    stage: Stage
    operation_id: str
    state: StepState
    attempt: int
    result: dict[str, Any] | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class EventRecord:
    id: int
    job_id: str
    type: str
    data: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class AuditRecord:
    id: int
    created_at: datetime
    principal: str
    tenant: str
    method: str
    route: str
    job_id: str | None
    status: int


@dataclass(frozen=True)
class JobActivity:
    """One job as a tenant's quota sees it: its steps, and its latest progress event (the running or last
    step's, which holds what that step had spent when it ended)."""

    job: JobRecord
    steps: list[StepRecord]
    last_progress: EventRecord | None


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant has running, and its jobs submitted since the start of the quota's day."""

    unfinished_jobs: int
    jobs_since: list[JobActivity]


@dataclass
class LeaseFence:
    """A term of a lease (`LeaseRow`) that a store's writes must be made under: the holder sets `epoch`
    when it takes the lease up and clears it when it stops leading."""

    name: str
    holder: str
    epoch: int | None = None


# A transaction of the store waits on nothing but the database. One idle this long has lost its client (a
# replica cut off between its write and its COMMIT, a leader behind a partition in a fenced write): the
# server ends it, so that its row locks hold up neither the lease nor the others' writes of those rows.
# The control plane passes a quarter of its lease.
IDLE_TRANSACTION_LIMIT_MS = 5_000


class LeaseLost(RuntimeError):
    """A fenced write found its term of the lease over: another control plane may lead now."""

    def __init__(self, fence: LeaseFence) -> None:
        super().__init__(f"the {fence.name} lease is no longer held by {fence.holder} in term {fence.epoch}")


class JobError(Exception):
    """An error about one job, which it names in `job_id`."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFound(JobError, LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"no job with id {job_id!r}")


class JobAlreadyExists(JobError, ValueError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"a job with id {job_id!r} already exists")


class JobNotFinished(JobError, ValueError):
    def __init__(self, job_id: str, phase: Phase) -> None:
        super().__init__(job_id, f"job {job_id!r} is {phase.value}, not finished")
        self.phase = phase


class StepNotFound(JobError, LookupError):
    def __init__(self, job_id: str, stage: Stage) -> None:
        super().__init__(job_id, f"job {job_id!r} has no {stage} step")
        self.stage = stage


# --- Tables ---------------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database (SQLite stores and returns naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value} given where an aware one is needed")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    # Named constraints, so that later migrations can alter them on SQLite too (batch mode).
    metadata = MetaData(
        naming_convention={
            "pk": "pk_%(table_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        }
    )
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_phase_created_at_id", "phase", "created_at", "id"),
        Index("ix_jobs_tenant_created_at_id", "tenant", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(MAX_JOB_ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(253))
    document: Mapped[dict[str, Any]]
    labels: Mapped[dict[str, Any]]
    phase: Mapped[str] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    tenant: Mapped[str] = mapped_column(String(MAX_TENANT_LENGTH))
    owner: Mapped[str | None] = mapped_column(String(MAX_OWNER_LENGTH))


class StepRow(Base):
    __tablename__ = "job_steps"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(32), primary_key=True)
    operation_id: Mapped[str] = mapped_column(String(128), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class EventRow(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"), {"sqlite_autoincrement": True})

    # On SQLite only INTEGER PRIMARY KEY autoincrements, so the 64-bit type is PostgreSQL's alone.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class AuditRow(Base):
    __tablename__ = "audit_log"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[datetime]
    principal: Mapped[str] = mapped_column(String(MAX_OWNER_LENGTH))
    tenant: Mapped[str] = mapped_column(String(MAX_TENANT_LENGTH))
    method: Mapped[str] = mapped_column(String(16))
    route: Mapped[str] = mapped_column(String(255))
    # No foreign key: the record of a DELETE outlives the job.
    job_id: Mapped[str | None] = mapped_column(String(MAX_JOB_ID_LENGTH))
    status: Mapped[int]


class TenantAdmissionRow(Base):
    """One row per tenant that has submitted a job. A submit under quota updates its tenant's row first,
    which serialises the tenant's submits (a row lock on PostgreSQL, the write lock on SQLite), so two
    concurrent submits cannot both pass the check on the same usage."""

    __tablename__ = "tenant_admissions"

    tenant: Mapped[str] = mapped_column(String(MAX_TENANT_LENGTH), primary_key=True)
    admitted_jobs: Mapped[int] = mapped_column(BigInteger)


class LeaseRow(Base):
    """Who leads (drives the jobs) among the control planes sharing a PostgreSQL database, until when
    (the database's clock), and in which term: `epoch` grows with every change of holder."""

    __tablename__ = "control_plane_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime]


_Record = TypeVar("_Record")
_Row = TypeVar("_Row", bound=Base)


def _record(record_type: type[_Record], row: Base, **converted: Any) -> _Record:
    """The record of `row`: each field is the row's column of that name unless `converted` gives it."""
    values = {field.name: getattr(row, field.name) for field in fields(record_type)}
    return record_type(**{**values, **converted})


def _job_record(row: JobRow) -> JobRecord:
    return _record(JobRecord, row, phase=Phase(row.phase))


def _audit_record(row: AuditRow) -> AuditRecord:
    return _record(AuditRecord, row)


def _step_record(row: StepRow) -> StepRecord:
    return _record(StepRecord, row, stage=Stage(row.stage), state=StepState(row.state))


def _event_record(row: EventRow) -> EventRecord:
    return _record(EventRecord, row)


# --- migrations ----------------------------------------------------------------------------------


def alembic_config() -> Config:
    return database.alembic_config(MIGRATIONS)


def migrate(database_url: str) -> None:
    """Bring the database to the latest revision (blocking; idempotent)."""
    database.migrate(database_url, MIGRATIONS, lock_key=_MIGRATION_LOCK_KEY)


async def _wait_for_schema(database_url: str) -> None:
    """Return once the database has this release's latest revision (or a newer release's)."""
    while True:
        try:
            if not await asyncio.to_thread(database.schema_is_behind, database_url, MIGRATIONS):
                return
            log.info("waiting for the job store's migrations: run `stillhouse migrate`")
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.info("waiting for the job store's database", error=describe(exc))
        await asyncio.sleep(SCHEMA_WAIT_SECONDS)


def _now() -> datetime:
    return datetime.now(UTC)


def _columns(record: Any) -> dict[str, Any]:
    """A record's fields by name, its values as they are (not copied, unlike `dataclasses.asdict`)."""
    return {field.name: getattr(record, field.name) for field in fields(record)}


def _running_step(operation_id: str, attempt: int) -> dict[str, Any]:
    """The columns of a step that starts its `attempt`th run as `operation_id` now."""
    return {
        "operation_id": operation_id,
        "state": StepState.RUNNING.value,
        "attempt": attempt,
        "result": None,
        "error": None,
        "started_at": _now(),
        "finished_at": None,
    }


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


def _page(
    rows: list[_Row], limit: int, record: Callable[[_Row], _Record], encode_token: Callable[[_Row], str]
) -> tuple[list[_Record], str | None]:
    """The first `limit` of `rows` (a query asks for one more than it shows) as records, and the token of
    the next page: None when no row is left over."""
    next_token = encode_token(rows[limit - 1]) if len(rows) > limit else None
    return [record(row) for row in rows[:limit]], next_token


def _encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _token_bytes(token: str) -> bytes:
    """The bytes `_encode_token` encoded; ValueError for a token it did not make."""
    return base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)


def _encode_page_token(row: JobRow) -> str:
    return _encode_token(json.dumps([row.created_at.isoformat(), row.id]))


def _decode_page_token(token: str) -> tuple[datetime, str]:
    try:
        created_at, job_id = json.loads(_token_bytes(token))
        if not isinstance(created_at, str) or not isinstance(job_id, str):
            raise TypeError
        when = datetime.fromisoformat(created_at)
        if when.tzinfo is None:
            raise TypeError
    except (ValueError, TypeError):
        raise ValueError("invalid page token") from None
    return when, job_id


def _encode_audit_token(row: AuditRow) -> str:
    return _encode_token(str(row.id))


def _decode_audit_token(token: str) -> int:
    try:
        return int(_token_bytes(token).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("invalid page token") from None


# --- The store ------------------------------------------------------------------------------------


class JobStore:
    def __init__(self, engine: AsyncEngine, retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.retry_policy = retry_policy
        self._fence: LeaseFence | None = None

    def fenced(self, fence: LeaseFence) -> JobStore:
        """This store, but its writes of phases, steps and events are made only under `fence`'s term of the
        lease (LeaseLost otherwise); each write holds the lease row share-locked until it commits, so a
        takeover cannot come in between the check and the write."""
        view = copy.copy(self)
        view._fence = fence
        return view

    async def _check_fence(self, session: AsyncSession) -> None:
        fence = self._fence
        if fence is None:
            return
        if fence.epoch is None:
            raise LeaseLost(fence)
        held = await session.scalar(
            select(LeaseRow.epoch)
            .where(
                LeaseRow.name == fence.name,
                LeaseRow.holder == fence.holder,
                LeaseRow.epoch == fence.epoch,
                LeaseRow.expires_at > func.now(),
            )
            .with_for_update(read=True)
        )
        if not held:
            raise LeaseLost(fence)

    @classmethod
    async def open(
        cls,
        database_url: str,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        *,
        migrate_first: bool = True,
        idle_transaction_limit_ms: int = IDLE_TRANSACTION_LIMIT_MS,
    ) -> JobStore:
        """Migrate the database to the latest revision (or, with `migrate_first` false, wait until
        `stillhouse migrate` has), then connect to it."""
        if migrate_first:
            await asyncio.to_thread(migrate, database_url)
        else:
            await _wait_for_schema(database_url)
        engine = database.create_engine_for(database_url, idle_transaction_limit_ms=idle_transaction_limit_ms)
        return cls(engine, retry_policy)

    async def close(self) -> None:
        await self._engine.dispose()

    async def _announce(self, session: AsyncSession, channel: str, job_id: str) -> None:
        """Tell the other control planes on PostgreSQL, when the transaction commits (LISTEN/NOTIFY)."""
        if self._engine.dialect.name == "postgresql":
            await session.execute(select(func.pg_notify(channel, job_id)))

    async def ping(self) -> None:
        """Not retried: a readiness probe reports the database as it is now."""
        async with self._engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    # Jobs

    async def create_job(
        self,
        job_id: str,
        name: str,
        document: dict[str, Any],
        labels: dict[str, str],
        *,
        owner: str,
        tenant: str,
        admit: Callable[[TenantUsage], None] | None = None,
        usage_since: datetime | None = None,
    ) -> JobRecord:
        """Store a new Pending job. With `admit`, the tenant's usage (its unfinished jobs, and its jobs
        created since `usage_since`) is read and handed to it first, in the same transaction and alone
        among the tenant's submits; whatever `admit` raises refuses the job."""
        if not 0 < len(job_id) <= MAX_JOB_ID_LENGTH:
            raise ValueError(f"job id {job_id!r} must be 1 to {MAX_JOB_ID_LENGTH} characters long")
        now = _now()
        job = JobRecord(
            id=job_id,
            name=name,
            document=document,
            labels=labels,
            phase=Phase.PENDING,
            message=None,
            cancel_requested=False,
            created_at=now,
            updated_at=now,
            tenant=tenant,
            owner=owner,
        )
        return await self._insert_job(job, admit, usage_since or now)

    @retry_transient
    async def _insert_job(
        self, job: JobRecord, admit: Callable[[TenantUsage], None] | None, usage_since: datetime
    ) -> JobRecord:
        try:
            async with self._sessions.begin() as session:
                existing = await session.get(JobRow, job.id)
                if existing is not None:
                    if _is_submission(existing, job):
                        # This very call's insert, committed by an attempt whose answer was lost.
                        return _job_record(existing)
                    raise JobAlreadyExists(job.id)
                if admit is not None:
                    await self._lock_tenant(session, job.tenant)
                    admit(await _tenant_usage(session, job.tenant, usage_since))
                session.add(JobRow(**{**_columns(job), "phase": job.phase.value}))
                await session.flush()
                session.add(_phase_event(job.id, Phase.PENDING, None, job.created_at))
                await self._announce(session, JOB_SUBMITTED, job.id)
                await self._announce(session, EVENTS_WRITTEN, job.id)
        except IntegrityError:
            raise JobAlreadyExists(job.id) from None
        return job

    @retry_transient
    async def get_job(self, job_id: str) -> JobRecord:
        async with self._sessions() as session:
            return _job_record(await _job_row(session, job_id))

    @retry_transient
    async def list_jobs(
        self,
        *,
        phase: Phase | None = None,
        tenant: str | None = None,
        limit: int = 50,
        page_token: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first, of every tenant or of one; the token, when not None, fetches the next page."""
        _check_limit(limit)
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        if phase is not None:
            query = query.where(JobRow.phase == phase.value)
        if tenant is not None:
            query = query.where(JobRow.tenant == tenant)
        if page_token is not None:
            # A plain tuple takes the columns' types, so the datetime is bound as UTC on SQLite too.
            query = query.where(tuple_(JobRow.created_at, JobRow.id) < _decode_page_token(page_token))
        async with self._sessions() as session:
            rows = list((await session.scalars(query)).all())
        return _page(rows, limit, _job_record, _encode_page_token)

    @retry_transient
    async def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs not in a terminal phase, oldest first: what a restarted orchestrator picks up."""
        query = (
            select(JobRow)
            .where(JobRow.phase.not_in([phase.value for phase in TERMINAL_PHASES]))
            .order_by(JobRow.created_at, JobRow.id)
        )
        async with self._sessions() as session:
            return [_job_record(row) for row in await session.scalars(query)]

    @retry_transient
    async def finished_before(self, cutoff: datetime, limit: int = 100) -> list[JobRecord]:
        """Jobs in a final phase whose last change is older than `cutoff`, oldest first."""
        query = (
            select(JobRow)
            .where(JobRow.phase.in_([phase.value for phase in TERMINAL_PHASES]), JobRow.updated_at < cutoff)
            .order_by(JobRow.updated_at, JobRow.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [_job_record(row) for row in await session.scalars(query)]

    @retry_transient
    async def delete_job(self, job_id: str) -> None:
        """Remove a finished job with its steps and events; JobNotFinished while it may still change.
        JobNotFound when it is gone, which is also what a retry finds after a commit whose answer was lost."""
        async with self._sessions.begin() as session:
            row = await _job_row(session, job_id, for_update=True)
            if not Phase(row.phase).is_terminal:
                raise JobNotFinished(job_id, Phase(row.phase))
            await session.execute(delete(EventRow).where(EventRow.job_id == job_id))
            await session.execute(delete(StepRow).where(StepRow.job_id == job_id))
            await session.execute(delete(JobRow).where(JobRow.id == job_id))

    async def _lock_tenant(self, session: AsyncSession, tenant: str) -> None:
        insert = postgresql.insert if self._engine.dialect.name == "postgresql" else sqlite.insert
        statement = insert(TenantAdmissionRow).values(tenant=tenant, admitted_jobs=1)
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[TenantAdmissionRow.tenant],
                set_={"admitted_jobs": TenantAdmissionRow.admitted_jobs + 1},
            )
        )

    async def set_phase(self, job_id: str, phase: Phase, message: str | None = None) -> JobRecord:
        """Move the job to `phase` and record a "phase" event, or raise IllegalTransition."""
        now = _now()
        while True:
            moved = await self._move_phase(job_id, phase, message, now)
            if moved is not None:
                return moved

    @retry_transient
    async def _move_phase(
        self, job_id: str, phase: Phase, message: str | None, now: datetime
    ) -> JobRecord | None:
        """One try of set_phase; None when another writer moved the job first (then it checks again)."""
        async with self._sessions.begin() as session:
            await self._check_fence(session)
            row = await _job_row(session, job_id)
            current = Phase(row.phase)
            if current is phase and row.updated_at == now:
                return _job_record(row)  # this call's own move, committed by an attempt whose answer was lost
            check_transition(current, phase)
            # Conditional on the phase just read: of two writers, the second matches no row.
            moved = await session.scalar(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.phase == current.value)
                .values(phase=phase.value, message=message, updated_at=now)
                .returning(JobRow)
                .execution_options(populate_existing=True)
            )
            if moved is None:
                return None
            session.add(_phase_event(job_id, phase, message, now))
            await self._announce(session, EVENTS_WRITTEN, job_id)
            return _job_record(moved)

    @retry_transient
    async def request_cancel(self, job_id: str) -> JobRecord:
        """Flag the job for the orchestrator to cancel; idempotent until the job ends."""
        async with self._sessions.begin() as session:
            row = await session.scalar(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.phase.not_in([p.value for p in TERMINAL_PHASES]))
                .values(cancel_requested=True, updated_at=_now())
                .returning(JobRow)
                .execution_options(populate_existing=True)
            )
            if row is None:
                raise IllegalTransition(Phase((await _job_row(session, job_id)).phase), Phase.CANCELLED)
            await self._announce(session, CANCEL_REQUESTED, job_id)
            return _job_record(row)

    # Steps

    @retry_transient
    async def get_step(self, job_id: str, stage: Stage) -> StepRecord | None:
        async with self._sessions() as session:
            row = await session.get(StepRow, (job_id, stage.value))
            return None if row is None else _step_record(row)

    async def begin_step(self, job_id: str, stage: Stage, operation_id: str) -> StepRecord:
        """Record that `stage` started as `operation_id`.

        A running step is returned unchanged (so a restarted orchestrator can re-attach to it); a
        failed or cancelled one starts its next attempt; a succeeded one is never run again.
        """
        while True:
            existing = await self.get_step(job_id, stage)
            if existing is None:
                try:
                    return await self._insert_step(job_id, stage, operation_id)
                except IntegrityError:
                    if await self.get_step(job_id, stage) is None:
                        raise  # not a concurrent begin_step: the operation id is taken
                    continue
            if existing.state == StepState.RUNNING:
                return existing
            if existing.state == StepState.SUCCEEDED:
                raise ValueError(f"the {stage} step of job {job_id!r} already succeeded")
            retried = await self._update_step(existing, **_running_step(operation_id, existing.attempt + 1))
            if retried is not None:
                return retried

    @retry_transient
    async def _insert_step(self, job_id: str, stage: Stage, operation_id: str) -> StepRecord:
        async with self._sessions.begin() as session:
            await self._check_fence(session)
            await _job_row(session, job_id)
            row = StepRow(job_id=job_id, stage=stage.value, **_running_step(operation_id, attempt=1))
            session.add(row)
        return _step_record(row)

    @retry_transient
    async def _update_step(self, step: StepRecord, **values: Any) -> StepRecord | None:
        """Update `step` unless another writer changed it since it was read (then None)."""
        async with self._sessions.begin() as session:
            await self._check_fence(session)
            row = await session.scalar(
                update(StepRow)
                .where(
                    StepRow.job_id == step.job_id,
                    StepRow.stage == step.stage.value,
                    StepRow.attempt == step.attempt,
                    StepRow.state == step.state.value,
                )
                .values(**values)
                .returning(StepRow)
            )
            return None if row is None else _step_record(row)

    async def finish_step(
        self,
        job_id: str,
        stage: Stage,
        state: StepState,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> StepRecord:
        """End the running step as succeeded, failed or cancelled."""
        if state == StepState.RUNNING:
            raise ValueError("a step finishes as succeeded, failed or cancelled, not running")
        finished_at = _now()
        while True:
            step = await self.get_step(job_id, stage)
            if step is None:
                raise StepNotFound(job_id, stage)
            if step.state == state and step.finished_at == finished_at:
                return step  # this call's own update, committed by an attempt whose answer was lost
            if step.state != StepState.RUNNING:
                raise ValueError(f"the {stage} step of job {job_id!r} is already {step.state}")
            finished = await self._update_step(
                step, state=state.value, result=result, error=error, finished_at=finished_at
            )
            if finished is not None:
                return finished

    @retry_transient
    async def steps(self, job_id: str) -> list[StepRecord]:
        """The job's steps in pipeline order (empty for an unknown job)."""
        async with self._sessions() as session:
            rows = await session.scalars(select(StepRow).where(StepRow.job_id == job_id))
            records = [_step_record(row) for row in rows]
        order = list(Stage)
        return sorted(records, key=lambda step: order.index(step.stage))

    # Events

    @retry_transient
    async def append_event(self, job_id: str, type: str, data: dict[str, Any]) -> EventRecord:
        # A retry after a commit whose answer was lost appends the event twice: a repeated progress or
        # error event, which its readers can bear.
        async with self._sessions.begin() as session:
            await self._check_fence(session)
            # Holding the job's row lock while inserting makes a job's events commit in id order,
            # so a reader resuming after the last id it saw never skips one.
            await _job_row(session, job_id, for_update=True)
            row = EventRow(job_id=job_id, type=type, data=data, created_at=_now())
            session.add(row)
            await session.flush()
            await self._announce(session, EVENTS_WRITTEN, job_id)
            return _event_record(row)

    @retry_transient
    async def events_after(self, job_id: str, after_id: int = 0, limit: int = 500) -> list[EventRecord]:
        """The job's events with an id above `after_id`, oldest first (empty for an unknown job)."""
        query = (
            select(EventRow)
            .where(EventRow.job_id == job_id, EventRow.id > after_id)
            .order_by(EventRow.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [_event_record(row) for row in await session.scalars(query)]

    @retry_transient
    async def events_of_all_jobs(
        self,
        after_id: int,
        *,
        types: tuple[str, ...],
        tenant: str | None = None,
        up_to_id: int | None = None,
        limit: int = 500,
    ) -> list[EventRecord]:
        """Events of every job (of one tenant's jobs, with `tenant`) whose type is one of `types`, with an
        id above `after_id` (and at most `up_to_id`), oldest first, `limit` at most.

        Only one job's events commit in id order (`append_event`): on PostgreSQL an event of another job
        may commit after a later id was read, so a reader that must miss none looks back over recent ids
        (`up_to_id`)."""
        _check_limit(limit)
        query = (
            select(EventRow)
            .where(EventRow.id > after_id, EventRow.type.in_(types))
            .order_by(EventRow.id)
            .limit(limit)
        )
        if up_to_id is not None:
            query = query.where(EventRow.id <= up_to_id)
        if tenant is not None:
            query = query.join(JobRow, JobRow.id == EventRow.job_id).where(JobRow.tenant == tenant)
        async with self._sessions() as session:
            return [_event_record(row) for row in await session.scalars(query)]

    @retry_transient
    async def newest_event_id(self) -> int:
        """The id of the latest event stored, of any job (0 when there is none)."""
        async with self._sessions() as session:
            return await session.scalar(select(func.max(EventRow.id))) or 0

    # Audit log

    @retry_transient
    async def record_audit(
        self,
        *,
        principal: str,
        tenant: str,
        method: str,
        route: str,
        job_id: str | None,
        status: int,
    ) -> AuditRecord:
        # A retry after a commit whose answer was lost records the call twice, which an audit log can bear.
        row = AuditRow(
            created_at=_now(),
            principal=principal,
            tenant=tenant,
            method=method,
            route=route,
            job_id=job_id,
            status=status,
        )
        async with self._sessions.begin() as session:
            session.add(row)
            await session.flush()
            return _audit_record(row)

    @retry_transient
    async def list_audit(
        self,
        *,
        tenant: str | None = None,
        job_id: str | None = None,
        limit: int = 50,
        page_token: str | None = None,
    ) -> tuple[list[AuditRecord], str | None]:
        """Newest first, optionally of one tenant or one job; the token fetches the next page."""
        _check_limit(limit)
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(AuditRow.tenant == tenant)
        if job_id is not None:
            query = query.where(AuditRow.job_id == job_id)
        if page_token is not None:
            query = query.where(AuditRow.id < _decode_audit_token(page_token))
        async with self._sessions() as session:
            rows = list((await session.scalars(query)).all())
        return _page(rows, limit, _audit_record, _encode_audit_token)


async def _tenant_usage(session: AsyncSession, tenant: str, since: datetime) -> TenantUsage:
    unfinished = await session.scalar(
        select(func.count())
        .select_from(JobRow)
        .where(JobRow.tenant == tenant, JobRow.phase.not_in([p.value for p in TERMINAL_PHASES]))
    )
    jobs = list(
        await session.scalars(
            select(JobRow).where(JobRow.tenant == tenant, JobRow.created_at >= since).order_by(JobRow.id)
        )
    )
    ids = [job.id for job in jobs]
    steps: dict[str, list[StepRecord]] = {job_id: [] for job_id in ids}
    last_progress: dict[str, EventRecord] = {}
    if ids:
        for step in await session.scalars(select(StepRow).where(StepRow.job_id.in_(ids))):
            steps[step.job_id].append(_step_record(step))
        latest = (
            select(func.max(EventRow.id))
            .where(EventRow.job_id.in_(ids), EventRow.type == "progress")
            .group_by(EventRow.job_id)
        )
        for event in await session.scalars(select(EventRow).where(EventRow.id.in_(latest))):
            last_progress[event.job_id] = _event_record(event)
    return TenantUsage(
        unfinished_jobs=unfinished or 0,
        jobs_since=[JobActivity(_job_record(job), steps[job.id], last_progress.get(job.id)) for job in jobs],
    )


async def _job_row(session: AsyncSession, job_id: str, *, for_update: bool = False) -> JobRow:
    query = select(JobRow).where(JobRow.id == job_id).execution_options(populate_existing=True)
    row = await session.scalar(query.with_for_update() if for_update else query)
    if row is None:
        raise JobNotFound(job_id)
    return row


def _is_submission(row: JobRow, job: JobRecord) -> bool:
    """Whether `row` holds `job` as this call submitted it: its creation time is the call's own."""
    return (row.created_at, row.owner, row.tenant, row.document) == (
        job.created_at,
        job.owner,
        job.tenant,
        job.document,
    )


def _phase_event(job_id: str, phase: Phase, message: str | None, now: datetime) -> EventRow:
    return EventRow(
        job_id=job_id, type="phase", data={"phase": phase.value, "message": message}, created_at=now
    )
