"""subscribers: a Telegram user id and a webhook URL, each unique

Revision ID: 0007_subscriber_telegram_webhook
Revises: 0006_self_service
Create Date: 2026-11-26 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_subscriber_telegram_webhook"
down_revision: str | None = "0006_self_service"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite adds a unique constraint only by copying the table.
    with op.batch_alter_table("subscribers") as batch:
        batch.add_column(sa.Column("telegram", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("webhook_url", sa.String(length=2048), nullable=True))
        batch.create_unique_constraint("uq_subscribers_telegram", ["telegram"])
        batch.create_unique_constraint("uq_subscribers_webhook_url", ["webhook_url"])


def downgrade() -> None:
    with op.batch_alter_table("subscribers") as batch:
        batch.drop_constraint("uq_subscribers_webhook_url", type_="unique")
        batch.drop_constraint("uq_subscribers_telegram", type_="unique")
        batch.drop_column("webhook_url")
        batch.drop_column("telegram")
