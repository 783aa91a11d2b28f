"""Managing subscribers: add, import, list, export, erase, opt in and out — what the CLI,
the `/v1/subscribers` API and inbound provider callbacks (STOP/START) call."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from broadcaster.errors import BroadcasterError, NotFoundError
from broadcaster.models import (
    ChannelRender,
    Delivery,
    ImportReport,
    NewSubscriber,
    Reach,
    RejectedRow,
    Subscriber,
)
from broadcaster.store import Store
from broadcaster.store.subscribers import SubscriberStore
from broadcaster.subscribers import (
    Address,
    InvalidSubscriberError,
    check_csv,
    mask,
    normalise,
    read_csv,
)
from channels.base import Channel

__all__ = ["Audience"]

log = logging.getLogger("broadcaster.subscribers")
IMPORT_BATCH = 500  # rows stored per transaction


class Audience:
    """The subscribers of the configured subscriber channels (those with an address kind)."""

    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        *,
        components: Mapping[str, str],
        default_region: str | None,
    ) -> None:
        self.store = store
        self.rows = SubscriberStore(store)
        self.channels = {n: c for n, c in channels.items() if c.address_kind}
        self.kinds = {n: c.address_kind for n, c in self.channels.items() if c.address_kind}
        self.components = components
        self.default_region = default_region

    def _channels_for(self, new: NewSubscriber, address: Address) -> list[str]:
        """The channels a new subscriber agreed to: as given, or every subscriber channel
        they have an address for."""
        reachable = [name for name, kind in self.kinds.items() if address.of(kind)]
        if new.channels is None:
            if not reachable:
                kinds = ", ".join(f"{n} ({k.value})" for n, k in self.kinds.items())
                raise InvalidSubscriberError(
                    f"no subscriber channel can reach them — configured: {kinds or 'none'}"
                )
            return reachable
        for name in new.channels:
            if name not in self.kinds:
                raise InvalidSubscriberError(
                    f"'{name}' is not a subscriber channel — configured: "
                    f"{', '.join(self.kinds) or 'none'}"
                )
            if name not in reachable:
                kind = self.kinds[name].value
                raise InvalidSubscriberError(f"channel '{name}' needs a {kind}, and none is given")
        return list(new.channels)

    async def _check(self, new: NewSubscriber) -> tuple[Address, list[str]]:
        address = normalise(new, self.default_region)
        unknown = [c for c in new.components or () if self.components and c not in self.components]
        if unknown:
            raise InvalidSubscriberError(
                f"unknown component '{unknown[0]}' — configured: {', '.join(self.components)}"
            )
        channels = self._channels_for(new, address)
        for name in channels:  # each channel may refuse an address (a private webhook URL)
            reached = address.of(self.kinds[name])
            if reached is not None:
                await self.channels[name].check_address(reached)
        return address, channels

    async def add(self, new: NewSubscriber, *, source: str, actor: str | None = None) -> Subscriber:
        """Validate and store one subscriber (an address seen before is an error)."""
        address, channels = await self._check(new)
        subscriber, _ = await self.rows.add(new, address, channels, source=source, actor=actor)
        log.info(
            "subscriber #%d added (%s) to %s", subscriber.id, address.masked(), ", ".join(channels)
        )
        return subscriber

    async def import_csv(
        self, text: str, *, source: str = "csv", actor: str | None = None
    ) -> ImportReport:
        """Add or update every valid row; each refused row is reported with its reason.
        A subscriber who opted out stays opted out. Text that is not CSV, or a wrong
        header, raises InvalidSubscriberError before any row is stored. Rows are read
        and stored IMPORT_BATCH at a time: only the text itself is held whole."""
        # A spreadsheet's byte-order mark is not part of the first column's name.
        text = text.removeprefix("\ufeff")

        def lines() -> io.StringIO:
            # newline="": quoted fields keep their line breaks, as the csv module wants.
            return io.StringIO(text, newline="")

        check_csv(lines())
        report = ImportReport()
        batch: list[tuple[int, tuple[NewSubscriber, Address, list[str]]]] = []

        async def store_batch() -> None:
            results = await self.rows.add_many([row for _, row in batch], source=source)
            for (line, _), result in zip(batch, results, strict=True):
                if isinstance(result, str):
                    report.rejected.append(RejectedRow(line=line, reason=result))
                elif result:
                    report.added += 1
                else:
                    report.updated += 1
            batch.clear()

        for line, row in read_csv(lines()):
            if isinstance(row, str):
                report.rejected.append(RejectedRow(line=line, reason=row))
                continue
            try:
                address, channels = await self._check(row)
            except BroadcasterError as exc:
                report.rejected.append(RejectedRow(line=line, reason=str(exc)))
                continue
            batch.append((line, (row, address, channels)))
            if len(batch) >= IMPORT_BATCH:
                await store_batch()
        if batch:
            await store_batch()
        report.rejected.sort(key=lambda r: r.line)
        log.info(
            "subscribers imported: %d added, %d updated, %d rejected",
            report.added,
            report.updated,
            len(report.rejected),
        )
        if actor is not None:
            detail = {
                "added": report.added,
                "updated": report.updated,
                "rejected": len(report.rejected),
            }
            await self.rows.record(actor, "subscriber.import", detail)
        return report

    async def reach(self, render: ChannelRender) -> Reach:
        """How many subscribers an update rendered so would reach on its channel, per
        language it would go out in, and the SMS segments that costs."""
        touched = list(render.facts.get("components") or {})
        languages = await self.rows.reach(render.channel, touched)
        recipients: dict[str, int] = {}
        for language, count in languages.items():
            shown = render.variant(language).language
            recipients[shown] = recipients.get(shown, 0) + count
        segments = {m.language: m.sms_segments for m in render.measures}
        cost = [segments.get(language) for language in recipients]
        total = None
        if recipients and all(c is not None for c in cost):
            total = sum((segments[lang] or 0) * n for lang, n in recipients.items())
        return Reach(channel=render.channel, recipients=recipients, sms_segments=total)

    async def list(
        self, *, channel: str | None = None, after: int = 0, limit: int = 100
    ) -> list[Subscriber]:
        if channel is not None and channel not in self.kinds:
            raise NotFoundError(f"'{channel}' is not a subscriber channel")
        return await self.rows.list(channel=channel, after=after, limit=limit)

    async def get(self, subscriber_id: int) -> Subscriber:
        return await self.rows.get(subscriber_id)

    async def export(self, subscriber_id: int) -> dict[str, Any]:
        """Everything kept about one subscriber: who they are, their consents, and what
        was sent to them (for a data-access request)."""
        subscriber = await self.rows.get(subscriber_id)
        deliveries = await self.store.deliveries_to(str(subscriber_id), list(subscriber.channels))
        return {
            "subscriber": subscriber.model_dump(mode="json"),
            "deliveries": [_delivery_json(d) for d in deliveries],
        }

    async def erase(self, subscriber_id: int, *, actor: str | None = None) -> Subscriber:
        """Remove a subscriber and what identifies them (see SubscriberStore.erase)."""
        erased = await self.rows.erase(subscriber_id, actor=actor)
        log.info("subscriber #%d erased", subscriber_id)
        return erased

    async def set_subscription(
        self,
        subscriber_id: int,
        channel: str,
        *,
        subscribed: bool,
        source: str,
        actor: str | None = None,
    ) -> Subscriber:
        """Opt a subscriber, by id, in or out of one subscriber channel. Opting in needs
        an address the channel can reach."""
        kind = self.kinds.get(channel)
        if kind is None:
            raise NotFoundError(
                f"'{channel}' is not a subscriber channel — configured: "
                f"{', '.join(self.kinds) or 'none'}"
            )
        if subscribed:
            subscriber = await self.rows.get(subscriber_id)
            reached = subscriber.address(kind)
            if not reached:
                raise InvalidSubscriberError(
                    f"subscriber #{subscriber_id} has no {kind.value}: channel '{channel}' "
                    "cannot reach them"
                )
            # Checked like at registration: a URL given with other channels only was
            # never checked against this one's rules.
            await self.channels[channel].check_address(reached)
        changed = await self.rows.set_subscription(
            subscriber_id, channel, subscribed=subscribed, source=source, actor=actor
        )
        log.info(
            "%s: subscriber #%d %s (%s)",
            channel,
            subscriber_id,
            "opted in" if subscribed else "opted out",
            source,
        )
        return changed

    async def set_subscribed(
        self,
        channel: str,
        address: str,
        *,
        subscribed: bool,
        source: str,
        actor: str | None = None,
    ) -> bool:
        """Opt whoever has this address in or out of a channel; False when nobody has it.
        With `actor`, the change is audited (by subscriber id)."""
        kind = self.kinds.get(channel)
        if kind is None:
            raise NotFoundError(f"'{channel}' is not a subscriber channel")
        if subscribed:  # back in only where the channel may deliver (a URL's checks)
            await self.channels[channel].check_address(address)
        found = await self.rows.set_subscribed(
            channel, kind, address, subscribed=subscribed, source=source, actor=actor
        )
        log.info(
            "%s: %s %s (%s)",
            channel,
            mask(address),
            "opted in" if subscribed else "opted out",
            source if found is not None else f"{source}, no such subscriber",
        )
        return found is not None

    async def subscribe_address(
        self,
        channel: str,
        address: str,
        *,
        language: str,
        components: Sequence[str] | None,
        source: str,
        actor: str,
    ) -> tuple[Subscriber, bool]:
        """A person subscribing themselves to one channel at an address of its kind (a
        Telegram user's /subscribe): added, or opted in again with this language and
        these components; (subscriber, created). Validated like any other subscriber."""
        kind = self.kinds.get(channel)
        if kind is None:
            raise NotFoundError(f"'{channel}' is not a subscriber channel")
        new = NewSubscriber.model_validate(
            {
                kind.field: address,
                "language": language,
                "components": list(components) if components is not None else None,
                "channels": [channel],
            }
        )
        normalised, _ = await self._check(new)
        reached = normalised.of(kind)
        assert reached is not None  # _check made sure the channel can reach them
        subscriber, created = await self.rows.subscribe_address(
            channel,
            kind,
            reached,
            language=language,
            components=components,
            source=source,
            actor=actor,
        )
        log.info(
            "%s: subscriber #%d (%s) %s (%s)",
            channel,
            subscriber.id,
            mask(reached),
            "added" if created else "opted in",
            source,
        )
        return subscriber, created


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    return delivery.model_dump(
        mode="json",
        include={"update_id", "incident_id", "channel", "state", "created_at", "updated_at"},
    )
