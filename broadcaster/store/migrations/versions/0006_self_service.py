"""self-service subscription: pending sign-ups, daily counts of confirmation messages

Revision ID: 0006_self_service
Revises: 0005_subscribers
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_self_service"
down_revision: str | None = "0005_subscribers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pending_subscriptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("nonce", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("language", sa.String(length=20), nullable=False),
        sa.Column("components", sa.JSON(), nullable=True),
        sa.Column("code_hash", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_pending_subscriptions_expires_at"),
        "pending_subscriptions",
        ["expires_at"],
        unique=False,
    )
    op.create_table(
        "self_service_counts",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", "day"),
    )


def downgrade() -> None:
    op.drop_table("self_service_counts")
    op.drop_index(op.f("ix_pending_subscriptions_expires_at"), table_name="pending_subscriptions")
    op.drop_table("pending_subscriptions")
