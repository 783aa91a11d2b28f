"""The deliveries table seen as a queue: claim, settle, resume, leases, channel health."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from broadcaster.models import PENDING_STATES, DeliveryState, PostRef, Thread
from broadcaster.store.engine import is_sqlite
from broadcaster.store.store import Store
from broadcaster.store.tables import ChannelHealthRow, DeliveryRow, LeaseRow, utcnow

_PENDING = [s.value for s in PENDING_STATES]


@dataclass(frozen=True)
class Claimed:
    """A delivery this process is now sending (state `sending`, leased)."""

    id: int
    update_id: int
    incident_id: int
    channel: str
    recipient: str
    language: str | None
    delivery_key: str
    thread_key: str
    attempts: int
    deadline_at: datetime


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed delivery, to be written back in a batch."""

    id: int
    state: DeliveryState
    attempts: int
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    provider_id: str | None = None
    permalink: str | None = None
    provider_data: dict[str, str] | None = None
    sent_at: datetime | None = None


def new_holder_id() -> str:
    """host:pid:random — lets a process on the same host see that a holder died."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_dead(holder: str) -> bool:
    """True when the holder ran on this host and its process is gone (killed, crashed)."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class DeliveryQueue:
    """Queue operations over the store's deliveries."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def claim(self, channel: str, limit: int, lease_seconds: float) -> list[Claimed]:
        """Take up to `limit` due deliveries of a channel, oldest update first.

        A delivery waits while an earlier delivery of its thread (same incident, channel
        and recipient) is still pending, so follow-ups never overtake the first post.
        """
        if limit <= 0:
            return []
        now = utcnow()
        candidate = aliased(DeliveryRow)
        earlier = aliased(DeliveryRow)
        blocked = (
            select(earlier.id)
            .where(
                earlier.thread_key == candidate.thread_key,
                earlier.seq < candidate.seq,
                earlier.state.in_(_PENDING),
            )
            .correlate(candidate)
            .exists()
        )
        ids = (
            select(candidate.id)
            .where(
                candidate.channel == channel,
                candidate.state == DeliveryState.QUEUED.value,
                candidate.next_attempt_at <= now,
                ~blocked,
            )
            .order_by(candidate.seq, candidate.id)
            .limit(limit)
        )
        if not is_sqlite(self.store.url):
            ids = ids.with_for_update(skip_locked=True, of=candidate)
        statement = (
            update(DeliveryRow)
            .where(DeliveryRow.id.in_(ids.scalar_subquery()))
            .values(
                state=DeliveryState.SENDING.value,
                attempts=DeliveryRow.attempts + 1,
                lease_until=now + timedelta(seconds=lease_seconds),
                updated_at=now,
            )
            .returning(
                DeliveryRow.id,
                DeliveryRow.update_id,
                DeliveryRow.incident_id,
                DeliveryRow.channel,
                DeliveryRow.recipient,
                DeliveryRow.language,
                DeliveryRow.delivery_key,
                DeliveryRow.thread_key,
                DeliveryRow.attempts,
                DeliveryRow.deadline_at,
            )
        )
        async with self.store.transaction() as session:
            rows = (await session.execute(statement)).all()
        claimed = [Claimed(**row._mapping) for row in rows]
        claimed.sort(key=lambda c: c.id)
        return claimed

    async def threads(self, thread_keys: Sequence[str]) -> dict[str, Thread]:
        """For each thread that has posts already: its first post and its latest one."""
        if not thread_keys:
            return {}
        async with self.store.sessions() as session:
            rows = (
                await session.execute(
                    select(
                        DeliveryRow.thread_key, DeliveryRow.provider_id, DeliveryRow.provider_data
                    )
                    .where(
                        DeliveryRow.thread_key.in_(set(thread_keys)),
                        DeliveryRow.provider_id.is_not(None),
                    )
                    .order_by(DeliveryRow.seq)
                )
            ).all()
        posts: dict[str, list[PostRef]] = {}
        for key, provider_id, data in rows:
            posts.setdefault(key, []).append(PostRef(provider_id=provider_id, data=data or {}))
        return {key: Thread(root=refs[0], parent=refs[-1]) for key, refs in posts.items()}

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Write a batch of outcomes in one transaction."""
        if not outcomes:
            return
        now = utcnow()
        params: list[dict[str, Any]] = [
            {
                "id": o.id,
                "state": o.state.value,
                "attempts": o.attempts,
                "last_error": o.last_error,
                "next_attempt_at": o.next_attempt_at,
                "lease_until": None,
                "provider_id": o.provider_id,
                "permalink": o.permalink,
                "provider_data": o.provider_data,
                "sent_at": o.sent_at,
                "updated_at": now,
            }
            for o in outcomes
        ]
        async with self.store.transaction() as session:
            await session.execute(update(DeliveryRow), params)

    async def resume_sending(self, *, everything: bool) -> int:
        """Queue again deliveries left `sending` by a process that died.

        `everything`: this process alone dispatches (it holds the dispatcher lease), so any
        `sending` row is an orphan; otherwise only rows whose lease expired.
        """
        now = utcnow()
        conditions: list[Any] = [DeliveryRow.state == DeliveryState.SENDING.value]
        if not everything:
            conditions.append(DeliveryRow.lease_until < now)
        async with self.store.transaction() as session:
            result = await session.execute(
                update(DeliveryRow)
                .where(*conditions)
                .values(
                    state=DeliveryState.QUEUED.value,
                    lease_until=None,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )
        resumed: int = result.rowcount  # type: ignore[attr-defined]
        return resumed

    async def next_due(self, channels: Sequence[str]) -> datetime | None:
        """When the earliest queued delivery of these channels becomes due."""
        async with self.store.sessions() as session:
            due: datetime | None = await session.scalar(
                select(func.min(DeliveryRow.next_attempt_at)).where(
                    DeliveryRow.channel.in_(channels),
                    DeliveryRow.state == DeliveryState.QUEUED.value,
                )
            )
        return due

    async def pending_count(
        self, *, update_ids: Sequence[int] | None = None, channels: Sequence[str] | None = None
    ) -> int:
        query = select(func.count()).where(DeliveryRow.state.in_(_PENDING))
        if update_ids is not None:
            query = query.where(DeliveryRow.update_id.in_(update_ids))
        if channels is not None:
            query = query.where(DeliveryRow.channel.in_(channels))
        async with self.store.sessions() as session:
            return int(await session.scalar(query) or 0)

    # -- leases -------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        """Take or renew a named lease; True when `holder` has it now."""
        now = utcnow()
        try:
            async with self.store.transaction() as session:
                row = await session.get(LeaseRow, name, with_for_update=True)
                if row is None:
                    session.add(
                        LeaseRow(
                            name=name,
                            holder=holder,
                            expires_at=now + timedelta(seconds=ttl_seconds),
                        )
                    )
                    return True
                if row.holder != holder and row.expires_at > now and not holder_is_dead(row.holder):
                    return False
                row.holder = holder
                row.expires_at = now + timedelta(seconds=ttl_seconds)
                return True
        except IntegrityError:
            return False

    async def release_lease(self, name: str, holder: str) -> None:
        async with self.store.transaction() as session:
            row = await session.get(LeaseRow, name)
            if row is not None and row.holder == holder:
                await session.delete(row)

    async def lease_holder(self, name: str) -> str | None:
        """Who holds the lease now, if anyone alive does."""
        async with self.store.sessions() as session:
            row = await session.get(LeaseRow, name)
        if row is None or row.expires_at <= utcnow() or holder_is_dead(row.holder):
            return None
        return row.holder

    # -- channel health -----------------------------------------------------------

    async def mark_broken(self, channel: str, reason: str) -> None:
        now = utcnow()
        async with self.store.transaction() as session:
            row = await session.get(ChannelHealthRow, channel)
            if row is None:
                session.add(ChannelHealthRow(channel=channel, broken_reason=reason, broken_at=now))
            else:
                row.broken_reason = reason
                row.broken_at = now

    async def is_broken(self, channel: str) -> bool:
        async with self.store.sessions() as session:
            row = await session.get(ChannelHealthRow, channel)
        return row is not None and row.broken_reason is not None

    async def mark_healthy(self, channels: Sequence[str]) -> None:
        async with self.store.transaction() as session:
            await session.execute(
                update(ChannelHealthRow)
                .where(ChannelHealthRow.channel.in_(channels))
                .values(broken_reason=None, broken_at=None)
            )
