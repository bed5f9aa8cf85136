"""an index for expiry: answers by the time they were written

`created_at` exists since 0001 (the database's time of the insert), so every stored answer already has
a time to expire by.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_teacher_answers_created_at_key", "teacher_answers", ["created_at", "key"])


def downgrade() -> None:
    op.drop_index("ix_teacher_answers_created_at_key", table_name="teacher_answers")
