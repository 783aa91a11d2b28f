"""Promised updates are never missed: what happens at each due time.

An update may promise the next one (`next_update_at`). Publishing it stores two
reminders with it (`reminders_for`): a **nudge** `cadence.nudge_before` ahead, telling the
team on its own chat channels (`cadence.notify`) what was last said and the command that
posts the next update; and a **holding** reminder at the promised time. If nothing was
posted by then, the incident's impact picks the policy (`cadence.holding`): publish the
`holding` template with a fresh promise, draft it for approval (and tell the team), or
only tell the team. A newer update settles the pending reminders (kept, or missed if it
came late) and makes its own; a resolution ends them.

*When* reminders fire is the dispatch backend's business (`ReminderSchedule`): in the
embedded default, `serve` looks at the store while it holds the scheduler lease, so a
second `serve` on the same store never fires too. Firing is safe to repeat: a holding
update is published under a publish key made of the incident and the due time, so a
crash between publishing it and settling its reminder never posts it twice. A due time
found later than `cadence.grace` (nothing was running) is reported as missed instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from broadcaster.errors import BroadcasterError, CheckFailedError, ConfigError
from broadcaster.models import (
    DEFAULT_TEMPLATES,
    ComponentState,
    Incident,
    IncidentKind,
    IncidentStatus,
    Reminder,
    ReminderKind,
    ReminderState,
    Update,
    UpdateRequest,
)
from broadcaster.store.reminders import (
    SCHEDULER_SOURCE,
    ReminderSettledError,
    ReminderStore,
    Wanted,
    answered_outcome,
)
from broadcaster.team import team_channel_problem, tell_team

if TYPE_CHECKING:
    from broadcaster.config import CadenceSettings
    from broadcaster.core import Broadcaster

__all__ = ["Clock", "Scheduler", "reminders_for"]

log = logging.getLogger("broadcaster.scheduler")
Clock = Callable[[], datetime]
StillMine = Callable[[], Awaitable[bool]]
HOLDING_TEMPLATE = "holding"


def utc_now() -> datetime:
    return datetime.now(UTC)


def field_time(value: str | None, timezone: str) -> datetime | None:
    """A time field (`starts_at`) as templates read it: ISO 8601, local to `timezone`
    when it has no offset; None when absent or not a time."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone))
    return moment.astimezone(UTC)


def before(moment: datetime, offset: timedelta, timezone: str) -> datetime:
    """`offset` before `moment`: whole days on the wall clock of `timezone` (24 h before
    02:00 is 02:00 the day before, even across a daylight-saving change), the rest in
    real time (90 min before is 90 real minutes before)."""
    days = timedelta(days=offset // timedelta(days=1))
    local = moment.astimezone(ZoneInfo(timezone))
    # Aware arithmetic within one zone is wall-clock arithmetic.
    return (local - days).astimezone(UTC) - (offset - days)


def reminders_for(
    status: IncidentStatus,
    fields: Mapping[str, str],
    next_update_at: datetime | None,
    cadence: CadenceSettings,
    *,
    timezone: str,
    now: datetime,
    opened_at: datetime | None = None,
) -> list[Wanted]:
    """The reminders an update asks for. Its promise (`next_update_at`): a holding
    reminder then, and a nudge before it if that is still ahead. A scheduled maintenance:
    its advance notices still ahead, and its start; one in progress: its end. An incident
    open since `opened_at`: its escalation, `cadence.escalate_after` later. A final
    status asks for none."""
    if status.is_final:
        return []
    wanted: list[Wanted] = []
    if next_update_at is not None:
        due = next_update_at.astimezone(UTC)
        nudge = due - cadence.nudge_before
        if nudge > now:
            wanted.append(Wanted(ReminderKind.NUDGE, nudge, due))
        wanted.append(Wanted(ReminderKind.HOLDING, due, due))
    starts = field_time(fields.get("starts_at"), timezone)
    ends = field_time(fields.get("ends_at"), timezone)
    if status is IncidentStatus.SCHEDULED and starts is not None:
        for offset in sorted(cadence.maintenance_notices, reverse=True):
            notice = before(starts, offset, timezone)
            if notice > now:
                wanted.append(Wanted(ReminderKind.NOTICE, notice, starts))
        wanted.append(Wanted(ReminderKind.START, starts, starts))
    if status is IncidentStatus.IN_PROGRESS and ends is not None:
        wanted.append(Wanted(ReminderKind.END, ends, ends))
    if (
        cadence.escalate_after is not None
        and opened_at is not None
        and status.kind is IncidentKind.INCIDENT
    ):
        due = opened_at.astimezone(UTC) + cadence.escalate_after
        wanted.append(Wanted(ReminderKind.ESCALATE, due, due))
    return wanted


def _at(when: datetime) -> str:
    return f"{when.astimezone(UTC):%H:%M} UTC"


def _minutes(delta: timedelta) -> str:
    minutes = max(0, round(delta.total_seconds() / 60))
    return f"{minutes} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _last_said(last: Update) -> str:
    said = last.fields.get("summary") or last.fields.get("details") or "(no summary)"
    return f"Last said at {_at(last.created_at)} by {last.actor} ({last.status.value}): {said}"


class Scheduler:
    """Fires due reminders of one broadcaster: nudges, holding updates, missed reports."""

    def __init__(self, broadcaster: Broadcaster, *, clock: Clock = utc_now) -> None:
        self.broadcaster = broadcaster
        self.cadence = broadcaster.settings.cadence
        self.reminders = ReminderStore(broadcaster.store)
        self.clock = clock
        teams = [("cadence.notify", t) for t in self.cadence.notify]
        teams += [("cadence.escalate_to", t) for t in self.cadence.escalate_to]
        for setting, target in teams:
            problem = team_channel_problem(broadcaster.channels, target, setting)
            if problem is not None:
                raise ConfigError(problem)

    async def fire_due(
        self, now: datetime | None = None, *, still_mine: StillMine | None = None
    ) -> list[Reminder]:
        """Fire every reminder due by `now` (default: the clock), oldest first; the
        reminders as settled (one settled meanwhile elsewhere is left out).

        `still_mine()` is asked before each reminder (the backend renews its lease): once
        it says no, another process fires the rest. One reminder that cannot be fired (a
        channel or template since removed from the config) is settled `missed` with the
        reason and the team told; it never holds up the others."""
        fixed = now
        fired = []
        for reminder in await self.reminders.due(now or self.clock()):
            if still_mine is not None and not await still_mine():
                break
            at = fixed or self.clock()  # a slow send earlier in the tick is not `now`
            try:
                settled = await self.fire(reminder, at)
            except BroadcasterError as exc:
                settled = await self._unfireable(reminder, at, exc)
            except Exception:  # the store is busy or briefly gone: pending, next tick
                log.exception("could not fire reminder #%d; retrying", reminder.id)
                continue
            if settled is not None:
                fired.append(settled)
        return fired

    async def _unfireable(
        self, reminder: Reminder, now: datetime, error: BroadcasterError
    ) -> Reminder | None:
        """Settle a reminder that cannot be fired (`missed`, with why) and tell the team,
        so it neither blocks the schedule nor fails again every second."""
        outcome = f"could not fire: {error}"
        log.error("reminder #%d of incident %d %s", reminder.id, reminder.incident_id, outcome)
        await self._tell(
            reminder,
            f"The scheduler could not post the {reminder.kind.value} due at "
            f"{_at(reminder.due_at)} for incident #{reminder.incident_id}: {error}. Post the "
            "next update yourself.",
        )
        if not await self.reminders.finish(reminder.id, ReminderState.MISSED, outcome, now=now):
            return None
        return reminder.model_copy(
            update={"state": ReminderState.MISSED, "outcome": outcome, "fired_at": now}
        )

    async def fire(self, reminder: Reminder, now: datetime) -> Reminder | None:
        """Do what one due reminder asks, then settle it; None if it was settled
        meanwhile."""
        incident = await self.broadcaster.store.get_incident(reminder.incident_id)
        last = incident.last_update
        if last is None or not self._still_wanted(reminder, incident, last):
            state, outcome = ReminderState.CANCELLED, "no longer wanted"
        elif (
            now - reminder.due_at > self.cadence.grace
            and reminder.kind is not ReminderKind.ESCALATE  # still unresolved: tell, late
        ):
            state = ReminderState.MISSED
            outcome = f"found {_minutes(now - reminder.due_at)} late: nothing was running"
            if reminder.kind is not ReminderKind.NUDGE:
                await self._tell(reminder, self._missed(reminder, incident))
        elif reminder.kind is ReminderKind.NUDGE and now >= reminder.promised_at:
            # Found after the promised time (the scheduler was down): the holding
            # reminder speaks now; a nudge would only be noise.
            state, outcome = ReminderState.CANCELLED, "the promised time came first"
        elif reminder.kind is ReminderKind.NUDGE:
            state, outcome = ReminderState.DONE, await self._nudge(reminder, incident, last, now)
        elif reminder.kind is ReminderKind.HOLDING:
            state, outcome = ReminderState.DONE, await self._hold(reminder, incident, last, now)
        elif reminder.kind is ReminderKind.ESCALATE:
            state, outcome = ReminderState.DONE, await self._escalate(reminder, incident, last)
        else:
            state, outcome = ReminderState.DONE, await self._maintenance(reminder, incident, last)
        # Settled already: by the update just published (in its transaction), or meanwhile
        # by a newer update or another process.
        if (
            not await self.reminders.finish(reminder.id, state, outcome, now=now)
            and (await self.reminders.get(reminder.id)).outcome != outcome
        ):
            return None
        log.info(
            "incident %d: %s reminder for %s %s: %s",
            incident.id,
            reminder.kind.value,
            _at(reminder.promised_at),
            state.value,
            outcome,
            extra={"incident_id": incident.id, "reminder": reminder.kind.value},
        )
        return reminder.model_copy(update={"state": state, "outcome": outcome, "fired_at": now})

    def _still_wanted(self, reminder: Reminder, incident: Incident, last: Update) -> bool:
        """Whether the incident's latest update still asks for this reminder (a newer
        update settles the others in its transaction; this is the safety net)."""
        wanted = reminders_for(
            last.status,
            last.fields,
            last.next_update_at,
            self.cadence,
            timezone=self.broadcaster.settings.timezone,
            now=datetime.min.replace(tzinfo=UTC),  # every notice, however close
            opened_at=incident.created_at,
        )
        return any(
            w.kind is reminder.kind
            and (w.due_at == reminder.due_at or w.kind is ReminderKind.ESCALATE)
            for w in wanted
        )

    def _missed(self, reminder: Reminder, incident: Incident) -> str:
        what, status = {
            ReminderKind.HOLDING: ("the update promised", incident.status),
            ReminderKind.NOTICE: ("the advance notice", IncidentStatus.SCHEDULED),
            ReminderKind.START: ("the start message", IncidentStatus.IN_PROGRESS),
            ReminderKind.END: ("the end message", IncidentStatus.COMPLETED),
        }[reminder.kind]
        return (
            f"Missed: {what} for {_at(reminder.promised_at)} on #{incident.id} "
            f"“{incident.title}” was not posted — the broadcaster was not running. Post it "
            f"now: {self._command(incident, status)}"
        )

    def _command(self, incident: Incident, status: IncidentStatus | None = None) -> str:
        """The CLI command that posts the next update of the incident."""
        command = f"broadcaster update {incident.id} --status {(status or incident.status).value}"
        if status is None or not status.is_final:
            command += ' --set summary="…"'
        return command + (" --next-update 30m" if incident.kind is IncidentKind.INCIDENT else "")

    def _policy(self, incident: Incident) -> str:
        return self.cadence.holding.get(incident.impact, "draft")

    async def _nudge(
        self, reminder: Reminder, incident: Incident, last: Update, now: datetime
    ) -> str:
        left = reminder.promised_at - now
        then = {
            "publish": "a holding update goes out by itself",
            "draft": "a holding update is drafted for approval",
            "off": "nothing goes out",
        }[self._policy(incident)]
        text = "\n".join(
            [
                f"Update due by {_at(reminder.promised_at)} (in {_minutes(left)}): incident "
                f"#{incident.id} “{incident.title}” ({incident.status.value}, "
                f"{incident.impact.value}).",
                _last_said(last),
                f"Post it: {self._command(incident)}",
                f"If nothing is posted by then, {then}.",
            ]
        )
        return await self._tell(reminder, text, done="nudged")

    async def _hold(
        self, reminder: Reminder, incident: Incident, last: Update, now: datetime
    ) -> str:
        policy = self._policy(incident)
        due = _at(reminder.promised_at)
        if policy == "off":
            text = (
                f"The update promised for {due} on incident #{incident.id} “{incident.title}” "
                f"is due and nothing was posted. Post one: {self._command(incident)}"
            )
            return await self._tell(reminder, text)
        request = UpdateRequest(
            status=incident.status,
            template=HOLDING_TEMPLATE,
            components=dict(last.components),
            fields={k: v for k, v in last.fields.items() if k.split(".")[0] == "summary"},
            next_update_at=now + self.cadence.holding_next_update_in,
            channels=list(last.channels),
            publish_key=f"holding:{incident.id}:{reminder.promised_at.isoformat()}",
            actor=SCHEDULER_SOURCE,
        )
        if policy == "draft":
            draft, _ = await self.broadcaster.store.create_draft(
                source=SCHEDULER_SOURCE,
                route="cadence",
                alert_key=None,
                incident_id=incident.id,
                request=request,
            )
            text = (
                f"The update promised for {due} on incident #{incident.id} “{incident.title}” "
                f"is due and nothing was posted. A holding update waits for approval: "
                f"broadcaster approve {draft.id} — or post your own: "
                f"{self._command(incident)}"
            )
            told = await self._tell(reminder, text)
            return f"holding draft #{draft.id}; {told}"
        return await self._publish(reminder, incident, request)

    async def _maintenance(self, reminder: Reminder, incident: Incident, last: Update) -> str:
        """A maintenance's notice again, its start or its end, as the scheduler posts it."""
        status = {
            ReminderKind.NOTICE: IncidentStatus.SCHEDULED,
            ReminderKind.START: IncidentStatus.IN_PROGRESS,
            ReminderKind.END: IncidentStatus.COMPLETED,
        }[reminder.kind]
        template = last.template if status is last.status else DEFAULT_TEMPLATES[status]
        spec = self.broadcaster.library.get(template)
        known = {*spec.required, *spec.optional}
        components = dict(last.components)
        if status is IncidentStatus.COMPLETED:
            components = dict.fromkeys(components, ComponentState.OPERATIONAL)
        request = UpdateRequest(
            status=status,
            template=template,
            components=components,
            fields={k: v for k, v in last.fields.items() if k.split(".")[0] in known},
            channels=list(last.channels),
            publish_key=f"{reminder.kind.value}:{incident.id}:{reminder.due_at.isoformat()}",
            actor=SCHEDULER_SOURCE,
        )
        return await self._publish(reminder, incident, request)

    async def _publish(self, reminder: Reminder, incident: Incident, request: UpdateRequest) -> str:
        """Publish the scheduler's update, settling the reminder in its transaction (a
        repeat finds the publish key taken); the checks refusing it tell the team."""
        try:
            result = await self.broadcaster.publish(
                request, incident.id, keeps_reminder=reminder.id
            )
        except ReminderSettledError:
            # Someone posted (or resolved) while this was prepared: theirs stands.
            return "settled meanwhile by a newer update"
        except CheckFailedError as exc:
            problem = "; ".join(str(f) for f in exc.failures)
            await self._tell(
                reminder,
                f"The scheduled {reminder.kind.value} update of #{incident.id} was refused by "
                f"the checks ({problem}). Post it now: "
                f"{self._command(incident, request.status)}",
            )
            return f"{reminder.kind.value} update refused: {problem}"
        return answered_outcome(reminder.kind, result.update.id)

    async def _escalate(self, reminder: Reminder, incident: Incident, last: Update) -> str:
        """Tell the escalation channels that the incident has been open this long."""
        opened = _minutes(reminder.due_at - incident.created_at)
        text = "\n".join(
            [
                f"Escalation: incident #{incident.id} “{incident.title}” has been unresolved "
                f"for {opened} ({incident.status.value}, {incident.impact.value}).",
                _last_said(last),
            ]
        )
        targets = self.cadence.escalate_to or self.cadence.notify
        return await self._tell(reminder, text, done="escalated to", targets=targets)

    async def channel_broken(self, channel: str, reason: str) -> None:
        """Tell the team (on its channels other than the broken one) that a channel
        stopped: its deliveries wait until it is fixed."""
        targets = [t for t in self.cadence.notify if t != channel]
        text = (
            f"Channel '{channel}' is broken and sends nothing: {reason}. Its deliveries stay "
            f"queued (a configured fallback takes its subscribers). Fix it — `broadcaster "
            f"doctor` checks the credentials — then restart `broadcaster serve`."
        )
        for target in targets:
            error = await self._send(target, text, reference=f"broken:{channel}")
            if error is not None:
                log.warning("%s: could not tell the team that %s broke: %s", target, channel, error)

    async def _tell(
        self,
        reminder: Reminder,
        text: str,
        *,
        done: str = "told",
        targets: list[str] | None = None,
    ) -> str:
        """Send to the team channels (default: cadence.notify); what happened, for the
        reminder's outcome."""
        targets = self.cadence.notify if targets is None else targets
        if not targets:
            return "no team channel (cadence.notify)"
        results = []
        for target in targets:
            error = await self._send(target, text, reference=f"{reminder.id}:{reminder.kind}")
            results.append(f"{done} {target}" if error is None else f"{target} failed: {error}")
        return "; ".join(results)

    async def _send(self, target: str, text: str, *, reference: str) -> str | None:
        channel = self.broadcaster.channels[target]
        try:
            return await tell_team(channel, text, kind="reminder", reference=reference)
        except Exception as exc:  # a team channel down must not stop the schedule
            log.exception("%s: could not tell the team", target)
            return type(exc).__name__
