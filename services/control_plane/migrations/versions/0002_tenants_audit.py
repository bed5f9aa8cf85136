"""jobs owned by tenants, tenant admissions, and the audit log

Jobs stored before this revision belong to the tenant `default` and have no owner.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("tenant", sa.String(63), nullable=False, server_default="default"))
        jobs.add_column(sa.Column("owner", sa.String(128), nullable=True))
    # The default only fills the rows already there: every new job names its tenant.
    with op.batch_alter_table("jobs") as jobs:
        jobs.alter_column("tenant", server_default=None)
    op.create_index("ix_jobs_tenant_created_at_id", "jobs", ["tenant", "created_at", "id"])

    op.create_table(
        "tenant_admissions",
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("admitted_jobs", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", name="pk_tenant_admissions"),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("route", sa.String(255), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("tenant_admissions")
    op.drop_index("ix_jobs_tenant_created_at_id", table_name="jobs")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("owner")
        jobs.drop_column("tenant")
