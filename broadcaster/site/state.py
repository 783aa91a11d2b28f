"""The public state of a status page: what the renderer turns into files.

The core builds a `PublicState` from its store; `render_site` turns it into the
status page, banner JSON, Atom feeds and a Statuspage-compatible summary. Nothing
here reads the store, so the site renders the same from a live server, a CLI run or
a snapshot carried to a host outside the failing infrastructure.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from broadcaster.models import (
    ComponentState,
    ComponentStatus,
    Impact,
    IncidentKind,
    IncidentStatus,
    Rendered,
    TimeZoneName,
)

__all__ = [
    "Indicator",
    "OverallStatus",
    "PublicIncident",
    "PublicState",
    "PublicUpdate",
]


def _assume_utc(value: datetime) -> datetime:
    # SQLite hands datetimes back naive; the store writes them in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*")

UtcDatetime = Annotated[datetime, AfterValidator(_assume_utc)]
"""A datetime that is always aware: a naive one is taken to be UTC."""


class Indicator(StrEnum):
    """The page-wide severity Statuspage clients read from `status.indicator`."""

    NONE = "none"
    MINOR = "minor"
    MAJOR = "major"
    CRITICAL = "critical"


# Worst last. Maintenance is planned, so it ranks below any unplanned degradation.
_STATE_SEVERITY = {
    ComponentState.OPERATIONAL: 0,
    ComponentState.UNDER_MAINTENANCE: 1,
    ComponentState.DEGRADED_PERFORMANCE: 2,
    ComponentState.PARTIAL_OUTAGE: 3,
    ComponentState.MAJOR_OUTAGE: 4,
}
# How Statuspage blends component states into the page indicator.
_STATE_INDICATOR = {
    ComponentState.OPERATIONAL: Indicator.NONE,
    ComponentState.UNDER_MAINTENANCE: Indicator.NONE,
    ComponentState.DEGRADED_PERFORMANCE: Indicator.MINOR,
    ComponentState.PARTIAL_OUTAGE: Indicator.MAJOR,
    ComponentState.MAJOR_OUTAGE: Indicator.CRITICAL,
}
_IMPACT_INDICATOR = {
    Impact.NONE: Indicator.NONE,
    Impact.MINOR: Indicator.MINOR,
    Impact.MAJOR: Indicator.MAJOR,
    Impact.CRITICAL: Indicator.CRITICAL,
}
_INDICATOR_ORDER = [Indicator.NONE, Indicator.MINOR, Indicator.MAJOR, Indicator.CRITICAL]


class PublicUpdate(BaseModel):
    """One published update as the public sees it, in every language it was rendered in."""

    id: int
    status: IncidentStatus
    created_at: UtcDatetime
    next_update_at: UtcDatetime | None = None
    texts: dict[str, Rendered] = Field(description="language -> the long-family text (+subject)")

    def text_for(self, language: str, *, fallback: str | None = None) -> Rendered | None:
        """The text in `language`, else in `fallback`, else in any language there is."""
        for candidate in (language, fallback):
            if candidate is not None and candidate in self.texts:
                return self.texts[candidate]
        return next(iter(self.texts.values()), None)


class PublicIncident(BaseModel):
    """An incident or maintenance with its public update thread (newest first)."""

    id: int
    kind: IncidentKind
    title: str
    status: IncidentStatus
    impact: Impact
    components: dict[str, ComponentState]
    created_at: UtcDatetime
    resolved_at: UtcDatetime | None = None
    updates: list[PublicUpdate] = Field(default_factory=list, description="newest first")
    scheduled_for: UtcDatetime | None = Field(
        default=None, description="maintenance only: when the window starts"
    )
    scheduled_until: UtcDatetime | None = Field(
        default=None, description="maintenance only: when the window ends"
    )

    @property
    def is_open(self) -> bool:
        """Not resolved or completed yet (scheduled maintenance counts as open)."""
        return not self.status.is_final

    @property
    def is_active(self) -> bool:
        """Affecting users now: an open incident or a maintenance in progress."""
        if self.kind is IncidentKind.MAINTENANCE:
            return self.status is IncidentStatus.IN_PROGRESS
        return self.is_open

    @property
    def thread(self) -> list[PublicUpdate]:
        """The updates newest first, whatever order the builder gave them in."""
        return sorted(self.updates, key=lambda u: (u.created_at, u.id), reverse=True)

    @property
    def latest(self) -> PublicUpdate | None:
        thread = self.thread
        return thread[0] if thread else None

    @property
    def updated_at(self) -> datetime:
        latest = self.latest
        return latest.created_at if latest else self.created_at


class OverallStatus(BaseModel):
    """The page-wide summary: the worst component state and the Statuspage indicator."""

    model_config = ConfigDict(frozen=True)

    state: ComponentState
    indicator: Indicator

    @property
    def is_operational(self) -> bool:
        return self.state is ComponentState.OPERATIONAL and self.indicator is Indicator.NONE


class PublicState(BaseModel):
    """Everything the public side shows, as of `generated_at`."""

    page_title: str
    languages: list[str] = Field(min_length=1, description="the first one is the default")
    timezone: TimeZoneName = "UTC"
    generated_at: UtcDatetime
    status_page_url: str | None = None
    subscribe_url: str | None = Field(
        default=None, description="the self-service subscribe form, when it is on"
    )
    components: list[ComponentStatus] = Field(
        default_factory=list, description="the current state of every configured component"
    )
    incidents: list[PublicIncident] = Field(
        default_factory=list, description="open ones and those resolved in the last 14 days"
    )

    @field_validator("languages")
    @classmethod
    def _unique_languages(cls, value: list[str]) -> list[str]:
        # Language codes become file names (fr/index.html, status.fr.json).
        bad = [code for code in value if not _LANGUAGE_TAG.fullmatch(code)]
        if bad:
            raise ValueError(f"not a language tag (like 'en' or 'pt-BR'): {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"languages are listed twice: {value}")
        return value

    @property
    def default_language(self) -> str:
        return self.languages[0]

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def overall(self) -> OverallStatus:
        """The worst component state, and the indicator Statuspage would show.

        The indicator blends component states (degraded -> minor, partial outage ->
        major, major outage -> critical) with the impact of every incident still
        open, so an incident declared `major` reads `major` even before anyone has
        marked a component down.
        """
        state = max(
            (c.state for c in self.components),
            key=_STATE_SEVERITY.__getitem__,
            default=ComponentState.OPERATIONAL,
        )
        indicators = [_STATE_INDICATOR[c.state] for c in self.components]
        indicators += [
            _IMPACT_INDICATOR[i.impact]
            for i in self.incidents
            if i.kind is IncidentKind.INCIDENT and i.is_open
        ]
        indicator = max(indicators, key=_INDICATOR_ORDER.index, default=Indicator.NONE)
        return OverallStatus(state=state, indicator=indicator)

    def active_incidents(self) -> list[PublicIncident]:
        """Open incidents and maintenance in progress, most recently updated first."""
        active = [i for i in self.incidents if i.is_active]
        return sorted(active, key=lambda i: (i.updated_at, i.id), reverse=True)

    def open_incidents(self) -> list[PublicIncident]:
        """Unplanned incidents not resolved yet, most recently updated first."""
        return [i for i in self.active_incidents() if i.kind is IncidentKind.INCIDENT]

    def maintenances(self) -> list[PublicIncident]:
        """Maintenance scheduled or in progress, soonest first."""
        planned = [i for i in self.incidents if i.kind is IncidentKind.MAINTENANCE and i.is_open]
        return sorted(planned, key=lambda i: (i.scheduled_for or i.created_at, i.id))

    def resolved_incidents(self) -> list[PublicIncident]:
        """Resolved incidents and completed maintenance, most recently closed first."""
        closed = [i for i in self.incidents if not i.is_open]
        return sorted(closed, key=lambda i: (i.resolved_at or i.updated_at, i.id), reverse=True)
