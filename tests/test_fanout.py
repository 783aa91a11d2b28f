"""Fan-out to subscribers, at the store: deliveries created in batches behind a cursor,
only to subscribed subscribers who follow a touched component, stopped when the update
is superseded or cancelled, counted as pending while it runs. SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from broadcaster.models import (
    AddressKind,
    ChannelFamily,
    ChannelRender,
    ComponentState,
    DeliveryState,
    Impact,
    IncidentStatus,
    NewSubscriber,
    Rendered,
)
from broadcaster.store import ChannelPlan, DeliveryQueue, PublishPlan, Store
from broadcaster.store.subscribers import SubscriberStore
from broadcaster.subscribers import Address

CHANNEL = "sms"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    yield opened
    await opened.close()


def plan(
    incident_id: int | None = None,
    status: IncidentStatus = IncidentStatus.INVESTIGATING,
    components: dict[str, ComponentState] | None = None,
) -> PublishPlan:
    touched = components if components is not None else {"api": ComponentState.MAJOR_OUTAGE}
    render = ChannelRender(
        channel=CHANNEL,
        family=ChannelFamily.SHORT,
        template=status.value,
        variants=[Rendered(language="en", text=status.value)],
        joined=False,
        facts={"components": {k: v.value for k, v in touched.items()}},
    )
    return PublishPlan(
        incident_id=incident_id,
        title="API down",
        status=status,
        impact=Impact.MAJOR,
        components=touched,
        incident_components=touched,
        template=status.value,
        fields={},
        next_update_at=None,
        publish_key=None,
        actor="test",
        channels={CHANNEL: ChannelPlan(render=render, recipients=[], fanout=True)},
    )


_numbers = itertools.count(612340000)


async def subscribe(
    store: Store, count: int, *, components: list[str] | None = None, language: str = "en"
) -> list[int]:
    rows = SubscriberStore(store)
    ids = []
    for _ in range(count):
        number = f"+33{next(_numbers)}"
        new = NewSubscriber(phone=number, language=language, components=components)
        address = Address(phone=number, email=None)
        subscriber, _ = await rows.add(new, address, [CHANNEL], source="test")
        ids.append(subscriber.id)
    return ids


async def run_fanout(queue: DeliveryQueue, batch: int) -> int:
    """Advance until the channel has no running fan-out; the number of steps taken."""
    steps = 0
    while await queue.advance_fanout(CHANNEL, batch):
        steps += 1
    return steps + 1


async def test_batches_reach_subscribed_followers_in_their_language(store: Store) -> None:
    everyone = await subscribe(store, 5)
    french = await subscribe(store, 2, language="fr")
    elsewhere = await subscribe(store, 3, components=["billing"])  # not touched: skipped
    following = await subscribe(store, 1, components=["api"])
    rows = SubscriberStore(store)
    stopped = await rows.get(everyone[0])
    assert stopped.phone is not None
    await rows.set_subscribed(
        CHANNEL, AddressKind.PHONE, stopped.phone, subscribed=False, source="sms STOP"
    )

    update, _ = await store.publish(plan())
    queue = DeliveryQueue(store)
    assert await queue.pending_count(update_ids=[update.id]) == 1  # the fan-out itself
    assert await run_fanout(queue, batch=3) == 4  # 10 subscribed, 3 a batch
    deliveries = await store.deliveries(update_id=update.id)
    assert sorted(int(d.recipient) for d in deliveries) == sorted(
        [*everyone[1:], *french, *following]
    )
    assert {d.recipient: d.language for d in deliveries}[str(french[0])] == "fr"
    assert all(d.state is DeliveryState.QUEUED for d in deliveries)
    assert not set(map(str, elsewhere)) & {d.recipient for d in deliveries}
    assert await queue.pending_count(update_ids=[update.id]) == len(deliveries)


async def test_a_fanout_resumes_after_its_cursor_without_duplicates(
    store: Store, store_url: str
) -> None:
    await subscribe(store, 7)
    update, _ = await store.publish(plan())
    assert await DeliveryQueue(store).advance_fanout(CHANNEL, 3)  # one batch, then a "crash"
    await store.close()
    reopened = await Store.open(store_url)
    try:
        await run_fanout(DeliveryQueue(reopened), batch=3)
        deliveries = await reopened.deliveries(update_id=update.id)
        assert len(deliveries) == 7 == len({d.recipient for d in deliveries})
    finally:
        await reopened.close()


async def test_a_newer_update_or_a_cancel_stops_a_running_fanout(store: Store) -> None:
    await subscribe(store, 6)
    first, _ = await store.publish(plan())
    queue = DeliveryQueue(store)
    assert await queue.advance_fanout(CHANNEL, 2)
    resolved, _ = await store.publish(plan(first.incident_id, IncidentStatus.RESOLVED))
    await run_fanout(queue, batch=2)
    # The old update stopped where it was (2 of 6, superseded); the new one reached all.
    assert len(await store.deliveries(update_id=first.id)) == 2
    assert len(await store.deliveries(update_id=resolved.id)) == 6

    other, _ = await store.publish(plan())
    await store.cancel_update(other.id, "test")
    await run_fanout(queue, batch=2)
    assert await store.deliveries(update_id=other.id) == []
    superseded = await store.deliveries(update_id=first.id)
    assert {d.state for d in superseded} == {DeliveryState.SUPERSEDED}
    assert await queue.pending_count() == 6  # the resolution's; no fan-out left running


async def test_retention_forgets_settled_deliveries_only(store: Store) -> None:
    from datetime import UTC, datetime, timedelta

    await subscribe(store, 4)
    settled, _ = await store.publish(plan())
    queue = DeliveryQueue(store)
    await run_fanout(queue, batch=10)
    await store.cancel_update(settled.id, "test")  # 4 cancelled: settled
    still, _ = await store.publish(plan())
    await run_fanout(queue, batch=10)  # 4 queued: still the dispatcher's business
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert await store.forget_deliveries(["other"], older_than=later) == 0
    assert await store.forget_deliveries([CHANNEL], older_than=later, batch=3) == 4
    assert await store.deliveries(update_id=settled.id) == []
    assert len(await store.deliveries(update_id=still.id)) == 4
