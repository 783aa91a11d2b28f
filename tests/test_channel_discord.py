"""The Discord channel: the adapter against the local fake of Discord's incoming webhooks,
driven through Broadcaster.publish and wait like any delivery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broadcaster.core import Broadcaster, PublishResult
from broadcaster.errors import ConfigError, PostGoneError, TransientError
from broadcaster.models import (
    ChannelFamily,
    ChannelProgress,
    ChannelRender,
    ComponentState,
    DeliveryState,
    IncidentStatus,
    Rendered,
    UpdateRequest,
)
from broadcaster.sandbox import FakeDiscord
from broadcaster.sandbox.discord import DiscordFailure
from channels.base import ChannelBrokenError, Message, Recipient
from channels.discord import (
    DiscordChannel,
    classify_discord_response,
    discord_markdown,
    discord_message,
    parse_webhook_url,
)
from tests.conftest import MakeBroadcaster

ENV = "DISCORD_TEST_WEBHOOK_URL"
TOKEN = "Tk-9f8e7d6c5b4a_SECRET_webhook_token_0123456789"
THREAD = "1200000000000000042"
STATUS_URL = "https://status.example.com/incidents?id=7&src=discord_post"
FIX = "copy the webhook URL again from Server Settings → Integrations → Webhooks"


@pytest.fixture
async def discord() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(token=TOKEN, threads=(THREAD,)) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _no_proxy_and_webhook(monkeypatch: pytest.MonkeyPatch, discord: FakeDiscord) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(ENV, discord.webhook_url)


def discord_channel(**extra: Any) -> dict[str, Any]:
    """A Discord channel config whose webhook URL (from the environment) is the fake's."""
    return {
        "type": "discord",
        "webhook_url": {"env": ENV},
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


def opening(summary: str = "Card payments fail for some users.") -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title="Payments fail",
        fields={"summary": summary},
        actor="test",
    )


async def publish_and_wait(
    b: Broadcaster, request: UpdateRequest, incident: int | None = None
) -> tuple[PublishResult, list[ChannelProgress]]:
    result = await b.publish(request, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result, progress


def progress_of(progress: list[ChannelProgress], channel: str = "discord") -> ChannelProgress:
    return next(p for p in progress if p.channel == channel)


def render_of(text: str) -> ChannelRender:
    return ChannelRender(
        channel="discord",
        family=ChannelFamily.CHAT,
        template="investigating",
        variants=[Rendered(language="en", text=text)],
        joined=True,
    )


async def test_content_is_exactly_what_discord_receives(
    discord: FakeDiscord, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {
            "discord": discord_channel(
                languages=["fr"],
                username="Statut Exemple",
                avatar_url="https://status.example.com/logo.png",
            )
        },
        components={"api": "API publique"},
        status_page_url=STATUS_URL,
    )
    request = UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title="Paiements refusés 💳",
        components={"api": ComponentState.PARTIAL_OUTAGE},
        fields={"summary": "Les paiements *par carte* échouent (zone eu_west) — @everyone"},
        next_update_at=datetime(2026, 11, 26, 15, 30, tzinfo=UTC),
        actor="test",
    )
    result, progress = await publish_and_wait(b, request)
    assert progress_of(progress).counts == {DeliveryState.DELIVERED: 1}
    (message,) = discord.messages
    assert message.content == (
        "**Enquête en cours : Paiements refusés 💳**\n"
        "Les paiements \\*par carte\\* échouent (zone eu\\_west) — @everyone. Nous enquêtons.\n"
        "Impact : API publique (panne partielle).\n"
        "Prochaine mise à jour à 15:30 UTC.\n"
        f"Page de statut : <{STATUS_URL}>"
    )
    assert message.embeds == []
    # "@everyone" in an update notifies nobody.
    assert message.allowed_mentions == {"parse": []}
    assert not message.mention_everyone
    assert (message.username, message.avatar_url) == (
        "Statut Exemple",
        "https://status.example.com/logo.png",
    )
    (post,) = discord.calls_to("execute")
    assert post.query == {"wait": "true"}
    (delivery,) = await b.deliveries(result.incident.id)
    assert delivery.provider_id == message.id
    assert delivery.permalink == (
        f"https://discord.com/channels/{discord.guild_id}/{discord.channel_id}/{message.id}"
    )


@pytest.mark.parametrize(
    ("text", "markdown"),
    [
        ("*Resolved: Payments fail*", "**Resolved: Payments fail**"),
        ("*Resolved: a *b**", "**Resolved: a \\*b\\***"),
        (
            "snake_case *x* ~~y~~ ||z|| `c` a\\b",
            "snake\\_case \\*x\\* \\~\\~y\\~\\~ \\|\\|z\\|\\| \\`c\\` a\\\\b",
        ),
        ("[click](https://evil.example/x)", "\\[click](<https://evil.example/x>)"),
        ("<@123> <#456> <t:1700000000>", "\\<@123> \\<#456> \\<t:1700000000>"),
        ("# Not a headline", "\\# Not a headline"),
        ("> not a quote\n-# not subtext", "\\> not a quote\n\\-# not subtext"),
        ("- a\n  + b\n3. c", "\\- a\n  \\+ b\n3\\. c"),
        ("mid-line # > - 3. stay", "mid-line # > - 3. stay"),
        ("See https://s.example/a_b*c_.", "See <https://s.example/a_b*c_>."),
        (
            "a_ https://x.example/_y_ b_ https://z.example c_",
            "a\\_ <https://x.example/_y_> b\\_ <https://z.example> c\\_",
        ),
        ("Café 💳 @everyone : ok", "Café 💳 @everyone : ok"),
    ],
)
def test_markdown_is_escaped_links_kept_and_headings_bold(text: str, markdown: str) -> None:
    assert discord_markdown(text) == markdown


def test_an_update_too_long_once_escaped_goes_whole_as_an_embed() -> None:
    # The bold heading costs 2 characters: 1,998 plain fit `content` exactly, 1,999 do not.
    fits = render_of("*Investigating: API*\n" + "a" * 1977)
    assert discord_message(fits) == {
        "allowed_mentions": {"parse": []},
        "content": "**Investigating: API**\n" + "a" * 1977,
    }
    assert len(discord_message(fits)["content"]) == 2000
    over = discord_message(render_of("*Investigating: API*\n" + "a" * 1978))
    assert over["embeds"] == [{"description": "**Investigating: API**\n" + "a" * 1978}]
    assert "content" not in over
    # 2,000 characters, each one escaped: the worst case, still within an embed's 4,096.
    body = discord_message(render_of("*" + "_" * 1998 + "*"))
    assert body["embeds"] == [{"description": "**" + "\\_" * 1998 + "**"}]
    assert len(body["embeds"][0]["description"]) == 4000


def test_429_retry_after_comes_from_the_header_then_the_body() -> None:
    header = classify_discord_response(429, {"Retry-After": "3"}, '{"retry_after": 2.5}', "d")
    body = classify_discord_response(429, {}, '{"retry_after": 2.5, "global": true}', "d")
    cloudflare = classify_discord_response(429, {"Retry-After": "60"}, "<html>", "d")
    assert isinstance(header, TransientError) and header.retry_after == 3.0
    assert isinstance(body, TransientError) and body.retry_after == 2.5
    assert str(body) == "d: rate limited by Discord (global)"
    assert isinstance(cloudflare, TransientError) and cloudflare.retry_after == 60.0


async def test_429_retry_after_is_honoured(
    discord: FakeDiscord, make_broadcaster: MakeBroadcaster
) -> None:
    discord.fail("execute", DiscordFailure(status=429, retry_after=1.0))
    b = await make_broadcaster({"discord": discord_channel()})
    _, progress = await publish_and_wait(b, opening())
    assert progress_of(progress).counts == {DeliveryState.DELIVERED: 1}
    first, second = discord.calls_to("execute")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0 - 0.05  # not earlier than Discord asked
    assert len(discord.messages) == 1


async def test_dropped_connection_and_5xx_are_retried_and_post_once(
    discord: FakeDiscord, make_broadcaster: MakeBroadcaster
) -> None:
    discord.fail("execute", DiscordFailure(drop=True), DiscordFailure(status=500))
    b = await make_broadcaster({"discord": discord_channel()})
    result, progress = await publish_and_wait(b, opening())
    assert progress_of(progress).counts == {DeliveryState.DELIVERED: 1}
    assert [c.status for c in discord.calls_to("execute")] == [None, 500, 200]
    assert len(discord.messages) == 1
    (delivery,) = await b.deliveries(result.incident.id)
    assert delivery.attempts == 3


@pytest.mark.parametrize(
    ("refusal", "said"),
    [
        (
            {"token": "wrong-token"},
            "Discord refused the webhook token (50027 Invalid Webhook Token) —",
        ),
        (
            {"webhook_id": "999"},
            "Discord has no such webhook (10015 Unknown Webhook) — it was deleted or the URL "
            "is wrong;",
        ),
    ],
)
async def test_a_refused_webhook_stops_the_channel_and_doctor_says_why(
    discord: FakeDiscord,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
    refusal: dict[str, str],
    said: str,
) -> None:
    monkeypatch.setenv(ENV, discord.webhook_url_for(**refusal))
    b = await make_broadcaster({"discord": discord_channel()})
    _, progress = await publish_and_wait(b, opening())
    discord_progress = progress_of(progress)
    assert discord_progress.broken == f"discord: {said} {FIX}"
    assert discord_progress.counts == {DeliveryState.QUEUED: 1}  # not failed, not lost
    assert len(discord.calls_to("execute")) == 1  # stopped at the first refusal
    assert discord.messages == []
    check = next(c for c in await b.doctor() if c.subject == "channel discord")
    assert not check.ok
    assert check.detail == (
        f"discord: {said} {FIX} (checked the webhook_url from environment variable {ENV})"
    )


async def test_doctor_passes_and_names_a_missing_or_malformed_webhook_url(
    discord: FakeDiscord, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await make_broadcaster({"discord": discord_channel()})
    check = next(c for c in await b.doctor() if c.subject == "channel discord")
    assert check.ok and check.detail == "discord, ok"
    assert [c.status for c in discord.calls_to("get")] == [200]

    monkeypatch.delenv(ENV)
    check = next(c for c in await b.doctor() if c.subject == "channel discord")
    assert not check.ok and f"environment variable {ENV}" in check.detail

    b = await make_broadcaster({"discord": discord_channel()})
    monkeypatch.setenv(ENV, f"{discord.url}/api/webhooks/{discord.webhook_id}/{TOKEN}/slack")
    check = next(c for c in await b.doctor() if c.subject == "channel discord")
    assert check.detail == (
        f"discord: the webhook_url in environment variable {ENV} is not a Discord webhook URL "
        f"(https://discord.com/api/webhooks/<id>/<token>) — {FIX}"
    )
    assert len(discord.calls_to("get")) == 1  # a URL that is no webhook's is not fetched


async def test_a_400_fails_only_that_delivery(
    discord: FakeDiscord, make_broadcaster: MakeBroadcaster
) -> None:
    too_long = {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Too long."}]}}
    discord.fail("execute", DiscordFailure(status=400, errors=too_long))
    b = await make_broadcaster({"discord": discord_channel()})
    first, progress = await publish_and_wait(b, opening())
    assert progress_of(progress).counts == {DeliveryState.FAILED: 1}
    assert progress_of(progress).broken is None
    (failed,) = await b.deliveries(first.incident.id)
    assert failed.last_error == "discord: Discord 50035 Invalid Form Body (content: Too long.)"
    assert failed.attempts == 1  # never retried
    follow_up = UpdateRequest(
        status=IncidentStatus.IDENTIFIED, fields={"summary": "A bad deploy."}, actor="test"
    )
    _, progress = await publish_and_wait(b, follow_up, first.incident.id)
    assert progress_of(progress).counts == {DeliveryState.DELIVERED: 1}
    (message,) = discord.messages
    assert message.content.startswith("**Identified: Payments fail**")


async def test_edit_and_delete_a_post_in_a_thread(
    discord: FakeDiscord, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"discord": discord_channel(thread_id=int(THREAD))})
    first, _ = await publish_and_wait(b, opening())
    (delivery,) = await b.deliveries(first.incident.id)
    message_id = str(delivery.provider_id)
    posted = discord.message(message_id)
    assert posted is not None and posted.thread_id == THREAD and posted.channel_id == THREAD
    assert discord.calls_to("execute")[0].query == {"wait": "true", "thread_id": THREAD}
    assert delivery.permalink is not None and delivery.permalink.endswith(f"/{THREAD}/{message_id}")
    correction = await b.preview(opening("Card payments fail for every user."))
    channel = b.channels["discord"]
    assert isinstance(channel, DiscordChannel)
    message = Message(
        render=correction.renders[0],
        recipient=Recipient(id=""),
        thread=None,
        incident_id=first.incident.id,
        update_id=first.update.id,
        delivery_key="edit",
    )
    try:
        receipt = await channel.edit(message_id, message)
        assert receipt.provider_id == message_id and receipt.data == {"channel_id": THREAD}
        edited = discord.message(message_id)
        assert edited is not None and edited.edited
        assert "Card payments fail for every user." in edited.content
        assert edited.history[0]["content"].startswith("**Investigating: Payments fail**")
        (patch,) = discord.calls_to("edit")
        assert patch.query == {"thread_id": THREAD}
        assert patch.body is not None and patch.body["allowed_mentions"] == {"parse": []}

        await channel.delete(message_id, Recipient(id=""))
        assert edited.deleted
        with pytest.raises(PostGoneError, match="10008 Unknown Message"):
            await channel.delete(message_id, Recipient(id=""))  # a retraction counts it done
        with pytest.raises(PostGoneError, match="10008 Unknown Message"):
            await channel.edit(message_id, message)
    finally:
        await channel.close()


async def test_an_unknown_thread_stops_the_channel(
    discord: FakeDiscord, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"discord": discord_channel(thread_id="1200000000000000099")})
    _, progress = await publish_and_wait(b, opening())
    assert progress_of(progress).broken == (
        "discord: Discord has no thread 1200000000000000099 in the webhook's channel "
        "(10003 Unknown Channel) — check thread_id"
    )
    assert discord.messages == []


async def test_the_webhook_token_is_nowhere_in_the_store_errors_or_logs(
    discord: FakeDiscord,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-but-still-secret_token"
    monkeypatch.setenv("DISCORD_TEST_WRONG_URL", discord.webhook_url_for(token=wrong))
    discord.fail("execute", DiscordFailure(status=500), DiscordFailure(status=400))
    b = await make_broadcaster(
        {
            "discord": discord_channel(concurrency=1),
            "discord-wrong": discord_channel(webhook_url={"env": "DISCORD_TEST_WRONG_URL"}),
        }
    )
    first, progress = await publish_and_wait(b, opening())
    assert progress_of(progress).counts == {DeliveryState.FAILED: 1}
    assert progress_of(progress, "discord-wrong").broken is not None
    _, progress = await publish_and_wait(b, opening("Still failing."), first.incident.id)
    assert progress_of(progress).counts == {DeliveryState.DELIVERED: 1}
    checks = await b.doctor()

    channel = b.channels["discord"]
    assert isinstance(channel, DiscordChannel)
    texts = [
        repr(channel._parsed()),
        *(str(c.detail) for c in checks),
        *(p.broken or "" for p in progress),
        *(r.getMessage() for r in caplog.records),
    ]
    for delivery in await b.deliveries(first.incident.id):
        texts += [delivery.provider_id or "", delivery.permalink or "", delivery.last_error or ""]
    for secret in (TOKEN, wrong):
        assert not [t for t in texts if secret in t]
        for path in tmp_path.glob("broadcaster.db*"):  # the database, its WAL and shm
            assert secret.encode() not in path.read_bytes(), path.name


def test_config_refuses_what_discord_would_refuse_on_every_post() -> None:
    for name in ("Discord Status", "clyde"):
        with pytest.raises(ValueError, match="'discord' or 'clyde'"):
            DiscordChannel.config_model.model_validate(discord_channel(username=name))
    with pytest.raises(ValueError, match="not a Discord id"):
        DiscordChannel.config_model.model_validate(discord_channel(thread_id="general"))
    assert parse_webhook_url("https://discord.com/api/webhooks/123/abc-DEF_1?wait=true") is not None
    assert parse_webhook_url("https://discord.com/api/webhooks/123/abc/github") is None
    assert parse_webhook_url("https://example.com/hooks/123") is None


async def test_a_config_error_names_the_key(make_broadcaster: MakeBroadcaster) -> None:
    with pytest.raises(ConfigError, match="username"):
        await make_broadcaster({"discord": discord_channel(username="My Discord bot")})


async def test_a_missing_webhook_url_is_channel_broken_when_sending(
    monkeypatch: pytest.MonkeyPatch, make_broadcaster: MakeBroadcaster
) -> None:
    monkeypatch.delenv(ENV)
    b = await make_broadcaster({"discord": discord_channel()})
    channel = b.channels["discord"]
    preview = await b.preview(opening())
    message = Message(
        render=preview.renders[0],
        recipient=Recipient(id=""),
        thread=None,
        incident_id=1,
        update_id=1,
        delivery_key="k",
    )
    with pytest.raises(
        ChannelBrokenError, match=f"webhook_url not found in environment variable {ENV}"
    ):
        await channel.send(message)
