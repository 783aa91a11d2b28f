"""The deliveries table as the procrastinate backend uses it (PostgreSQL only).

Each queued delivery is handed to one deliver job, named in `deliveries.job_id` in the
transaction that defers the job; the job takes back only its own deliveries. A job run
again after its worker died therefore re-sends at most what it had in flight, and two
jobs never send one delivery.

`RateLog` keeps the send times reserved under shared rate limits, so a limit holds for
every worker on every node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import (
    ColumnElement,
    Connection,
    Text,
    cast,
    column,
    delete,
    func,
    insert,
    select,
    table,
    text,
    tuple_,
    update,
)

from broadcaster.models import DeliveryState
from broadcaster.store.queue import due_unblocked
from broadcaster.store.store import Claimed
from broadcaster.store.tables import DELIVERIES, RATE_RESERVATIONS, utcnow

if TYPE_CHECKING:
    from broadcaster.store.store import Store

# procrastinate's own table, read to know whether a delivery's job will still run.
_JOBS = table("procrastinate_jobs", column("id"), column("status"))
_LIVE_JOB = ("todo", "doing")
_QUEUED = DeliveryState.QUEUED.value
_SENDING = DeliveryState.SENDING.value
# Defers one deliver job per batch of delivery ids, on the transaction's connection;
# returns the jobs' ids in the same order.
DeferBatches = Callable[[Connection, str, list[list[int]]], list[int]]


class JobDeliveries:
    """Hands deliveries to deliver jobs, and lets each job take its own."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def assign(
        self,
        channel: str,
        *,
        batch: int,
        limit: int,
        defer: DeferBatches,
        recover: bool = False,
    ) -> int:
        """Give up to `limit` due deliveries of `channel` that no job has to new deliver
        jobs of `batch` each, in one transaction; how many were given. With `recover`,
        also those whose job will not run again (it failed for good, or was deleted):
        that looks through every queued delivery of the channel, so only the minute's
        sweep asks for it."""

        def work(conn: Connection) -> int:
            candidate = DELIVERIES.alias("candidate")
            unassigned: ColumnElement[bool] = candidate.c.job_id.is_(None)
            if recover:
                owner_alive = (
                    select(_JOBS.c.id)
                    .where(
                        _JOBS.c.id == candidate.c.job_id,
                        cast(_JOBS.c.status, Text).in_(_LIVE_JOB),
                    )
                    .exists()
                )
                unassigned = unassigned | ~owner_alive
            ids = list(
                conn.scalars(
                    select(candidate.c.id)
                    .where(
                        candidate.c.channel == channel,
                        unassigned,
                        due_unblocked(candidate, utcnow()),
                    )
                    .order_by(candidate.c.seq, candidate.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True, of=candidate)
                )
            )
            if not ids:
                return 0
            batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
            job_ids = defer(conn, channel, batches)
            owners = [job for job, ids in zip(job_ids, batches, strict=True) for _ in ids]
            conn.execute(
                text(
                    "UPDATE deliveries SET job_id = owned.job FROM "
                    "(SELECT unnest(CAST(:ids AS bigint[])) AS id, "
                    "unnest(CAST(:jobs AS bigint[])) AS job) AS owned "
                    "WHERE deliveries.id = owned.id"
                ),
                {"ids": [i for b in batches for i in b], "jobs": owners},
            )
            return len(ids)

        return await self.store.write_connection(work)

    async def release(self, job_id: int) -> int:
        """The job's queued deliveries no longer belong to it (its channel is broken):
        they wait without a job, to be handed out when the channel works again."""
        table = DELIVERIES

        def work(conn: Connection) -> int:
            result = conn.execute(
                update(table)
                .where(table.c.job_id == job_id, table.c.state == _QUEUED)
                .values(job_id=None)
            )
            return int(result.rowcount)

        return await self.store.write_connection(work)

    async def requeue_orphans(self, channel: str) -> int:
        """Deliveries left `sending` by a job that will not run again (it failed for
        good, or was deleted by hand) go back to the queue; how many."""
        table = DELIVERIES
        owner_alive = (
            select(_JOBS.c.id)
            .where(_JOBS.c.id == table.c.job_id, cast(_JOBS.c.status, Text).in_(_LIVE_JOB))
            .exists()
        )

        def work(conn: Connection) -> int:
            result = conn.execute(
                update(table)
                .where(table.c.channel == channel, table.c.state == _SENDING, ~owner_alive)
                .values(state=_QUEUED, job_id=None, lease_until=None, updated_at=utcnow())
            )
            return int(result.rowcount)

        return await self.store.write_connection(work)

    async def next_due(self, channel: str) -> datetime | None:
        """When the earliest queued delivery of `channel` that no job has comes due
        (held by quiet hours, or handed back), if later than now."""
        async with self.store.sessions() as session:
            found: datetime | None = await session.scalar(
                select(func.min(DELIVERIES.c.next_attempt_at)).where(
                    DELIVERIES.c.channel == channel,
                    DELIVERIES.c.state == _QUEUED,
                    DELIVERIES.c.job_id.is_(None),  # a job's own come due with its retry
                    DELIVERIES.c.next_attempt_at > utcnow(),
                )
            )
        return found

    async def take(
        self, job_id: int, ids: Sequence[int], *, limit: int, lease_seconds: float
    ) -> list[Claimed]:
        """Up to `limit` of the job's deliveries that are due, now `sending`: queued ones,
        and those it had in flight when its worker died (only it may send them). Taken a
        few at a time, so that what is superseded or cancelled meanwhile is not sent."""
        now = utcnow()
        table = DELIVERIES
        mine = (
            select(table.c.id)
            .where(
                table.c.job_id == job_id,
                table.c.id.in_(list(ids)),
                (table.c.state == _SENDING)
                | (
                    (table.c.state == _QUEUED)
                    & (table.c.next_attempt_at.is_(None) | (table.c.next_attempt_at <= now))
                ),
            )
            .order_by(table.c.seq, table.c.id)
            .limit(limit)
            # Locked and checked again: one cancelled or superseded meanwhile is left.
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(table)
            .where(table.c.id.in_(mine.scalar_subquery()))
            .values(
                state=_SENDING,
                attempts=table.c.attempts + 1,
                lease_until=now + timedelta(seconds=lease_seconds),
                updated_at=now,
            )
            .returning(*(table.c[f.name] for f in fields(Claimed)))
        )
        rows = await self.store.write_connection(lambda conn: conn.execute(statement).all())
        return sorted((Claimed(*row) for row in rows), key=lambda c: c.id)

    async def followups_waiting(self, channel: str, threads: set[tuple[int, str]]) -> bool:
        """Whether a delivery no job has yet waits behind one of these threads (incident,
        recipient) of `channel`: their posts just settled, so it may go now."""
        if not threads:
            return False
        async with self.store.sessions() as session:
            found = await session.scalar(
                select(
                    select(DELIVERIES.c.id)
                    .where(
                        tuple_(DELIVERIES.c.incident_id, DELIVERIES.c.recipient).in_(list(threads)),
                        DELIVERIES.c.channel == channel,
                        DELIVERIES.c.state == _QUEUED,
                        DELIVERIES.c.job_id.is_(None),
                    )
                    .exists()
                )
            )
        return bool(found)

    async def still_queued(self, job_id: int) -> datetime | None:
        """When the job's earliest delivery still queued is due (None: none is left)."""
        async with self.store.sessions() as session:
            row = (
                await session.execute(
                    select(
                        func.count(),
                        func.min(func.coalesce(DELIVERIES.c.next_attempt_at, utcnow())),
                    ).where(DELIVERIES.c.job_id == job_id, DELIVERIES.c.state == _QUEUED)
                )
            ).one()
        return row[1] if row[0] else None


class RateLog:
    """Send times reserved under rate limits shared by every worker on the store.

    A limit of `count` messages per `window` seconds holds in every window, not only in
    aligned ones: a new reservation comes at least `window` after the `count`-th latest
    one. Reservations on one key are serialised by a transaction-scoped advisory lock.
    """

    def __init__(self, store: Store, *, headroom: float = 0.1) -> None:
        """`headroom`: a fraction of the window kept free, so that a message delayed on
        its way never makes the provider count one too many in its window."""
        self.store = store
        self.headroom = headroom

    async def reserve(self, key: str, count: int, window_seconds: float) -> tuple[int, float]:
        """A reservation under `key`'s limit: its id (for `sent`), and the seconds to
        wait before its message may go out.

        Times are the database's clock, so the nodes' clocks need not agree."""
        spacing = timedelta(seconds=window_seconds * (1 + self.headroom))

        def work(conn: Connection) -> tuple[int, float]:
            # A reservation lost in a database crash only lets one message more through.
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 0))))
            now: datetime = conn.scalar(select(func.clock_timestamp()))  # type: ignore[assignment]
            latest = list(
                conn.scalars(
                    select(RATE_RESERVATIONS.c.at)
                    .where(RATE_RESERVATIONS.c.key == key)
                    .order_by(RATE_RESERVATIONS.c.at.desc())
                    .limit(count)
                )
            )
            at = now
            if len(latest) == count:
                at = max(now, latest[-1] + spacing)
            reservation = conn.execute(
                insert(RATE_RESERVATIONS).values(key=key, at=at).returning(RATE_RESERVATIONS.c.id)
            ).scalar_one()
            # What can no longer bound a new reservation is forgotten as we go.
            conn.execute(
                delete(RATE_RESERVATIONS).where(
                    RATE_RESERVATIONS.c.key == key, RATE_RESERVATIONS.c.at < now - 2 * spacing
                )
            )
            return reservation, (at - now).total_seconds()

        return await self.store.write_connection(work)

    async def sent(self, reservations: list[int]) -> None:
        """These reservations' messages have gone (or failed): each takes the time it
        ended, when the provider had surely seen it, if later than the time reserved."""
        if not reservations:
            return

        def work(conn: Connection) -> None:
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            conn.execute(
                update(RATE_RESERVATIONS)
                .where(RATE_RESERVATIONS.c.id.in_(reservations))
                .values(at=func.greatest(RATE_RESERVATIONS.c.at, func.clock_timestamp()))
            )

        await self.store.write_connection(work)

    async def forget(self, older_than: timedelta) -> int:
        """Delete reservations older than that under any key (keys used once, such as
        one recipient's, are otherwise never looked at again)."""

        def work(conn: Connection) -> int:
            result = conn.execute(
                delete(RATE_RESERVATIONS).where(
                    RATE_RESERVATIONS.c.at < func.clock_timestamp() - older_than
                )
            )
            return int(result.rowcount)

        return await self.store.write_connection(work)
