"""corrections and retractions: updates.corrects/retracted_at, deliveries.action/target_id

Revision ID: 0004_corrections_retractions
Revises: 0003_held_updates
Create Date: 2026-11-26 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_corrections_retractions"
down_revision: str | None = "0003_held_updates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("updates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("corrects", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("retracted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_foreign_key("fk_updates_corrects_updates", "updates", ["corrects"], ["id"])
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("action", sa.String(length=10), server_default="post", nullable=False)
        )
        batch_op.add_column(sa.Column("target_id", sa.Integer(), nullable=True))
        batch_op.create_index("ix_deliveries_target", ["target_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_target")
        batch_op.drop_column("target_id")
        batch_op.drop_column("action")
    with op.batch_alter_table("updates", schema=None) as batch_op:
        batch_op.drop_constraint("fk_updates_corrects_updates", type_="foreignkey")
        batch_op.drop_column("retracted_at")
        batch_op.drop_column("corrects")
