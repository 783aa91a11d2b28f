"""Telegram subscribers: users /subscribe to a subscriber channel's bot and receive every
update privately, in their language, one tracked delivery each; /unsubscribe and a
blocked bot opt them out. The real python-telegram-bot against the fake Bot API, the
bot answering by webhook inside `serve` or by polling."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.models import (
    ComponentState,
    DeliveryState,
    Impact,
    IncidentStatus,
    RateLimit,
    Subscriber,
    UpdateRequest,
)
from broadcaster.sandbox import BotApiFault, FakeChat, FakeTelegram
from broadcaster.sandbox.telegram import TelegramPost
from channels.telegram import TelegramChannel
from tests.conftest import MakeBroadcaster
from tests.test_serve import BANNER, free_port
from tests.test_telegram_bot import eventually, replies, serving

TOKEN = "123456:TEST-token"
SECRET = "s3cret_Webhook-token"
CHANNEL = FakeChat(-1001111, type="channel", title="Acme status", username="acme_status")
# Users in private chats with the bot (a private chat's id is the user's id).
ANN, BOB, DIETER = 424242421, 434343431, 444444441
COMPONENTS = {"api": "Public API", "web": "Website"}


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeTelegram]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TG_TOKEN", TOKEN)
    monkeypatch.setenv("TG_HOOK_SECRET", SECRET)
    async with FakeTelegram(token=TOKEN, chats=[CHANNEL]) as fake:
        yield fake


def subscriber_channel(base_url: str, **extra: Any) -> dict[str, Any]:
    """A telegram subscriber channel, English first, whose bot takes /subscribe."""
    return {
        "type": "telegram",
        "token": {"env": "TG_TOKEN"},
        "subscribers": True,
        "support_bot": True,
        "webhook_secret": {"env": "TG_HOOK_SECRET"},
        "languages": ["en", "fr"],
        "base_url": base_url,
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


async def broadcaster_for(
    make_broadcaster: MakeBroadcaster, api: FakeTelegram, port: int | None = None, **extra: Any
) -> Broadcaster:
    serve = {"public_url": f"http://127.0.0.1:{port}"} if port is not None else {}
    # `serve` needs a banner channel; updates go to the subscribers only.
    return await make_broadcaster(
        {"status-page": BANNER, "tg-subs": subscriber_channel(api.url, **extra)},
        components=COMPONENTS,
        default_channels=["tg-subs"],
        serve=serve,
    )


def opening(title: str = "Payments fail", **components: ComponentState) -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title=title,
        impact=Impact.MAJOR,
        components=components or {"api": ComponentState.MAJOR_OUTAGE},
        fields={
            "summary": "Card payments fail",
            "summary.fr": "Les paiements par carte échouent",
        },
        actor="test",
    )


async def publish(b: Broadcaster, request: UpdateRequest, incident: int | None = None) -> int:
    result = await b.publish(request, incident)
    await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result.incident.id


def updates_to(api: FakeTelegram, user: int) -> list[TelegramPost]:
    """The updates a user's chat shows: every update opens with its bold heading, the
    bot's answers to commands never do."""
    return [post for post in api.messages(user) if post.html.startswith("<b>")]


async def says(api: FakeTelegram, user: int, text: str, language: str | None = "en") -> str:
    """The user sends `text` to the bot (by webhook); the bot's answer, as HTML."""
    before = len(replies(api, user))
    api.user_says(user, text, language_code=language)
    assert await api.deliver_webhook() == [200]
    calls = await eventually(lambda: replies(api, user)[before:])
    assert calls[0].status == 200, calls[0].answer
    return str(calls[0].params["text"])


async def subscribers(b: Broadcaster) -> dict[str, Subscriber]:
    """Everyone with a Telegram id, by that id."""
    return {s.telegram: s for s in await b.subscribers() if s.telegram}


def audit_rows(tmp_path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(tmp_path / "broadcaster.db") as conn:
        return conn.execute(
            "SELECT actor, action, detail FROM audit WHERE action LIKE 'subscriber.%' ORDER BY id"
        ).fetchall()


# -- /subscribe, by webhook inside `serve` ------------------------------------------------------


async def test_subscribe_by_webhook_then_each_update_reaches_them_privately_in_their_language(
    api: FakeTelegram,
    make_broadcaster: MakeBroadcaster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    caplog.set_level(logging.INFO)
    async with serving(b, port):
        await eventually(lambda: api.webhook)
        assert await says(api, ANN, "/subscribe", "fr-CA") == (
            "Abonnement confirmé : vous recevrez chaque mise à jour ici. "
            "Envoyez /unsubscribe pour arrêter."
        )
        assert await says(api, BOB, "/subscribe@status_test_bot", "en") == (
            "Subscribed: you will get every update here. Send /unsubscribe to stop."
        )
        known = await subscribers(b)
        ann, bob = known[str(ANN)], known[str(BOB)]
        assert (ann.language, ann.components, ann.channels) == ("fr", None, {"tg-subs": True})
        assert (bob.language, bob.components, bob.channels) == ("en", None, {"tg-subs": True})

        incident = await publish(b, opening())
        (to_ann,) = updates_to(api, ANN)
        assert to_ann.html.startswith(
            "<b>Enquête en cours : Payments fail</b>\nLes paiements par carte échouent."
        )
        assert "Card payments" not in to_ann.text  # her language only, not both joined
        (to_bob,) = updates_to(api, BOB)
        assert to_bob.html.startswith("<b>Investigating: Payments fail</b>\nCard payments fail.")

    # `status`: one tracked delivery per subscriber, named by subscriber id.
    (progress,) = await b.progress(incident)
    assert progress.counts == {DeliveryState.DELIVERED: 2}
    deliveries = {d.recipient: d for d in await b.deliveries(incident)}
    assert deliveries.keys() == {str(ann.id), str(bob.id)}
    assert deliveries[str(ann.id)].language == "fr"
    assert deliveries[str(ann.id)].provider_id == str(to_ann.message_id)

    assert [(actor, action) for actor, action, _ in audit_rows(tmp_path)] == [
        ("inbound:tg-subs", "subscriber.add"),
        ("inbound:tg-subs", "subscriber.add"),
    ]
    # Their Telegram ids are in the subscribers table only: not in logs, audit or deliveries.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    with sqlite3.connect(tmp_path / "broadcaster.db") as conn:
        rows = repr(conn.execute("SELECT * FROM deliveries").fetchall())
        rows += repr(conn.execute("SELECT * FROM audit").fetchall())
    for user in (ANN, BOB):
        assert str(user) not in logged and str(user) not in rows
    assert "subscriber #1 (tg•••21) added (telegram /subscribe)" in logged


async def test_subscribe_to_components_gets_only_updates_touching_them(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    async with serving(b, port):
        await eventually(lambda: api.webhook)
        # Names or the names shown, in any case; an unknown one is refused with the list.
        assert await says(api, DIETER, "/subscribe api, payments", "en") == (
            "Unknown component: payments. Components: api (Public API), web (Website)."
        )
        assert await says(api, BOB, "/subscribe API", "en") == (
            "Subscribed: you will get updates about Public API here. Send /unsubscribe to stop."
        )
        assert await says(api, ANN, "/subscribe website", "fr") == (
            "Abonnement confirmé : vous recevrez ici les mises à jour sur Website. "
            "Envoyez /unsubscribe pour arrêter."
        )
        known = await subscribers(b)
        assert str(DIETER) not in known  # refused: nothing stored
        assert known[str(BOB)].components == ["api"]
        assert known[str(ANN)].components == ["web"]

        await publish(b, opening("Website down", web=ComponentState.MAJOR_OUTAGE))
        assert [p.text.split("\n")[0] for p in updates_to(api, ANN)] == [
            "Enquête en cours : Website down"
        ]
        assert updates_to(api, BOB) == []

        # /subscribe again changes what they follow (here: everything).
        assert (await says(api, BOB, "/subscribe", "en")).startswith(
            "Subscribed: you will get every update here."
        )
        await publish(b, opening("API slow", api=ComponentState.DEGRADED_PERFORMANCE))
        assert [p.text.split("\n")[0] for p in updates_to(api, BOB)] == ["Investigating: API slow"]
        assert len(updates_to(api, ANN)) == 1  # the API is not hers
        assert (await subscribers(b))[str(BOB)].components is None


async def test_a_bot_whose_channel_has_no_subscribers_says_so_and_help_tells_the_commands(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    public = {
        **subscriber_channel(api.url),
        "subscribers": False,
        "chats": [CHANNEL.id],
    }
    b = await make_broadcaster(
        {
            "status-page": BANNER,
            "tg": public,
            "tg-subs": subscriber_channel(api.url, support_bot=False),
        },
        serve={"public_url": f"http://127.0.0.1:{port}"},
    )
    async with serving(b, port):
        await eventually(lambda: api.webhook)
        assert await says(api, ANN, "/subscribe", "en") == (
            "Subscriptions are not offered here. Send /status for the current state."
        )
        assert await says(api, ANN, "/unsubscribe", "fr") == (
            "Aucun abonnement n'est proposé ici. Envoyez /status pour connaître l'état actuel."
        )
        assert await says(api, ANN, "/help", "en") == "Send /status for the current state."
    assert await b.subscribers() == []
    # The subscriber channel's bot does not listen, which doctor points out.
    check = next(c for c in await b.doctor() if c.subject == "channel tg-subs")
    assert not check.ok and "nobody can; turn support_bot on" in check.detail


async def test_help_on_a_subscriber_channel_mentions_subscribe_and_unsubscribe(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await broadcaster_for(make_broadcaster, api, port)
    async with serving(b, port):
        await eventually(lambda: api.webhook)
        assert await says(api, ANN, "/help", "en") == (
            "Send /status for the current state.\n"
            "Send /subscribe to get every update here, or /subscribe followed by components "
            "for only theirs; /unsubscribe to stop."
        )
        assert (await says(api, BOB, "hello?", "fr")).startswith(
            "Envoyez /status pour connaître l'état actuel.\nEnvoyez /subscribe"
        )
        # Their first words with the bot (/start) get the state and how to subscribe.
        assert (await says(api, ANN, "/start", "en")).endswith(
            "Send /subscribe to get every update here, or /subscribe followed by components "
            "for only theirs; /unsubscribe to stop."
        )


# -- /unsubscribe, by polling -------------------------------------------------------------------


@asynccontextmanager
async def polling(b: Broadcaster) -> AsyncIterator[None]:
    channel = b.channels["tg-subs"]
    assert isinstance(channel, TelegramChannel)
    stop = asyncio.Event()
    task = asyncio.create_task(channel.support_bot().poll(stop, timeout=5))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def polled(api: FakeTelegram, user: int, text: str, language: str = "en") -> str:
    before = len(replies(api, user))
    api.user_says(user, text, language_code=language)
    calls = await eventually(lambda: replies(api, user)[before:])
    return str(calls[0].params["text"])


async def test_unsubscribe_stops_deliveries_until_they_subscribe_again(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    b = await broadcaster_for(make_broadcaster, api)
    async with polling(b):
        await polled(api, ANN, "/subscribe")
        await polled(api, BOB, "/subscribe")
        incident = await publish(b, opening())
        assert len(updates_to(api, ANN)) == len(updates_to(api, BOB)) == 1

        assert await polled(api, ANN, "/unsubscribe") == (
            "Unsubscribed: you will get no more updates here. Send /subscribe to start again."
        )
        assert await polled(api, DIETER, "/unsubscribe") == (
            "You are not subscribed. Send /subscribe to get every update here."
        )
        resolved = UpdateRequest(status=IncidentStatus.RESOLVED, actor="test")
        await publish(b, resolved, incident)
        assert len(updates_to(api, ANN)) == 1  # nothing more for her
        assert len(updates_to(api, BOB)) == 2
        assert (await subscribers(b))[str(ANN)].channels == {"tg-subs": False}

        await polled(api, ANN, "/subscribe")  # her own request ends the opt-out
        await publish(b, opening("Login fails"))
        assert [p.text.split("\n")[0] for p in updates_to(api, ANN)][-1] == (
            "Investigating: Login fails"
        )
    ann = (await subscribers(b))[str(ANN)]
    assert [(action, json.loads(detail)) for _, action, detail in audit_rows(tmp_path)][-2:] == [
        ("subscriber.opt_out", {"subscriber": ann.id, "channel": "tg-subs"}),
        ("subscriber.opt_in", {"subscriber": ann.id, "channel": "tg-subs", "components": None}),
    ]


# -- delivery ---------------------------------------------------------------------------------


async def test_a_user_who_blocked_the_bot_fails_alone_and_is_opted_out(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    b = await broadcaster_for(make_broadcaster, api)
    async with polling(b):
        await polled(api, ANN, "/subscribe")
        await polled(api, BOB, "/subscribe")
    api.chats[ANN].kicked = True  # "Forbidden: bot was blocked by the user"
    ann = (await subscribers(b))[str(ANN)]

    incident = await publish(b, opening())
    (progress,) = await b.progress(incident)
    assert progress.counts == {DeliveryState.DELIVERED: 1, DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(incident, states=[DeliveryState.FAILED])
    assert failed.recipient == str(ann.id)
    assert failed.last_error == (
        f"tg-subs → subscriber #{ann.id}: Forbidden: bot was blocked by the user"
    )
    assert failed.attempts == 1  # permanent: never retried
    assert len(updates_to(api, BOB)) == 1
    assert (await subscribers(b))[str(ANN)].channels == {"tg-subs": False}
    with sqlite3.connect(tmp_path / "broadcaster.db") as conn:
        (source,) = conn.execute(
            "SELECT source FROM subscriptions WHERE subscriber_id = ?", (ann.id,)
        ).fetchone()
    assert source == "telegram blocked"

    await publish(b, opening("Login fails"))
    sent_to = [c.params["chat_id"] for c in api.calls_of("sendMessage")]
    assert sent_to.count(str(ANN)) == 2  # her /subscribe answer and the one failed try
    assert len(updates_to(api, BOB)) == 2


async def test_retry_after_is_honoured_for_a_subscriber(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await broadcaster_for(make_broadcaster, api)
    async with polling(b):
        await polled(api, ANN, "/subscribe")
    api.fail(
        "sendMessage",
        BotApiFault(error_code=429, description="Too Many Requests: retry after 1", retry_after=1),
    )
    incident = await publish(b, opening())
    (progress,) = await b.progress(incident)
    assert progress.counts == {DeliveryState.DELIVERED: 1}
    _, first, second = api.calls_of("sendMessage")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1 - 0.05
    assert len(updates_to(api, ANN)) == 1


async def test_followups_thread_under_each_users_first_message(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await broadcaster_for(make_broadcaster, api)
    async with polling(b):
        await polled(api, ANN, "/subscribe", "fr")
        await polled(api, BOB, "/subscribe", "en")
    incident = await publish(b, opening())
    identified = UpdateRequest(
        status=IncidentStatus.IDENTIFIED, fields={"summary": "The database"}, actor="test"
    )
    await publish(b, identified, incident)
    await publish(b, UpdateRequest(status=IncidentStatus.RESOLVED, actor="test"), incident)
    for user in (ANN, BOB):
        first, *followups = updates_to(api, user)
        assert first.reply_to is None
        assert [p.reply_to for p in followups] == [first.message_id, first.message_id]
    assert updates_to(api, ANN)[-1].text.startswith("Résolu")
    assert updates_to(api, BOB)[-1].text.startswith("Resolved")


# -- configuration ------------------------------------------------------------------------------


async def test_config_needs_chats_or_subscribers_but_not_both(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    with pytest.raises(ConfigError, match="subscribers = true sends to each subscribed user"):
        await make_broadcaster({"tg": subscriber_channel(api.url, chats=[CHANNEL.id])})
    neither = {**subscriber_channel(api.url), "subscribers": False}
    with pytest.raises(ConfigError, match=r"channels\.tg: chats: name at least one chat"):
        await make_broadcaster({"tg": neither})

    b = await make_broadcaster({"tg": {**subscriber_channel(api.url), "rate_limit": None}})
    channel = b.channels["tg"]
    assert channel.address_kind is not None and channel.recipients() == []
    # Bot FAQ: one message a second in a private chat, about 30 a second in all.
    assert channel.rate_limit_for("7") == RateLimit(per_target_per_second=1, global_per_second=30)


async def test_a_wrong_bot_token_unsubscribes_nobody(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await broadcaster_for(make_broadcaster, api)
    async with polling(b):
        await polled(api, ANN, "/subscribe")
        await polled(api, BOB, "/subscribe")
    # What every user answers to another bot's token: not a user who left.
    api.fail(
        "sendMessage",
        BotApiFault(
            error_code=403,
            description="Forbidden: bot can't initiate conversation with a user",
            times=None,
        ),
    )
    incident = await publish(b, opening())
    (progress,) = await b.progress(incident)
    assert progress.counts == {DeliveryState.FAILED: 2}
    assert {s.channels["tg-subs"] for s in (await subscribers(b)).values()} == {True}


async def test_a_retraction_deletes_the_post_even_for_who_unsubscribed_since(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    b = await broadcaster_for(make_broadcaster, api)
    async with polling(b):
        await polled(api, ANN, "/subscribe")
        await polled(api, BOB, "/subscribe")
    result = await b.publish(opening())
    await asyncio.wait_for(b.wait([result.update.id]), timeout=20)
    async with polling(b):
        await polled(api, ANN, "/unsubscribe")
    await b.retract(result.update.id, actor="comms")
    await asyncio.wait_for(b.wait(), timeout=20)
    deleted = {c.params["chat_id"] for c in api.calls_of("deleteMessage") if c.status == 200}
    assert deleted == {str(ANN), str(BOB)}


async def test_doctor_says_when_two_channels_run_a_support_bot_on_one_token(
    api: FakeTelegram, make_broadcaster: MakeBroadcaster
) -> None:
    public = {**subscriber_channel(api.url), "subscribers": False, "chats": [CHANNEL.id]}
    b = await make_broadcaster({"tg-subs": subscriber_channel(api.url), "tg-public": public})
    checks = {c.subject: c for c in await b.doctor()}
    for name, other in (("tg-subs", "tg-public"), ("tg-public", "tg-subs")):
        assert not checks[f"channel {name}"].ok
        assert (
            f"{name}: {other} receive the same provider traffic" in checks[f"channel {name}"].detail
        )
    # The support bot on the subscriber channel only: nothing to say.
    quiet = {**public, "support_bot": False}
    b = await make_broadcaster({"tg-subs": subscriber_channel(api.url), "tg-public": quiet})
    assert all(c.ok for c in await b.doctor() if c.subject.startswith("channel"))
