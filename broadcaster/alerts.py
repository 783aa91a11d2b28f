"""Monitoring alerts in: routed by rules to a public update, published or held as a draft.

An alert *episode* (one alert group, from when it started firing until it resolves) is
one incident: while the group has an open incident, repeated notifications change
nothing; its resolution resolves that incident; the same group firing again after that
opens a new incident, keyed by the group and its new start time.

Flapping is damped on `publish` routes: a resolution coming sooner than the route's
`min_update_interval_seconds` after the incident's previous update is *held* (a draft in
state `held`, in the store) and published when that time comes; the alert firing again
before then cancels it, so the incident stays open and nobody reads "resolved" then
"investigating".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from broadcaster.config import Route
from broadcaster.errors import CheckFailedError, NotFoundError
from broadcaster.models import Draft, DraftState, IncidentStatus, UpdateRequest
from broadcaster.store.store import DraftChangedError, OpenEpisode, alert_group

if TYPE_CHECKING:
    from broadcaster.core import Broadcaster

log = logging.getLogger("broadcaster.alerts")


class AlertEvent(BaseModel):
    """One notification about one alert group, whatever the monitoring tool."""

    source: str
    group: str
    status: Literal["firing", "resolved"]
    started_at: datetime
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @property
    def group_key(self) -> str:
        return f"{self.source}:{self.group}"

    @property
    def episode_key(self) -> str:
        """The alert episode: the group and when it started firing."""
        return f"{self.group_key}|{self.started_at.isoformat()}"


class IntakeResult(BaseModel):
    """What became of one alert event."""

    action: Literal["published", "drafted", "held", "duplicate", "ignored"]
    reason: str = ""
    route: str | None = None
    incident_id: int | None = None
    update_id: int | None = None
    draft_id: int | None = None
    not_before: datetime | None = None  # a held update goes out then


def route_for(event: AlertEvent, routes: list[Route]) -> Route | None:
    """The first route whose source and label matchers all fit the event."""
    for route in routes:
        if route.source not in ("*", event.source):
            continue
        if all(event.labels.get(label) == value for label, value in route.match.items()):
            return route
    return None


def request_for(
    route: Route, event: AlertEvent, status: IncidentStatus, episode_key: str
) -> UpdateRequest:
    """The public update a route makes of an event: only mapped alert fields get in."""
    places = {"labels": event.labels, "annotations": event.annotations}
    fields = dict(route.fields)
    for field, place in route.alert_fields.items():
        kind, _, name = place.partition(".")
        value = places[kind].get(name)
        if value is not None:
            fields[field] = value
    return UpdateRequest(
        status=status,
        template=route.template,
        title=route.title,
        impact=route.impact,
        components=route.components if status is not IncidentStatus.RESOLVED else {},
        fields=fields if status is not IncidentStatus.RESOLVED else {},
        channels=route.channels,
        next_update_at=datetime.now(UTC) + route.next_update_in
        if route.next_update_in is not None and status is not IncidentStatus.RESOLVED
        else None,
        publish_key=f"{episode_key}|{event.status}",
        actor=f"{event.source}:{route.name}",
    )


async def take_alert(broadcaster: Broadcaster, event: AlertEvent) -> IntakeResult:
    """Route one alert event and publish it, draft it, or say why nothing happens."""
    result = await broadcaster.alerts.take(event)
    # Repeats are most of the traffic (and change nothing): formatting a JSON line for
    # each cost ~7% of the server's time at 600 notifications/s, so they log at DEBUG.
    log.log(
        logging.DEBUG if result.action == "duplicate" else logging.INFO,
        "%s alert %s: %s",
        event.source,
        event.status,
        result.action,
        extra={
            "source": event.source,
            "outcome": result.action,
            "route": result.route,
            "incident_id": result.incident_id,
            "update_id": result.update_id,
            "draft_id": result.draft_id,
        },
    )
    return result


class GroupLocks:
    """One asyncio lock per alert group, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, group: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(group, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[group] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[group]
            if users == 1:
                del self._locks[group]
            else:
                self._locks[group] = (lock, users - 1)


class AlertIntake:
    """Takes alert events for one broadcaster; publishes held updates when due.

    Repeats are most of what monitoring sends (Alertmanager re-sends every group every
    `group_interval`), so a publish route remembers, per group, the episode it published
    (bounded, least recently used out): a repeat of it is answered `duplicate` without
    the store. That is the answer the store would give — while the incident is open it
    is a duplicate, and once resolved the episode's publish key exists — and the store's
    unique publish key still decides everything else. Events of one group are taken one
    at a time in this process, so a burst of identical notifications renders once.
    """

    def __init__(self, broadcaster: Broadcaster, *, remembered: int = 100_000) -> None:
        self.broadcaster = broadcaster
        self.remembered = remembered
        self._published: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._locks = GroupLocks()
        self._held = asyncio.Event()  # a hold was stored in this process: look again

    async def take(self, event: AlertEvent) -> IntakeResult:
        """Route one alert event and publish it, draft it, hold it, or say why not."""
        route = route_for(event, self.broadcaster.settings.routes)
        if route is None:
            return IntakeResult(action="ignored", reason="no route matches its labels")
        known = self._known(route, event)
        if known is not None:
            return known
        async with self._locks.hold(event.group_key):
            known = self._known(route, event)  # an identical request just published it
            if known is not None:
                return known
            if event.status == "firing":
                return await self._firing(route, event)
            return await self._resolved(route, event)

    def _known(self, route: Route, event: AlertEvent) -> IntakeResult | None:
        if event.status != "firing" or route.action != "publish":
            return None
        known = self._published.get(event.group_key)
        if known is None or known[0] != event.episode_key:
            return None
        self._published.move_to_end(event.group_key)
        return _duplicate(route, known[1])

    def _remember(self, group: str, episode_key: str, incident_id: int) -> None:
        self._published[group] = (episode_key, incident_id)
        self._published.move_to_end(group)
        if len(self._published) > self.remembered:
            self._published.popitem(last=False)

    async def _firing(self, route: Route, event: AlertEvent) -> IntakeResult:
        store = self.broadcaster.store
        episode = await store.open_alert_episode(event.group_key)
        # Fired again (a new start) before the held resolution went out: the two cancel
        # out, the incident stays open. (A repeat of the old start is a late re-delivery.)
        if episode and episode.held and event.started_at > episode.started_at:
            cancelled = await store.decide_draft(
                episode.held.id, DraftState.OBSOLETE, event.source, expect=DraftState.HELD
            )
            if cancelled:
                return _duplicate(
                    route,
                    episode.incident_id,
                    "fired again before its resolution went out; the incident stays open",
                )
            # The resolution went out meanwhile: this is a new episode.
            episode = await store.open_alert_episode(event.group_key)
        if episode is not None:
            if episode.alert_key == event.episode_key and route.action == "publish":
                self._remember(event.group_key, event.episode_key, episode.incident_id)
            return _duplicate(route, episode.incident_id)
        key = event.episode_key
        request = request_for(route, event, IncidentStatus.INVESTIGATING, key)
        if route.action == "publish":
            published = await self._publish(route, request, None, key)
            if published is not None:
                if published.incident_id is not None:
                    self._remember(event.group_key, key, published.incident_id)
                return published
        return await self._draft(route, event, request, key, None)

    async def _resolved(self, route: Route, event: AlertEvent) -> IntakeResult:
        store = self.broadcaster.store
        self._published.pop(event.group_key, None)
        episode = await store.open_alert_episode(event.group_key)
        if episode is None:
            obsolete = await store.obsolete_drafts(event.group_key, event.source)
            reason = "resolved before anyone approved its draft" if obsolete else "no open incident"
            return IntakeResult(action="ignored", reason=reason, route=route.name)
        target, key = episode.incident_id, episode.alert_key
        request = request_for(route, event, IncidentStatus.RESOLVED, key)
        if route.action == "publish":
            if episode.held is not None:
                return _held(route, episode.held, new=False)
            due = damped_until(route, episode)
            if due is not None:
                draft, new = await store.create_draft(
                    source=event.source,
                    route=route.name,
                    alert_key=key,
                    incident_id=target,
                    request=request,
                    not_before=due,
                )
                self._held.set()
                return _held(route, draft, new=new)
            published = await self._publish(route, request, target, key)
            if published is not None:
                return published
        return await self._draft(route, event, request, key, target)

    async def _publish(
        self, route: Route, request: UpdateRequest, target: int | None, key: str
    ) -> IntakeResult | None:
        """Publish; None when checks fail (the caller drafts it)."""
        try:
            # The intake has just looked at the group: no publish-key lookup before
            # rendering (the store's unique key still refuses a second publish).
            result = await self.broadcaster.publish(request, target, alert_key=key, lookup=False)
        except (CheckFailedError, NotFoundError) as exc:
            # A route whose template cannot be filled (or names a template that does not
            # exist) must not lose the alert: a human gets it as a draft, with the reason
            # in the log.
            log.error("route %s: cannot publish automatically, drafting: %s", route.name, exc)
            return None
        return IntakeResult(
            action="published" if result.new else "duplicate",
            route=route.name,
            incident_id=result.incident.id,
            update_id=result.update.id,
        )

    async def _draft(
        self,
        route: Route,
        event: AlertEvent,
        request: UpdateRequest,
        key: str,
        target: int | None,
    ) -> IntakeResult:
        draft, new = await self.broadcaster.store.create_draft(
            source=event.source,
            route=route.name,
            alert_key=key,
            incident_id=target,
            request=request,
        )
        return IntakeResult(
            action="drafted" if new else "duplicate",
            reason="" if new else "already drafted",
            route=route.name,
            incident_id=target,
            draft_id=draft.id,
        )

    # -- held updates -------------------------------------------------------------------

    async def release_due(self, now: datetime | None = None) -> datetime | None:
        """Publish the held updates that are due; returns when the next one is."""
        now = now or datetime.now(UTC)
        for draft in await self.broadcaster.store.held_drafts():
            assert draft.not_before is not None
            if draft.not_before > now:
                return draft.not_before
            async with self._locks.hold(alert_group(draft.alert_key) or f"draft:{draft.id}"):
                await self._release(draft, now)
        return None

    async def _release(self, draft: Draft, now: datetime) -> None:
        """Publish one due held update, if it is still the latest state."""
        store = self.broadcaster.store
        assert draft.incident_id is not None
        incident = await self.broadcaster.incident(draft.incident_id)
        if incident.status.is_final:  # resolved by a person meanwhile
            await store.decide_draft(
                draft.id, DraftState.OBSOLETE, draft.request.actor, expect=DraftState.HELD
            )
            return
        # A person's update since it was held starts the interval again.
        route = next((r for r in self.broadcaster.settings.routes if r.name == draft.route), None)
        interval = timedelta(seconds=route.min_update_interval_seconds if route else 0)
        public = [u.created_at for u in incident.updates if u.cancelled_at is None]
        latest = max(public, default=None)
        if latest is not None and latest + interval > now:
            await store.hold_until(draft.id, latest + interval)
            return
        try:
            await self.broadcaster.publish(
                draft.request, draft.incident_id, alert_key=draft.alert_key, release_draft=draft.id
            )
        except DraftChangedError:
            return  # cancelled by a re-fire in another process just now
        except CheckFailedError as exc:
            log.error("held draft #%d fails its checks; left for a person: %s", draft.id, exc)
            await store.decide_draft(
                draft.id, DraftState.PENDING, draft.request.actor, expect=DraftState.HELD
            )
            return
        group = alert_group(draft.alert_key)
        if group is not None:
            self._published.pop(group, None)

    async def release_held_until(self, stop: asyncio.Event, *, most_seconds: float = 1.0) -> None:
        """Publish held updates when due, until `stop` is set (what `serve` runs).

        Looks at the store at least every `most_seconds` (another process may hold
        updates too) and at once when this process holds one."""
        while not stop.is_set():
            self._held.clear()
            wait = most_seconds
            try:
                due = await self.release_due()
            except Exception:  # the store is busy or briefly gone: look again later
                log.exception("could not publish held updates; retrying")
            else:
                if due is not None:
                    left = (due - datetime.now(UTC)).total_seconds()
                    wait = min(most_seconds, max(0.01, left))
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._held.wait())]
            await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()


def damped_until(route: Route, episode: OpenEpisode) -> datetime | None:
    """When an update of this episode's incident may go out, if not now."""
    if route.min_update_interval_seconds <= 0 or episode.last_update_at is None:
        return None
    due = episode.last_update_at + timedelta(seconds=route.min_update_interval_seconds)
    return due if due > datetime.now(UTC) else None


def _duplicate(route: Route, incident_id: int, reason: str = "") -> IntakeResult:
    return IntakeResult(
        action="duplicate",
        reason=reason or "this alert group already has an open incident",
        route=route.name,
        incident_id=incident_id,
    )


def _held(route: Route, draft: Draft, *, new: bool) -> IntakeResult:
    when = f"{draft.not_before:%Y-%m-%d %H:%M:%S} UTC" if draft.not_before else "later"
    return IntakeResult(
        action="held" if new else "duplicate",
        reason=f"flapping damping: goes out at {when} unless the alert fires again"
        if new
        else "already held",
        route=route.name,
        incident_id=draft.incident_id,
        draft_id=draft.id,
        not_before=draft.not_before,
    )
