"""Alertmanager in: authenticated, parsed, routed, deduplicated, drafted or published."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from broadcaster.config import load_settings
from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.models import DeliveryState, DraftState, IncidentStatus, UpdateRequest
from broadcaster.sandbox import WebhookReceiver
from tests.conftest import MakeBroadcaster, webhook_channel
from tests.test_serve import serving

TOKEN = "am-token-0123456789"

# An Alertmanager webhook notification (payload version 4), as documented.
FIRING: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}/{severity="critical"}:{alertname="PaymentsErrors"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "incident-broadcaster",
    "groupLabels": {"alertname": "PaymentsErrors"},
    "commonLabels": {"alertname": "PaymentsErrors", "service": "payments", "severity": "critical"},
    "commonAnnotations": {
        "summary": "5xx ratio 38% on payments-api-7f9c (10.2.3.4), customer 88123",
        "public_summary": "Card payments fail for some users.",
        "runbook_url": "https://wiki.internal/runbooks/payments",
    },
    "externalURL": "http://alertmanager.internal:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "PaymentsErrors",
                "service": "payments",
                "severity": "critical",
                "instance": "10.2.3.4:9090",
            },
            "annotations": {"summary": "5xx ratio 38% on payments-api-7f9c (10.2.3.4)"},
            "startsAt": "2026-11-26T08:00:00.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.internal:9090/graph?g0.expr=...",
            "fingerprint": "c4e1f8a9d2b3c4e5",
        }
    ],
}


def resolved(payload: dict[str, Any] = FIRING) -> dict[str, Any]:
    body = copy.deepcopy(payload)
    body["status"] = "resolved"
    for alert in body["alerts"]:
        alert["status"] = "resolved"
        alert["endsAt"] = "2026-11-26T08:40:00.000Z"
    return body


def refired() -> dict[str, Any]:
    body = copy.deepcopy(FIRING)
    body["alerts"][0]["startsAt"] = "2026-11-26T11:00:00.000Z"
    return body


def route(**extra: Any) -> dict[str, Any]:
    return {
        "name": "payments",
        "source": "alertmanager",
        "match": {"service": "payments", "severity": "critical"},
        "title": "Card payments are failing",
        "components": {"payments": "major_outage"},
        "impact": "major",
        "alert_fields": {"summary": "annotations.public_summary"},
        **extra,
    }


@pytest.fixture
async def setup(
    receiver: WebhookReceiver,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Broadcaster, str]]:
    monkeypatch.setenv("AM_TOKEN", TOKEN)
    b = await make_broadcaster(
        {
            "status-page": {"type": "banner", "output": "public"},
            "hooks": webhook_channel(receiver, ["partner"]),
        },
        components={"payments": "Payments"},
        hooks={"alertmanager_token": {"env": "AM_TOKEN"}},
        routes=[
            route(),
            # Resolutions go out at once here; tests/test_flapping.py covers damping.
            route(
                name="publish-now",
                match={"service": "checkout"},
                action="publish",
                min_update_interval_seconds=0,
            ),
        ],
    )
    async with serving(b) as base:
        yield b, base


async def post(
    base: str, body: object, *, token: str | None = TOKEN, raw: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/hooks/alertmanager", data=data, headers=headers) as response,
    ):
        return response.status, await response.json()


OPENING_BY_HAND = UpdateRequest(
    status=IncidentStatus.INVESTIGATING,
    title="Slow logins",
    fields={"summary": "Logging in takes a minute."},
    actor="cli:alice",
)


def checkout(payload: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(payload)
    body["groupKey"] = '{}:{alertname="CheckoutDown"}'
    body["commonLabels"] = {"alertname": "CheckoutDown", "service": "checkout"}
    return body


async def test_unauthenticated_or_forged_requests_are_refused_and_change_nothing(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    status, body = await post(base, FIRING, token=None)
    assert status == 401
    status, body = await post(base, FIRING, token="guessed")
    assert status == 403 and body["detail"] == "wrong token"
    assert await b.drafts() == [] and await b.incidents() == []


async def test_malformed_and_oversized_bodies_get_precise_errors(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    status, body = await post(base, None, raw=b"{not json")
    assert status == 400 and body["detail"].startswith("malformed JSON")
    no_group = {k: v for k, v in FIRING.items() if k != "groupKey"}
    status, body = await post(base, no_group)
    assert status == 422 and body["detail"] == "groupKey: Field required"
    status, body = await post(base, {**FIRING, "version": "3"})
    assert status == 422 and body["detail"].startswith("version:")
    status, _ = await post(base, None, raw=b" " * 2_000_000)
    assert status == 413
    assert await b.drafts() == [] and await b.incidents() == []


async def test_firing_alert_is_drafted_once_and_published_on_approval(
    setup: tuple[Broadcaster, str], receiver: WebhookReceiver
) -> None:
    b, base = setup
    status, body = await post(base, FIRING)
    assert status == 200 and body["results"][0]["action"] == "drafted"
    status, body = await post(base, FIRING)  # Alertmanager repeats the notification
    assert body["results"][0]["action"] == "duplicate"
    (draft,) = await b.drafts()
    assert await b.incidents() == [] and receiver.attempts == []  # nothing public yet

    result = await b.approve(draft.id, actor="cli:alice")
    await asyncio.wait_for(b.wait([result.update.id]), timeout=10)
    assert result.incident.title == "Card payments are failing"
    (sent,) = [r.body for r in receiver.received]
    assert sent is not None
    text = sent["texts"]["en"]["text"]
    # Only the mapped annotation reaches the public text, never hosts or customers.
    assert "Card payments fail for some users." in text
    assert "10.2.3.4" not in json.dumps(sent) and "88123" not in json.dumps(sent)
    assert "wiki.internal" not in json.dumps(sent)
    assert (await b.drafts(state=DraftState.APPROVED))[0].decided_by == "cli:alice"

    status, body = await post(base, FIRING)  # still firing: same episode
    assert body["results"][0]["action"] == "duplicate"
    status, body = await post(base, resolved())
    assert body["results"][0]["action"] == "drafted"
    (resolution,) = await b.drafts()
    await b.approve(resolution.id, actor="cli:alice")
    incident = await b.incident(result.incident.id)
    assert incident.status is IncidentStatus.RESOLVED


async def test_publish_route_opens_resolves_and_reopens_on_a_new_episode(
    setup: tuple[Broadcaster, str], receiver: WebhookReceiver
) -> None:
    b, base = setup
    status, body = await post(base, checkout(FIRING))
    first = body["results"][0]
    assert first["action"] == "published" and first["route"] == "publish-now"
    await asyncio.wait_for(b.wait([first["update_id"]]), timeout=10)
    status, body = await post(base, checkout(FIRING))
    assert body["results"][0]["action"] == "duplicate"

    status, body = await post(base, checkout(resolved()))
    assert body["results"][0]["action"] == "published"
    assert (await b.incident(first["incident_id"])).status is IncidentStatus.RESOLVED
    status, body = await post(base, checkout(resolved()))  # a repeated resolution
    assert status == 200 and body["results"][0]["action"] == "ignored"

    _, body = await post(base, checkout(refired()))  # fires again after resolving
    again = body["results"][0]
    assert again["action"] == "published" and again["incident_id"] != first["incident_id"]
    await asyncio.wait_for(b.wait(), timeout=10)
    delivered = await b.deliveries(first["incident_id"], states=[DeliveryState.DELIVERED])
    assert len(delivered) >= 2  # banner + webhook of the opening, then the resolution


async def test_metrics_time_each_alert_to_its_first_delivery_once(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    _, body = await post(base, checkout(FIRING))
    await asyncio.wait_for(b.wait([body["results"][0]["update_id"]]), timeout=10)
    await b.publish(OPENING_BY_HAND)  # not from an alert: not timed

    async def scrape() -> str:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as reply:
            return await reply.text()

    first = await scrape()
    assert "broadcaster_alert_to_first_delivery_seconds_count 1.0" in first
    assert 'broadcaster_alert_to_first_delivery_seconds_bucket{le="5.0"} 1.0' in first
    await post(base, checkout(FIRING))  # a repeat opens nothing new
    assert "broadcaster_alert_to_first_delivery_seconds_count 1.0" in await scrape()


async def test_resolved_before_approval_makes_the_draft_obsolete(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    await post(base, FIRING)
    status, body = await post(base, resolved())
    assert status == 200
    assert body["results"][0]["action"] == "ignored"
    assert body["results"][0]["reason"] == "resolved before anyone approved its draft"
    assert await b.drafts() == []
    assert [d.state for d in await b.drafts(state=None)] == [DraftState.OBSOLETE]


async def test_alert_without_a_matching_route_is_ignored(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    other = copy.deepcopy(FIRING)
    other["commonLabels"] = {"alertname": "DiskFull", "service": "batch"}
    status, body = await post(base, other)
    assert status == 200 and body["results"][0]["action"] == "ignored"
    assert await b.drafts() == [] and await b.incidents() == []


async def test_hook_without_a_token_configured_is_not_served(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    b = await make_broadcaster({"status-page": {"type": "banner", "output": "public"}})
    async with serving(b) as base:
        status, body = await post(base, FIRING)
    assert status == 404 and "not configured" in body["detail"]


async def test_twenty_identical_notifications_at_once_open_one_incident_and_post_once(
    setup: tuple[Broadcaster, str], receiver: WebhookReceiver
) -> None:
    b, base = setup
    answers = await asyncio.gather(*(post(base, checkout(FIRING)) for _ in range(20)))
    actions = sorted(body["results"][0]["action"] for _status, body in answers)
    assert actions == ["duplicate"] * 19 + ["published"]
    (listed,) = await b.incidents()
    assert {body["results"][0]["incident_id"] for _status, body in answers} == {listed.id}
    assert len((await b.incident(listed.id)).updates) == 1
    await asyncio.wait_for(b.wait(), timeout=10)
    assert len(receiver.received) == 1  # the partner is told once


async def test_repeats_answered_from_memory_agree_with_the_store(
    setup: tuple[Broadcaster, str], make_broadcaster: MakeBroadcaster
) -> None:
    b, base = setup
    _, body = await post(base, checkout(FIRING))
    first = body["results"][0]
    # Another process (a person with the CLI) resolves it: this server does not know.
    other = await make_broadcaster(dict(b.settings.channels), components={"payments": "Payments"})
    resolution = UpdateRequest(status=IncidentStatus.RESOLVED, actor="cli:alice")
    await other.publish(resolution, first["incident_id"])
    _, body = await post(base, checkout(FIRING))  # a late repeat of the same episode
    assert body["results"][0]["action"] == "duplicate"
    assert [i.id for i in await b.incidents()] == [first["incident_id"]]
    _, body = await post(base, checkout(refired()))  # a new episode opens a new incident
    assert body["results"][0]["action"] == "published"
    assert body["results"][0]["incident_id"] != first["incident_id"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"components": {"nope": "major_outage"}}, "unknown component 'nope'"),
        ({"channels": ["nope"]}, "unknown channel 'nope'"),
    ],
)
def test_a_route_naming_what_does_not_exist_is_refused_when_the_config_loads(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    config = tmp_path / "broadcaster.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "components": {"payments": "Payments"},
                "channels": {"status-page": {"type": "banner"}},
                "routes": [route(**change)],
            }
        )
    )
    with pytest.raises(ConfigError, match=rf"routes\[0\] \(payments\): {message}"):
        load_settings(config)


async def test_a_publish_route_with_a_missing_template_drafts_instead_of_losing_the_alert(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AM_TOKEN", TOKEN)
    b = await make_broadcaster(
        {"status-page": {"type": "banner", "output": "public"}},
        components={"payments": "Payments"},
        hooks={"alertmanager_token": {"env": "AM_TOKEN"}},
        routes=[route(action="publish", template="no-such-template")],
    )
    async with serving(b) as base:
        status, body = await post(base, FIRING)
    assert status == 200 and body["results"][0]["action"] == "drafted"
    assert await b.incidents() == [] and len(await b.drafts()) == 1
