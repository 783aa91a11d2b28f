"""subscribers, their subscriptions (consent per channel), fan-outs; receipts by provider id

Revision ID: 0005_subscribers
Revises: 0004_corrections_retractions
Create Date: 2026-11-26 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_subscribers"
down_revision: str | None = "0004_corrections_retractions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subscribers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("phone", sa.String(length=20), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("language", sa.String(length=20), nullable=False),
        sa.Column("components", sa.JSON(), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
        sa.UniqueConstraint("phone"),
    )
    op.create_table(
        "subscriptions",
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=100), nullable=False),
        sa.Column("subscribed", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=50), nullable=False),
        sa.ForeignKeyConstraint(["subscriber_id"], ["subscribers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("subscriber_id", "channel"),
    )
    op.create_index(
        "ix_subscriptions_fanout",
        "subscriptions",
        ["channel", "subscribed", "subscriber_id"],
        unique=False,
    )
    op.create_table(
        "fanouts",
        sa.Column("update_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=100), nullable=False),
        sa.Column("cursor", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["update_id"], ["updates.id"]),
        sa.PrimaryKeyConstraint("update_id", "channel"),
    )
    op.create_index(op.f("ix_fanouts_state"), "fanouts", ["state"], unique=False)
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_deliveries_provider", ["channel", "provider_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_provider")
    op.drop_index(op.f("ix_fanouts_state"), table_name="fanouts")
    op.drop_table("fanouts")
    op.drop_index("ix_subscriptions_fanout", table_name="subscriptions")
    op.drop_table("subscriptions")
    op.drop_table("subscribers")
