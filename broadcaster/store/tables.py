"""SQLAlchemy 2 tables of the store. Times are stored as timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from broadcaster.models import AddressKind


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (which keeps no zone) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime,
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


class IncidentRow(Base):
    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    title: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20))
    impact: Mapped[str] = mapped_column(String(20))
    components: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]
    alert_key: Mapped[str | None] = mapped_column(
        String(500), doc="the monitoring alert episode that opened it: group|start"
    )
    alert_group: Mapped[str | None] = mapped_column(String(500), index=True)


class UpdateRow(Base):
    __tablename__ = "updates"

    id: Mapped[int] = mapped_column(primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"), index=True)
    seq: Mapped[int]
    status: Mapped[str] = mapped_column(String(20))
    impact: Mapped[str] = mapped_column(String(20))
    template: Mapped[str] = mapped_column(String(100))
    fields: Mapped[dict[str, Any]]
    components: Mapped[dict[str, Any]]
    next_update_at: Mapped[datetime | None]
    publish_key: Mapped[str | None] = mapped_column(String(500), unique=True)
    channels: Mapped[list[str]]
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    cancelled_at: Mapped[datetime | None]
    corrects: Mapped[int | None] = mapped_column(
        ForeignKey("updates.id"), doc="the update this one corrects (edits its posts)"
    )
    retracted_at: Mapped[datetime | None] = mapped_column(doc="its posts are being deleted")


class RenderRow(Base):
    """What was previewed is what is sent: each update's render per channel, stored once."""

    __tablename__ = "renders"

    update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    render: Mapped[dict[str, Any]]


class DeliveryRow(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_due", "channel", "state", "seq", "id"),
        Index("ix_deliveries_thread", "incident_id", "channel", "recipient", "seq"),
        Index("ix_deliveries_update_state", "update_id", "state"),
        Index("ix_deliveries_incident", "incident_id", "channel"),
        Index("ix_deliveries_target", "target_id"),
        Index("ix_deliveries_provider", "channel", "provider_id"),  # delivery receipts
        Index("ix_deliveries_job", "job_id"),  # the distributed backend's deliver jobs
        # What no deliver job has yet, in claim order: `assign` reads only these.
        Index(
            "ix_deliveries_unassigned",
            "channel",
            "seq",
            "id",
            postgresql_where=text("state = 'queued' AND job_id IS NULL"),
            sqlite_where=text("state = 'queued' AND job_id IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"))
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"))
    seq: Mapped[int] = mapped_column(Integer, doc="the update's seq, for order per thread")
    channel: Mapped[str] = mapped_column(String(100))
    recipient: Mapped[str] = mapped_column(String(300))
    language: Mapped[str | None] = mapped_column(String(20))
    delivery_key: Mapped[str] = mapped_column(String(64), unique=True)
    action: Mapped[str] = mapped_column(
        String(10), default="post", server_default="post", doc="post, edit or delete"
    )
    target_id: Mapped[int | None] = mapped_column(
        doc="edit/delete: the delivery whose post this changes"
    )
    state: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(doc="NULL: due now")
    lease_until: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None] = mapped_column(
        doc="NULL: created_at + the channel's deadline_seconds"
    )
    provider_id: Mapped[str | None] = mapped_column(String(300))
    permalink: Mapped[str | None] = mapped_column(Text)
    provider_data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime | None] = mapped_column(doc="NULL: unchanged since created")
    sent_at: Mapped[datetime | None]
    job_id: Mapped[int | None] = mapped_column(
        BigInteger, doc="procrastinate backend: the deliver job that sends it"
    )


class DraftRow(Base):
    """An update held for a human to approve (monitoring alerts, by default)."""

    __tablename__ = "drafts"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(50))
    route: Mapped[str] = mapped_column(String(100))
    alert_key: Mapped[str | None] = mapped_column(String(500))
    alert_group: Mapped[str | None] = mapped_column(String(500), index=True)
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id"))
    request: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(20), index=True)
    decided_by: Mapped[str | None] = mapped_column(String(200))
    decided_at: Mapped[datetime | None]
    update_id: Mapped[int | None] = mapped_column(ForeignKey("updates.id"))
    not_before: Mapped[datetime | None] = mapped_column(
        doc="state 'held' (flapping damping): published by itself at this time"
    )


class AuditRow(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(50))
    incident_id: Mapped[int | None] = mapped_column(index=True)
    update_id: Mapped[int | None]
    detail: Mapped[dict[str, Any]]


class LeaseRow(Base):
    """Who holds a named role (the dispatcher) until when."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime]


class RateReservationRow(Base):
    """A send time reserved under a shared rate limit (procrastinate backend): every
    worker on the store reserves from the same log, so a limit holds across nodes."""

    __tablename__ = "rate_reservations"
    __table_args__ = (Index("ix_rate_reservations_key_at", "key", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    key: Mapped[str] = mapped_column(String(400))
    at: Mapped[datetime]


class ChannelHealthRow(Base):
    """A channel found broken (credentials refused), so the operator sees why it stopped."""

    __tablename__ = "channel_health"

    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    broken_reason: Mapped[str | None] = mapped_column(Text)
    broken_at: Mapped[datetime | None]


class ReminderRow(Base):
    """A due time of an incident's promised update (a nudge, a holding update): stored
    with the update that promised it, so a restart fires what came due meanwhile, and
    unique per (incident, kind, time), so nothing fires twice for one due time."""

    __tablename__ = "reminders"
    __table_args__ = (
        UniqueConstraint("incident_id", "kind", "due_at", name="uq_reminders_due"),
        Index("ix_reminders_state_due", "state", "due_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"))
    update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"))
    kind: Mapped[str] = mapped_column(String(20))
    due_at: Mapped[datetime]
    promised_at: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime]
    fired_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(Text)


class SubscriberRow(Base):
    """A person who asked to be told. Their addresses live here only: deliveries name the
    subscriber by id, so erasing this row erases them."""

    __tablename__ = "subscribers"
    __table_args__ = (
        UniqueConstraint("telegram", name="uq_subscribers_telegram"),
        UniqueConstraint("webhook_url", name="uq_subscribers_webhook_url"),
        # An erased subscriber's id is never given again (deliveries name them by id).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    phone: Mapped[str | None] = mapped_column(String(20), unique=True, doc="E.164")
    email: Mapped[str | None] = mapped_column(String(320), unique=True)
    telegram: Mapped[str | None] = mapped_column(String(32), doc="user id")
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    language: Mapped[str] = mapped_column(String(20))
    components: Mapped[list[str] | None] = mapped_column(doc="NULL: every component")
    timezone: Mapped[str | None] = mapped_column(
        String(64), index=True, doc="indexed: a publish reads the distinct zones"
    )
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime | None]


class SubscriptionRow(Base):
    """A subscriber's consent for one channel; opting out keeps the row (until opt-in)."""

    __tablename__ = "subscriptions"
    __table_args__ = (Index("ix_subscriptions_fanout", "channel", "subscribed", "subscriber_id"),)

    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True
    )
    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    subscribed: Mapped[bool]
    changed_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(50), doc="cli, api, csv, sms STOP…")


class FanoutRow(Base):
    """An update's deliveries to a subscriber channel, created in batches: `cursor` is the
    last subscriber id done, so a crash resumes after it."""

    __tablename__ = "fanouts"

    update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(100), primary_key=True)
    cursor: Mapped[int] = mapped_column(default=0)
    state: Mapped[str] = mapped_column(String(20), index=True, doc="running, done, superseded")
    created: Mapped[int] = mapped_column(default=0, doc="deliveries created so far")


class PendingSubscriptionRow(Base):
    """A sign-up from the public form waiting for its confirmation (an email's link, an
    SMS code). Not a subscriber: fan-outs never read this table, so nothing is sent to
    an address before its owner confirms. Kept until it expires, then deleted."""

    __tablename__ = "pending_subscriptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    nonce: Mapped[str] = mapped_column(String(32), doc="in its token: an id reused is not it")
    kind: Mapped[str] = mapped_column(String(10), doc="phone or email")
    address: Mapped[str] = mapped_column(String(320))
    language: Mapped[str] = mapped_column(String(20))
    components: Mapped[list[str] | None] = mapped_column(doc="NULL: every component")
    code_hash: Mapped[str | None] = mapped_column(String(64), doc="SMS: keyed hash of the code")
    attempts: Mapped[int] = mapped_column(default=0, doc="wrong codes entered")
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    confirmed_at: Mapped[datetime | None]


class SelfServiceCountRow(Base):
    """Confirmation messages sent per UTC day: per address (by keyed hash) and all SMS
    codes together; in the store, so the caps hold across restarts and processes."""

    __tablename__ = "self_service_counts"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    count: Mapped[int] = mapped_column(default=0)


# The tables for Core statements on the hot paths (publish, claim, settle): no ORM
# unit of work, which cost more than the SQL itself.
DELIVERIES = cast(Table, DeliveryRow.__table__)
INCIDENTS = cast(Table, IncidentRow.__table__)
UPDATES = cast(Table, UpdateRow.__table__)
RENDERS = cast(Table, RenderRow.__table__)
AUDIT = cast(Table, AuditRow.__table__)
DRAFTS = cast(Table, DraftRow.__table__)
SUBSCRIBERS = cast(Table, SubscriberRow.__table__)
REMINDERS = cast(Table, ReminderRow.__table__)
SUBSCRIPTIONS = cast(Table, SubscriptionRow.__table__)
FANOUTS = cast(Table, FanoutRow.__table__)
PENDING_SUBSCRIPTIONS = cast(Table, PendingSubscriptionRow.__table__)
SELF_SERVICE_COUNTS = cast(Table, SelfServiceCountRow.__table__)
RATE_RESERVATIONS = cast(Table, RateReservationRow.__table__)


def address_column(kind: AddressKind) -> Column[Any]:
    """The subscribers' column holding addresses of this kind."""
    return SUBSCRIBERS.c[kind.field]
