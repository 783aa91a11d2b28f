"""The Python API: what the CLI (and scripts) do, in one place.

async with await Broadcaster.open() as b:
    result = await b.publish(UpdateRequest(status="investigating", title="API down",
                                           fields={"summary": "Requests fail"}))
    await b.wait([result.update.id])
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict

from broadcaster.adapters import build_channels
from broadcaster.alerts import AlertIntake
from broadcaster.audience import Audience
from broadcaster.config import Playbook, Settings, load_settings
from broadcaster.dispatch import DispatchBackend, EmbeddedBackend
from broadcaster.dispatch.backend import quiet_window
from broadcaster.errors import BroadcasterError, CheckFailedError, NotFoundError
from broadcaster.models import (
    AuditEntry,
    ChannelInfo,
    ChannelProgress,
    ChannelRender,
    CheckFailure,
    ComponentState,
    ComponentStatus,
    Delivery,
    DeliveryState,
    Draft,
    DraftState,
    Impact,
    ImportReport,
    Incident,
    IncidentKind,
    IncidentStatus,
    NewSubscriber,
    Preview,
    Reminder,
    Retraction,
    Subscriber,
    TemplateInfo,
    Update,
    UpdateRequest,
)
from broadcaster.operations import ProgressCallback
from broadcaster.scheduler import Scheduler, reminders_for
from broadcaster.store import ChannelPlan, DeliveryQueue, PublishPlan, Store
from broadcaster.store.reminders import SCHEDULER_SOURCE
from broadcaster.support import StoreSupportDesk
from broadcaster.templates import RenderContext, TemplateLibrary
from broadcaster.tokens import manage_url_maker, self_service_problems
from channels.base import Channel, ChannelContext

log = logging.getLogger("broadcaster.core")
RETENTION_CHECK_SECONDS = 3600.0

_IMPACT_OF_STATE = {
    ComponentState.MAJOR_OUTAGE: Impact.MAJOR,
    ComponentState.PARTIAL_OUTAGE: Impact.MINOR,
    ComponentState.DEGRADED_PERFORMANCE: Impact.MINOR,
    ComponentState.UNDER_MAINTENANCE: Impact.MINOR,
    ComponentState.OPERATIONAL: Impact.NONE,
}
_IMPACT_ORDER = list(Impact)


class PublishResult(BaseModel):
    """A published update; `new` is False when its publish key had been published before."""

    model_config = ConfigDict(frozen=True)

    incident: Incident
    update: Update
    new: bool


class DoctorCheck(BaseModel):
    """One line of `broadcaster doctor`."""

    model_config = ConfigDict(frozen=True)

    subject: str
    ok: bool
    detail: str


class Broadcaster:
    """Check, render, store and dispatch incident updates."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        channels: dict[str, Channel],
        library: TemplateLibrary,
    ) -> None:
        self.settings = settings
        self.store = store
        self.channels = channels
        self.library = library
        self.queue = DeliveryQueue(store)
        self.backend = self._backend()
        self.alerts = AlertIntake(self)
        self.scheduler = Scheduler(self)
        self.audience = Audience(
            store,
            channels,
            components=settings.components,
            default_region=settings.subscribers.default_region,
        )

    def _backend(self) -> DispatchBackend:
        if self.settings.backend == "procrastinate":
            from broadcaster.dispatch.distributed import ProcrastinateBackend

            return ProcrastinateBackend(
                self.store, self.channels, self.settings, on_broken=self._channel_broken
            )
        return EmbeddedBackend(
            self.store,
            self.channels,
            self.settings.dispatch,
            quiet=quiet_window(self.settings),
            on_broken=self._channel_broken,
        )

    @classmethod
    async def open(
        cls, config: Path | None = None, *, settings: Settings | None = None
    ) -> Broadcaster:
        """Load broadcaster.toml (or the given settings), open the store, build channels."""
        settings = settings or load_settings(config)
        base_dir = settings.resolve_path(Path("."))
        context = ChannelContext(
            base_dir=base_dir,
            data_dir=settings.resolve_path(settings.data_dir),
            public_url=settings.serve.public_url,
            # Every email links to the subscriber's manage page (self-service).
            manage_url=manage_url_maker(settings),
        )
        channels = build_channels(settings, context)
        templates_dir = (
            settings.resolve_path(settings.templates_dir) if settings.templates_dir else None
        )
        library = TemplateLibrary.with_shipped(templates_dir)
        store = await Store.open(settings.store_url)
        broadcaster = cls(settings, store, channels, library)
        await broadcaster.backend.open()
        context.render_public_site = broadcaster.render_public_site
        context.support_desk = StoreSupportDesk(broadcaster)
        # Everything built so far (settings, channels with maybe thousands of targets,
        # templates) lives as long as the process: move it out of the collector's way.
        # Walking it on every full collection cost ~20% of a 10,000-target fan-out.
        gc.freeze()
        return broadcaster

    async def close(self) -> None:
        await self.backend.close()
        await self.store.close()

    async def __aenter__(self) -> Broadcaster:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- checking and rendering -----------------------------------------------------

    def _channels_for(self, request: UpdateRequest) -> list[Channel]:
        names = request.channels or self.settings.default_channels or list(self.channels)
        for name in names:
            self._require_channel(name)
        if not names:
            raise BroadcasterError("no channels configured — add one to broadcaster.toml")
        return [self.channels[n] for n in names]

    def _require_channel(self, name: str) -> None:
        if name not in self.channels:
            raise NotFoundError(
                f"unknown channel '{name}' — configured: {', '.join(self.channels) or 'none'}"
            )

    def _check_components(self, components: dict[str, ComponentState]) -> None:
        known = self.settings.components
        unknown = [c for c in components if known and c not in known]
        if unknown:
            raise NotFoundError(
                f"unknown component '{unknown[0]}' — configured: {', '.join(known)}"
            )

    async def _plan(
        self, request: UpdateRequest, incident_id: int | None
    ) -> tuple[PublishPlan, Preview]:
        incident = await self.store.get_incident(incident_id) if incident_id is not None else None
        if (
            incident is not None
            and incident.kind is IncidentKind.MAINTENANCE
            and request.status is IncidentStatus.RESOLVED
        ):
            # "resolve" of a maintenance is its completion.
            request = request.model_copy(update={"status": IncidentStatus.COMPLETED})
        if incident is None:
            if not request.title:
                raise BroadcasterError("a new incident needs a title (--title)")
            if request.status.is_final:
                raise BroadcasterError("cannot open an incident as already resolved")
        elif incident.status.is_final and not request.status.is_final:
            raise BroadcasterError(
                f"incident #{incident.id} is {incident.status.value} — open a new incident"
            )
        if request.corrects is not None:
            self._check_correctable(incident, request.corrects)
            if request.next_update_at is None and incident is not None:
                # A correction keeps the promise of what it corrects, unless it makes one.
                corrected = next(u for u in incident.updates if u.id == request.corrects)
                request = request.model_copy(update={"next_update_at": corrected.next_update_at})
        self._check_components(request.components)
        current = dict(incident.components) if incident else {}
        if request.status.is_final:
            # Resolving means everything the incident touched works again, unless told.
            current = dict.fromkeys(current, ComponentState.OPERATIONAL)
        current.update(request.components)
        impact = request.impact or (
            incident.impact if incident else self._impact_from(request.components)
        )
        title = request.title or (incident.title if incident else "")
        template = request.template_name
        failures: list[CheckFailure] = list(self.library.check_fields(template, request.fields))
        context = RenderContext(
            incident_id=incident.id if incident else None,
            title=title,
            status=request.status,
            impact=impact,
            components=[
                ComponentStatus(
                    name=name, display_name=self.settings.components.get(name, name), state=state
                )
                for name, state in current.items()
            ],
            fields=request.fields,
            next_update_at=request.next_update_at,
            started_at=incident.created_at if incident else datetime.now(UTC),
            timezone=self.settings.timezone,
            status_page_url=self.settings.status_page_url,
        )
        facts = {
            "title": title,
            "status": request.status.value,
            "impact": impact.value,
            "components": {k: v.value for k, v in current.items()},
            "next_update_at": request.next_update_at.isoformat()
            if request.next_update_at
            else None,
            "status_page_url": self.settings.status_page_url,
            "corrects": request.corrects,
        }
        plans: dict[str, ChannelPlan] = {}
        renders = []
        fallbacks: dict[str, ChannelRender] = {}
        if not failures:
            chosen = self._channels_for(request)
            zones = await self._subscriber_zones([*chosen, *self.channels.values()])
            for channel in chosen:
                render, problems = self._render(template, channel, context, zones)
                render.facts = {
                    **facts,
                    "labels": self._fact_labels(channel.languages, facts, request.fields),
                }
                renders.append(render)
                failures.extend(problems)
                subscribers = channel.address_kind is not None
                plans[channel.name] = ChannelPlan(
                    render=render,
                    recipients=[]
                    if subscribers
                    else [(r.id, r.language) for r in channel.recipients()],
                    edits=channel.capabilities.edits,
                    fanout=subscribers,
                )
            # What a subscriber re-routed to a fallback channel the update does not go to
            # would receive: rendered, checked and previewed now like the rest, and stored
            # without deliveries (`PublishPlan.fallback_renders`).
            for source, name in self._fallbacks_for(plans):
                render, problems = self._render(template, self.channels[name], context, zones)
                languages = self.channels[name].languages
                render.facts = {
                    **facts,
                    "labels": self._fact_labels(languages, facts, request.fields),
                }
                fallbacks[name] = render
                failures.extend(
                    p.model_copy(update={"message": f"{p.message} (fallback of {source})"})
                    for p in problems
                )
        plan = PublishPlan(
            incident_id=incident.id if incident else None,
            title=title,
            status=request.status,
            impact=impact,
            components=dict(request.components),
            incident_components=current,
            template=template,
            fields=dict(request.fields),
            next_update_at=request.next_update_at,
            publish_key=request.publish_key,
            actor=request.actor,
            channels=plans,
            corrects=request.corrects,
            fallback_renders=fallbacks,
            opened_at=incident.created_at if incident else None,
        )
        preview = Preview(
            request=request, renders=renders, failures=failures, fallbacks=list(fallbacks.values())
        )
        return plan, preview

    def _fallbacks_for(self, plans: dict[str, ChannelPlan]) -> list[tuple[str, str]]:
        """(channel, its fallback) for the update's channels whose fallback it does not
        go to already."""
        found: dict[str, str] = {}
        for name in plans:
            fallback = self.channels[name].config.fallback
            if fallback is not None and fallback not in plans and fallback in self.channels:
                found.setdefault(fallback, name)
        return [(source, fallback) for fallback, source in found.items()]

    @staticmethod
    def _check_correctable(incident: Incident | None, update_id: int) -> None:
        """A correction replaces a live update of the same incident."""
        corrected = (
            next((u for u in incident.updates if u.id == update_id), None) if incident else None
        )
        if corrected is None:
            where = f"incident #{incident.id}" if incident else "a new incident"
            raise BroadcasterError(f"update #{update_id} is not an update of {where}")
        if corrected.cancelled_at is not None:
            raise BroadcasterError(
                f"update #{update_id} was cancelled or retracted: publish a new update instead"
            )

    def _fact_labels(
        self, languages: list[str], facts: dict[str, Any], fields: dict[str, str]
    ) -> dict[str, Any]:
        """The facts as a channel shows them in each of its languages (your `_labels`
        overrides included): headings, status, impact, components by display name, and
        the ETA field in that language."""
        library, names = self.library, self.settings.components
        headings = ("status", "impact", "components", "eta", "next_update", "status_page")
        return {
            language: {
                "headings": {key: library.label(key, language, "heading") for key in headings},
                "status": library.label(facts["status"], language, "status"),
                "impact": library.label(facts["impact"], language, "impact"),
                "components": {
                    names.get(name, name): library.label(state, language, "component_state")
                    for name, state in facts["components"].items()
                },
                "eta": fields.get(f"eta.{language}") or fields.get("eta"),
            }
            for language in languages
        }

    async def _subscriber_zones(self, channels: Sequence[Channel]) -> list[str]:
        """The time zones subscribers set other than the configured one, when a
        subscriber channel is among `channels` (their renders show times there)."""
        if not any(c.address_kind is not None for c in channels):
            return []
        return [z for z in await self.audience.rows.timezones() if z != self.settings.timezone]

    def _render(
        self,
        template: str,
        channel: Channel,
        context: RenderContext,
        zones: Sequence[str] = (),
    ) -> tuple[ChannelRender, list[CheckFailure]]:
        """The channel's render and its failed checks; a subscriber channel also gets
        variants for each of `zones` ("Next update by 14:30" in the subscriber's own
        time zone), checked like the others."""

        def render_in(zone: str) -> tuple[ChannelRender, list[CheckFailure]]:
            return self.library.render_for_channel(
                template,
                channel=channel.name,
                family=channel.family,
                languages=channel.languages,
                limits=channel.instance_limits,
                capabilities=channel.capabilities,
                context=context.model_copy(update={"timezone": zone}),
                gsm7=channel.config.gsm7,
            )

        render, problems = render_in(context.timezone)
        if channel.address_kind is not None:
            said = {p.message for p in problems}
            for zone in zones:
                zoned, more = render_in(zone)
                render.zoned[zone] = zoned.variants
                problems.extend(
                    p.model_copy(update={"message": f"{p.message} (subscribers in {zone})"})
                    for p in more
                    if p.message not in said  # the same failure everywhere: said once
                )
        return render, problems

    @staticmethod
    def _impact_from(components: dict[str, ComponentState]) -> Impact:
        impacts = [_IMPACT_OF_STATE[s] for s in components.values()] or [Impact.MINOR]
        return max(impacts, key=_IMPACT_ORDER.index)

    async def preview(self, request: UpdateRequest, incident_id: int | None = None) -> Preview:
        """Every channel's text and measures and every failed check, and whom each
        subscriber channel would reach (with the SMS segments it would cost); nothing is
        stored."""
        _plan, preview = await self._plan(request, incident_id)
        preview.reach = [
            await self.audience.reach(render)
            for render in preview.renders
            if render.channel in self.audience.kinds
        ]
        return preview

    # -- publishing -----------------------------------------------------------------

    async def publish(
        self,
        request: UpdateRequest,
        incident_id: int | None = None,
        *,
        alert_key: str | None = None,
        lookup: bool = True,
        release_draft: int | None = None,
        keeps_reminder: int | None = None,
    ) -> PublishResult:
        """Check, then store the update and its deliveries in one transaction.

        Raises CheckFailedError (nothing stored) when a check fails. Deliveries go out
        when the backend drives them: `wait()` here, or a running `serve`. `alert_key`
        ties a new incident to the monitoring alert episode that opened it. `lookup`
        looks the publish key up first, to skip rendering a repeat (the store's unique
        key decides either way). `release_draft` names a held draft this publishes: it
        raises DraftChangedError (nothing stored) when that draft is no longer held.
        `keeps_reminder` names the due holding reminder this update answers (the
        scheduler's holding update): it is settled `done` in the update's transaction.
        """
        if request.publish_key and lookup:
            existing = await self.store.find_by_publish_key(request.publish_key)
            if existing is not None:
                incident = await self.store.get_incident(existing.incident_id)
                return PublishResult(incident=incident, update=existing, new=False)
        plan, preview = await self._plan(request, incident_id)
        if preview.failures:
            raise CheckFailedError(preview.failures)
        plan.alert_key = alert_key
        plan.release_draft = release_draft
        plan.keeps_reminder = keeps_reminder
        plan.claim_lease_seconds = self.backend.claim_lease()
        now = self.scheduler.clock()
        plan.reminders = reminders_for(
            plan.status,
            plan.fields,
            plan.next_update_at,
            self.settings.cadence,
            timezone=self.settings.timezone,
            now=now,
            opened_at=plan.opened_at or now,
        )
        plan.in_transaction = self.backend.in_publish(plan.reminders)
        update, new = await self.store.publish(plan)
        if new and plan.reminders and plan.in_transaction is None:
            self.backend.reminders_stored()  # a hook in the transaction saw to them
        if new:
            log.info(
                "published update %d of incident %d to %s",
                update.id,
                update.incident_id,
                ", ".join(plan.channels),
                extra={
                    "incident_id": update.incident_id,
                    "update_id": update.id,
                    "channels": list(plan.channels),
                    "actor": request.actor,
                },
            )
        if new:
            # The renders are in hand: the dispatcher need not read them back.
            renders = {name: channel.render for name, channel in plan.channels.items()}
            self.backend.published(update.id, renders, plan.claimed)
        if new and plan.incident_id is None:
            # Opened just now: everything about it is in the plan, no need to read it.
            incident = Incident(
                id=update.incident_id,
                kind=plan.status.kind,
                title=plan.title,
                status=plan.status,
                impact=plan.impact,
                components=plan.incident_components,
                created_at=update.created_at,
                resolved_at=None,
                alert_key=alert_key,
                updates=[update],
            )
        else:
            incident = await self.store.get_incident(update.incident_id)
        return PublishResult(incident=incident, update=update, new=new)

    async def drafts(self, *, state: DraftState | None = DraftState.PENDING) -> list[Draft]:
        """Updates held for approval (pending ones by default)."""
        return await self.store.drafts(state=state)

    async def approve(self, draft_id: int, *, actor: str) -> PublishResult:
        """Publish a pending draft as it was drafted; recorded with who approved it."""
        draft = await self._pending(draft_id)
        request = draft.request.model_copy(update={"actor": actor})
        if draft.source == SCHEDULER_SOURCE and request.next_update_at is not None:
            # A holding update promises the next one from when it goes out.
            promise = self.scheduler.clock() + self.settings.cadence.holding_next_update_in
            request = request.model_copy(update={"next_update_at": promise})
        result = await self.publish(request, draft.incident_id, alert_key=draft.alert_key)
        await self.store.decide_draft(
            draft_id,
            DraftState.APPROVED,
            actor,
            incident_id=result.incident.id,
            update_id=result.update.id,
        )
        return result

    async def reject(self, draft_id: int, *, actor: str) -> None:
        """Drop a pending draft: nothing is sent."""
        await self._pending(draft_id)
        await self.store.decide_draft(draft_id, DraftState.REJECTED, actor)

    async def draft(self, draft_id: int) -> Draft:
        """One draft, whatever its state."""
        return await self.store.get_draft(draft_id)

    async def _pending(self, draft_id: int) -> Draft:
        draft = await self.store.get_draft(draft_id)
        if draft.state not in (DraftState.PENDING, DraftState.HELD):  # held: publish it now
            raise BroadcasterError(f"draft #{draft_id} is already {draft.state.value}")
        return draft

    async def cancel(self, update_id: int, *, actor: str) -> int:
        """The kill switch: stop an update's queued deliveries. Returns how many stopped."""
        cancelled = await self.store.cancel_update(update_id, actor)
        await self._restore_promises(update_id, actor=actor)
        self.backend.published()  # follow-ups that waited behind what stopped may go
        return cancelled

    async def retract(
        self, update_id: int, *, actor: str, dry_run: bool = False
    ) -> dict[str, Retraction]:
        """Take an update back: its queued deliveries stop, its posts are deleted where the
        channel can delete (tracked like any delivery), and it leaves the status page."""
        deletable = [name for name, c in self.channels.items() if c.capabilities.deletes]
        report = await self.store.retract(
            update_id, deletable=deletable, actor=actor, dry_run=dry_run
        )
        if not dry_run:
            self.backend.published()
            await self._restore_promises(update_id, actor=actor)
        return report

    async def _restore_promises(self, update_id: int, *, actor: str) -> None:
        """After an update was cancelled or retracted, what the incident's latest live
        update promised (its next update, a maintenance window, the escalation) is kept
        again: the reminders it made are back, or made anew."""
        reminders = self.scheduler.reminders
        incident = await self.store.get_incident(await reminders.incident_of(update_id))
        last = incident.last_update
        if last is None or incident.status.is_final:
            return
        wanted = reminders_for(
            last.status,
            last.fields,
            last.next_update_at,
            self.settings.cadence,
            timezone=self.settings.timezone,
            now=self.scheduler.clock(),
            opened_at=incident.created_at,
        )
        await reminders.restore(incident.id, last.id, wanted, actor=actor)
        self.backend.reminders_stored()

    async def retry(self, incident_id: int, *, channel: str | None, actor: str) -> tuple[int, int]:
        """Queue the failed deliveries of the incident's latest update again."""
        await self.store.get_incident(incident_id)
        if channel is not None:
            self._require_channel(channel)
        result = await self.store.retry_failed(
            incident_id,
            channel=channel,
            deadline_seconds={n: c.config.deadline_seconds for n, c in self.channels.items()},
            actor=actor,
        )
        self.backend.published()
        return result

    # -- dispatching and watching -------------------------------------------------------

    async def wait(
        self,
        update_ids: Sequence[int] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[ChannelProgress]:
        """Drive deliveries (or watch a `serve` drive them) until these updates settle.

        With no update ids: until nothing is pending anywhere. A channel found broken
        counts as settled: its deliveries stay queued for later.
        """
        ids = list(update_ids) if update_ids is not None else None

        async def current() -> list[ChannelProgress]:
            return await self.store.progress(update_ids=ids)

        async def settled() -> bool:
            return await self.settled(ids)

        loop = asyncio.get_running_loop()
        next_look = 0.0

        async def tick(dispatching: bool) -> None:
            nonlocal next_look
            if on_progress is None or loop.time() < next_look:
                return
            started = loop.time()
            await on_progress(await current(), dispatching)
            # Counting a big fan-out takes a while (0.75 s at 900,000 deliveries): look at
            # most a fifth of the time, so that watching never slows the sending much.
            next_look = loop.time() + 4 * (loop.time() - started)

        await self.backend.drive(settled, tick)
        final = await current()
        if on_progress is not None:
            await on_progress(final, False)
        return final

    async def settled(self, update_ids: Sequence[int] | None = None) -> bool:
        """Nothing of these updates (of any, without ids) is left to send, except on
        channels found broken: their deliveries stay queued for later."""
        # An EXISTS: `wait` asks on every tick; counting a million queued rows took 180 ms.
        broken = await self.queue.broken_channels()
        return not await self.queue.any_pending(update_ids=update_ids, except_channels=broken)

    async def dispatch_until(self, stop: asyncio.Event) -> None:
        """Drive deliveries while this process holds the dispatcher lease (watch
        otherwise), until `stop` is set: what `broadcaster serve` runs. Held updates
        (flapping damping) are published when due meanwhile, and promised updates'
        reminders fire (broadcaster/scheduler.py)."""

        async def stopped() -> bool:
            return stop.is_set()

        await asyncio.gather(
            self.backend.drive(stopped),
            self.alerts.release_held_until(stop),
            self.backend.run_reminders(
                lambda still_mine: self.scheduler.fire_due(still_mine=still_mine), stop
            ),
            self._forget_old_deliveries_until(stop),
        )

    async def work(self, *, concurrency: int | None = None) -> None:
        """Run this process's workers until cancelled (`broadcaster worker`, procrastinate
        backend): they send deliveries and fire reminders for every node."""
        from broadcaster.dispatch.distributed import ProcrastinateBackend

        if not isinstance(self.backend, ProcrastinateBackend):
            raise BroadcasterError(
                'workers run with backend = "procrastinate" — the embedded backend sends '
                "from `broadcaster serve` (or the command that publishes)"
            )
        await self.backend.work(
            lambda still_mine: self.scheduler.fire_due(still_mine=still_mine),
            concurrency=concurrency,
        )

    async def _forget_old_deliveries_until(self, stop: asyncio.Event) -> None:
        """With `subscribers.retention_days`: once an hour, delete subscriber deliveries
        (SMS, email… records of who was sent what) older than that."""
        days = self.settings.subscribers.retention_days
        channels = list(self.audience.kinds)
        if days is None or not channels:
            return
        while not stop.is_set():
            try:
                forgotten = await self.store.forget_deliveries(
                    channels, older_than=datetime.now(UTC) - timedelta(days=days)
                )
                if forgotten:
                    log.info("forgot %d subscriber deliveries older than %d days", forgotten, days)
            except Exception:  # the store is busy or briefly gone: next hour
                log.exception("could not forget old subscriber deliveries")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=RETENTION_CHECK_SECONDS)

    async def dispatch_problem(self) -> str | None:
        """Why dispatch looks stalled, or None: for readiness probes."""
        try:
            broken = await self.queue.broken_channels()
            oldest = await self.queue.oldest_due(except_channels=broken)
        except Exception as exc:
            return f"store unreachable: {type(exc).__name__}"
        limit = self.settings.serve.ready_stall_seconds
        if oldest is not None:
            waited = (datetime.now(UTC) - oldest).total_seconds()
            if waited > limit:
                return f"a due delivery has waited {waited:.0f}s (limit {limit:.0f}s)"
        return None

    # -- reading ------------------------------------------------------------------------

    async def incidents(self, *, open_only: bool = False, limit: int = 50) -> list[Incident]:
        return await self.store.list_incidents(open_only=open_only, limit=limit)

    async def incident(self, incident_id: int) -> Incident:
        return await self.store.get_incident(incident_id)

    async def progress(
        self, incident_id: int, *, channel: str | None = None
    ) -> list[ChannelProgress]:
        """Deliveries of an incident per channel (a channel since removed from the config
        can still be looked up by name)."""
        await self.store.get_incident(incident_id)
        progress = await self.store.progress(incident_id=incident_id, channel=channel)
        if channel is not None and not progress:
            self._require_channel(channel)
        return progress

    async def deliveries(
        self,
        incident_id: int,
        *,
        channel: str | None = None,
        states: Sequence[DeliveryState] | None = None,
    ) -> list[Delivery]:
        return await self.store.deliveries(incident_id=incident_id, channel=channel, states=states)

    async def audit(self, incident_id: int) -> list[AuditEntry]:
        return await self.store.audit(incident_id)

    async def first_messages(self, incident_id: int) -> dict[str, datetime]:
        """Per channel, when the incident's first message was accepted there."""
        await self.store.get_incident(incident_id)
        return await self.store.first_messages(incident_id)

    async def _channel_broken(self, channel: str, reason: str) -> None:
        await self.scheduler.channel_broken(channel, reason)

    async def schedule(self, *, limit: int = 100) -> list[Reminder]:
        """What the scheduler fires next (pending reminders, soonest first)."""
        return await self.scheduler.reminders.upcoming(limit=limit)

    async def playbooks(self) -> dict[str, Playbook]:
        """The configured emergency protocols, by name."""
        return dict(self.settings.playbooks)

    async def reminders(self, incident_id: int) -> list[Reminder]:
        """Every reminder of an incident and what became of it (promises kept, missed)."""
        await self.store.get_incident(incident_id)
        return await self.scheduler.reminders.of_incident(incident_id)

    # -- subscribers (see Audience; the audit trail names them by id, never by address) --

    async def add_subscriber(
        self, new: NewSubscriber, *, actor: str, source: str = "cli"
    ) -> Subscriber:
        """Validate and store one subscriber; an address already known is an error. One
        with a webhook URL comes back with the secret each webhook channel signs their
        updates with (to hand to them)."""
        added = await self.audience.add(new, source=source, actor=actor)
        return self._with_webhook_secrets(added)

    def _with_webhook_secrets(self, subscriber: Subscriber) -> Subscriber:
        secrets = {
            name: secret
            for name, channel in self.channels.items()
            if channel.address_kind is not None
            and subscriber.channels.get(name)
            and (secret := channel.subscriber_secret(subscriber.id)) is not None
        }
        return subscriber.model_copy(update={"webhook_secrets": secrets}) if secrets else subscriber

    async def import_subscribers(self, csv_text: str, *, actor: str) -> ImportReport:
        """Add or update each CSV row (columns: subscribers.CSV_COLUMNS); each refused
        row is reported with its line and reason. Opt-outs stand."""
        return await self.audience.import_csv(csv_text, actor=actor)

    async def subscribers(
        self, *, channel: str | None = None, after: int = 0, limit: int = 100
    ) -> list[Subscriber]:
        """A page of subscribers by id (one channel's subscribed ones, if given)."""
        return await self.audience.list(channel=channel, after=after, limit=limit)

    async def subscriber(self, subscriber_id: int) -> Subscriber:
        return await self.audience.get(subscriber_id)

    async def export_subscriber(self, subscriber_id: int) -> dict[str, Any]:
        """Everything kept about one subscriber, for a data-access request (with the
        webhook secrets they verify their updates with)."""
        exported = await self.audience.export(subscriber_id)
        subscriber = await self.audience.get(subscriber_id)
        secrets = self._with_webhook_secrets(subscriber).webhook_secrets
        if secrets:
            exported["subscriber"]["webhook_secrets"] = secrets
        return exported

    async def erase_subscriber(self, subscriber_id: int, *, actor: str) -> Subscriber:
        """Forget a subscriber: addresses, consents, and error texts that may quote them."""
        return await self.audience.erase(subscriber_id, actor=actor)

    async def set_subscription(
        self,
        subscriber_id: int,
        channel: str,
        *,
        subscribed: bool,
        actor: str,
        source: str = "cli",
    ) -> Subscriber:
        """Opt a subscriber in or out of one subscriber channel."""
        return await self.audience.set_subscription(
            subscriber_id, channel, subscribed=subscribed, source=source, actor=actor
        )

    # -- templates, channels, health -------------------------------------------------------

    async def templates(self) -> list[TemplateInfo]:
        """Every template (yours override ours) with its fields and example values."""
        return [await self.template(name) for name in self.library.names()]

    async def template(self, name: str) -> TemplateInfo:
        """One template; NotFoundError names the known ones."""
        return TemplateInfo.model_validate(self.library.get(name), from_attributes=True)

    async def channel_infos(self) -> list[ChannelInfo]:
        """The configured channels as `broadcaster channels` lists them."""
        defaults = self.settings.default_channels or list(self.channels)
        return [
            ChannelInfo(
                name=name,
                type=channel.config.type,
                family=channel.family,
                languages=channel.languages,
                limits={k: v for k, v in channel.instance_limits.model_dump().items() if v},
                default=name in defaults,
            )
            for name, channel in self.channels.items()
        ]

    async def check_templates(self) -> list[CheckFailure]:
        """Every template (shipped and yours) against every configured channel."""
        failures: list[CheckFailure] = []
        now = datetime.now(UTC)
        for name in self.library.names():
            spec = self.library.get(name)
            context = RenderContext(
                incident_id=1,
                title="Example incident title",
                status=IncidentStatus.INVESTIGATING,
                impact=Impact.MAJOR,
                components=[
                    ComponentStatus(name=n, display_name=d, state=ComponentState.MAJOR_OUTAGE)
                    for n, d in list(self.settings.components.items())[:3]
                ],
                fields=dict(spec.example),
                next_update_at=now + timedelta(minutes=30),
                started_at=now,
                timezone=self.settings.timezone,
                status_page_url=self.settings.status_page_url,
            )
            for channel in self.channels.values():
                _render, problems = self._render(name, channel, context)
                failures.extend(
                    p.model_copy(update={"message": f"template '{name}': {p.message}"})
                    for p in problems
                )
        return failures

    async def doctor(self) -> list[DoctorCheck]:
        """Config valid, store reachable, secrets present, each channel's own checks."""
        checks = [
            DoctorCheck(
                subject="config",
                ok=True,
                detail=str(self.settings.config_path or "defaults (no file)"),
            ),
            DoctorCheck(
                subject="store",
                ok=True,
                detail=self.store.engine.url.render_as_string(hide_password=True),
            ),
        ]
        stalled, driven = await self.backend.problem()
        checks.append(DoctorCheck(subject="dispatch", ok=stalled is None, detail=stalled or driven))
        receivers: dict[str, list[str]] = {}
        for name, channel in self.channels.items():
            key = channel.inbound_key()
            if key is not None:
                receivers.setdefault(key, []).append(name)
        for name, channel in self.channels.items():
            problems = await channel.check_config()
            sharing = [n for n in receivers.get(channel.inbound_key() or "", []) if n != name]
            if sharing:
                problems.append(
                    f"{name}: {', '.join(sharing)} receive the same provider traffic (one "
                    "bot, one webhook): the last one started takes it all — keep the "
                    "support bot on one of them (the subscriber channel, for /subscribe)"
                )
            checks.append(
                DoctorCheck(
                    subject=f"channel {name}",
                    ok=not problems,
                    detail="; ".join(problems) or f"{channel.config.type}, ok",
                )
            )
        if self.settings.subscribers.self_service:
            problems = self_service_problems(self.settings, self.channels)
            checks.append(
                DoctorCheck(
                    subject="self-service",
                    ok=not problems,
                    detail="; ".join(problems) or "subscribe form and manage pages, ok",
                )
            )
        template_failures = await self.check_templates()
        checks.append(
            DoctorCheck(
                subject="templates",
                ok=not template_failures,
                detail=f"{len(template_failures)} problem(s) — run `broadcaster templates check`"
                if template_failures
                else f"{len(self.library.names())} templates fit every channel",
            )
        )
        return checks

    async def render_public_site(self, channel: str, languages: list[str]) -> dict[str, bytes]:
        """The public side of a banner channel, rendered from the store: path -> content."""
        from broadcaster.site.render import render_site
        from broadcaster.site.snapshot import public_state

        state = await public_state(self.store, self.settings, channel=channel, languages=languages)
        # Rendering every page takes a while with many incidents: off the event loop,
        # so webhooks and API calls are answered meanwhile.
        return await asyncio.to_thread(render_site, state)
