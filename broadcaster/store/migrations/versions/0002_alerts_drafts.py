"""alert keys and drafts

Revision ID: 0002_alerts_drafts
Revises: 0001_initial
Create Date: 2026-11-26 11:03:20.584376
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_alerts_drafts"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "drafts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=50), nullable=False),
        sa.Column("route", sa.String(length=100), nullable=False),
        sa.Column("alert_key", sa.String(length=500), nullable=True),
        sa.Column("alert_group", sa.String(length=500), nullable=True),
        sa.Column("incident_id", sa.Integer(), nullable=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("update_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
        ),
        sa.ForeignKeyConstraint(
            ["update_id"],
            ["updates.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("drafts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_drafts_alert_group"), ["alert_group"], unique=False)
        batch_op.create_index(batch_op.f("ix_drafts_state"), ["state"], unique=False)

    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("alert_key", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("alert_group", sa.String(length=500), nullable=True))
        batch_op.create_index(batch_op.f("ix_incidents_alert_group"), ["alert_group"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_incidents_alert_group"))
        batch_op.drop_column("alert_group")
        batch_op.drop_column("alert_key")

    with op.batch_alter_table("drafts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_drafts_state"))
        batch_op.drop_index(batch_op.f("ix_drafts_alert_group"))

    op.drop_table("drafts")
