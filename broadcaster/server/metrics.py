"""Prometheus metrics of `broadcaster serve`, read from the store at each scrape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broadcaster.core import Broadcaster
from broadcaster.models import DeliveryState, ReminderKind, ReminderState

# Incidents opened by an alert in this window are looked at for their first delivery.
ALERT_WINDOW = timedelta(hours=6)
# broadcaster_promised_updates{outcome} -> the reminders it counts
PROMISE_OUTCOMES = {
    "kept": (ReminderKind.HOLDING, ReminderState.KEPT),
    "nudged": (ReminderKind.NUDGE, ReminderState.DONE),
    "held": (ReminderKind.HOLDING, ReminderState.DONE),
    "missed": (ReminderKind.HOLDING, ReminderState.MISSED),
    "pending": (ReminderKind.HOLDING, ReminderState.PENDING),
}


class Metrics:
    """Deliveries by channel and state, the queue's backlog, webhook requests, requests
    refused by the per-address limits, and the time from an alert to its first delivery."""

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
        self.alert_to_delivery = Histogram(
            "broadcaster_alert_to_first_delivery_seconds",
            "From a monitoring alert's arrival to the first delivery of the incident it "
            "opened (approval time included when the route drafts)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=self.registry,
        )
        self.promises = Gauge(
            "broadcaster_promised_updates",
            "Promised updates (next_update_at) by outcome: kept (an update came in time), "
            "nudged (the team was reminded), held (a holding update went out, was drafted or "
            "the team was told), missed (late, or found past the grace), pending",
            ["outcome"],
            registry=self.registry,
        )
        self._observed: set[int] = set()  # incidents already in the histogram
        self.rate_limited = Counter(
            "broadcaster_rate_limited_requests",
            "Requests answered 429 because their client address was over its limit, by "
            "limit (inbound: /hooks/*, site: the public side)",
            ["limit"],
            registry=self.registry,
        )

    async def render(self) -> bytes:
        """The text exposition format, with gauges refreshed from the store."""
        store, queue = self.broadcaster.store, self.broadcaster.queue
        broken = set(await queue.broken_channels())
        totals: dict[tuple[str, DeliveryState], int] = {}
        for progress in await store.progress(failures=0):  # a row per channel and action
            for state in DeliveryState:
                key = (progress.channel, state)
                totals[key] = totals.get(key, 0) + progress.counts.get(state, 0)
        for (channel, state), count in totals.items():
            self.deliveries.labels(channel, state.value).set(count)
        for channel, count in (await queue.retried_counts()).items():
            self.retried.labels(channel).set(count)
        for name in self.broadcaster.channels:
            self.broken.labels(name).set(1 if name in broken else 0)
        oldest = await queue.oldest_due(except_channels=sorted(broken))
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        self.oldest_due.set(max(0.0, age))
        reminders = await self.broadcaster.scheduler.reminders.counts()
        for outcome, counted in PROMISE_OUTCOMES.items():
            self.promises.labels(outcome).set(reminders.get(counted, 0))
        since = datetime.now(UTC) - ALERT_WINDOW
        latencies = await store.alert_to_first_delivery(since)
        for incident_id, seconds in latencies.items():
            if incident_id not in self._observed:
                self.alert_to_delivery.observe(seconds)
        # Only the window's incidents can come again: the set stays small.
        self._observed = set(latencies)
        return generate_latest(self.registry)
