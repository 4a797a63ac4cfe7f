"""Idempotency-Key for uploads (idempotency_key + request_hash on teachers and datasets); jobs.expected_work
with an index covering the budget check

Revision ID: 7e3a1c9d2b55
Revises: a3f1d6c14612
Create Date: 2026-11-26 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7e3a1c9d2b55"
down_revision: str | None = "a3f1d6c14612"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("teachers", "datasets")


def upgrade() -> None:
    # Existing rows keep NULL keys; a unique constraint allows any number of NULLs on both backends.
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("idempotency_key", sa.String(length=200), nullable=True))
            batch.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
            batch.create_unique_constraint(f"uq_{table}_owner_id_idempotency_key", ["owner_id", "idempotency_key"])
    # Jobs from before this revision keep NULL: the budget counts them as no work.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("expected_work", sa.BigInteger(), nullable=True))
        # The budget check reads COUNT and SUM(expected_work) of a key's active jobs from the index
        # alone; the old (owner_id, status) index is its prefix, so it goes.
        batch.drop_index("ix_jobs_owner_id_status")
        batch.create_index("ix_jobs_owner_id_status_work", ["owner_id", "status", "expected_work"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_id_status_work")
        batch.create_index("ix_jobs_owner_id_status", ["owner_id", "status"], unique=False)
        batch.drop_column("expected_work")
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_owner_id_idempotency_key", type_="unique")
            batch.drop_column("request_hash")
            batch.drop_column("idempotency_key")
