"""The deliveries table seen as a queue: claim, settle, resume, leases, channel health;
subscriber fan-outs (quiet hours included) and re-routes to a fallback channel."""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    Connection,
    Integer,
    and_,
    bindparam,
    cast,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broadcaster.models import (
    FAILED_STATES,
    PENDING_STATES,
    SUCCESS_STATES,
    AddressKind,
    DeliveryAction,
    DeliveryState,
    Impact,
    PostRef,
    Thread,
)
from broadcaster.store.engine import is_sqlite
from broadcaster.store.store import Claimed, Store, delivery_key
from broadcaster.store.subscribers import fanout_batch
from broadcaster.store.tables import (
    AUDIT,
    DELIVERIES,
    FANOUTS,
    RENDERS,
    SUBSCRIBERS,
    SUBSCRIPTIONS,
    UPDATES,
    ChannelHealthRow,
    DeliveryRow,
    LeaseRow,
    UtcDateTime,
    address_column,
    utcnow,
)

_PENDING = [s.value for s in PENDING_STATES]


@dataclass(frozen=True)
class Reroute:
    """Where a subscriber channel's deliveries go when they cannot go out on it: its
    fallback channel (`ChannelConfig.fallback`), and the address that one delivers to."""

    source: str
    fallback: str
    kind: AddressKind


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed delivery, to be written back in a batch."""

    id: int
    state: DeliveryState
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    provider_id: str | None = None
    permalink: str | None = None
    provider_data: dict[str, str] | None = None
    uncount_attempt: bool = False  # the try was not the recipient's (channel broken)
    # Hand the delivery to this fallback once the outcome is written (a permanent failure,
    # or the channel broken), when its subscriber can be reached there.
    reroute: Reroute | None = None

    @property
    def has_receipt(self) -> bool:
        return bool(self.provider_id or self.permalink or self.provider_data)


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


_DELIVERIES = DELIVERIES

# Built once: the dispatcher runs these for every batch, and building them costs more
# than running them.
_SETTLE_RECEIPT = (
    update(_DELIVERIES)
    .where(_DELIVERIES.c.id == bindparam("b_id"))
    .values(
        state=bindparam("b_state"),
        provider_id=bindparam("b_provider_id"),
        permalink=bindparam("b_permalink"),
        provider_data=bindparam("b_provider_data"),
        lease_until=None,
        sent_at=bindparam("b_now", type_=UtcDateTime()),
        updated_at=bindparam("b_now", type_=UtcDateTime()),
    )
)
_SUCCESS = SUCCESS_STATES
_SUCCESS_VALUES = [s.value for s in SUCCESS_STATES]


@dataclass(frozen=True)
class Target:
    """The post an edit or delete changes: where its delivery is, and its provider id."""

    state: DeliveryState
    provider_id: str | None


def due_unblocked(candidate: Any, now: Any) -> Any:
    """Queued deliveries that are due at `now` and not waiting for an earlier delivery of
    their thread (same incident, channel and recipient): follow-ups never overtake the
    first post."""
    earlier = _DELIVERIES.alias("earlier")
    blocked = (
        select(earlier.c.id)
        .where(
            earlier.c.incident_id == candidate.c.incident_id,
            earlier.c.channel == candidate.c.channel,
            earlier.c.recipient == candidate.c.recipient,
            earlier.c.seq < candidate.c.seq,
            earlier.c.state.in_(_PENDING),
        )
        .correlate(candidate)
        # OFFSET 0 keeps PostgreSQL from turning this into an anti join: planned without
        # statistics on queued deliveries (a big fan-out on a table at rest), that join
        # scanned every delivery of the incident per candidate; as a subplan it is one
        # probe of ix_deliveries_thread per candidate, whatever the statistics say.
        .offset(0)
        .exists()
    )
    return and_(
        candidate.c.state == DeliveryState.QUEUED.value,
        or_(candidate.c.next_attempt_at.is_(None), candidate.c.next_attempt_at <= now),
        ~blocked,
    )


@functools.cache
def _claim_statement(sqlite: bool) -> Any:
    """UPDATE … RETURNING of the due, unblocked deliveries of one channel."""
    candidate = _DELIVERIES.alias("candidate")
    ids = (
        select(candidate.c.id)
        .where(
            candidate.c.channel == bindparam("claim_channel"),
            due_unblocked(candidate, bindparam("claim_now", type_=UtcDateTime())),
        )
        .order_by(candidate.c.seq, candidate.c.id)
        .limit(bindparam("claim_limit", type_=Integer()))
    )
    if not sqlite:
        ids = ids.with_for_update(skip_locked=True, of=candidate)
    table = _DELIVERIES
    return (
        update(table)
        .where(table.c.id.in_(ids.scalar_subquery()))
        .values(
            state=DeliveryState.SENDING.value,
            attempts=table.c.attempts + 1,
            lease_until=bindparam("claim_lease_until", type_=UtcDateTime()),
            updated_at=bindparam("claim_now", type_=UtcDateTime()),
        )
        .returning(*(table.c[f.name] for f in fields(Claimed)))
    )


FANOUT_RUNNING = "running"


@dataclass(frozen=True)
class QuietWindow:
    """Quiet hours as the fan-out applies them: between `start` and `end`, local time of
    each subscriber (their time zone, else `default_timezone`), an update below `critical`
    impact is held until `end`. `start` after `end`: the window crosses midnight."""

    start: time
    end: time
    default_timezone: str

    def release(self, now: datetime, timezone: str | None) -> datetime | None:
        """When an update reaching someone in `timezone` at `now` may go out: the window's
        end in their time zone (in UTC), or None when `now` is outside their window.

        The end is the wall-clock time on the local date it falls on, so a daylight-saving
        change in between moves it the way the person's clock moves. An end the clocks
        skip (02:30 on a spring-forward night) is read with the offset before the change,
        so it lands as late as the gap is long (03:30), as java.time does; an end the
        clocks repeat is its first occurrence."""
        zone = _zone(timezone, self.default_timezone)
        local = now.astimezone(zone)
        wall = local.time()
        day = local.date()
        if self.start < self.end:
            inside = self.start <= wall < self.end
        else:  # crosses midnight: 22:00-08:00
            inside = wall >= self.start or wall < self.end
            if wall >= self.start:
                day += timedelta(days=1)
        if not inside:
            return None
        end = datetime.combine(day, self.end, tzinfo=zone).astimezone(UTC)
        return max(end, now)


@functools.lru_cache(maxsize=512)
def _zone(name: str | None, default: str) -> ZoneInfo:
    """The subscriber's zone; the configured one when they have none (or an unknown one:
    names are checked when stored, but the zone database can change under a store)."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo(default)


def _not_held(now: datetime) -> Any:
    """Not waiting for quiet hours to end. Only quiet hours create a delivery that is due
    later before any try (a retry counts an attempt; a broken channel's and a released
    hand-over's requeue clear the time), so that is how a held one is told apart."""
    table = _DELIVERIES
    return or_(
        table.c.state != DeliveryState.QUEUED.value,
        table.c.attempts > 0,
        table.c.next_attempt_at.is_(None),
        table.c.next_attempt_at <= now,
    )


@functools.cache
def _insert_new_deliveries(dialect: str) -> Any:
    """INSERT of deliveries that skips any whose delivery key is stored already (a
    fallback delivery raced by another: one of them is enough)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(_DELIVERIES).on_conflict_do_nothing(
            index_elements=["delivery_key"]
        )
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(_DELIVERIES).on_conflict_do_nothing(index_elements=["delivery_key"])


def _fanout_step(
    conn: Connection,
    fanout: Any,
    limit: int,
    *,
    quiet: QuietWindow | None = None,
    now: datetime | None = None,
    reroute: Reroute | None = None,
    reason: str | None = None,
) -> bool:
    """One batch of a fan-out; True when it is over (done, or its update was cancelled,
    retracted or superseded: nobody gets "investigating" after "resolved").

    With `quiet`, an update below `critical` impact reaches a subscriber inside their
    quiet hours at the window's end (`next_attempt_at`); a newer update supersedes it
    while it waits, like any queued delivery. With `reroute` (the channel is broken), the
    batch's deliveries go to the fallback at once where it reaches the subscriber."""
    now = now or utcnow()
    update_row = conn.execute(
        select(
            UPDATES.c.incident_id,
            UPDATES.c.seq,
            UPDATES.c.created_at,
            UPDATES.c.cancelled_at,
            UPDATES.c.impact,
        ).where(UPDATES.c.id == fanout.update_id)
    ).one()
    newer = conn.execute(
        select(UPDATES.c.channels).where(
            UPDATES.c.incident_id == update_row.incident_id,
            UPDATES.c.seq > update_row.seq,
            UPDATES.c.cancelled_at.is_(None),
        )
    ).all()
    ended = None
    if update_row.cancelled_at is not None:
        ended = "cancelled"
    elif any(fanout.channel in (row.channels or []) for row in newer):
        ended = "superseded"
    batch = [] if ended else fanout_batch(conn, fanout.channel, fanout.cursor, limit)
    render = conn.scalar(
        select(RENDERS.c.render).where(
            RENDERS.c.update_id == fanout.update_id, RENDERS.c.channel == fanout.channel
        )
    )
    touched = list(((render or {}).get("facts") or {}).get("components") or {})
    if update_row.impact == Impact.CRITICAL.value:
        quiet = None  # critical always goes out at once
    followers = [subscriber for subscriber in batch if subscriber.follows(touched)]
    deliveries = [
        {
            "update_id": fanout.update_id,
            "incident_id": update_row.incident_id,
            "seq": update_row.seq,
            "channel": fanout.channel,
            "recipient": str(subscriber.id),
            "language": subscriber.language,
            "delivery_key": delivery_key(
                fanout.update_id, update_row.created_at, fanout.channel, str(subscriber.id)
            ),
            "state": DeliveryState.QUEUED.value,
            "created_at": now,
        }
        for subscriber in followers
    ]
    if quiet is not None:
        releases = [quiet.release(now, subscriber.timezone) for subscriber in followers]
        if any(releases):  # else NULL, "due now", is left out as publish does
            for row, release in zip(deliveries, releases, strict=True):
                row["next_attempt_at"] = release
    if deliveries:
        conn.execute(insert(_DELIVERIES), deliveries)
        if reroute is not None:
            batch_of = [
                _DELIVERIES.c.update_id == fanout.update_id,
                _DELIVERIES.c.state == DeliveryState.QUEUED.value,
                _DELIVERIES.c.recipient.in_([row["recipient"] for row in deliveries]),
            ]
            _reroute(conn, reroute, batch_of, now=now, reason=reason)
    over = ended is not None or len(batch) < limit
    conn.execute(
        update(FANOUTS)
        .where(FANOUTS.c.update_id == fanout.update_id, FANOUTS.c.channel == fanout.channel)
        .values(
            cursor=batch[-1].id if batch else fanout.cursor,
            created=FANOUTS.c.created + len(deliveries),
            state=(ended or "done") if over else FANOUT_RUNNING,
        )
    )
    return over


def _reroute(
    conn: Connection,
    reroute: Reroute,
    conditions: Sequence[Any],
    *,
    now: datetime,
    reason: str | None = None,
    after: tuple[int, int] = (0, 0),
    limit: int | None = None,
) -> tuple[int, int, tuple[int, int]]:
    """Hand deliveries of `reroute.source` (those matching `conditions`) to its fallback:
    for each whose subscriber is still subscribed to the source and subscribed, with an
    address, to the fallback, a `fallback` delivery there (`target_id` = the original),
    and the original `rerouted`, its last error naming the new delivery.

    Left alone: what is not a post (a fallback delivery is never re-routed again, so
    two channels naming each other cannot loop), an update published to the fallback
    too (it reaches them there, if they are subscribed), a subscriber with a delivery of
    the update on the fallback already (the delivery key would refuse a second), an
    update with no render for the fallback (published before it was configured), a
    cancelled update, and one a newer live update of the incident on either channel
    supersedes. Candidates come in (seq, id) order after `after`, the
    order of the queue's own index, so a caller paging through a long queue reads it
    once. (moved, candidates read, the (seq, id) of the last one)."""
    table = _DELIVERIES
    taken = _DELIVERIES.alias("taken")
    primary = SUBSCRIPTIONS.alias("primary")
    fallback = SUBSCRIPTIONS.alias("fallback")
    address = address_column(reroute.kind)
    rendered = (
        select(RENDERS.c.update_id)
        .where(RENDERS.c.update_id == table.c.update_id, RENDERS.c.channel == reroute.fallback)
        .correlate(table)
        .exists()
    )
    there = (
        select(taken.c.id)
        .where(
            taken.c.incident_id == table.c.incident_id,
            taken.c.channel == reroute.fallback,
            taken.c.recipient == table.c.recipient,
            taken.c.update_id == table.c.update_id,
        )
        .correlate(table)
        .exists()
    )
    query = (
        select(
            table.c.id,
            table.c.update_id,
            table.c.incident_id,
            table.c.seq,
            table.c.recipient,
            table.c.language,
            table.c.attempts,
            table.c.next_attempt_at,
            table.c.last_error,
            UPDATES.c.created_at.label("update_created_at"),
        )
        .join(UPDATES, UPDATES.c.id == table.c.update_id)
        .join(SUBSCRIBERS, SUBSCRIBERS.c.id == cast(table.c.recipient, Integer))
        .join(
            primary,
            and_(
                primary.c.subscriber_id == SUBSCRIBERS.c.id,
                primary.c.channel == reroute.source,
                primary.c.subscribed.is_(True),
            ),
        )
        .join(
            fallback,
            and_(
                fallback.c.subscriber_id == SUBSCRIBERS.c.id,
                fallback.c.channel == reroute.fallback,
                fallback.c.subscribed.is_(True),
            ),
        )
        .where(
            table.c.channel == reroute.source,
            table.c.action == DeliveryAction.POST.value,
            tuple_(table.c.seq, table.c.id) > tuple_(*after),
            address.is_not(None),
            UPDATES.c.cancelled_at.is_(None),
            rendered,
            ~there,
            *conditions,
        )
        .order_by(table.c.seq, table.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    if conn.dialect.name == "postgresql":  # a claim in another transaction skips them
        query = query.with_for_update(skip_locked=True, of=table)
    rows = conn.execute(query).all()
    if not rows:
        return 0, 0, after
    last = (rows[-1].seq, rows[-1].id)
    # Nobody should receive "investigating" after "resolved", on either channel.
    latest: dict[int, int] = {}
    there_too: set[int] = set()
    for update_id, incident_id, seq, channels in conn.execute(
        select(UPDATES.c.id, UPDATES.c.incident_id, UPDATES.c.seq, UPDATES.c.channels).where(
            UPDATES.c.incident_id.in_({r.incident_id for r in rows}),
            UPDATES.c.cancelled_at.is_(None),
        )
    ):
        if reroute.fallback in (channels or []):
            there_too.add(update_id)
        if {reroute.source, reroute.fallback} & set(channels or []):
            latest[incident_id] = max(latest.get(incident_id, 0), seq)
    current = [
        r for r in rows if r.update_id not in there_too and latest.get(r.incident_id, 0) <= r.seq
    ]
    moved = 0
    if current:
        inserted = conn.execute(
            _insert_new_deliveries(conn.dialect.name).returning(table.c.id, table.c.target_id),
            [
                {
                    "update_id": r.update_id,
                    "incident_id": r.incident_id,
                    "seq": r.seq,
                    "channel": reroute.fallback,
                    "recipient": r.recipient,
                    "language": r.language,
                    "delivery_key": delivery_key(
                        r.update_id, r.update_created_at, reroute.fallback, r.recipient
                    ),
                    "action": DeliveryAction.FALLBACK.value,
                    "target_id": r.id,
                    "state": DeliveryState.QUEUED.value,
                    # Still inside their quiet hours: the fallback waits as long.
                    "next_attempt_at": r.next_attempt_at if r.attempts == 0 else None,
                    "created_at": now,
                }
                for r in current
            ],
        ).all()
        by_original = {target: new for new, target in inserted}
        moved_rows = [r for r in current if r.id in by_original]
        moved = len(moved_rows)
    if moved:
        conn.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values(
                state=DeliveryState.REROUTED.value,
                last_error=bindparam("b_error"),
                lease_until=None,
                next_attempt_at=None,
                updated_at=now,
            ),
            [
                {
                    "b_id": r.id,
                    "b_error": f"re-routed to {reroute.fallback} (delivery "
                    f"#{by_original[r.id]}): {reason or r.last_error or 'not sent'}",
                }
                for r in moved_rows
            ],
        )
        # An older update's fallback delivery still waiting is superseded by this one.
        conn.execute(
            update(table)
            .where(
                table.c.channel == reroute.fallback,
                table.c.incident_id == bindparam("b_incident"),
                table.c.recipient == bindparam("b_recipient"),
                table.c.seq < bindparam("b_seq"),
                table.c.state == DeliveryState.QUEUED.value,
                table.c.action == DeliveryAction.FALLBACK.value,
            )
            .values(state=DeliveryState.SUPERSEDED.value, updated_at=now),
            [
                {"b_incident": r.incident_id, "b_recipient": r.recipient, "b_seq": r.seq}
                for r in moved_rows
            ],
        )
        per_update: dict[tuple[int, int], int] = {}
        for r in moved_rows:
            key = (r.incident_id, r.update_id)
            per_update[key] = per_update.get(key, 0) + 1
        conn.execute(
            insert(AUDIT),
            [
                {
                    "at": now,
                    "actor": "dispatcher",
                    "action": "reroute",
                    "incident_id": incident_id,
                    "update_id": update_id,
                    "detail": {"from": reroute.source, "to": reroute.fallback, "deliveries": n},
                }
                for (incident_id, update_id), n in per_update.items()
            ],
        )
    return moved, len(rows), last


def _pending(update_ids: Sequence[int] | None, except_channels: Sequence[str]) -> tuple[Any, Any]:
    """The pending deliveries (not held for quiet hours) and running fan-outs, as selects."""
    deliveries = select(DeliveryRow.id).where(DeliveryRow.state.in_(_PENDING), _not_held(utcnow()))
    fanouts = select(FANOUTS.c.update_id).where(FANOUTS.c.state == FANOUT_RUNNING)
    if update_ids is not None:
        deliveries = deliveries.where(DeliveryRow.update_id.in_(update_ids))
        fanouts = fanouts.where(FANOUTS.c.update_id.in_(update_ids))
    if except_channels:
        deliveries = deliveries.where(DeliveryRow.channel.not_in(except_channels))
        fanouts = fanouts.where(FANOUTS.c.channel.not_in(except_channels))
    return deliveries, fanouts


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
        params = {
            "claim_channel": channel,
            "claim_now": now,
            "claim_limit": limit,
            "claim_lease_until": now + timedelta(seconds=lease_seconds),
        }
        statement = _claim_statement(is_sqlite(self.store.url))
        rows = await self.store.write_connection(lambda conn: conn.execute(statement, params).all())
        claimed = [Claimed(*row) for row in rows]
        claimed.sort(key=lambda c: c.id)
        return claimed

    async def threads(
        self, channel: str, claimed: Sequence[Claimed]
    ) -> dict[tuple[int, str], Thread]:
        """For each claimed delivery's thread that has posts already: its first and latest.

        A post deleted by a retraction is no longer part of its thread; a corrected post
        is the same post (an edit's receipt carries the edited post's id).
        """
        if not claimed:
            return {}
        table = _DELIVERIES
        deletion = _DELIVERIES.alias("deletion")
        deleted = (
            select(deletion.c.id)
            .where(
                deletion.c.target_id == table.c.id,
                deletion.c.state.in_(_SUCCESS_VALUES),
            )
            .correlate(table)
            .exists()
        )
        async with self.store.engine.connect() as conn:  # a read: no write lock
            rows = (
                await conn.execute(
                    select(
                        table.c.incident_id,
                        table.c.recipient,
                        table.c.provider_id,
                        table.c.provider_data,
                    )
                    .where(
                        table.c.channel == channel,
                        table.c.incident_id.in_({c.incident_id for c in claimed}),
                        table.c.recipient.in_({c.recipient for c in claimed}),
                        table.c.provider_id.is_not(None),
                        table.c.action != DeliveryAction.DELETE.value,
                        ~deleted,
                    )
                    .order_by(table.c.seq, table.c.id)
                )
            ).all()
        posts: dict[tuple[int, str], list[PostRef]] = {}
        for incident_id, recipient, provider_id, data in rows:
            refs = posts.setdefault((incident_id, recipient), [])
            if all(ref.provider_id != provider_id for ref in refs):
                refs.append(PostRef(provider_id=provider_id, data=data or {}))
        return {key: Thread(root=refs[0], parent=refs[-1]) for key, refs in posts.items()}

    async def targets(self, claimed: Sequence[Claimed]) -> dict[int, Target]:
        """The posts that claimed edits and deletes change, by delivery id."""
        ids = {c.target_id for c in claimed if c.target_id is not None}
        if not ids:
            return {}
        table = _DELIVERIES
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(table.c.id, table.c.state, table.c.provider_id).where(
                        table.c.id.in_(ids)
                    )
                )
            ).all()
        return {
            row.id: Target(state=DeliveryState(row.state), provider_id=row.provider_id)
            for row in rows
        }

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Write a batch of outcomes in one transaction.

        Outcomes alike but for their id (a webhook fan-out: all "delivered") become one
        UPDATE … WHERE id IN (…); only receipts with provider ids are written row by row.
        """
        if not outcomes:
            return
        now = utcnow()
        alike: dict[tuple[Any, ...], list[int]] = {}
        receipts: list[dict[str, Any]] = []
        reroutes: dict[tuple[Reroute, DeliveryState], list[int]] = {}
        for o in outcomes:
            if o.reroute is not None:
                reroutes.setdefault((o.reroute, o.state), []).append(o.id)
            if o.has_receipt:
                receipts.append(
                    {
                        "b_id": o.id,
                        "b_state": o.state.value,
                        "b_provider_id": o.provider_id,
                        "b_permalink": o.permalink,
                        "b_provider_data": o.provider_data,
                        "b_now": now,
                    }
                )
            else:
                key = (o.state, o.last_error, o.next_attempt_at, o.uncount_attempt)
                alike.setdefault(key, []).append(o.id)
        table = _DELIVERIES
        statements = []
        for (state, last_error, next_attempt_at, uncount), ids in alike.items():
            values: dict[str, Any] = {
                "state": state.value,
                "last_error": last_error,
                "next_attempt_at": next_attempt_at,
                "lease_until": None,
                "updated_at": now,
            }
            if state in _SUCCESS:
                values["sent_at"] = now
            if uncount:
                values["attempts"] = table.c.attempts - 1
            statements.append(update(table).where(table.c.id.in_(ids)).values(values))

        def write(conn: Connection) -> None:
            for statement in statements:
                conn.execute(statement)
            if receipts:
                conn.execute(_SETTLE_RECEIPT, receipts)
            # In the same transaction: a delivery is failed (or queued) or re-routed,
            # never both, and never lost between the two.
            table = _DELIVERIES
            for (reroute, state), ids in reroutes.items():
                where = [table.c.id.in_(ids), table.c.state == state.value]
                _reroute(conn, reroute, where, now=now)

        await self.store.write_connection(write)

    async def reroute_queued(self, reroute: Reroute, *, reason: str, batch: int = 2000) -> int:
        """Hand the queued deliveries of a broken subscriber channel to its fallback (see
        `_reroute`: those whose subscriber it can reach), a batch per transaction; how
        many moved. The others stay queued for when the channel works again."""
        moved, after = 0, (0, 0)
        queued = [_DELIVERIES.c.state == DeliveryState.QUEUED.value]

        def step(conn: Connection, after: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
            return _reroute(
                conn, reroute, queued, now=utcnow(), reason=reason, after=after, limit=batch
            )

        while True:
            done, looked, after = await self.store.write_connection(
                functools.partial(step, after=after)
            )
            moved += done
            if looked < batch:
                return moved

    async def advance_fanout(
        self, channel: str, limit: int, *, quiet: QuietWindow | None = None
    ) -> bool:
        """Turn the next batch of a channel's subscribers into deliveries of the oldest
        running fan-out, in one transaction with its cursor (a crash resumes after the
        last batch). True while a fan-out of the channel is still running. With `quiet`,
        subscribers inside their quiet hours get non-critical updates at its end."""
        _, running = await self.fanout_step(channel, limit, quiet=quiet)
        return running

    async def fanout_step(
        self,
        channel: str,
        limit: int,
        *,
        quiet: QuietWindow | None = None,
        reroute: Reroute | None = None,
        reason: str | None = None,
    ) -> tuple[bool, bool]:
        """`advance_fanout`, saying also whether a batch was taken: (stepped, running).
        With `reroute` (the channel is broken), the batch goes to its fallback where the
        fallback reaches the subscriber, in the same transaction."""

        def write(conn: Connection) -> tuple[bool, bool]:
            oldest = (
                select(FANOUTS)
                .where(FANOUTS.c.channel == channel, FANOUTS.c.state == FANOUT_RUNNING)
                .order_by(FANOUTS.c.update_id)
                .limit(1)
            )
            if conn.dialect.name != "sqlite":
                # Several workers step fan-outs at once: each takes one no other holds.
                oldest = oldest.with_for_update(skip_locked=True)
            fanout = conn.execute(oldest).one_or_none()
            if fanout is None:
                return False, False
            done = _fanout_step(
                conn, fanout, limit, quiet=quiet, now=utcnow(), reroute=reroute, reason=reason
            )
            if not done:
                return True, True
            running = conn.scalar(
                select(func.count()).where(
                    FANOUTS.c.channel == channel, FANOUTS.c.state == FANOUT_RUNNING
                )
            )
            return True, bool(running)

        return await self.store.write_connection(write)

    async def record_receipt(
        self,
        channel: str,
        provider_id: str,
        state: DeliveryState,
        error: str | None,
        *,
        reroute: Reroute | None = None,
    ) -> bool:
        """A provider's delivery receipt for the delivery it knows by `provider_id`:
        `delivered`, `undelivered` or `failed` moves a `sent` delivery on; `sent` (the
        provider handed it on) changes nothing. Receipts may come out of order, so a
        delivery is never moved back. With `reroute`, a delivery the receipt says failed
        or was undelivered goes to the fallback in the same transaction (see `_reroute`).
        False when no delivery has that id (yet: a receipt can beat the dispatcher's own
        record of the send)."""
        table = _DELIVERIES
        now = utcnow()
        values: dict[str, Any] = {"state": state.value, "updated_at": now}
        if error is not None:
            values["last_error"] = error
        this = [table.c.channel == channel, table.c.provider_id == provider_id]

        def write(conn: Connection) -> bool:
            if state is not DeliveryState.SENT:
                changed = conn.execute(
                    update(table)
                    .where(*this, table.c.state == DeliveryState.SENT.value)
                    .values(values)
                ).rowcount
                if changed and reroute is not None and state in FAILED_STATES:
                    _reroute(conn, reroute, [*this, table.c.state == state.value], now=now)
                if changed:
                    return True
            known = conn.scalar(
                select(func.count()).where(
                    table.c.channel == channel, table.c.provider_id == provider_id
                )
            )
            return bool(known)  # already at or past this state: nothing to do

        return await self.store.write_connection(write)

    async def resume_sending(self, *, everything: bool) -> int:
        """Queue again deliveries left `sending` by a process that died.

        `everything`: this process alone dispatches (it holds the dispatcher lease), so any
        `sending` row is an orphan; otherwise only rows whose lease expired.
        """
        now = utcnow()
        conditions: list[Any] = [DeliveryRow.state == DeliveryState.SENDING.value]
        if not everything:
            conditions.append(DeliveryRow.lease_until < now)
        statement = (
            update(DeliveryRow)
            .where(*conditions)
            .values(
                state=DeliveryState.QUEUED.value,
                lease_until=None,
                next_attempt_at=None,
                updated_at=now,
            )
        )
        resumed: int = await self.store.write_connection(
            lambda conn: conn.execute(statement).rowcount
        )
        return resumed

    async def pending_count(
        self,
        *,
        update_ids: Sequence[int] | None = None,
        except_channels: Sequence[str] = (),
    ) -> int:
        """Deliveries still queued or sending (of these updates, outside these channels),
        plus one per fan-out still creating deliveries.

        Deliveries held for quiet hours are not counted: like a broken channel's, they
        go out later by themselves (a `serve`, or the next command that dispatches), and
        a command publishing at night must not wait for the morning."""
        deliveries, fanouts = _pending(update_ids, except_channels)
        async with self.store.sessions() as session:
            counted = [
                await session.scalar(select(func.count()).select_from(q.subquery()))
                for q in (deliveries, fanouts)
            ]
        return sum(int(c or 0) for c in counted)

    async def any_pending(
        self,
        *,
        update_ids: Sequence[int] | None = None,
        except_channels: Sequence[str] = (),
    ) -> bool:
        """Whether anything `pending_count` counts exists: an EXISTS, cheap even with a
        million deliveries queued (`wait` asks on every tick)."""
        deliveries, fanouts = _pending(update_ids, except_channels)
        async with self.store.sessions() as session:
            for query in (deliveries, fanouts):
                if await session.scalar(select(query.exists())):
                    return True
        return False

    # -- leases -------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        """Take or renew a named lease; True when `holder` has it now."""
        now = utcnow()

        def take(session: Session) -> bool:
            row = session.get(LeaseRow, name, with_for_update=True)
            if row is None:
                session.add(
                    LeaseRow(
                        name=name, holder=holder, expires_at=now + timedelta(seconds=ttl_seconds)
                    )
                )
                return True
            if row.holder != holder and row.expires_at > now and not holder_is_dead(row.holder):
                return False
            row.holder = holder
            row.expires_at = now + timedelta(seconds=ttl_seconds)
            return True

        try:
            # Renewed every few seconds by `serve`: on the writer thread, like publishes,
            # so it never makes them wait on a slower path.
            return await self.store.write_session(take)
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

    async def mark_broken(self, channel: str, reason: str) -> bool:
        """Mark the channel broken; whether it was not already (so that of several
        workers finding it broken at once, one tells the team)."""
        now = utcnow()
        try:
            async with self.store.transaction() as session:
                row = await session.get(ChannelHealthRow, channel, with_for_update=True)
                if row is None:
                    session.add(
                        ChannelHealthRow(channel=channel, broken_reason=reason, broken_at=now)
                    )
                    return True
                first = row.broken_reason is None
                row.broken_reason = reason
                row.broken_at = now
                return first
        except IntegrityError:  # another process inserted the row first: it was first
            return False

    async def is_broken(self, channel: str) -> bool:
        async with self.store.sessions() as session:
            row = await session.get(ChannelHealthRow, channel)
        return row is not None and row.broken_reason is not None

    async def oldest_due(self, *, except_channels: Sequence[str] = ()) -> datetime | None:
        """When the longest-waiting queued delivery became due (NULL next attempt: created)."""
        due = func.coalesce(DeliveryRow.next_attempt_at, DeliveryRow.created_at)
        query = select(func.min(due)).where(DeliveryRow.state == DeliveryState.QUEUED.value)
        if except_channels:
            query = query.where(DeliveryRow.channel.not_in(except_channels))
        async with self.store.sessions() as session:
            value = await session.scalar(query)
        if isinstance(value, str):  # SQLite hands coalesce() back as text
            value = datetime.fromisoformat(value).replace(tzinfo=UTC)
        return value

    async def retried_counts(self) -> dict[str, int]:
        """Per channel, how many deliveries needed more than one attempt."""
        async with self.store.sessions() as session:
            rows = await session.execute(
                select(DeliveryRow.channel, func.count())
                .where(DeliveryRow.attempts > 1)
                .group_by(DeliveryRow.channel)
            )
            return {channel: count for channel, count in rows}

    async def broken_channels(self) -> list[str]:
        async with self.store.sessions() as session:
            rows = await session.scalars(
                select(ChannelHealthRow.channel).where(ChannelHealthRow.broken_reason.is_not(None))
            )
            return list(rows)

    async def mark_healthy(self, channels: Sequence[str]) -> None:
        async with self.store.transaction() as session:
            await session.execute(
                update(ChannelHealthRow)
                .where(ChannelHealthRow.channel.in_(channels))
                .values(broken_reason=None, broken_at=None)
            )
