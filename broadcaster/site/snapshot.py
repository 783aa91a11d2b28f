"""Building the public state from the store: what one status-page channel has published."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import aliased

from broadcaster.config import Settings
from broadcaster.models import (
    ChannelRender,
    ComponentState,
    ComponentStatus,
    Impact,
    IncidentKind,
    IncidentStatus,
)
from broadcaster.site.state import PublicIncident, PublicState, PublicUpdate
from broadcaster.store import Store
from broadcaster.store.tables import IncidentRow, RenderRow, UpdateRow, utcnow

RECENT = timedelta(days=14)
_SEVERITY = [
    ComponentState.OPERATIONAL,
    ComponentState.UNDER_MAINTENANCE,
    ComponentState.DEGRADED_PERFORMANCE,
    ComponentState.PARTIAL_OUTAGE,
    ComponentState.MAJOR_OUTAGE,
]


def _worse(a: ComponentState, b: ComponentState) -> ComponentState:
    return a if _SEVERITY.index(a) >= _SEVERITY.index(b) else b


_CORRECTION = aliased(UpdateRow)
_CORRECTED = select(_CORRECTION.corrects).where(_CORRECTION.corrects.is_not(None))


async def public_state(
    store: Store, settings: Settings, *, channel: str, languages: list[str]
) -> PublicState:
    """Incidents open or resolved in the last 14 days, with the updates published to
    `channel` (cancelled, retracted and corrected ones left out), and every component's
    current state."""
    now = utcnow()
    async with store.sessions() as session:
        rows = (
            await session.execute(
                select(IncidentRow, UpdateRow, RenderRow)
                .join(UpdateRow, UpdateRow.incident_id == IncidentRow.id)
                .join(
                    RenderRow,
                    (RenderRow.update_id == UpdateRow.id) & (RenderRow.channel == channel),
                )
                .where(
                    UpdateRow.cancelled_at.is_(None),  # retracted ones too
                    UpdateRow.id.not_in(_CORRECTED),  # the correction stands in its place
                    or_(IncidentRow.resolved_at.is_(None), IncidentRow.resolved_at > now - RECENT),
                )
                .order_by(IncidentRow.id, UpdateRow.seq)
            )
        ).all()
    incidents: dict[int, PublicIncident] = {}
    for incident, update, render_row in rows:
        render = ChannelRender.model_validate(render_row.render)
        public = incidents.get(incident.id)
        if public is None:
            public = incidents[incident.id] = PublicIncident(
                id=incident.id,
                kind=IncidentKind(incident.kind),
                title=incident.title,
                status=IncidentStatus(incident.status),
                impact=Impact(incident.impact),
                components=incident.components,
                created_at=incident.created_at,
                resolved_at=incident.resolved_at,
            )
        public.updates.insert(
            0,
            PublicUpdate(
                id=update.id,
                status=IncidentStatus(update.status),
                created_at=update.created_at,
                next_update_at=update.next_update_at,
                texts={v.language: v for v in render.variants},
            ),
        )
    states = dict.fromkeys(settings.components, ComponentState.OPERATIONAL)
    for public in incidents.values():
        if public.is_active:  # maintenance planned for Friday leaves today alone
            for name, state in public.components.items():
                states[name] = _worse(state, states.get(name, ComponentState.OPERATIONAL))
    return PublicState(
        page_title=settings.page_title,
        languages=languages,
        timezone=settings.timezone,
        generated_at=now,
        status_page_url=settings.status_page_url,
        subscribe_url=(
            f"{settings.serve.public_url.rstrip('/')}/subscribe"
            if settings.subscribers.self_service and settings.serve.public_url
            else None
        ),
        components=[
            ComponentStatus(
                name=name, display_name=settings.components.get(name, name), state=state
            )
            for name, state in states.items()
        ],
        incidents=list(incidents.values()),
    )
