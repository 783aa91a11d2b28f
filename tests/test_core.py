"""The Python API's rules: what an update may be, and what it does to its incident."""

from __future__ import annotations

import pytest

from broadcaster.core import Broadcaster
from broadcaster.errors import BroadcasterError, CheckFailedError, NotFoundError
from broadcaster.models import (
    ComponentState,
    Impact,
    IncidentKind,
    IncidentStatus,
    UpdateRequest,
)
from broadcaster.sandbox import WebhookReceiver
from tests.conftest import MakeBroadcaster, webhook_channel

COMPONENTS = {"api": "Public API", "app": "Mobile app"}


@pytest.fixture
async def b(receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster) -> Broadcaster:
    return await make_broadcaster(
        {"hooks": webhook_channel(receiver, ["a"])}, components=COMPONENTS
    )


def request(status: IncidentStatus = IncidentStatus.INVESTIGATING, **kw: object) -> UpdateRequest:
    fields = kw.pop("fields", {"summary": "Requests fail."})
    return UpdateRequest(status=status, fields=fields, actor="test", **kw)


async def test_preview_stores_and_sends_nothing(b: Broadcaster, receiver: WebhookReceiver) -> None:
    preview = await b.preview(request(title="API down"))
    assert preview.ok and [r.channel for r in preview.renders] == ["hooks"]
    assert "Requests fail." in preview.renders[0].text("en")
    assert await b.incidents() == []
    assert receiver.attempts == []


async def test_failed_check_stores_nothing(b: Broadcaster) -> None:
    with pytest.raises(CheckFailedError, match="summary"):
        await b.publish(request(title="API down", fields={}))
    assert await b.incidents() == []


async def test_impact_follows_the_worst_component_and_resolve_restores_them(b: Broadcaster) -> None:
    opened = await b.publish(
        request(
            title="API down",
            components={
                "api": ComponentState.MAJOR_OUTAGE,
                "app": ComponentState.DEGRADED_PERFORMANCE,
            },
        )
    )
    assert opened.incident.impact is Impact.MAJOR
    updated = await b.publish(
        request(IncidentStatus.IDENTIFIED, components={"app": ComponentState.OPERATIONAL}),
        opened.incident.id,
    )
    assert updated.incident.components == {
        "api": ComponentState.MAJOR_OUTAGE,
        "app": ComponentState.OPERATIONAL,
    }
    resolved = await b.publish(request(IncidentStatus.RESOLVED, fields={}), opened.incident.id)
    assert resolved.incident.status is IncidentStatus.RESOLVED
    assert set(resolved.incident.components.values()) == {ComponentState.OPERATIONAL}
    assert resolved.incident.resolved_at is not None


async def test_maintenance_resolves_as_completed(b: Broadcaster) -> None:
    planned = await b.publish(
        request(
            IncidentStatus.SCHEDULED,
            title="Database upgrade",
            fields={"starts_at": "2026-12-01T02:00", "ends_at": "2026-12-01T04:00"},
            components={"api": ComponentState.UNDER_MAINTENANCE},
        )
    )
    assert planned.incident.kind is IncidentKind.MAINTENANCE
    assert planned.update.template == "maintenance_scheduled"
    done = await b.publish(request(IncidentStatus.RESOLVED, fields={}), planned.incident.id)
    assert done.incident.status is IncidentStatus.COMPLETED
    assert done.update.template == "maintenance_completed"


@pytest.mark.parametrize(
    ("kwargs", "incident", "message"),
    [
        ({}, None, "needs a title"),
        (
            {"title": "x", "components": {"db": ComponentState.MAJOR_OUTAGE}},
            None,
            "unknown component 'db' — configured: api, app",
        ),
        ({"title": "x", "channels": ["sms"]}, None, "unknown channel 'sms' — configured: hooks"),
        ({"title": "x", "template": "nope"}, None, "unknown template 'nope'"),
        ({}, 42, "no incident #42"),
    ],
)
async def test_mistakes_are_explained(
    b: Broadcaster, kwargs: dict[str, object], incident: int | None, message: str
) -> None:
    with pytest.raises(BroadcasterError, match=message):
        await b.publish(request(**kwargs), incident)


async def test_a_resolved_incident_takes_no_more_updates(b: Broadcaster) -> None:
    opened = await b.publish(request(title="API down"))
    await b.publish(request(IncidentStatus.RESOLVED, fields={}), opened.incident.id)
    with pytest.raises(BroadcasterError, match="open a new incident"):
        await b.publish(request(IncidentStatus.IDENTIFIED), opened.incident.id)


async def test_opening_as_resolved_is_refused(b: Broadcaster) -> None:
    with pytest.raises(BroadcasterError, match="already resolved"):
        await b.publish(request(IncidentStatus.RESOLVED, title="x", fields={}))


async def test_retry_of_unknown_channel_is_explained(b: Broadcaster) -> None:
    opened = await b.publish(request(title="API down"))
    with pytest.raises(NotFoundError, match="unknown channel 'sms'"):
        await b.retry(opened.incident.id, channel="sms", actor="t")
