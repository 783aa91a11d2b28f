"""The Teams channel: Adaptive Cards POSTed to the local fake of Power Automate Workflows
webhooks, driven through Broadcaster.publish and wait like any delivery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broadcaster.core import Broadcaster, PublishResult
from broadcaster.errors import PermanentError
from broadcaster.models import (
    ChannelFamily,
    ChannelProgress,
    ChannelRender,
    ComponentState,
    DeliveryState,
    Impact,
    IncidentStatus,
    Rendered,
    UpdateRequest,
)
from broadcaster.sandbox.teams import FakeTeamsWorkflow, WorkflowFailure
from channels.base import Message, Recipient
from channels.teams import TeamsChannel, adaptive_card, webhook_url_problem
from tests.conftest import MakeBroadcaster

ENV = "TEAMS_TEST_WEBHOOK_URL"
WORKFLOW = "0f3c2a7d9b8e4c1fa6d5e4b3c2a1f0e9"
SIG = "s3cr3t-Sig_0123456789abcdefghijklmnopqrstuv"


@pytest.fixture
async def teams(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeTeamsWorkflow]:
    async with FakeTeamsWorkflow() as fake:
        monkeypatch.setenv(ENV, fake.add_workflow(WORKFLOW, sig=SIG))
        yield fake


def teams_channel(**extra: Any) -> dict[str, Any]:
    """A Teams channel config whose URL is in the environment, with fast retries."""
    return {
        "type": "teams",
        "webhook_url": {"env": ENV},
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


def opening(**extra: Any) -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title="Payments fail",
        fields={"summary": "Card payments fail for some users."},
        actor="test",
        **extra,
    )


async def publish_and_wait(
    b: Broadcaster, request: UpdateRequest, incident: int | None = None
) -> tuple[PublishResult, ChannelProgress]:
    result = await b.publish(request, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result, next(p for p in progress if p.channel == "teams")


async def test_the_card_is_exactly_what_the_workflow_receives(
    teams: FakeTeamsWorkflow, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {"teams": teams_channel(languages=["fr"])},
        components={"api": "API publique"},
        status_page_url="https://status.example.com",
    )
    request = UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title="Paiements refusés 💳",
        impact=Impact.MAJOR,
        components={"api": ComponentState.PARTIAL_OUTAGE},
        fields={"summary": "Les paiements échouent pour <certains> clients & marchands"},
        next_update_at=datetime(2026, 11, 26, 15, 30, tzinfo=UTC),
        actor="test",
    )
    result, progress = await publish_and_wait(b, request)
    assert progress.counts == {DeliveryState.SENT: 1}  # accepted by Workflows, not seen
    (call,) = teams.calls
    assert (call.workflow, call.sig, call.status, call.posted) == (WORKFLOW, SIG, 202, True)
    assert call.body == {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [
                        {
                            "type": "TextBlock",
                            "text": "Paiements refusés 💳",
                            "weight": "Bolder",
                            "size": "Large",
                            "wrap": True,
                        },
                        {
                            "type": "TextBlock",
                            "text": "Enquête en cours : Paiements refusés 💳",
                            "wrap": True,
                            "weight": "Bolder",
                        },
                        {
                            "type": "TextBlock",
                            "text": "Les paiements échouent pour <certains> clients & marchands. "
                            "Nous enquêtons.",
                            "wrap": True,
                            "spacing": "None",
                        },
                        {
                            "type": "TextBlock",
                            "text": "Impact : API publique (panne partielle).",
                            "wrap": True,
                            "spacing": "None",
                        },
                        {
                            "type": "TextBlock",
                            "text": "Prochaine mise à jour à 15:30 UTC.",
                            "wrap": True,
                            "spacing": "None",
                        },
                        {
                            "type": "TextBlock",
                            "text": "Page de statut : https://status.example.com",
                            "wrap": True,
                            "spacing": "None",
                        },
                        {
                            "type": "FactSet",
                            "facts": [
                                {"title": "Statut", "value": "Enquête en cours"},
                                {"title": "Impact", "value": "Majeur"},
                                {"title": "Services", "value": "API publique: Panne partielle"},
                                {"title": "Prochaine mise à jour", "value": "2026-11-26 15:30 UTC"},
                            ],
                        },
                    ],
                    "actions": [
                        {
                            "type": "Action.OpenUrl",
                            "title": "Page de statut",
                            "url": "https://status.example.com",
                        }
                    ],
                },
            }
        ],
    }
    (card,) = teams.cards
    assert card.texts[0] == "Paiements refusés 💳"
    (delivery,) = await b.deliveries(result.incident.id)
    assert delivery.state is DeliveryState.SENT
    assert delivery.provider_id is None and delivery.permalink is None


def render_of(text: str, **facts: Any) -> ChannelRender:
    return ChannelRender(
        channel="teams",
        family=ChannelFamily.CHAT,
        template="investigating",
        variants=[Rendered(language="en", text=text)],
        joined=True,
        facts=facts,
    )


def test_heading_lines_turn_bold_and_masked_links_show_their_target() -> None:
    card = adaptive_card(
        render_of(
            "*Investigating: db_primary down*\n"
            "See [the runbook](https://evil.example/phish) now.\n"
            "\n"
            "**Already bold** and _italic_ stay as written.",
            title="[Login](https://evil.example) fails",
        )
    )
    assert [(b["text"], b.get("weight"), b.get("spacing")) for b in card["body"]] == [
        ("Login (https://evil.example) fails", "Bolder", None),
        ("Investigating: db_primary down", "Bolder", None),
        ("See the runbook (https://evil.example/phish) now.", None, "None"),
        ("**Already bold** and _italic_ stay as written.", None, None),
    ]
    assert "actions" not in card  # no status page configured


def test_joined_languages_are_separated() -> None:
    render = render_of("*Investigating*\nLooking.")
    render.variants.append(Rendered(language="fr", text="*Enquête en cours*\nNous regardons."))
    body = adaptive_card(render)["body"]
    assert [b["text"] for b in body] == [
        "Investigating",
        "Looking.",
        "Enquête en cours",
        "Nous regardons.",
    ]
    assert body[2]["separator"] is True and body[2]["spacing"] == "Medium"


async def test_429_retry_after_is_honoured(
    teams: FakeTeamsWorkflow, make_broadcaster: MakeBroadcaster
) -> None:
    teams.fail(WorkflowFailure(status=429, retry_after=1))
    b = await make_broadcaster({"teams": teams_channel()})
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}
    first, second = teams.calls
    assert (first.status, first.error) == (429, "TooManyRequests")
    assert second.status == 202
    assert second.at - first.at >= 1 - 0.05  # not earlier than Workflows asked
    assert len(teams.cards) == 1


async def test_5xx_and_a_dropped_connection_are_retried(
    teams: FakeTeamsWorkflow, make_broadcaster: MakeBroadcaster
) -> None:
    teams.fail(WorkflowFailure(drop=True), WorkflowFailure(status=502))
    b = await make_broadcaster({"teams": teams_channel()})
    result, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}
    assert [c.status for c in teams.calls] == [None, 502, 202]
    (delivery,) = await b.deliveries(result.incident.id)
    assert delivery.attempts == 3


async def test_a_bad_sig_stops_the_channel_and_says_what_to_do(
    teams: FakeTeamsWorkflow, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, teams.webhook_url(WORKFLOW, sig="regenerated-elsewhere"))
    b = await make_broadcaster({"teams": teams_channel()})
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.QUEUED: 1}  # kept for when the URL is fixed
    assert progress.broken == (
        "teams: HTTP 401 (credentials refused) — Workflows refused the URL's signature, or "
        f"the flow is turned off: turn the flow on, or copy its URL again into "
        f"environment variable {ENV}"
    )
    assert [(c.status, c.error) for c in teams.calls] == [
        (401, "DirectApiInvalidAuthorizationSignature")
    ]
    assert teams.cards == []


async def test_a_deleted_flow_stops_the_channel(
    teams: FakeTeamsWorkflow, make_broadcaster: MakeBroadcaster
) -> None:
    teams.delete_workflow(WORKFLOW)
    b = await make_broadcaster({"teams": teams_channel()})
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.QUEUED: 1}
    assert progress.broken is not None
    assert progress.broken.startswith("teams: HTTP 404 — the flow was deleted or its URL changed")
    assert [c.status for c in teams.calls] == [404]


async def test_a_400_fails_only_that_delivery(
    teams: FakeTeamsWorkflow, make_broadcaster: MakeBroadcaster
) -> None:
    teams.fail(WorkflowFailure(status=400))
    b = await make_broadcaster({"teams": teams_channel()})
    first, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.FAILED: 1}
    assert progress.broken is None
    (failed,) = await b.deliveries(first.incident.id)
    assert failed.last_error == "teams: HTTP 400"
    assert failed.attempts == 1  # never retried
    _, progress = await publish_and_wait(
        b,
        UpdateRequest(
            status=IncidentStatus.IDENTIFIED, fields={"summary": "A bad deploy."}, actor="test"
        ),
        first.incident.id,
    )
    assert progress.counts == {DeliveryState.SENT: 1}
    assert [c.status for c in teams.calls] == [400, 202]


async def test_the_webhook_sig_is_stored_and_logged_nowhere(
    teams: FakeTeamsWorkflow,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    teams.fail(WorkflowFailure(status=400), WorkflowFailure(status=503))
    b = await make_broadcaster({"teams": teams_channel()})
    first, _ = await publish_and_wait(b, opening())  # failed: 400
    await publish_and_wait(  # sent after a 503
        b,
        UpdateRequest(status=IncidentStatus.IDENTIFIED, fields={"summary": "x"}, actor="test"),
        first.incident.id,
    )
    wrong = "wrong-sig-9f8e7d6c5b4a"
    monkeypatch.setenv(ENV, teams.webhook_url(WORKFLOW, sig=wrong))
    _, progress = await publish_and_wait(  # broken: 401
        b,
        UpdateRequest(status=IncidentStatus.MONITORING, fields={"summary": "y"}, actor="test"),
        first.incident.id,
    )
    assert progress.broken is not None
    assert [c.status for c in teams.calls] == [400, 503, 202, 401]
    deliveries = await b.deliveries(first.incident.id)
    checks = await b.doctor()
    await b.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("broadcaster.db*"))
    assert b"teams: HTTP 400" in stored  # the errors are stored, the URL is not
    said = [
        *(d.model_dump_json() for d in deliveries),
        progress.broken,
        *(c.detail for c in checks),
        caplog.text,
    ]
    assert b"teams: HTTP 401" in stored
    for secret in (SIG, wrong, WORKFLOW):
        assert secret.encode() not in stored
        assert [s for s in said if secret in s] == []


async def test_doctor_checks_the_url_without_posting(
    teams: FakeTeamsWorkflow, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await make_broadcaster({"teams": teams_channel()})

    async def doctor() -> tuple[bool, str]:
        check = next(c for c in await b.doctor() if c.subject == "channel teams")
        return check.ok, check.detail

    assert await doctor() == (True, "teams, ok")
    monkeypatch.setenv(
        ENV, "https://contoso.webhook.office.com/webhookb2/abc@def/IncomingWebhook/x"
    )
    ok, detail = await doctor()
    assert not ok and "connectors are retired" in detail and "Workflows" in detail
    monkeypatch.setenv(ENV, teams.webhook_url(WORKFLOW, sig=""))
    ok, detail = await doctor()
    assert not ok and detail == (
        'teams: the webhook URL has no signature (sig=) — in the flow\'s trigger, let "Anyone" '
        "trigger it, then copy its URL again (checked without posting)"
    )
    monkeypatch.delenv(ENV)
    ok, detail = await doctor()
    assert not ok and f"environment variable {ENV}" in detail
    assert teams.calls == []  # doctor never posts a card


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "https://prod-12.westeurope.logic.azure.com:443/workflows/abc/triggers/manual/paths/"
            "invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=AbC",
            None,
        ),
        (
            "https://default1234.56.environment.api.powerplatform.com:443/powerautomate/"
            "automations/direct/workflows/abc/triggers/manual/paths/invoke?api-version=1&sig=x",
            None,
        ),
        (
            "http://prod-12.logic.azure.com/workflows/a/triggers/manual/paths/invoke?api-version=1"
            "&sig=x",
            "must start with https://",
        ),
        ("https://example.com/hook?sig=x", "not a Workflows trigger URL"),
        (
            "https://prod-1.logic.azure.com/workflows/a/triggers/manual/paths/invoke?sig=x",
            "no api-version=",
        ),
        ("not a url", "must start with https://"),
    ],
)
def test_webhook_url_shapes(url: str, problem: str | None) -> None:
    found = webhook_url_problem(url)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        assert "sig=x" not in found and "AbC" not in found


async def test_a_card_over_teams_size_is_refused_before_posting(
    teams: FakeTeamsWorkflow, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"teams": teams_channel()})
    channel = b.channels["teams"]
    assert isinstance(channel, TeamsChannel)
    # The text is within the chars limit; 600 components are not.
    components = {f"component-{i:03d}-with-a-long-name": "major outage" for i in range(600)}
    labels = {
        "headings": {
            "status": "Status",
            "impact": "Impact",
            "components": "Components",
            "next_update": "Next update",
        },
        "status": "Investigating",
        "impact": "Major",
        "components": components,
    }
    render = render_of("*Investigating: everything*\nAll down.", labels={"en": labels})
    message = Message(
        render=render,
        recipient=Recipient(id=""),
        thread=None,
        incident_id=1,
        update_id=1,
        delivery_key="k",
    )
    await channel.start()
    try:
        with pytest.raises(PermanentError, match=r"teams: card is \d+ bytes, Teams takes about"):
            await channel.send(message)
    finally:
        await channel.close()
    assert teams.calls == []
