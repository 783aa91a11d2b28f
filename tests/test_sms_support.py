"""SMS as a support channel: STATUS and HELP answered in TwiML, other replies forwarded to
the team's Slack and recorded — Twilio's signed webhook (the fake) against `serve`'s app
on 127.0.0.1, the real slack-sdk against the Slack fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from broadcaster.config import Settings
from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.models import DeliveryState, Impact, IncidentStatus
from broadcaster.sandbox import FakeTwilio, SlackFailure, SlackWebApi
from broadcaster.sandbox.twilio import WebhookAnswer, twilio_signature
from broadcaster.support import CurrentState, OpenIncident
from broadcaster.text import measure_sms
from channels.sms import status_sms, support_keyword
from tests.conftest import MakeBroadcaster
from tests.test_channel_sms import (
    ACCOUNT,
    ANNE,
    BOB,
    COMPONENTS,
    SENDER,
    TOKEN,
    api_down,
    post_form,
    publish,
    sms_channel,
    subscribe,
    until,
)
from tests.test_serve import BANNER, free_port
from tests.test_telegram_bot import serving

SLACK_TOKEN = "xoxb-support-0000-token"
TEAM = "C0SUPPORT"
STATUS_PAGE = "https://status.example.com"
CONTACT = "support@acme.example"
STRANGER = "+447700900123"  # not a subscriber
TWIML = '<?xml version="1.0" encoding="UTF-8"?>'
EMPTY = TWIML + "<Response/>"


def said(text: str) -> str:
    """The TwiML that sends `text` back to the sender."""
    return f"{TWIML}<Response><Message>{text}</Message></Response>"


@pytest.fixture(autouse=True)
def _no_proxy_and_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TWILIO_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("SLACK_TEST_TOKEN", SLACK_TOKEN)
    for name in ("TWILIO_EDGE", "TWILIO_REGION", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(accounts={ACCOUNT: TOKEN}, numbers=[SENDER]) as fake:
        yield fake


@pytest.fixture
async def slack() -> AsyncIterator[SlackWebApi]:
    async with SlackWebApi(tokens=(SLACK_TOKEN,), channels=(TEAM,)) as fake:
        yield fake


async def support_desk(
    make_broadcaster: MakeBroadcaster,
    twilio: FakeTwilio,
    slack: SlackWebApi,
    port: int,
    **subscribers: Any,
) -> Broadcaster:
    """The English and French SMS channel, the status page, and the team's Slack channel
    that replies go to; updates are published to SMS and the page only."""
    team = {
        "type": "slack",
        "token": {"env": "SLACK_TEST_TOKEN"},
        "channels": [TEAM],
        "base_url": slack.api_url,
        "backoff_seconds": 0.05,
        "rate_limit": {},
    }
    return await make_broadcaster(
        {"sms": sms_channel(twilio), "status-page": BANNER, "team": team},
        components=COMPONENTS,
        default_channels=["sms", "status-page"],
        status_page_url=STATUS_PAGE,
        serve={"public_url": f"http://127.0.0.1:{port}"},
        subscribers={"support_contact": CONTACT, "replies_to": "team", **subscribers},
    )


async def replies_recorded(b: Broadcaster) -> list[tuple[str, dict[str, Any]]]:
    rows = await b.store.read_session(
        lambda s: (
            s.connection()
            .exec_driver_sql("SELECT actor, detail FROM audit WHERE action = 'inbound.reply'")
            .fetchall()
        )
    )
    return [
        (actor, detail if isinstance(detail, dict) else json.loads(detail))
        for actor, detail in rows
    ]


def posted(slack: SlackWebApi) -> list[str]:
    return [str(c.params["text"]) for c in slack.calls_to("chat.postMessage") if c.ok]


# -- STATUS --------------------------------------------------------------------------------


async def test_status_from_a_french_subscriber_is_answered_in_french_within_budget(
    twilio: FakeTwilio, slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await support_desk(make_broadcaster, twilio, slack, port)
    await subscribe(b, ANNE, "fr")
    await subscribe(b, BOB, "en")
    async with serving(b, port) as base:
        url = f"{base}/inbound/sms"
        _, _, sms = await publish(b, api_down())
        assert sms == {DeliveryState.SENT: 2}

        answer = await twilio.inbound(ANNE, " État ", SENDER, url=url)
        assert (answer.status, answer.content_type) == (200, "text/xml")
        # GSM-7 like the updates: "Enquête" is sent "Enquete", one segment.
        french = "Incident en cours : API down (Enquete en cours). Page de statut : " + STATUS_PAGE
        assert answer.body == said(french)
        assert measure_sms(french).segments == 1

        assert (await twilio.inbound(BOB, "status", SENDER, url=url)).body == said(
            f"Open incident: API down (Investigating). Status page: {STATUS_PAGE}"
        )
        # Someone who is not a subscriber gets the channel's first language.
        assert (await twilio.inbound(STRANGER, "STATUS?", SENDER, url=url)).body == said(
            f"Open incident: API down (Investigating). Status page: {STATUS_PAGE}"
        )
        await asyncio.sleep(0.1)
    assert posted(slack) == []  # answered, not forwarded
    assert await replies_recorded(b) == []


async def test_status_with_nothing_open_is_the_all_clear(
    twilio: FakeTwilio, slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await support_desk(make_broadcaster, twilio, slack, port)
    await subscribe(b, ANNE, "fr")
    async with serving(b, port) as base:
        url = f"{base}/inbound/sms"
        incident, _, _ = await publish(b, api_down())
        await publish(b, api_down(IncidentStatus.RESOLVED), incident)

        answer = await twilio.inbound(ANNE, "etat", SENDER, url=url)
        assert answer.body == said(
            f"Tous les systèmes sont opérationnels. Page de statut : {STATUS_PAGE}"
        )
        answer = await twilio.inbound(STRANGER, "Status", SENDER, url=url)
        assert answer.body == said(f"All systems operational. Status page: {STATUS_PAGE}")


def test_a_long_title_is_shortened_and_the_link_kept_within_the_segments() -> None:
    now = datetime(2026, 11, 26, 14, 0, tzinfo=UTC)
    incidents = [
        OpenIncident(
            id=i,
            title=f"Incident {i}: " + "card payments are refused at checkout " * 6,
            status=IncidentStatus.IDENTIFIED,
            impact=Impact.MAJOR,
            status_label="Identified",
            impact_label="Major",
            updated_at=now,
        )
        for i in (3, 2)
    ]
    state = CurrentState(
        channel="sms",
        language="en",
        incidents=incidents,
        labels={"all_clear": "All clear.", "status_page": "Status page: {url}"},
        status_page_url=STATUS_PAGE,
    )
    words = {
        "open_one": "Open: {title} ({status}).",
        "open_many": "{count} open, newest: {title} ({status}).",
    }
    text = status_sms(state, words, max_segments=1, gsm7=True)
    assert measure_sms(text).segments == 1
    assert text.startswith("2 open, newest: Incident 3: card payments are refused")
    assert text.endswith(f"... (Identified). Status page: {STATUS_PAGE}")
    # Two segments hold more of the title, still whole words.
    longer = status_sms(state, words, max_segments=2, gsm7=True)
    assert measure_sms(longer).segments == 2 and len(longer) > len(text)


# -- HELP ------------------------------------------------------------------------------------


async def test_help_is_answered_with_the_configured_contact(
    twilio: FakeTwilio, slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await support_desk(make_broadcaster, twilio, slack, port)
    await subscribe(b, ANNE, "fr")
    async with serving(b, port) as base:
        url = f"{base}/inbound/sms"
        answer = await twilio.inbound(STRANGER, "help", SENDER, url=url)
        assert answer.body == said(
            f"Reply STATUS for the current state, STOP to unsubscribe. Support: {CONTACT}"
        )
        answer = await twilio.inbound(ANNE, "Aide", SENDER, url=url)
        assert answer.body == said(
            f"Répondez ETAT pour l'état actuel, STOP pour vous désabonner. Assistance : {CONTACT}"
        )
        # Advanced Opt-Out answered it already with the Messaging Service's HELP text.
        answer = await twilio.inbound(ANNE, "AIDE", SENDER, url=url, opt_out_type="HELP")
        assert answer.body == EMPTY
        await asyncio.sleep(0.1)
    assert posted(slack) == [] and await replies_recorded(b) == []


# -- anything else -----------------------------------------------------------------------------


async def test_other_replies_go_to_the_team_masked_and_are_recorded(
    twilio: FakeTwilio, slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await support_desk(make_broadcaster, twilio, slack, port)
    anne = await subscribe(b, ANNE, "fr")
    async with serving(b, port) as base:
        url = f"{base}/inbound/sms"
        text = "Encore en panne chez moi <!channel> & ailleurs ?"
        answer = await twilio.inbound(ANNE, text, SENDER, url=url)
        assert (answer.status, answer.body) == (200, EMPTY)
        answer = await twilio.inbound(STRANGER, "STOP please", SENDER, url=url)
        assert (answer.status, answer.body) == (200, EMPTY)

        calls = await slack.wait_for_calls("chat.postMessage", 2, timeout=5)
    assert all(call.params["channel"] == TEAM for call in calls)
    # Slack's mrkdwn escaped: the reply cannot ping the channel.
    assert sorted(posted(slack)) == [
        "SMS reply from +336•••••78 (subscriber #"
        f"{anne}): Encore en panne chez moi &lt;!channel&gt; &amp; ailleurs ?",
        "SMS reply from +447•••••23 (not a subscriber): STOP please",
    ]
    wire = json.dumps([call.params for call in calls], ensure_ascii=False)
    assert ANNE not in wire and STRANGER not in wire

    recorded = await until(lambda: _two(replies_recorded(b)))
    assert sorted(recorded, key=lambda r: str(r[1]["from"])) == [
        (
            "inbound:sms",
            {
                "channel": "sms",
                "from": "+336•••••78",
                "subscriber": anne,
                "text": text,
                "forwarded_to": "team",
                "forwarded": True,
            },
        ),
        (
            "inbound:sms",
            {
                "channel": "sms",
                "from": "+447•••••23",
                "subscriber": None,
                "text": "STOP please",
                "forwarded_to": "team",
                "forwarded": True,
            },
        ),
    ]
    assert (await b.audience.get(anne)).channels == {"sms": True}
    # Erasing Anne erases what she wrote; the stranger's reply stays.
    await b.audience.erase(anne)
    assert [d["subscriber"] for _, d in await replies_recorded(b)] == [None]


async def _two(read: Any) -> Any:
    rows = await read
    return rows if len(rows) == 2 else None


async def test_a_reply_the_team_channel_refuses_is_still_recorded_with_why(
    twilio: FakeTwilio, slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await support_desk(make_broadcaster, twilio, slack, port)
    slack.fail("chat.postMessage", SlackFailure(error="channel_not_found"))
    async with serving(b, port) as base:
        answer = await twilio.inbound(STRANGER, "hello?", SENDER, url=f"{base}/inbound/sms")
        assert answer.body == EMPTY
        ((_, detail),) = await until(lambda: replies_recorded(b))
    assert detail["forwarded"] is False
    assert detail["error"] == f"team → {TEAM}: Slack channel_not_found"
    assert detail["text"] == "hello?"


async def test_without_replies_to_a_reply_is_only_recorded(
    twilio: FakeTwilio, slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await support_desk(make_broadcaster, twilio, slack, port, replies_to=None)
    async with serving(b, port) as base:
        await twilio.inbound(STRANGER, "hello?", SENDER, url=f"{base}/inbound/sms")
        ((_, detail),) = await until(lambda: replies_recorded(b))
    assert (detail["forwarded_to"], detail["forwarded"]) == (None, False)
    assert detail["error"] == "subscribers.replies_to is not set"
    assert slack.calls_to("chat.postMessage") == []


def test_replies_to_must_name_a_configured_channel() -> None:
    with pytest.raises(ValidationError, match="replies_to: unknown channel 'slack-team'"):
        Settings(
            channels={"status-page": BANNER},
            subscribers={"replies_to": "slack-team"},
        )


async def test_replies_to_must_be_a_chat_channel_not_a_public_or_subscriber_one(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    # The status page would show a person's message to the world; SMS would text it out.
    for channel in ("status-page", "sms"):
        with pytest.raises(ConfigError, match=f"replies_to: '{channel}' is a \\w+ channel"):
            await make_broadcaster(
                {"sms": sms_channel(twilio), "status-page": BANNER},
                subscribers={"replies_to": channel},
            )


# -- what stays as it was ---------------------------------------------------------------------


async def test_unsigned_or_forged_messages_are_refused_and_nothing_is_forwarded(
    twilio: FakeTwilio, slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await support_desk(make_broadcaster, twilio, slack, port)
    async with serving(b, port) as base:
        url = f"{base}/inbound/sms"
        params = {"AccountSid": ACCOUNT, "From": STRANGER, "To": SENDER, "Body": "hello?"}
        status = {**params, "Body": "STATUS"}
        header = "X-Twilio-Signature"
        refused = [
            await post_form(url, params, {}),
            await post_form(url, params, {header: twilio_signature("guessed", url, params)}),
            await post_form(url, status, {}),
        ]
        assert refused == [401, 401, 401]
        await asyncio.sleep(0.2)
        assert posted(slack) == [] and await replies_recorded(b) == []
        # The same message, signed by Twilio's token over the public URL, is taken.
        signed = {header: twilio_signature(TOKEN, url, params)}
        assert await post_form(url, params, signed) == 200
        await slack.wait_for_calls("chat.postMessage", 1, timeout=5)


async def test_stop_still_opts_out_and_is_not_forwarded(
    twilio: FakeTwilio, slack: SlackWebApi, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await support_desk(make_broadcaster, twilio, slack, port)
    anne = await subscribe(b, ANNE, "fr")

    async def opted_out() -> bool:
        return (await b.audience.get(anne)).channels == {"sms": False}

    async with serving(b, port) as base:
        answer: WebhookAnswer = await twilio.inbound(
            ANNE, "Stop", SENDER, url=f"{base}/inbound/sms"
        )
        assert answer.body == EMPTY
        await until(opted_out)
        await asyncio.sleep(0.1)
    assert posted(slack) == [] and await replies_recorded(b) == []


def test_support_keywords_are_whole_messages_in_any_case() -> None:
    assert [support_keyword(w, None) for w in ("STATUS", " status. ", "État", "ETAT!")] == [
        "status"
    ] * 4
    assert [support_keyword(w, None) for w in ("help", "Info", "aide?")] == ["help"] * 3
    assert [support_keyword(w, None) for w in ("status please", "STOP", "", "HELP ME")] == [
        None
    ] * 4
    assert support_keyword("HELP", "HELP") is None  # Twilio's Advanced Opt-Out answered
