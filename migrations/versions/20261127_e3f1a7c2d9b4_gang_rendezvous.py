"""rendezvous and gang claims on jobs (one job on several worker hosts)

Revision ID: e3f1a7c2d9b4
Revises: 7e3a1c9d2b55
Create Date: 2026-11-27 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e3f1a7c2d9b4"
down_revision: str | None = "7e3a1c9d2b55"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows are one-host jobs: a gang of 1, no rendezvous.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("rendezvous_id", sa.String(length=36), nullable=True))
        batch.add_column(sa.Column("rendezvous_endpoint", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("gang_size", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("gang_claims", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in ("gang_claims", "gang_size", "rendezvous_endpoint", "rendezvous_id"):
            batch.drop_column(column)
