"""The admin API under /v1/: tokens and scopes, publishing with dry runs, drafts, reading."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from broadcaster.core import Broadcaster
from broadcaster.models import UpdateRequest
from broadcaster.sandbox import Behaviour, WebhookReceiver
from tests.conftest import MakeBroadcaster, webhook_channel
from tests.test_serve import BANNER, OPENING, serving

TOKENS = {"READ_TOKEN": "r-secret-1", "PUBLISH_TOKEN": "p-secret-2", "ADMIN_TOKEN": "a-secret-3"}
API_TOKENS = [
    {"name": "dashboard", "scope": "read", "secret": {"env": "READ_TOKEN"}},
    {"name": "comms", "scope": "publish", "secret": {"env": "PUBLISH_TOKEN"}},
    {"name": "ops", "scope": "admin", "secret": {"env": "ADMIN_TOKEN"}},
]
OPEN_BODY = OPENING.model_dump(mode="json", exclude={"actor"})


@pytest.fixture(autouse=True)
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)


class Client:
    """A tiny JSON client of the API with one token."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str | None) -> None:
        self.session, self.base, self.token = session, base, token

    async def call(
        self, method: str, path: str, body: Any = None, **headers: str
    ) -> tuple[int, Any]:
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        async with self.session.request(
            method, f"{self.base}{path}", json=body, headers=headers
        ) as reply:
            data = await reply.read()
            return reply.status, json.loads(data) if data else None


@pytest.fixture
async def api(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> AsyncIterator[tuple[Broadcaster, str, aiohttp.ClientSession]]:
    b = await make_broadcaster(
        {"status-page": BANNER, "hooks": webhook_channel(receiver, ["a", "b"])},
        serve={"api_tokens": API_TOKENS},
    )
    async with serving(b) as base, aiohttp.ClientSession() as session:
        yield b, base, session


def as_(api: tuple[Broadcaster, str, aiohttp.ClientSession], token: str | None) -> Client:
    _b, base, session = api
    return Client(session, base, TOKENS[token] if token else None)


async def test_tokens_and_scopes_decide_and_refusals_change_nothing(api: Any) -> None:
    b = api[0]
    assert (await as_(api, None).call("GET", "/v1/incidents"))[0] == 401
    wrong = Client(api[2], api[1], "not-a-token")
    status, body = await wrong.call("POST", "/v1/incidents", OPEN_BODY)
    assert status == 403 and body["detail"] == "unknown token"
    status, body = await as_(api, "READ_TOKEN").call("POST", "/v1/incidents", OPEN_BODY)
    assert status == 403 and "needs publish" in body["detail"]
    status, body = await as_(api, "PUBLISH_TOKEN").call("GET", "/v1/doctor")
    assert status == 403 and "needs admin" in body["detail"]
    assert await b.incidents() == []  # nothing was stored by any refused request

    status, checks = await as_(api, "ADMIN_TOKEN").call("GET", "/v1/doctor")
    assert status == 200 and {c["subject"] for c in checks} >= {"store", "channel hooks"}
    for token in TOKENS.values():  # no token is ever echoed back
        assert token not in json.dumps(checks)


async def test_the_api_is_off_without_tokens(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"status-page": BANNER})
    async with serving(b) as base, aiohttp.ClientSession() as session:
        status, body = await Client(session, base, "anything").call("GET", "/v1/incidents")
    assert status == 404 and "serve.api_tokens" in body["detail"]


async def test_dry_run_then_publish_then_follow_up_and_the_audit_names_the_person(
    api: Any, receiver: WebhookReceiver
) -> None:
    b = api[0]
    comms = as_(api, "PUBLISH_TOKEN")
    status, preview = await comms.call("POST", "/v1/incidents?dry_run=true", OPEN_BODY)
    assert status == 200 and preview["failures"] == []
    assert {r["channel"] for r in preview["renders"]} == {"status-page", "hooks"}
    assert await b.incidents() == [] and receiver.received == []  # a dry run stores nothing

    headers = {"X-Broadcaster-Actor": "cli:alice"}
    status, result = await comms.call("POST", "/v1/incidents", OPEN_BODY, **headers)
    assert status == 201 and result["new"] is True
    incident_id = result["incident"]["id"]
    await asyncio.wait_for(b.wait([result["update"]["id"]]), timeout=10)
    assert len(receiver.received) == 2

    follow_up = {"status": "identified", "fields": {"summary": "A bad deploy."}}
    status, result = await comms.call(
        "POST", f"/v1/incidents/{incident_id}/updates", follow_up, **headers
    )
    assert status == 201 and result["incident"]["status"] == "identified"

    status, audit = await as_(api, "READ_TOKEN").call("GET", f"/v1/incidents/{incident_id}/audit")
    assert status == 200
    assert {entry["actor"] for entry in audit if entry["action"] == "publish"} == {
        "cli:alice via api:comms"
    }


async def test_failed_checks_and_unknown_things_are_refused_precisely(api: Any) -> None:
    b = api[0]
    comms = as_(api, "PUBLISH_TOKEN")
    missing_summary = {**OPEN_BODY, "fields": {}}
    status, body = await comms.call("POST", "/v1/incidents", missing_summary)
    assert status == 422 and body["error"] == "CheckFailedError"
    assert body["failures"][0]["check"] and "summary" in body["detail"]
    status, body = await comms.call("POST", "/v1/incidents", {"status": "nonsense"})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "status"]
    status, body = await comms.call("GET", "/v1/incidents/999")
    assert status == 404 and body["error"] == "NotFoundError"
    status, body = await comms.call("POST", "/v1/incidents/999/updates", {"status": "resolved"})
    assert status == 404
    assert await b.incidents() == []


async def test_deliveries_retry_and_cancel(api: Any, receiver: WebhookReceiver) -> None:
    b = api[0]
    receiver.script("b", Behaviour(status=410, times=1))  # gone: a permanent failure
    comms = as_(api, "PUBLISH_TOKEN")
    _, result = await comms.call("POST", "/v1/incidents", OPEN_BODY)
    incident_id = result["incident"]["id"]
    await asyncio.wait_for(b.wait([result["update"]["id"]]), timeout=10)

    status, failed = await comms.call(
        "GET", f"/v1/incidents/{incident_id}/deliveries?channel=hooks&state=failed"
    )
    assert status == 200 and [d["recipient"] for d in failed] == ["b"]
    assert "410" in failed[0]["last_error"]
    status, progress = await comms.call("GET", f"/v1/incidents/{incident_id}/progress")
    hooks = next(p for p in progress if p["channel"] == "hooks")
    assert hooks["counts"] == {"delivered": 1, "failed": 1}

    status, requeued = await comms.call("POST", f"/v1/incidents/{incident_id}/retry?channel=hooks")
    assert status == 200 and requeued == {"requeued": 1, "skipped": 0}
    await asyncio.wait_for(b.wait(), timeout=10)
    assert [r.path for r in receiver.received].count("/hook/b") == 1  # 2xx only
    _, progress = await comms.call("GET", f"/v1/incidents/{incident_id}/progress?channel=hooks")
    assert progress[0]["counts"] == {"delivered": 2}

    receiver.default(Behaviour(status=503, retry_after=30))  # the provider asks to wait…
    wrong = {"status": "identified", "fields": {"summary": "Wrong words."}}
    _, result = await comms.call("POST", f"/v1/incidents/{incident_id}/updates", wrong)
    update_id = result["update"]["id"]
    await asyncio.sleep(0.5)  # tried once, now waiting for its retry
    status, cancelled = await comms.call("POST", f"/v1/updates/{update_id}/cancel")
    assert status == 200 and cancelled == {"cancelled": 2}
    _, progress = await comms.call("GET", f"/v1/incidents/{incident_id}/progress?channel=hooks")
    assert progress[0]["counts"]["cancelled"] == 2
    status, body = await comms.call("POST", "/v1/updates/999/cancel")
    assert status == 404 and body["error"] == "NotFoundError"


async def test_drafts_are_approved_or_rejected_once(api: Any, receiver: WebhookReceiver) -> None:
    b = api[0]
    request = UpdateRequest.model_validate({**OPEN_BODY, "actor": "alertmanager"})
    first, _ = await b.store.create_draft(
        source="alertmanager", route="api", alert_key=None, incident_id=None, request=request
    )
    second, _ = await b.store.create_draft(
        source="alertmanager", route="api", alert_key=None, incident_id=None, request=request
    )
    reader, comms = as_(api, "READ_TOKEN"), as_(api, "PUBLISH_TOKEN")
    status, drafts = await reader.call("GET", "/v1/drafts")
    assert status == 200 and [d["id"] for d in drafts] == [first.id, second.id]
    assert (await reader.call("POST", f"/v1/drafts/{first.id}/approve"))[0] == 403

    status, result = await comms.call("POST", f"/v1/drafts/{first.id}/approve")
    assert status == 200 and result["incident"]["title"] == OPENING.title
    status, body = await comms.call("POST", f"/v1/drafts/{first.id}/approve")
    assert status == 409 and "already approved" in body["detail"]
    status, rejected = await comms.call("POST", f"/v1/drafts/{second.id}/reject")
    assert status == 200 and rejected["state"] == "rejected"
    _, remaining = await reader.call("GET", "/v1/drafts")
    assert remaining == []
    _, everything = await reader.call("GET", "/v1/drafts?state=all")
    assert {d["state"] for d in everything} == {"approved", "rejected"}
    assert len(await b.incidents()) == 1


async def test_templates_channels_and_the_openapi_schema(api: Any) -> None:
    reader = as_(api, "READ_TOKEN")
    status, templates = await reader.call("GET", "/v1/templates")
    assert status == 200 and "investigating" in {t["name"] for t in templates}
    status, template = await reader.call("GET", "/v1/templates/investigating")
    assert "summary" in template["required"]
    status, body = await reader.call("GET", "/v1/templates/nope")
    assert status == 404 and "known:" in body["detail"]
    status, problems = await reader.call("GET", "/v1/templates/problems")
    assert status == 200 and problems == []
    status, channels = await reader.call("GET", "/v1/channels")
    assert {c["name"]: c["type"] for c in channels} == {"status-page": "banner", "hooks": "webhook"}

    status, schema = await as_(api, None).call("GET", "/v1/openapi.json")
    assert status == 200
    assert {"/v1/incidents", "/v1/drafts/{draft_id}/approve", "/v1/doctor"} <= set(schema["paths"])
    assert not any(path.startswith("/{path") for path in schema["paths"])


async def test_token_guessing_is_stopped_but_ordinary_mistakes_are_not(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {"status-page": BANNER},
        serve={
            "api_tokens": API_TOKENS,
            "rate_limit_per_ip": {"inbound": {"rate": "6/min", "burst": 2}},
        },
    )
    async with serving(b) as base, aiohttp.ClientSession() as session:
        reader = Client(session, base, TOKENS["READ_TOKEN"])
        for _ in range(4):  # a person's mistakes (no such incident) spend nothing
            assert (await reader.call("GET", "/v1/incidents/999"))[0] == 404
        guesser = Client(session, base, "guess")
        assert [(await guesser.call("GET", "/v1/incidents"))[0] for _ in range(2)] == [403, 403]
        status, body = await reader.call("GET", "/v1/incidents")  # same address, right token
        assert status == 429 and "retry in 10 s" in body["detail"]


async def test_corrections_and_retractions(api: Any, receiver: WebhookReceiver) -> None:
    b = api[0]
    comms, reader = as_(api, "PUBLISH_TOKEN"), as_(api, "READ_TOKEN")
    _, opened = await comms.call("POST", "/v1/incidents", OPEN_BODY)
    incident_id, first = opened["incident"]["id"], opened["update"]["id"]
    fixed = {"status": "investigating", "fields": {"summary": "Right words."}, "corrects": first}
    status, corrected = await comms.call("POST", f"/v1/incidents/{incident_id}/updates", fixed)
    assert status == 201 and corrected["update"]["corrects"] == first
    await asyncio.wait_for(b.wait(), timeout=10)

    update_id = corrected["update"]["id"]
    assert (await reader.call("POST", f"/v1/updates/{update_id}/retract"))[0] == 403
    status, planned = await comms.call("POST", f"/v1/updates/{update_id}/retract?dry_run=true")
    assert status == 200
    assert planned["channels"]["hooks"] == {"cancelled": 0, "deleting": 0, "kept": 2}
    assert planned["channels"]["status-page"]["deleting"] == 1
    status, done = await comms.call("POST", f"/v1/updates/{update_id}/retract")
    assert status == 200 and done == planned
    status, body = await comms.call("POST", f"/v1/updates/{update_id}/retract")
    assert status == 409 and "already retracted" in body["detail"]
    assert (await comms.call("POST", "/v1/updates/999/retract"))[0] == 404
    await asyncio.wait_for(b.wait(), timeout=10)
    _, progress = await reader.call("GET", f"/v1/incidents/{incident_id}/progress")
    actions = {(p["channel"], p["action"]): p["counts"] for p in progress}
    assert actions[("status-page", "delete")] == {"delivered": 1}
