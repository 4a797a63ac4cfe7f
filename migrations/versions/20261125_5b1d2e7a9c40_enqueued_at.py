"""enqueued_at on teachers, datasets and jobs (the sweeper re-sends tasks that nobody took)

Revision ID: 5b1d2e7a9c40
Revises: c8844476bb10
Create Date: 2026-11-25 04:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b1d2e7a9c40"
down_revision: str | None = "c8844476bb10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("teachers", "datasets", "jobs")


def upgrade() -> None:
    # Rows from before this revision keep NULL: the sweeper reads it as "sent at created_at".
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("enqueued_at")
