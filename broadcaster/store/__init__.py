"""The store: SQLAlchemy 2 on SQLite (WAL) by default, PostgreSQL for scale."""

from broadcaster.store.queue import DeliveryQueue, Outcome, Target
from broadcaster.store.store import ChannelPlan, Claimed, PublishPlan, Store, delivery_key

__all__ = [
    "ChannelPlan",
    "Claimed",
    "DeliveryQueue",
    "Outcome",
    "PublishPlan",
    "Store",
    "Target",
    "delivery_key",
]
