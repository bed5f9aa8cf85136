"""Database plumbing shared by every store (job store, teacher cache): one code path over SQLite
(embedded mode) and PostgreSQL (cluster mode), with Alembic migrations shipped inside the package."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

# How long an SQLite connection waits for another process's write to finish before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# WAL and a busy timeout let a second process (a restarted service, a reader) share the file.
DEFAULT_SQLITE_PRAGMAS = ("journal_mode=WAL", "foreign_keys=ON", f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")

# URL scheme a user may give -> (driver for the async engine, driver for migrations).
_DRIVERS = {
    "sqlite": ("sqlite+aiosqlite", "sqlite"),
    "sqlite+aiosqlite": ("sqlite+aiosqlite", "sqlite"),
    "postgresql": ("postgresql+psycopg", "postgresql+psycopg"),
    "postgresql+psycopg": ("postgresql+psycopg", "postgresql+psycopg"),
}


def database_urls(database_url: str) -> tuple[URL, URL]:
    """(URL for the async engine, URL for migrations) of a user-given database URL."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        raise ValueError(
            "database URL is not a URL; give sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        ) from None
    if url.drivername not in _DRIVERS:
        raise ValueError(
            f"database URL scheme {url.drivername!r} is not supported; use one of {', '.join(_DRIVERS)}"
        )
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ValueError("an in-memory SQLite database cannot be shared; give sqlite:///PATH to a file")
    async_driver, sync_driver = _DRIVERS[url.drivername]
    return url.set(drivername=async_driver), url.set(drivername=sync_driver)


def configure_sqlite(engine: Engine, database: str, pragmas: Sequence[str] = DEFAULT_SQLITE_PRAGMAS) -> None:
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()


def alembic_config(migrations: Path) -> Config:
    """Alembic's configuration, built in code: the migrations ship inside the package."""
    config = Config()
    config.set_main_option("script_location", str(migrations))
    return config


def migrate(
    database_url: str,
    migrations: Path,
    *,
    lock_key: int,
    sqlite_pragmas: Sequence[str] = DEFAULT_SQLITE_PRAGMAS,
) -> None:
    """Bring the database to the latest revision of `migrations` (blocking; idempotent)."""
    _, sync_url = database_urls(database_url)
    engine = create_engine(sync_url, poolclass=NullPool)
    if sync_url.get_backend_name() == "sqlite":
        configure_sqlite(engine, sync_url.database or "", sqlite_pragmas)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Replicas starting together take turns; the later ones then find the schema at head.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
            config = alembic_config(migrations)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def schema_is_behind(database_url: str, migrations: Path) -> bool:
    """Whether the database still lacks the latest revision of `migrations` (blocking): it has none of
    them yet, or an older one. A revision these migrations do not know is a newer release's: not behind."""
    _, sync_url = database_urls(database_url)
    engine = create_engine(sync_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()
    script = ScriptDirectory.from_config(alembic_config(migrations))
    if set(script.get_heads()) <= current:
        return False
    return current <= {revision.revision for revision in script.walk_revisions()}


def libpq_url(database_url: str) -> str:
    """The PostgreSQL URL of `database_url` as libpq (psycopg's own connections) takes it."""
    _, sync_url = database_urls(database_url)
    return sync_url.set(drivername="postgresql").render_as_string(hide_password=False)


def run_migrations_in_env(**options: Any) -> None:
    """The body of an Alembic env.py: run the migrations with `options` for `context.configure`.

    `migrate` passes its connection in `config.attributes["connection"]`; developers running the
    `alembic` command give the database as `-x url=sqlite:///PATH` instead (or offline, for SQL only).
    """
    if context.is_offline_mode():
        context.configure(url=_developer_url(), literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
    elif (connection := context.config.attributes.get("connection")) is not None:
        _run_on(connection, options)
    else:
        engine = create_engine(_developer_url(), poolclass=NullPool)
        with engine.connect() as connection:
            _run_on(connection, options)
        engine.dispose()


def _run_on(connection: Any, options: dict[str, Any]) -> None:
    context.configure(connection=connection, render_as_batch=True, **options)
    with context.begin_transaction():
        context.run_migrations()


def _developer_url() -> URL:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("give the database with: alembic -x url=sqlite:///PATH ...")
    return database_urls(url)[1]


def create_engine_for(
    database_url: str,
    sqlite_pragmas: Sequence[str] = DEFAULT_SQLITE_PRAGMAS,
    *,
    idle_transaction_limit_ms: int | None = None,
) -> AsyncEngine:
    """An engine on `database_url`. With `idle_transaction_limit_ms`, PostgreSQL ends any transaction of
    its sessions that sits idle that long (its client gone silent), and with it the row locks it holds."""
    async_url, _ = database_urls(database_url)
    connect_args: dict[str, Any] = {}
    if idle_transaction_limit_ms is not None and async_url.get_backend_name() == "postgresql":
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={idle_transaction_limit_ms}"
    engine = create_async_engine(async_url, pool_pre_ping=True, connect_args=connect_args)
    if async_url.get_backend_name() == "sqlite":
        configure_sqlite(engine.sync_engine, async_url.database or "", sqlite_pragmas)
    return engine
