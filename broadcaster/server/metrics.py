"""Prometheus metrics of `broadcaster serve`, read from the store at each scrape."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from broadcaster.core import Broadcaster
from broadcaster.models import DeliveryState


class Metrics:
    """Deliveries by channel and state, the queue's backlog, webhook requests."""

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.broadcaster = broadcaster
        self.registry = CollectorRegistry()
        self.deliveries = Gauge(
            "broadcaster_deliveries",
            "Deliveries by channel and state",
            ["channel", "state"],
            registry=self.registry,
        )
        self.retried = Gauge(
            "broadcaster_deliveries_retried",
            "Deliveries that needed more than one attempt, by channel",
            ["channel"],
            registry=self.registry,
        )
        self.oldest_due = Gauge(
            "broadcaster_oldest_due_delivery_age_seconds",
            "How long the longest-waiting due delivery has waited (0: none)",
            registry=self.registry,
        )
        self.broken = Gauge(
            "broadcaster_channel_broken",
            "1 for a channel stopped because the provider refused its credentials",
            ["channel"],
            registry=self.registry,
        )
        self.webhook_requests = Counter(
            "broadcaster_webhook_requests",
            "Monitoring webhook requests by source and HTTP status",
            ["source", "status"],
            registry=self.registry,
        )

    async def render(self) -> bytes:
        """The text exposition format, with gauges refreshed from the store."""
        store, queue = self.broadcaster.store, self.broadcaster.queue
        broken = set(await queue.broken_channels())
        for progress in await store.progress(failures=0):
            for state in DeliveryState:
                self.deliveries.labels(progress.channel, state.value).set(
                    progress.counts.get(state, 0)
                )
        for channel, count in (await queue.retried_counts()).items():
            self.retried.labels(channel).set(count)
        for name in self.broadcaster.channels:
            self.broken.labels(name).set(1 if name in broken else 0)
        oldest = await queue.oldest_due(except_channels=sorted(broken))
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        self.oldest_due.set(max(0.0, age))
        return generate_latest(self.registry)
