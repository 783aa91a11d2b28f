"""Monitoring alerts in: routed by rules to a public update, published or held as a draft.

An alert *episode* (one alert group, from when it started firing until it resolves) is
one incident: while the group has an open incident, repeated notifications change
nothing; its resolution resolves that incident; the same group firing again after that
opens a new incident, keyed by the group and its new start time.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from broadcaster.config import Route
from broadcaster.errors import CheckFailedError
from broadcaster.models import IncidentStatus, UpdateRequest

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

    action: Literal["published", "drafted", "duplicate", "ignored"]
    reason: str = ""
    route: str | None = None
    incident_id: int | None = None
    update_id: int | None = None
    draft_id: int | None = None


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
        publish_key=f"{episode_key}|{event.status}",
        actor=f"{event.source}:{route.name}",
    )


async def take_alert(broadcaster: Broadcaster, event: AlertEvent) -> IntakeResult:
    """Route one alert event and publish it, draft it, or say why nothing happens."""
    route = route_for(event, broadcaster.settings.routes)
    if route is None:
        return IntakeResult(action="ignored", reason="no route matches its labels")
    incident = await broadcaster.store.open_incident_for_alert_group(event.group_key)
    if event.status == "firing":
        if incident is not None:
            return IntakeResult(
                action="duplicate",
                reason="this alert group already has an open incident",
                route=route.name,
                incident_id=incident[0],
            )
        key, target = event.episode_key, None
        request = request_for(route, event, IncidentStatus.INVESTIGATING, key)
    else:
        if incident is None:
            obsolete = await broadcaster.store.obsolete_drafts(event.group_key, event.source)
            reason = "resolved before anyone approved its draft" if obsolete else "no open incident"
            return IntakeResult(action="ignored", reason=reason, route=route.name)
        target, key = incident
        request = request_for(route, event, IncidentStatus.RESOLVED, key)
    if route.action == "publish":
        try:
            result = await broadcaster.publish(request, target, alert_key=key)
        except CheckFailedError as exc:
            # A route whose template cannot be filled must not lose the alert: a human
            # gets it as a draft, with the reason in the log.
            log.error("route %s: cannot publish automatically, drafting: %s", route.name, exc)
        else:
            return IntakeResult(
                action="published" if result.new else "duplicate",
                route=route.name,
                incident_id=result.incident.id,
                update_id=result.update.id,
            )
    draft, new = await broadcaster.store.create_draft(
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
