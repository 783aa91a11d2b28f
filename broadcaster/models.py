"""Pydantic models of the vocabulary: incidents, updates, renders, checks, deliveries."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field


def _known_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone '{value}' — use an IANA name such as 'Europe/Paris'"
        ) from None
    return value


TimeZoneName = Annotated[str, AfterValidator(_known_timezone)]
"""An IANA time zone name, checked when the model is built."""


class IncidentKind(StrEnum):
    INCIDENT = "incident"
    MAINTENANCE = "maintenance"


class IncidentStatus(StrEnum):
    """Lifecycle state of an incident (the first four) or a maintenance (the last three)."""

    INVESTIGATING = "investigating"
    IDENTIFIED = "identified"
    MONITORING = "monitoring"
    RESOLVED = "resolved"
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"

    @property
    def is_final(self) -> bool:
        return self in (IncidentStatus.RESOLVED, IncidentStatus.COMPLETED)

    @property
    def kind(self) -> IncidentKind:
        if self in (IncidentStatus.SCHEDULED, IncidentStatus.IN_PROGRESS, IncidentStatus.COMPLETED):
            return IncidentKind.MAINTENANCE
        return IncidentKind.INCIDENT


DEFAULT_TEMPLATES = {
    IncidentStatus.SCHEDULED: "maintenance_scheduled",
    IncidentStatus.IN_PROGRESS: "maintenance_started",
    IncidentStatus.COMPLETED: "maintenance_completed",
}


class Impact(StrEnum):
    NONE = "none"
    MINOR = "minor"
    MAJOR = "major"
    CRITICAL = "critical"


class ComponentState(StrEnum):
    """The component states status-page users and Statuspage-compatible clients know."""

    OPERATIONAL = "operational"
    DEGRADED_PERFORMANCE = "degraded_performance"
    PARTIAL_OUTAGE = "partial_outage"
    MAJOR_OUTAGE = "major_outage"
    UNDER_MAINTENANCE = "under_maintenance"


class DeliveryAction(StrEnum):
    """What a delivery does to the channel: a new post, or a change to an earlier one."""

    POST = "post"
    EDIT = "edit"  # a correction, in place of the corrected update's post
    DELETE = "delete"  # a retraction of the update's post
    # A post on a subscriber channel's fallback, standing in for the delivery `target_id`
    # that could not go out on the subscriber's primary channel (never re-routed again).
    FALLBACK = "fallback"


class DeliveryState(StrEnum):
    """Where one delivery is: queued -> sending -> sent -> delivered, or a final failure."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    UNDELIVERED = "undelivered"
    # Final: a fallback delivery on another channel took it over (its last_error says
    # which and why), so it is never sent here, even once this channel works again.
    REROUTED = "rerouted"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"

    @property
    def is_pending(self) -> bool:
        """Still the dispatcher's business (not settled)."""
        return self in (DeliveryState.QUEUED, DeliveryState.SENDING)


PENDING_STATES = (DeliveryState.QUEUED, DeliveryState.SENDING)
FAILED_STATES = (DeliveryState.FAILED, DeliveryState.UNDELIVERED)
SUCCESS_STATES = (DeliveryState.SENT, DeliveryState.DELIVERED)


class ChannelFamily(StrEnum):
    """Which template variant a channel uses."""

    SHORT = "short"  # social posts, SMS
    CHAT = "chat"  # Slack, Telegram
    LONG = "long"  # email, status page, webhooks


class ChannelLimits(BaseModel):
    """What a provider accepts in one message; None means no such limit."""

    model_config = ConfigDict(frozen=True)

    max_graphemes: int | None = None
    max_chars: int | None = None
    max_sms_segments: int | None = None
    max_subject_chars: int | None = None
    link_length: int | None = Field(
        default=None, description="links count as this many graphemes, whatever their length"
    )


class Capabilities(BaseModel):
    """What an adapter can do beyond posting once."""

    model_config = ConfigDict(frozen=True)

    threads: bool = False
    edits: bool = False
    deletes: bool = False
    per_recipient: bool = False
    delivery_receipts: bool = False
    languages: Literal["joined", "each"] = Field(
        default="joined",
        description="joined: one message carries every configured language; "
        "each: one message per language (per-recipient or per-page)",
    )


class RateLimit(BaseModel):
    """Token buckets: one per (channel instance, target) and one for the whole account."""

    model_config = ConfigDict(frozen=True)

    per_target_per_second: float | None = None
    per_target_burst: int = 1
    global_per_second: float | None = None
    global_burst: int = 1


class ComponentStatus(BaseModel):
    name: str
    display_name: str
    state: ComponentState


class UpdateRequest(BaseModel):
    """What a person or a monitoring alert asks to publish (before it is checked and stored)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field must not vanish silently

    status: IncidentStatus
    template: str | None = Field(default=None, description="defaults to the status name")
    title: str | None = None
    impact: Impact | None = None
    components: dict[str, ComponentState] = Field(default_factory=dict)
    fields: dict[str, str] = Field(default_factory=dict)
    next_update_at: AwareDatetime | None = Field(
        default=None, description="the next update promised, with its time zone"
    )
    channels: list[str] | None = Field(default=None, description="None: the configured defaults")
    publish_key: str | None = None
    actor: str = "unknown"
    corrects: int | None = Field(
        default=None,
        description="the update this one corrects: channels that can edit change its posts "
        "in place, the others post this one as a follow-up",
    )

    @property
    def template_name(self) -> str:
        return self.template or DEFAULT_TEMPLATES.get(self.status, self.status.value)


class Update(BaseModel):
    """One published message about an incident; immutable once stored."""

    id: int
    incident_id: int
    seq: int
    status: IncidentStatus
    impact: Impact
    template: str
    fields: dict[str, str]
    components: dict[str, ComponentState]
    next_update_at: datetime | None
    publish_key: str | None
    channels: list[str]
    actor: str
    created_at: datetime
    cancelled_at: datetime | None = None
    corrects: int | None = None
    retracted_at: datetime | None = None


class Incident(BaseModel):
    id: int
    kind: IncidentKind
    title: str
    status: IncidentStatus
    impact: Impact
    components: dict[str, ComponentState]
    created_at: datetime
    resolved_at: datetime | None = None
    alert_key: str | None = None
    updates: list[Update] = Field(default_factory=list)

    @property
    def last_update(self) -> Update | None:
        live = [u for u in self.updates if u.cancelled_at is None]
        return live[-1] if live else None


class Rendered(BaseModel):
    """One update's words for one channel in one language."""

    language: str
    text: str
    subject: str | None = None


class Measure(BaseModel):
    """How the text that will be sent measures against the channel's limits."""

    language: str
    graphemes: int
    chars: int
    sms_segments: int | None = None
    sms_encoding: str | None = None

    def describe(self) -> str:
        parts = [f"{self.graphemes} graphemes", f"{self.chars} chars"]
        if self.sms_segments is not None:
            parts.append(f"{self.sms_segments} SMS segments ({self.sms_encoding})")
        return ", ".join(parts)


class ChannelRender(BaseModel):
    """An update rendered for one channel instance: a variant per configured language."""

    channel: str
    family: ChannelFamily
    template: str
    variants: list[Rendered]
    joined: bool = Field(description="the languages go out together in one message")
    measures: list[Measure] = Field(default_factory=list)
    facts: dict[str, Any] = Field(
        default_factory=dict, description="the structured update (title, status, components…)"
    )
    zoned: dict[str, list[Rendered]] = Field(
        default_factory=dict,
        description="subscriber channels: time zone -> the variants for subscribers there "
        "(the same words, with times in their zone)",
    )

    def in_zone(self, zone: str | None) -> ChannelRender:
        """The render as a subscriber in `zone` reads it: their zone's variants, if any
        were rendered for it, else the configured zone's."""
        variants = self.zoned.get(zone) if zone else None
        if not variants:
            return self
        return self.model_copy(update={"variants": variants, "zoned": {}})

    def text(self, language: str | None = None) -> str:
        """The text for one language, or every language joined (bilingual posts)."""
        if language is not None:
            return self.variant(language).text
        return "\n\n".join(v.text for v in self.variants)

    def subject(self, language: str | None = None) -> str | None:
        if language is not None:
            return self.variant(language).subject
        subjects = [v.subject for v in self.variants if v.subject]
        return " / ".join(subjects) if subjects else None

    def variant(self, language: str) -> Rendered:
        for v in self.variants:
            if v.language == language:
                return v
        return self.variants[0]

    def fact_rows(self, language: str) -> list[tuple[str, str, Any]]:
        """(key, heading, value) of the facts a chat card shows beside the text, in the
        words the core chose for `language` (`facts["labels"]`): status, impact,
        components (display name -> state), ETA, next update (an ISO time)."""
        labels = self.facts.get("labels", {}).get(language)
        if not labels:
            return []
        heading = labels["headings"]
        rows = [(key, heading[key], labels[key]) for key in ("status", "impact") if labels[key]]
        if labels["components"]:
            rows.append(("components", heading["components"], labels["components"]))
        if labels.get("eta"):
            rows.append(("eta", heading["eta"], labels["eta"]))
        if self.facts.get("next_update_at"):
            rows.append(("next_update", heading["next_update"], self.facts["next_update_at"]))
        return rows


class CheckFailure(BaseModel):
    """A rule an update broke, said so that a person can fix it."""

    channel: str | None
    check: str
    message: str
    measure: int | None = None
    limit: int | None = None

    def __str__(self) -> str:
        return f"{self.channel}: {self.message}" if self.channel else self.message


class Reach(BaseModel):
    """Whom a subscriber channel would reach with an update, and what it costs."""

    channel: str
    recipients: dict[str, int] = Field(description="rendered language -> subscribers")
    sms_segments: int | None = Field(default=None, description="SMS channels: in total")

    @property
    def total(self) -> int:
        return sum(self.recipients.values())


class Preview(BaseModel):
    """What publishing would send: every channel's render and every failed check, and
    how many subscribers each subscriber channel would reach."""

    request: UpdateRequest
    renders: list[ChannelRender]
    failures: list[CheckFailure]
    reach: list[Reach] = Field(default_factory=list)
    fallbacks: list[ChannelRender] = Field(
        default_factory=list,
        description="renders of fallback channels the update does not go to: what a "
        "subscriber re-routed there would receive",
    )

    @property
    def ok(self) -> bool:
        return not self.failures


class PostRef(BaseModel):
    """A post on a provider, as a follow-up needs to refer to it."""

    provider_id: str
    data: dict[str, str] = Field(default_factory=dict)


class Thread(BaseModel):
    """Where a follow-up goes: under the first post, after the latest one."""

    root: PostRef
    parent: PostRef


class Receipt(BaseModel):
    """What a provider said when it accepted a message."""

    provider_id: str | None = None
    permalink: str | None = None
    data: dict[str, str] = Field(
        default_factory=dict, description="opaque provider data a follow-up needs (Bluesky cid…)"
    )
    delivered: bool = Field(
        default=False, description="the provider confirmed receipt synchronously (webhook 2xx)"
    )


class Delivery(BaseModel):
    """One update to one channel for one recipient, and where it is."""

    id: int
    update_id: int
    incident_id: int
    channel: str
    recipient: str
    language: str | None
    delivery_key: str
    action: DeliveryAction = DeliveryAction.POST
    target_id: int | None = Field(
        default=None,
        description="the delivery this one acts on: the post an edit or delete changes, "
        "the delivery a fallback re-routes",
    )
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    provider_id: str | None
    permalink: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None = Field(
        default=None, description="when the provider accepted it (sent or delivered)"
    )


class Retraction(BaseModel):
    """What retracting an update does on one channel."""

    cancelled: int = Field(default=0, description="queued deliveries stopped")
    deleting: int = Field(default=0, description="posts being deleted")
    kept: int = Field(default=0, description="posts the channel cannot delete")


class AddressKind(StrEnum):
    """What a subscriber channel delivers to."""

    PHONE = "phone"  # E.164
    EMAIL = "email"
    TELEGRAM = "telegram"  # a Telegram user's private chat id
    WEBHOOK = "webhook"  # an https URL the subscriber registered

    @property
    def field(self) -> str:
        """The subscriber's field (and store column) holding this kind of address."""
        return "webhook_url" if self is AddressKind.WEBHOOK else self.value


class NewSubscriber(BaseModel):
    """A person who asked to be told, as the CLI, the API or a CSV row gives them."""

    model_config = ConfigDict(extra="forbid")

    phone: str | None = Field(default=None, description="any format; stored as E.164")
    email: str | None = None
    telegram: str | None = Field(
        default=None, description="a Telegram user id (their bot chat), set by /subscribe"
    )
    webhook_url: str | None = Field(
        default=None, description="an https URL that receives each update, signed"
    )
    language: str = Field(default="en", min_length=2, max_length=20)
    components: list[str] | None = Field(default=None, description="None: every component")
    timezone: TimeZoneName | None = None
    channels: list[str] | None = Field(
        default=None,
        description="the channels they agreed to; None: every subscriber channel "
        "they have an address for",
    )


class Subscriber(BaseModel):
    """A stored subscriber and the channels they are subscribed to (consent)."""

    id: int
    phone: str | None
    email: str | None
    telegram: str | None = None
    webhook_url: str | None = None
    language: str
    components: list[str] | None
    timezone: str | None
    channels: dict[str, bool] = Field(description="channel -> subscribed (False: opted out)")
    created_at: datetime
    webhook_secrets: dict[str, str] | None = Field(
        default=None,
        description="given once, to whoever registers a webhook URL (and in an export): "
        "webhook channel -> the secret this subscriber verifies its signatures with",
    )

    def address(self, kind: AddressKind) -> str | None:
        """Their address of this kind, if they gave one."""
        value: str | None = getattr(self, kind.field)
        return value


class RejectedRow(BaseModel):
    line: int
    reason: str


class ImportReport(BaseModel):
    """What a CSV import did: how many were added or updated, and each rejected row."""

    added: int = 0
    updated: int = 0
    rejected: list[RejectedRow] = Field(default_factory=list)


class ChannelProgress(BaseModel):
    """Deliveries of one channel counted by state, with the failures and their reasons."""

    channel: str
    action: DeliveryAction = DeliveryAction.POST
    counts: dict[DeliveryState, int]
    failures: list[Delivery] = Field(default_factory=list)
    broken: str | None = None
    held: int = Field(default=0, description="queued deliveries waiting for quiet hours to end")
    held_until: datetime | None = Field(
        default=None, description="when the last of the held deliveries goes out"
    )

    @property
    def label(self) -> str:
        """The channel, and what its deliveries do when they are not new posts."""
        if self.action is DeliveryAction.POST:
            return self.channel
        return f"{self.channel} ({self.action.value})"

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def pending(self) -> int:
        return sum(self.counts.get(s, 0) for s in PENDING_STATES)


class DraftState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    OBSOLETE = "obsolete"  # the alert resolved before anyone approved its opening
    HELD = "held"  # flapping damping: goes out by itself at `not_before`, if still true
    PUBLISHED = "published"  # a held update that went out when due


class Draft(BaseModel):
    """An update held for a human to approve before it goes out."""

    id: int
    created_at: datetime
    source: str
    route: str
    alert_key: str | None
    incident_id: int | None
    request: UpdateRequest
    state: DraftState
    decided_by: str | None = None
    decided_at: datetime | None = None
    update_id: int | None = None
    not_before: datetime | None = Field(
        default=None, description="a held update goes out at this time"
    )


class AuditEntry(BaseModel):
    """Who or what did what, when."""

    at: datetime
    actor: str
    action: str
    incident_id: int | None
    update_id: int | None
    detail: dict[str, Any] = Field(default_factory=dict)


class TemplateInfo(BaseModel):
    """A template as `broadcaster templates list` shows it."""

    name: str
    description: str
    required: list[str]
    optional: list[str]
    example: dict[str, str]


class ChannelInfo(BaseModel):
    """A configured channel as `broadcaster channels` shows it."""

    name: str
    type: str
    family: ChannelFamily
    languages: list[str]
    limits: dict[str, Any] = Field(description="only the limits the channel has")
    default: bool = Field(description="publishing goes here unless told otherwise")


class ReminderKind(StrEnum):
    """What the scheduler does at a due time of an incident."""

    NUDGE = "nudge"  # tell the team a promised update is due soon
    HOLDING = "holding"  # the promised time has come: a holding update (or a draft of one)
    NOTICE = "notice"  # a maintenance's advance notice, again (72 h, 24 h before…)
    START = "start"  # a maintenance window opens: "maintenance has begun"
    END = "end"  # a maintenance window closes: "maintenance is over"
    ESCALATE = "escalate"  # an incident unresolved this long: tell the escalation channels


class ReminderState(StrEnum):
    PENDING = "pending"  # waiting for its time
    DONE = "done"  # fired (a nudge sent, a holding update published or drafted)
    KEPT = "kept"  # the team posted the promised update in time: nothing to do
    CANCELLED = "cancelled"  # a newer promise, a resolution or a retraction replaced it
    MISSED = "missed"  # due while nothing could fire it, beyond the grace: reported


class Reminder(BaseModel):
    """A due time the scheduler keeps: one per incident, kind and time."""

    id: int
    incident_id: int
    update_id: int = Field(description="the update that made the promise")
    kind: ReminderKind
    due_at: datetime
    promised_at: datetime = Field(
        description="the time it is about: the next update promised, or a maintenance's "
        "start (notices, start) or end"
    )
    state: ReminderState
    fired_at: datetime | None = None
    outcome: str | None = Field(default=None, description="what firing did, or why it did not")
