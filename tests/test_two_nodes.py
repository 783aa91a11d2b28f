"""Two `serve` nodes on one store: a load balancer may hand both the same monitoring
notification, at the same moment. One incident opens (or one draft waits), however the
two race — on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broadcaster.alerts import AlertEvent, take_alert
from broadcaster.config import Settings
from broadcaster.core import Broadcaster
from tests.test_serve import BANNER


def settings(store_url: str, tmp_path: Path, action: str) -> Settings:
    route: dict[str, Any] = {
        "name": "checkout",
        "match": {"service": "checkout"},
        "title": "Checkout fails",
        "fields": {"summary": "Some payments fail."},
        "action": action,
        "min_update_interval_seconds": 0,
    }
    return Settings(
        store=store_url,
        channels={"status-page": {**BANNER, "output": str(tmp_path / "public")}},
        routes=[route],
        dispatch={"poll_seconds": 0.05, "lease_seconds": 5},
        config_path=tmp_path / "broadcaster.toml",
    )


@pytest.mark.parametrize("action", ["publish", "draft"])
async def test_the_same_notification_at_two_nodes_at_once_opens_one_incident(
    store_url: str, tmp_path: Path, action: str
) -> None:
    config = settings(store_url, tmp_path, action)
    one = await Broadcaster.open(settings=config)
    two = await Broadcaster.open(settings=config)
    try:
        event = AlertEvent(
            source="alertmanager",
            group="checkout/5xx",
            status="firing",
            started_at=datetime.now(UTC),
            labels={"service": "checkout"},
        )
        for _ in range(5):  # a few tries at the race, each a fresh alert episode
            event = event.model_copy(update={"started_at": datetime.now(UTC)})
            results = await asyncio.gather(take_alert(one, event), take_alert(two, event))
            taken = sorted(r.action for r in results)
            assert taken in (["duplicate", "published"], ["drafted", "duplicate"]), taken
            # The episode ends, so the next try is a new one.
            resolved = event.model_copy(update={"status": "resolved"})
            await take_alert(one, resolved)
            for draft in await one.drafts():
                await one.reject(draft.id, actor="test")
        incidents = await one.incidents()
        drafts = await one.store.drafts(state=None)
        if action == "publish":
            assert len(incidents) == 5
        else:
            assert incidents == [] and len(drafts) == 5
    finally:
        await one.close()
        await two.close()
