"""Alembic environment of the job store.

`stillhouse.control_plane.store.migrate` runs the migrations on a connection it passes in
`config.attributes["connection"]`; developers running the `alembic` command (see alembic.ini beside
this file) give the database as `-x url=sqlite:///PATH` instead.
"""

from __future__ import annotations

from stillhouse.common.database import run_migrations_in_env
from stillhouse.control_plane.store import Base

run_migrations_in_env(target_metadata=Base.metadata)
