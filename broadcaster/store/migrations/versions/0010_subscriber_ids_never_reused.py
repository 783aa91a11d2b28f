"""subscribers: ids are never reused after an erase (SQLite AUTOINCREMENT)

Deliveries name a subscriber by id: a new subscriber given an erased one's id would
inherit their deliveries (an export, a retraction's deletes). PostgreSQL sequences never
reuse ids; SQLite's rowid does, unless the table is AUTOINCREMENT.

Revision ID: 0010_subscriber_ids_never_reused
Revises: 0009_subscriber_timezone_index
Create Date: 2026-11-26 18:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010_subscriber_ids_never_reused"
down_revision: str | None = "0009_subscriber_timezone_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # The table is copied (foreign keys are off on the migration's connection, so the
    # subscriptions referring to it stay).
    with op.batch_alter_table(
        "subscribers", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("subscribers", recreate="always"):
        pass
