"""Subscriber webhooks: the signed webhook channel posting to URLs subscribers registered,
and the guard that keeps those URLs from reaching inside (server-side request forgery):
https and public addresses only unless allowed, checked at registration and at connect
time, redirects refused. Real aiohttp against a local receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
import trustme
from standardwebhooks import Webhook

from broadcaster.core import Broadcaster, PublishResult
from broadcaster.errors import ConfigError
from broadcaster.models import (
    ChannelProgress,
    Delivery,
    DeliveryState,
    IncidentStatus,
    NewSubscriber,
    Subscriber,
    UpdateRequest,
)
from broadcaster.safe_url import UnsafeUrlError
from broadcaster.sandbox import WebhookReceiver
from broadcaster.sandbox.webhook_receiver import Behaviour
from channels.webhook import WebhookChannel
from tests.conftest import MakeBroadcaster
from tests.test_api import API_TOKENS, TOKENS, Client, token_env  # noqa: F401  (autouse)
from tests.test_cli import (
    Cli,
    assert_one_line_error,
    clean_environment,  # noqa: F401  (autouse: no BROADCASTER_* from the shell)
)
from tests.test_serve import BANNER, serving
from tests.test_subscribers_api import EMAIL

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LOCAL = ["127.0.0.0/8", "::1/128"]  # where the receiver (and localhost) are
PUBLIC_IP = "93.184.215.14"  # what a stranger's host resolves to at registration
TOKEN = "s3cr3t-t0ken"  # in the path and query of URLs: never in an error or a log


def hooks(**extra: Any) -> dict[str, Any]:
    """A subscriber webhook channel, signed, with fast retries."""
    return {
        "type": "webhook",
        "subscribers": True,
        "secret": {"env": "HOOK_SECRET"},
        "languages": ["en", "fr"],
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.2,
        "max_attempts": 3,
        "rate_limit": {},
        **extra,
    }


# The local receiver is http on a loopback address: allowed here, as for the simulators.
LOCAL_HOOKS = hooks(allow_http=True, allow_networks=LOCAL)


@pytest.fixture(autouse=True)
def hook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)


@pytest.fixture
async def signed_receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(secret=SECRET) as sim:
        yield sim


def opening() -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title="Payments fail",
        fields={"summary": "Card payments fail for some users"},
        actor="test",
    )


async def subscribe(b: Broadcaster, url: str, language: str = "en") -> Subscriber:
    return await b.add_subscriber(
        NewSubscriber(webhook_url=url, language=language), actor="test", source="test"
    )


async def publish_and_wait(b: Broadcaster) -> tuple[PublishResult, ChannelProgress]:
    result = await b.publish(opening())
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result, next(p for p in progress if p.channel == "hooks")


async def by_subscriber(b: Broadcaster, result: PublishResult) -> dict[int, Delivery]:
    return {int(d.recipient): d for d in await b.deliveries(result.incident.id, channel="hooks")}


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]) -> list[str]:
    """Answer `socket.getaddrinfo` for these hosts with the next list of addresses each
    time (the last one from then on); other hosts resolve for real. Returns the hosts
    asked, in order."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(name)
        queue = answers[name]
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        port_number = int(port or 0)
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (a, port_number, 0, 0) if ":" in a else (a, port_number),
            )
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


# --- registration ------------------------------------------------------------------


REFUSED_AT_REGISTRATION = [
    ("http://hooks.example.com/in", "must be https://"),
    ("https://127.0.0.1/in", "127.0.0.1 (a loopback address) is refused"),
    ("https://localhost/in", "host 'localhost' resolves to"),
    ("https://10.1.2.3/in", "10.1.2.3 (a private address)"),
    ("https://192.168.0.10/in", "192.168.0.10 (a private address)"),
    ("https://169.254.169.254/latest/meta-data", "169.254.169.254 (a link-local address"),
    ("https://[::1]/in", "::1 (a loopback address)"),
    ("https://[::ffff:127.0.0.1]/in", "(127.0.0.1, a loopback address)"),
    ("https://[::ffff:169.254.169.254]/in", "(169.254.169.254, a link-local address"),
    ("https://[fe80::1]/in", "fe80::1 (a link-local address"),
    ("https://0.0.0.0/in", "0.0.0.0 (an unspecified address"),
    ("https://127.1/in", "'127.1' is not a canonical IP address"),
    ("https://2130706433/in", "'2130706433' is not a canonical IP address"),
    ("https://nothing.invalid/in", "host 'nothing.invalid' does not resolve"),
    # The kind of address only: an answer must not map the inside network.
    ("https://split.example/in", "host 'split.example' resolves to a private address —"),
    ("ftp://files.example.com/in", "must start with https://"),
    # Ranges Python's own tables miss or disagree on between versions.
    ("https://[64:ff9b:1::a9fe:a9fe]/in", "(169.254.169.254, a link-local address"),
    ("https://[::7f00:1]/in", "::7f00:1 (not a public address)"),
    ("https://[::ffff:0:7f00:1]/in", "(not a public address)"),
    ("https://[fec0::1]/in", "fec0::1 (not a public address)"),
    ("https://[2606:4700::1%25evil.example]/in", "an IPv6 zone id"),
]


async def test_registration_refuses_urls_not_https_or_not_public_with_one_line_reasons(
    make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One public address and one private: a single bad address is enough to refuse.
    fake_dns(monkeypatch, {"split.example": [[PUBLIC_IP, "10.0.0.7"]]})
    b = await make_broadcaster({"hooks": hooks()})
    for url, reason in REFUSED_AT_REGISTRATION:
        with pytest.raises(UnsafeUrlError) as refused:
            await subscribe(b, url)
        message = str(refused.value)
        assert reason in message, (url, message)
        assert "\n" not in message and "meta-data" not in message
    assert await b.subscribers() == []


async def test_allow_networks_accepts_those_networks_only(
    make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"partner.internal": [["10.20.0.5"]]})
    b = await make_broadcaster({"hooks": hooks(allow_networks=["10.20.0.0/16", *LOCAL])})
    for url in (
        "https://partner.internal/hooks/status",
        "https://10.20.9.9/in",
        "https://127.0.0.1:8443/in",
        "https://[::ffff:127.0.0.1]/in",  # the same address, written the IPv6 way
    ):
        subscriber = await subscribe(b, url)
        assert subscriber.webhook_url == url and subscriber.channels == {"hooks": True}
    for url, reason in (
        ("https://10.21.0.1/in", "10.21.0.1 (a private address)"),
        ("https://169.254.169.254/in", "link-local"),
        ("http://10.20.0.5/in", "must be https://"),  # allow_http is a separate switch
    ):
        with pytest.raises(UnsafeUrlError, match=re.escape(reason)):
            await subscribe(b, url)


async def test_opting_in_later_checks_the_url_like_registration(
    make_broadcaster: MakeBroadcaster,
) -> None:
    b = await make_broadcaster({"email": EMAIL, "hooks": hooks()})
    # Registered for email only: the URL was only checked for its form.
    ana = await b.add_subscriber(
        NewSubscriber(
            email="ana@example.com", webhook_url="https://127.0.0.1/in", channels=["email"]
        ),
        actor="test",
    )
    with pytest.raises(UnsafeUrlError, match="loopback"):
        await b.set_subscription(ana.id, "hooks", subscribed=True, actor="test")
    assert (await b.subscriber(ana.id)).channels == {"email": True}


async def test_api_refuses_a_private_url_with_422_and_accepts_an_allowed_one(
    make_broadcaster: MakeBroadcaster,
) -> None:
    b = await make_broadcaster(
        {"status-page": BANNER, "hooks": hooks(allow_networks=["10.20.0.0/16"])},
        serve={"api_tokens": API_TOKENS},
    )
    async with serving(b, dispatch=False) as base, aiohttp.ClientSession() as session:
        comms = Client(session, base, TOKENS["PUBLISH_TOKEN"])
        status, answer = await comms.call(
            "POST", "/v1/subscribers", {"webhook_url": "https://169.254.169.254/latest"}
        )
        assert status == 422, answer
        assert answer["detail"].startswith("webhook URL: 169.254.169.254 (a link-local")
        assert "\n" not in answer["detail"]
        status, answer = await comms.call(
            "POST", "/v1/subscribers", {"webhook_url": "https://10.20.0.5/in", "language": "fr"}
        )
        assert status == 201, answer
        assert answer["channels"] == {"hooks": True}


def test_cli_add_webhook_url_refuses_in_one_line_and_masks_the_url(tmp_path: Path) -> None:
    config = {
        "store": "sqlite:///broadcaster.db",
        "channels": {"hooks": hooks(allow_networks=["10.20.0.0/16"])},
    }
    path = tmp_path / "broadcaster.toml"
    path.write_text(tomli_w.dumps(config))
    cli = Cli(path)
    assert_one_line_error(
        cli("subscribers", "add", "--webhook-url", "http://10.20.0.5/in"), "must be https://"
    )
    assert_one_line_error(
        cli("subscribers", "add", "--webhook-url", "https://192.168.1.1/in"),
        "192.168.1.1 (a private address) is refused",
    )
    url = f"https://10.20.0.5/hooks/{TOKEN}?key={TOKEN}"
    added = cli.ok("subscribers", "add", "--webhook-url", url)
    first, secret = added.stdout.strip().splitlines()
    assert first == "added subscriber #1 (https://10.20.0.5/•••) to hooks"
    assert secret.startswith("signing secret for hooks — give it to the subscriber")
    assert secret.rsplit(": ", 1)[1].startswith("whsec_")
    (listed,) = cli.json("subscribers", "list")
    assert listed["webhook_url"] == "https://10.20.0.5/•••"
    assert listed["webhook_secrets"] is None  # handed over once, not in every listing
    (full,) = cli.json("subscribers", "list", "--full")
    assert full["webhook_url"] == url
    # A query-only URL still keeps its token out of sight.
    cli.ok("subscribers", "add", "--webhook-url", f"https://10.20.0.6?token={TOKEN}")
    listing = cli.ok("subscribers", "list").stdout
    assert TOKEN not in listing and "webhook https://10.20.0.6/•••" in listing


async def test_config_errors_say_what_to_change(make_broadcaster: MakeBroadcaster) -> None:
    cases = [
        (hooks(targets=["https://hooks.example.com/a"]), "move the targets to a channel"),
        ({"type": "webhook"}, "at least one URL is required (or set subscribers = true"),
        (
            {"type": "webhook", "targets": ["https://a.example"], "allow_networks": ["10.0.0.0/8"]},
            "allow_networks: only used with subscribers = true",
        ),
        (hooks(allow_networks=["10.0.0.1/8"]), "allow_networks"),  # host bits set
    ]
    for config, words in cases:
        with pytest.raises(ConfigError) as error:
            await make_broadcaster({"hooks": config})
        assert words in str(error.value), str(error.value)


# --- delivery ----------------------------------------------------------------------


async def test_each_subscriber_gets_the_update_signed_in_their_language(
    signed_receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"hooks": LOCAL_HOOKS})
    ana = await subscribe(b, signed_receiver.target("ana") + f"?token={TOKEN}", "en")
    zoe = await subscribe(b, signed_receiver.target("zoe"), "fr-CA")
    gone = await subscribe(b, signed_receiver.target("gone"), "en")
    signed_receiver.script("gone", Behaviour(status=410))

    result, progress = await publish_and_wait(b)

    assert progress.counts == {DeliveryState.DELIVERED: 2, DeliveryState.FAILED: 1}
    (failure,) = progress.failures
    assert failure.recipient == str(gone.id)
    assert failure.last_error == (
        f"hooks → subscriber #{gone.id}: HTTP 410 (gone: the subscriber is opted out)"
    )
    # 410 Gone is Standard Webhooks' "stop": opted out, like an SMS STOP.
    assert (await b.subscriber(gone.id)).channels == {"hooks": False}
    render = (await b.store.renders(result.update.id))["hooks"]
    deliveries = await by_subscriber(b, result)
    # Each was given their own secret at registration (never the channel's).
    secrets = {s.id: (s.webhook_secrets or {})["hooks"] for s in (ana, zoe, gone)}
    assert len(set(secrets.values())) == 3 and SECRET not in secrets.values()
    for subscriber, path, language in ((ana, "/hook/ana", "en"), (zoe, "/hook/zoe", "fr")):
        (request,) = [r for r in signed_receiver.received if r.path == path]
        # What a receiver does: verify the signature over the raw body before trusting it.
        verifier = Webhook(secrets[subscriber.id])
        payload = verifier.verify(request.raw, request.headers)
        assert payload["language"] == language
        assert payload["incident_id"] == result.incident.id
        assert payload["status"] == "investigating"
        variant = render.variant(language)
        assert payload["texts"] == {language: {"text": variant.text, "subject": variant.subject}}
        delivery = deliveries[subscriber.id]
        assert delivery.state is DeliveryState.DELIVERED and delivery.attempts == 1
        assert request.webhook_id == delivery.delivery_key
    assert render.variant("fr").text != render.variant("en").text
    # A forged body does not verify; nor does one subscriber's key verify (or forge)
    # another's updates.
    (to_ana,) = [r for r in signed_receiver.received if r.path == "/hook/ana"]
    with pytest.raises(Exception, match="signature"):
        Webhook(secrets[ana.id]).verify(
            to_ana.raw.replace(b"investigating", b"resolved"), to_ana.headers
        )
    with pytest.raises(Exception, match="signature"):
        Webhook(secrets[zoe.id]).verify(to_ana.raw, to_ana.headers)
    # The operator can hand a secret again: it is in the subscriber's export.
    exported = await b.export_subscriber(zoe.id)
    assert exported["subscriber"]["webhook_secrets"] == {"hooks": secrets[zoe.id]}
    assert (await b.subscriber(zoe.id)).webhook_secrets is None  # not in ordinary reads


async def test_a_redirect_is_refused_and_its_target_never_contacted(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"hooks": LOCAL_HOOKS})
    moved = await subscribe(b, receiver.target("moved"))
    receiver.script("moved", Behaviour(status=302, location=receiver.target("elsewhere")))

    result, progress = await publish_and_wait(b)

    assert progress.counts == {DeliveryState.FAILED: 1}
    delivery = (await by_subscriber(b, result))[moved.id]
    assert delivery.attempts == 1  # permanent: not retried
    assert delivery.last_error == (
        f"hooks → subscriber #{moved.id}: HTTP 302: redirect refused (not followed)"
    )
    assert [a.path for a in receiver.attempts] == ["/hook/moved"]


async def test_an_allowance_removed_later_stops_delivery_at_send_time(
    receiver: WebhookReceiver,
    make_broadcaster: MakeBroadcaster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registering = await make_broadcaster(
        {"hooks": hooks(allow_http=True, allow_networks=[*LOCAL, "169.254.0.0/16"])}
    )
    literal = await subscribe(registering, receiver.target("literal") + f"/{TOKEN}?k={TOKEN}")
    port = receiver.url.rsplit(":", 1)[1]
    named = await subscribe(registering, f"http://localhost:{port}/hook/named?k={TOKEN}")
    meta = await subscribe(registering, "https://169.254.169.254/latest/meta-data")
    mapped = await subscribe(registering, f"http://[::ffff:127.0.0.1]:{port}/hook/mapped")

    # The operator removes the allowances: the same store, the new config.
    b = await make_broadcaster({"hooks": hooks(allow_http=True)})
    with caplog.at_level(logging.DEBUG):
        result, progress = await publish_and_wait(b)

    assert progress.counts == {DeliveryState.FAILED: 4}
    assert receiver.attempts == []
    deliveries = await by_subscriber(b, result)
    expected = {
        literal.id: "refused: webhook URL: 127.0.0.1 (a loopback address) is refused",
        named.id: "refused at connect: host 'localhost' resolves to a loopback address",
        meta.id: "refused: webhook URL: 169.254.169.254 (a link-local address",
        mapped.id: "(127.0.0.1, a loopback address) is refused",
    }
    for subscriber_id, words in expected.items():
        delivery = deliveries[subscriber_id]
        assert delivery.attempts == 1, delivery  # permanent: never retried, never connected
        assert delivery.last_error is not None and words in delivery.last_error, delivery
        assert delivery.last_error.startswith(f"hooks → subscriber #{subscriber_id}: ")
        assert TOKEN not in delivery.last_error and "meta-data" not in delivery.last_error
    assert TOKEN not in caplog.text


async def test_dns_rebinding_is_refused_at_connect(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Public when registered; the receiver's loopback address when we connect.
    asked = fake_dns(monkeypatch, {"rebind.example": [[PUBLIC_IP], ["127.0.0.1"]]})
    port = receiver.url.rsplit(":", 1)[1]
    b = await make_broadcaster({"hooks": hooks(allow_http=True)})
    sneaky = await subscribe(b, f"http://rebind.example:{port}/hook/rebind")

    result, progress = await publish_and_wait(b)

    assert progress.counts == {DeliveryState.FAILED: 1}
    assert receiver.attempts == []
    assert asked == ["rebind.example", "rebind.example"]  # checked, then resolved to connect
    delivery = (await by_subscriber(b, result))[sneaky.id]
    assert delivery.attempts == 1
    assert delivery.last_error == (
        f"hooks → subscriber #{sneaky.id}: refused at connect: host 'rebind.example' "
        "resolves to a loopback address"
    )


async def test_only_the_allowed_addresses_of_a_name_are_connected_to(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name resolves to a refused address first, then an allowed one; something
    # listens on both. Only the allowed one is handed to aiohttp, which would otherwise
    # connect to the first.
    port = int(receiver.url.rsplit(":", 1)[1])
    async with WebhookReceiver(host="127.0.0.2", port=port) as inside:
        fake_dns(monkeypatch, {"mixed.example": [["127.0.0.2", "127.0.0.1"]]})
        b = await make_broadcaster(
            {"hooks": hooks(allow_http=True, allow_networks=["127.0.0.1/32"])}
        )
        # Registration refuses it outright: one of its addresses is refused.
        refusal = re.escape("'mixed.example' resolves to a loopback address")
        with pytest.raises(UnsafeUrlError, match=refusal):
            await subscribe(b, f"http://mixed.example:{port}/hook/mixed")
        # Registered when the name resolved to the allowed address only.
        fake_dns(monkeypatch, {"mixed.example": [["127.0.0.1"], ["127.0.0.2", "127.0.0.1"]]})
        await subscribe(b, f"http://mixed.example:{port}/hook/mixed")

        _, progress = await publish_and_wait(b)

        assert progress.counts == {DeliveryState.DELIVERED: 1}
        assert [a.path for a in receiver.attempts] == ["/hook/mixed"]
        assert inside.attempts == []


async def test_https_subscriber_urls_deliver_over_verified_tls(
    make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    ca = trustme.CA()
    served = ca.issue_cert("127.0.0.1")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.configure_cert(server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with WebhookReceiver(secret=SECRET, ssl_context=server_tls) as tls_receiver:
        assert tls_receiver.url.startswith("https://127.0.0.1:")
        b = await make_broadcaster(
            {
                "hooks": hooks(allow_networks=LOCAL, ca_file="ca.pem"),  # https only
                "untrusting": hooks(allow_networks=LOCAL, max_attempts=1),
            }
        )
        ana = await subscribe(b, tls_receiver.target("ana"))

        result, progress = await publish_and_wait(b)

        assert progress.counts == {DeliveryState.DELIVERED: 1}
        (request,) = tls_receiver.received
        assert request.path == "/hook/ana"
        Webhook((ana.webhook_secrets or {})["hooks"]).verify(request.raw, request.headers)
        # The same URL from a channel that does not trust the test CA: not delivered.
        untrusted = await b.deliveries(result.incident.id, channel="untrusting")
        assert [(d.recipient, d.state) for d in untrusted] == [(str(ana.id), DeliveryState.FAILED)]
        assert untrusted[0].last_error == (
            f"gave up after 1 attempt(s): untrusting → subscriber #{ana.id}: "
            "ClientConnectorCertificateError"
        )
        assert len(tls_receiver.received) == 1


async def test_5xx_and_timeouts_are_retried_4xx_fail_and_the_channel_keeps_going(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(WebhookChannel, "request_timeout_seconds", 0.5)
    b = await make_broadcaster({"hooks": LOCAL_HOOKS})
    flaky = await subscribe(b, receiver.target("flaky"))
    slow = await subscribe(b, receiver.target("slow"))
    missing = await subscribe(b, receiver.target("missing"))
    locked = await subscribe(b, receiver.target("locked"))
    receiver.script("flaky", Behaviour(status=503, times=1))
    receiver.script("slow", Behaviour(delay=2, times=1))
    receiver.script("missing", Behaviour(status=404))
    receiver.script("locked", Behaviour(status=401))

    result, progress = await publish_and_wait(b)

    deliveries = await by_subscriber(b, result)
    assert {s: (d.state, d.attempts) for s, d in deliveries.items()} == {
        flaky.id: (DeliveryState.DELIVERED, 2),
        slow.id: (DeliveryState.DELIVERED, 2),
        missing.id: (DeliveryState.FAILED, 1),
        locked.id: (DeliveryState.FAILED, 1),
    }
    # One subscriber's 401 is their endpoint's business, not a broken channel.
    assert progress.broken is None
    assert deliveries[locked.id].last_error == f"hooks → subscriber #{locked.id}: HTTP 401"


async def test_a_hostile_receiver_cannot_exhaust_memory_crash_a_send_or_plant_cookies(
    make_broadcaster: MakeBroadcaster, caplog: pytest.LogCaptureFixture
) -> None:
    """Answers from strangers' URLs are read a bounded amount, bytes that are not text do
    not crash the send, and a cookie one receiver sets never travels to another."""
    import gzip

    from aiohttp import web

    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB once inflated, 49 KB on the wire
    tries: dict[str, int] = {}
    cookies: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        tries[name] = tries.get(name, 0) + 1
        cookies.append(request.headers.get("Cookie"))
        if name == "bomb":
            return web.Response(body=bomb, headers={"Content-Encoding": "gzip"}, status=400)
        if name == "huge":
            return web.Response(body=b"x" * 30_000_000, status=200)
        if name == "garbled" and tries[name] == 1:
            return web.Response(
                body=b"\xff\xfe\xfd",
                status=503,
                headers={"Content-Type": "text/plain; charset=utf-8"},
            )
        response = web.Response(status=200)
        response.set_cookie("tracker", f"from-{name}")
        return response

    app = web.Application()
    app.router.add_post("/{name}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        b = await make_broadcaster({"hooks": LOCAL_HOOKS})
        people = {
            name: await subscribe(b, f"http://127.0.0.1:{port}/{name}")
            for name in ("bomb", "huge", "garbled", "plain")
        }
        result, _ = await publish_and_wait(b)
        deliveries = await by_subscriber(b, result)
    finally:
        await runner.cleanup()
    states = {name: deliveries[s.id].state for name, s in people.items()}
    assert states == {
        "bomb": DeliveryState.FAILED,  # its 400, read without inflating 50 MB
        "huge": DeliveryState.DELIVERED,
        "garbled": DeliveryState.DELIVERED,  # its 503 retried like any other
        "plain": DeliveryState.DELIVERED,
    }
    assert deliveries[people["bomb"].id].last_error == (
        f"hooks → subscriber #{people['bomb'].id}: HTTP 400"
    )
    assert tries["garbled"] == 2
    assert cookies == [None] * len(cookies)  # no receiver's cookie was ever sent back
    assert "Traceback" not in caplog.text and "UnicodeDecodeError" not in caplog.text
