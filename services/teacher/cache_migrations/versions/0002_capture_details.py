"""how each answer's token ids were captured

Answers stored before this revision were keyed with cache format 1 and no call asks for them any more;
they get the values of an answer whose capture is not known.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("teacher_answers") as batch:
        batch.add_column(sa.Column("token_id_source", sa.String(16), nullable=False, server_default="none"))
        batch.add_column(sa.Column("masked_alternatives", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("top1_mismatches", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("stop_token_added", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("teacher_answers") as batch:
        for column in ("stop_token_added", "top1_mismatches", "masked_alternatives", "token_id_source"):
            batch.drop_column(column)
