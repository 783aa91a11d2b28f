"""distributed dispatch: deliveries name their deliver job; shared rate-limit log

Revision ID: 0011_distributed_dispatch
Revises: 0010_subscriber_ids_never_reused
Create Date: 2026-11-26 20:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_distributed_dispatch"
down_revision: str | None = "0010_subscriber_ids_never_reused"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("job_id", sa.BigInteger(), nullable=True))
        batch.create_index("ix_deliveries_job", ["job_id"], unique=False)
    unassigned = sa.text("state = 'queued' AND job_id IS NULL")
    op.create_index(
        "ix_deliveries_unassigned",
        "deliveries",
        ["channel", "seq", "id"],
        postgresql_where=unassigned,
        sqlite_where=unassigned,
    )
    op.create_table(
        "rate_reservations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key", sa.String(length=400), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rate_reservations_key_at", "rate_reservations", ["key", "at"])


def downgrade() -> None:
    op.drop_index("ix_rate_reservations_key_at", table_name="rate_reservations")
    op.drop_table("rate_reservations")
    op.drop_index("ix_deliveries_unassigned", table_name="deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_job")
        batch.drop_column("job_id")
