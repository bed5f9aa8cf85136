"""Alembic environment of the teacher cache.

`stillhouse.teacher.cache.migrate` runs the migrations on a connection it passes in
`config.attributes["connection"]`; developers running the `alembic` command (see alembic.ini beside
this file) give the database as `-x url=sqlite:///PATH` instead.

The cache may share its database with the job store, so it keeps its own version table and
autogenerate looks only at the cache's tables.
"""

from __future__ import annotations

from typing import Any

from stillhouse.common.database import run_migrations_in_env
from stillhouse.teacher import budget  # noqa: F401  (its table joins the cache's metadata)
from stillhouse.teacher.cache import VERSION_TABLE, metadata


def _cache_tables_only(name: str | None, type_: str, parent_names: Any) -> bool:
    return type_ != "table" or name in metadata.tables


run_migrations_in_env(target_metadata=metadata, version_table=VERSION_TABLE, include_name=_cache_tables_only)
