"""Corrections and retractions, end to end: the real SDKs against the local fakes.

A correction edits the corrected update's posts where the channel can edit and is posted
as a follow-up elsewhere; a retraction deletes an update's posts where the channel can
delete. Both are deliveries, tracked and retried like posts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broadcaster.core import Broadcaster
from broadcaster.errors import BroadcasterError
from broadcaster.models import (
    ChannelProgress,
    DeliveryAction,
    DeliveryState,
    IncidentStatus,
    Retraction,
    UpdateRequest,
)
from broadcaster.sandbox import (
    BotApiFault,
    FakeChat,
    FakePds,
    FakeTelegram,
    SlackFailure,
    SlackWebApi,
    WebhookReceiver,
)
from tests.conftest import MakeBroadcaster

SLACK_TOKEN = "xoxb-test-0000-token"
TG_TOKEN = "123456:TEST-token"
BSKY_PASSWORD = "app-pass-word-1234"
CHAT = FakeChat(-1001111, type="channel", title="Status", username="acme_status")


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("SLACK_TEST_TOKEN", SLACK_TOKEN)
    monkeypatch.setenv("TG_TOKEN", TG_TOKEN)
    monkeypatch.setenv("BSKY_APP_PASSWORD", BSKY_PASSWORD)


@pytest.fixture
async def slack() -> AsyncIterator[SlackWebApi]:
    async with SlackWebApi(tokens=(SLACK_TOKEN,), channels=("C0STATUS",)) as fake:
        yield fake


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(token=TG_TOKEN, chats=[CHAT]) as fake:
        yield fake


@pytest.fixture
async def pds() -> AsyncIterator[FakePds]:
    async with FakePds(handle="status.example.com", password=BSKY_PASSWORD) as fake:
        yield fake


@pytest.fixture
async def b(
    slack: SlackWebApi,
    telegram: FakeTelegram,
    pds: FakePds,
    make_broadcaster: MakeBroadcaster,
    tmp_path: Path,
) -> Broadcaster:
    """Slack, Telegram, Bluesky and the status page, on their fakes."""
    broadcaster: Broadcaster = await make_broadcaster(
        public_channels(slack, telegram, pds, tmp_path)
    )
    return broadcaster


FAST = {"backoff_seconds": 0.05, "backoff_max_seconds": 0.5, "rate_limit": {}}


def public_channels(
    slack: SlackWebApi, telegram: FakeTelegram, pds: FakePds, tmp_path: Path
) -> dict[str, Any]:
    return {
        "slack": {
            "type": "slack",
            "token": {"env": "SLACK_TEST_TOKEN"},
            "channels": ["C0STATUS"],
            "base_url": slack.api_url,
            **FAST,
        },
        "tg": {
            "type": "telegram",
            "token": {"env": "TG_TOKEN"},
            "chats": [CHAT.id],
            "base_url": telegram.url,
            **FAST,
        },
        "bsky": {
            "type": "bluesky",
            "handle": pds.handle,
            "app_password": {"env": "BSKY_APP_PASSWORD"},
            "base_url": pds.url,
            **FAST,
        },
        "site": {"type": "banner", "output": str(tmp_path / "site")},
    }


def request(status: IncidentStatus, summary: str, **extra: Any) -> UpdateRequest:
    return UpdateRequest(status=status, fields={"summary": summary}, actor="test", **extra)


async def publish(
    b: Broadcaster, req: UpdateRequest, incident: int | None = None
) -> tuple[int, int, list[ChannelProgress]]:
    result = await b.publish(req, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result.incident.id, result.update.id, progress


def counts(
    progress: list[ChannelProgress], channel: str, action: DeliveryAction = DeliveryAction.POST
) -> dict[DeliveryState, int]:
    return next(p.counts for p in progress if p.channel == channel and p.action is action)


async def provider_id(b: Broadcaster, incident: int, update: int, channel: str) -> str:
    (delivery,) = [
        d
        for d in await b.deliveries(incident, channel=channel)
        if d.update_id == update and d.action is DeliveryAction.POST
    ]
    assert delivery.provider_id is not None
    return delivery.provider_id


async def test_correction_edits_in_place_where_it_can_and_follows_up_elsewhere(
    b: Broadcaster, slack: SlackWebApi, telegram: FakeTelegram, pds: FakePds, tmp_path: Path
) -> None:
    opening = request(IncidentStatus.INVESTIGATING, "Card payments fail", title="Payments")
    incident, first, _ = await publish(b, opening)
    _, wrong, _ = await publish(
        b, request(IncidentStatus.IDENTIFIED, "The bank's API is down"), incident
    )
    slack_ts = await provider_id(b, incident, wrong, "slack")
    tg_id = await provider_id(b, incident, wrong, "tg")
    slack_posts, tg_posts, bsky_posts = len(slack.messages), 2, len(pds.posts)

    correction = request(IncidentStatus.IDENTIFIED, "Our payment gateway is down", corrects=wrong)
    _, fixed, progress = await publish(b, correction, incident)

    assert counts(progress, "slack", DeliveryAction.EDIT) == {DeliveryState.SENT: 1}
    assert counts(progress, "tg", DeliveryAction.EDIT) == {DeliveryState.DELIVERED: 1}
    assert counts(progress, "bsky") == {DeliveryState.SENT: 1}  # cannot edit: a reply
    # Slack and Telegram: the wrong post now says the right thing, and nothing new.
    edited = slack.message("C0STATUS", slack_ts)
    assert edited is not None and edited.text is not None
    assert "Our payment gateway is down" in edited.text and edited.edits >= 1
    assert len(slack.messages) == slack_posts
    posts = telegram.messages(CHAT.id)
    assert len(posts) == tg_posts
    (tg_post,) = [p for p in posts if str(p.message_id) == tg_id]
    assert tg_post.edited and "Our payment gateway is down" in tg_post.text
    # Bluesky: a third post, replying to the wrong one (the latest of the thread).
    assert len(pds.posts) == bsky_posts + 1
    reply = pds.posts[-1].value
    assert "Our payment gateway is down" in reply["text"]
    assert reply["reply"]["parent"]["uri"] == await provider_id(b, incident, wrong, "bsky")
    # The status page shows the correction in place of the wrong update.
    page = (tmp_path / "site" / "index.html").read_text()
    assert "Our payment gateway is down" in page and "The bank" not in page
    assert "Card payments fail" in page
    # The next follow-up still threads under the first post on Slack.
    await publish(b, request(IncidentStatus.MONITORING, "A fix is out"), incident)
    latest = slack.messages[-1]
    assert latest.thread_ts == await provider_id(b, incident, first, "slack")
    assert fixed > wrong


async def test_correcting_an_update_that_never_went_out_posts_it(
    b: Broadcaster, slack: SlackWebApi
) -> None:
    incident, _, _ = await publish(
        b, request(IncidentStatus.INVESTIGATING, "Card payments fail", title="Payments")
    )
    slack.fail("chat.postMessage", SlackFailure(error="msg_too_long"))
    _, wrong, progress = await publish(
        b, request(IncidentStatus.IDENTIFIED, "Wrong words"), incident
    )
    assert counts(progress, "slack") == {DeliveryState.FAILED: 1}

    _, _, progress = await publish(
        b, request(IncidentStatus.IDENTIFIED, "Right words", corrects=wrong), incident
    )
    assert counts(progress, "slack", DeliveryAction.EDIT) == {DeliveryState.SENT: 1}
    assert slack.messages[-1].text is not None and "Right words" in slack.messages[-1].text
    assert slack.messages[-1].thread_ts == slack.messages[0].ts


async def test_a_correction_must_name_a_live_update_of_the_incident(b: Broadcaster) -> None:
    one, first, _ = await publish(b, request(IncidentStatus.INVESTIGATING, "A", title="One"))
    two, _, _ = await publish(b, request(IncidentStatus.INVESTIGATING, "B", title="Two"))
    with pytest.raises(BroadcasterError, match=f"not an update of incident #{two}"):
        await b.publish(request(IncidentStatus.IDENTIFIED, "C", corrects=first), two)
    await b.retract(first, actor="test")
    with pytest.raises(BroadcasterError, match="retracted"):
        await b.publish(request(IncidentStatus.IDENTIFIED, "C", corrects=first), one)


async def test_retract_deletes_posts_tracks_them_and_drops_the_update_everywhere(
    slack: SlackWebApi,
    telegram: FakeTelegram,
    pds: FakePds,
    make_broadcaster: MakeBroadcaster,
    tmp_path: Path,
) -> None:
    channels = public_channels(slack, telegram, pds, tmp_path)
    async with WebhookReceiver() as receiver:
        channels["hook"] = {
            "type": "webhook",
            "targets": [{"url": receiver.target("status")}],
            **FAST,
        }
        b = await make_broadcaster(channels)
        incident, first, _ = await publish(
            b, request(IncidentStatus.INVESTIGATING, "Card payments fail", title="Payments")
        )
        _, wrong, _ = await publish(
            b, request(IncidentStatus.RESOLVED, "Wrongly resolved"), incident
        )
        wrong_ids = {c: await provider_id(b, incident, wrong, c) for c in ("slack", "tg", "bsky")}

        preview = await b.retract(wrong, actor="test", dry_run=True)
        assert await b.deliveries(incident, channel="slack") != []
        assert slack.message("C0STATUS", wrong_ids["slack"]) is not None  # dry run

        report = await b.retract(wrong, actor="comms")
        assert report == preview
        assert report["slack"] == Retraction(deleting=1)
        assert report["tg"] == Retraction(deleting=1)
        assert report["bsky"] == Retraction(deleting=1)
        assert report["site"] == Retraction(deleting=1)
        assert report["hook"] == Retraction(kept=1)  # a webhook cannot be unsent
        progress = await asyncio.wait_for(b.wait([wrong]), timeout=30)
        for channel in ("slack", "tg", "bsky", "site"):
            assert counts(progress, channel, DeliveryAction.DELETE) == {DeliveryState.DELIVERED: 1}

    assert slack.message("C0STATUS", wrong_ids["slack"]) is None
    assert [str(p.message_id) for p in telegram.messages(CHAT.id)] == [
        await provider_id(b, incident, first, "tg")
    ]
    assert [p.uri for p in pds.posts] == [await provider_id(b, incident, first, "bsky")]
    page = (tmp_path / "site" / "index.html").read_text()
    assert "Wrongly resolved" not in page and "Card payments fail" in page
    reopened = await b.incident(incident)  # what the live updates say: not resolved
    assert reopened.status is IncidentStatus.INVESTIGATING and reopened.resolved_at is None
    with pytest.raises(BroadcasterError, match="already retracted"):
        await b.retract(wrong, actor="comms")
    (audit,) = [a for a in await b.audit(incident) if a.action == "retract"]
    assert audit.actor == "comms" and audit.detail["hook"]["kept"] == 1

    # A follow-up replies to what is left of the thread, not to the deleted post.
    await publish(b, request(IncidentStatus.IDENTIFIED, "Gateway down"), incident)
    reply = pds.posts[-1].value["reply"]
    assert reply["parent"]["uri"] == reply["root"]["uri"] == pds.posts[0].uri


async def test_retract_stops_what_is_queued_and_retries_a_refused_delete(
    b: Broadcaster, slack: SlackWebApi, telegram: FakeTelegram, pds: FakePds
) -> None:
    incident, first, _ = await publish(
        b, request(IncidentStatus.INVESTIGATING, "Card payments fail", title="Payments")
    )
    # Published, but nothing dispatches it before it is retracted: nothing goes out.
    queued = await b.publish(request(IncidentStatus.IDENTIFIED, "Wrong words"), incident)
    report = await b.retract(queued.update.id, actor="test")
    assert list(report.values()) == [Retraction(cancelled=1)] * 4
    progress = await asyncio.wait_for(b.wait([queued.update.id]), timeout=30)
    assert {p.channel: p.counts for p in progress} == {
        name: {DeliveryState.CANCELLED: 1} for name in ("bsky", "site", "slack", "tg")
    }
    assert len(slack.messages) == len(telegram.messages(CHAT.id)) == len(pds.posts) == 1

    # Telegram asks to wait before deleting: the delete is retried after it.
    telegram.fail("deleteMessage", BotApiFault(error_code=429, retry_after=0.2))
    await b.retract(first, actor="test")
    progress = await asyncio.wait_for(b.wait([first]), timeout=30)
    assert counts(progress, "tg", DeliveryAction.DELETE) == {DeliveryState.DELIVERED: 1}
    (delete,) = [
        d for d in await b.deliveries(incident, channel="tg") if d.action is DeliveryAction.DELETE
    ]
    assert delete.attempts == 2
    assert telegram.messages(CHAT.id) == [] and slack.messages == [] and pds.posts == []


async def test_a_delete_the_provider_refuses_fails_with_its_reason(
    b: Broadcaster, slack: SlackWebApi
) -> None:
    _, update, _ = await publish(
        b, request(IncidentStatus.INVESTIGATING, "Card payments fail", title="Payments")
    )
    slack.fail("chat.delete", SlackFailure(error="cant_delete_message"))
    await b.retract(update, actor="test")
    progress = await asyncio.wait_for(b.wait([update]), timeout=30)
    (failed,) = next(
        p.failures for p in progress if p.channel == "slack" and p.action is DeliveryAction.DELETE
    )
    assert "cant_delete_message" in (failed.last_error or "")
    assert counts(progress, "tg", DeliveryAction.DELETE) == {DeliveryState.DELIVERED: 1}


async def test_a_post_deleted_by_hand_is_posted_anew_by_a_correction_and_counts_as_retracted(
    b: Broadcaster, slack: SlackWebApi
) -> None:
    incident, first, _ = await publish(
        b, request(IncidentStatus.INVESTIGATING, "Card payments fail", title="Payments")
    )
    # Someone deleted the post in Slack meanwhile: there is nothing to edit.
    slack.fail("chat.update", SlackFailure(error="message_not_found"))
    _, fixed, progress = await publish(
        b,
        request(IncidentStatus.INVESTIGATING, "Card and wallet payments fail", corrects=first),
        incident,
    )
    assert counts(progress, "slack", DeliveryAction.EDIT) == {DeliveryState.SENT: 1}
    assert slack.messages[-1].text is not None and "wallet" in slack.messages[-1].text
    assert len(slack.calls_to("chat.postMessage")) == 2

    slack.fail("chat.delete", SlackFailure(error="message_not_found"))
    await b.retract(fixed, actor="test")
    progress = await asyncio.wait_for(b.wait([fixed]), timeout=30)
    assert counts(progress, "slack", DeliveryAction.DELETE) == {DeliveryState.DELIVERED: 1}
    (delete,) = [
        d
        for d in await b.deliveries(incident, channel="slack")
        if d.action is DeliveryAction.DELETE
    ]
    assert delete.last_error == "already gone"
