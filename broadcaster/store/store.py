"""The store: incidents, updates, renders, deliveries and the audit trail.

Every method is one transaction. Publishing stores the update, its renders and all its
deliveries before any provider is called, so a crash after it loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    delete,
    func,
    insert,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from broadcaster.errors import BroadcasterError, NotFoundError
from broadcaster.models import (
    FAILED_STATES,
    SUCCESS_STATES,
    AuditEntry,
    ChannelProgress,
    ChannelRender,
    ComponentState,
    Delivery,
    DeliveryAction,
    DeliveryState,
    Draft,
    DraftState,
    Impact,
    Incident,
    IncidentKind,
    IncidentStatus,
    Retraction,
    Update,
    UpdateRequest,
)
from broadcaster.store.engine import (
    WRITE_OPTION,
    backup_sqlite,
    create_engine,
    create_thread_engine,
    ensure_schema,
    is_sqlite,
)
from broadcaster.store.reminders import Wanted, cancel_reminders_of, settle_promises
from broadcaster.store.tables import (
    AUDIT,
    DELIVERIES,
    DRAFTS,
    FANOUTS,
    INCIDENTS,
    RENDERS,
    UPDATES,
    AuditRow,
    ChannelHealthRow,
    DeliveryRow,
    DraftRow,
    IncidentRow,
    RenderRow,
    UpdateRow,
    UtcDateTime,
    utcnow,
)


def _key(*parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:32]


def delivery_key(
    update_id: int,
    created_at: datetime,
    channel: str,
    recipient: str,
    action: DeliveryAction = DeliveryAction.POST,
) -> str:
    """Identifies one delivery for providers that dedupe (Idempotency-Key, webhook-id).

    The update's creation time is in it: ids restart in a new store, and a provider that
    remembers keys (Mastodon, for an hour) must not take a new store's first update for
    an earlier store's.
    """
    parts: list[object] = ["delivery", update_id, created_at.isoformat(), channel, recipient]
    if action is DeliveryAction.DELETE:  # the update's other delivery to this recipient
        parts.append(action.value)
    return _key(*parts)


@dataclass
class ChannelPlan:
    """Where one channel delivers an update."""

    render: ChannelRender
    recipients: list[tuple[str, str | None]]  # (recipient id, language)
    edits: bool = False  # a correction edits the corrected update's posts in place
    fanout: bool = False  # to subscribers: deliveries created in batches (`fanouts`)


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
    attempts: int
    created_at: datetime
    deadline_at: datetime | None  # None: created_at + the channel's deadline
    action: str  # a DeliveryAction
    target_id: int | None  # edit/delete: the delivery whose post this changes

    @property
    def thread(self) -> tuple[int, str]:
        """Deliveries of one incident to one recipient of a channel form a thread."""
        return (self.incident_id, self.recipient)


InTransaction = Callable[[Connection, int, int], None]


@dataclass
class PublishPlan:
    """A checked update, ready to be stored with its deliveries in one transaction."""

    incident_id: int | None
    title: str
    status: IncidentStatus
    impact: Impact
    components: dict[str, ComponentState]
    incident_components: dict[str, ComponentState]
    template: str
    fields: dict[str, str]
    next_update_at: datetime | None
    publish_key: str | None
    actor: str
    channels: dict[str, ChannelPlan] = field(default_factory=dict)
    alert_key: str | None = None
    release_draft: int | None = None  # a held draft this update publishes (it must be held)
    corrects: int | None = None  # the update this one corrects (see ChannelPlan.edits)
    # Renders for fallback channels the update does not go to (ChannelConfig.fallback):
    # stored for subscribers the dispatcher re-routes there; no deliveries, and not among
    # the update's channels (they supersede nothing).
    fallback_renders: dict[str, ChannelRender] = field(default_factory=dict)
    # Set by a process whose dispatcher is running: a *new* incident's deliveries (no
    # earlier post to wait for) are stored already claimed by it (`sending`, leased this
    # long) and listed in `claimed`, so they go out without a claim transaction.
    claim_lease_seconds: float | None = None
    claimed: list[Claimed] = field(default_factory=list)
    # The reminders this update's promise (next_update_at) asks for; they replace the
    # incident's pending ones, in the update's transaction (see store/reminders.py).
    reminders: list[Wanted] = field(default_factory=list)
    keeps_reminder: int | None = None  # a due reminder this update answers
    opened_at: datetime | None = None  # when the incident opened (None: by this update)
    # Run last in the transaction with (connection, update id, incident id): the
    # procrastinate backend defers the update's jobs there, so they commit with it.
    in_transaction: InTransaction | None = None


class DraftChangedError(BroadcasterError):
    """A held draft was decided (cancelled, published) by someone else meanwhile."""


@dataclass(frozen=True)
class OpenEpisode:
    """The open incident an alert group's episode opened, as the alert intake needs it."""

    incident_id: int
    alert_key: str
    last_update_at: datetime | None  # of the latest public (non-cancelled) update
    held: Draft | None  # an update of it held by flapping damping

    @property
    def started_at(self) -> datetime:
        """When the episode that opened the incident started firing."""
        return datetime.fromisoformat(self.alert_key.rpartition("|")[2])


def _next_seq(conn: Connection, incident_id: int) -> int:
    """The seq after every update of the incident so far: a new update's, or a
    retraction's (its deletes then wait for every post of the thread before them)."""
    latest = select(func.max(UPDATES.c.seq)).where(UPDATES.c.incident_id == incident_id)
    return (conn.scalar(latest) or 0) + 1


def _restore_incident(conn: Connection, incident_id: int) -> None:
    """Make the incident say what its live updates say (after one was retracted): the
    latest one's status and impact, the components as the updates left them."""
    live = conn.execute(
        select(UPDATES.c.status, UPDATES.c.impact, UPDATES.c.components, UPDATES.c.created_at)
        .where(UPDATES.c.incident_id == incident_id, UPDATES.c.cancelled_at.is_(None))
        .order_by(UPDATES.c.seq)
    ).all()
    if not live:  # nothing left said: the incident keeps what it was
        return
    components: dict[str, str] = {}
    for row in live:
        if IncidentStatus(row.status).is_final:
            components = dict.fromkeys(components, ComponentState.OPERATIONAL.value)
        components.update(row.components)
    latest = live[-1]
    conn.execute(
        update(INCIDENTS)
        .where(INCIDENTS.c.id == incident_id)
        .values(
            status=latest.status,
            impact=latest.impact,
            components=components,
            resolved_at=latest.created_at if IncidentStatus(latest.status).is_final else None,
        )
    )


def _correction_targets(conn: Connection, plan: PublishPlan) -> dict[tuple[str, str], int]:
    """(channel, recipient) -> the corrected update's delivery there, for channels that
    edit: the correction edits whatever that delivery posted (or posts, if it did not)."""
    edits = [name for name, channel_plan in plan.channels.items() if channel_plan.edits]
    if plan.corrects is None or not edits:
        return {}
    rows = conn.execute(
        select(DELIVERIES.c.id, DELIVERIES.c.channel, DELIVERIES.c.recipient).where(
            DELIVERIES.c.update_id == plan.corrects,
            DELIVERIES.c.channel.in_(edits),
            DELIVERIES.c.action != DeliveryAction.DELETE.value,
        )
    ).all()
    return {(row.channel, row.recipient): row.id for row in rows}


def _update_model(row: UpdateRow) -> Update:
    return Update(
        id=row.id,
        incident_id=row.incident_id,
        seq=row.seq,
        status=IncidentStatus(row.status),
        impact=Impact(row.impact),
        template=row.template,
        fields=row.fields,
        components=row.components,
        next_update_at=row.next_update_at,
        publish_key=row.publish_key,
        channels=row.channels,
        actor=row.actor,
        created_at=row.created_at,
        cancelled_at=row.cancelled_at,
        corrects=row.corrects,
        retracted_at=row.retracted_at,
    )


def _incident_model(row: IncidentRow, updates: Sequence[UpdateRow] = ()) -> Incident:
    return Incident(
        id=row.id,
        kind=IncidentKind(row.kind),
        title=row.title,
        status=IncidentStatus(row.status),
        impact=Impact(row.impact),
        components=row.components,
        created_at=row.created_at,
        resolved_at=row.resolved_at,
        alert_key=row.alert_key,
        updates=[_update_model(u) for u in updates],
    )


# Drafts still waiting for something: a human (pending) or their time (held).
WAITING_DRAFT_STATES = (DraftState.PENDING.value, DraftState.HELD.value)


def alert_group(alert_key: str | None) -> str | None:
    """The alert group of an episode key `group|start` (the start has no '|')."""
    return alert_key.rpartition("|")[0] if alert_key else None


def _audit_row(
    at: datetime,
    actor: str,
    action: str,
    incident_id: int | None,
    update_id: int | None,
    detail: dict[str, Any] | None,
) -> AuditRow:
    return AuditRow(
        at=at,
        actor=actor,
        action=action,
        incident_id=incident_id,
        update_id=update_id,
        detail=detail or {},
    )


def _draft_model(row: DraftRow) -> Draft:
    return Draft(
        id=row.id,
        created_at=row.created_at,
        source=row.source,
        route=row.route,
        alert_key=row.alert_key,
        incident_id=row.incident_id,
        request=UpdateRequest.model_validate(row.request),
        state=DraftState(row.state),
        decided_by=row.decided_by,
        decided_at=row.decided_at,
        update_id=row.update_id,
        not_before=row.not_before,
    )


def delivery_model(row: DeliveryRow) -> Delivery:
    return Delivery(
        id=row.id,
        update_id=row.update_id,
        incident_id=row.incident_id,
        channel=row.channel,
        recipient=row.recipient,
        language=row.language,
        delivery_key=row.delivery_key,
        action=DeliveryAction(row.action),
        target_id=row.target_id,
        state=DeliveryState(row.state),
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        provider_id=row.provider_id,
        permalink=row.permalink,
        last_error=row.last_error,
        created_at=row.created_at,
        updated_at=row.updated_at or row.created_at,
        sent_at=row.sent_at,
    )


T = TypeVar("T")


def _run_session(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    with sessions.begin() as session:
        return work(session)


def _run_connection(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:
        return work(conn)


def _waiting_draft(session: Session, publish_key: str, alert_key: str | None) -> Draft | None:
    query = select(DraftRow).where(DraftRow.state.in_(WAITING_DRAFT_STATES))
    group = alert_group(alert_key)
    if group is not None:  # indexed: a handful of rows instead of every waiting draft
        query = query.where(DraftRow.alert_group == group)
    for row in session.scalars(query).all():
        if row.request.get("publish_key") == publish_key:
            return _draft_model(row)
    return None


def _open_alert_episode(session: Session, group_key: str) -> OpenEpisode | None:
    # Core, on the tables: looked up for every new alert group.
    latest = (
        select(func.max(UPDATES.c.created_at))
        .where(UPDATES.c.incident_id == INCIDENTS.c.id, UPDATES.c.cancelled_at.is_(None))
        .correlate(INCIDENTS)
        .scalar_subquery()
    )
    row = (
        session.connection()
        .execute(
            select(INCIDENTS.c.id, INCIDENTS.c.alert_key, latest)
            .where(INCIDENTS.c.alert_group == group_key, INCIDENTS.c.resolved_at.is_(None))
            .order_by(INCIDENTS.c.id.desc())
            .limit(1)
        )
        .first()
    )
    if row is None or row[1] is None:
        return None
    held = session.scalar(
        select(DraftRow)
        .where(DraftRow.incident_id == row[0], DraftRow.state == DraftState.HELD.value)
        .order_by(DraftRow.id)
        .limit(1)
    )
    last = row[2]
    if isinstance(last, str):  # SQLite hands max() of a subquery back as text
        last = datetime.fromisoformat(last)
    return OpenEpisode(
        row[0],
        row[1],
        UtcDateTime().process_result_value(last, session.get_bind().dialect),
        _draft_model(held) if held else None,
    )


class Store:
    """Async access to the store (SQLite by default, PostgreSQL for scale)."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)  # reads
        self.writer = engine.execution_options(**{WRITE_OPTION: True})
        self._write_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        # SQLite has one writer: serialise this process's transactions instead of
        # letting them fight over the file lock. PostgreSQL needs no such thing.
        self._write_lock: AbstractAsyncContextManager[Any] = (
            asyncio.Lock() if is_sqlite(url) else contextlib.nullcontext()
        )
        self._thread_engine = create_thread_engine(url)
        self._thread_reads: sessionmaker[Session] | None = None
        self._thread_writes: sessionmaker[Session] | None = None
        self._writer_thread: ThreadPoolExecutor | None = None
        if self._thread_engine is not None:
            self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
            self._thread_reads = sessionmaker(self._thread_engine, expire_on_commit=False)
            self._thread_writes = sessionmaker(
                self._thread_engine.execution_options(**{WRITE_OPTION: True}),
                expire_on_commit=False,
            )

    @classmethod
    async def open(cls, url: str) -> Store:
        engine = create_engine(url)
        await ensure_schema(engine, url)
        return cls(engine, url)

    async def close(self) -> None:
        await self.engine.dispose()
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=True)
        if self._thread_engine is not None:
            self._thread_engine.dispose()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """One writing Core transaction on the async engine (no ORM session)."""
        async with self._write_lock, self._writer_parked(), self.writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One writing transaction, committed on success, rolled back on error."""
        async with self._write_lock, self._writer_parked(), self._write_sessions.begin() as s:
            yield s

    @asynccontextmanager
    async def _writer_parked(self) -> AsyncIterator[None]:
        """While an async transaction writes, the writer thread (if any) waits, so the
        two never queue on SQLite's file lock (whose busy handler sleeps)."""
        if self._writer_thread is None:
            yield
            return
        loop = asyncio.get_running_loop()
        parked: asyncio.Future[None] = loop.create_future()
        release = threading.Event()

        def mark_parked() -> None:
            if not parked.done():  # cancelled meanwhile
                parked.set_result(None)

        def park() -> None:
            loop.call_soon_threadsafe(mark_parked)
            release.wait()

        self._writer_thread.submit(park)
        try:
            await parked
            yield
        finally:
            release.set()

    async def write_session(self, work: Callable[[Session], T]) -> T:
        """One writing transaction running `work` with a synchronous ORM session.

        On a SQLite file it runs whole on the store's one writer thread, which orders
        this process's writes. Through aiosqlite every statement is three or four hops
        between its thread and the event loop, with this process's write lock held
        across all of them: under webhook load the loop is busy, and those hops (not
        SQLite) made writers queue hundreds of milliseconds for the lock. Elsewhere
        (PostgreSQL) `work` runs on an async session."""
        if self._thread_writes is None or self._writer_thread is None:
            async with self.transaction() as session:
                return await session.run_sync(work)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._writer_thread, _run_session, self._thread_writes, work
        )

    async def write_connection(self, work: Callable[[Connection], T]) -> T:
        """One writing Core transaction running `work` with a synchronous connection
        (on the writer thread for a SQLite file, as `write_session`): the dispatcher's
        claims and settles."""
        if self._thread_engine is None or self._writer_thread is None:
            async with self.connection() as conn:
                return await conn.run_sync(work)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._writer_thread, _run_connection, self._thread_engine, work
        )

    async def read_session(self, work: Callable[[Session], T]) -> T:
        """One reading transaction running `work` with a synchronous ORM session (in a
        worker thread on a SQLite file, as `write_session`)."""
        if self._thread_reads is None:
            async with self.sessions() as session:
                return await session.run_sync(work)
        return await asyncio.to_thread(_run_session, self._thread_reads, work)

    # -- publishing ---------------------------------------------------------------

    async def find_by_publish_key(self, publish_key: str) -> Update | None:
        async with self.sessions() as session:
            row = await session.scalar(
                select(UpdateRow).where(UpdateRow.publish_key == publish_key)
            )
            return _update_model(row) if row else None

    async def publish(self, plan: PublishPlan) -> tuple[Update, bool]:
        """Store the update, its renders and deliveries; supersede older queued ones.

        Returns the update and whether it is new: a publish key seen before returns the
        stored update and changes nothing (the unique constraint decides, so two
        processes racing with one key store it once; callers look the key up first to
        skip rendering).
        """
        try:
            return await self.write_session(lambda session: self._publish(session, plan)), True
        except IntegrityError:
            if plan.publish_key:
                existing = await self.find_by_publish_key(plan.publish_key)
                if existing:
                    return existing, False
            raise

    @staticmethod
    def _publish(session: Session, plan: PublishPlan) -> Update:
        # Core statements only: the ORM's unit of work cost more than the SQL (a new
        # incident is five statements; an alert storm opens many).
        conn = session.connection()
        now = utcnow()
        incident_values = {
            "title": plan.title,
            "status": plan.status.value,
            "impact": plan.impact.value,
            "components": {k: v.value for k, v in plan.incident_components.items()},
            "resolved_at": now if plan.status.is_final else None,
        }
        if plan.incident_id is None:
            # A new incident: first update, nothing of it queued to supersede.
            incident_id = conn.execute(
                insert(INCIDENTS)
                .values(
                    kind=plan.status.kind.value,
                    created_at=now,
                    alert_key=plan.alert_key,
                    alert_group=alert_group(plan.alert_key),
                    **incident_values,
                )
                .returning(INCIDENTS.c.id)
            ).scalar_one()
            seq, superseded = 1, 0
        else:
            incident_id = plan.incident_id
            changed = conn.execute(
                update(INCIDENTS).where(INCIDENTS.c.id == incident_id).values(incident_values)
            )
            if changed.rowcount != 1:
                raise NotFoundError(f"no incident #{incident_id}")
            seq = _next_seq(conn, incident_id)
            # Nobody should receive "investigating" after "resolved": what has not gone
            # out yet of this incident's older updates is superseded by this one.
            result = conn.execute(
                update(DELIVERIES)
                .where(
                    DELIVERIES.c.incident_id == incident_id,
                    DELIVERIES.c.channel.in_(list(plan.channels)),
                    DELIVERIES.c.state == DeliveryState.QUEUED.value,
                    # A retraction still deletes what it was asked to.
                    DELIVERIES.c.action != DeliveryAction.DELETE.value,
                )
                .values(state=DeliveryState.SUPERSEDED.value, updated_at=now)
            )
            superseded = result.rowcount
        stored = Update(
            id=0,
            incident_id=incident_id,
            seq=seq,
            status=plan.status,
            impact=plan.impact,
            template=plan.template,
            fields=plan.fields,
            components=plan.components,
            next_update_at=plan.next_update_at,
            publish_key=plan.publish_key,
            channels=list(plan.channels),
            actor=plan.actor,
            created_at=now,
            corrects=plan.corrects,
        )
        update_id = conn.execute(
            insert(UPDATES)
            .values(
                incident_id=incident_id,
                seq=seq,
                status=plan.status.value,
                impact=plan.impact.value,
                template=plan.template,
                fields=plan.fields,
                components={k: v.value for k, v in plan.components.items()},
                next_update_at=plan.next_update_at,
                publish_key=plan.publish_key,
                channels=list(plan.channels),
                actor=plan.actor,
                created_at=now,
                corrects=plan.corrects,
            )
            .returning(UPDATES.c.id)
        ).scalar_one()
        stored.id = update_id
        rendered = {name: cp.render for name, cp in plan.channels.items()}
        rendered.update((n, r) for n, r in plan.fallback_renders.items() if n not in rendered)
        if rendered:
            conn.execute(
                insert(RENDERS),
                [
                    {"update_id": update_id, "channel": name, "render": render.model_dump()}
                    for name, render in rendered.items()
                ],
            )
        claim = plan.claim_lease_seconds is not None and plan.incident_id is None
        targets = _correction_targets(conn, plan)
        fanouts = [name for name, channel_plan in plan.channels.items() if channel_plan.fanout]
        deliveries = [
            {
                "update_id": update_id,
                "incident_id": incident_id,
                "seq": seq,
                "channel": name,
                "recipient": recipient,
                "language": language,
                "delivery_key": delivery_key(update_id, now, name, recipient),
                "action": (
                    DeliveryAction.EDIT if (name, recipient) in targets else DeliveryAction.POST
                ).value,
                "target_id": targets.get((name, recipient)),
                "state": (DeliveryState.SENDING if claim else DeliveryState.QUEUED).value,
                "attempts": 1 if claim else 0,
                "lease_until": now + timedelta(seconds=plan.claim_lease_seconds or 0)
                if claim
                else None,
                "created_at": now,
            }
            for name, channel_plan in plan.channels.items()
            for recipient, language in channel_plan.recipients
        ]
        conn.execute(
            insert(AUDIT).values(
                at=now,
                actor=plan.actor,
                action="publish",
                incident_id=incident_id,
                update_id=update_id,
                detail={
                    "status": plan.status.value,
                    "channels": list(plan.channels),
                    "deliveries": len(deliveries),
                    "fanouts": fanouts,
                    "superseded": superseded,
                    "publish_key": plan.publish_key,
                },
            )
        )
        if fanouts:
            conn.execute(
                insert(FANOUTS),
                [
                    {"update_id": update_id, "channel": name, "cursor": 0, "state": "running"}
                    for name in fanouts
                ],
            )
        if deliveries and claim:
            returning = insert(DELIVERIES).returning(
                *(DELIVERIES.c[f.name] for f in fields(Claimed)), sort_by_parameter_order=True
            )
            plan.claimed = [Claimed(*r) for r in conn.execute(returning, deliveries)]
        elif deliveries:
            conn.execute(insert(DELIVERIES), deliveries)
        settle_promises(
            conn,
            incident_id,
            update_id,
            plan.reminders,
            now=now,
            actor=plan.actor,
            answers=plan.keeps_reminder,
        )
        if plan.release_draft is not None:
            # In the same transaction as the update: a held draft goes out at most once,
            # and never after it was cancelled (a re-fire) by this or another process.
            released = conn.execute(
                update(DRAFTS)
                .where(
                    DRAFTS.c.id == plan.release_draft,
                    DRAFTS.c.state == DraftState.HELD.value,
                )
                .values(
                    state=DraftState.PUBLISHED.value,
                    decided_by=plan.actor,
                    decided_at=now,
                    update_id=update_id,
                )
            )
            if released.rowcount != 1:
                raise DraftChangedError(f"draft #{plan.release_draft} is no longer held")
        if plan.in_transaction is not None:
            plan.in_transaction(conn, update_id, incident_id)
        return stored

    async def retract(
        self, update_id: int, *, deletable: Collection[str], actor: str, dry_run: bool = False
    ) -> dict[str, Retraction]:
        """Take an update back: stop its queued deliveries and queue, for each of its posts
        on a channel that can delete, a delivery deleting it. Per channel, what happens."""

        def retract(session: Session) -> dict[str, Retraction]:
            conn = session.connection()
            now = utcnow()
            row = conn.execute(
                select(UPDATES.c.incident_id, UPDATES.c.retracted_at, UPDATES.c.created_at).where(
                    UPDATES.c.id == update_id
                )
            ).one_or_none()
            if row is None:
                raise NotFoundError(f"no update #{update_id}")
            if row.retracted_at is not None:
                raise BroadcasterError(f"update #{update_id} is already retracted")
            posts = conn.execute(
                select(
                    DELIVERIES.c.id,
                    DELIVERIES.c.channel,
                    DELIVERIES.c.recipient,
                    DELIVERIES.c.language,
                    DELIVERIES.c.state,
                ).where(DELIVERIES.c.update_id == update_id)
            ).all()
            report: dict[str, Retraction] = {}
            deletes = []
            seq = _next_seq(conn, row.incident_id)
            for post in posts:
                what = report.setdefault(post.channel, Retraction())
                state = DeliveryState(post.state)
                if state is DeliveryState.QUEUED:
                    what.cancelled += 1
                elif state.is_pending or state in SUCCESS_STATES:
                    if post.channel not in deletable:
                        what.kept += 1
                        continue
                    what.deleting += 1
                    deletes.append(
                        {
                            "update_id": update_id,
                            "incident_id": row.incident_id,
                            # After everything of the thread so far: a post still going
                            # out is deleted once it is out.
                            "seq": seq,
                            "channel": post.channel,
                            "recipient": post.recipient,
                            "language": post.language,
                            "delivery_key": delivery_key(
                                update_id,
                                row.created_at,
                                post.channel,
                                post.recipient,
                                DeliveryAction.DELETE,
                            ),
                            "action": DeliveryAction.DELETE.value,
                            "target_id": post.id,
                            "state": DeliveryState.QUEUED.value,
                            "created_at": now,
                        }
                    )
            if dry_run:
                return report
            conn.execute(
                update(UPDATES)
                .where(UPDATES.c.id == update_id)
                .values(retracted_at=now, cancelled_at=func.coalesce(UPDATES.c.cancelled_at, now))
            )
            _restore_incident(conn, row.incident_id)
            cancel_reminders_of(conn, update_id, why=f"update #{update_id} retracted", now=now)
            conn.execute(
                update(DELIVERIES)
                .where(
                    DELIVERIES.c.update_id == update_id,
                    DELIVERIES.c.state == DeliveryState.QUEUED.value,
                )
                .values(state=DeliveryState.CANCELLED.value, updated_at=now)
            )
            if deletes:
                conn.execute(insert(DELIVERIES), deletes)
            conn.execute(
                insert(AUDIT).values(
                    at=now,
                    actor=actor,
                    action="retract",
                    incident_id=row.incident_id,
                    update_id=update_id,
                    detail={name: r.model_dump() for name, r in report.items()},
                )
            )
            return report

        return await self.write_session(retract)

    # -- monitoring alerts and drafts ------------------------------------------------

    async def open_incident_for_alert_group(self, group_key: str) -> tuple[int, str] | None:
        """(id, alert key) of the unresolved incident an episode of this group opened."""
        async with self.sessions() as session:
            row = (
                await session.execute(
                    select(IncidentRow.id, IncidentRow.alert_key)
                    .where(
                        IncidentRow.alert_group == group_key,
                        IncidentRow.resolved_at.is_(None),
                    )
                    .order_by(IncidentRow.id.desc())
                    .limit(1)
                )
            ).first()
        return (row[0], row[1]) if row is not None and row[1] is not None else None

    async def open_alert_episode(self, group_key: str) -> OpenEpisode | None:
        """The group's open incident with its latest update time and held update, if any
        (one read, no write lock)."""
        return await self.read_session(lambda session: _open_alert_episode(session, group_key))

    async def waiting_draft(self, publish_key: str, alert_key: str | None) -> Draft | None:
        """A pending or held draft with this publish key (a read: no write lock)."""
        return await self.read_session(
            lambda session: _waiting_draft(session, publish_key, alert_key)
        )

    async def create_draft(
        self,
        *,
        source: str,
        route: str,
        alert_key: str | None,
        incident_id: int | None,
        request: UpdateRequest,
        not_before: datetime | None = None,
    ) -> tuple[Draft, bool]:
        """Hold an update for approval — or, with `not_before`, until then (flapping
        damping: state `held`). A pending or held draft with the same publish key is
        returned instead of a second one. Returns (draft, new)."""
        publish_key = request.publish_key
        if publish_key:
            # Repeats are the common case: answer them with a read, not a write.
            waiting = await self.waiting_draft(publish_key, alert_key)
            if waiting is not None:
                return waiting, False

        def create(session: Session) -> tuple[Draft, bool]:
            if (
                publish_key
                and session.bind is not None
                and session.bind.dialect.name == "postgresql"
            ):
                # Two nodes drafting the same alert at once (a load balancer delivered it
                # to both): the second waits here for the first to commit, then finds it.
                # (SQLite has one writer at a time already.)
                session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": f"draft:{publish_key}"},
                )
            if publish_key:
                waiting = _waiting_draft(session, publish_key, alert_key)
                if waiting is not None:
                    return waiting, False
            row = DraftRow(
                created_at=utcnow(),
                source=source,
                route=route,
                alert_key=alert_key,
                alert_group=alert_group(alert_key),
                incident_id=incident_id,
                request=request.model_dump(mode="json"),
                state=(DraftState.PENDING if not_before is None else DraftState.HELD).value,
                not_before=not_before,
            )
            session.add(row)
            session.flush()
            detail: dict[str, Any] = {
                "draft": row.id,
                "route": route,
                "status": request.status.value,
            }
            if not_before is not None:
                detail["not_before"] = not_before.isoformat()
            action = "hold" if not_before is not None else "draft"
            session.add(
                _audit_row(row.created_at, request.actor, action, incident_id, None, detail)
            )
            return _draft_model(row), True

        return await self.write_session(create)

    async def held_drafts(self) -> list[Draft]:
        """Held updates, the soonest due first."""
        async with self.sessions() as session:
            rows = await session.scalars(
                select(DraftRow)
                .where(DraftRow.state == DraftState.HELD.value)
                .order_by(DraftRow.not_before, DraftRow.id)
            )
            return [_draft_model(r) for r in rows.all()]

    async def hold_until(self, draft_id: int, not_before: datetime) -> bool:
        """Move a held draft's time; False when it is no longer held."""
        async with self.transaction() as session:
            result = await session.execute(
                update(DraftRow)
                .where(DraftRow.id == draft_id, DraftRow.state == DraftState.HELD.value)
                .values(not_before=not_before)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def drafts(self, *, state: DraftState | None = DraftState.PENDING) -> list[Draft]:
        query = select(DraftRow).order_by(DraftRow.id)
        if state is not None:
            query = query.where(DraftRow.state == state.value)
        async with self.sessions() as session:
            return [_draft_model(r) for r in (await session.scalars(query)).all()]

    async def get_draft(self, draft_id: int) -> Draft:
        async with self.sessions() as session:
            row = await session.get(DraftRow, draft_id)
            if row is None:
                raise NotFoundError(f"no draft #{draft_id} — `broadcaster drafts` lists them")
            return _draft_model(row)

    async def decide_draft(
        self,
        draft_id: int,
        state: DraftState,
        actor: str,
        *,
        incident_id: int | None = None,
        update_id: int | None = None,
        expect: DraftState | None = None,
    ) -> bool:
        """Record what became of a waiting draft (and, once published, its incident).

        With `expect`, only a draft in that state changes; returns whether it did."""
        now = utcnow()
        async with self.transaction() as session:
            row = await session.get(DraftRow, draft_id)
            if row is None:
                raise NotFoundError(f"no draft #{draft_id}")
            if expect is not None and row.state != expect.value:
                return False
            row.state = state.value
            row.decided_by = actor
            row.decided_at = now
            row.update_id = update_id
            row.incident_id = row.incident_id or incident_id
            detail = {
                "draft": row.id,
                "from": f"{row.source}/{row.route}",
                "drafted_at": row.created_at.isoformat(),
            }
            session.add(_audit_row(now, actor, state.value, row.incident_id, update_id, detail))
            return True

    async def obsolete_drafts(self, group_key: str, actor: str) -> int:
        """Pending drafts of an alert group whose episode ended before anyone approved."""
        async with self.transaction() as session:
            rows = (
                await session.scalars(
                    select(DraftRow).where(
                        DraftRow.alert_group == group_key,
                        DraftRow.state == DraftState.PENDING.value,
                    )
                )
            ).all()
            now = utcnow()
            for row in rows:
                row.state = DraftState.OBSOLETE.value
                row.decided_by = actor
                row.decided_at = now
            return len(rows)

    # -- reading ------------------------------------------------------------------

    async def get_incident(self, incident_id: int) -> Incident:
        async with self.sessions() as session:
            row = await session.get(IncidentRow, incident_id)
            if row is None:
                raise NotFoundError(
                    f"no incident #{incident_id} — `broadcaster incidents` lists them"
                )
            updates = (
                await session.scalars(
                    select(UpdateRow)
                    .where(UpdateRow.incident_id == incident_id)
                    .order_by(UpdateRow.seq)
                )
            ).all()
            return _incident_model(row, updates)

    async def list_incidents(self, *, open_only: bool = False, limit: int = 50) -> list[Incident]:
        async with self.sessions() as session:
            query = select(IncidentRow).order_by(IncidentRow.id.desc()).limit(limit)
            if open_only:
                query = query.where(IncidentRow.resolved_at.is_(None))
            rows = (await session.scalars(query)).all()
            return [_incident_model(r) for r in rows]

    async def renders(self, update_id: int) -> dict[str, ChannelRender]:
        async with self.sessions() as session:
            rows = (
                await session.scalars(select(RenderRow).where(RenderRow.update_id == update_id))
            ).all()
            return {r.channel: ChannelRender.model_validate(r.render) for r in rows}

    async def progress(
        self,
        *,
        incident_id: int | None = None,
        update_ids: Sequence[int] | None = None,
        channel: str | None = None,
        failures: int = 20,
    ) -> list[ChannelProgress]:
        """Deliveries counted by channel and state, with the latest failures of each."""
        conditions: list[Any] = []
        if incident_id is not None:
            conditions.append(DeliveryRow.incident_id == incident_id)
        if update_ids is not None:
            conditions.append(DeliveryRow.update_id.in_(update_ids))
        if channel is not None:
            conditions.append(DeliveryRow.channel == channel)
        async with self.sessions() as session:
            counts = await session.execute(
                select(DeliveryRow.channel, DeliveryRow.action, DeliveryRow.state, func.count())
                .where(*conditions)
                .group_by(DeliveryRow.channel, DeliveryRow.action, DeliveryRow.state)
            )
            by_channel: dict[tuple[str, DeliveryAction], dict[DeliveryState, int]] = {}
            for name, action, state, count in counts:
                key = (name, DeliveryAction(action))
                by_channel.setdefault(key, {})[DeliveryState(state)] = count
            health = {
                h.channel: h.broken_reason
                for h in (await session.scalars(select(ChannelHealthRow))).all()
            }
            # Held for quiet hours: queued, never tried, due later (only quiet hours make
            # such a delivery; see queue._not_held).
            held_rows = await session.execute(
                select(
                    DeliveryRow.channel,
                    DeliveryRow.action,
                    func.count(),
                    func.max(DeliveryRow.next_attempt_at),
                )
                .where(
                    *conditions,
                    DeliveryRow.state == DeliveryState.QUEUED.value,
                    DeliveryRow.attempts == 0,
                    DeliveryRow.next_attempt_at > utcnow(),
                )
                .group_by(DeliveryRow.channel, DeliveryRow.action)
            )
            held: dict[tuple[str, str], tuple[int, datetime | None]] = {}
            for name, action, count, until in held_rows:
                if isinstance(until, str):  # SQLite may hand an aggregate back as text
                    until = datetime.fromisoformat(until)
                if until is not None and until.tzinfo is None:
                    until = until.replace(tzinfo=UTC)
                held[(name, action)] = (count, until)
            result = []
            # Posts first, then what changed them (edits, deletes), channel by channel.
            order = list(DeliveryAction)
            for name, action in sorted(by_channel, key=lambda k: (k[0], order.index(k[1]))):
                failed_rows = (
                    await session.scalars(
                        select(DeliveryRow)
                        .where(
                            *conditions,
                            DeliveryRow.channel == name,
                            DeliveryRow.action == action.value,
                            DeliveryRow.state.in_([s.value for s in FAILED_STATES]),
                        )
                        .order_by(DeliveryRow.id.desc())
                        .limit(failures)
                    )
                ).all()
                waiting, until = held.get((name, action.value), (0, None))
                result.append(
                    ChannelProgress(
                        channel=name,
                        action=action,
                        counts=by_channel[(name, action)],
                        failures=[delivery_model(r) for r in failed_rows],
                        broken=health.get(name),
                        held=waiting,
                        held_until=until,
                    )
                )
            return result

    async def forget_deliveries(
        self, channels: Sequence[str], *, older_than: datetime, batch: int = 5000
    ) -> int:
        """Delete settled deliveries of these channels created before `older_than`, a
        batch per transaction (a retention policy); how many were deleted."""
        pending = [s.value for s in (DeliveryState.QUEUED, DeliveryState.SENDING)]
        old = (
            select(DELIVERIES.c.id)
            .where(
                DELIVERIES.c.channel.in_(list(channels)),
                DELIVERIES.c.created_at < older_than,
                DELIVERIES.c.state.not_in(pending),
            )
            .limit(batch)
        )
        total = 0
        while True:
            deleted: int = await self.write_connection(
                lambda conn: (
                    conn.execute(
                        delete(DELIVERIES).where(DELIVERIES.c.id.in_(old.scalar_subquery()))
                    ).rowcount
                )
            )
            total += deleted
            if deleted < batch:
                return total

    async def first_messages(self, incident_id: int) -> dict[str, datetime]:
        """Per channel, when the provider accepted the incident's first post (or a
        fallback's): one aggregate, however many deliveries there were."""
        row = DeliveryRow
        # Typed, so SQLite's MIN (text) is read back as an aware datetime too.
        accepted = type_coerce(func.min(func.coalesce(row.sent_at, row.updated_at)), UtcDateTime())
        query = (
            select(row.channel, accepted)
            .where(
                row.incident_id == incident_id,
                row.state.in_([s.value for s in SUCCESS_STATES]),
                row.action.in_([DeliveryAction.POST.value, DeliveryAction.FALLBACK.value]),
            )
            .group_by(row.channel)
        )
        async with self.sessions() as session:
            found = (await session.execute(query)).all()
        return {channel: at for channel, at in found if at is not None}

    async def deliveries_to(self, recipient: str, channels: Sequence[str]) -> list[Delivery]:
        """Every delivery to one recipient of these channels (a subscriber's history)."""
        query = (
            select(DeliveryRow)
            .where(DeliveryRow.recipient == recipient, DeliveryRow.channel.in_(list(channels)))
            .order_by(DeliveryRow.id)
        )
        async with self.sessions() as session:
            return [delivery_model(r) for r in (await session.scalars(query)).all()]

    async def deliveries(
        self,
        *,
        incident_id: int | None = None,
        update_id: int | None = None,
        channel: str | None = None,
        states: Sequence[DeliveryState] | None = None,
        limit: int | None = None,
    ) -> list[Delivery]:
        query = select(DeliveryRow).order_by(DeliveryRow.id)
        if incident_id is not None:
            query = query.where(DeliveryRow.incident_id == incident_id)
        if update_id is not None:
            query = query.where(DeliveryRow.update_id == update_id)
        if channel is not None:
            query = query.where(DeliveryRow.channel == channel)
        if states is not None:
            query = query.where(DeliveryRow.state.in_([s.value for s in states]))
        if limit is not None:
            query = query.limit(limit)
        async with self.sessions() as session:
            return [delivery_model(r) for r in (await session.scalars(query)).all()]

    async def audit(self, incident_id: int) -> list[AuditEntry]:
        async with self.sessions() as session:
            rows = (
                await session.scalars(
                    select(AuditRow)
                    .where(AuditRow.incident_id == incident_id)
                    .order_by(AuditRow.id)
                )
            ).all()
            return [
                AuditEntry(
                    at=r.at,
                    actor=r.actor,
                    action=r.action,
                    incident_id=r.incident_id,
                    update_id=r.update_id,
                    detail=r.detail,
                )
                for r in rows
            ]

    async def alert_to_first_delivery(self, since: datetime) -> dict[int, float]:
        """Seconds from a monitoring alert's arrival (its draft, or its update when
        published at once) to the first delivery sent of the update it opened, per
        incident opened by an alert since `since`; incidents not yet delivered are left
        out."""
        first = (
            select(
                UpdateRow.incident_id.label("incident_id"),
                func.min(UpdateRow.id).label("update_id"),
            )
            .join(IncidentRow, IncidentRow.id == UpdateRow.incident_id)
            .where(IncidentRow.alert_key.is_not(None), IncidentRow.created_at >= since)
            .group_by(UpdateRow.incident_id)
            .subquery()
        )
        sent = (
            select(DeliveryRow.update_id, func.min(DeliveryRow.sent_at).label("sent_at"))
            .where(DeliveryRow.update_id == first.c.update_id, DeliveryRow.sent_at.is_not(None))
            .group_by(DeliveryRow.update_id)
            .subquery()
        )
        query = (
            select(
                first.c.incident_id,
                func.coalesce(DraftRow.created_at, UpdateRow.created_at),
                sent.c.sent_at,
            )
            .join(UpdateRow, UpdateRow.id == first.c.update_id)
            .join(sent, sent.c.update_id == first.c.update_id)
            .outerjoin(DraftRow, DraftRow.update_id == first.c.update_id)
        )
        async with self.sessions() as session:
            rows = (await session.execute(query)).all()
        return {
            incident_id: max(0.0, (sent_at - arrived).total_seconds())
            for incident_id, arrived, sent_at in rows
        }

    # -- the kill switch and retries ------------------------------------------------

    async def cancel_update(self, update_id: int, actor: str) -> int:
        """Stop an update's queued deliveries; returns how many were cancelled."""
        now = utcnow()
        async with self.transaction() as session:
            row = await session.get(UpdateRow, update_id)
            if row is None:
                raise NotFoundError(f"no update #{update_id}")
            row.cancelled_at = row.cancelled_at or now
            result = await session.execute(
                update(DeliveryRow)
                .where(
                    DeliveryRow.update_id == update_id,
                    DeliveryRow.state == DeliveryState.QUEUED.value,
                )
                .values(state=DeliveryState.CANCELLED.value, updated_at=now)
            )
            cancelled: int = result.rowcount  # type: ignore[attr-defined]
            await session.run_sync(
                lambda s: cancel_reminders_of(
                    s.connection(), update_id, why=f"update #{update_id} cancelled", now=now
                )
            )
            session.add(
                _audit_row(
                    now, actor, "cancel", row.incident_id, update_id, {"cancelled": cancelled}
                )
            )
            return cancelled

    async def retry_failed(
        self,
        incident_id: int,
        *,
        channel: str | None,
        deadline_seconds: dict[str, float],
        actor: str,
    ) -> tuple[int, int]:
        """Queue failed deliveries of the incident's latest update again.

        Failures of older updates are not retried: the latest update says what is true
        now, and a late "investigating" after "resolved" would mislead. Returns
        (requeued, skipped).
        """
        now = utcnow()
        async with self.transaction() as session:
            latest = await session.scalar(
                select(func.max(UpdateRow.id)).where(
                    UpdateRow.incident_id == incident_id, UpdateRow.cancelled_at.is_(None)
                )
            )
            conditions = [
                DeliveryRow.incident_id == incident_id,
                DeliveryRow.state.in_([s.value for s in FAILED_STATES]),
            ]
            if channel is not None:
                conditions.append(DeliveryRow.channel == channel)
            rows = (await session.scalars(select(DeliveryRow).where(*conditions))).all()
            requeued = skipped = 0
            for row in rows:
                if row.update_id != latest:
                    skipped += 1
                    continue
                row.state = DeliveryState.QUEUED.value
                row.attempts = 0
                row.next_attempt_at = None
                row.job_id = None  # its deliver job (procrastinate backend) is done
                row.deadline_at = now + timedelta(seconds=deadline_seconds.get(row.channel, 3600))
                row.updated_at = now
                requeued += 1
            channels = {channel} if channel else {r.channel for r in rows}
            if channels:
                await session.execute(
                    update(ChannelHealthRow)
                    .where(ChannelHealthRow.channel.in_(channels))
                    .values(broken_reason=None, broken_at=None)
                )
            session.add(
                _audit_row(
                    now,
                    actor,
                    "retry",
                    incident_id,
                    latest,
                    {"channel": channel, "requeued": requeued, "skipped": skipped},
                )
            )
            return requeued, skipped

    async def backup(self, target: Path) -> None:
        """A consistent online copy of the SQLite store."""
        if not is_sqlite(self.url):
            raise BroadcasterError("db backup copies SQLite stores; use pg_dump for PostgreSQL")
        database = Path(self.url.split("///", 1)[1])
        await asyncio.to_thread(backup_sqlite, database, target)
