"""Reminders in the store: the due times of promised updates, kept with the update that
promised them (in its transaction), and what became of each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.orm import Session

from broadcaster.errors import BroadcasterError
from broadcaster.models import DraftState, Reminder, ReminderKind, ReminderState
from broadcaster.store.tables import DRAFTS, REMINDERS, UPDATES, utcnow

if TYPE_CHECKING:
    from broadcaster.store.store import Store

__all__ = [
    "SCHEDULER_SOURCE",
    "ReminderSettledError",
    "ReminderStore",
    "Wanted",
    "answered_outcome",
    "cancel_reminders_of",
    "settle_promises",
]

SCHEDULER_SOURCE = "scheduler"  # drafts and updates the scheduler makes
_PENDING = ReminderState.PENDING.value
# A reminder that did not fire may be wanted again (a promise moved back to 14:30).
_REVIVABLE = (ReminderState.CANCELLED.value, ReminderState.KEPT.value)


class ReminderSettledError(BroadcasterError):
    """The reminder an update was to answer was settled meanwhile (a person posted, or
    resolved): the update is not stored."""


@dataclass(frozen=True)
class Wanted:
    """A reminder an update asks for."""

    kind: ReminderKind
    due_at: datetime
    promised_at: datetime


def _model(row: Any) -> Reminder:
    return Reminder(
        id=row.id,
        incident_id=row.incident_id,
        update_id=row.update_id,
        kind=ReminderKind(row.kind),
        due_at=row.due_at,
        promised_at=row.promised_at,
        state=ReminderState(row.state),
        fired_at=row.fired_at,
        outcome=row.outcome,
    )


def _key(kind: str, due_at: datetime) -> tuple[str, datetime | None]:
    """What makes two reminders the same: kind and time; an incident escalates once."""
    return (kind, None if kind == ReminderKind.ESCALATE.value else due_at)


def settle_promises(
    conn: Connection,
    incident_id: int,
    update_id: int,
    wanted: Sequence[Wanted],
    *,
    now: datetime,
    actor: str,
    answers: int | None = None,
) -> None:
    """A new update of the incident replaces its pending reminders with `wanted`.

    A pending holding reminder not wanted any more was a promise: kept if this update
    came by its time, missed if after; other kinds are cancelled — and the one this
    update `answers` (the scheduler's own update: a holding update, a maintenance notice,
    start or end message) is `done`. Wanted reminders already pending stay (now the new
    update's); one that fired already for that time is not made again. A holding draft
    the scheduler made for the incident and nobody approved is obsolete now.

    With `answers`, that reminder must still be pending, or ReminderSettledError rolls
    the whole publish back: a person's update (or resolution) that came first wins."""
    table = REMINDERS
    if answers is not None:
        taken = conn.execute(
            update(table)
            .where(table.c.id == answers, table.c.state == _PENDING)
            .values(state=ReminderState.DONE.value, fired_at=now)
        ).rowcount
        if taken != 1:
            raise ReminderSettledError(f"reminder #{answers} was settled meanwhile")
        kind = ReminderKind(
            conn.execute(select(table.c.kind).where(table.c.id == answers)).scalar_one()
        )
        conn.execute(
            update(table)
            .where(table.c.id == answers)
            .values(outcome=answered_outcome(kind, update_id))
        )
    conn.execute(
        update(DRAFTS)
        .where(
            DRAFTS.c.incident_id == incident_id,
            DRAFTS.c.source == SCHEDULER_SOURCE,
            DRAFTS.c.state == DraftState.PENDING.value,
        )
        .values(state=DraftState.OBSOLETE.value, decided_by=actor, decided_at=now)
    )
    keys = {_key(w.kind.value, w.due_at): w for w in wanted}
    pending = conn.execute(
        select(table.c.id, table.c.kind, table.c.due_at).where(
            table.c.incident_id == incident_id, table.c.state == _PENDING
        )
    ).all()
    for row in pending:
        if keys.pop(_key(row.kind, row.due_at), None) is not None:
            conn.execute(update(table).where(table.c.id == row.id).values(update_id=update_id))
            continue
        if row.kind == ReminderKind.HOLDING.value:
            state = ReminderState.KEPT if now <= row.due_at else ReminderState.MISSED
            outcome = f"update #{update_id} posted" + (" late" if now > row.due_at else "")
        else:
            state, outcome = ReminderState.CANCELLED, f"update #{update_id} posted"
        conn.execute(
            update(table)
            .where(table.c.id == row.id)
            .values(state=state.value, fired_at=now, outcome=outcome)
        )
    for want in keys.values():
        same = [table.c.incident_id == incident_id, table.c.kind == want.kind.value]
        if want.kind is not ReminderKind.ESCALATE:  # an incident escalates once, whenever
            same.append(table.c.due_at == want.due_at)
        known = conn.execute(select(table.c.id, table.c.state).where(*same)).first()
        if known is None:
            conn.execute(
                insert(table).values(
                    incident_id=incident_id,
                    update_id=update_id,
                    kind=want.kind.value,
                    due_at=want.due_at,
                    promised_at=want.promised_at,
                    state=_PENDING,
                    created_at=now,
                )
            )
        elif known.state in _REVIVABLE:
            conn.execute(
                update(table)
                .where(table.c.id == known.id)
                .values(state=_PENDING, update_id=update_id, fired_at=None, outcome=None)
            )


def answered_outcome(kind: ReminderKind, update_id: int) -> str:
    """What a reminder answered by an update (its `answers`) says it did."""
    what = {
        ReminderKind.HOLDING: "holding update",
        ReminderKind.NOTICE: "advance notice",
        ReminderKind.START: "start message",
        ReminderKind.END: "end message",
    }.get(kind, "update")
    return f"{what} #{update_id}"


def cancel_reminders_of(conn: Connection, update_id: int, *, why: str, now: datetime) -> None:
    """Cancel the pending reminders an update's promise made (it was retracted)."""
    conn.execute(
        update(REMINDERS)
        .where(REMINDERS.c.update_id == update_id, REMINDERS.c.state == _PENDING)
        .values(state=ReminderState.CANCELLED.value, fired_at=now, outcome=why)
    )


class ReminderStore:
    """Reading and settling reminders."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def incident_of(self, update_id: int) -> int:
        """The incident an update belongs to."""
        return await self.store.read_session(
            lambda s: int(
                s.execute(
                    select(UPDATES.c.incident_id).where(UPDATES.c.id == update_id)
                ).scalar_one()
            )
        )

    async def restore(
        self, incident_id: int, update_id: int, wanted: Sequence[Wanted], *, actor: str
    ) -> None:
        """Make the incident's pending reminders `wanted`, as `update_id` asks for them (its
        latest live update, once a later one was cancelled or retracted)."""
        await self.store.write_connection(
            lambda conn: settle_promises(
                conn, incident_id, update_id, wanted, now=utcnow(), actor=actor
            )
        )

    async def due(self, now: datetime, *, limit: int = 100) -> list[Reminder]:
        """Pending reminders whose time has come, oldest first."""

        def read(session: Session) -> list[Reminder]:
            rows = session.execute(
                select(REMINDERS)
                .where(REMINDERS.c.state == _PENDING, REMINDERS.c.due_at <= now)
                .order_by(REMINDERS.c.due_at, REMINDERS.c.id)
                .limit(limit)
            ).all()
            return [_model(r) for r in rows]

        return await self.store.read_session(read)

    async def next_due(self) -> datetime | None:
        """When the next pending reminder is due."""
        return await self.store.read_session(
            lambda s: s.execute(
                select(func.min(REMINDERS.c.due_at)).where(REMINDERS.c.state == _PENDING)
            ).scalar()
        )

    async def upcoming(self, *, limit: int = 100) -> list[Reminder]:
        """Pending reminders, soonest first: what `broadcaster schedule` shows."""

        def read(session: Session) -> list[Reminder]:
            rows = session.execute(
                select(REMINDERS)
                .where(REMINDERS.c.state == _PENDING)
                .order_by(REMINDERS.c.due_at, REMINDERS.c.id)
                .limit(limit)
            ).all()
            return [_model(r) for r in rows]

        return await self.store.read_session(read)

    async def get(self, reminder_id: int) -> Reminder:
        def read(session: Session) -> Reminder:
            row = session.execute(select(REMINDERS).where(REMINDERS.c.id == reminder_id)).one()
            return _model(row)

        return await self.store.read_session(read)

    async def of_incident(self, incident_id: int) -> list[Reminder]:
        def read(session: Session) -> list[Reminder]:
            rows = session.execute(
                select(REMINDERS)
                .where(REMINDERS.c.incident_id == incident_id)
                .order_by(REMINDERS.c.due_at, REMINDERS.c.id)
            ).all()
            return [_model(r) for r in rows]

        return await self.store.read_session(read)

    async def finish(
        self, reminder_id: int, state: ReminderState, outcome: str, *, now: datetime | None = None
    ) -> bool:
        """Settle a pending reminder; False when it was settled meanwhile (by a newer
        update, or by another process)."""

        def write(conn: Connection) -> bool:
            changed = conn.execute(
                update(REMINDERS)
                .where(REMINDERS.c.id == reminder_id, REMINDERS.c.state == _PENDING)
                .values(state=state.value, fired_at=now or utcnow(), outcome=outcome)
            ).rowcount
            return bool(changed)

        return await self.store.write_connection(write)

    async def counts(self) -> dict[tuple[ReminderKind, ReminderState], int]:
        """Reminders by kind and state, for /metrics."""

        def read(session: Session) -> dict[tuple[ReminderKind, ReminderState], int]:
            rows = session.execute(
                select(REMINDERS.c.kind, REMINDERS.c.state, func.count()).group_by(
                    REMINDERS.c.kind, REMINDERS.c.state
                )
            ).all()
            return {(ReminderKind(k), ReminderState(s)): int(n) for k, s, n in rows}

        return await self.store.read_session(read)
