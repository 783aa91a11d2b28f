"""The delivery state machine, driven through the real webhook adapter against the simulator."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

from broadcaster.core import Broadcaster, PublishResult
from broadcaster.dispatch.backend import DISPATCHER_LEASE
from broadcaster.errors import TransientError
from broadcaster.models import (
    Capabilities,
    ChannelFamily,
    ChannelProgress,
    ComponentState,
    DeliveryState,
    IncidentStatus,
    Receipt,
    UpdateRequest,
)
from broadcaster.sandbox import Behaviour, WebhookReceiver
from broadcaster.store import DeliveryQueue
from channels.base import ChannelConfig, ChannelContext, HttpChannel, Message
from tests.conftest import MakeBroadcaster, targets, webhook_channel


class ThreadedConfig(ChannelConfig):
    url: str


def opening(title: str = "Payments fail", **extra: object) -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title=title,
        fields={"summary": "Card payments fail for some users."},
        actor="test",
        **extra,
    )


def resolving() -> UpdateRequest:
    return UpdateRequest(status=IncidentStatus.RESOLVED, actor="test")


def states(progress: list[ChannelProgress], channel: str) -> dict[DeliveryState, int]:
    return next(p.counts for p in progress if p.channel == channel)


async def publish_and_wait(
    b: Broadcaster, request: UpdateRequest, incident: int | None = None
) -> tuple[PublishResult, list[ChannelProgress]]:
    result = await b.publish(request, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result, progress


async def test_429_retry_after_is_honoured(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    receiver.script("a", Behaviour(status=429, retry_after=1.5, times=1))
    b = await make_dispatching({"hooks": webhook_channel(receiver, ["a"])})
    _, progress = await publish_and_wait(b, opening())
    assert states(progress, "hooks") == {DeliveryState.DELIVERED: 1}
    first, second = receiver.attempts
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 1.5 - 0.05  # not earlier than the provider asked


async def test_5xx_is_retried_with_growing_backoff(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    receiver.script("a", Behaviour(status=503, times=3))
    b = await make_dispatching(
        {"hooks": webhook_channel(receiver, ["a"], backoff_seconds=0.2, backoff_max_seconds=5)}
    )
    _, progress = await publish_and_wait(b, opening())
    assert states(progress, "hooks") == {DeliveryState.DELIVERED: 1}
    times = [a.at for a in receiver.attempts]
    assert [a.status for a in receiver.attempts] == [503, 503, 503, 200]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Equal jitter: attempt n waits between half and all of 0.2 * 2^(n-1).
    assert gaps[0] >= 0.1 - 0.02
    assert gaps[2] >= 0.4 - 0.02
    delivery = (await b.deliveries(1))[0]
    assert delivery.attempts == 4


async def test_permanent_error_is_not_retried(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    receiver.script("gone", Behaviour(status=410))
    b = await make_dispatching({"hooks": webhook_channel(receiver, ["gone", "ok"])})
    _, progress = await publish_and_wait(b, opening())
    assert states(progress, "hooks") == {DeliveryState.DELIVERED: 1, DeliveryState.FAILED: 1}
    assert len([a for a in receiver.attempts if a.path.endswith("gone")]) == 1
    failed = await b.deliveries(1, states=[DeliveryState.FAILED])
    assert failed[0].recipient == "gone"
    assert failed[0].last_error == "hooks → gone: HTTP 410"


async def test_deadline_fails_the_delivery_with_its_last_error(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    receiver.script("down", Behaviour(status=503))
    b = await make_dispatching(
        {"hooks": webhook_channel(receiver, ["down"], backoff_seconds=0.2, deadline_seconds=1)}
    )
    _, progress = await publish_and_wait(b, opening())
    assert states(progress, "hooks") == {DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(1)
    assert failed.last_error is not None
    assert "gave up" in failed.last_error and "HTTP 503" in failed.last_error
    assert 2 <= failed.attempts <= 6


async def test_dropped_connection_is_retried(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    receiver.script("flaky", Behaviour(drop=True, times=1))
    b = await make_dispatching({"hooks": webhook_channel(receiver, ["flaky"])})
    _, progress = await publish_and_wait(b, opening())
    assert states(progress, "hooks") == {DeliveryState.DELIVERED: 1}
    assert [a.status for a in receiver.attempts] == [None, 200]


async def test_channel_broken_stops_the_channel_and_keeps_its_deliveries_queued(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    for name in targets(5, "bad"):
        receiver.script(name, Behaviour(status=401))
    b = await make_dispatching(
        {
            "broken": webhook_channel(receiver, targets(5, "bad"), concurrency=1),
            "healthy": webhook_channel(receiver, targets(20, "good")),
        }
    )
    _, progress = await publish_and_wait(b, opening())
    broken = next(p for p in progress if p.channel == "broken")
    assert broken.broken is not None and "credentials refused" in broken.broken
    assert broken.counts == {DeliveryState.QUEUED: 5}  # none failed, none lost
    assert states(progress, "healthy") == {DeliveryState.DELIVERED: 20}
    # The channel stopped after its first refusal instead of trying every recipient.
    assert len([a for a in receiver.attempts if "bad" in a.path]) == 1
    (queued, *_) = await b.deliveries(1, channel="broken")
    assert queued.attempts == 0  # the refused try does not count against the recipient


async def test_one_slow_channel_does_not_delay_another(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    for name in targets(4, "slow"):
        receiver.script(name, Behaviour(delay=2.0))
    b = await make_dispatching(
        {
            "slow": webhook_channel(receiver, targets(4, "slow"), concurrency=1),
            "fast": webhook_channel(receiver, targets(50, "fast")),
        }
    )
    started = time.time()
    result = await b.publish(opening())
    waiting = asyncio.create_task(b.wait([result.update.id]))
    await receiver.wait_for(50, timeout=5)
    fast = [r for r in receiver.received if "fast" in r.path]
    assert len(fast) == 50
    assert max(r.at for r in fast) - started < 1.5  # the slow channel's 8 s did not matter
    waiting.cancel()


async def test_resolved_supersedes_investigating_not_yet_sent(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    names = targets(6, "r")
    receiver.default(Behaviour(delay=0.5))
    b = await make_dispatching({"hooks": webhook_channel(receiver, names, concurrency=1)})
    first = await b.publish(opening())
    waiting = asyncio.create_task(b.wait([first.update.id]))
    await receiver.wait_for(1, timeout=5)  # the first recipient got "investigating"
    resolved = await b.publish(resolving(), first.incident.id)
    waiting.cancel()
    await asyncio.wait_for(b.wait([first.update.id, resolved.update.id]), timeout=30)

    by_target: dict[str, list[str]] = defaultdict(list)
    for r in receiver.received:
        assert r.body is not None
        by_target[r.path.rsplit("/", 1)[1]].append(r.body["status"])
    # Nobody received "investigating" after "resolved"; those not reached got only "resolved".
    for statuses in by_target.values():
        assert statuses[-1] == "resolved"
        assert statuses in (["resolved"], ["investigating", "resolved"])
    assert sum(1 for s in by_target.values() if s == ["resolved"]) >= 3
    superseded = await b.deliveries(first.incident.id, states=[DeliveryState.SUPERSEDED])
    assert len(superseded) == sum(1 for s in by_target.values() if s == ["resolved"])


async def test_followup_waits_for_the_post_in_flight_of_its_thread(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    receiver.script("a", Behaviour(delay=1.0, times=1))
    b = await make_dispatching({"hooks": webhook_channel(receiver, ["a"], concurrency=4)})
    first = await b.publish(opening())
    waiting = asyncio.create_task(b.wait([first.update.id]))
    while not receiver.attempts:  # "investigating" is in flight (slow receiver)
        await asyncio.sleep(0.01)
    second = await b.publish(
        UpdateRequest(
            status=IncidentStatus.IDENTIFIED,
            fields={"summary": "A bad deploy."},
            actor="test",
        ),
        first.incident.id,
    )
    await asyncio.wait_for(b.wait([first.update.id, second.update.id]), timeout=10)
    waiting.cancel()
    answered = [r.body["status"] for r in receiver.received if r.body]
    assert answered == ["investigating", "identified"]
    first_answer, second_seen = receiver.received[0].at, receiver.attempts[1].at
    assert second_seen >= first_answer - 0.01  # not sent while the first was in flight


async def test_cancel_mid_fanout_stops_the_rest(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    receiver.default(Behaviour(delay=0.05))
    b = await make_dispatching({"hooks": webhook_channel(receiver, targets(200), concurrency=2)})
    result = await b.publish(opening())
    waiting = asyncio.create_task(b.wait([result.update.id]))
    await receiver.wait_for(10, timeout=10)
    cancelled = await b.cancel(result.update.id, actor="test")
    progress = await asyncio.wait_for(waiting, timeout=10)
    counts = states(progress, "hooks")
    assert counts[DeliveryState.CANCELLED] == cancelled
    assert cancelled >= 150
    assert counts[DeliveryState.DELIVERED] + cancelled == 200
    assert len(receiver.received) == counts[DeliveryState.DELIVERED]
    incident = await b.incident(result.incident.id)
    assert incident.updates[0].cancelled_at is not None
    assert [e.action for e in await b.audit(result.incident.id)] == ["publish", "cancel"]


async def test_retry_sends_failed_deliveries_again(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    receiver.script("a", Behaviour(status=410, times=1))
    b = await make_dispatching({"hooks": webhook_channel(receiver, ["a", "b"])})
    result, progress = await publish_and_wait(b, opening())
    assert states(progress, "hooks")[DeliveryState.FAILED] == 1
    requeued, skipped = await b.retry(result.incident.id, channel=None, actor="test")
    assert (requeued, skipped) == (1, 0)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=10)
    assert states(progress, "hooks") == {DeliveryState.DELIVERED: 2}


async def test_publish_key_seen_twice_sends_nothing_new(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    b = await make_dispatching({"hooks": webhook_channel(receiver, ["a"])})
    first, _ = await publish_and_wait(
        b, opening(publish_key="alertgroup-1|2026-11-26T08:00Z|firing")
    )
    again, _ = await publish_and_wait(
        b, opening(publish_key="alertgroup-1|2026-11-26T08:00Z|firing")
    )
    assert first.new and not again.new
    assert again.update.id == first.update.id
    assert len(receiver.attempts) == 1

    resolved = await b.publish(
        UpdateRequest(
            status=IncidentStatus.RESOLVED,
            actor="test",
            publish_key="alertgroup-1|2026-11-26T08:00Z|resolved",
        ),
        first.incident.id,
    )
    assert resolved.incident.id == first.incident.id
    # The same alert firing again after it resolved (a new startsAt) is a new incident.
    refired = await b.publish(opening(publish_key="alertgroup-1|2026-11-26T09:30Z|firing"))
    assert refired.new and refired.incident.id != first.incident.id


async def test_webhooks_are_signed_and_carry_the_delivery_key(
    tmp_path: object, make_dispatching: MakeBroadcaster, monkeypatch: object
) -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    async with WebhookReceiver(secret=secret) as sim:
        monkeypatch.setenv("HOOK_SECRET", secret)
        b = await make_dispatching(
            {"hooks": webhook_channel(sim, ["a", "b"], secret={"env": "HOOK_SECRET"})}
        )
        result, _ = await publish_and_wait(b, opening())
        keys = {d.delivery_key for d in await b.deliveries(result.incident.id)}
        assert {r.webhook_id for r in sim.received} == keys
        assert {r.headers["idempotency-key"] for r in sim.received} == keys
        assert all(r.signature_valid for r in sim.received)
        body = sim.received[0].body
        assert body is not None
        assert body["incident_id"] == result.incident.id
        assert body["status"] == "investigating"
        assert "Card payments fail" in body["texts"]["en"]["text"]


class ThreadedChannel(HttpChannel):
    """A test adapter that threads follow-ups, posting to the simulator like a provider."""

    family: ClassVar[ChannelFamily] = ChannelFamily.CHAT
    capabilities: ClassVar[Capabilities] = Capabilities(threads=True)
    config_model: ClassVar[type[ChannelConfig]] = ThreadedConfig

    config: ThreadedConfig

    async def send(self, message: Message) -> Receipt:
        thread = message.thread
        body = {
            "text": message.render.text(),
            "root": thread.root.provider_id if thread else None,
            "parent": thread.parent.provider_id if thread else None,
        }
        await self.post_json(self.config.url, json.dumps(body).encode(), {}, what=self.name)
        return Receipt(provider_id=f"post-{message.update_id}", data={"n": str(message.update_id)})


async def test_followups_thread_under_the_first_post(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    # A channel type of the test's own, in this process only: the embedded backend.
    b = await make_broadcaster({})
    config = ThreadedConfig(type="threaded", url=receiver.target("chat"))
    b.channels["chat"] = ThreadedChannel("chat", config, ChannelContext(tmp_path, tmp_path))
    first, _ = await publish_and_wait(b, opening())
    for status in (IncidentStatus.IDENTIFIED, IncidentStatus.RESOLVED):
        await publish_and_wait(
            b,
            UpdateRequest(status=status, fields={"summary": "A bad deploy."}, actor="test"),
            first.incident.id,
        )
    posts = [(r.body or {}) for r in receiver.received]
    assert [(p["root"], p["parent"]) for p in posts] == [
        (None, None),
        ("post-1", "post-1"),
        ("post-1", "post-2"),
    ]


async def test_a_process_without_the_lease_watches_and_takes_over_when_it_is_free(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"hooks": webhook_channel(receiver, ["a"])})
    queue = DeliveryQueue(b.store)
    assert await queue.acquire_lease(DISPATCHER_LEASE, "serve-elsewhere:1:x", ttl_seconds=60)
    result = await b.publish(opening())
    seen: list[bool] = []

    async def record(_progress: list[ChannelProgress], dispatching: bool) -> None:
        seen.append(dispatching)
        if len(seen) == 5:
            await queue.release_lease(DISPATCHER_LEASE, "serve-elsewhere:1:x")

    b.backend.tick_seconds = 0.05
    b.settings.dispatch.lease_seconds = 0.3
    progress = await asyncio.wait_for(b.wait([result.update.id], record), timeout=10)
    assert seen[:5] == [False] * 5  # only watched while the other process held the lease
    assert True in seen
    assert states(progress, "hooks") == {DeliveryState.DELIVERED: 1}


async def test_status_page_shows_published_updates_but_not_cancelled_ones(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster, tmp_path: Path
) -> None:
    b = await make_dispatching(
        {"page": {"type": "banner", "languages": ["en", "fr"], "output": "site"}},
        components={"api": "Public API"},
    )
    first, _ = await publish_and_wait(b, opening(components={"api": ComponentState.MAJOR_OUTAGE}))
    page = (tmp_path / "site" / "index.html").read_text()
    assert "Payments fail" in page and "Card payments fail" in page
    status = json.loads((tmp_path / "site" / "status.fr.json").read_text())
    assert status["incidents"][0]["title"] == "Payments fail"
    assert (tmp_path / "site" / "fr" / "index.html").exists()

    wrong = await b.publish(
        UpdateRequest(
            status=IncidentStatus.IDENTIFIED, actor="test", fields={"summary": "WRONG MESSAGE"}
        ),
        first.incident.id,
    )
    await b.cancel(wrong.update.id, actor="test")
    await publish_and_wait(b, resolving(), first.incident.id)
    page = (tmp_path / "site" / "index.html").read_text()
    assert "WRONG MESSAGE" not in page
    status = json.loads((tmp_path / "site" / "status.en.json").read_text())
    assert status["incidents"] == []


async def test_global_rate_limit_spaces_a_channels_deliveries(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    b = await make_dispatching(
        {
            "hooks": webhook_channel(
                receiver,
                targets(30),
                rate_limit={"global_per_second": 20, "global_burst": 1},
            )
        }
    )
    await publish_and_wait(b, opening())
    times = sorted(r.at for r in receiver.received)
    assert len(times) == 30
    assert times[-1] - times[0] >= 29 / 20 * 0.9  # ~20/s, not all at once
    window = 0.5
    busiest = max(sum(1 for t in times if start <= t < start + window) for start in times)
    assert busiest <= 20 * window + 2


async def test_per_target_rate_limit_holds_across_incidents(
    receiver: WebhookReceiver, make_dispatching: MakeBroadcaster
) -> None:
    b = await make_dispatching(
        {
            "hooks": webhook_channel(
                receiver,
                ["one"],
                rate_limit={"per_target_per_second": 4, "per_target_burst": 1},
            )
        }
    )
    ids = [(await b.publish(opening(title=f"Incident {i}"))).update.id for i in range(4)]
    await asyncio.wait_for(b.wait(ids), timeout=20)
    times = sorted(r.at for r in receiver.received)
    assert len(times) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 0.25 * 0.8


async def test_a_burst_of_updates_renders_the_status_page_once_per_round(
    tmp_path: Path, make_dispatching: MakeBroadcaster
) -> None:
    """Each banner delivery needs the whole site rendered from the store: deliveries in
    flight together share one render; a failed round is retried for all who joined it."""
    b = await make_dispatching(
        {"status-page": {"type": "banner", "output": "public", "backoff_seconds": 0.05}}
    )
    channel = b.channels["status-page"]
    render = channel.context.render_public_site
    assert render is not None
    rounds = 0

    async def counting(name: str, languages: list[str]) -> dict[str, bytes]:
        nonlocal rounds
        rounds += 1
        await asyncio.sleep(0.05)  # a site with history takes a while to render
        if rounds == 1:
            raise TransientError("status-page: the disk is full")
        return await render(name, languages)

    channel.context.render_public_site = counting
    for i in range(20):
        await b.publish(opening(title=f"Outage {i}"))
    progress = await asyncio.wait_for(b.wait(), timeout=30)
    assert states(progress, "status-page") == {DeliveryState.DELIVERED: 20}
    assert rounds < 20 / 2  # not one render per delivery, failed round and retries included
    page = (tmp_path / "public" / "index.html").read_text()
    assert all(f"Outage {i}" in page for i in range(20))
