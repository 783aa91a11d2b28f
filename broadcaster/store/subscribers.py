"""Subscribers in the store: who they are, which channels they agreed to, and the batches
an update's fan-out reads them in."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broadcaster.errors import BroadcasterError, NotFoundError
from broadcaster.models import AddressKind, NewSubscriber, Subscriber
from broadcaster.store.store import Store
from broadcaster.store.tables import (
    AUDIT,
    DELIVERIES,
    SUBSCRIBERS,
    SUBSCRIPTIONS,
    address_column,
    utcnow,
)
from broadcaster.subscribers import Address

__all__ = ["Reachable", "SubscriberStore", "fanout_batch"]


@dataclass(frozen=True)
class Reachable:
    """A subscriber a fan-out delivers to: id, language, the components they follow, and
    their time zone (None: the configured one) for quiet hours."""

    id: int
    language: str
    components: list[str] | None
    timezone: str | None = None

    def follows(self, components: Collection[str]) -> bool:
        """True when the update touches a component they follow (or they follow all)."""
        return (
            self.components is None
            or not components
            or bool(set(self.components) & set(components))
        )


def fanout_batch(conn: Connection, channel: str, after: int, limit: int) -> list[Reachable]:
    """The next subscribed subscribers of a channel, by id, after `after`."""
    rows = conn.execute(
        select(
            SUBSCRIBERS.c.id,
            SUBSCRIBERS.c.language,
            SUBSCRIBERS.c.components,
            SUBSCRIBERS.c.timezone,
        )
        .join(SUBSCRIPTIONS, SUBSCRIPTIONS.c.subscriber_id == SUBSCRIBERS.c.id)
        .where(
            SUBSCRIPTIONS.c.channel == channel,
            SUBSCRIPTIONS.c.subscribed.is_(True),
            SUBSCRIPTIONS.c.subscriber_id > after,
        )
        .order_by(SUBSCRIPTIONS.c.subscriber_id)
        .limit(limit)
    ).all()
    return [
        Reachable(id=r.id, language=r.language, components=r.components, timezone=r.timezone)
        for r in rows
    ]


def _model(row: Any, channels: dict[str, bool]) -> Subscriber:
    return Subscriber(
        id=row.id,
        phone=row.phone,
        email=row.email,
        telegram=row.telegram,
        webhook_url=row.webhook_url,
        language=row.language,
        components=row.components,
        timezone=row.timezone,
        channels=channels,
        created_at=row.created_at,
    )


class SubscriberStore:
    """Subscriber operations over a store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(
        self,
        new: NewSubscriber,
        address: Address,
        channels: Sequence[str],
        *,
        source: str,
        replace: bool = False,
        actor: str | None = None,
    ) -> tuple[Subscriber, bool]:
        """Store a subscriber subscribed to `channels`; (subscriber, created). The same
        phone or email again is an error, or with `replace` an update of that subscriber
        (a CSV import run twice changes nothing). With `actor`, the audit trail records
        who added them (by id: never an address)."""

        def add(session: Session) -> tuple[Subscriber, bool]:
            conn = session.connection()
            now = utcnow()
            subscriber_id, created = _store(conn, new, address, channels, source, replace, now)
            if actor is not None:
                action = "subscriber.add" if created else "subscriber.update"
                _audit(conn, actor, action, {"subscriber": subscriber_id}, now=now)
            return _get(conn, subscriber_id), created

        try:
            return await self.store.write_session(add)
        except IntegrityError:  # a concurrent add of the same address
            raise BroadcasterError("already a subscriber") from None

    async def add_many(
        self, rows: Sequence[tuple[NewSubscriber, Address, Sequence[str]]], *, source: str
    ) -> list[bool | str]:
        """Add or update many subscribers (a CSV import) in one transaction: for each
        row, whether it was created, or why it was refused (the other rows still go in)."""

        def add(session: Session) -> list[bool | str]:
            conn = session.connection()
            now = utcnow()
            results: list[bool | str] = []
            for new, address, channels in rows:
                try:
                    with conn.begin_nested():  # a refused row leaves the others in
                        _, created = _store(conn, new, address, channels, source, True, now)
                    results.append(created)
                except (BroadcasterError, IntegrityError) as exc:
                    reason = (
                        str(exc) if isinstance(exc, BroadcasterError) else "already a subscriber"
                    )
                    results.append(reason)
            return results

        return await self.store.write_session(add)

    async def reach(
        self, channel: str, touched: Collection[str], *, batch: int = 10_000
    ) -> dict[str, int]:
        """Subscribed subscribers of a channel who follow a touched component, counted
        by their language; read in batches (a million subscribers never sit in memory)."""
        counts: dict[str, int] = {}
        after = 0

        def read(session: Session) -> list[Reachable]:
            return fanout_batch(session.connection(), channel, after, batch)

        while True:
            page = await self.store.read_session(read)
            for subscriber in page:
                if subscriber.follows(touched):
                    counts[subscriber.language] = counts.get(subscriber.language, 0) + 1
            if len(page) < batch:
                return counts
            after = page[-1].id

    async def get(self, subscriber_id: int) -> Subscriber:
        return await self.store.read_session(lambda s: _get(s.connection(), subscriber_id))

    async def list(
        self, *, channel: str | None = None, after: int = 0, limit: int = 100
    ) -> list[Subscriber]:
        """A page of subscribers by id (of one channel's subscribed ones, if given)."""

        def page(session: Session) -> list[Subscriber]:
            conn = session.connection()
            query = select(SUBSCRIBERS).where(SUBSCRIBERS.c.id > after)
            if channel is not None:
                query = query.join(
                    SUBSCRIPTIONS, SUBSCRIPTIONS.c.subscriber_id == SUBSCRIBERS.c.id
                ).where(SUBSCRIPTIONS.c.channel == channel, SUBSCRIPTIONS.c.subscribed.is_(True))
            rows = conn.execute(query.order_by(SUBSCRIBERS.c.id).limit(limit)).all()
            consents = _consents(conn, [r.id for r in rows])
            return [_model(r, consents.get(r.id, {})) for r in rows]

        return await self.store.read_session(page)

    async def count(self) -> int:
        return await self.store.read_session(
            lambda s: int(s.connection().scalar(select(func.count()).select_from(SUBSCRIBERS)) or 0)
        )

    async def erase(self, subscriber_id: int, *, actor: str | None = None) -> Subscriber:
        """Remove a subscriber and what could identify them: the row, their consents, and
        provider error texts of their deliveries (which may quote the address). Their
        delivery rows stay (counts and receipts), naming an id that no longer exists.
        With `actor`, the audit trail records who erased subscriber #id."""

        def erase(session: Session) -> Subscriber:
            conn = session.connection()
            erased = _get(conn, subscriber_id)
            recipient = str(subscriber_id)
            conn.execute(
                update(DELIVERIES)
                .where(
                    DELIVERIES.c.recipient == recipient,
                    DELIVERIES.c.channel.in_(list(erased.channels)),
                    DELIVERIES.c.last_error.is_not(None),
                )
                .values(last_error="(erased)")
            )
            conn.execute(
                delete(SUBSCRIPTIONS).where(SUBSCRIPTIONS.c.subscriber_id == subscriber_id)
            )
            conn.execute(delete(SUBSCRIBERS).where(SUBSCRIBERS.c.id == subscriber_id))
            # What they wrote to us (SMS replies forwarded to the team) goes with them.
            conn.execute(
                delete(AUDIT).where(
                    AUDIT.c.action == "inbound.reply",
                    AUDIT.c.detail["subscriber"].as_integer() == subscriber_id,
                )
            )
            if actor is not None:
                _audit(conn, actor, "subscriber.erase", {"subscriber": subscriber_id})
            return erased

        return await self.store.write_session(erase)

    async def set_subscribed(
        self,
        channel: str,
        kind: AddressKind,
        address: str,
        *,
        subscribed: bool,
        source: str,
        actor: str | None = None,
    ) -> int | None:
        """Opt the subscriber with this address in or out of a channel (STOP/START,
        unsubscribe links); their id, or None when nobody has that address. With
        `actor`, the audit trail records the change (by id: never the address)."""
        column = address_column(kind)

        def change(session: Session) -> int | None:
            conn = session.connection()
            found = conn.scalar(select(SUBSCRIBERS.c.id).where(column == address))
            if found is not None:
                now = utcnow()
                _subscribe(conn, found, [channel], subscribed=subscribed, source=source, now=now)
                if actor is not None:
                    action = "subscriber.opt_in" if subscribed else "subscriber.opt_out"
                    detail = {"subscriber": found, "channel": channel}
                    _audit(conn, actor, action, detail, now=now)
            return found

        return await self.store.write_session(change)

    async def subscribe_address(
        self,
        channel: str,
        kind: AddressKind,
        address: str,
        *,
        language: str,
        components: Sequence[str] | None,
        source: str,
        actor: str,
    ) -> tuple[Subscriber, bool]:
        """A person asking for a channel's updates at this address themselves (Telegram
        /subscribe): a new subscriber, or the one with that address given this language
        and these components and opted in again (their own request ends an opt-out);
        (subscriber, created). Audited by id, never by address."""
        column = address_column(kind)

        def subscribe(session: Session) -> tuple[Subscriber, bool]:
            conn = session.connection()
            now = utcnow()
            followed = list(components) if components is not None else None
            values = {"language": language, "components": followed}
            found = conn.scalar(select(SUBSCRIBERS.c.id).where(column == address))
            created = found is None
            if found is None:
                found = conn.execute(
                    insert(SUBSCRIBERS)
                    .values(**values, **{column.name: address}, created_at=now)
                    .returning(SUBSCRIBERS.c.id)
                ).scalar_one()
            else:
                conn.execute(
                    update(SUBSCRIBERS)
                    .where(SUBSCRIBERS.c.id == found)
                    .values(**values, updated_at=now)
                )
            subscriber_id = int(found)
            _subscribe(conn, subscriber_id, [channel], subscribed=True, source=source, now=now)
            detail = {"subscriber": subscriber_id, "channel": channel, "components": followed}
            action = "subscriber.add" if created else "subscriber.opt_in"
            _audit(conn, actor, action, detail, now=now)
            return _get(conn, subscriber_id), created

        try:
            return await self.store.write_session(subscribe)
        except IntegrityError:
            # The same person's /subscribe twice at once: the other one inserted them.
            return await self.store.write_session(subscribe)

    async def set_subscription(
        self,
        subscriber_id: int,
        channel: str,
        *,
        subscribed: bool,
        source: str,
        actor: str | None = None,
    ) -> Subscriber:
        """Opt one subscriber, by id, in or out of a channel; NotFoundError if there is
        no such subscriber."""

        def change(session: Session) -> Subscriber:
            conn = session.connection()
            _get(conn, subscriber_id)  # NotFoundError before anything is written
            now = utcnow()
            _subscribe(
                conn, subscriber_id, [channel], subscribed=subscribed, source=source, now=now
            )
            if actor is not None:
                action = "subscriber.opt_in" if subscribed else "subscriber.opt_out"
                detail = {"subscriber": subscriber_id, "channel": channel}
                _audit(conn, actor, action, detail, now=now)
            return _get(conn, subscriber_id)

        return await self.store.write_session(change)

    async def record(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        """An audit entry about subscribers (an import's counts): never an address."""
        await self.store.write_session(
            lambda session: _audit(session.connection(), actor, action, detail)
        )

    async def timezones(self) -> Sequence[str]:
        """Every time zone a subscriber set (for renders in their zone)."""
        column = SUBSCRIBERS.c.timezone
        return await self.store.read_session(
            lambda s: sorted(
                s.execute(select(column).where(column.is_not(None)).distinct()).scalars()
            )
        )

    async def addresses(
        self,
        channel: str,
        kind: AddressKind,
        subscriber_ids: Collection[int],
        *,
        subscribed_only: bool = True,
    ) -> dict[int, tuple[str, str | None]]:
        """The address and time zone of each of these subscribers (still subscribed to
        the channel, unless `subscribed_only` is off: deleting a post already sent to
        someone who left since)."""
        column = address_column(kind)
        if not subscriber_ids:
            return {}
        query = select(SUBSCRIBERS.c.id, column, SUBSCRIBERS.c.timezone).where(
            SUBSCRIBERS.c.id.in_(list(subscriber_ids)), column.is_not(None)
        )
        if subscribed_only:
            query = query.join(
                SUBSCRIPTIONS, SUBSCRIPTIONS.c.subscriber_id == SUBSCRIBERS.c.id
            ).where(SUBSCRIPTIONS.c.channel == channel, SUBSCRIPTIONS.c.subscribed.is_(True))
        async with self.store.engine.connect() as conn:  # a read: no write lock
            rows = (await conn.execute(query)).all()
        return {row[0]: (row[1], row[2]) for row in rows}


def _store(
    conn: Connection,
    new: NewSubscriber,
    address: Address,
    channels: Sequence[str],
    source: str,
    replace: bool,
    now: datetime,
) -> tuple[int, bool]:
    """Insert the subscriber (or, with `replace`, update the one with that address) and
    subscribe them to the channels they have no say about yet; (id, created)."""
    given = {kind: address.of(kind) for kind in AddressKind if address.of(kind)}
    values = {
        **{kind.field: value for kind, value in given.items()},
        "language": new.language,
        "components": new.components,
        "timezone": new.timezone,
    }
    same = [address_column(kind) == value for kind, value in given.items()]
    existing = conn.execute(select(SUBSCRIBERS.c.id).where(or_(*same))).all()
    if len(existing) > 1:
        raise BroadcasterError(
            "the addresses given belong to two different subscribers "
            f"(#{existing[0].id}, #{existing[1].id})"
        )
    if existing and not replace:
        raise BroadcasterError(f"already a subscriber (#{existing[0].id})")
    if existing:
        subscriber_id: int = existing[0].id
        conn.execute(
            update(SUBSCRIBERS)
            .where(SUBSCRIBERS.c.id == subscriber_id)
            .values(**values, updated_at=now)
        )
    else:
        subscriber_id = conn.execute(
            insert(SUBSCRIBERS).values(**values, created_at=now).returning(SUBSCRIBERS.c.id)
        ).scalar_one()
    if not existing:
        if channels:
            conn.execute(
                insert(SUBSCRIPTIONS),
                [
                    {
                        "subscriber_id": subscriber_id,
                        "channel": channel,
                        "subscribed": True,
                        "changed_at": now,
                        "source": source,
                    }
                    for channel in channels
                ],
            )
        return subscriber_id, True
    # Only channels they have no say about yet: an opt-out stands until they opt in
    # again themselves (an import run again must not undo a STOP).
    known = _consents(conn, [subscriber_id]).get(subscriber_id, {})
    fresh = [c for c in channels if c not in known]
    _subscribe(conn, subscriber_id, fresh, subscribed=True, source=source, now=now)
    return subscriber_id, False


def _get(conn: Connection, subscriber_id: int) -> Subscriber:
    row = conn.execute(select(SUBSCRIBERS).where(SUBSCRIBERS.c.id == subscriber_id)).one_or_none()
    if row is None:
        raise NotFoundError(f"no subscriber #{subscriber_id}")
    return _model(row, _consents(conn, [subscriber_id]).get(subscriber_id, {}))


def _audit(
    conn: Connection,
    actor: str,
    action: str,
    detail: dict[str, Any],
    *,
    now: datetime | None = None,
) -> None:
    """An audit entry that belongs to no incident."""
    conn.execute(
        insert(AUDIT).values(
            at=now or utcnow(),
            actor=actor,
            action=action,
            incident_id=None,
            update_id=None,
            detail=detail,
        )
    )


def _consents(conn: Connection, ids: Sequence[int]) -> dict[int, dict[str, bool]]:
    if not ids:
        return {}
    rows = conn.execute(
        select(
            SUBSCRIPTIONS.c.subscriber_id, SUBSCRIPTIONS.c.channel, SUBSCRIPTIONS.c.subscribed
        ).where(SUBSCRIPTIONS.c.subscriber_id.in_(list(ids)))
    ).all()
    consents: dict[int, dict[str, bool]] = {}
    for subscriber_id, channel, subscribed in rows:
        consents.setdefault(subscriber_id, {})[channel] = bool(subscribed)
    return consents


def _subscribe(
    conn: Connection,
    subscriber_id: int,
    channels: Sequence[str],
    *,
    subscribed: bool,
    source: str,
    now: datetime,
) -> None:
    for channel in channels:
        changed = conn.execute(
            update(SUBSCRIPTIONS)
            .where(
                SUBSCRIPTIONS.c.subscriber_id == subscriber_id, SUBSCRIPTIONS.c.channel == channel
            )
            .values(subscribed=subscribed, changed_at=now, source=source)
        )
        if changed.rowcount == 0:
            conn.execute(
                insert(SUBSCRIPTIONS).values(
                    subscriber_id=subscriber_id,
                    channel=channel,
                    subscribed=subscribed,
                    changed_at=now,
                    source=source,
                )
            )
