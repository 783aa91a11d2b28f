"""The store: incidents, updates, renders, deliveries and the audit trail.

Every method is one transaction. Publishing stores the update, its renders and all its
deliveries before any provider is called, so a crash after it loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from broadcaster.errors import BroadcasterError, NotFoundError
from broadcaster.models import (
    FAILED_STATES,
    AuditEntry,
    ChannelProgress,
    ChannelRender,
    ComponentState,
    Delivery,
    DeliveryState,
    Draft,
    DraftState,
    Impact,
    Incident,
    IncidentKind,
    IncidentStatus,
    Update,
    UpdateRequest,
)
from broadcaster.store.engine import (
    WRITE_OPTION,
    backup_sqlite,
    create_engine,
    ensure_schema,
    is_sqlite,
)
from broadcaster.store.tables import (
    DELIVERIES,
    AuditRow,
    ChannelHealthRow,
    DeliveryRow,
    DraftRow,
    IncidentRow,
    RenderRow,
    UpdateRow,
    utcnow,
)


def _key(*parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:32]


def delivery_key(update_id: int, channel: str, recipient: str) -> str:
    """Identifies one delivery for providers that dedupe (Idempotency-Key, webhook-id)."""
    return _key("delivery", update_id, channel, recipient)


@dataclass
class ChannelPlan:
    """Where one channel delivers an update."""

    render: ChannelRender
    recipients: list[tuple[str, str | None]]  # (recipient id, language)


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
        state=DeliveryState(row.state),
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        provider_id=row.provider_id,
        permalink=row.permalink,
        last_error=row.last_error,
        created_at=row.created_at,
        updated_at=row.updated_at or row.created_at,
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

    @classmethod
    async def open(cls, url: str) -> Store:
        engine = create_engine(url)
        await ensure_schema(engine, url)
        return cls(engine, url)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """One writing Core transaction, for the dispatcher's hot path (no ORM session)."""
        async with self._write_lock, self.writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One writing transaction, committed on success, rolled back on error."""
        async with self._write_lock, self._write_sessions.begin() as session:
            yield session

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
            async with self.transaction() as session:
                return await self._publish(session, plan), True
        except IntegrityError:
            if plan.publish_key:
                existing = await self.find_by_publish_key(plan.publish_key)
                if existing:
                    return existing, False
            raise

    async def _publish(self, session: AsyncSession, plan: PublishPlan) -> Update:
        now = utcnow()
        if plan.incident_id is None:
            incident = IncidentRow(
                kind=plan.status.kind.value,
                title=plan.title,
                status=plan.status.value,
                impact=plan.impact.value,
                components={},
                created_at=now,
                alert_key=plan.alert_key,
                alert_group=alert_group(plan.alert_key),
            )
            session.add(incident)
            await session.flush()
        else:
            found = await session.get(IncidentRow, plan.incident_id)
            if found is None:
                raise NotFoundError(f"no incident #{plan.incident_id}")
            incident = found
        incident.title = plan.title
        incident.status = plan.status.value
        incident.impact = plan.impact.value
        incident.components = {k: v.value for k, v in plan.incident_components.items()}
        incident.resolved_at = now if plan.status.is_final else None
        seq = (
            await session.scalar(
                select(func.coalesce(func.max(UpdateRow.seq), 0)).where(
                    UpdateRow.incident_id == incident.id
                )
            )
            or 0
        ) + 1
        row = UpdateRow(
            incident_id=incident.id,
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
        )
        session.add(row)
        await session.flush()
        # Nobody should receive "investigating" after "resolved": what has not gone out
        # yet of this incident's older updates is superseded by this one.
        superseded = await session.execute(
            update(DeliveryRow)
            .where(
                DeliveryRow.incident_id == incident.id,
                DeliveryRow.channel.in_(list(plan.channels)),
                DeliveryRow.state == DeliveryState.QUEUED.value,
            )
            .values(state=DeliveryState.SUPERSEDED.value, updated_at=now)
        )
        for name, channel_plan in plan.channels.items():
            session.add(
                RenderRow(update_id=row.id, channel=name, render=channel_plan.render.model_dump())
            )
        await session.flush()
        deliveries = [
            {
                "update_id": row.id,
                "incident_id": incident.id,
                "seq": seq,
                "channel": name,
                "recipient": recipient,
                "language": language,
                "delivery_key": delivery_key(row.id, name, recipient),
                "state": DeliveryState.QUEUED.value,
                "attempts": 0,
                "created_at": now,
            }
            for name, channel_plan in plan.channels.items()
            for recipient, language in channel_plan.recipients
        ]
        if deliveries:
            await session.execute(insert(DELIVERIES), deliveries)
        session.add(
            _audit_row(
                now,
                plan.actor,
                "publish",
                incident.id,
                row.id,
                {
                    "status": plan.status.value,
                    "channels": list(plan.channels),
                    "deliveries": len(deliveries),
                    "superseded": superseded.rowcount,  # type: ignore[attr-defined]
                    "publish_key": plan.publish_key,
                },
            )
        )
        return _update_model(row)

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

    async def create_draft(
        self,
        *,
        source: str,
        route: str,
        alert_key: str | None,
        incident_id: int | None,
        request: UpdateRequest,
    ) -> tuple[Draft, bool]:
        """Hold an update for approval; a pending draft with the same publish key is
        returned instead of a second one. Returns (draft, new)."""
        async with self.transaction() as session:
            if request.publish_key:
                pending = (
                    await session.scalars(
                        select(DraftRow).where(DraftRow.state == DraftState.PENDING.value)
                    )
                ).all()
                for row in pending:
                    if row.request.get("publish_key") == request.publish_key:
                        return _draft_model(row), False
            row = DraftRow(
                created_at=utcnow(),
                source=source,
                route=route,
                alert_key=alert_key,
                alert_group=alert_group(alert_key),
                incident_id=incident_id,
                request=request.model_dump(mode="json"),
                state=DraftState.PENDING.value,
            )
            session.add(row)
            await session.flush()
            session.add(
                _audit_row(
                    row.created_at,
                    request.actor,
                    "draft",
                    incident_id,
                    None,
                    {"draft": row.id, "route": route, "status": request.status.value},
                )
            )
            return _draft_model(row), True

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
    ) -> None:
        """Record what became of a pending draft (and, once published, its incident)."""
        now = utcnow()
        async with self.transaction() as session:
            row = await session.get(DraftRow, draft_id)
            if row is None:
                raise NotFoundError(f"no draft #{draft_id}")
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
                select(DeliveryRow.channel, DeliveryRow.state, func.count())
                .where(*conditions)
                .group_by(DeliveryRow.channel, DeliveryRow.state)
            )
            by_channel: dict[str, dict[DeliveryState, int]] = {}
            for name, state, count in counts:
                by_channel.setdefault(name, {})[DeliveryState(state)] = count
            health = {
                h.channel: h.broken_reason
                for h in (await session.scalars(select(ChannelHealthRow))).all()
            }
            result = []
            for name in sorted(by_channel):
                failed_rows = (
                    await session.scalars(
                        select(DeliveryRow)
                        .where(
                            *conditions,
                            DeliveryRow.channel == name,
                            DeliveryRow.state.in_([s.value for s in FAILED_STATES]),
                        )
                        .order_by(DeliveryRow.id.desc())
                        .limit(failures)
                    )
                ).all()
                result.append(
                    ChannelProgress(
                        channel=name,
                        counts=by_channel[name],
                        failures=[delivery_model(r) for r in failed_rows],
                        broken=health.get(name),
                    )
                )
            return result

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
