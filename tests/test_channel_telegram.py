"""The Telegram adapter on the real python-telegram-bot, against the fake Bot API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broadcaster.core import Broadcaster
from broadcaster.models import ChannelProgress, DeliveryState, IncidentStatus, UpdateRequest
from broadcaster.sandbox import BotApiFault, FakeChat, FakeTelegram
from channels.base import Message, Recipient
from channels.telegram import TelegramChannel
from tests.conftest import MakeBroadcaster

TOKEN = "123456:TEST-token"
CHANNEL = FakeChat(-1001111, type="channel", title="Acme status", username="acme_status")
GROUP = FakeChat(-1002222, type="supergroup", title="Acme ops")


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeTelegram]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TG_TOKEN", TOKEN)
    async with FakeTelegram(token=TOKEN, chats=[CHANNEL, GROUP]) as fake:
        yield fake


def telegram(api: FakeTelegram, chats: list[str | int], **extra: Any) -> dict[str, Any]:
    return {
        "type": "telegram",
        "token": {"env": "TG_TOKEN"},
        "chats": chats,
        "base_url": api.url,
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


def opening(title: str = "Payments fail", summary: str = "Card payments fail.") -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING, title=title, fields={"summary": summary}, actor="t"
    )


def resolving() -> UpdateRequest:
    return UpdateRequest(status=IncidentStatus.RESOLVED, actor="t")


async def publish_and_wait(
    b: Broadcaster, request: UpdateRequest, incident: int | None = None
) -> tuple[int, list[ChannelProgress]]:
    result = await b.publish(request, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result.incident.id, progress


def counts(progress: list[ChannelProgress], channel: str = "tg") -> dict[DeliveryState, int]:
    return next(p.counts for p in progress if p.channel == channel)


async def test_html_text_is_escaped_and_the_heading_bold(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"tg": telegram(api, [CHANNEL.id])})
    _, progress = await publish_and_wait(
        b, opening("<API> & cards", "Calls to <b>/pay</b> & refunds fail")
    )
    assert counts(progress) == {DeliveryState.DELIVERED: 1}
    (call,) = api.calls_of("sendMessage")
    assert call.content_type == "application/x-www-form-urlencoded"
    assert call.params["parse_mode"] == "HTML"
    assert call.params["chat_id"] == str(CHANNEL.id)
    assert call.params["text"] == (
        "<b>Investigating: &lt;API&gt; &amp; cards</b>\n"
        "Calls to &lt;b&gt;/pay&lt;/b&gt; &amp; refunds fail. We are looking into it."
    )
    (post,) = api.messages(CHANNEL.id)
    assert post.text == (
        "Investigating: <API> & cards\nCalls to <b>/pay</b> & refunds fail. We are looking into it."
    )
    (delivery,) = await b.deliveries(1)
    assert delivery.provider_id == "1"
    assert delivery.permalink == "https://t.me/acme_status/1"


async def test_french_text_with_accents_and_emoji_at_the_limit(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"tg": telegram(api, ["@acme_status"], languages=["fr"])})
    base = "Les paiements échouent — «&» 🔥 "
    preview = await b.preview(opening("Paiements", base + "é"))
    text = base + "é" * (1 + 4096 - len(preview.renders[0].text()))
    preview = await b.preview(opening("Paiements", text))
    assert preview.ok and len(preview.renders[0].text()) == 4096
    too_long = await b.preview(opening("Paiements", text + "é"))
    assert not too_long.ok  # the core refuses it before Telegram would

    _, progress = await publish_and_wait(b, opening("Paiements", text))
    assert counts(progress) == {DeliveryState.DELIVERED: 1}
    (call,) = api.calls_of("sendMessage")
    assert call.params["chat_id"] == "@acme_status"
    assert call.params["text"].startswith(
        "<b>Enquête en cours : Paiements</b>\nLes paiements échouent — «&amp;» 🔥 éé"
    )
    (post,) = api.messages(CHANNEL.id)
    assert post.text == preview.renders[0].text().replace("*", "")
    assert len(post.text) == 4096 - 2  # the heading's asterisks became <b>


async def test_followup_replies_to_first_message_in_each_chat(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"tg": telegram(api, [CHANNEL.id, GROUP.id])})
    incident, _ = await publish_and_wait(b, opening())
    _, progress = await publish_and_wait(
        b,
        UpdateRequest(status=IncidentStatus.IDENTIFIED, actor="t", fields={"summary": "DB"}),
        incident,
    )
    assert counts(progress) == {DeliveryState.DELIVERED: 2}
    _, progress = await publish_and_wait(b, resolving(), incident)
    assert counts(progress) == {DeliveryState.DELIVERED: 2}
    for chat in (CHANNEL.id, GROUP.id):
        first, *followups = api.messages(chat)
        assert first.reply_to is None
        assert [p.reply_to for p in followups] == [first.message_id, first.message_id]
        assert followups[-1].text.startswith("Resolved")
    replies = [c.params.get("reply_parameters") for c in api.calls_of("sendMessage")]
    assert replies[2:] == [{"message_id": 1, "allow_sending_without_reply": True}] * 4


async def test_retry_after_is_honoured(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    api.fail(
        "sendMessage",
        BotApiFault(error_code=429, description="Too Many Requests: retry after 1", retry_after=1),
    )
    b = await make_broadcaster({"tg": telegram(api, [CHANNEL.id])})
    _, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.DELIVERED: 1}
    first, second = api.calls_of("sendMessage")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1 - 0.05
    assert len(api.messages(CHANNEL.id)) == 1


async def test_server_error_is_retried_once_per_attempt_without_double_post(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    api.fail("sendMessage", BotApiFault(error_code=502, description="Bad Gateway"))
    b = await make_broadcaster({"tg": telegram(api, [CHANNEL.id])})
    _, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.DELIVERED: 1}
    assert [c.status for c in api.calls_of("sendMessage")] == [502, 200]  # PTB did not retry
    (delivery,) = await b.deliveries(1)
    assert delivery.attempts == 2
    assert len(api.messages(CHANNEL.id)) == 1


async def test_invalid_token_stops_the_channel_and_doctor_says_why(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TG_TOKEN", "123456:WRONG-token")
    b = await make_broadcaster({"tg": telegram(api, [CHANNEL.id, GROUP.id], concurrency=1)})
    _, progress = await publish_and_wait(b, opening())
    (tg,) = progress
    assert tg.broken is not None and "token was refused" in tg.broken
    assert "WRONG" not in tg.broken
    assert tg.counts == {DeliveryState.QUEUED: 2}
    assert len(api.calls_of("sendMessage")) == 1  # stopped at the first refusal
    check = next(c for c in await b.doctor() if c.subject == "channel tg")
    assert not check.ok
    assert "getMe" in check.detail and "token was refused" in check.detail
    assert "WRONG" not in check.detail

    monkeypatch.setenv("TG_TOKEN", TOKEN)
    check = next(c for c in await b.doctor() if c.subject == "channel tg")
    assert check.ok, check.detail


async def test_missing_token_is_reported_by_doctor(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TG_TOKEN")
    b = await make_broadcaster({"tg": telegram(api, [CHANNEL.id])})
    check = next(c for c in await b.doctor() if c.subject == "channel tg")
    assert not check.ok and "TG_TOKEN" in check.detail


async def test_chat_not_found_fails_only_that_chat(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"tg": telegram(api, [CHANNEL.id, -1009999])})
    _, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.DELIVERED: 1, DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(1, states=[DeliveryState.FAILED])
    assert failed.recipient == "-1009999"
    assert failed.last_error == "tg → -1009999: Chat not found"
    assert failed.attempts == 1  # BadRequest is a NetworkError in PTB: never retried


async def test_kicked_from_a_channel_breaks_it_but_a_blocked_user_fails_alone(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    api.add_chat(FakeChat(-1003333, type="channel", kicked=True))
    api.add_chat(FakeChat(4242, type="private", title="Ann", kicked=True))
    b = await make_broadcaster(
        {
            "kicked": telegram(api, [-1003333]),
            "private": telegram(api, [4242, CHANNEL.id]),
        }
    )
    _, progress = await publish_and_wait(b, opening())
    kicked = next(p for p in progress if p.channel == "kicked")
    assert kicked.broken is not None and "add the bot to -1003333 again" in kicked.broken
    assert kicked.counts == {DeliveryState.QUEUED: 1}
    assert counts(progress, "private") == {DeliveryState.DELIVERED: 1, DeliveryState.FAILED: 1}


async def test_chat_migration_is_followed(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    api.add_chat(FakeChat(-4444, type="group", migrated_to=-1004444))
    api.add_chat(FakeChat(-1004444, type="supergroup"))
    b = await make_broadcaster({"tg": telegram(api, [-4444])})
    incident, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.DELIVERED: 1}
    await publish_and_wait(b, resolving(), incident)
    chats = [c.params["chat_id"] for c in api.calls_of("sendMessage")]
    # The follow-up goes straight to the new chat: its id was recorded with the first post.
    assert chats == ["-4444", "-1004444", "-1004444"]
    first, followup = api.messages(-1004444)
    assert followup.reply_to == first.message_id


async def test_edit_and_delete(api: FakeTelegram, make_broadcaster: MakeBroadcaster) -> None:
    b = await make_broadcaster({"tg": telegram(api, [CHANNEL.id])})
    incident, _ = await publish_and_wait(b, opening("Payments & refunds"))
    (delivery,) = await b.deliveries(incident)
    assert delivery.provider_id is not None
    correction = (await b.preview(opening("Payments only"), incident)).renders[0]
    channel = b.channels["tg"]
    assert isinstance(channel, TelegramChannel)
    await channel.start()
    try:
        message = Message(
            render=correction,
            recipient=Recipient(id=str(CHANNEL.id)),
            thread=None,
            incident_id=incident,
            update_id=delivery.update_id,
            delivery_key="edit",
        )
        receipt = await channel.edit(delivery.provider_id, message)
        assert receipt.provider_id == delivery.provider_id
        assert receipt.permalink == f"https://t.me/acme_status/{delivery.provider_id}"
        (post,) = api.messages(CHANNEL.id)
        assert post.edited and post.text.startswith("Investigating: Payments only\n")
        (call,) = api.calls_of("editMessageText")
        assert call.params["parse_mode"] == "HTML"

        await channel.delete(delivery.provider_id, Recipient(id=str(CHANNEL.id)))
        assert api.messages(CHANNEL.id) == []
        from channels.base import PostGoneError

        # Gone already: a retraction counts it as deleted.
        with pytest.raises(PostGoneError, match="Message to delete not found"):
            await channel.delete(delivery.provider_id, Recipient(id=str(CHANNEL.id)))
    finally:
        await channel.close()


def test_config_refuses_a_chat_that_is_neither_id_nor_username() -> None:
    from pydantic import ValidationError

    from channels.telegram import TelegramConfig

    with pytest.raises(ValidationError, match="not a chat id"):
        TelegramConfig(type="telegram", token={"env": "X"}, chats=["acme status"])


def test_groups_and_channels_get_twenty_messages_a_minute() -> None:
    from channels.base import ChannelContext
    from channels.telegram import GROUP_RATE_LIMIT, TelegramConfig

    config = TelegramConfig(type="telegram", token={"env": "TG_TOKEN"}, chats=[CHANNEL.id, 42])
    channel = TelegramChannel("tg", config, ChannelContext(base_dir=Path("."), data_dir=Path(".")))
    assert channel.rate_limit_for("42").per_target_per_second == 1  # a private chat
    group = channel.rate_limit_for(str(CHANNEL.id))
    assert group == GROUP_RATE_LIMIT
    assert group.per_target_per_second is not None
    assert 60 * group.per_target_per_second + group.per_target_burst <= 20
    own = TelegramConfig.model_validate({**config.model_dump(), "rate_limit": {}})
    assert TelegramChannel("tg", own, channel.context).rate_limit_for(str(CHANNEL.id)) == (
        own.rate_limit
    )
