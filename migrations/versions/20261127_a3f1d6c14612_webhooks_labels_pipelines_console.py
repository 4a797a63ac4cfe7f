"""Webhook outbox (events, deliveries, signing secrets), labels, pipelines, console sessions

Revision ID: a3f1d6c14612
Revises: 5b1d2e7a9c40
Create Date: 2026-11-27 15:18:43
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a3f1d6c14612"
down_revision: str | None = "5b1d2e7a9c40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table("console_sessions",
    sa.Column("id", sa.String(length=64), nullable=False),
    sa.Column("owner_id", sa.String(length=36), nullable=False),
    sa.Column("csrf_token", sa.String(length=64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_console_sessions_owner_id_api_keys"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_console_sessions"))
    )
    with op.batch_alter_table("console_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_console_sessions_owner_id"), ["owner_id"], unique=False)

    op.create_table("pipelines",
    sa.Column("id", sa.String(length=36), nullable=False),
    sa.Column("owner_id", sa.String(length=36), nullable=False),
    sa.Column("name", sa.String(length=200), nullable=True),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("spec", sa.JSON(), nullable=False),
    sa.Column("labels", sa.JSON(), nullable=True),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_pipelines_owner_id_api_keys")),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_pipelines"))
    )
    with op.batch_alter_table("pipelines", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pipelines_owner_id"), ["owner_id"], unique=False)

    op.create_table("webhook_secrets",
    sa.Column("id", sa.String(length=36), nullable=False),
    sa.Column("owner_id", sa.String(length=36), nullable=False),
    sa.Column("secret", sa.String(length=128), nullable=False),
    sa.Column("prefix", sa.String(length=16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_webhook_secrets_owner_id_api_keys"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_secrets"))
    )
    with op.batch_alter_table("webhook_secrets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_secrets_owner_id"), ["owner_id"], unique=False)

    op.create_table("webhook_events",
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
    sa.Column("event_id", sa.String(length=36), nullable=False),
    sa.Column("owner_id", sa.String(length=36), nullable=False),
    sa.Column("job_id", sa.String(length=36), nullable=False),
    sa.Column("type", sa.String(length=64), nullable=False),
    sa.Column("url", sa.String(length=2048), nullable=False),
    sa.Column("payload", sa.JSON(), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_webhook_events_job_id_jobs"), ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["owner_id"], ["api_keys.id"], name=op.f("fk_webhook_events_owner_id_api_keys"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("seq", name=op.f("pk_webhook_events")),
    sa.UniqueConstraint("event_id", name=op.f("uq_webhook_events_event_id"))
    )
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_events_job_id_seq", ["job_id", "seq"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhook_events_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index("ix_webhook_events_status_next_attempt_at", ["status", "next_attempt_at"], unique=False)

    op.create_table("webhook_deliveries",
    sa.Column("id", sa.String(length=36), nullable=False),
    sa.Column("event_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
    sa.Column("job_id", sa.String(length=36), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("url", sa.String(length=2048), nullable=False),
    sa.Column("status_code", sa.Integer(), nullable=True),
    sa.Column("ok", sa.Boolean(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("response_excerpt", sa.Text(), nullable=True),
    sa.Column("duration_ms", sa.Double(), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["event_seq"], ["webhook_events.seq"], name=op.f("fk_webhook_deliveries_event_seq_webhook_events"), ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries"))
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_deliveries_event_seq"), ["event_seq"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhook_deliveries_job_id"), ["job_id"], unique=False)

    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("labels", sa.JSON(), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("pipeline_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("pipeline_step", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_pipeline_id"), ["pipeline_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_jobs_pipeline_id_pipelines"), "pipelines", ["pipeline_id"], ["id"])

    with op.batch_alter_table("teachers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("labels", sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table("teachers", schema=None) as batch_op:
        batch_op.drop_column("labels")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_pipeline_id_pipelines"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_pipeline_id"))
        batch_op.drop_column("pipeline_step")
        batch_op.drop_column("pipeline_id")
        batch_op.drop_column("labels")

    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("labels")

    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_job_id"))
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_event_seq"))

    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_events_status_next_attempt_at")
        batch_op.drop_index(batch_op.f("ix_webhook_events_owner_id"))
        batch_op.drop_index("ix_webhook_events_job_id_seq")

    op.drop_table("webhook_events")
    with op.batch_alter_table("webhook_secrets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_secrets_owner_id"))

    op.drop_table("webhook_secrets")
    with op.batch_alter_table("pipelines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pipelines_owner_id"))

    op.drop_table("pipelines")
    with op.batch_alter_table("console_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_console_sessions_owner_id"))

    op.drop_table("console_sessions")
