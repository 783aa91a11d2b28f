"""Fallback channels and quiet hours.

A subscriber whose SMS fails permanently, or whose SMS channel is found broken mid-outage
(a Twilio account suspended), gets the update by email instead — tracked both ways, never
twice on email, never sent back and forth. An update below `critical` impact waits for the
end of each subscriber's quiet hours in their own time zone. The real Twilio and SMTP
clients drive the local fakes; time is the store's clock, set by the test (no sleeping).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import broadcaster.dispatch.dispatcher as dispatcher_module
import broadcaster.store.queue as queue_module
import broadcaster.store.store as store_module
from broadcaster.config import load_settings
from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.models import (
    AddressKind,
    ChannelFamily,
    ChannelProgress,
    ChannelRender,
    ComponentState,
    DeliveryAction,
    DeliveryState,
    Impact,
    IncidentStatus,
    NewSubscriber,
    Rendered,
    UpdateRequest,
)
from broadcaster.sandbox import FakeTwilio
from broadcaster.sandbox.smtp import FakeSmtp, SmtpReply
from broadcaster.sandbox.twilio import TwilioFailure
from broadcaster.store import ChannelPlan, DeliveryQueue, Outcome, PublishPlan, Store
from broadcaster.store.queue import QuietWindow, Reroute
from broadcaster.store.subscribers import SubscriberStore
from broadcaster.subscribers import Address
from broadcaster.views import progress_table
from tests.conftest import MakeBroadcaster
from tests.test_channel_email import email_channel, parts
from tests.test_channel_sms import ACCOUNT, SENDER, TOKEN, api_down, serving, sms_channel, until
from tests.test_serve import BANNER, free_port

ANNE, BOB, CARLA, DIETER, EVE, FRANK, KEN = (
    "+33612345678",
    "+14155552671",
    "+33698765432",
    "+4915112345678",
    "+12025550143",
    "+33611112222",
    "+819012345678",
)
COMPONENTS = {"api": "API", "email": "Email"}
NIGHT = {"start": "22:00", "end": "08:00"}


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


@pytest.fixture
async def smtp() -> AsyncIterator[FakeSmtp]:
    async with FakeSmtp() as fake:
        yield fake


@dataclasses.dataclass
class Clock:
    """The store's `utcnow`, set by the test."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """The store's clock (claims, fan-outs, publishes, progress), fixed until moved."""
    fixed = Clock(datetime(2025, 6, 1, 18, 0, tzinfo=UTC))  # 03:00 on 2 June in Tokyo
    monkeypatch.setattr(queue_module, "utcnow", fixed)
    monkeypatch.setattr(store_module, "utcnow", fixed)
    yield fixed


async def open_both(
    make_broadcaster: MakeBroadcaster,
    twilio: FakeTwilio,
    smtp: FakeSmtp,
    *,
    sms: dict[str, Any] | None = None,
    email: dict[str, Any] | None = None,
    **settings: Any,
) -> Broadcaster:
    """SMS (falling back to email) and email, English and French, on the fakes."""
    channels = {
        "sms": sms_channel(twilio, **{"fallback": "email", **(sms or {})}),
        "email": email_channel(smtp, **(email or {})),
    }
    opened: Broadcaster = await make_broadcaster(channels, components=COMPONENTS, **settings)
    return opened


async def person(
    b: Broadcaster,
    *,
    phone: str | None = None,
    email: str | None = None,
    language: str = "en",
    timezone: str | None = None,
) -> int:
    """A subscriber of every subscriber channel they have an address for."""
    new = NewSubscriber(phone=phone, email=email, language=language, timezone=timezone)
    return (await b.audience.add(new, source="test")).id


def on(channels: list[str], request: UpdateRequest | None = None) -> UpdateRequest:
    return (request or api_down()).model_copy(update={"channels": channels})


def of(
    progress: list[ChannelProgress], channel: str, action: DeliveryAction = DeliveryAction.POST
) -> ChannelProgress | None:
    return next((p for p in progress if p.channel == channel and p.action is action), None)


def counts(
    progress: list[ChannelProgress], channel: str, action: DeliveryAction = DeliveryAction.POST
) -> dict[DeliveryState, int]:
    found = of(progress, channel, action)
    return found.counts if found is not None else {}


async def publish_and_wait(b: Broadcaster, request: UpdateRequest) -> tuple[Any, list[Any]]:
    result = await b.publish(request)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=20)
    return result, progress


def shown(progress: list[ChannelProgress]) -> str:
    """The progress table as `broadcaster status` prints it, as plain text."""
    console = Console(width=200, record=True, color_system=None)
    console.print(progress_table(progress))
    return console.export_text()


# -- fallback ------------------------------------------------------------------------------


async def test_a_permanent_sms_failure_sends_the_update_by_email_in_their_language(
    twilio: FakeTwilio, smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    twilio.fail(
        "messages.create",
        TwilioFailure(code=21211, to=BOB, message=f"The 'To' number {BOB} is not valid."),
    )
    b = await open_both(make_broadcaster, twilio, smtp)
    await person(b, phone=ANNE, email="anne@example.com", language="fr")
    bob = await person(b, phone=BOB, email="bob@example.com", language="fr")

    result, progress = await publish_and_wait(b, on(["sms"]))

    assert counts(progress, "sms") == {DeliveryState.SENT: 1, DeliveryState.REROUTED: 1}
    assert counts(progress, "email", DeliveryAction.FALLBACK) == {DeliveryState.SENT: 1}
    assert of(progress, "email") is None  # the update itself went to SMS only
    assert [m.to for m in twilio.messages] == [ANNE]
    assert smtp.to("anne@example.com") == []
    (mail,) = smtp.to("bob@example.com")
    # The email render was checked and stored when the update was published.
    render = (await b.store.renders(result.update.id))["email"]
    text, _ = parts(mail.message)
    assert text == render.variant("fr").text + "\n"
    assert mail.message["Subject"] == render.variant("fr").subject
    assert mail.message["Content-Language"] == "fr"

    # Tracked both ways: the SMS names the email's delivery, the email its SMS.
    deliveries = await b.deliveries(result.incident.id)
    (sms,) = [d for d in deliveries if d.state is DeliveryState.REROUTED]
    (email,) = [d for d in deliveries if d.action is DeliveryAction.FALLBACK]
    assert sms.channel == "sms" and email.channel == "email"
    assert sms.recipient == email.recipient == str(bob)
    assert sms.last_error == (
        f"re-routed to email (delivery #{email.id}): sms → subscriber #{bob}: Twilio error "
        "21211: The 'To' number +141•••••71 is not valid."
    )
    assert sms.attempts == 1
    assert email.target_id == sms.id and sms.target_id is None
    assert mail.message["Message-ID"] == f"<{email.delivery_key}@acme.com>"
    trail = [a for a in await b.audit(result.incident.id) if a.action == "reroute"]
    assert [(a.actor, a.update_id, a.detail) for a in trail] == [
        ("dispatcher", result.update.id, {"from": "sms", "to": "email", "deliveries": 1})
    ]
    status = shown(await b.progress(result.incident.id))
    assert "rerouted" in status and "email (fallback)" in status

    # A follow-up: Bob's SMS fails again and his email threads under the first one.
    twilio.fail("messages.create", TwilioFailure(code=21211, to=BOB))
    follow = on(["sms"], api_down(IncidentStatus.RESOLVED))
    resolved = await b.publish(follow, result.incident.id)
    await asyncio.wait_for(b.wait([resolved.update.id]), timeout=20)
    first, second = smtp.to("bob@example.com")
    assert second.message["In-Reply-To"] == first.message["Message-ID"]


async def test_an_sms_the_carrier_reports_undelivered_later_goes_out_by_email(
    twilio: FakeTwilio, smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    port = free_port()
    channels = {
        "sms": sms_channel(twilio, fallback="email"),
        "email": email_channel(smtp),
        "status-page": BANNER,
    }
    serve = {"public_url": f"http://127.0.0.1:{port}"}
    b = await make_broadcaster(channels, components=COMPONENTS, serve=serve)
    anne = await person(b, phone=ANNE, email="anne@example.com", language="fr")
    await person(b, phone=BOB, email="bob@example.com")
    async with serving(b, port):
        result, progress = await publish_and_wait(b, on(["sms"]))
        assert counts(progress, "sms") == {DeliveryState.SENT: 2}
        (to_anne,) = twilio.messages_to(ANNE)
        (to_bob,) = twilio.messages_to(BOB)

        # Minutes later the carrier gives up on Anne's SMS; Bob's arrives.
        assert await twilio.send_status_callbacks("undelivered", 30007, sids=[to_anne.sid]) == [200]
        assert await twilio.send_status_callbacks("delivered", sids=[to_bob.sid]) == [200]

        async def mailed() -> list[Any]:
            return smtp.to("anne@example.com")

        (mail,) = await until(mailed, timeout=10)
        assert mail.message["Content-Language"] == "fr"
        progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=20)
        assert counts(progress, "sms") == {
            DeliveryState.REROUTED: 1,
            DeliveryState.DELIVERED: 1,
        }
        assert counts(progress, "email", DeliveryAction.FALLBACK) == {DeliveryState.SENT: 1}
        (sms,) = [
            d
            for d in await b.deliveries(result.incident.id)
            if d.recipient == str(anne) and d.channel == "sms"
        ]
        assert sms.state is DeliveryState.REROUTED
        assert sms.last_error is not None
        assert sms.last_error.endswith(": Twilio error 30007: message filtered by the carrier")

        # Twilio repeats itself ("failed" after "undelivered"): nothing more is sent.
        assert await twilio.send_status_callbacks("failed", 30007, sids=[to_anne.sid]) == [200]
        await asyncio.sleep(0.3)
    assert len(smtp.to("anne@example.com")) == 1
    assert smtp.to("bob@example.com") == []


async def test_the_dry_run_shows_the_fallback_text_and_its_checks(
    twilio: FakeTwilio, smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_both(make_broadcaster, twilio, smtp, email={"languages": ["en", "de"]})
    preview = await b.preview(on(["sms"]))
    assert [r.channel for r in preview.renders] == ["sms"]
    assert [r.channel for r in preview.fallbacks] == ["email"]
    assert [r.channel for r in preview.reach] == ["sms"]  # nobody is reached there directly
    # The shipped templates have no German: the fallback would send a broken email.
    (failure,) = preview.failures
    assert failure.channel == "email" and failure.message.endswith("(fallback of sms)")


async def test_an_account_broken_mid_fanout_sends_the_rest_by_email_and_never_by_sms_later(
    twilio: FakeTwilio,
    smtp: FakeSmtp,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatcher_module, "FANOUT_BATCH", 2)  # 6 subscribers: 3 batches
    # Twilio refuses the account at the second message (20003: suspended, or a revoked
    # token): the channel is broken, not the recipient.
    twilio.fail(
        "messages.create", TwilioFailure(code=20003, status=401, message="Authenticate", to=BOB)
    )
    b = await open_both(make_broadcaster, twilio, smtp, sms={"concurrency": 1})
    await person(b, phone=ANNE, email="anne@example.com", language="fr")  # sent before
    bob = await person(b, phone=BOB, email="bob@example.com")  # finds it broken
    carla = await person(b, phone=CARLA, language="fr")  # no email: waits for SMS
    await person(b, phone=DIETER, email="dieter@example.com", language="de")
    eve = await person(b, phone=EVE, email="eve@example.com")
    await b.audience.set_subscription(eve, "email", subscribed=False, source="test")
    await person(b, phone=FRANK, email="frank@example.com", language="fr")  # last batch

    result, progress = await publish_and_wait(b, on(["sms"]))

    sms = of(progress, "sms")
    assert sms is not None and sms.broken is not None and "20003" in sms.broken
    assert sms.counts == {
        DeliveryState.SENT: 1,
        DeliveryState.REROUTED: 3,
        DeliveryState.QUEUED: 2,
    }
    assert counts(progress, "email", DeliveryAction.FALLBACK) == {DeliveryState.SENT: 3}
    assert [m.to for m in twilio.messages] == [ANNE]
    languages = {
        name: [m.message["Content-Language"] for m in smtp.to(f"{name}@example.com")]
        for name in ("anne", "bob", "dieter", "eve", "frank")
    }
    assert languages == {
        "anne": [],  # had her SMS
        "bob": ["en"],
        "dieter": ["en"],  # no German: the channel's first language
        "eve": [],  # opted out of email: waits for SMS
        "frank": ["fr"],
    }
    queued = await b.deliveries(result.incident.id, states=[DeliveryState.QUEUED])
    assert sorted(d.recipient for d in queued) == sorted([str(carla), str(eve)])
    (bobs,) = [
        d for d in await b.deliveries(result.incident.id, channel="sms") if d.recipient == str(bob)
    ]
    assert bobs.state is DeliveryState.REROUTED
    assert bobs.last_error is not None and "Twilio error 20003" in bobs.last_error
    assert bobs.attempts == 0  # the broken account's try is not counted against Bob

    # The account works again: the next dispatcher sends what stayed queued, and only that.
    await asyncio.wait_for(b.wait(), timeout=20)
    assert sorted(m.to for m in twilio.messages) == sorted([ANNE, CARLA, EVE])
    assert len(twilio.calls_to("messages.create")) == 4  # Anne, Bob's refusal, Carla, Eve
    assert len(smtp.received) == 3
    final = counts(await b.progress(result.incident.id), "sms")
    assert final == {DeliveryState.SENT: 3, DeliveryState.REROUTED: 3}


async def test_two_channels_falling_back_to_each_other_never_loop(
    twilio: FakeTwilio, smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    twilio.fail("messages.create", TwilioFailure(code=21211, to=BOB))
    smtp.reply("bob@example.com", SmtpReply(550, "5.1.1 User unknown"))
    b = await open_both(make_broadcaster, twilio, smtp, email={"fallback": "sms"})
    await person(b, phone=BOB, email="bob@example.com")

    result, progress = await publish_and_wait(b, on(["sms"]))

    assert counts(progress, "sms") == {DeliveryState.REROUTED: 1}
    assert counts(progress, "email", DeliveryAction.FALLBACK) == {DeliveryState.FAILED: 1}
    assert len(twilio.calls_to("messages.create")) == 1
    assert smtp.received == []
    assert len(await b.deliveries(result.incident.id)) == 2  # no third delivery, no SMS again


async def test_no_fallback_for_someone_the_update_reaches_on_the_fallback_already(
    twilio: FakeTwilio, smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    twilio.fail("messages.create", TwilioFailure(code=21211, to=BOB))
    b = await open_both(make_broadcaster, twilio, smtp)
    await person(b, phone=BOB, email="bob@example.com")
    _, progress = await publish_and_wait(b, on(["sms", "email"]))
    assert counts(progress, "sms") == {DeliveryState.FAILED: 1}
    assert counts(progress, "email") == {DeliveryState.SENT: 1}
    assert of(progress, "email", DeliveryAction.FALLBACK) is None
    assert len(smtp.to("bob@example.com")) == 1


async def test_a_fallback_needs_the_subscribers_consent_there_and_here(
    twilio: FakeTwilio, smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    twilio.fail("messages.create", TwilioFailure(code=21211, to=BOB))
    twilio.opt_out(ANNE)  # she texted STOP: 21610, and the adapter records the opt-out
    b = await open_both(make_broadcaster, twilio, smtp)
    bob = await person(b, phone=BOB, email="bob@example.com")
    await b.audience.set_subscription(bob, "email", subscribed=False, source="test")
    anne = await person(b, phone=ANNE, email="anne@example.com")
    result, progress = await publish_and_wait(b, on(["sms"]))
    # Bob never agreed to email; Anne said no to SMS, which is no failure to route around.
    assert counts(progress, "sms") == {DeliveryState.FAILED: 2}
    assert smtp.received == []
    assert (await b.audience.get(anne)).channels == {"sms": False, "email": True}
    assert not [a for a in await b.audit(result.incident.id) if a.action == "reroute"]


async def test_fallbacks_are_checked_when_the_config_loads(
    twilio: FakeTwilio, smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    hooks = {"type": "webhook", "targets": [{"name": "ops", "url": "http://127.0.0.1:9/"}]}
    email = email_channel(smtp)
    with pytest.raises(
        ConfigError,
        match=r"channels\.sms\.fallback: 'mail' is not another subscriber channel — "
        "configured: email$",
    ):
        await make_broadcaster({"sms": sms_channel(twilio, fallback="mail"), "email": email})
    with pytest.raises(ConfigError, match="'sms' is not another subscriber channel"):
        await make_broadcaster({"sms": sms_channel(twilio, fallback="sms"), "email": email})
    with pytest.raises(ConfigError, match="'hooks' is not another subscriber channel"):
        await make_broadcaster({"sms": sms_channel(twilio, fallback="hooks"), "hooks": hooks})
    with pytest.raises(ConfigError, match=r"channels\.hooks\.fallback: only a subscriber"):
        await make_broadcaster({"hooks": {**hooks, "fallback": "email"}, "email": email})


# -- quiet hours: the window ------------------------------------------------------------------


def window(default: str = "UTC", start: time = time(22), end: time = time(8)) -> QuietWindow:
    return QuietWindow(start=start, end=end, default_timezone=default)


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_the_window_ends_at_the_subscribers_local_morning() -> None:
    night = window()
    # 03:00 in Tokyo (UTC+9): held until 08:00 there, the same local day.
    assert night.release(utc(2025, 6, 1, 18, 0), "Asia/Tokyo") == utc(2025, 6, 1, 23, 0)
    # 23:00 in Tokyo: the window crosses midnight, so the end is the next local day.
    assert night.release(utc(2025, 6, 1, 14, 0), "Asia/Tokyo") == utc(2025, 6, 1, 23, 0)
    # Noon in Tokyo, 22:00 sharp, 08:00 sharp: outside, inside, outside.
    assert night.release(utc(2025, 6, 1, 3, 0), "Asia/Tokyo") is None
    assert night.release(utc(2025, 6, 1, 13, 0), "Asia/Tokyo") == utc(2025, 6, 1, 23, 0)
    assert night.release(utc(2025, 6, 1, 23, 0), "Asia/Tokyo") is None
    # No time zone of their own: the configured one.
    assert window("Asia/Tokyo").release(utc(2025, 6, 1, 18, 0), None) == utc(2025, 6, 1, 23, 0)
    assert night.release(utc(2025, 6, 1, 18, 0), None) is None  # 18:00 UTC
    # A window inside one day (01:00-07:00) does not wrap.
    early = window(start=time(1), end=time(7))
    assert early.release(utc(2025, 6, 1, 0, 30), None) is None
    assert early.release(utc(2025, 6, 1, 6, 59), None) == utc(2025, 6, 1, 7, 0)


def test_the_window_follows_the_clocks_across_daylight_saving_changes() -> None:
    paris = window()
    # Sunday 30 March 2025, Paris: 02:00 CET becomes 03:00 CEST. 08:00 that morning is
    # 06:00 UTC, not the 07:00 UTC that adding the hours read at 01:30 CET would give.
    assert paris.release(utc(2025, 3, 30, 0, 30), "Europe/Paris") == utc(2025, 3, 30, 6, 0)
    # 23:30 CET on Saturday: 7.5 hours to 08:00 CEST, one fewer than on the clock face.
    assert paris.release(utc(2025, 3, 29, 22, 30), "Europe/Paris") == utc(2025, 3, 30, 6, 0)
    # Sunday 26 October 2025: back from CEST to CET; 08:00 CET is 07:00 UTC.
    assert paris.release(utc(2025, 10, 25, 22, 30), "Europe/Paris") == utc(2025, 10, 26, 7, 0)
    # An end the clocks skip (02:30 that March night) lands as late as the gap is long.
    gap = window(start=time(1), end=time(2, 30))
    assert gap.release(utc(2025, 3, 30, 0, 30), "Europe/Paris") == utc(2025, 3, 30, 1, 30)


def test_quiet_hours_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    config = tmp_path / "broadcaster.toml"
    config.write_text('[subscribers]\nquiet_hours = { start = "25:00", end = "08:00" }\n')
    with pytest.raises(ConfigError, match=r"quiet_hours\.start: '25:00' is not a time of day"):
        load_settings(config)
    config.write_text('[subscribers]\nquiet_hours = { start = "08:00", end = "08:00" }\n')
    with pytest.raises(ConfigError, match="start and end are both 08:00"):
        load_settings(config)
    config.write_text("[subscribers]\nquiet_hours = { start = 22:30:00, end = 07:00:00 }\n")
    quiet = load_settings(config).subscribers.quiet_hours
    assert quiet is not None and (quiet.start, quiet.end) == (time(22, 30), time(7))


# -- quiet hours: at the fan-out (SQLite and PostgreSQL) --------------------------------------


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    yield opened
    await opened.close()


def fanout_plan(
    channels: list[str],
    *,
    incident_id: int | None = None,
    impact: Impact = Impact.MINOR,
    status: IncidentStatus = IncidentStatus.INVESTIGATING,
) -> PublishPlan:
    """An update fanned out to subscribers of these channels."""
    touched = {"api": ComponentState.MAJOR_OUTAGE}

    def render(channel: str) -> ChannelRender:
        return ChannelRender(
            channel=channel,
            family=ChannelFamily.SHORT,
            template=status.value,
            variants=[Rendered(language="en", text=status.value)],
            joined=False,
            facts={"components": {"api": "major_outage"}},
        )

    return PublishPlan(
        incident_id=incident_id,
        title="API down",
        status=status,
        impact=impact,
        components=touched,
        incident_components=touched,
        template=status.value,
        fields={},
        next_update_at=None,
        publish_key=None,
        actor="test",
        channels={c: ChannelPlan(render=render(c), recipients=[], fanout=True) for c in channels},
    )


async def add(
    store: Store, phone: str, *, email: str | None = None, timezone: str | None = None
) -> str:
    channels = ["sms", "email"] if email else ["sms"]
    new = NewSubscriber(phone=phone, email=email, timezone=timezone)
    subscriber, _ = await SubscriberStore(store).add(
        new, Address(phone=phone, email=email), channels, source="test"
    )
    return str(subscriber.id)


async def fan_out(queue: DeliveryQueue, channel: str, quiet: QuietWindow | None) -> None:
    while await queue.advance_fanout(channel, 100, quiet=quiet):
        pass


async def test_non_critical_updates_wait_for_each_time_zones_morning_critical_ones_do_not(
    store: Store, clock: Clock
) -> None:
    ken = await add(store, KEN, timezone="Asia/Tokyo")  # 03:00
    anne = await add(store, ANNE, timezone="Europe/Paris")  # 20:00
    bob = await add(store, BOB)  # no zone: the configured one, New York, 14:00
    night = window("America/New_York")
    queue = DeliveryQueue(store)

    minor, _ = await store.publish(fanout_plan(["sms"]))
    await fan_out(queue, "sms", night)
    due = {d.recipient: d.next_attempt_at for d in await store.deliveries(update_id=minor.id)}
    assert due == {ken: utc(2025, 6, 1, 23, 0), anne: None, bob: None}
    # Held ones are not pending for `wait`: a command publishing at night does not wait
    # for the morning (a `serve`, or the next dispatch, sends them then).
    assert await queue.pending_count(update_ids=[minor.id]) == 2
    claimed = await queue.claim("sms", 10, 60)
    assert sorted(c.recipient for c in claimed) == sorted([anne, bob])
    (held,) = await store.progress(update_ids=[minor.id])
    assert (held.held, held.held_until) == (1, utc(2025, 6, 1, 23, 0))

    critical, _ = await store.publish(fanout_plan(["sms"], impact=Impact.CRITICAL))
    await fan_out(queue, "sms", night)
    assert {d.next_attempt_at for d in await store.deliveries(update_id=critical.id)} == {None}

    clock.now = utc(2025, 6, 1, 23, 0)  # 08:00 in Tokyo
    assert await queue.pending_count(update_ids=[minor.id]) == 3  # 2 sending, Ken due
    assert [c.recipient for c in await queue.claim("sms", 10, 60) if c.update_id == minor.id] == [
        ken
    ]


async def test_a_newer_update_supersedes_one_held_for_quiet_hours(
    store: Store, clock: Clock
) -> None:
    ken = await add(store, KEN, timezone="Asia/Tokyo")
    night = window()
    queue = DeliveryQueue(store)
    first, _ = await store.publish(fanout_plan(["sms"]))
    await fan_out(queue, "sms", night)
    resolved, _ = await store.publish(
        fanout_plan(
            ["sms"],
            incident_id=first.incident_id,
            impact=Impact.CRITICAL,
            status=IncidentStatus.RESOLVED,
        )
    )
    await fan_out(queue, "sms", night)
    (old,) = await store.deliveries(update_id=first.id)
    assert old.state is DeliveryState.SUPERSEDED
    (claimed,) = await queue.claim("sms", 10, 60)  # the resolution goes now, nothing waits
    assert (claimed.update_id, claimed.recipient) == (resolved.id, ken)


async def test_paris_on_the_night_clocks_go_forward(store: Store, clock: Clock) -> None:
    clock.now = utc(2025, 3, 30, 0, 30)  # 01:30 CET, last Sunday of March
    anne = await add(store, ANNE, timezone="Europe/Paris")
    queue = DeliveryQueue(store)
    update, _ = await store.publish(fanout_plan(["sms"]))
    await fan_out(queue, "sms", window())
    (delivery,) = await store.deliveries(update_id=update.id)
    assert delivery.recipient == anne
    assert delivery.next_attempt_at == utc(2025, 3, 30, 6, 0)  # 08:00 CEST
    clock.now = utc(2025, 3, 30, 5, 59)
    assert await queue.claim("sms", 10, 60) == []
    clock.now = utc(2025, 3, 30, 6, 0)
    assert len(await queue.claim("sms", 10, 60)) == 1


async def failing_sms(store: Store, plan: PublishPlan, error: str) -> list[Any]:
    """Publish, fan out to SMS, fail the SMS with a re-route to email; the deliveries."""
    update, _ = await store.publish(plan)
    queue = DeliveryQueue(store)
    await fan_out(queue, "sms", None)
    (claimed,) = await queue.claim("sms", 10, 60)
    reroute = Reroute(source="sms", fallback="email", kind=AddressKind.EMAIL)
    await queue.settle(
        [Outcome(claimed.id, DeliveryState.FAILED, last_error=error, reroute=reroute)]
    )
    return await store.deliveries(update_id=update.id)


async def test_a_failed_sms_is_rerouted_in_the_transaction_that_fails_it(store: Store) -> None:
    bob = await add(store, BOB, email="bob@example.com")
    plan = fanout_plan(["sms"])
    plan.fallback_renders = {"email": fanout_plan(["email"]).channels["email"].render}
    sms, email = await failing_sms(store, plan, "invalid number")
    assert (sms.channel, sms.state) == ("sms", DeliveryState.REROUTED)
    assert sms.last_error == f"re-routed to email (delivery #{email.id}): invalid number"
    assert (email.channel, email.action, email.recipient) == ("email", "fallback", bob)
    assert (email.state, email.next_attempt_at) == (DeliveryState.QUEUED, None)


async def test_no_reroute_to_a_channel_the_update_goes_to_or_has_no_render_for(
    store: Store,
) -> None:
    await add(store, BOB, email="bob@example.com")
    # Published to email too: its own fan-out reaches Bob there.
    (sms,) = await failing_sms(store, fanout_plan(["sms", "email"]), "invalid")
    assert sms.state is DeliveryState.FAILED and sms.last_error == "invalid"
    # Published before `fallback` was configured: no email render to send.
    (sms,) = await failing_sms(store, fanout_plan(["sms"]), "invalid")
    assert sms.state is DeliveryState.FAILED and sms.last_error == "invalid"


async def test_held_deliveries_rerouted_from_a_broken_channel_stay_held(
    store: Store, clock: Clock
) -> None:
    await add(store, KEN, email="ken@example.com", timezone="Asia/Tokyo")
    queue = DeliveryQueue(store)
    plan = fanout_plan(["sms"])
    plan.fallback_renders = {"email": fanout_plan(["email"]).channels["email"].render}
    update, _ = await store.publish(plan)
    await fan_out(queue, "sms", window())
    reroute = Reroute(source="sms", fallback="email", kind=AddressKind.EMAIL)
    assert await queue.reroute_queued(reroute, reason="sms is broken") == 1
    (email,) = await store.deliveries(update_id=update.id, channel="email")
    assert email.next_attempt_at == utc(2025, 6, 1, 23, 0)
    assert await queue.reroute_queued(reroute, reason="sms is broken") == 0


# -- quiet hours: end to end ------------------------------------------------------------------


async def test_a_subscriber_in_tokyo_at_3am_gets_a_minor_update_at_8am_and_a_critical_one_now(
    twilio: FakeTwilio, make_broadcaster: MakeBroadcaster, clock: Clock
) -> None:
    b = await make_broadcaster(
        {"sms": sms_channel(twilio)},
        components=COMPONENTS,
        timezone="Europe/Paris",
        subscribers={"quiet_hours": NIGHT},
    )
    await person(b, phone=KEN, timezone="Asia/Tokyo")  # 03:00 there
    await person(b, phone=ANNE, language="fr")  # no zone: Paris, 20:00

    minor = api_down().model_copy(update={"impact": Impact.MINOR})
    result, progress = await publish_and_wait(b, minor)  # returns: nothing waits for 08:00

    assert [m.to for m in twilio.messages] == [ANNE]
    sms = of(progress, "sms")
    assert sms is not None
    assert sms.counts == {DeliveryState.SENT: 1, DeliveryState.QUEUED: 1}
    assert (sms.held, sms.held_until) == (1, utc(2025, 6, 1, 23, 0))
    assert "1 held for quiet hours until 2025-06-01 23:00 UTC" in shown(progress)

    critical = api_down().model_copy(update={"impact": Impact.CRITICAL, "title": "All down"})
    await publish_and_wait(b, critical)
    assert sorted(m.to for m in twilio.messages) == sorted([ANNE, KEN, ANNE])  # at 03:00

    clock.now = utc(2025, 6, 1, 23, 0)  # 08:00 in Tokyo
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=20)
    assert counts(progress, "sms") == {DeliveryState.SENT: 2}
    assert [m.to for m in twilio.messages][-1] == KEN
    assert "held" not in shown(progress)


def test_held_until_is_shown_in_utc() -> None:
    progress = ChannelProgress(
        channel="sms",
        counts={DeliveryState.QUEUED: 3},
        held=3,
        held_until=datetime(2025, 6, 1, 23, 0, tzinfo=UTC) + timedelta(minutes=30),
    )
    assert "3 held for quiet hours until 2025-06-01 23:30 UTC" in shown([progress])
