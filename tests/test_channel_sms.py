"""The SMS channel: twilio-python's real async client against the local fake of Twilio's
Messages API, fanned out to subscribers through Broadcaster.publish and wait; status
callbacks and STOP/START through `serve`'s `/inbound/<channel>`, signed like Twilio."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.models import (
    ChannelProgress,
    ComponentState,
    DeliveryState,
    IncidentStatus,
    NewSubscriber,
    RateLimit,
    UpdateRequest,
)
from broadcaster.sandbox import FakeTwilio
from broadcaster.sandbox.twilio import TwilioFailure, twilio_signature
from channels.base import ChannelContext
from channels.sms import LONG_CODE_RATE, SERVICE_RATE, SmsChannel, consent_keyword
from tests.conftest import MakeBroadcaster
from tests.test_serve import BANNER, free_port
from tests.test_telegram_bot import serving

ACCOUNT = "AC" + "0123456789abcdef" * 2
TOKEN = "twilio-test-auth-token-0042"
SENDER = "+15017122661"
SERVICE = "MG" + "fedcba9876543210" * 2
ANNE, BOB, CARLA, DIETER, EVE = (
    "+33612345678",  # French
    "+14155552671",  # English
    "+33698765432",  # French, follows the email component only
    "+4915112345678",  # German: the channel's first language
    "+12025550143",  # English, opted out
)
COMPONENTS = {"api": "API", "email": "Email"}


@pytest.fixture(autouse=True)
def _no_proxy_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TWILIO_TEST_TOKEN", TOKEN)
    for name in ("TWILIO_EDGE", "TWILIO_REGION", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(accounts={ACCOUNT: TOKEN}, numbers=[SENDER]) as fake:
        yield fake


def sms_channel(fake: FakeTwilio, **extra: Any) -> dict[str, Any]:
    """An English and French SMS channel on the fake, with fast retries and no pacing."""
    return {
        "type": "sms",
        "account_sid": ACCOUNT,
        "auth_token": {"env": "TWILIO_TEST_TOKEN"},
        "from_number": SENDER,
        "languages": ["en", "fr"],
        "base_url": fake.url,
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


async def open_sms(
    make_broadcaster: MakeBroadcaster,
    fake: FakeTwilio,
    *,
    port: int | None = None,
    served: bool = False,
    **extra: Any,
) -> Broadcaster:
    """A broadcaster with the SMS channel; with `port` (or `served`), ready for `serve`
    there (its public URL, and the banner channel serve's public side needs)."""
    channels: dict[str, Any] = {"sms": sms_channel(fake, **extra)}
    if port is not None or served:
        channels["status-page"] = BANNER
    serve = {"public_url": f"http://127.0.0.1:{port}"} if port is not None else {}
    return await make_broadcaster(channels, components=COMPONENTS, serve=serve)


async def subscribe(
    b: Broadcaster, phone: str, language: str, components: list[str] | None = None
) -> int:
    new = NewSubscriber(phone=phone, language=language, components=components)
    return (await b.audience.add(new, source="test")).id


def api_down(status: IncidentStatus = IncidentStatus.INVESTIGATING) -> UpdateRequest:
    return UpdateRequest(
        status=status,
        title="API down",
        components={"api": ComponentState.MAJOR_OUTAGE},
        fields={"summary": "API calls fail", "summary.fr": "Les appels à l'API échouent"},
        actor="test",
    )


async def publish(
    b: Broadcaster, request: UpdateRequest, incident: int | None = None
) -> tuple[int, int, dict[DeliveryState, int]]:
    """Publish and wait: (incident id, update id, the SMS channel's counts)."""
    result = await b.publish(request, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=20)
    return result.incident.id, result.update.id, counts(progress)


def counts(progress: list[ChannelProgress]) -> dict[DeliveryState, int]:
    return next((p.counts for p in progress if p.channel == "sms"), {})


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> Any:
    """Wait until `await check()` is truthy; return it."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return result


async def post_form(url: str, params: dict[str, str], headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=params, headers=headers) as response,
    ):
        await response.read()
        return response.status


# -- sending -----------------------------------------------------------------------------------


async def test_each_subscriber_gets_one_sms_in_their_language_and_nobody_else_does(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_sms(make_broadcaster, twilio)
    ids = {
        ANNE: await subscribe(b, ANNE, "fr"),
        BOB: await subscribe(b, BOB, "en"),
        DIETER: await subscribe(b, DIETER, "de"),
    }
    await subscribe(b, CARLA, "fr", components=["email"])  # not touched: nothing
    await subscribe(b, EVE, "en")
    assert await b.audience.set_subscribed("sms", EVE, subscribed=False, source="test")

    incident, update, sms = await publish(b, api_down())

    assert sms == {DeliveryState.SENT: 3}
    assert sorted(m.to for m in twilio.messages) == sorted(ids)
    render = (await b.store.renders(update))["sms"]
    (anne,) = twilio.messages_to(ANNE)
    # French, exactly as rendered: GSM-7 by default (ê -> e; é and à are GSM-7 already).
    assert anne.body == (
        "Enquete en cours : Les appels à l'API échouent. Impact : API (panne majeure)."
    )
    assert anne.body == render.variant("fr").text
    assert anne.num_segments == 1
    (bob,) = twilio.messages_to(BOB)
    assert bob.body == "Investigating: API calls fail. Affected: API (major outage)."
    (dieter,) = twilio.messages_to(DIETER)
    assert dieter.body == bob.body  # no German: the channel's first language
    for message in twilio.messages:
        assert message.from_ == SENDER and message.messaging_service_sid is None
        assert message.validity_period == 3600
        assert message.status_callback is None  # no serve.public_url: nowhere to call
    deliveries = await b.deliveries(incident, channel="sms")
    assert {d.recipient: d.provider_id for d in deliveries} == {
        str(ids[m.to]): m.sid for m in twilio.messages
    }
    assert all(d.state is DeliveryState.SENT and d.provider_id for d in deliveries)
    assert all(c.authorized for c in twilio.calls_to("messages.create"))


async def test_messaging_service_validity_period_and_status_callback_url_are_sent(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    callback = "https://hooks.example.com/broadcaster/inbound/sms"
    config = sms_channel(
        twilio, messaging_service_sid=SERVICE, validity_seconds=600, status_callback_url=callback
    )
    del config["from_number"]
    b = await make_broadcaster({"sms": config}, components=COMPONENTS)
    await subscribe(b, BOB, "en")
    _, _, sms = await publish(b, api_down())
    assert sms == {DeliveryState.SENT: 1}
    (message,) = twilio.messages
    assert (message.messaging_service_sid, message.from_) == (SERVICE, None)
    assert message.validity_period == 600
    assert message.status_callback == callback


async def test_sends_overlap_on_one_client(
    make_broadcaster: MakeBroadcaster,
) -> None:
    async with FakeTwilio(accounts={ACCOUNT: TOKEN}, delay=0.2) as slow:
        b = await open_sms(make_broadcaster, slow, concurrency=8)
        for i in range(16):
            await subscribe(b, f"+3361234{i:04d}", "fr")
        started = time.monotonic()
        _, _, sms = await publish(b, api_down())
        elapsed = time.monotonic() - started
    assert sms == {DeliveryState.SENT: 16}
    # 16 sends of 0.2 s each: 3.2 s one after another, ~0.4 s eight at a time.
    assert slow.max_in_flight >= 6
    assert elapsed < 2.0


async def test_twilio_edge_and_region_in_the_environment_do_not_redirect_requests(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK would send these to api.dublin.ie1.twilio.com (a host made of base_url's).
    monkeypatch.setenv("TWILIO_EDGE", "dublin")
    monkeypatch.setenv("TWILIO_REGION", "ie1")
    b = await open_sms(make_broadcaster, twilio)
    await subscribe(b, BOB, "en")
    _, _, sms = await publish(b, api_down())
    assert sms == {DeliveryState.SENT: 1}
    assert len(twilio.messages) == 1


def test_pacing_is_per_sender_and_the_account_shared(tmp_path: Path) -> None:
    def channel(**extra: Any) -> SmsChannel:
        raw = {"type": "sms", "account_sid": ACCOUNT, "auth_token": {"env": "X"}, **extra}
        config = SmsChannel.config_model.model_validate(raw)
        return SmsChannel("sms", config, ChannelContext(base_dir=tmp_path, data_dir=tmp_path))

    number = channel(from_number=SENDER)
    assert number.rate_limit_for("7") == LONG_CODE_RATE
    assert number.rate_limit_target("7") == SENDER
    assert number.account_key() == f"twilio:{ACCOUNT}"
    service = channel(messaging_service_sid=SERVICE)
    assert service.rate_limit_for("7") == SERVICE_RATE
    assert service.rate_limit_target("7") == SERVICE
    own = RateLimit(per_target_per_second=100, per_target_burst=100)
    assert channel(from_number=SENDER, rate_limit=own.model_dump()).rate_limit_for("7") == own


def test_gsm7_is_on_unless_a_language_is_written_in_another_script() -> None:
    def config(**extra: Any) -> Any:
        raw = {
            "type": "sms",
            "account_sid": ACCOUNT,
            "auth_token": {"env": "X"},
            "from_number": SENDER,
            **extra,
        }
        return SmsChannel.config_model.model_validate(raw)

    assert config(languages=["en", "fr"]).gsm7 is True
    assert config(languages=["en", "ru"]).gsm7 is False
    assert config(languages=["ru"], gsm7=True).gsm7 is True


async def test_config_needs_one_sender_and_real_sids(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    with pytest.raises(ConfigError, match="exactly one of from_number and messaging_service_sid"):
        await make_broadcaster({"sms": sms_channel(twilio, messaging_service_sid=SERVICE)})
    config = sms_channel(twilio)
    del config["from_number"]
    with pytest.raises(ConfigError, match="exactly one of"):
        await make_broadcaster({"sms": config})
    with pytest.raises(ConfigError, match="not an Account SID"):
        await make_broadcaster({"sms": sms_channel(twilio, account_sid="SK123")})
    with pytest.raises(ConfigError, match=r"not an E\.164 number"):
        await make_broadcaster({"sms": sms_channel(twilio, from_number="0612345678")})


async def test_max_segments_is_checked_before_publishing(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_sms(make_broadcaster, twilio, max_segments=1, languages=["en"])
    request = api_down().model_copy(update={"fields": {"summary": "API calls fail " * 12}})
    preview = await b.preview(request)
    (failure,) = preview.failures
    assert (failure.channel, failure.check, failure.limit) == ("sms", "sms_segments", 1)
    assert failure.message.startswith("update is 2 SMS segments (GSM-7, ")
    (measure,) = preview.renders[0].measures
    assert (measure.sms_segments, measure.sms_encoding) == (2, "GSM-7")
    default = await open_sms(make_broadcaster, twilio, languages=["en"])
    assert default.channels["sms"].limits.max_sms_segments == 2
    assert not (await default.preview(request)).failures


# -- errors --------------------------------------------------------------------------------


async def test_too_many_requests_20429_is_retried(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    twilio.fail(
        "messages.create",
        TwilioFailure(code=20429, status=429, message="Too Many Requests"),
        TwilioFailure(status=503),
        TwilioFailure(drop=True),
    )
    b = await open_sms(make_broadcaster, twilio)
    await subscribe(b, BOB, "en")
    incident, _, sms = await publish(b, api_down())
    assert sms == {DeliveryState.SENT: 1}
    assert [(c.status, c.code) for c in twilio.calls_to("messages.create")] == [
        (429, 20429),
        (503, 503),
        (None, None),
        (201, None),
    ]
    assert len(twilio.messages) == 1
    (delivery,) = await b.deliveries(incident, channel="sms")
    assert delivery.attempts == 4


async def test_refused_credentials_break_the_channel_and_doctor_says_why(
    twilio: FakeTwilio,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "a-revoked-auth-token-1234"
    monkeypatch.setenv("TWILIO_TEST_TOKEN", wrong)
    caplog.set_level(logging.DEBUG)
    b = await open_sms(make_broadcaster, twilio, concurrency=1, status_callback=False)
    await subscribe(b, ANNE, "fr")
    await subscribe(b, BOB, "en")
    result = await b.publish(api_down())
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=20)
    (sms,) = progress
    assert sms.broken == (
        "sms → subscriber #1: Twilio error 20003: Authenticate — check account_sid and "
        "auth_token in the Twilio Console"
    )
    assert sms.counts == {DeliveryState.QUEUED: 2}  # none failed, none lost
    assert len(twilio.calls_to("messages.create")) == 1  # stopped at the first refusal
    assert twilio.messages == []
    check = next(c for c in await b.doctor() if c.subject == "channel sms")
    assert not check.ok
    assert check.detail == (
        "sms: Twilio error 20003: Authenticate — check account_sid and auth_token in the "
        f"Twilio Console (fetching account {ACCOUNT} at {twilio.url})"
    )
    assert wrong not in caplog.text and TOKEN not in caplog.text


async def test_doctor_passes_with_working_credentials_and_a_callback_url(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_sms(make_broadcaster, twilio, port=8123)
    check = next(c for c in await b.doctor() if c.subject == "channel sms")
    assert (check.ok, check.detail) == (True, "sms, ok")
    (fetch,) = twilio.calls_to("accounts.fetch")
    assert fetch.authorized and fetch.account_sid == ACCOUNT
    # Without serve.public_url Twilio has nowhere to report deliveries: doctor says so.
    b = await open_sms(make_broadcaster, twilio)
    check = next(c for c in await b.doctor() if c.subject == "channel sms")
    assert not check.ok and "status_callback is on but serve.public_url" in check.detail
    twilio.account_status = "suspended"
    b = await open_sms(make_broadcaster, twilio, status_callback=False)
    check = next(c for c in await b.doctor() if c.subject == "channel sms")
    assert check.detail == (
        f"sms: the Twilio account {ACCOUNT} is suspended — reactivate it in the Twilio Console"
    )


async def test_invalid_number_21211_fails_only_that_delivery(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster, caplog: pytest.LogCaptureFixture
) -> None:
    twilio.fail(
        "messages.create",
        TwilioFailure(
            code=21211, to=BOB, message=f"The 'To' number {BOB} is not a valid phone number."
        ),
    )
    caplog.set_level(logging.DEBUG)
    b = await open_sms(make_broadcaster, twilio)
    await subscribe(b, ANNE, "fr")
    bob = await subscribe(b, BOB, "en")
    incident, _, sms = await publish(b, api_down())
    assert sms == {DeliveryState.SENT: 1, DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(incident, states=[DeliveryState.FAILED])
    assert failed.recipient == str(bob)
    assert failed.last_error == (
        f"sms → subscriber #{bob}: Twilio error 21211: The 'To' number +141•••••71 is not a "
        "valid phone number."
    )
    assert failed.attempts == 1  # never retried
    assert [m.to for m in twilio.messages] == [ANNE]
    assert BOB not in caplog.text and ANNE not in caplog.text


async def test_unsubscribed_recipient_21610_fails_and_opts_them_out(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_sms(make_broadcaster, twilio)
    anne = await subscribe(b, ANNE, "fr")
    await subscribe(b, BOB, "en")
    # Anne texted STOP while the webhook was not set up: Twilio knows, the store does not.
    twilio.opt_out(ANNE)
    incident, _, sms = await publish(b, api_down())
    assert sms == {DeliveryState.SENT: 1, DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(incident, states=[DeliveryState.FAILED])
    assert failed.last_error == (
        f"sms → subscriber #{anne}: Twilio error 21610: Attempt to send to unsubscribed recipient"
    )
    assert (await b.audience.get(anne)).channels == {"sms": False}
    _, _, sms = await publish(b, api_down(IncidentStatus.RESOLVED), incident)
    assert sms == {DeliveryState.SENT: 1}  # Anne is not even tried again
    assert len(twilio.calls_to("messages.create")) == 3


# -- status callbacks and STOP/START through serve ---------------------------------------------


async def test_status_callbacks_move_deliveries_on(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await open_sms(make_broadcaster, twilio, port=port)
    anne = await subscribe(b, ANNE, "fr")
    bob = await subscribe(b, BOB, "en")
    async with serving(b, port) as base:
        incident, _, sms = await publish(b, api_down())
        assert sms == {DeliveryState.SENT: 2}
        assert {m.status_callback for m in twilio.messages} == {f"{base}/inbound/sms"}
        (to_anne,) = twilio.messages_to(ANNE)
        (to_bob,) = twilio.messages_to(BOB)

        assert await twilio.send_status_callbacks("sent", sids=[to_anne.sid]) == [200]
        assert await twilio.send_status_callbacks("delivered", sids=[to_anne.sid]) == [200]
        assert await twilio.send_status_callbacks("undelivered", 30007, sids=[to_bob.sid]) == [200]

        async def settled() -> dict[str, Any]:
            states = {d.recipient: d for d in await b.deliveries(incident, channel="sms")}
            done = all(d.state is not DeliveryState.SENT for d in states.values())
            return states if done else {}

        states = await until(settled)
        assert states[str(anne)].state is DeliveryState.DELIVERED
        assert states[str(anne)].last_error is None
        assert states[str(bob)].state is DeliveryState.UNDELIVERED
        assert states[str(bob)].last_error == "Twilio error 30007: message filtered by the carrier"
        (progress,) = await b.progress(incident, channel="sms")
        assert progress.counts == {DeliveryState.DELIVERED: 1, DeliveryState.UNDELIVERED: 1}
        (failure,) = progress.failures
        assert "30007" in str(failure)
        # A late "sent" never moves a delivery back.
        assert await twilio.send_status_callbacks("sent", sids=[to_anne.sid]) == [200]
        await asyncio.sleep(0.1)
        deliveries = await b.deliveries(incident, channel="sms")
        (anne_delivery,) = [d for d in deliveries if d.recipient == str(anne)]
        assert anne_delivery.state is DeliveryState.DELIVERED


async def test_forged_or_unsigned_callbacks_are_refused_and_change_nothing(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await open_sms(make_broadcaster, twilio, port=port)
    anne = await subscribe(b, ANNE, "fr")
    async with serving(b, port) as base:
        incident, _, _ = await publish(b, api_down())
        (message,) = twilio.messages
        url = f"{base}/inbound/sms"
        receipt = {
            "AccountSid": ACCOUNT,
            "MessageSid": message.sid,
            "MessageStatus": "failed",
            "ErrorCode": "30003",
            "To": ANNE,
            "From": SENDER,
        }
        stop = {"AccountSid": ACCOUNT, "From": ANNE, "To": SENDER, "Body": "STOP"}
        header = "X-Twilio-Signature"
        refused = [
            await post_form(url, receipt, {}),
            await post_form(url, receipt, {header: twilio_signature("guessed", url, receipt)}),
            # Signed for another URL, or for other parameters:
            await post_form(url, receipt, {header: twilio_signature(TOKEN, base, receipt)}),
            await post_form(
                url,
                receipt,
                {header: twilio_signature(TOKEN, url, {**receipt, "MessageStatus": "sent"})},
            ),
            await post_form(url, stop, {header: twilio_signature("guessed", url, stop)}),
        ]
        assert refused == [401, 401, 401, 401, 401]
        await asyncio.sleep(0.2)
        (delivery,) = await b.deliveries(incident, channel="sms")
        assert delivery.state is DeliveryState.SENT and delivery.last_error is None
        assert (await b.audience.get(anne)).channels == {"sms": True}
        # The same request, signed with the auth token over the public URL, is taken.
        signed = {header: twilio_signature(TOKEN, url, receipt)}
        assert await post_form(url, receipt, signed) == 200

        async def failed() -> bool:
            (delivery,) = await b.deliveries(incident, channel="sms")
            return delivery.state is DeliveryState.FAILED

        await until(failed)


async def test_stop_opts_a_subscriber_out_and_start_back_in(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    b = await open_sms(make_broadcaster, twilio, port=port)
    anne = await subscribe(b, ANNE, "fr")
    await subscribe(b, BOB, "en")

    async def consent() -> bool | None:
        return (await b.audience.get(anne)).channels.get("sms")

    async with serving(b, port) as base:
        url = f"{base}/inbound/sms"
        incident, _, sms = await publish(b, api_down())
        assert sms == {DeliveryState.SENT: 2}

        answer = await twilio.inbound(ANNE, "  stop ", SENDER, url=url)
        assert answer.status == 200 and answer.content_type == "text/xml"
        assert answer.body == '<?xml version="1.0" encoding="UTF-8"?><Response/>'
        await until(lambda: _is(consent, False))
        subscription_source = await b.store.read_session(
            lambda s: s.connection().exec_driver_sql("SELECT source FROM subscriptions").scalar()
        )
        assert subscription_source == "sms STOP"
        _, _, sms = await publish(b, api_down(IncidentStatus.IDENTIFIED), incident)
        assert sms == {DeliveryState.SENT: 1}
        assert len(twilio.messages_to(ANNE)) == 1 and len(twilio.messages_to(BOB)) == 2

        # Any other text changes nothing (HELP is Twilio's to answer).
        for text in ("HELP", "is it down?", "STOP please"):
            assert (await twilio.inbound(ANNE, text, SENDER, url=url)).status == 200
        await asyncio.sleep(0.1)
        assert await consent() is False

        assert (await twilio.inbound(ANNE, "START", SENDER, url=url)).status == 200
        await until(lambda: _is(consent, True))
        _, _, sms = await publish(b, api_down(IncidentStatus.RESOLVED), incident)
        assert sms == {DeliveryState.SENT: 2}
        assert len(twilio.messages_to(ANNE)) == 2

        # Advanced Opt-Out's own (localised) keywords come with OptOutType.
        await twilio.inbound(ANNE, "ARRET", SENDER, url=url, opt_out_type="STOP")
        await until(lambda: _is(consent, False))


async def _is(read: Callable[[], Awaitable[Any]], expected: Any) -> bool:
    return bool(await read() == expected)


def test_consent_keywords_are_twilios() -> None:
    assert [consent_keyword(w, None) for w in ("STOP", "stopall", " Unsubscribe\n", "quit")] == [
        False
    ] * 4
    assert [consent_keyword(w, None) for w in ("START", "yes", "UNSTOP")] == [True] * 3
    assert [consent_keyword(w, None) for w in ("HELP", "stop it", "", "STOP!")] == [None] * 4
    assert consent_keyword("ARRET", "STOP") is False
    assert consent_keyword("OUI", "START") is True
    assert consent_keyword("AIDE", "HELP") is None


async def test_without_public_url_inbound_calls_are_refused(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_sms(make_broadcaster, twilio, served=True)
    await subscribe(b, ANNE, "fr")
    port = free_port()
    async with serving(b, port) as base:
        url = f"{base}/inbound/sms"
        answer = await twilio.inbound(ANNE, "STOP", SENDER, url=url)
        assert answer.status == 404
        assert "set serve.public_url or status_callback_url" in answer.body
    assert (await b.audience.list())[0].channels == {"sms": True}


async def test_dry_run_counts_who_would_get_it_and_the_segments_it_costs(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_sms(make_broadcaster, twilio)
    await subscribe(b, ANNE, "fr")
    await subscribe(b, BOB, "en")
    await subscribe(b, CARLA, "fr", ["email"])  # the update does not touch it
    await subscribe(b, DIETER, "de")  # gets the channel's first language
    preview = await b.preview(api_down())
    (reach,) = preview.reach
    assert reach.recipients == {"en": 2, "fr": 1}
    (render,) = preview.renders
    segments = {m.language: m.sms_segments for m in render.measures}
    assert reach.sms_segments == 2 * segments["en"] + segments["fr"]
    assert twilio.messages == []  # nothing sent


async def test_the_promised_time_is_shown_in_each_subscribers_own_time_zone(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {"sms": sms_channel(twilio)}, components=COMPONENTS, timezone="Europe/Paris"
    )
    await b.audience.add(NewSubscriber(phone=ANNE, language="fr"), source="test")  # Paris
    await b.audience.add(
        NewSubscriber(phone=BOB, language="en", timezone="America/New_York"), source="test"
    )
    promised = datetime(2031, 1, 15, 14, 30, tzinfo=UTC)  # winter: CET and EST
    await publish(b, api_down().model_copy(update={"next_update_at": promised}))
    (to_anne,) = twilio.messages_to(ANNE)
    (to_bob,) = twilio.messages_to(BOB)
    assert "15:30 CET" in to_anne.body
    assert "Next update by 09:30 EST" in to_bob.body and "CET" not in to_bob.body
