"""The email channel: the real aiosmtplib client against a real SMTP server (aiosmtpd) on
127.0.0.1, driven through Broadcaster.publish and wait like any delivery."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from broadcaster.core import Broadcaster, PublishResult
from broadcaster.models import (
    ChannelProgress,
    DeliveryState,
    IncidentStatus,
    NewSubscriber,
    Subscriber,
    UpdateRequest,
)
from broadcaster.sandbox.smtp import FakeSmtp, SmtpReply
from channels.base import Message, Recipient
from channels.email import EmailChannel, html_body, message_id_for
from tests.conftest import MakeBroadcaster

FROM = "Acme Status <status@acme.com>"
UNSUBSCRIBE = "https://status.acme.com/unsubscribe?s={subscriber}"
PASSWORD = "correct horse battery staple"


@pytest.fixture
async def smtp() -> AsyncIterator[FakeSmtp]:
    async with FakeSmtp() as fake:
        yield fake


def email_channel(fake: FakeSmtp | None, **extra: Any) -> dict[str, Any]:
    """An email channel config pointed at the fake, plain SMTP, with fast retries."""
    return {
        "type": "email",
        "host": "127.0.0.1",
        "port": fake.port if fake is not None else 1,
        "security": "none",
        "from_address": FROM,
        "languages": ["en", "fr"],
        "helo_hostname": "broadcaster.test",
        "timeout_seconds": 5,
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


def opening(**extra: Any) -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title="Payments <EU> fail",
        fields={"summary": "Card payments fail for some users & merchants"},
        actor="test",
        **extra,
    )


def follow_up(status: IncidentStatus) -> UpdateRequest:
    return UpdateRequest(status=status, fields={"summary": "A bad deploy."}, actor="test")


async def subscribe(b: Broadcaster, address: str, language: str = "en") -> Subscriber:
    return await b.audience.add(NewSubscriber(email=address, language=language), source="test")


async def publish_and_wait(
    b: Broadcaster, request: UpdateRequest, incident: int | None = None
) -> tuple[PublishResult, list[ChannelProgress]]:
    result = await b.publish(request, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result, progress


def counts(progress: list[ChannelProgress], channel: str = "email") -> dict[DeliveryState, int]:
    return next(p.counts for p in progress if p.channel == channel)


def parts(message: EmailMessage) -> tuple[str, str]:
    """(text, html) of a multipart/alternative message, with line ends as Python's
    (SMTP's are CRLF)."""
    assert message.get_content_type() == "multipart/alternative"
    text_part, html_part = message.iter_parts()
    assert text_part.get_content_type() == "text/plain"
    assert html_part.get_content_type() == "text/html"
    text, html = text_part.get_content(), html_part.get_content()
    return text.replace("\r\n", "\n"), html.replace("\r\n", "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_each_subscriber_gets_one_multipart_email_in_their_language(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {"email": email_channel(smtp, unsubscribe_url=UNSUBSCRIBE)},
        status_page_url="https://status.acme.com/incidents/1",
    )
    ana = await subscribe(b, "ana@example.com", "en")
    zoe = await subscribe(b, "zoe@example.com", "fr")
    before = datetime.now(UTC).replace(microsecond=0)
    result, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 2}
    render = (await b.store.renders(result.update.id))["email"]
    deliveries = {d.recipient: d for d in await b.deliveries(result.incident.id)}
    for subscriber, language in ((ana, "en"), (zoe, "fr")):
        (mail,) = smtp.to(str(subscriber.email))
        assert mail.mail_from == "status@acme.com"
        assert mail.rcpt_tos == (subscriber.email,)
        message = mail.message
        variant = render.variant(language)
        assert variant.language == language and variant.subject
        text, html = parts(message)
        assert text == variant.text + "\n"  # the rendered variant, exactly
        assert "Payments <EU> fail" in text
        assert "Payments &lt;EU&gt; fail" in html and "<EU>" not in html
        assert "&amp; merchants" in html
        assert '<a href="https://status.acme.com/incidents/1">' in html
        delivery = deliveries[str(subscriber.id)]
        assert delivery.state is DeliveryState.SENT  # accepted by SMTP, not delivered
        assert message["Message-ID"] == f"<{delivery.delivery_key}@acme.com>"
        assert delivery.provider_id == message["Message-ID"]
        assert message["Subject"] == variant.subject
        assert message["From"] == FROM
        assert message["To"] == subscriber.email
        sent_at = parsedate_to_datetime(str(message["Date"]))
        assert before <= sent_at <= datetime.now(UTC) + timedelta(seconds=1)
        assert message["List-Unsubscribe"] == (
            f"<https://status.acme.com/unsubscribe?s={subscriber.id}>"
        )
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert message["Auto-Submitted"] == "auto-generated"
        assert message["Content-Language"] == language
        assert message["In-Reply-To"] is None and message["References"] is None
    assert str(smtp.to("zoe@example.com")[0].message["Subject"]).startswith("Enquête")


async def test_followups_thread_under_the_first_email(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"email": email_channel(smtp)})
    await subscribe(b, "ana@example.com")
    await subscribe(b, "bob@example.com")
    first, _ = await publish_and_wait(b, opening())
    for status in (IncidentStatus.IDENTIFIED, IncidentStatus.RESOLVED):
        _, progress = await publish_and_wait(b, follow_up(status), first.incident.id)
        assert counts(progress) == {DeliveryState.SENT: 2}
    for address in ("ana@example.com", "bob@example.com"):
        opened, identified, resolved = (m.message for m in smtp.to(address))
        root, middle = opened["Message-ID"], identified["Message-ID"]
        assert len({root, middle, resolved["Message-ID"]}) == 3
        assert identified["In-Reply-To"] == root
        assert identified["References"] == root
        assert resolved["In-Reply-To"] == middle
        assert resolved["References"] == f"{root} {middle}"
        assert str(resolved["Subject"]).startswith("Resolved")
        # No unsubscribe_url: a mailto: to the sender, and no one-click promise.
        assert opened["List-Unsubscribe"] == "<mailto:status@acme.com?subject=unsubscribe>"
        assert opened["List-Unsubscribe-Post"] is None
    ana, bob = smtp.to("ana@example.com")[0], smtp.to("bob@example.com")[0]
    assert ana.message["Message-ID"] != bob.message["Message-ID"]


async def test_451_and_452_are_retried_then_sent_with_the_same_message_id(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    smtp.reply("ana@example.com", SmtpReply(451, "4.3.0 Greylisted, try again later"))
    smtp.reply("bob@example.com", SmtpReply(452, "4.3.1 Insufficient storage", at="data"))
    b = await make_broadcaster({"email": email_channel(smtp)})
    await subscribe(b, "ana@example.com")
    await subscribe(b, "bob@example.com")
    result, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 2}
    for delivery in await b.deliveries(result.incident.id):
        assert delivery.attempts == 2
        assert delivery.provider_id == message_id_for(delivery.delivery_key, "acme.com")
    assert [len(smtp.to(a)) for a in ("ana@example.com", "bob@example.com")] == [1, 1]


async def test_550_fails_only_that_delivery_with_the_reason(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    smtp.reply(
        "gone@example.com",
        SmtpReply(550, "5.1.1 <gone@example.com>: Recipient address rejected: User unknown"),
    )
    b = await make_broadcaster({"email": email_channel(smtp, max_connections=1)})
    await subscribe(b, "ana@example.com")
    gone = await subscribe(b, "gone@example.com")
    await subscribe(b, "bob@example.com")
    result, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 2, DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(result.incident.id, states=[DeliveryState.FAILED])
    assert failed.recipient == str(gone.id)
    assert failed.attempts == 1  # permanent: never retried
    assert failed.last_error == (
        f"email → subscriber #{gone.id}: 550 5.1.1 <g•••@example.com>: "
        "Recipient address rejected: User unknown"
    )
    assert smtp.to("gone@example.com") == []
    # A refused recipient does not cost the session: one connection carried the rest.
    assert smtp.connections_opened == 1


async def test_bad_password_stops_the_channel_and_doctor_says_why(
    make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_TEST_PASSWORD", "wrong")
    async with FakeSmtp(security="starttls", users={"status": PASSWORD}) as fake:
        config = email_channel(
            fake,
            security="starttls",
            ca_file=str(fake.ca_file),
            username="status",
            password={"env": "SMTP_TEST_PASSWORD"},
        )
        b = await make_broadcaster({"email": config})
        for i in range(6):
            await subscribe(b, f"user{i}@example.com")
        _, progress = await publish_and_wait(b, opening())
        (email_progress,) = [p for p in progress if p.channel == "email"]
        expected = (
            "email: the server refused the login as 'status' (535 5.7.8 Authentication "
            "credentials invalid) — check username and password"
        )
        assert email_progress.broken == expected
        assert email_progress.counts == {DeliveryState.QUEUED: 6}  # none failed, none lost
        assert fake.received == []
        # One refused login, not one per message in flight: relays lock accounts out.
        assert fake.connections_opened == 1
        check = next(c for c in await b.doctor() if c.subject == "channel email")
        assert not check.ok
        assert check.detail == (
            f"{expected} — connecting to 127.0.0.1:{fake.port} (starttls) failed"
        )
        assert PASSWORD not in check.detail and "wrong" not in check.detail


async def test_starttls_login_sends_and_doctor_passes_without_sending(
    make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_TEST_PASSWORD", PASSWORD)
    async with FakeSmtp(security="starttls", require_tls=True, users={"status": PASSWORD}) as fake:
        config = email_channel(
            fake,
            security="starttls",
            ca_file=str(fake.ca_file),
            username="status",
            password={"env": "SMTP_TEST_PASSWORD"},
        )
        b = await make_broadcaster({"email": config})
        check = next(c for c in await b.doctor() if c.subject == "channel email")
        assert check.ok and check.detail == "email, ok"
        assert fake.received == [] and fake.connections_opened == 1
        await subscribe(b, "ana@example.com")
        _, progress = await publish_and_wait(b, opening())
        assert counts(progress) == {DeliveryState.SENT: 1}
        (mail,) = fake.received
        assert mail.tls and mail.login == "status"


async def test_plain_text_to_a_server_that_requires_starttls_breaks_the_channel(
    make_broadcaster: MakeBroadcaster,
) -> None:
    async with FakeSmtp(security="starttls", require_tls=True) as fake:
        b = await make_broadcaster({"email": email_channel(fake, security="none")})
        await subscribe(b, "ana@example.com")
        _, progress = await publish_and_wait(b, opening())
        (email_progress,) = [p for p in progress if p.channel == "email"]
        assert email_progress.broken == (
            f"email: 127.0.0.1:{fake.port} (none): the server requires STARTTLS or a login "
            'first (530 Must issue a STARTTLS command first) — set security = "starttls" '
            '(or "tls") and username/password'
        )
        assert email_progress.counts == {DeliveryState.QUEUED: 1}
        check = next(c for c in await b.doctor() if c.subject == "channel email")
        assert not check.ok and check.detail == email_progress.broken


async def test_implicit_tls_sends_and_an_untrusted_certificate_is_named(
    make_broadcaster: MakeBroadcaster, tmp_path: Any
) -> None:
    async with FakeSmtp(security="tls") as fake:
        trusted = email_channel(fake, security="tls", ca_file=str(fake.ca_file))
        b = await make_broadcaster({"email": trusted, "untrusted": {**trusted, "ca_file": None}})
        await subscribe(b, "ana@example.com")
        _, progress = await publish_and_wait(b, opening(channels=["email"]))
        assert counts(progress) == {DeliveryState.SENT: 1}
        (mail,) = fake.received
        assert mail.tls
        checks = {c.subject: c for c in await b.doctor()}
        assert checks["channel email"].ok
        untrusted = checks["channel untrusted"]
        assert not untrusted.ok
        assert untrusted.detail.startswith(
            f"untrusted: 127.0.0.1:{fake.port} (tls): TLS failed, the server's certificate "
            "is not trusted (self-signed certificate)"
        )


async def test_connection_refused_is_retried_then_fails_with_the_reason(
    make_broadcaster: MakeBroadcaster,
) -> None:
    port = free_port()  # nothing listens there
    config = {**email_channel(None), "port": port, "max_attempts": 2}
    b = await make_broadcaster({"email": config})
    await subscribe(b, "ana@example.com")
    result, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.FAILED: 1}
    (delivery,) = await b.deliveries(result.incident.id)
    assert delivery.attempts == 2
    assert delivery.last_error == (
        f"gave up after 2 attempt(s): email: 127.0.0.1:{port} (none): cannot connect "
        "(connection refused)"
    )
    check = next(c for c in await b.doctor() if c.subject == "channel email")
    assert not check.ok and "cannot connect (connection refused)" in check.detail


async def test_many_messages_reuse_at_most_max_connections(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"email": email_channel(smtp, max_connections=2)})
    addresses = [f"user{i:02d}@example.com" for i in range(30)]
    for address in addresses:
        await subscribe(b, address)
    _, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 30}
    assert sorted(r for m in smtp.received for r in m.rcpt_tos) == addresses
    assert 1 <= smtp.connections_opened <= 2
    assert {m.connection for m in smtp.received} <= {1, 2}


async def test_a_session_is_renewed_after_messages_per_connection(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    config = email_channel(smtp, max_connections=1, messages_per_connection=5)
    b = await make_broadcaster({"email": config})
    for i in range(12):
        await subscribe(b, f"user{i:02d}@example.com")
    _, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 12}
    assert smtp.connections_opened == 3
    per_connection = [len([m for m in smtp.received if m.connection == n]) for n in (1, 2, 3)]
    assert per_connection == [5, 5, 2]


async def test_a_connection_closed_by_the_server_is_reopened(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"email": email_channel(smtp, max_connections=1)})
    channel = b.channels["email"]
    assert isinstance(channel, EmailChannel)
    render = (await b.preview(opening())).renders[0]

    def message(n: int) -> Message:
        return Message(
            render=render,
            recipient=Recipient(id=str(n), language="en", address=f"user{n}@example.com"),
            thread=None,
            incident_id=1,
            update_id=1,
            delivery_key=f"key{n}",
        )

    await channel.start()
    try:
        await channel.send(message(1))
        await channel.send(message(2))
        smtp.drop_connections()  # the server's idle timeout
        await asyncio.sleep(0.05)
        receipt = await channel.send(message(3))  # noticed before sending, not by failing
    finally:
        await channel.close()
    assert receipt.provider_id == "<key3@acme.com>" and not receipt.delivered
    assert [m.connection for m in smtp.received] == [1, 1, 2]


async def test_an_opted_out_subscriber_gets_nothing(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"email": email_channel(smtp)})
    await subscribe(b, "ana@example.com")
    bob = await subscribe(b, "bob@example.com")
    await b.audience.set_subscription(bob.id, "email", subscribed=False, source="test")
    result, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 1}
    assert [r for m in smtp.received for r in m.rcpt_tos] == ["ana@example.com"]
    assert str(bob.id) not in [d.recipient for d in await b.deliveries(result.incident.id)]


async def test_dkim_signature_verifies(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dkim  # type: ignore[import-untyped]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    monkeypatch.setenv("DKIM_TEST_KEY", pem.decode())
    config = email_channel(
        smtp,
        unsubscribe_url=UNSUBSCRIBE,
        dkim_selector="s1",
        dkim_private_key={"env": "DKIM_TEST_KEY"},
    )
    b = await make_broadcaster({"email": config})
    await subscribe(b, "ana@example.com")
    _, progress = await publish_and_wait(b, opening())
    assert counts(progress) == {DeliveryState.SENT: 1}
    (mail,) = smtp.received
    asked: list[bytes] = []

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        asked.append(name)
        return record if name == b"s1._domainkey.acme.com." else None

    assert dkim.verify(mail.data, dnsfunc=dns)
    assert asked == [b"s1._domainkey.acme.com."]
    signature = str(mail.message["DKIM-Signature"])
    signed = re.search(r"h=([^;]+)", signature)
    assert signed is not None
    headers = {h.strip().lower() for h in signed.group(1).split(":")}
    assert {"from", "subject", "message-id", "list-unsubscribe", "list-unsubscribe-post"} <= headers
    # A changed subject no longer verifies: the signature covers it.
    assert not dkim.verify(mail.data.replace(b"Subject: ", b"Subject: FW: ", 1), dnsfunc=dns)
    check = next(c for c in await b.doctor() if c.subject == "channel email")
    assert check.ok


def test_html_copy_escapes_keeps_lines_and_links_only_http() -> None:
    text = (
        "Payments <script>alert(1)</script> fail & more\n"
        "Details: https://status.acme.com/i/1?a=1&b=2.\n"
        "\n"
        "javascript:alert(1) is not a link"
    )
    html = html_body(text, language="en", title="Investigating: <x>")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<title>Investigating: &lt;x&gt;</title>" in html
    assert (
        "<p>Payments &lt;script&gt;alert(1)&lt;/script&gt; fail &amp; more<br>\n"
        'Details: <a href="https://status.acme.com/i/1?a=1&amp;b=2">'
        "https://status.acme.com/i/1?a=1&amp;b=2</a>.</p>\n"
        "<p>javascript:alert(1) is not a link</p>"
    ) in html


async def test_a_delivery_keeps_its_message_id_across_tries(
    smtp: FakeSmtp, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"email": email_channel(smtp)})
    preview = await b.preview(opening())
    channel = b.channels["email"]
    assert isinstance(channel, EmailChannel)
    message = Message(
        render=preview.renders[0],
        recipient=Recipient(id="7", language="fr", address="zoe@example.com"),
        thread=None,
        incident_id=1,
        update_id=1,
        delivery_key="0123456789abcdef0123456789abcdef",
    )
    first, first_id = channel.compose(message)
    again, again_id = channel.compose(message)
    assert first_id == again_id == "<0123456789abcdef0123456789abcdef@acme.com>"
    assert first["Message-ID"] == again["Message-ID"] == first_id
