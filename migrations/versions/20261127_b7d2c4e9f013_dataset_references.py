"""datasets by reference: the uri read in place and what validation found there

Revision ID: b7d2c4e9f013
Revises: 4c2d8e6f1a37
Create Date: 2026-11-27 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7d2c4e9f013"
down_revision: str | None = "4c2d8e6f1a37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows are uploads or built-ins: no uri, no layout.
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("uri", sa.Text(), nullable=True))
        batch.add_column(sa.Column("layout", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("layout")
        batch.drop_column("uri")
