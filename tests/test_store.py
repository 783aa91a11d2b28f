"""The store on SQLite and on PostgreSQL: the same code, the same behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from broadcaster.errors import NotFoundError
from broadcaster.models import (
    ChannelFamily,
    ChannelRender,
    DeliveryState,
    Impact,
    IncidentStatus,
    Rendered,
)
from broadcaster.store import ChannelPlan, DeliveryQueue, Outcome, PublishPlan, Store
from broadcaster.store.engine import HEAD_REVISION, MIGRATIONS, sync_url
from broadcaster.store.tables import Base, DeliveryRow, LeaseRow, utcnow


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    yield opened
    await opened.close()


def plan(
    *,
    incident_id: int | None = None,
    status: IncidentStatus = IncidentStatus.INVESTIGATING,
    recipients: int = 3,
    publish_key: str | None = None,
    channel: str = "hooks",
) -> PublishPlan:
    render = ChannelRender(
        channel=channel,
        family=ChannelFamily.LONG,
        template=status.value,
        variants=[Rendered(language="en", text=f"{status.value} text")],
        joined=True,
    )
    return PublishPlan(
        incident_id=incident_id,
        title="API down",
        status=status,
        impact=Impact.MAJOR,
        components={},
        incident_components={},
        template=status.value,
        fields={},
        next_update_at=None,
        publish_key=publish_key,
        actor="test",
        channels={
            channel: ChannelPlan(
                render=render,
                recipients=[(f"r{i}", None) for i in range(recipients)],
            )
        },
    )


async def test_a_new_incident_can_be_stored_already_claimed_and_a_follow_up_cannot(
    store: Store,
) -> None:
    opening = plan(recipients=4)
    opening.claim_lease_seconds = 60
    first, _ = await store.publish(opening)
    assert [c.recipient for c in opening.claimed] == ["r0", "r1", "r2", "r3"]
    assert {(c.update_id, c.attempts) for c in opening.claimed} == {(first.id, 1)}
    stored = await store.deliveries(update_id=first.id)
    assert {d.state for d in stored} == {DeliveryState.SENDING}
    # Nothing else may take them: they are leased to the publishing process.
    assert await DeliveryQueue(store).claim("hooks", 10, 60) == []

    follow_up = plan(incident_id=first.incident_id, status=IncidentStatus.IDENTIFIED)
    follow_up.claim_lease_seconds = 60  # a follow-up waits for its thread: never pre-claimed
    second, _ = await store.publish(follow_up)
    assert follow_up.claimed == []
    later = await store.deliveries(update_id=second.id)
    assert {d.state for d in later} == {DeliveryState.QUEUED}


async def test_publish_stores_update_renders_and_deliveries(store: Store) -> None:
    update_, new = await store.publish(plan(recipients=5))
    assert new and update_.seq == 1
    incident = await store.get_incident(update_.incident_id)
    assert incident.title == "API down" and [u.id for u in incident.updates] == [update_.id]
    deliveries = await store.deliveries(update_id=update_.id)
    assert len(deliveries) == 5
    assert {d.state for d in deliveries} == {DeliveryState.QUEUED}
    assert len({d.delivery_key for d in deliveries}) == 5
    renders = await store.renders(update_.id)
    assert renders["hooks"].text() == "investigating text"
    (entry,) = await store.audit(update_.incident_id)
    assert entry.action == "publish" and entry.detail["deliveries"] == 5


async def test_same_publish_key_is_stored_once(store: Store) -> None:
    first, new_first = await store.publish(plan(publish_key="k"))
    again, new_again = await store.publish(plan(publish_key="k"))
    assert new_first and not new_again and again.id == first.id
    assert len(await store.deliveries()) == 3


async def test_concurrent_publishes_of_one_key_store_one_update(store: Store) -> None:
    results = await asyncio.gather(*(store.publish(plan(publish_key="race")) for _ in range(4)))
    assert sum(new for _, new in results) == 1
    assert len({u.id for u, _ in results}) == 1


async def test_newer_update_supersedes_queued_deliveries(store: Store) -> None:
    first, _ = await store.publish(plan())
    queue = DeliveryQueue(store)
    (in_flight,) = await queue.claim("hooks", 1, lease_seconds=60)
    second, _ = await store.publish(
        plan(incident_id=first.incident_id, status=IncidentStatus.RESOLVED)
    )
    older = {d.recipient: d.state for d in await store.deliveries(update_id=first.id)}
    assert older == {
        in_flight.recipient: DeliveryState.SENDING,  # already going out: it finishes
        "r1": DeliveryState.SUPERSEDED,
        "r2": DeliveryState.SUPERSEDED,
    }
    incident = await store.get_incident(first.incident_id)
    assert incident.status is IncidentStatus.RESOLVED and incident.resolved_at is not None
    assert second.seq == 2


async def test_claim_keeps_order_within_a_thread(store: Store) -> None:
    first, _ = await store.publish(plan(recipients=1))
    queue = DeliveryQueue(store)
    (claimed,) = await queue.claim("hooks", 10, lease_seconds=60)
    await store.publish(
        plan(incident_id=first.incident_id, status=IncidentStatus.IDENTIFIED, recipients=1)
    )
    # The follow-up waits while the first post of its thread is in flight.
    assert await queue.claim("hooks", 10, lease_seconds=60) == []
    await queue.settle(
        [
            Outcome(
                claimed.id,
                DeliveryState.SENT,
                provider_id="post-1",
                provider_data={"cid": "c1"},
            )
        ]
    )
    (followup,) = await queue.claim("hooks", 10, lease_seconds=60)
    assert followup.update_id != first.id
    threads = await queue.threads("hooks", [followup])
    assert threads[followup.thread].root.provider_id == "post-1"
    assert threads[followup.thread].root.data == {"cid": "c1"}


async def test_claim_skips_deliveries_not_yet_due(store: Store) -> None:
    await store.publish(plan(recipients=2))
    queue = DeliveryQueue(store)
    a, b = await queue.claim("hooks", 10, lease_seconds=60)
    later = utcnow() + timedelta(minutes=5)
    await queue.settle(
        [
            Outcome(a.id, DeliveryState.QUEUED, last_error="HTTP 503", next_attempt_at=later),
            Outcome(b.id, DeliveryState.DELIVERED),
        ]
    )
    assert await queue.claim("hooks", 10, lease_seconds=60) == []
    assert await queue.oldest_due() == later
    assert await queue.pending_count() == 1


async def test_resume_requeues_only_expired_sending_leases(store: Store) -> None:
    await store.publish(plan(recipients=2))
    queue = DeliveryQueue(store)
    expired, live = await queue.claim("hooks", 2, lease_seconds=60)
    async with store.transaction() as session:
        await session.execute(
            update(DeliveryRow)
            .where(DeliveryRow.id == expired.id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    assert await queue.resume_sending(everything=False) == 1
    states = {d.id: d.state for d in await store.deliveries()}
    assert states == {expired.id: DeliveryState.QUEUED, live.id: DeliveryState.SENDING}
    assert await queue.resume_sending(everything=True) == 1


async def test_lease_is_exclusive_until_it_expires(store: Store) -> None:
    queue = DeliveryQueue(store)
    assert await queue.acquire_lease("dispatcher", "a", 30)
    assert not await queue.acquire_lease("dispatcher", "b", 30)
    assert await queue.acquire_lease("dispatcher", "a", 30)  # renewal
    async with store.transaction() as session:
        await session.execute(update(LeaseRow).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert await queue.acquire_lease("dispatcher", "b", 30)
    assert await queue.lease_holder("dispatcher") == "b"
    await queue.release_lease("dispatcher", "b")
    assert await queue.lease_holder("dispatcher") is None


async def test_lease_of_a_dead_process_on_this_host_is_taken_over(store: Store) -> None:
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    holder = f"{socket.gethostname()}:{dead.stdout.strip()}:x"
    queue = DeliveryQueue(store)
    assert await queue.acquire_lease("dispatcher", holder, 600)
    assert await queue.acquire_lease("dispatcher", "me", 30)


async def test_cancel_stops_queued_and_records_who(store: Store) -> None:
    first, _ = await store.publish(plan(recipients=4))
    queue = DeliveryQueue(store)
    await queue.claim("hooks", 1, lease_seconds=60)
    assert await store.cancel_update(first.id, "alice") == 3
    counts = (await store.progress(incident_id=first.incident_id))[0].counts
    assert counts == {DeliveryState.CANCELLED: 3, DeliveryState.SENDING: 1}
    actions = [(e.actor, e.action) for e in await store.audit(first.incident_id)]
    assert actions == [("test", "publish"), ("alice", "cancel")]
    with pytest.raises(NotFoundError):
        await store.cancel_update(999, "alice")


async def test_retry_requeues_failures_of_the_latest_update_only(store: Store) -> None:
    first, _ = await store.publish(plan(recipients=1))
    queue = DeliveryQueue(store)
    (a,) = await queue.claim("hooks", 1, lease_seconds=60)
    await queue.settle([Outcome(a.id, DeliveryState.FAILED, last_error="HTTP 410")])
    second, _ = await store.publish(
        plan(incident_id=first.incident_id, status=IncidentStatus.RESOLVED, recipients=1)
    )
    (b,) = await queue.claim("hooks", 1, lease_seconds=60)
    await queue.settle([Outcome(b.id, DeliveryState.FAILED, last_error="HTTP 410")])
    requeued, skipped = await store.retry_failed(
        first.incident_id, channel=None, deadline_seconds={"hooks": 60}, actor="bob"
    )
    assert (requeued, skipped) == (1, 1)
    states = {d.update_id: d.state for d in await store.deliveries()}
    assert states == {first.id: DeliveryState.FAILED, second.id: DeliveryState.QUEUED}


async def test_progress_counts_by_channel_with_failures(store: Store) -> None:
    first, _ = await store.publish(plan(recipients=3))
    queue = DeliveryQueue(store)
    a, b, _c = await queue.claim("hooks", 3, lease_seconds=60)
    await queue.settle(
        [
            Outcome(a.id, DeliveryState.FAILED, last_error="HTTP 410"),
            Outcome(b.id, DeliveryState.DELIVERED),
        ]
    )
    await queue.mark_broken("hooks", "credentials refused")
    (progress,) = await store.progress(update_ids=[first.id])
    assert progress.counts == {
        DeliveryState.FAILED: 1,
        DeliveryState.DELIVERED: 1,
        DeliveryState.SENDING: 1,
    }
    assert progress.pending == 1 and progress.broken == "credentials refused"
    assert [f.last_error for f in progress.failures] == ["HTTP 410"]


async def test_migrations_match_the_models(store: Store, store_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION
    engine = create_engine(sync_url(store_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


async def test_an_erased_subscribers_id_is_never_given_again(store: Store) -> None:
    """Deliveries name subscribers by id: a newcomer with an erased person's id would
    inherit their deliveries (their export, a retraction's deletes)."""
    from broadcaster.models import NewSubscriber
    from broadcaster.store.subscribers import SubscriberStore
    from broadcaster.subscribers import Address

    rows = SubscriberStore(store)

    async def add(email: str) -> int:
        new = NewSubscriber(email=email)
        added, _ = await rows.add(new, Address(phone=None, email=email), ["email"], source="t")
        return added.id

    await add("ann@example.com")
    bob = await add("bob@example.com")
    await rows.erase(bob)
    assert await add("dieter@example.com") > bob
