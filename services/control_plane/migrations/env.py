"""Alembic environment of the job store.

`stillhouse.control_plane.store.migrate` runs the migrations on a connection it passes in
`config.attributes["connection"]`; developers running the `alembic` command (see alembic.ini beside
this file) give the database as `-x url=sqlite:///PATH` instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from stillhouse.common.database import database_urls
from stillhouse.control_plane.store import Base

config = context.config


def _developer_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database with: alembic -x url=sqlite:///PATH ...")
    return url


if context.is_offline_mode():
    context.configure(
        url=database_urls(_developer_url())[1], target_metadata=Base.metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(database_urls(_developer_url())[1], poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
