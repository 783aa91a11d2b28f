"""subscribers.timezone indexed: each publish reads the distinct time zones

Revision ID: 0009_subscriber_timezone_index
Revises: 0008_reminders
Create Date: 2026-11-26 18:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_subscriber_timezone_index"
down_revision: str | None = "0008_reminders"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_subscribers_timezone"), "subscribers", ["timezone"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_subscribers_timezone"), table_name="subscribers")
