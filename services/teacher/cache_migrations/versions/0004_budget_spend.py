"""what each job has spent of its teacher budget, shared by the shards of its teacher stage"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "teacher_budget_spend",
        sa.Column("job_id", sa.String(255), nullable=False),
        sa.Column("scope", sa.String(255), nullable=False),
        sa.Column("spent_usd", sa.Float(), nullable=False),
        sa.Column("reserved_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "scope", name="pk_teacher_budget_spend"),
    )


def downgrade() -> None:
    op.drop_table("teacher_budget_spend")
