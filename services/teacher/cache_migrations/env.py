"""Alembic environment of the teacher cache.

`stillhouse.teacher.cache.migrate` runs the migrations on a connection it passes in
`config.attributes["connection"]`; developers running the `alembic` command (see alembic.ini beside
this file) give the database as `-x url=sqlite:///PATH` instead.

The cache may share its database with the job store, so it keeps its own version table and
autogenerate looks only at the cache's tables.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from stillhouse.common.database import database_urls
from stillhouse.teacher.cache import VERSION_TABLE, metadata

config = context.config


def _developer_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database with: alembic -x url=sqlite:///PATH ...")
    return url


def _cache_tables_only(name: str | None, type_: str, parent_names: Any) -> bool:
    return type_ != "table" or name in metadata.tables


_OPTIONS: dict[str, Any] = {
    "target_metadata": metadata,
    "version_table": VERSION_TABLE,
    "include_name": _cache_tables_only,
}

if context.is_offline_mode():
    context.configure(url=database_urls(_developer_url())[1], literal_binds=True, **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    context.configure(connection=connection, render_as_batch=True, **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(database_urls(_developer_url())[1], poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, render_as_batch=True, **_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
