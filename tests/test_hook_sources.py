"""Grafana, PagerDuty and generic JSON in: each authenticated its own way, then parsed,
routed and deduplicated like Alertmanager's notifications (tests/test_hooks.py)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from broadcaster.core import Broadcaster
from broadcaster.models import IncidentStatus
from broadcaster.sandbox import WebhookReceiver
from tests.conftest import MakeBroadcaster, webhook_channel
from tests.test_hooks import FIRING as ALERTMANAGER_FIRING
from tests.test_hooks import resolved
from tests.test_serve import serving

# Resolutions here go out at once; tests/test_flapping.py covers flapping damping.
NO_DAMPING = {"min_update_interval_seconds": 0}
GRAFANA_TOKEN = "grafana-token-0123456789"
GRAFANA_SECRET = "grafana-hmac-secret-0123456789"
PAGERDUTY_SECRET = "pd-webhook-secret-new-0123456789"
PAGERDUTY_OLD_SECRET = "pd-webhook-secret-old-0123456789"
GENERIC_TOKEN = "generic-token-0123456789"
GENERIC_SECRET = "generic-hmac-secret-0123456789"

# Grafana unified alerting's webhook payload, as its documentation shows it
# (grafana.com/docs/grafana/latest/alerting/configure-notifications/manage-contact-points/
# integrations/webhook-notifier/).
GRAFANA_FIRING: dict[str, Any] = {
    "receiver": "My Super Webhook",
    "status": "firing",
    "orgId": 1,
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "High memory usage", "team": "blue", "zone": "us-1"},
            "annotations": {
                "description": "The system has high memory usage",
                "runbook_url": "https://myrunbook.com/runbook/1234",
                "summary": "This alert was triggered for zone us-1",
            },
            "startsAt": "2021-10-12T09:51:03.157076+02:00",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "https://play.grafana.org/alerting/1afz29v7z/edit",
            "fingerprint": "c6eadffa33fcdf37",
            "silenceURL": "https://play.grafana.org/alerting/silence/new?alertmanager=grafana"
            "&matchers=alertname%3DT2%2Cteam%3Dblue%2Czone%3Dus-1",
            "dashboardURL": "",
            "panelURL": "",
            "values": {"B": 44.23943737541908, "C": 1},
        },
        {
            "status": "firing",
            "labels": {"alertname": "High CPU usage", "team": "blue", "zone": "eu-1"},
            "annotations": {
                "description": "The system has high CPU usage",
                "runbook_url": "https://myrunbook.com/runbook/1234",
                "summary": "This alert was triggered for zone eu-1",
            },
            "startsAt": "2021-10-12T09:56:03.157076+02:00",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "https://play.grafana.org/alerting/d1rdpdv7k/edit",
            "fingerprint": "bc97ff14869b13e3",
            "silenceURL": "https://play.grafana.org/alerting/silence/new?alertmanager=grafana"
            "&matchers=alertname%3DT1%2Cteam%3Dblue%2Czone%3Deu-1",
            "dashboardURL": "",
            "panelURL": "",
            "values": {"B": 44.23943737541908, "C": 1},
        },
    ],
    "groupLabels": {},
    "commonLabels": {"team": "blue"},
    "commonAnnotations": {},
    "externalURL": "https://play.grafana.org/",
    "version": "1",
    "groupKey": "{}:{}",
    "truncatedAlerts": 0,
    "title": "[FIRING:2]  (blue)",
    "state": "alerting",
    "message": "**Firing**\n\nLabels:\n - alertname = T2\n - team = blue\n - zone = us-1\n",
}

# A PagerDuty V3 webhook: the incident example of PagerDuty's webhook overview
# (developer.pagerduty.com, docs/webhooks/01-Overview.md), as incident.triggered.
PAGERDUTY_TRIGGERED: dict[str, Any] = {
    "event": {
        "id": "5ac64822-4adc-4fda-ade0-410becf0de4f",
        "event_type": "incident.triggered",
        "resource_type": "incident",
        "occurred_at": "2020-04-09T15:16:27.169Z",
        "agent": {
            "html_url": "https://acme.pagerduty.com/users/PLH1HKV",
            "id": "PLH1HKV",
            "self": "https://api.pagerduty.com/users/PLH1HKV",
            "summary": "Tenex Engineer",
            "type": "user_reference",
        },
        "client": {"name": "PagerDuty"},
        "data": {
            "id": "PGR0VU2",
            "type": "incident",
            "self": "https://api.pagerduty.com/incidents/PGR0VU2",
            "html_url": "https://acme.pagerduty.com/incidents/PGR0VU2",
            "number": 2,
            "status": "triggered",
            "incident_key": "d3640fbd41094207a1c11e58e46b1662",
            "created_at": "2020-04-09T15:16:27Z",
            "title": "A little bump in the road",
            "service": {
                "html_url": "https://acme.pagerduty.com/services/PF9KMXH",
                "id": "PF9KMXH",
                "self": "https://api.pagerduty.com/services/PF9KMXH",
                "summary": "API Service",
                "type": "service_reference",
            },
            "assignees": [
                {
                    "html_url": "https://acme.pagerduty.com/users/PTUXL6G",
                    "id": "PTUXL6G",
                    "self": "https://api.pagerduty.com/users/PTUXL6G",
                    "summary": "User 123",
                    "type": "user_reference",
                }
            ],
            "escalation_policy": {
                "html_url": "https://acme.pagerduty.com/escalation_policies/PUS0KTE",
                "id": "PUS0KTE",
                "self": "https://api.pagerduty.com/escalation_policies/PUS0KTE",
                "summary": "Default",
                "type": "escalation_policy_reference",
            },
            "teams": [
                {
                    "html_url": "https://acme.pagerduty.com/teams/PFCVPS0",
                    "id": "PFCVPS0",
                    "self": "https://api.pagerduty.com/teams/PFCVPS0",
                    "summary": "Engineering",
                    "type": "team_reference",
                }
            ],
            "priority": {
                "html_url": "https://acme.pagerduty.com/account/incident_priorities",
                "id": "PSO75BM",
                "self": "https://api.pagerduty.com/priorities/PSO75BM",
                "summary": "P1",
                "type": "priority_reference",
            },
            "urgency": "high",
            "conference_bridge": {
                "conference_number": "+1 1234123412,,987654321#",
                "conference_url": "https://example.com",
            },
            "resolve_reason": None,
        },
    }
}

# The test event PagerDuty sends when a subscription is created or tested.
PAGERDUTY_PING: dict[str, Any] = {
    "event": {
        "id": "01FKZOXA868SHYEE4DVNWB5P9W",
        "event_type": "pagey.ping",
        "resource_type": "pagey",
        "occurred_at": "2025-04-07T03:00:55.532Z",
        "agent": {"id": "PVE0ZR9", "type": "user_reference"},
        "client": None,
        "data": {"message": "Hello from your friend Pagey!", "type": "ping"},
    }
}

GENERIC_FIRING: dict[str, Any] = {
    "group": "checkout-api/5xx",
    "status": "firing",
    "started_at": "2026-11-26T08:00:00Z",
    "labels": {"service": "checkout", "severity": "critical"},
    "annotations": {
        "summary": "5xx ratio 38% on checkout-7f9c (10.2.3.4)",
        "public_summary": "Checkout fails for some users.",
    },
}


def hex_hmac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def encode(body: object) -> bytes:
    return json.dumps(body).encode()


def grafana_headers(
    data: bytes,
    *,
    token: str | None = GRAFANA_TOKEN,
    secret: str | None = GRAFANA_SECRET,
    header: str = "X-Grafana-Alerting-Signature",
) -> dict[str, str]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if secret is not None:
        headers[header] = hex_hmac(secret, data)
    return headers


def pagerduty_headers(data: bytes, *secrets: str) -> dict[str, str]:
    signatures = ",".join(f"v1={hex_hmac(secret, data)}" for secret in secrets)
    return {"X-PagerDuty-Signature": signatures}


def generic_headers(
    data: bytes, *, token: str | None = GENERIC_TOKEN, secret: str | None = GENERIC_SECRET
) -> dict[str, str]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if secret is not None:
        headers["X-Broadcaster-Signature"] = f"sha256={hex_hmac(secret, data)}"
    return headers


# Valid credentials per source, for a body's bytes.
SIGNED: dict[str, Callable[[bytes], dict[str, str]]] = {
    "grafana": grafana_headers,
    "pagerduty": lambda data: pagerduty_headers(data, PAGERDUTY_SECRET),
    "generic": generic_headers,
}
SAMPLES = {"grafana": GRAFANA_FIRING, "pagerduty": PAGERDUTY_TRIGGERED, "generic": GENERIC_FIRING}


async def post(
    base: str, source: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/hooks/{source}",
            data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
        ) as response,
    ):
        return response.status, await response.json()


async def send(base: str, source: str, body: object) -> dict[str, Any]:
    """Post a correctly authenticated body; the one intake result."""
    data = encode(body)
    status, answer = await post(base, source, data, SIGNED[source](data))
    assert status == 200, answer
    (result,) = answer["results"]
    return dict(result)


def route(name: str, source: str, match: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "source": source,
        "match": match,
        "title": "Some payments are failing",
        "components": {"payments": "major_outage"},
        "impact": "major",
        "fields": {"summary": "Some payments fail."},
        **extra,
    }


@pytest.fixture
async def setup(
    receiver: WebhookReceiver,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Broadcaster, str]]:
    for name, value in {
        "GRAFANA_TOKEN": GRAFANA_TOKEN,
        "GRAFANA_HMAC": GRAFANA_SECRET,
        "PD_SECRET": PAGERDUTY_SECRET,
        "GENERIC_TOKEN": GENERIC_TOKEN,
        "GENERIC_HMAC": GENERIC_SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    b = await make_broadcaster(
        {
            "status-page": {"type": "banner", "output": "public"},
            "hooks": webhook_channel(receiver, ["partner"]),
        },
        components={"payments": "Payments"},
        hooks={
            "grafana_token": {"env": "GRAFANA_TOKEN"},
            "grafana_hmac_secret": {"env": "GRAFANA_HMAC"},
            "pagerduty_secret": {"env": "PD_SECRET"},
            "generic_token": {"env": "GENERIC_TOKEN"},
            "generic_hmac_secret": {"env": "GENERIC_HMAC"},
            "max_body_bytes": 65_536,
        },
        routes=[
            route("grafana-blue", "grafana", {"team": "blue"}),
            route("grafana-now", "grafana", {"team": "checkout"}, action="publish", **NO_DAMPING),
            route(
                "pd-api",
                "pagerduty",
                {"service": "API Service", "priority": "P1", "urgency": "high"},
                fields={},
                alert_fields={"summary": "annotations.summary"},
            ),
            route(
                "pd-now",
                "pagerduty",
                {"service": "Checkout Service"},
                action="publish",
                **NO_DAMPING,
            ),
            route("generic-checkout", "generic", {"service": "checkout"}),
            route(
                "generic-now", "generic", {"service": "payments"}, action="publish", **NO_DAMPING
            ),
        ],
    )
    async with serving(b) as base:
        yield b, base


def grafana_checkout(payload: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(payload)
    body["groupKey"] = '{}:{team="checkout"}'
    body["commonLabels"] = {"team": "checkout"}
    return body


def pagerduty_event(event_type: str, **data: Any) -> dict[str, Any]:
    body = copy.deepcopy(PAGERDUTY_TRIGGERED)
    body["event"]["event_type"] = event_type
    body["event"]["data"].update(data)
    if event_type == "incident.resolved":
        body["event"]["id"] = "01DEN6WJ2PXO5XGRW0TJKLZDBR"
        body["event"]["occurred_at"] = "2020-04-09T15:58:02.371Z"
        body["event"]["data"]["status"] = "resolved"
    return body


PAGERDUTY_CHECKOUT = {
    "id": "Q1CHK0UT",
    "service": {"id": "PCHK001", "summary": "Checkout Service", "type": "service_reference"},
}


def generic_payments(**changes: Any) -> dict[str, Any]:
    body = {**GENERIC_FIRING, "group": "payments/errors", "labels": {"service": "payments"}}
    return {**body, **changes}


# -- the same answers on every source ------------------------------------------------


@pytest.mark.parametrize("source", ["grafana", "pagerduty", "generic"])
async def test_malformed_oversized_and_unauthenticated_requests_change_nothing(
    setup: tuple[Broadcaster, str], source: str
) -> None:
    b, base = setup
    raw = b"{not json"
    status, body = await post(base, source, raw, SIGNED[source](raw))
    assert status == 400 and body["detail"].startswith("malformed JSON")
    huge = b" " * 100_000
    status, _ = await post(base, source, huge, SIGNED[source](huge))
    assert status == 413

    data = encode(SAMPLES[source])
    status, body = await post(base, source, data)
    assert status == 401 and body["detail"].startswith("missing")
    forged = {key: value[:-4] + "beef" for key, value in SIGNED[source](data).items()}
    status, body = await post(base, source, data, forged)
    assert status == 403 and body["detail"] in ("wrong token", "wrong signature")
    assert await b.drafts() == [] and await b.incidents() == []


@pytest.mark.parametrize("named", [False, True], ids=["not-named", "named-but-unset"])
@pytest.mark.parametrize("source", ["grafana", "pagerduty", "generic"])
async def test_source_without_a_secret_is_not_served(
    make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch, source: str, named: bool
) -> None:
    monkeypatch.delenv("UNSET_SECRET", raising=False)
    key = {"grafana": "grafana_hmac_secret", "pagerduty": "pagerduty_secret"}.get(
        source, "generic_token"
    )
    b = await make_broadcaster(
        {"status-page": {"type": "banner", "output": "public"}},
        hooks={key: {"env": "UNSET_SECRET"}} if named else {},
    )
    data = encode(SAMPLES[source])
    async with serving(b) as base:
        status, body = await post(base, source, data, SIGNED[source](data))
    assert status == 404 and body["detail"] == f"the {source} hook is not configured"


# -- Grafana ----------------------------------------------------------------------------


async def test_grafana_notification_is_drafted_once(setup: tuple[Broadcaster, str]) -> None:
    b, base = setup
    result = await send(base, "grafana", GRAFANA_FIRING)
    assert result["action"] == "drafted" and result["route"] == "grafana-blue"
    assert (await send(base, "grafana", GRAFANA_FIRING))["action"] == "duplicate"
    (draft,) = await b.drafts()
    # The episode started with the group's earliest alert; groups are per organisation.
    assert draft.alert_key == "grafana:org1:{}:{}|2021-10-12T09:51:03.157076+02:00"
    assert draft.source == "grafana" and await b.incidents() == []


async def test_grafana_publish_route_opens_and_resolves(setup: tuple[Broadcaster, str]) -> None:
    b, base = setup
    opened = await send(base, "grafana", grafana_checkout(GRAFANA_FIRING))
    assert opened["action"] == "published" and opened["route"] == "grafana-now"
    assert (await send(base, "grafana", grafana_checkout(GRAFANA_FIRING)))["action"] == "duplicate"
    closed = await send(base, "grafana", grafana_checkout(resolved(GRAFANA_FIRING)))
    assert closed["action"] == "published" and closed["incident_id"] == opened["incident_id"]
    assert (await b.incident(opened["incident_id"])).status is IncidentStatus.RESOLVED
    await asyncio.wait_for(b.wait([opened["update_id"], closed["update_id"]]), timeout=10)


async def test_grafana_needs_both_token_and_signature_when_both_are_configured(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    data = encode(GRAFANA_FIRING)
    status, body = await post(base, "grafana", data, grafana_headers(data, token=None))
    assert status == 401 and body["detail"] == "missing Authorization: Bearer"
    status, body = await post(base, "grafana", data, grafana_headers(data, secret=None))
    assert status == 401 and body["detail"] == "missing X-Grafana-Alerting-Signature signature"
    status, body = await post(base, "grafana", data, grafana_headers(data, token="guessed"))
    assert status == 403 and body["detail"] == "wrong token"
    status, body = await post(base, "grafana", data, grafana_headers(data, secret="guessed"))
    assert status == 403 and body["detail"] == "wrong signature"
    assert await b.drafts() == []


async def test_grafana_signature_with_timestamp_covers_timestamp_and_body(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    data = encode(GRAFANA_FIRING)

    def stamped(stamp: int, signed: bytes | None = None) -> dict[str, str]:
        message = signed if signed is not None else f"{stamp}:".encode() + data
        return {
            "Authorization": f"Bearer {GRAFANA_TOKEN}",
            "X-Grafana-Alerting-Signature": hex_hmac(GRAFANA_SECRET, message),
            "X-Grafana-Alerting-Signature-Timestamp": str(stamp),
        }

    now = int(time.time())
    status, body = await post(base, "grafana", data, stamped(now - 3600))  # a replay
    assert status == 403 and "from now" in body["detail"]
    status, body = await post(base, "grafana", data, stamped(now, signed=data))
    assert status == 403 and body["detail"] == "wrong signature"  # the stamp is not signed
    assert await b.drafts() == []
    status, body = await post(base, "grafana", data, stamped(now))
    assert status == 200 and body["results"][0]["action"] == "drafted"


async def test_grafana_signature_header_is_configurable(
    make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Grafana's code signs into X-Grafana-Alert-Signature when its Header field is left
    # empty, where its docs say X-Grafana-Alerting-Signature.
    monkeypatch.setenv("GRAFANA_HMAC", GRAFANA_SECRET)
    b = await make_broadcaster(
        {"status-page": {"type": "banner", "output": "public"}},
        hooks={
            "grafana_hmac_secret": {"env": "GRAFANA_HMAC"},
            "grafana_hmac_header": "X-Grafana-Alert-Signature",
        },
        routes=[route("grafana-blue", "grafana", {"team": "blue"})],
    )
    data = encode(GRAFANA_FIRING)
    async with serving(b) as base:
        status, body = await post(base, "grafana", data, grafana_headers(data, token=None))
        assert status == 401 and body["detail"] == "missing X-Grafana-Alert-Signature signature"
        signed = grafana_headers(data, token=None, header="X-Grafana-Alert-Signature")
        status, body = await post(base, "grafana", data, signed)
    assert status == 200 and body["results"][0]["action"] == "drafted"


async def test_alertmanager_payload_sent_to_grafana_names_the_version(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    data = encode(ALERTMANAGER_FIRING)
    status, body = await post(base, "grafana", data, grafana_headers(data))
    assert status == 422 and body["detail"] == "version: Input should be '1'"
    assert await b.drafts() == []


# -- PagerDuty --------------------------------------------------------------------------


async def test_pagerduty_triggered_incident_is_drafted_once_with_mapped_fields(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    result = await send(base, "pagerduty", PAGERDUTY_TRIGGERED)
    assert result["action"] == "drafted" and result["route"] == "pd-api"
    # PagerDuty delivers at least once: a re-delivery is a duplicate.
    assert (await send(base, "pagerduty", PAGERDUTY_TRIGGERED))["action"] == "duplicate"
    (draft,) = await b.drafts()
    assert draft.alert_key == "pagerduty:PGR0VU2|2020-04-09T15:16:27+00:00"
    assert draft.request.fields == {"summary": "A little bump in the road"}


async def test_pagerduty_publish_route_opens_and_resolves(setup: tuple[Broadcaster, str]) -> None:
    b, base = setup
    triggered = pagerduty_event("incident.triggered", **PAGERDUTY_CHECKOUT)
    opened = await send(base, "pagerduty", triggered)
    assert opened["action"] == "published" and opened["route"] == "pd-now"
    acknowledged = await send(
        base, "pagerduty", pagerduty_event("incident.acknowledged", **PAGERDUTY_CHECKOUT)
    )
    assert acknowledged == {
        "action": "ignored",
        "reason": "event type incident.acknowledged is not handled",
        "route": None,
        "incident_id": None,
        "update_id": None,
        "draft_id": None,
        "not_before": None,
    }
    resolution = pagerduty_event("incident.resolved", **PAGERDUTY_CHECKOUT)
    closed = await send(base, "pagerduty", resolution)
    assert closed["action"] == "published" and closed["incident_id"] == opened["incident_id"]
    assert (await b.incident(opened["incident_id"])).status is IncidentStatus.RESOLVED
    assert (await send(base, "pagerduty", resolution))["action"] == "ignored"
    await asyncio.wait_for(b.wait([opened["update_id"], closed["update_id"]]), timeout=10)


async def test_pagerduty_ping_is_answered_and_ignored(setup: tuple[Broadcaster, str]) -> None:
    b, base = setup
    result = await send(base, "pagerduty", PAGERDUTY_PING)
    assert result["action"] == "ignored" and "pagey.ping" in result["reason"]
    assert await b.drafts() == []


async def test_pagerduty_secret_rotation_signatures_and_tampering(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    data = encode(PAGERDUTY_TRIGGERED)
    only_old = pagerduty_headers(data, PAGERDUTY_OLD_SECRET)
    status, body = await post(base, "pagerduty", data, only_old)
    assert status == 403 and body["detail"] == "wrong signature"
    tampered = data.replace(b"A little bump", b"A large crater")
    status, body = await post(
        base, "pagerduty", tampered, pagerduty_headers(data, PAGERDUTY_SECRET)
    )
    assert status == 403 and body["detail"] == "wrong signature"
    assert await b.drafts() == []

    # During rotation PagerDuty signs with the old and the new secret: any match passes.
    rotating = pagerduty_headers(data, PAGERDUTY_OLD_SECRET, PAGERDUTY_SECRET)
    status, body = await post(base, "pagerduty", data, rotating)
    assert status == 200 and body["results"][0]["action"] == "drafted"


async def test_pagerduty_incident_without_an_id_names_the_field(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    body = copy.deepcopy(PAGERDUTY_TRIGGERED)
    del body["event"]["data"]["id"]
    data = encode(body)
    status, answer = await post(base, "pagerduty", data, pagerduty_headers(data, PAGERDUTY_SECRET))
    assert status == 422 and answer["detail"] == "event.data.id: Field required"
    assert await b.drafts() == []


# -- generic JSON -----------------------------------------------------------------------


async def test_generic_alert_is_drafted_once_even_without_a_start_time(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    undated = {k: v for k, v in GENERIC_FIRING.items() if k != "started_at"}
    result = await send(base, "generic", undated)
    assert result["action"] == "drafted" and result["route"] == "generic-checkout"
    # The repeat starts "now" again, yet belongs to the episode waiting for approval.
    assert (await send(base, "generic", undated))["action"] == "duplicate"
    assert len(await b.drafts()) == 1


async def test_generic_publish_route_opens_and_resolves(setup: tuple[Broadcaster, str]) -> None:
    b, base = setup
    opened = await send(base, "generic", generic_payments())
    assert opened["action"] == "published" and opened["route"] == "generic-now"
    assert (await send(base, "generic", generic_payments()))["action"] == "duplicate"
    closed = await send(base, "generic", generic_payments(status="resolved", started_at=None))
    assert closed["action"] == "published" and closed["incident_id"] == opened["incident_id"]
    assert (await b.incident(opened["incident_id"])).status is IncidentStatus.RESOLVED
    await asyncio.wait_for(b.wait([opened["update_id"], closed["update_id"]]), timeout=10)


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"severity": "critical"}, "severity: Extra inputs are not permitted"),
        ({"status": "ok"}, "status: Input should be 'firing' or 'resolved'"),
        ({"started_at": "2026-11-26T08:00:00"}, "started_at: Input should have timezone info"),
        ({"labels": {"replicas": 3}}, "labels.replicas: Input should be a valid string"),
    ],
)
async def test_generic_schema_errors_name_the_field(
    setup: tuple[Broadcaster, str], change: dict[str, Any], detail: str
) -> None:
    b, base = setup
    data = encode({**GENERIC_FIRING, **change})
    status, body = await post(base, "generic", data, generic_headers(data))
    assert status == 422 and body["detail"] == detail
    no_group = encode({k: v for k, v in GENERIC_FIRING.items() if k != "group"})
    status, body = await post(base, "generic", no_group, generic_headers(no_group))
    assert status == 422 and body["detail"] == "group: Field required"
    assert await b.drafts() == []


async def test_generic_needs_both_token_and_signature_when_both_are_configured(
    setup: tuple[Broadcaster, str],
) -> None:
    b, base = setup
    data = encode(GENERIC_FIRING)
    status, body = await post(base, "generic", data, generic_headers(data, secret=None))
    assert status == 401 and body["detail"] == "missing X-Broadcaster-Signature signature"
    status, body = await post(base, "generic", data, generic_headers(data, token=None))
    assert status == 401 and body["detail"] == "missing Authorization: Bearer"
    unprefixed = {
        **generic_headers(data),
        "X-Broadcaster-Signature": hex_hmac(GENERIC_SECRET, data),
    }
    status, body = await post(base, "generic", data, unprefixed)
    assert status == 403 and body["detail"] == "wrong signature"
    assert await b.drafts() == []
