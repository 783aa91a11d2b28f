"""Self-service subscription in the store: pending sign-ups, the daily counts that cap
confirmation messages, and confirming or changing a subscription from the public pages.

Addresses live in `pending_subscriptions` only until the sign-up expires (or in
`subscribers` once confirmed); the counts name an address by a keyed hash, and the
audit trail names subscribers by id.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broadcaster.errors import BroadcasterError
from broadcaster.models import AddressKind, Subscriber
from broadcaster.store.store import Store
from broadcaster.store.subscribers import _get, _subscribe
from broadcaster.store.tables import (
    AUDIT,
    PENDING_SUBSCRIPTIONS,
    SELF_SERVICE_COUNTS,
    SUBSCRIBERS,
    address_column,
    utcnow,
)

__all__ = [
    "SMS_CODES_COUNT",
    "Confirmation",
    "LimitReached",
    "Pending",
    "SelfServiceStore",
]

ACTOR = "self-service"
# The name of the count of every SMS code sent (per UTC day).
SMS_CODES_COUNT = "sms-codes"


class LimitReached(BroadcasterError):
    """A daily cap refused a confirmation message: `which` is "address" or "sms"."""

    def __init__(self, which: Literal["address", "sms"]) -> None:
        super().__init__(f"daily limit reached: {which}")
        self.which = which


@dataclass(frozen=True)
class Pending:
    """A sign-up waiting for its confirmation."""

    id: int
    nonce: str
    kind: AddressKind
    address: str
    language: str
    components: list[str] | None
    expires_at: datetime


@dataclass(frozen=True)
class Confirmation:
    """What confirming a sign-up did.

    `outcome`: confirmed (now subscribed), used (confirmed before), wrong (code), locked
    (too many wrong codes), expired, missing (no such sign-up)."""

    outcome: Literal["confirmed", "used", "wrong", "locked", "expired", "missing"]
    subscriber_id: int | None = None
    kind: AddressKind | None = None
    attempts_left: int = 0
    language: str | None = None  # the sign-up's, for the page that answers


def _count(conn: Connection, name: str, day: date) -> int:
    """Add one to a daily count; the new value."""
    counts = SELF_SERVICE_COUNTS
    value = conn.execute(
        update(counts)
        .where(counts.c.name == name, counts.c.day == day)
        .values(count=counts.c.count + 1)
        .returning(counts.c.count)
    ).scalar_one_or_none()
    if value is None:
        conn.execute(insert(counts).values(name=name, day=day, count=1))
        return 1
    return int(value)


def _audit(conn: Connection, action: str, detail: dict[str, Any], now: datetime) -> None:
    conn.execute(
        insert(AUDIT).values(
            at=now, actor=ACTOR, action=action, incident_id=None, update_id=None, detail=detail
        )
    )


class SelfServiceStore:
    """The store side of the subscribe form and the manage page."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _write(self, work: Any) -> Any:
        try:
            return await self.store.write_session(work)
        except IntegrityError:
            # Two first counts of the same day at once (PostgreSQL): the other one's row
            # is there now, so the second try updates it.
            return await self.store.write_session(work)

    async def reserve(
        self,
        *,
        kind: AddressKind,
        address: str,
        address_key: str,
        nonce: str,
        language: str,
        components: list[str] | None,
        code_hash: str | None,
        lifetime: timedelta,
        per_address: int,
        sms_cap: int | None,
    ) -> Pending:
        """Count one confirmation message to `address` (and, with `sms_cap`, one SMS
        code) and store the sign-up, in one transaction; LimitReached, with nothing
        stored or counted, when a count would pass its cap."""

        def reserve(session: Session) -> Pending:
            conn = session.connection()
            now = utcnow()
            today = now.date()
            # Old counts and expired sign-ups go as new ones come: nothing else to run.
            conn.execute(delete(SELF_SERVICE_COUNTS).where(SELF_SERVICE_COUNTS.c.day < today))
            conn.execute(
                delete(PENDING_SUBSCRIPTIONS).where(PENDING_SUBSCRIPTIONS.c.expires_at < now)
            )
            if _count(conn, f"address:{address_key}", today) > per_address:
                raise LimitReached("address")
            if sms_cap is not None and _count(conn, SMS_CODES_COUNT, today) > sms_cap:
                raise LimitReached("sms")
            expires_at = now + lifetime
            pending_id = conn.execute(
                insert(PENDING_SUBSCRIPTIONS)
                .values(
                    nonce=nonce,
                    kind=kind.value,
                    address=address,
                    language=language,
                    components=components,
                    code_hash=code_hash,
                    attempts=0,
                    created_at=now,
                    expires_at=expires_at,
                )
                .returning(PENDING_SUBSCRIPTIONS.c.id)
            ).scalar_one()
            return Pending(
                id=pending_id,
                nonce=nonce,
                kind=kind,
                address=address,
                language=language,
                components=components,
                expires_at=expires_at,
            )

        pending: Pending = await self._write(reserve)
        return pending

    async def forget(self, pending_id: int) -> None:
        """Drop a sign-up whose confirmation message could not be sent."""
        await self.store.write_session(
            lambda session: session.connection().execute(
                delete(PENDING_SUBSCRIPTIONS).where(PENDING_SUBSCRIPTIONS.c.id == pending_id)
            )
        )

    async def count(self, name: str, day: date) -> int:
        """A daily count as it stands (0 when nothing was counted)."""

        def read(session: Session) -> int:
            counts = SELF_SERVICE_COUNTS
            value = session.connection().scalar(
                select(counts.c.count).where(counts.c.name == name, counts.c.day == day)
            )
            return int(value or 0)

        return await self.store.read_session(read)

    async def confirm(
        self,
        pending_id: int,
        nonce: str,
        channels: Mapping[AddressKind, Sequence[str]],
        *,
        code_hash: str | None = None,
        max_attempts: int = 5,
    ) -> Confirmation:
        """Make a pending sign-up a subscription, once: the address's subscriber (new, or
        the one who has it) takes the sign-up's language and components and is opted in
        to the subscriber channels of its kind. With `code_hash` (SMS), only when it
        matches the code sent; each wrong code counts, and `max_attempts` lock it."""

        def confirm(session: Session) -> Confirmation:
            conn = session.connection()
            now = utcnow()
            table = PENDING_SUBSCRIPTIONS
            # Expired sign-ups (and their addresses) go at each confirmation as at each
            # sign-up: kept no longer than they can be used, however quiet the form is.
            conn.execute(delete(table).where(table.c.expires_at < now, table.c.id != pending_id))
            row = conn.execute(
                select(table).where(table.c.id == pending_id, table.c.nonce == nonce)
            ).one_or_none()
            if row is None:
                return Confirmation("missing")
            kind, language = AddressKind(row.kind), row.language
            column = address_column(kind)
            if row.confirmed_at is not None:
                found = conn.scalar(select(SUBSCRIBERS.c.id).where(column == row.address))
                return Confirmation("used", subscriber_id=found, kind=kind, language=language)
            if row.expires_at < now:
                return Confirmation("expired", kind=kind, language=language)
            if code_hash is not None:
                if row.attempts >= max_attempts or row.code_hash is None:
                    return Confirmation("locked", kind=kind, language=language)
                if not hmac.compare_digest(row.code_hash, code_hash):
                    attempts = row.attempts + 1
                    conn.execute(
                        update(table).where(table.c.id == row.id).values(attempts=attempts)
                    )
                    left = max_attempts - attempts
                    return Confirmation(
                        "wrong" if left else "locked",
                        kind=kind,
                        attempts_left=left,
                        language=language,
                    )
            subscriber_id = conn.scalar(select(SUBSCRIBERS.c.id).where(column == row.address))
            values = {"language": row.language, "components": row.components}
            if subscriber_id is None:
                subscriber_id = conn.execute(
                    insert(SUBSCRIBERS)
                    .values(**values, **{column.name: row.address}, created_at=now)
                    .returning(SUBSCRIBERS.c.id)
                ).scalar_one()
            else:
                conn.execute(
                    update(SUBSCRIBERS)
                    .where(SUBSCRIBERS.c.id == subscriber_id)
                    .values(**values, updated_at=now)
                )
            names = list(channels.get(kind, ()))
            # Their own confirmed request: an earlier opt-out of these channels ends here.
            _subscribe(conn, subscriber_id, names, subscribed=True, source=ACTOR, now=now)
            conn.execute(update(table).where(table.c.id == row.id).values(confirmed_at=now))
            _audit(
                conn,
                "subscriber.confirm",
                {"subscriber": subscriber_id, "channels": names},
                now,
            )
            return Confirmation(
                "confirmed", subscriber_id=subscriber_id, kind=kind, language=language
            )

        confirmation: Confirmation = await self._write(confirm)
        return confirmation

    async def change(
        self,
        subscriber_id: int,
        *,
        language: str,
        components: list[str] | None,
        consents: Mapping[str, bool],
    ) -> Subscriber:
        """What a subscriber chose on their manage page: language, components, and each
        channel they are opted in or out of; NotFoundError if they are gone."""

        def change(session: Session) -> Subscriber:
            conn = session.connection()
            now = utcnow()
            before = _get(conn, subscriber_id)
            conn.execute(
                update(SUBSCRIBERS)
                .where(SUBSCRIBERS.c.id == subscriber_id)
                .values(language=language, components=components, updated_at=now)
            )
            changed = {
                channel: subscribed
                for channel, subscribed in consents.items()
                if before.channels.get(channel) != subscribed
            }
            for channel, subscribed in changed.items():
                _subscribe(
                    conn, subscriber_id, [channel], subscribed=subscribed, source=ACTOR, now=now
                )
            _audit(
                conn,
                "subscriber.manage",
                {"subscriber": subscriber_id, "channels": changed},
                now,
            )
            return _get(conn, subscriber_id)

        subscriber: Subscriber = await self.store.write_session(change)
        return subscriber
