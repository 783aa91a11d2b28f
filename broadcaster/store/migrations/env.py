"""Alembic environment: migrations run on a synchronous connection to the store."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from broadcaster.store.tables import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
connectable = create_engine(url or "sqlite://", poolclass=pool.NullPool)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
