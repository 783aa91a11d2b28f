"""Self-service subscription through `serve`'s app on uvicorn: the subscribe form, email
double opt-in (FakeSmtp), SMS opt-in by code (FakeTwilio), the manage page and one-click
unsubscribe, and what keeps the form from being used to spam or pump SMS."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from html import unescape
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broadcaster.config import Settings
from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.models import (
    ComponentState,
    IncidentStatus,
    NewSubscriber,
    UpdateRequest,
)
from broadcaster.sandbox import FakeSmtp, FakeTwilio
from broadcaster.tokens import Tokens, leading_zero_bits, proof_of_work_seed
from tests.conftest import MakeBroadcaster, require
from tests.test_channel_email import email_channel
from tests.test_channel_sms import ACCOUNT, SENDER, TOKEN, sms_channel
from tests.test_serve import BANNER, serving

SECRET = "self-service-test-key-5f0c1d2e3b4a"
PUBLIC = "https://status.example.test"
COMPONENTS = {"api": "API", "app": "Mobile app"}
ANA, BOB = "ana@example.com", "bob@example.org"
ANNE_SMS, BOB_SMS, US_SMS = "+33612345678", "+33698765432", "+14155552671"


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TWILIO_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("SUBSCRIBE_TEST_SECRET", SECRET)
    for name in ("TWILIO_EDGE", "TWILIO_REGION"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def smtp() -> AsyncIterator[FakeSmtp]:
    async with FakeSmtp() as fake:
        yield fake


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(accounts={ACCOUNT: TOKEN}, numbers=[SENDER]) as fake:
        yield fake


def subscribers(**extra: Any) -> dict[str, Any]:
    return {
        "self_service": True,
        "secret": {"env": "SUBSCRIBE_TEST_SECRET"},
        "sms_countries": ["FR"],
        "proof_of_work_bits": 10,  # the browser test uses the default
        **extra,
    }


async def open_broadcaster(
    make_broadcaster: MakeBroadcaster,
    smtp: FakeSmtp,
    twilio: FakeTwilio | None = None,
    *,
    serve: dict[str, Any] | None = None,
    **subscriber_settings: Any,
) -> Broadcaster:
    """The status page, email and (with `twilio`) SMS, self-service on, the per-address
    request limit out of the way unless `serve` says otherwise."""
    channels: dict[str, Any] = {"status-page": BANNER, "email": email_channel(smtp)}
    if twilio is not None:
        channels["sms"] = sms_channel(twilio)
    return await make_broadcaster(
        channels,
        components=COMPONENTS,
        serve={
            "public_url": PUBLIC,
            "site_cache_seconds": 0,
            "rate_limit_per_ip": {"inbound": {"rate": "100/s", "burst": 1000}},
            **(serve or {}),
        },
        subscribers=subscribers(**subscriber_settings),
    )


def solve(challenge: str, address: str, bits: int) -> str:
    """The proof of work, as the page's script finds it."""
    seed = proof_of_work_seed(challenge, address)
    for n in range(2**32):
        nonce = f"{n:08x}"
        if leading_zero_bits(hashlib.sha256(seed + nonce.encode()).digest()) >= bits:
            return nonce
    raise AssertionError("no nonce")


def failing_nonce(challenge: str, address: str, bits: int) -> str:
    seed = proof_of_work_seed(challenge, address)
    for n in range(2**32):
        nonce = f"{n:08x}"
        if leading_zero_bits(hashlib.sha256(seed + nonce.encode()).digest()) < bits:
            return nonce
    raise AssertionError("no nonce")


def hidden(page: str, name: str) -> str:
    match = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', page)
    assert match, f"no hidden field {name}"
    return unescape(match[1])


def text_of(page: str) -> str:
    """The page's visible words, one space between them."""
    body = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", page)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", body)).split())


def local(url: str, base: str) -> str:
    """A link made for the public URL, pointed at the test server."""
    assert url.startswith(PUBLIC), url
    return base + url.removeprefix(PUBLIC)


class Visitor:
    """A browser without JavaScript: keeps cookies, fills forms, and solves the proof of
    work in Python."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str) -> tuple[int, str]:
        url = path if path.startswith("http") else self.base + path
        async with self.session.get(url, allow_redirects=False) as response:
            return response.status, await response.text()

    async def post(self, path: str, data: list[tuple[str, str]]) -> tuple[int, str]:
        url = path if path.startswith("http") else self.base + path
        async with self.session.post(url, data=data, allow_redirects=False) as response:
            return response.status, await response.text()

    async def subscribe(
        self,
        address: str,
        *,
        language: str = "en",
        components: list[str] | None = None,
        nonce: str | None = None,
        solved: bool = True,
        page: str | None = None,
    ) -> tuple[int, str]:
        """Fill the form (`page`, or a new one) and send it."""
        if page is None:
            status, page = await self.get("/subscribe")
            assert status == 200
        form = hidden(page, "form")
        bits = int(re.search(r'data-bits="(\d+)"', page)[1])  # type: ignore[index]
        if nonce is None and solved:
            nonce = solve(form, address, bits)
        fields = [
            ("form", form),
            ("ui", "en"),
            ("nonce", nonce or ""),
            ("address", address),
            ("language", language),
        ]
        fields += [("components", c) for c in (components or list(COMPONENTS))]
        return await self.post("/subscribe", fields)

    async def verify(self, page: str, code: str) -> tuple[int, str]:
        fields = [
            ("form", hidden(page, "form")),
            ("ui", hidden(page, "ui")),
            ("pending", hidden(page, "pending")),
            ("code", code),
        ]
        return await self.post("/subscribe/verify", fields)


@pytest.fixture
async def visitors() -> AsyncIterator[list[Visitor]]:
    made: list[Visitor] = []
    yield made
    for visitor in made:
        await visitor.close()


def visitor(visitors: list[Visitor], base: str) -> Visitor:
    made = Visitor(base)
    visitors.append(made)
    return made


def confirmation_link(smtp: FakeSmtp, address: str) -> str:
    mail = smtp.to(address)[-1].message
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    match = re.search(rf"{re.escape(PUBLIC)}/subscribe/confirm\?token=\S+", text)
    assert match, text
    return match[0]


def code_sent(twilio: FakeTwilio, number: str) -> str:
    body = twilio.messages_to(number)[-1].body
    match = re.search(r"\b(\d{6})\b", body)
    assert match, body
    return match[1]


def api_down(status: IncidentStatus = IncidentStatus.INVESTIGATING) -> UpdateRequest:
    return UpdateRequest(
        status=status,
        title="API down",
        components={"api": ComponentState.MAJOR_OUTAGE},
        fields={"summary": "API calls fail", "summary.fr": "Les appels à l'API échouent"},
        actor="test",
    )


async def publish(b: Broadcaster, request: UpdateRequest, incident: int | None = None) -> int:
    result = await b.publish(request, incident)
    await asyncio.wait_for(b.wait([result.update.id]), timeout=20)
    return result.incident.id


def updates_to(smtp: FakeSmtp, address: str) -> list[EmailMessage]:
    """Emails to `address` that are updates (not confirmations)."""
    return [
        m.message
        for m in smtp.to(address)
        if not str(m.message["Subject"]).startswith(("Confirm", "Confirmez"))
    ]


# -- email: double opt-in ------------------------------------------------------------------


async def test_email_double_opt_in_then_updates_carry_the_manage_link_and_one_click(
    smtp: FakeSmtp,
    make_broadcaster: MakeBroadcaster,
    visitors: list[Visitor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    b = await open_broadcaster(make_broadcaster, smtp, serve={"access_log": True})
    async with serving(b) as base:
        ana = visitor(visitors, base)
        # The status page leads to the form, in the page's language.
        _, status_page = await ana.get("/fr/")
        assert "/subscribe?lang=fr" in status_page and "Recevoir les mises à jour" in status_page
        status, page = await ana.subscribe(ANA, language="fr", components=["api"])
        assert status == 200
        assert "Check your inbox" in text_of(page)
        (confirmation,) = smtp.to(ANA)
        assert confirmation.message["Subject"] == "Confirmez votre abonnement à Service status"
        assert confirmation.message["List-Unsubscribe"] is None  # not subscribed yet

        # Pending: nobody is subscribed, and an update reaches nobody.
        assert await b.audience.list() == []
        incident = await publish(b, api_down())
        assert updates_to(smtp, ANA) == []

        status, page = await ana.get(local(confirmation_link(smtp, ANA), base))
        assert status == 200 and "Vous êtes abonné" in text_of(page)
        (subscriber,) = await b.audience.list()
        assert (subscriber.email, subscriber.language, subscriber.components) == (
            ANA,
            "fr",
            ["api"],
        )
        assert subscriber.channels == {"email": True}
        # The link again: already used, nothing changes.
        status, page = await ana.get(local(confirmation_link(smtp, ANA), base))
        assert status == 200 and "Déjà confirmé" in text_of(page)

        await publish(b, api_down(IncidentStatus.IDENTIFIED), incident)
        (update,) = updates_to(smtp, ANA)
        header = re.fullmatch(
            rf"<({re.escape(PUBLIC)}/manage/([^/>]+))/unsubscribe>", str(update["List-Unsubscribe"])
        )
        assert header, update["List-Unsubscribe"]
        manage_url, token = header[1], header[2]
        assert Tokens(SECRET).read("manage", token, max_age=None)[0] == subscriber.id
        assert update["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        text = update.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        html = update.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert f"Gérer ou arrêter ces e-mails\u00a0: {manage_url}" in text
        assert f'<a href="{manage_url}">' in html

        # RFC 8058 one-click: a POST from the mail provider, no cookie, no page.
        async with (
            aiohttp.ClientSession() as provider,
            provider.post(
                local(f"{manage_url}/unsubscribe", base),
                data={"List-Unsubscribe": "One-Click"},
            ) as response,
        ):
            assert response.status == 200 and await response.read() == b""
        assert (await b.audience.get(subscriber.id)).channels == {"email": False}
        await publish(b, api_down(IncidentStatus.RESOLVED), incident)
        assert len(updates_to(smtp, ANA)) == 1

    # No address in any line the server logged (masked ones only), access lines included.
    logged = [r for r in caplog.records if not r.name.startswith(("broadcaster.sandbox", "mail"))]
    assert any(r.name == "uvicorn.access" for r in logged)
    assert any("a•••@example.com" in r.getMessage() for r in logged)
    for record in logged:
        assert ANA not in record.getMessage() and ANA not in str(vars(record)), record


async def test_expired_and_forged_confirmation_links_are_refused(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, visitors: list[Visitor]
) -> None:
    b = await open_broadcaster(make_broadcaster, smtp)
    async with serving(b) as base:
        ana = visitor(visitors, base)
        assert (await ana.subscribe(ANA))[0] == 200
        link = confirmation_link(smtp, ANA)
        token = link.split("token=", 1)[1]
        payload, _ = Tokens(SECRET).read("confirm-email", token, max_age=None)

        # Signed 49 hours ago: past confirm_hours (48).
        old = Tokens(SECRET, now=lambda: time.time() - 49 * 3600).sign("confirm-email", payload)
        status, page = await ana.get(f"/subscribe/confirm?token={old}")
        assert status == 410 and "This link has expired" in text_of(page)
        # Another key, a truncated token, a manage token: not ours, not this purpose.
        for forged in (
            Tokens("another key entirely").sign("confirm-email", payload),
            token[:-2],
            Tokens(SECRET).sign("manage", 1),
        ):
            status, page = await ana.get(f"/subscribe/confirm?token={forged}")
            assert status == 400 and "This link does not work" in text_of(page)
        assert await b.audience.list() == []

        status, _ = await ana.get(local(link, base))
        assert status == 200
        assert [s.email for s in await b.audience.list()] == [ANA]


async def test_an_address_already_subscribed_gets_the_same_answer_and_message(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, visitors: list[Visitor]
) -> None:
    b = await open_broadcaster(make_broadcaster, smtp)
    await b.audience.add(NewSubscriber(email=ANA, language="en"), source="test")
    async with serving(b) as base:
        known = await visitor(visitors, base).subscribe(ANA)
        new = await visitor(visitors, base).subscribe(BOB)
    assert known[0] == new[0] == 200
    assert known[1].replace(ANA, "X") == new[1].replace(BOB, "X")
    mails = [smtp.to(ANA)[-1].message, smtp.to(BOB)[-1].message]
    assert mails[0]["Subject"] == mails[1]["Subject"]
    bodies = [m.get_body(("plain",)).get_content() for m in mails]  # type: ignore[union-attr]
    known_body, new_body = (re.sub(r"token=\S+", "", body) for body in bodies)
    assert known_body == new_body


# -- SMS: opt-in by code -------------------------------------------------------------------


async def test_sms_code_five_wrong_codes_lock_it_and_the_right_code_subscribes(
    smtp: FakeSmtp,
    twilio: FakeTwilio,
    make_broadcaster: MakeBroadcaster,
    visitors: list[Visitor],
) -> None:
    b = await open_broadcaster(make_broadcaster, smtp, twilio)
    async with serving(b) as base:
        anne = visitor(visitors, base)
        status, page = await anne.subscribe("+33 6 12 34 56 78", language="fr")
        assert status == 200 and "Enter the code" in text_of(page)
        assert "+33612345678" in text_of(page)
        (message,) = twilio.messages_to(ANNE_SMS)
        assert message.status_callback is None  # not an update: nothing tracks it
        assert message.validity_period == 600  # a code is not delivered after it expired
        code = code_sent(twilio, ANNE_SMS)
        assert "Service status" in message.body
        wrong = "000000" if code != "000000" else "111111"
        for left in (4, 3, 2, 1):
            status, answer = await anne.verify(page, wrong)
            assert status == 422 and f"Attempts left: {left}." in text_of(answer)
        status, answer = await anne.verify(page, wrong)
        assert status == 403 and "Too many wrong codes" in text_of(answer)
        status, answer = await anne.verify(page, code)  # locked: even the right one
        assert status == 403
        assert await b.audience.list() == []

        # A new code, and this time the right one.
        status, page = await anne.subscribe(ANNE_SMS, language="fr", components=["app"])
        assert status == 200
        status, answer = await anne.verify(page, " ".join(code_sent(twilio, ANNE_SMS)))
        assert status == 200 and "You are subscribed" in text_of(answer)
        (subscriber,) = await b.audience.list()
        assert (subscriber.phone, subscriber.language, subscriber.components) == (
            ANNE_SMS,
            "fr",
            ["app"],
        )
        assert subscriber.channels == {"sms": True}
        status, again = await anne.verify(page, code_sent(twilio, ANNE_SMS))
        assert status == 200 and "Already confirmed" in text_of(again)


async def test_sms_to_a_country_not_allowed_or_a_premium_number_is_refused(
    smtp: FakeSmtp,
    twilio: FakeTwilio,
    make_broadcaster: MakeBroadcaster,
    visitors: list[Visitor],
) -> None:
    b = await open_broadcaster(make_broadcaster, smtp, twilio)
    async with serving(b) as base:
        someone = visitor(visitors, base)
        status, page = await someone.subscribe(US_SMS)
        assert status == 422
        assert "We cannot send text messages to numbers of this country" in text_of(page)
        assert hidden(page, "form")  # the form again, filled as it was
        assert US_SMS in page
        status, page = await someone.subscribe("+33899123456")  # premium rate
        assert status == 422 and "only send text messages to mobile numbers" in text_of(page)
        status, page = await someone.subscribe("not a number")
        assert status == 422 and "not a mobile number we can text" in text_of(page)
    assert twilio.messages == []


async def test_daily_cap_on_sms_codes_holds_across_a_restart(
    smtp: FakeSmtp,
    twilio: FakeTwilio,
    make_broadcaster: MakeBroadcaster,
    visitors: list[Visitor],
) -> None:
    first = await open_broadcaster(make_broadcaster, smtp, twilio, sms_codes_per_day=2)
    async with serving(first) as base:
        for number in (ANNE_SMS, BOB_SMS):
            assert (await visitor(visitors, base).subscribe(number))[0] == 200
    await first.close()

    again = await open_broadcaster(make_broadcaster, smtp, twilio, sms_codes_per_day=2)
    async with serving(again) as base:
        status, page = await visitor(visitors, base).subscribe("+33611223344")
        assert status == 503 and "paused until tomorrow" in text_of(page)
        # Email is not capped by it.
        assert (await visitor(visitors, base).subscribe(ANA))[0] == 200
    assert len(twilio.messages) == 2


async def test_confirmation_messages_per_address_are_limited_per_day(
    smtp: FakeSmtp,
    twilio: FakeTwilio,
    make_broadcaster: MakeBroadcaster,
    visitors: list[Visitor],
) -> None:
    b = await open_broadcaster(make_broadcaster, smtp, twilio, pending_limit_per_address_per_day=2)
    async with serving(b) as base:
        for address in (ANA, "Ana+status@EXAMPLE.com"):  # the same mailbox, written otherwise
            assert (await visitor(visitors, base).subscribe(address))[0] == 200
        status, page = await visitor(visitors, base).subscribe(ANA)
        assert status == 429 and "Too many confirmation messages" in text_of(page)
        assert len(smtp.received) == 2
        for number in (ANNE_SMS, "+33 612 345 678"):
            assert (await visitor(visitors, base).subscribe(number))[0] == 200
        status, _ = await visitor(visitors, base).subscribe(ANNE_SMS)
        assert status == 429
        assert len(twilio.messages_to(ANNE_SMS)) == 2
        assert (await visitor(visitors, base).subscribe(BOB))[0] == 200  # others go on


# -- what the form demands -------------------------------------------------------------------


async def test_proof_of_work_missing_or_wrong_is_refused_and_right_is_accepted(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, visitors: list[Visitor]
) -> None:
    b = await open_broadcaster(make_broadcaster, smtp, proof_of_work_bits=12)
    async with serving(b) as base:
        ana = visitor(visitors, base)
        status, page = await ana.subscribe(ANA, solved=False)
        assert status == 400 and "did not pass" in text_of(page)
        status, form_page = await ana.get("/subscribe")
        challenge = hidden(form_page, "form")
        assert 'data-bits="12"' in form_page
        wrong = failing_nonce(challenge, ANA, 12)
        status, page = await ana.subscribe(ANA, nonce=wrong, page=form_page)
        assert status == 400
        # Solved for another address: no good for this one.
        status, page = await ana.subscribe(ANA, nonce=solve(challenge, BOB, 12), page=form_page)
        assert status == 400
        assert smtp.received == []
        status, page = await ana.subscribe(ANA)  # solved for this form and address
        assert status == 200 and len(smtp.to(ANA)) == 1


async def test_the_form_needs_its_cookie_and_its_token(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, visitors: list[Visitor]
) -> None:
    b = await open_broadcaster(make_broadcaster, smtp, proof_of_work_bits=0)
    async with serving(b) as base:
        status, page = await visitor(visitors, base).get("/subscribe")
        fields = [("form", hidden(page, "form")), ("address", ANA), ("components", "api")]
        # Another site's page posting to us: the SameSite cookie does not come along.
        async with (
            aiohttp.ClientSession() as elsewhere,
            elsewhere.post(f"{base}/subscribe", data=fields) as response,
        ):
            assert response.status == 403
            assert "did not send this form's cookie back" in text_of(await response.text())
        forged = [("form", Tokens("not our key").sign("form", {"c": "x", "b": 0}))]
        status, page = await visitor(visitors, base).post("/subscribe", forged + fields[1:])
        assert status == 403
        assert smtp.received == []


async def test_subscribe_posts_spend_the_per_address_inbound_limit_and_links_do_not(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, visitors: list[Visitor]
) -> None:
    b = await open_broadcaster(
        make_broadcaster,
        smtp,
        serve={"rate_limit_per_ip": {"inbound": {"rate": "1/h", "burst": 3}}},
        proof_of_work_bits=0,
    )
    subscriber = await b.audience.add(NewSubscriber(email=BOB), source="test")
    manage = b.channels["email"].context.manage_url
    assert manage is not None
    one_click = str(manage(str(subscriber.id))) + "/unsubscribe"
    async with serving(b) as base:
        someone = visitor(visitors, base)
        for _ in range(4):  # a signed link is a credential: it spends nothing
            status, _ = await someone.post(local(one_click, base), [])
            assert status == 200
        for address in (ANA, "x", "y"):  # accepted or not, each POST spends
            status, _ = await someone.subscribe(address)
            assert status in (200, 422)
        status, body = await someone.post("/subscribe", [("address", "z")])
        assert status == 429 and "too many requests" in body
        status, _ = await someone.get("/subscribe")  # the page is on the site's limit
        assert status == 200


async def test_pages_are_absent_when_self_service_is_off(
    make_broadcaster: MakeBroadcaster,
) -> None:
    b = await make_broadcaster({"status-page": BANNER})
    async with serving(b, dispatch=False) as base, aiohttp.ClientSession() as session:
        for path in ("/subscribe", "/manage/abc"):
            async with session.get(base + path) as response:
                assert response.status == 404
        async with session.get(base + "/") as response:
            assert "/subscribe" not in await response.text()


# -- manage ---------------------------------------------------------------------------------


async def test_manage_page_changes_components_and_language_then_stops_everything(
    smtp: FakeSmtp,
    twilio: FakeTwilio,
    make_broadcaster: MakeBroadcaster,
    visitors: list[Visitor],
) -> None:
    b = await open_broadcaster(make_broadcaster, smtp, twilio)
    ana = await b.audience.add(
        NewSubscriber(email=ANA, phone=ANNE_SMS, language="en"), source="test"
    )
    manage = b.channels["email"].context.manage_url
    assert manage is not None
    async with serving(b) as base:
        page_url = local(str(manage(str(ana.id))), base)
        person = visitor(visitors, base)
        status, page = await person.get(page_url)
        assert status == 200
        words = text_of(page)
        assert "Your status updates" in words
        assert "By email to a•••@example.com" in words and ANA not in page
        assert "By text message to +336•••••78" in words
        fields = [
            ("form", hidden(page, "form")),
            ("ui", "en"),
            ("channels", "email"),  # SMS unchecked: stopped
            ("language", "fr"),
            ("components", "api"),
            ("action", "save"),
        ]
        status, page = await person.post(page_url, fields)
        assert status == 200 and "Your choices are saved." in text_of(page)
        changed = await b.audience.get(ana.id)
        assert (changed.language, changed.components) == ("fr", ["api"])
        assert changed.channels == {"email": True, "sms": False}
        # Texts stopped cannot be turned back on from a link (that needs a new code).
        status, page = await person.get(page_url)
        assert '<html lang="fr"' in page  # the page now speaks their language
        status, page = await person.get(page_url + "?lang=en")
        assert "Text messages to +336•••••78 are stopped" in text_of(page)
        again = [*fields[:2], ("channels", "sms"), ("components", "api")]
        status, page = await person.post(page_url, again)
        assert status == 200
        assert (await b.audience.get(ana.id)).channels == {"email": False, "sms": False}

        status, page = await person.get(page_url + "?lang=fr")
        assert "Vos mises à jour" in text_of(page)
        fields = [("form", hidden(page, "form")), ("ui", "fr"), ("action", "unsubscribe")]
        status, page = await person.post(page_url, fields)
        assert status == 200 and "Vous ne recevrez plus de messages" in text_of(page)

        # A GET of the one-click URL only shows the page; a forged link is refused.
        status, _ = await person.get(page_url + "/unsubscribe")
        assert status == 303
        forged = page_url[:-3] + "abc"
        status, page = await person.get(forged)
        assert status == 404 and "This link does not work" in text_of(page)


async def test_a_manage_link_of_an_erased_subscriber_does_not_open_a_later_ones_page(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, visitors: list[Visitor]
) -> None:
    """An erased subscriber's id is never given again (SQLite would, without
    AUTOINCREMENT), and their old link opens nobody's page."""
    b = await open_broadcaster(make_broadcaster, smtp)
    first = await b.audience.add(NewSubscriber(email=ANA), source="test")
    old = Tokens(SECRET, now=lambda: time.time() - 3600).sign("manage", first.id)
    await b.audience.erase(first.id)
    second = await b.audience.add(NewSubscriber(email=BOB), source="test")
    assert second.id > first.id
    async with serving(b) as base:
        status, _ = await visitor(visitors, base).get(f"/manage/{old}")
        assert status == 404


# -- the store, on SQLite and PostgreSQL -----------------------------------------------------


async def test_store_caps_counts_and_codes_on_every_backend(store_url: str) -> None:
    from datetime import timedelta

    from broadcaster.models import AddressKind
    from broadcaster.store import Store
    from broadcaster.store.self_service import (
        SMS_CODES_COUNT,
        LimitReached,
        SelfServiceStore,
    )
    from broadcaster.store.tables import utcnow

    store = await Store.open(store_url)
    try:
        rows = SelfServiceStore(store)

        async def reserve(number: str, nonce: str) -> int:
            pending = await rows.reserve(
                kind=AddressKind.PHONE,
                address=number,
                address_key=number,
                nonce=nonce,
                language="fr",
                components=None,
                code_hash=f"hash-{nonce}",
                lifetime=timedelta(minutes=10),
                per_address=2,
                sms_cap=3,
            )
            return pending.id

        first = await reserve(ANNE_SMS, "n1")
        await reserve(ANNE_SMS, "n2")
        with pytest.raises(LimitReached) as refused:
            await reserve(ANNE_SMS, "n3")
        assert refused.value.which == "address"
        await reserve(BOB_SMS, "n4")
        with pytest.raises(LimitReached) as refused:
            await reserve("+33611223344", "n5")
        assert refused.value.which == "sms"
        # Refused ones are not counted: three codes went out today.
        assert await rows.count(SMS_CODES_COUNT, utcnow().date()) == 3

        channels = {AddressKind.PHONE: ["sms"]}
        wrong = await rows.confirm(first, "n1", channels, code_hash="nope", max_attempts=2)
        assert (wrong.outcome, wrong.attempts_left) == ("wrong", 1)
        assert (await rows.confirm(first, "other", channels, code_hash="hash-n1")).outcome == (
            "missing"
        )
        done = await rows.confirm(first, "n1", channels, code_hash="hash-n1", max_attempts=2)
        assert done.outcome == "confirmed" and done.subscriber_id is not None
        again = await rows.confirm(first, "n1", channels, code_hash="hash-n1", max_attempts=2)
        assert (again.outcome, again.subscriber_id) == ("used", done.subscriber_id)
    finally:
        await store.close()


# -- configuration -------------------------------------------------------------------------


def test_self_service_needs_a_secret_and_a_public_url(tmp_path: Path) -> None:
    from broadcaster.config import load_settings

    config = tmp_path / "broadcaster.toml"
    serve = '[serve]\npublic_url = "https://s.example"\n'
    config.write_text(serve + "[subscribers]\nself_service = true\n")
    with pytest.raises(ConfigError, match="self_service needs secret"):
        load_settings(config)
    config.write_text('[subscribers]\nself_service = true\nsecret = {env = "X"}\n')
    with pytest.raises(ConfigError, match=r"needs serve\.public_url"):
        load_settings(config)
    config.write_text(
        serve + '[subscribers]\nself_service = true\nsecret = {env = "X"}\n'
        'sms_countries = ["fr", "FRA"]\n'
    )
    with pytest.raises(ConfigError, match="'FRA' is not an ISO country code"):
        load_settings(config)


async def test_doctor_names_a_missing_secret_and_emails_then_carry_no_manage_link(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUBSCRIBE_TEST_SECRET")
    b = await open_broadcaster(make_broadcaster, smtp)
    check = next(c for c in await b.doctor() if c.subject == "self-service")
    assert not check.ok and "SUBSCRIBE_TEST_SECRET" in check.detail
    manage = b.channels["email"].context.manage_url
    assert manage is not None and manage("1") is None
    async with (
        serving(b, dispatch=False) as base,
        aiohttp.ClientSession() as session,
        session.get(f"{base}/subscribe") as response,
    ):
        assert response.status == 503
        assert "not available right now" in text_of(await response.text())


# -- in a browser ----------------------------------------------------------------------------


async def test_the_manage_page_names_telegram_and_webhook_subscriptions_as_such(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, visitors: list[Visitor]
) -> None:
    token = {"env": "SUBSCRIBE_TEST_SECRET"}  # any secret: nothing is sent to Telegram here
    b = await make_broadcaster(
        {
            "status-page": BANNER,
            "email": email_channel(smtp),
            "telegram-dm": {"type": "telegram", "token": token, "subscribers": True},
            "hooks": {
                "type": "webhook",
                "subscribers": True,
                "allow_http": True,
                "allow_networks": ["127.0.0.0/8"],
            },
        },
        components=COMPONENTS,
        serve={"public_url": PUBLIC, "site_cache_seconds": 0},
        subscribers=subscribers(),
    )
    ana = await b.audience.add(
        NewSubscriber(
            email=ANA,
            telegram="123456789",
            webhook_url="http://127.0.0.1:9/hooks/secret-token",
            language="en",
        ),
        source="test",
    )
    await b.audience.set_subscription(ana.id, "telegram-dm", subscribed=False, source="test")
    manage = b.channels["email"].context.manage_url
    assert manage is not None
    async with serving(b) as base:
        status, page = await visitor(visitors, base).get(local(str(manage(str(ana.id))), base))
    assert status == 200
    words = text_of(page)
    assert "By email to a•••@example.com" in words
    assert "To your webhook at http://127.0.0.1:9/•••" in words
    assert "Telegram messages are stopped. To receive them again, send /subscribe" in words
    assert "text message" not in words and "secret-token" not in page and "123456789" not in page


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from tests.test_browser import CHROMIUM, sync_playwright

    require(
        CHROMIUM is not None and Path(CHROMIUM).exists(),
        "Chromium is not installed (apt-get install chromium)",
    )
    require(sync_playwright is not None, "playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


def test_a_person_subscribes_in_a_browser_which_solves_the_proof_of_work(
    chromium: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import expect

    from tests.test_browser import StatusServer, screenshot

    with FakeSmtp() as smtp:
        settings = Settings(
            channels={"status-page": BANNER, "email": email_channel(smtp)},
            config_path=tmp_path / "broadcaster.toml",
            store=f"sqlite:///{tmp_path}/broadcaster.db",
            dispatch={"poll_seconds": 0.05, "lease_seconds": 5},
            page_title="Voltcharge status",
            components={"app": "Mobile app", "chargers": "Chargers"},
            serve={"site_cache_seconds": 0, "public_url": PUBLIC},
            subscribers={"self_service": True, "secret": {"env": "SUBSCRIBE_TEST_SECRET"}},
        )
        assert settings.subscribers.proof_of_work_bits == 18  # the default, solved in JS
        with StatusServer(settings) as server:
            context = chromium.new_context(locale="fr-FR")
            context.set_default_timeout(20_000)
            page = context.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(f"{server.base}/subscribe")
            expect(page.locator("html")).to_have_attribute("lang", "fr")
            expect(page.get_by_role("heading", level=1)).to_have_text("Recevoir les mises à jour")
            page.get_by_label("Adresse e-mail").fill(ANA)
            page.get_by_label("Chargers").uncheck()
            page.get_by_label("Langue des messages").select_option("en")
            screenshot(page, "subscribe-form.png")
            started = time.monotonic()
            page.get_by_role("button", name="S'abonner").click()
            expect(page.get_by_role("heading", level=1)).to_have_text(
                "Consultez votre boîte de réception"
            )
            solved_in = time.monotonic() - started
            assert solved_in < 15, f"the proof of work took {solved_in:.1f} s"

            link = local(confirmation_link(smtp, ANA), server.base)
            page.goto(link)
            expect(page.get_by_role("heading", level=1)).to_have_text("You are subscribed")
            page.get_by_role("link", name="Change or stop them at any time").click()
            expect(page.get_by_role("heading", level=1)).to_have_text("Your status updates")
            expect(page.get_by_label("Chargers")).not_to_be_checked()
            expect(page.get_by_label("Mobile app")).to_be_checked()
            screenshot(page, "manage-page.png")
            context.close()
            assert problems == [], problems  # the CSP lets the inline script run, nothing else
            subscribers = server.run(lambda b: b.audience.list())
    assert [(s.email, s.language, s.components) for s in subscribers] == [(ANA, "en", ["app"])]
