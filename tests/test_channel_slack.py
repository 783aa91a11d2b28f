"""The Slack channel: the real slack-sdk client against the local fake of Slack's Web API,
driven through Broadcaster.publish and wait like any delivery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from broadcaster.core import Broadcaster, PublishResult
from broadcaster.errors import PermanentError, PostGoneError
from broadcaster.models import (
    ChannelProgress,
    ComponentState,
    DeliveryState,
    Impact,
    IncidentStatus,
    UpdateRequest,
)
from broadcaster.sandbox import SlackFailure, SlackWebApi
from channels.base import Message, Recipient
from channels.slack import SlackChannel, escape_mrkdwn
from tests.conftest import MakeBroadcaster

TOKEN = "xoxb-test-0000-token"


@pytest.fixture(autouse=True)
def _no_proxy_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("SLACK_TEST_TOKEN", TOKEN)


@pytest.fixture
async def slack() -> AsyncIterator[SlackWebApi]:
    async with SlackWebApi(tokens=(TOKEN,), channels=("C0STATUS", "C0SUPPORT")) as fake:
        yield fake


def slack_channel(fake: SlackWebApi, channels: list[str], **extra: Any) -> dict[str, Any]:
    """A Slack channel config pointed at the fake, with fast retries."""
    return {
        "type": "slack",
        "token": {"env": "SLACK_TEST_TOKEN"},
        "channels": channels,
        "base_url": fake.api_url,
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
) -> tuple[PublishResult, list[ChannelProgress]]:
    result = await b.publish(request, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result, progress


def counts(progress: list[ChannelProgress], channel: str = "slack") -> dict[DeliveryState, int]:
    return next(p.counts for p in progress if p.channel == channel)


async def test_blocks_and_fallback_text_are_exactly_what_slack_receives(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {"slack": slack_channel(slack, ["C0STATUS"], languages=["fr"])},
        components={"api": "API publique"},
    )
    next_update = datetime(2026, 11, 26, 15, 30, tzinfo=UTC)
    request = UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title="Paiements refusés 💳",
        impact=Impact.MAJOR,
        components={"api": ComponentState.PARTIAL_OUTAGE},
        fields={"summary": "Les paiements échouent pour <certains> clients & marchands"},
        next_update_at=next_update,
        actor="test",
    )
    result, progress = await publish_and_wait(b, request)
    assert counts(progress) == {DeliveryState.SENT: 1}
    (post,) = [c for c in slack.calls_to("chat.postMessage") if c.ok]
    assert post.token == TOKEN
    assert post.params["channel"] == "C0STATUS"
    assert "thread_ts" not in post.params
    text = (
        "*Enquête en cours : Paiements refusés 💳*\n"
        "Les paiements échouent pour &lt;certains&gt; clients &amp; marchands. Nous enquêtons.\n"
        "Impact : API publique (panne partielle).\n"
        "Prochaine mise à jour à 15:30 UTC."
    )
    assert post.params["text"] == text
    assert post.params["blocks"] == [
        {"type": "header", "text": {"type": "plain_text", "text": "Paiements refusés 💳"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": "*Statut*\nEnquête en cours"},
                {"type": "mrkdwn", "text": "*Impact*\nMajeur"},
                {"type": "mrkdwn", "text": "*Services*\nAPI publique: Panne partielle"},
                {
                    "type": "mrkdwn",
                    "text": "*Prochaine mise à jour*\n<!date^1795707000^{date_short_pretty} "
                    "{time}|2026-11-26 15:30 UTC>",
                },
            ],
        },
    ]
    (delivery,) = await b.deliveries(result.incident.id)
    message = slack.message("C0STATUS", str(delivery.provider_id))
    assert message is not None and message.text == text
    assert delivery.permalink == "https://sandbox.slack.com/archives/C0STATUS/p" + str(
        delivery.provider_id
    ).replace(".", "")


def test_mrkdwn_escapes_only_ampersand_and_angle_brackets() -> None:
    assert escape_mrkdwn("a < b & c > d *bold* <@U123>") == (
        "a &lt; b &amp; c &gt; d *bold* &lt;@U123&gt;"
    )


async def test_followups_thread_under_the_first_post_in_each_slack_channel(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {"slack": slack_channel(slack, ["C0STATUS", "C0SUPPORT"], broadcast_follow_ups=True)}
    )
    first, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 2}
    for status in (IncidentStatus.IDENTIFIED, IncidentStatus.RESOLVED):
        _, progress = await publish_and_wait(
            b,
            UpdateRequest(status=status, fields={"summary": "A bad deploy."}, actor="test"),
            first.incident.id,
        )
        assert counts(progress) == {DeliveryState.SENT: 2}
    posts = [c.params for c in slack.calls_to("chat.postMessage") if c.ok]
    assert len(posts) == 6
    for channel in ("C0STATUS", "C0SUPPORT"):
        mine = [p for p in posts if p["channel"] == channel]
        root = next(m for m in slack.messages if m.channel == channel and m.thread_ts is None)
        assert "thread_ts" not in mine[0] and "reply_broadcast" not in mine[0]
        assert [p["thread_ts"] for p in mine[1:]] == [root.ts, root.ts]
        assert all(p["reply_broadcast"] is True for p in mine[1:])
        # The first post now shows the latest state; its first version is in its history.
        assert root.edits == 2
        assert root.text is not None and root.text.startswith("*Resolved: Payments fail*")
        assert root.history[0]["text"].startswith("*Investigating: Payments fail*")
    for delivery in await b.deliveries(first.incident.id):
        assert delivery.provider_id is not None and delivery.permalink is not None


async def test_429_retry_after_is_honoured(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    slack.fail("chat.postMessage", SlackFailure(status=429, retry_after=1.5))
    b = await make_broadcaster({"slack": slack_channel(slack, ["C0STATUS"])})
    _, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 1}
    first, second = slack.calls_to("chat.postMessage")
    assert (first.status, first.error) == (429, "ratelimited")
    assert second.ok
    assert second.at - first.at >= 1.5 - 0.05  # not earlier than Slack asked
    assert len(slack.messages) == 1


async def test_dropped_connection_and_5xx_are_retried_and_post_once(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    slack.fail("chat.postMessage", SlackFailure(drop=True), SlackFailure(status=503, times=1))
    b = await make_broadcaster({"slack": slack_channel(slack, ["C0STATUS"])})
    result, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 1}
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [None, 503, 200]
    assert len(slack.messages) == 1  # the SDK's own retry handlers did not post again
    (delivery,) = await b.deliveries(result.incident.id)
    assert delivery.attempts == 3


async def test_invalid_auth_stops_the_channel_and_doctor_says_why(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLACK_TEST_TOKEN", "xoxb-revoked")
    b = await make_broadcaster(
        {"slack": slack_channel(slack, ["C0STATUS", "C0SUPPORT"], concurrency=1)}
    )
    _, progress = await publish_and_wait(b, opening())
    (slack_progress,) = [p for p in progress if p.channel == "slack"]
    assert slack_progress.broken is not None and "invalid_auth" in slack_progress.broken
    assert slack_progress.counts == {DeliveryState.QUEUED: 2}  # none failed, none lost
    assert len(slack.calls_to("chat.postMessage")) == 1  # stopped at the first refusal
    check = next(c for c in await b.doctor() if c.subject == "channel slack")
    assert not check.ok
    assert check.detail == (
        f"slack: Slack refused the token (invalid_auth) — auth.test at {slack.api_url} failed"
    )


async def test_doctor_passes_with_a_working_token_and_names_a_missing_one(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await make_broadcaster({"slack": slack_channel(slack, ["C0STATUS"])})
    check = next(c for c in await b.doctor() if c.subject == "channel slack")
    assert check.ok and check.detail == "slack, ok"
    assert [c.token for c in slack.calls_to("auth.test")] == [TOKEN]
    monkeypatch.delenv("SLACK_TEST_TOKEN")
    check = next(c for c in await b.doctor() if c.subject == "channel slack")
    assert not check.ok
    assert "environment variable SLACK_TEST_TOKEN" in check.detail


async def test_channel_not_found_fails_only_that_slack_channel(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"slack": slack_channel(slack, ["C0STATUS", "C0GONE"])})
    result, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 1, DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(result.incident.id, states=[DeliveryState.FAILED])
    assert failed.recipient == "C0GONE"
    assert failed.last_error == "slack → C0GONE: Slack channel_not_found"
    assert (
        len([c for c in slack.calls_to("chat.postMessage") if c.params["channel"] == "C0GONE"]) == 1
    )


async def test_edit_and_delete_a_post(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"slack": slack_channel(slack, ["C0STATUS"])})
    first, _ = await publish_and_wait(b, opening())
    (delivery,) = await b.deliveries(first.incident.id)
    ts = str(delivery.provider_id)
    correction = await b.preview(
        UpdateRequest(
            status=IncidentStatus.INVESTIGATING,
            title="Payments fail",
            fields={"summary": "Card payments fail for every user."},
            actor="test",
        )
    )
    channel = b.channels["slack"]
    assert isinstance(channel, SlackChannel)
    message = Message(
        render=correction.renders[0],
        recipient=Recipient(id="C0STATUS"),
        thread=None,
        incident_id=first.incident.id,
        update_id=first.update.id,
        delivery_key="edit",
    )
    try:
        receipt = await channel.edit(ts, message)
        assert receipt.provider_id == ts and receipt.data == {"channel": "C0STATUS"}
        edited = slack.message("C0STATUS", ts)
        assert edited is not None and edited.text is not None
        assert "Card payments fail for every user." in edited.text
        assert edited.blocks is not None and edited.blocks[0]["text"]["text"] == "Payments fail"

        await channel.delete(ts, Recipient(id="C0STATUS"))
        assert slack.message("C0STATUS", ts) is None
        with pytest.raises(PostGoneError, match="message_not_found"):  # counted as deleted
            await channel.delete(ts, Recipient(id="C0STATUS"))
        with pytest.raises(PermanentError, match="message_not_found"):
            await channel.edit(ts, message)
    finally:
        await channel.close()


async def test_eta_field_is_shown_in_each_language_words(
    slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"slack": slack_channel(slack, ["C0STATUS"], languages=["fr"])})
    request = UpdateRequest(
        status=IncidentStatus.IDENTIFIED,
        title="Paiements refusés",
        fields={
            "summary": "Un certificat a expiré",
            "eta": "within the hour",
            "eta.fr": "d'ici 15 h",
        },
        actor="test",
    )
    await publish_and_wait(b, request)
    (post,) = [c for c in slack.calls_to("chat.postMessage") if c.ok]
    fields = [f["text"] for f in post.params["blocks"][-1]["fields"]]
    assert "*Rétablissement prévu*\nd'ici 15 h" in fields
