"""an index for expiry: answers by the time they were written

`created_at` exists since 0001 (the database's time of the insert), so every stored answer already has
a time to expire by.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_index("ix_teacher_answers_created_at_key", "teacher_answers", ["created_at", "key"])


def downgrade() -> None:
    op.drop_index("ix_teacher_answers_created_at_key", table_name="teacher_answers")
