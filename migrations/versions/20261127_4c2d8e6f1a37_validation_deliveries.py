"""Deliveries of a teacher's or dataset's validation task (teachers.attempts, datasets.attempts): a
validation that keeps killing its worker ends `invalid` after KDIGA_VALIDATION_MAX_DELIVERIES

Revision ID: 4c2d8e6f1a37
Revises: e3f1a7c2d9b4
Create Date: 2026-11-27 19:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4c2d8e6f1a37"
down_revision: str | None = "e3f1a7c2d9b4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("teachers", "datasets")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("attempts")
