"""The post-incident communication report: what was said, when, where, and whether it
arrived — for the post-mortem.

`build_report` gathers the facts through `Operations` only (so it works against the
local store and a remote `broadcaster serve` alike) into an `IncidentReport`;
`render_markdown`, `render_html` and `render_svg` present it (Jinja2, autoescaped for
HTML and SVG: incident titles, summaries and provider errors are untrusted text), and
`write_report` writes `incident-ID.md`, `incident-ID.html` and `incident-ID.svg`.

**When an incident started**: the first alert, when monitoring opened it (the alert's
own start, its `startsAt`, kept in the incident's alert key), else when it was opened.
**When a channel's first message went out**: the earliest post on it that reached
`sent` or `delivered`, at the time the provider accepted it (`sent_at`; a delivery
recorded before that column was kept counts from its last change).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from pydantic import BaseModel, Field

from broadcaster.errors import BroadcasterError
from broadcaster.models import (
    FAILED_STATES,
    SUCCESS_STATES,
    AuditEntry,
    ChannelProgress,
    Delivery,
    DeliveryAction,
    DeliveryState,
    Incident,
    IncidentStatus,
    Reminder,
    ReminderKind,
    ReminderState,
    Update,
)
from broadcaster.scheduler import HOLDING_TEMPLATE
from broadcaster.store.reminders import SCHEDULER_SOURCE

if TYPE_CHECKING:
    from broadcaster.operations import Operations

__all__ = [
    "ChannelReport",
    "EventKind",
    "FailureReason",
    "IncidentReport",
    "Promise",
    "PromiseOutcome",
    "ReportFormat",
    "TimelineEvent",
    "build_report",
    "render_html",
    "render_markdown",
    "render_svg",
    "report_files",
    "write_report",
]

ReportFormat = Literal["md", "html", "both"]
_HOLDING_UPDATE = re.compile(r"holding update #(\d+)")
_RECIPIENTS_SHOWN = 5

# "channel → who: " at the start of a delivery's error (after "gave up after N …: ")
_PER_RECIPIENT = re.compile(r"[\w.-]+ → [^:]+: ")
# C0 and C1 control characters but tab and newline
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class EventKind(StrEnum):
    """What happened at one moment of the timeline."""

    ALERT = "alert"  # monitoring says the alert started firing
    ALERT_DRAFTED = "alert_drafted"  # the alert's update waited for a person to approve it
    APPROVED = "approved"  # a drafted (or held) update was released
    OPENED = "opened"
    UPDATE = "update"
    CORRECTION = "correction"
    HOLDING = "holding"  # the scheduler's update when a promised one did not come
    RESOLVED = "resolved"
    FIRST_MESSAGE = "first_message"
    PROMISE_KEPT = "promise_kept"
    PROMISE_MISSED = "promise_missed"
    PROMISE_HELD = "promise_held"
    CANCELLED = "cancelled"
    RETRACTED = "retracted"
    RETRIED = "retried"


# Among events at the same instant: the cause before its effects.
_EVENT_ORDER = list(EventKind)


class TimelineEvent(BaseModel):
    """One moment of the incident's communication."""

    at: datetime
    kind: EventKind
    text: str = Field(description="what happened, in a line")
    detail: str | None = Field(default=None, description="what was said, or why")
    update_id: int | None = None
    channel: str | None = None


class PromiseOutcome(StrEnum):
    """What became of a promised update ("next update by 14:30")."""

    KEPT = "kept"  # the team posted by the promised time
    MISSED = "missed"  # nothing went out by then (posted late, or only the team was told)
    HELD = "held"  # the scheduler posted a holding update at the promised time
    WITHDRAWN = "withdrawn"  # the update that made it was cancelled or retracted
    PENDING = "pending"  # still ahead: the incident is open


class Promise(BaseModel):
    """A promised next-update time and its outcome."""

    promised_at: datetime
    made_by: int = Field(description="the update that promised it")
    outcome: PromiseOutcome
    settled_at: datetime | None = Field(
        default=None, description="when it was kept, found missed, or held"
    )
    note: str | None = Field(default=None, description="the scheduler's account of it")
    holding_update: int | None = Field(default=None, description="held: the update posted")


class FailureReason(BaseModel):
    """Failed deliveries of one channel that share a reason."""

    reason: str
    state: DeliveryState
    count: int = Field(description="deliveries")
    recipient_count: int = Field(description="distinct recipients")
    recipients: list[str] = Field(description=f"the first {_RECIPIENTS_SHOWN} of them")


class ChannelReport(BaseModel):
    """One channel: its first message, its deliveries by state, and why some failed."""

    channel: str
    first_message_at: datetime | None = None
    time_to_first_message_seconds: float | None = Field(
        default=None, description="from the incident's start"
    )
    counts: dict[DeliveryState, int] = Field(default_factory=dict)
    actions: dict[DeliveryAction, int] = Field(
        default_factory=dict, description="deliveries by what they did (post, edit, delete…)"
    )
    failures: list[FailureReason] = Field(default_factory=list)
    broken: str | None = Field(default=None, description="why the channel is stopped, if it is")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def succeeded(self) -> int:
        return sum(self.counts.get(s, 0) for s in SUCCESS_STATES)

    @property
    def failed(self) -> int:
        return sum(self.counts.get(s, 0) for s in FAILED_STATES)


class IncidentReport(BaseModel):
    """Everything the post-incident communication report shows."""

    incident: Incident
    generated_at: datetime
    timezone: str = Field(description="IANA zone the times are shown in")
    started_at: datetime
    started_from: Literal["alert", "opened"] = Field(
        description="alert: monitoring's first alert; opened: a person opened it"
    )
    first_public_message_at: datetime | None = None
    first_public_message_channel: str | None = None
    time_to_first_message_seconds: float | None = None
    resolved_at: datetime | None = None
    duration_seconds: float | None = Field(default=None, description="start to resolution")
    timeline: list[TimelineEvent]
    channels: list[ChannelReport]
    promises: list[Promise]

    def promises_with(self, outcome: PromiseOutcome) -> list[Promise]:
        return [p for p in self.promises if p.outcome is outcome]


# -- gathering ----------------------------------------------------------------------------


async def build_report(
    ops: Operations,
    incident_id: int,
    *,
    timezone: str = "UTC",
    now: datetime | None = None,
) -> IncidentReport:
    """Gather one incident's communication facts through `ops` (local or remote)."""
    zone = report_zone(timezone)  # an unknown zone fails here, before any request
    incident = await ops.incident(incident_id)  # NotFoundError for an unknown incident
    progress, failed, first_messages, audit, reminders = await asyncio.gather(
        ops.progress(incident_id),
        ops.deliveries(incident_id, states=FAILED_STATES),
        ops.first_messages(incident_id),  # one aggregate: not every delivery sent
        ops.audit(incident_id),
        ops.reminders(incident_id),
    )
    started_at, started_from = _start(incident)
    channels = _channels(incident, progress, failed, first_messages, started_at)
    delivered = [c for c in channels if c.first_message_at is not None]
    first = min(delivered, key=lambda c: (c.first_message_at, c.channel), default=None)
    promises = _promises(reminders)
    resolved_at = incident.resolved_at if incident.status.is_final else None
    return IncidentReport(
        incident=incident,
        generated_at=now or datetime.now(UTC),
        timezone=timezone,
        started_at=started_at,
        started_from=started_from,
        first_public_message_at=first.first_message_at if first else None,
        first_public_message_channel=first.channel if first else None,
        time_to_first_message_seconds=first.time_to_first_message_seconds if first else None,
        resolved_at=resolved_at,
        duration_seconds=_seconds(resolved_at - started_at) if resolved_at else None,
        timeline=_timeline(incident, started_at, started_from, first, audit, promises, zone),
        channels=channels,
        promises=promises,
    )


def report_zone(name: str) -> ZoneInfo:
    """The zone a report shows its times in; BroadcasterError for an unknown name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BroadcasterError(
            f"unknown time zone '{name}' — use an IANA name such as 'Europe/Paris'"
        ) from None


def _seconds(delta: timedelta) -> float:
    return max(0.0, delta.total_seconds())


def alert_started_at(alert_key: str | None) -> datetime | None:
    """When the alert episode that opened an incident started firing, per monitoring
    (its key is `group|start`); None when the incident was not opened by an alert."""
    if not alert_key or "|" not in alert_key:
        return None
    try:
        started = datetime.fromisoformat(alert_key.rpartition("|")[2])
    except ValueError:
        return None
    return started if started.tzinfo is not None else started.replace(tzinfo=UTC)


def _start(incident: Incident) -> tuple[datetime, Literal["alert", "opened"]]:
    alerted = alert_started_at(incident.alert_key)
    # A monitoring clock ahead of ours must not start the incident after it was opened.
    if alerted is not None and alerted <= incident.created_at:
        return alerted, "alert"
    if alerted is not None:
        return incident.created_at, "alert"
    return incident.created_at, "opened"


def _channels(
    incident: Incident,
    progress: Sequence[ChannelProgress],
    failed: Sequence[Delivery],
    first_messages: Mapping[str, datetime],
    started_at: datetime,
) -> list[ChannelReport]:
    names: dict[str, None] = {}
    for update in incident.updates:
        names.update(dict.fromkeys(update.channels))
    names.update(dict.fromkeys(p.channel for p in progress))
    reports = {name: ChannelReport(channel=name) for name in names}
    for item in progress:
        report = reports[item.channel]
        for state, count in item.counts.items():
            report.counts[state] = report.counts.get(state, 0) + count
        report.actions[item.action] = report.actions.get(item.action, 0) + item.total
        report.broken = report.broken or item.broken
    for name, accepted in first_messages.items():
        reports.setdefault(name, ChannelReport(channel=name)).first_message_at = accepted
    for report in reports.values():
        if report.first_message_at is not None:
            report.time_to_first_message_seconds = _seconds(report.first_message_at - started_at)
    groups: dict[tuple[str, str, DeliveryState], list[Delivery]] = {}
    for delivery in sorted(failed, key=lambda d: d.id):
        # Without who it was ("sms → subscriber #17: "): one reason, however many had it.
        reason = _PER_RECIPIENT.sub("", delivery.last_error or "").strip() or "no reason recorded"
        groups.setdefault((delivery.channel, reason, delivery.state), []).append(delivery)
    for (name, reason, state), deliveries in groups.items():
        report = reports.setdefault(name, ChannelReport(channel=name))
        recipients = list(dict.fromkeys(d.recipient for d in deliveries))
        report.failures.append(
            FailureReason(
                reason=reason,
                state=state,
                count=len(deliveries),
                recipient_count=len(recipients),
                recipients=recipients[:_RECIPIENTS_SHOWN],
            )
        )
    for report in reports.values():
        report.failures.sort(key=lambda f: (-f.count, f.reason))
    return list(reports.values())


def _promises(reminders: Iterable[Reminder]) -> list[Promise]:
    """Each promised time (the holding reminder at it; nudges are the team's business)."""
    promises = []
    for reminder in reminders:
        if reminder.kind is not ReminderKind.HOLDING:
            continue
        holding = None
        if reminder.state is ReminderState.KEPT:
            outcome = PromiseOutcome.KEPT
        elif reminder.state is ReminderState.MISSED:
            outcome = PromiseOutcome.MISSED
        elif reminder.state is ReminderState.DONE:
            found = _HOLDING_UPDATE.match(reminder.outcome or "")
            holding = int(found.group(1)) if found else None
            # A holding draft, or only the team told: the public heard nothing on time.
            outcome = PromiseOutcome.HELD if holding is not None else PromiseOutcome.MISSED
        elif reminder.state is ReminderState.CANCELLED:
            outcome = PromiseOutcome.WITHDRAWN
        else:
            outcome = PromiseOutcome.PENDING
        promises.append(
            Promise(
                promised_at=reminder.promised_at,
                made_by=reminder.update_id,
                outcome=outcome,
                settled_at=reminder.fired_at,
                note=reminder.outcome,
                holding_update=holding,
            )
        )
    return sorted(promises, key=lambda p: (p.made_by, p.promised_at))


def _update_event(update: Update, first: bool, zone: ZoneInfo) -> TimelineEvent:
    if update.status.is_final:
        kind, what = EventKind.RESOLVED, update.status.value.capitalize()
    elif first:
        kind, what = EventKind.OPENED, f"Opened: {update.status.value}"
    elif update.corrects is not None:
        kind, what = EventKind.CORRECTION, f"Correction of update #{update.corrects}"
    elif update.template == HOLDING_TEMPLATE and update.actor == SCHEDULER_SOURCE:
        kind, what = EventKind.HOLDING, "Holding update (the promised update had not come)"
    else:
        kind, what = EventKind.UPDATE, f"Update: {update.status.value}"
    text = f"{what} — update #{update.id} by {update.actor} to {', '.join(update.channels)}"
    if update.next_update_at is not None and not update.status.is_final:
        text += f"; next update promised by {_clock(update.next_update_at, zone)}"
    said = update.fields.get("summary") or update.fields.get("details")
    return TimelineEvent(
        at=update.created_at, kind=kind, text=text, detail=said, update_id=update.id
    )


def _audit_event(entry: AuditEntry, first_update: int | None) -> list[TimelineEvent]:
    detail = entry.detail
    if entry.action == "cancel":
        count = detail.get("cancelled", 0)
        return [
            TimelineEvent(
                at=entry.at,
                kind=EventKind.CANCELLED,
                text=f"Update #{entry.update_id} cancelled by {entry.actor} "
                f"({count} queued deliveries stopped)",
                update_id=entry.update_id,
            )
        ]
    if entry.action == "retract":
        return [
            TimelineEvent(
                at=entry.at,
                kind=EventKind.RETRACTED,
                text=f"Update #{entry.update_id} retracted by {entry.actor}",
                update_id=entry.update_id,
            )
        ]
    if entry.action == "retry":
        return [
            TimelineEvent(
                at=entry.at,
                kind=EventKind.RETRIED,
                text=f"Failed deliveries retried by {entry.actor} "
                f"({detail.get('requeued', 0)} queued again)",
                update_id=entry.update_id,
                channel=detail.get("channel"),
            )
        ]
    if entry.action not in ("approved", "published") or entry.update_id is None:
        return []
    source = detail.get("from", "monitoring")
    released = (
        f"Draft #{detail.get('draft')} ({source}) approved by {entry.actor}"
        if entry.action == "approved"
        else f"Held update #{detail.get('draft')} ({source}) went out when due"
    )
    events = [
        TimelineEvent(
            at=entry.at, kind=EventKind.APPROVED, text=released, update_id=entry.update_id
        )
    ]
    drafted = _parse_time(detail.get("drafted_at"))
    if drafted is not None and entry.update_id == first_update:
        events.append(
            TimelineEvent(
                at=drafted,
                kind=EventKind.ALERT_DRAFTED,
                text=f"Alert received ({source}); its update waited for approval",
                update_id=entry.update_id,
            )
        )
    return events


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _promise_event(promise: Promise, zone: ZoneInfo) -> TimelineEvent | None:
    promised = _clock(promise.promised_at, zone)
    if promise.outcome is PromiseOutcome.KEPT:
        # Placed when it was kept: right after the update that kept it.
        return TimelineEvent(
            at=promise.settled_at or promise.promised_at,
            kind=EventKind.PROMISE_KEPT,
            text=f"Promise kept: the update promised by {promised} came in time",
            detail=promise.note,
            update_id=promise.made_by,
        )
    if promise.outcome is PromiseOutcome.MISSED:
        return TimelineEvent(
            at=promise.promised_at,
            kind=EventKind.PROMISE_MISSED,
            text=f"Promise missed: no update by {promised}",
            detail=promise.note,
            update_id=promise.made_by,
        )
    if promise.outcome is PromiseOutcome.HELD:
        return TimelineEvent(
            at=promise.promised_at,
            kind=EventKind.PROMISE_HELD,
            text=f"Promise held: no update from the team by {promised}; the scheduler "
            f"posted holding update #{promise.holding_update}",
            update_id=promise.made_by,
        )
    return None


def _timeline(
    incident: Incident,
    started_at: datetime,
    started_from: str,
    first: ChannelReport | None,
    audit: Sequence[AuditEntry],
    promises: Sequence[Promise],
    zone: ZoneInfo,
) -> list[TimelineEvent]:
    events: list[TimelineEvent] = []
    if started_from == "alert":
        source = (incident.alert_key or "").rpartition("|")[0].partition(":")[0] or "monitoring"
        events.append(
            TimelineEvent(
                at=started_at, kind=EventKind.ALERT, text=f"Alert started firing ({source})"
            )
        )
    first_update = incident.updates[0].id if incident.updates else None
    for update in incident.updates:
        events.append(_update_event(update, update.id == first_update, zone))
    for entry in audit:
        events.extend(_audit_event(entry, first_update))
    if first is not None and first.first_message_at is not None:
        events.append(
            TimelineEvent(
                at=first.first_message_at,
                kind=EventKind.FIRST_MESSAGE,
                text=f"First public message out, on {first.channel}",
                channel=first.channel,
            )
        )
    for promise in promises:
        event = _promise_event(promise, zone)
        if event is not None:
            events.append(event)
    return sorted(events, key=lambda e: (e.at, _EVENT_ORDER.index(e.kind)))


# -- presenting ---------------------------------------------------------------------------


def _clock(moment: datetime, zone: ZoneInfo) -> str:
    """14:30 UTC (with seconds only when they are not :00)."""
    local = moment.astimezone(zone)
    shown = f"{local:%H:%M}" if local.second == 0 else f"{local:%H:%M:%S}"
    return f"{shown} {local:%Z}"


def describe_duration(seconds: float | None) -> str:
    """45 s, 3 min 12 s, 2 h 05 min, 1 d 3 h."""
    if seconds is None:
        return "—"
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


class _Presenter:
    """Times in the report's zone, with its abbreviation; the date only where it helps."""

    def __init__(self, report: IncidentReport) -> None:
        self.zone = ZoneInfo(report.timezone)
        moments = [report.started_at, *(e.at for e in report.timeline)]
        days = {m.astimezone(self.zone).date() for m in moments}
        self.one_day = len(days) == 1

    def when(self, moment: datetime | None) -> str:
        """Full date and time (headings)."""
        if moment is None:
            return "—"
        return f"{moment.astimezone(self.zone):%Y-%m-%d %H:%M:%S %Z}"

    def time(self, moment: datetime | None) -> str:
        """The time of day (tables), with the date when the incident spans days."""
        if moment is None:
            return "—"
        local = moment.astimezone(self.zone)
        return f"{local:%H:%M:%S %Z}" if self.one_day else f"{local:%Y-%m-%d %H:%M:%S %Z}"


def _markdown_escape(value: object) -> str:
    """Untrusted text as inline Markdown: no HTML, links, emphasis or table breaks."""
    text = " ".join(str(value).split())
    return re.sub(r"([\\`*_\[\]<>|~&])", r"\\\1", text)


def _counts_text(counts: dict[DeliveryState, int]) -> str:
    return ", ".join(f"{counts[s]} {s.value}" for s in DeliveryState if counts.get(s))


def _printable(value: object) -> object:
    """Every value a template prints, without control characters (an ESC in a title
    would be a terminal escape in the Markdown, and makes the SVG unreadable)."""
    if isinstance(value, str):
        cleaned = _CONTROL.sub("", value)
        return Markup(cleaned) if isinstance(value, Markup) else cleaned
    return value


@cache
def _environment(*, autoescape: bool) -> Environment:
    environment = Environment(
        loader=PackageLoader("broadcaster", "report_templates"),
        autoescape=autoescape,
        finalize=_printable,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["md"] = _markdown_escape
    environment.filters["duration"] = describe_duration
    environment.filters["counts"] = _counts_text
    return environment


def _context(report: IncidentReport) -> dict[str, object]:
    present = _Presenter(report)
    return {
        "r": report,
        "i": report.incident,
        "when": present.when,
        "time": present.time,
        "kept": report.promises_with(PromiseOutcome.KEPT),
        "missed": report.promises_with(PromiseOutcome.MISSED),
        "held": report.promises_with(PromiseOutcome.HELD),
        "zone": report.timezone,
    }


def render_markdown(report: IncidentReport, *, svg_name: str | None = None) -> str:
    """The report as Markdown (linking the chart `svg_name` when given)."""
    template = _environment(autoescape=False).get_template("report.md.j2")
    return template.render(**_context(report), svg_name=svg_name)


def render_html(report: IncidentReport) -> str:
    """The report as one self-contained HTML page, the timeline chart inline."""
    template = _environment(autoescape=True).get_template("report.html.j2")
    return template.render(**_context(report), svg=Markup(render_svg(report)))


# -- the timeline chart -------------------------------------------------------------------

_WIDTH = 960
_LEFT = 170  # row labels
_RIGHT = 64  # room for the resolution's label
_TOP = 100  # below the title, the start/end labels and two levels of update labels
_ROW = 30
_STATUS_COLOURS = {
    IncidentStatus.INVESTIGATING: "#d9480f",
    IncidentStatus.IDENTIFIED: "#e8590c",
    IncidentStatus.MONITORING: "#1971c2",
    IncidentStatus.RESOLVED: "#2f9e44",
    IncidentStatus.SCHEDULED: "#868e96",
    IncidentStatus.IN_PROGRESS: "#1971c2",
    IncidentStatus.COMPLETED: "#2f9e44",
}
_PROMISE_COLOURS = {
    PromiseOutcome.KEPT: "#2f9e44",
    PromiseOutcome.MISSED: "#e03131",
    PromiseOutcome.HELD: "#f59f00",
    PromiseOutcome.PENDING: "#868e96",
}
_TICK_STEPS = [
    1, 2, 5, 10, 15, 30,
    60, 120, 300, 600, 900, 1800,
    3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800,
]  # fmt: skip


@dataclass
class _Mark:
    x: float
    colour: str
    label: str
    title: str
    css: str
    hollow: bool = False  # a cancelled or retracted update
    label_y: float = 0.0  # offset from the row, for labels that would overlap


@dataclass
class _Row:
    label: str
    y: float
    marks: list[_Mark] = field(default_factory=list)
    bar: tuple[float, float] | None = None  # start to first message
    note: str | None = None


@dataclass
class _Tick:
    x: float
    label: str


@dataclass
class _LegendItem:
    x: float
    shape: Literal["circle", "diamond", "square"]
    colour: str
    text: str


@dataclass
class _Chart:
    width: int
    height: int
    left: int
    plot_end: int
    title: str
    subtitle: str
    rows: list[_Row]
    ticks: list[_Tick]
    axis_y: float
    start_x: float
    start_label: str
    end_x: float | None
    end_label: str | None
    legend_y: float
    legend: list[_LegendItem]


def _promise_moment(promise: Promise) -> datetime:
    """Where a promise is marked: a kept one when the update keeping it came, the others
    at the promised time (when it was missed, held, or is due)."""
    if promise.outcome is PromiseOutcome.KEPT and promise.settled_at is not None:
        return promise.settled_at
    return promise.promised_at


def _stagger(marks: list[_Mark], *, gap: float = 22.0) -> None:
    """Lift a label above its neighbour when they would overlap; drop it when two levels
    are not enough (its mark's tooltip still says it)."""
    last = [-math.inf, -math.inf]
    for mark in marks:
        level = next((i for i, x in enumerate(last) if mark.x - x >= gap), None)
        if level is None:
            mark.label = ""
            continue
        last[level] = mark.x
        mark.label_y = -10.0 - 11.0 * level


def _legend() -> list[_LegendItem]:
    items = [
        _LegendItem(
            0, "circle", _STATUS_COLOURS[IncidentStatus.MONITORING], "update (colour: status)"
        ),
        _LegendItem(0, "diamond", "#1971c2", "first message on a channel"),
        *(
            _LegendItem(0, "square", colour, f"promise {outcome.value}")
            for outcome, colour in _PROMISE_COLOURS.items()
        ),
    ]
    x = float(_LEFT)
    for item in items:
        item.x = x
        x += 22 + 6.2 * len(item.text)  # about the width of 11px text
    return items


def _chart(report: IncidentReport) -> _Chart:
    present = _Presenter(report)
    zone = present.zone
    incident = report.incident
    promises = [p for p in report.promises if p.outcome in _PROMISE_COLOURS]
    moments = [report.started_at, *(e.at for e in report.timeline)]
    moments += [_promise_moment(p) for p in promises]
    if report.resolved_at is not None:
        moments.append(report.resolved_at)
    low = min(moments)
    span = max((max(moments) - low).total_seconds(), 10.0)
    plot = _WIDTH - _LEFT - _RIGHT

    def x(moment: datetime) -> float:
        return round(_LEFT + (moment - low).total_seconds() / span * plot, 1)

    rows: list[_Row] = []
    y = float(_TOP)
    updates = _Row("updates", y)
    for update in incident.updates:
        withdrawn = (
            "retracted" if update.retracted_at else "cancelled" if update.cancelled_at else ""
        )
        updates.marks.append(
            _Mark(
                x=x(update.created_at),
                colour=_STATUS_COLOURS[update.status],
                label=f"#{update.id}",
                title=f"update #{update.id}: {update.status.value}"
                f"{f' ({withdrawn})' if withdrawn else ''} at "
                f"{present.time(update.created_at)} by {update.actor}",
                css="update",
                hollow=bool(withdrawn),
            )
        )
    _stagger(updates.marks)
    rows.append(updates)
    if promises:
        y += _ROW
        row = _Row("promised updates", y)
        for promise in promises:
            when = present.time(promise.promised_at)
            if promise.outcome is PromiseOutcome.KEPT:
                what = f"kept at {present.time(promise.settled_at)}"
            elif promise.outcome is PromiseOutcome.HELD:
                what = f"held: holding update #{promise.holding_update}"
            else:
                what = promise.outcome.value
            row.marks.append(
                _Mark(
                    x=x(_promise_moment(promise)),
                    colour=_PROMISE_COLOURS[promise.outcome],
                    label="",
                    title=f"update promised by {when} (in update #{promise.made_by}): {what}",
                    css=f"promise {promise.outcome.value}",
                )
            )
        rows.append(row)
    for channel in report.channels:
        y += _ROW
        row = _Row(channel.channel, y)
        if channel.first_message_at is not None:
            first = x(channel.first_message_at)
            after = describe_duration(channel.time_to_first_message_seconds)
            row.bar = (x(report.started_at), first)
            row.marks.append(
                _Mark(
                    x=first,
                    colour="#1971c2",
                    label=after,
                    title=f"{channel.channel}: first message at "
                    f"{present.time(channel.first_message_at)}, {after} after the start",
                    css="first-message",
                )
            )
        else:
            row.note = "no message delivered"
        rows.append(row)
    axis_y = y + _ROW
    step = next((s for s in _TICK_STEPS if span / s <= 8), _TICK_STEPS[-1])
    fmt = "%H:%M:%S" if step < 60 else ("%H:%M" if step < 86400 else "%m-%d")
    first_tick = math.ceil(low.timestamp() / step) * step
    ticks = [
        _Tick(x(moment), f"{moment.astimezone(zone):{fmt}}")
        for moment in (
            datetime.fromtimestamp(t, UTC)
            for t in range(int(first_tick), int(low.timestamp() + span) + 1, step)
        )
    ]
    subtitle = (
        f"#{incident.id}, {incident.status.value}, impact {incident.impact.value} — times in "
        f"{report.timezone} ({low.astimezone(zone):%Y-%m-%d})"
    )
    return _Chart(
        width=_WIDTH,
        height=int(axis_y + 64),
        left=_LEFT,
        plot_end=_WIDTH - _RIGHT,
        title=incident.title,
        subtitle=subtitle,
        rows=rows,
        ticks=ticks,
        axis_y=axis_y,
        start_x=x(report.started_at),
        start_label="first alert" if report.started_from == "alert" else "opened",
        end_x=x(report.resolved_at) if report.resolved_at else None,
        end_label=incident.status.value if report.resolved_at else None,
        legend_y=axis_y + 44,
        legend=_legend(),
    )


def render_svg(report: IncidentReport) -> str:
    """The timeline chart: a self-contained SVG (no fonts or scripts from elsewhere)."""
    template = _environment(autoescape=True).get_template("timeline.svg.j2")
    return template.render(chart=_chart(report)).strip() + "\n"


# -- files --------------------------------------------------------------------------------


def report_files(incident_id: int, fmt: ReportFormat) -> list[str]:
    """The file names one report writes."""
    names = []
    if fmt in ("md", "both"):
        names.append(f"incident-{incident_id}.md")
    if fmt in ("html", "both"):
        names.append(f"incident-{incident_id}.html")
    names.append(f"incident-{incident_id}.svg")
    return names


def write_report(report: IncidentReport, folder: Path, fmt: ReportFormat = "both") -> list[Path]:
    """Write the report's files into `folder` (made if missing); their paths. OSError when
    the folder cannot be written."""
    folder.mkdir(parents=True, exist_ok=True)
    svg_name = f"incident-{report.incident.id}.svg"
    rendered = {svg_name: render_svg(report)}
    for name in report_files(report.incident.id, fmt):
        if name.endswith(".md"):
            rendered[name] = render_markdown(report, svg_name=svg_name)
        elif name.endswith(".html"):
            rendered[name] = render_html(report)
    paths = []
    for name in report_files(report.incident.id, fmt):
        path = folder / name
        path.write_text(rendered[name], encoding="utf-8")
        paths.append(path)
    return paths
