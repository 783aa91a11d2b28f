"""Sending deliveries once they are claimed: what every backend does with one in hand.

`prepare` reads what a batch needs (renders, threads, targets, subscribers' addresses) in
a few queries; `send` passes one delivery through the rate limits to the adapter and turns
what happened into its next state (`Outcome`). Writing outcomes back is the caller's: the
embedded dispatcher batches them across channels, a deliver job settles its own batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from broadcaster.dispatch.ratelimit import Limiters
from broadcaster.dispatch.retry import RetryPolicy
from broadcaster.errors import ChannelBrokenError, PermanentError, PostGoneError, TransientError
from broadcaster.models import ChannelRender, DeliveryAction, DeliveryState, Thread
from broadcaster.store import Claimed, DeliveryQueue, Outcome, Store, Target
from broadcaster.store.queue import Reroute
from broadcaster.store.subscribers import SubscriberStore
from broadcaster.store.tables import utcnow
from channels.base import Channel, Message, Recipient

log = logging.getLogger("broadcaster.dispatch")

SEND_TIMEOUT_SECONDS = 60.0
RENDERS_KEPT = 1024  # (update, channel) renders kept in memory, least recently used out


@dataclass(frozen=True)
class Ready:
    """A claimed delivery with everything its send needs."""

    claimed: Claimed
    render: ChannelRender
    thread: Thread | None
    target: Target | None
    address: str | None


@dataclass(frozen=True)
class Sent:
    """What one send came to: the delivery's next state, and the adapter's classified
    error when it failed (a `TransientError` carries the provider's Retry-After)."""

    outcome: Outcome
    error: Exception | None = None

    @property
    def broken(self) -> str | None:
        """Why the channel is broken, when this send found it so."""
        return str(self.error) if isinstance(self.error, ChannelBrokenError) else None


async def settle_surely(queue: DeliveryQueue, outcomes: Sequence[Outcome]) -> None:
    """Write outcomes, trying again while the store is busy or briefly gone: a sent
    message whose outcome is lost would be sent again."""
    delay = 0.05
    while True:
        try:
            await queue.settle(outcomes)
            return
        except Exception:
            log.exception("could not record %d outcomes; retrying", len(outcomes))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def retry_policy(channel: Channel) -> RetryPolicy:
    config = channel.config
    return RetryPolicy(
        base_seconds=config.backoff_seconds,
        max_seconds=config.backoff_max_seconds,
        max_attempts=config.max_attempts,
    )


def outcome_of_failure(
    claimed: Claimed,
    error: Exception,
    policy: RetryPolicy,
    now: datetime,
    *,
    deadline_seconds: float,
) -> Outcome:
    """Turn an adapter's classified error into the delivery's next state."""
    message = str(error) or type(error).__name__
    if isinstance(error, PermanentError):
        return Outcome(claimed.id, DeliveryState.FAILED, last_error=message)
    if isinstance(error, ChannelBrokenError):
        # Not the recipient's fault: back in the queue, and this try does not count.
        return Outcome(
            claimed.id,
            DeliveryState.QUEUED,
            last_error=message,
            next_attempt_at=None,
            uncount_attempt=True,
        )
    retry_after = error.retry_after if isinstance(error, TransientError) else None
    deadline = claimed.deadline_at or claimed.created_at + timedelta(seconds=deadline_seconds)
    when = policy.next_attempt(
        attempt=claimed.attempts, now=now, deadline=deadline, retry_after=retry_after
    )
    if when is None:
        return Outcome(
            claimed.id,
            DeliveryState.FAILED,
            last_error=f"gave up after {claimed.attempts} attempt(s): {message}",
        )
    return Outcome(claimed.id, DeliveryState.QUEUED, last_error=message, next_attempt_at=when)


def fallbacks_of(channels: Mapping[str, Channel]) -> dict[str, Reroute]:
    """Per subscriber channel with a configured fallback (checked at load), where its
    deliveries go when they cannot go out on it."""
    found = {}
    for name, channel in channels.items():
        fallback = channel.config.fallback
        if fallback is None or fallback == name:
            continue
        target = channels.get(fallback)
        if target is not None and target.address_kind is not None:
            found[name] = Reroute(source=name, fallback=fallback, kind=target.address_kind)
    return found


class Sender:
    """Prepares and sends claimed deliveries of the given channels."""

    def __init__(self, store: Store, channels: Mapping[str, Channel], limiters: Limiters) -> None:
        self.store = store
        self.queue = DeliveryQueue(store)
        self.subscribers = SubscriberStore(store)
        self.channels = dict(channels)
        self.fallbacks = fallbacks_of(self.channels)
        self.limiters = limiters
        self._renders: OrderedDict[tuple[int, str], ChannelRender] = OrderedDict()

    def remember_renders(self, update_id: int, renders: Mapping[str, ChannelRender]) -> None:
        """An update's renders, handed over by the process that just published it."""
        for name, render in renders.items():
            self._keep_render((update_id, name), render)

    def _keep_render(self, key: tuple[int, str], render: ChannelRender) -> None:
        self._renders[key] = render
        self._renders.move_to_end(key)
        while len(self._renders) > RENDERS_KEPT:
            self._renders.popitem(last=False)

    async def _render_of(self, update_id: int, channel: str) -> ChannelRender | None:
        render = self._renders.get((update_id, channel))
        if render is None:
            for name, stored in (await self.store.renders(update_id)).items():
                self._keep_render((update_id, name), stored)
            render = self._renders.get((update_id, channel))
        return render

    async def prepare(
        self, channel: Channel, claimed: list[Claimed]
    ) -> tuple[list[Ready], list[Outcome]]:
        """The deliveries ready to send, and the outcomes of those that need no send (no
        render, or a subscriber who left since the fan-out)."""
        renders: dict[int, ChannelRender] = {}
        for item in claimed:
            if item.update_id not in renders:
                render = await self._render_of(item.update_id, channel.name)
                if render is not None:
                    renders[item.update_id] = render
        threads: dict[tuple[int, str], Thread] = {}
        if channel.capabilities.threads:
            threads = await self.queue.threads(channel.name, claimed)
        targets = await self.queue.targets(claimed)
        addresses: dict[int, tuple[str, str | None]] = {}
        if channel.address_kind is not None:
            posts = {int(c.recipient) for c in claimed if c.action != DeliveryAction.DELETE}
            deletes = {int(c.recipient) for c in claimed} - posts
            # A post goes only to who is still subscribed; a delete (a retraction) also
            # reaches who left since: the wrong words must not stay in their chat.
            addresses = await self.subscribers.addresses(channel.name, channel.address_kind, posts)
            if deletes:
                addresses |= await self.subscribers.addresses(
                    channel.name, channel.address_kind, deletes, subscribed_only=False
                )
        ready: list[Ready] = []
        settled: list[Outcome] = []
        for item in claimed:
            if item.update_id not in renders:  # never expected: the queue must not stall
                settled.append(
                    Outcome(
                        item.id,
                        DeliveryState.FAILED,
                        last_error=f"{channel.name}: update #{item.update_id} has no render here",
                    )
                )
                continue
            target = targets.get(item.target_id) if item.target_id is not None else None
            render, address = renders[item.update_id], None
            if channel.address_kind is not None:
                found = addresses.get(int(item.recipient))
                if found is None:
                    # Opted out or erased since the fan-out: nothing goes to them.
                    settled.append(
                        Outcome(item.id, DeliveryState.CANCELLED, last_error="unsubscribed")
                    )
                    continue
                address, zone = found
                render = render.in_zone(zone)  # times in the subscriber's own zone
            ready.append(Ready(item, render, threads.get(item.thread), target, address))
        return ready, settled

    async def send(self, channel: Channel, ready: Ready) -> Sent:
        """Send one delivery: its outcome, and the adapter's error if it failed."""
        claimed = ready.claimed
        try:
            message = Message(
                render=ready.render,
                recipient=Recipient(
                    id=claimed.recipient, language=claimed.language, address=ready.address
                ),
                thread=ready.thread,
                incident_id=claimed.incident_id,
                update_id=claimed.update_id,
                delivery_key=claimed.delivery_key,
            )
            slot = self.limiters.slot(
                account=channel.account_key(),
                channel=channel.name,
                target=channel.rate_limit_target(claimed.recipient),
                limit=channel.rate_limit_for(claimed.recipient),
            )
            async with slot, asyncio.timeout(SEND_TIMEOUT_SECONDS):
                return Sent(await self._act(channel, claimed, message, ready.target))
        except (TransientError, PermanentError, ChannelBrokenError) as error:
            failed = self._failure(channel, claimed, error)
            return Sent(self._with_fallback(channel, claimed, error, failed), error)
        except TimeoutError:
            timeout = TransientError(
                f"{channel.name}: no answer within {SEND_TIMEOUT_SECONDS:.0f}s"
            )
            return Sent(self._failure(channel, claimed, timeout), timeout)
        except Exception as error:  # an adapter bug must not kill the dispatcher
            log.exception(
                "%s: unexpected error from the adapter",
                channel.name,
                extra={"channel": channel.name, "delivery_id": claimed.id},
            )
            wrapped = TransientError(f"{channel.name}: unexpected {type(error).__name__}")
            return Sent(self._failure(channel, claimed, wrapped), wrapped)

    @staticmethod
    async def _act(
        channel: Channel, claimed: Claimed, message: Message, target: Target | None
    ) -> Outcome:
        """Post, or change the post `target` (a correction edits it, a retraction deletes
        it). A target that never got posted leaves a correction to be posted instead, and a
        retraction nothing to delete."""
        action = DeliveryAction(claimed.action)
        posted = target.provider_id if target is not None else None
        if action is DeliveryAction.DELETE:
            if posted is None:
                return Outcome(claimed.id, DeliveryState.CANCELLED, last_error="nothing was posted")
            try:
                await channel.delete(posted, message.recipient)
            except PostGoneError:
                return Outcome(claimed.id, DeliveryState.DELIVERED, last_error="already gone")
            return Outcome(claimed.id, DeliveryState.DELIVERED)
        receipt = None
        if action is DeliveryAction.EDIT and posted is not None:
            with contextlib.suppress(PostGoneError):  # deleted by hand: post it anew
                receipt = await channel.edit(posted, message)
        if receipt is None:
            receipt = await channel.send(message)
        return Outcome(
            claimed.id,
            DeliveryState.DELIVERED if receipt.delivered else DeliveryState.SENT,
            provider_id=receipt.provider_id,
            permalink=receipt.permalink,
            provider_data=receipt.data or None,
        )

    def _with_fallback(
        self, channel: Channel, claimed: Claimed, error: Exception, outcome: Outcome
    ) -> Outcome:
        """A post to a subscriber that fails permanently, or meets the channel broken,
        goes to the channel's fallback (when the subscriber can be reached there: decided
        as the outcome is written). A fallback delivery is never re-routed again."""
        reroute = self.fallbacks.get(channel.name)
        if reroute is None or claimed.action != DeliveryAction.POST.value:
            return outcome
        permanent = isinstance(error, PermanentError) and outcome.state is DeliveryState.FAILED
        if permanent or isinstance(error, ChannelBrokenError):
            return dataclasses.replace(outcome, reroute=reroute)
        return outcome

    @staticmethod
    def _failure(channel: Channel, claimed: Claimed, error: Exception) -> Outcome:
        return outcome_of_failure(
            claimed,
            error,
            retry_policy(channel),
            utcnow(),
            deadline_seconds=channel.config.deadline_seconds,
        )
