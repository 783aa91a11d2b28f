"""`broadcaster serve` in operation: heartbeat, proxies, per-address limits, logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from pydantic import ValidationError

from broadcaster.config import ServeSettings
from broadcaster.core import Broadcaster
from broadcaster.logs import REDACTED, configured_secrets, log_handler
from broadcaster.sandbox import Behaviour, WebhookReceiver
from broadcaster.server.limits import TokenBuckets
from tests.conftest import MakeBroadcaster, webhook_channel
from tests.test_hooks import FIRING, TOKEN, route
from tests.test_serve import BANNER, OPENING, free_port, get, serving, wait_for

HEARTBEAT_TOKEN = "hb-4f9c2d7e-61a8-4c3b-9e0f-5d2a7b1c8e34"
METRICS_TOKEN = "scrape-me-0123456789"
CHANNEL_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# An address of 127.0.0.0/8 other than 127.0.0.1: a peer the server does not trust.
UNTRUSTED_PEER = "127.0.0.2"
TRUSTED_SENDER = "127.0.0.3"  # another address, sending with the right token


def pings(receiver: WebhookReceiver, path: str) -> int:
    return sum(1 for attempt in receiver.attempts if attempt.path == path)


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


# -- heartbeat --------------------------------------------------------------------------


async def test_heartbeat_pings_while_ready_and_stops_when_dispatch_stalls(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEARTBEAT_URL", receiver.target(HEARTBEAT_TOKEN))
    monkeypatch.setenv("HEARTBEAT_FAIL_URL", receiver.target(f"{HEARTBEAT_TOKEN}/fail"))
    ok, fail = f"/hook/{HEARTBEAT_TOKEN}", f"/hook/{HEARTBEAT_TOKEN}/fail"
    b = await make_broadcaster(
        {"status-page": BANNER, "hooks": webhook_channel(receiver, ["a"])},
        serve={
            "heartbeat_url": {"env": "HEARTBEAT_URL"},
            "heartbeat_fail_url": {"env": "HEARTBEAT_FAIL_URL"},
            "heartbeat_interval_seconds": 0.05,
            "ready_stall_seconds": 0.3,
        },
    )
    async with serving(b, dispatch=False):  # nobody sends: a publish stalls dispatch
        await wait_until(lambda: pings(receiver, ok) >= 3)
        assert pings(receiver, fail) == 0
        await b.publish(OPENING)
        await wait_until(lambda: pings(receiver, fail) >= 2)
        stalled_at = pings(receiver, ok)
        await asyncio.sleep(0.3)
        assert pings(receiver, ok) == stalled_at  # no "all is well" while stalled
        assert pings(receiver, fail) >= 4


@pytest.mark.parametrize("fault", ["answers 500", "refuses connections"])
async def test_heartbeat_receiver_down_never_affects_serving(
    fault: str,
    receiver: WebhookReceiver,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if fault == "answers 500":
        receiver.default(Behaviour(status=500))
        url = receiver.target(HEARTBEAT_TOKEN)
    else:
        url = f"http://127.0.0.1:{free_port()}/ping/{HEARTBEAT_TOKEN}"  # nothing listens
    monkeypatch.setenv("HEARTBEAT_URL", url)
    b = await make_broadcaster(
        {"status-page": BANNER},
        serve={"heartbeat_url": {"env": "HEARTBEAT_URL"}, "heartbeat_interval_seconds": 0.05},
    )
    caplog.set_level(logging.WARNING, logger="broadcaster.heartbeat")
    async with serving(b) as base:
        await wait_until(lambda: len(caplog.records) >= 3)
        for path in ("/healthz", "/readyz", "/"):
            status, _, _ = await get(f"{base}{path}")
            assert status == 200
    expected = "answered HTTP 500" if fault == "answers 500" else "unreachable"
    assert expected in caplog.text and "serve.heartbeat_url (127.0.0.1)" in caplog.text
    assert HEARTBEAT_TOKEN not in caplog.text  # the URL is the credential


# -- proxies and per-address limits -------------------------------------------------------


async def fetch(
    url: str, *, peer: str = "127.0.0.1", forwarded_for: str | None = None, **kwargs: Any
) -> tuple[int, dict[str, str]]:
    """A request from `peer` (any 127.0.0.0/8 address is this machine)."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    connector = aiohttp.TCPConnector(local_addr=(peer, 0))
    method = "POST" if "data" in kwargs else "GET"
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(
            method, url, headers={**headers, **kwargs.pop("headers", {})}, **kwargs
        ) as response,
    ):
        await response.read()
        return response.status, dict(response.headers)


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(
    make_broadcaster: MakeBroadcaster,
) -> None:
    b = await make_broadcaster(
        {"status-page": BANNER},
        serve={
            "trusted_proxies": ["127.0.0.0/31"],  # 127.0.0.0 and .1, not .2
            "rate_limit_per_ip": {"site": {"rate": "1/h", "burst": 2}},
        },
    )
    async with serving(b) as base:
        # An untrusted peer naming a new client each time is still one client.
        statuses = [
            (await fetch(f"{base}/", peer=UNTRUSTED_PEER, forwarded_for=f"203.0.113.{i}"))[0]
            for i in range(3)
        ]
        assert statuses == [200, 200, 429]
        for path in ("/healthz", "/v1/openapi.json"):  # probes and the admin API: no limit
            assert (await fetch(f"{base}{path}", peer=UNTRUSTED_PEER))[0] == 200
        # Through the trusted proxy, each real client has its own bucket...
        for i in range(3):
            status, _ = await fetch(f"{base}/", forwarded_for=f"198.51.100.{i}")
            assert status == 200
        # ...and the real client is the right-most untrusted address: what it prepends
        # to X-Forwarded-For itself does not make it someone else.
        chain = [f"{spoofed}, 192.0.2.7" for spoofed in ("10.0.0.1", "10.0.0.2", "10.0.0.3")]
        statuses = [(await fetch(f"{base}/", forwarded_for=xff))[0] for xff in chain]
        assert statuses == [200, 200, 429]


async def test_limit_exceeded_answers_429_with_retry_after_and_stores_nothing(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AM_TOKEN", TOKEN)
    monkeypatch.setenv("METRICS_TOKEN", METRICS_TOKEN)
    b = await make_broadcaster(
        {"status-page": BANNER},
        components={"payments": "Payments"},
        hooks={"alertmanager_token": {"env": "AM_TOKEN"}},
        routes=[route()],
        serve={
            "metrics_token": {"env": "METRICS_TOKEN"},
            "rate_limit_per_ip": {"inbound": {"rate": "6/min", "burst": 2}},
        },
    )
    hook = {"data": json.dumps(FIRING), "headers": {"Content-Type": "application/json"}}
    async with serving(b) as base:
        wrong = {**hook, "headers": {**hook["headers"], "Authorization": "Bearer guessed"}}
        for _ in range(2):  # a token guesser spends the burst
            status, _ = await fetch(f"{base}/hooks/alertmanager", **wrong)
            assert status == 403
        right = {**hook, "headers": {**hook["headers"], "Authorization": f"Bearer {TOKEN}"}}
        status, headers = await fetch(f"{base}/hooks/alertmanager", **right)
        assert status == 429 and headers["Retry-After"] == "10"  # 6/min: one every 10 s
        assert await b.drafts() == [] and await b.incidents() == []
        # A sender with the right token spends nothing: a burst of alerts is never held.
        for _ in range(5):
            status, _ = await fetch(f"{base}/hooks/alertmanager", peer=TRUSTED_SENDER, **right)
            assert status == 200
        # Other clients, the public side, probes and Prometheus are not held up.
        status, _ = await fetch(f"{base}/hooks/alertmanager", peer=UNTRUSTED_PEER, **right)
        assert status == 200
        for path in ("/", "/healthz", "/readyz", "/healthz", "/readyz"):
            assert (await fetch(f"{base}{path}"))[0] == 200
        auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        async with (
            aiohttp.ClientSession(headers=auth) as session,
            session.get(f"{base}/metrics") as response,
        ):
            text = await response.text()
    assert 'broadcaster_webhook_requests_total{source="alertmanager",status="429"} 1.0' in text
    assert 'broadcaster_rate_limited_requests_total{limit="inbound"} 1.0' in text
    assert len(await b.drafts()) == 1  # only the other client's notification


def test_token_buckets_refill_and_forget_the_least_recent_address() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, max_keys=2, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    now[0] = 0.5  # one token back, and half of the refused request's wait served
    assert buckets.take("a") == 0.0 and buckets.take("a") == 0.5
    buckets.take("b")
    buckets.take("c")  # a third address: "a", the least recently seen, is forgotten
    assert len(buckets) == 2 and buckets.take("a") == 0.0
    assert [buckets.wait("d") for _ in range(5)] == [0.0] * 5  # looking takes nothing


@pytest.mark.parametrize(
    ("serve", "message"),
    [
        ({"trusted_proxies": ["*"]}, "not an IP address or network"),
        ({"trusted_proxies": ["lb.internal"]}, "not an IP address or network"),
        ({"public_url": "status.example.com"}, "not a base URL"),
        ({"public_url": "https://status.example.com/?x=1"}, "not a base URL"),
        ({"rate_limit_per_ip": {"inbound": {"rate": "fast"}}}, "not a rate"),
        ({"rate_limit_per_ip": {"inbound": {"rate": 0}}}, "must be above 0"),
    ],
)
def test_serve_settings_refuse_what_would_be_unsafe_or_unclear(
    serve: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ServeSettings(**serve)


def test_rates_read_per_second_and_off_means_no_limit() -> None:
    limits = ServeSettings(
        rate_limit_per_ip={"inbound": {"rate": "600/min"}, "site": {"rate": "off"}}
    ).rate_limit_per_ip
    assert limits.inbound.rate == 10.0 and limits.site.rate is None


async def test_public_url_makes_the_live_sites_links_absolute(
    make_broadcaster: MakeBroadcaster,
) -> None:
    b = await make_broadcaster(
        {"status-page": BANNER}, serve={"public_url": "https://status.example.com/"}
    )
    async with serving(b) as base:
        _, _, body = await get(f"{base}/api/v2/summary.json")
        _, _, feed = await get(f"{base}/feed.atom")
    assert json.loads(body)["page"]["url"] == "https://status.example.com/"
    assert b"https://status.example.com/feed.atom" in feed


# -- logs -----------------------------------------------------------------------------


@pytest.fixture
def json_log(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[Broadcaster], io.StringIO]]:
    """Attaches serve's JSON handler, redacting a broadcaster's secrets, to the root
    logger at INFO; the lines go to the returned buffer."""
    root = logging.getLogger()
    handlers: list[logging.Handler] = []

    def attach(broadcaster: Broadcaster) -> io.StringIO:
        stream = io.StringIO()
        handlers.append(log_handler("json", configured_secrets(broadcaster), stream))
        root.addHandler(handlers[-1])
        return stream

    caplog.set_level(logging.INFO)
    try:
        yield attach
    finally:
        for handler in handlers:
            root.removeHandler(handler)


async def test_json_logs_carry_fields_and_never_a_secret(
    json_log: Callable[[Broadcaster], io.StringIO],
    receiver: WebhookReceiver,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    heartbeat_url = receiver.target(HEARTBEAT_TOKEN)
    secrets = {
        "AM_TOKEN": TOKEN,
        "METRICS_TOKEN": METRICS_TOKEN,
        "HEARTBEAT_URL": heartbeat_url,
        "CHANNEL_SECRET": CHANNEL_SECRET,
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    receiver.script(f"/hook/{HEARTBEAT_TOKEN}", Behaviour(status=503))
    b = await make_broadcaster(
        {
            "status-page": BANNER,
            "hooks": webhook_channel(receiver, ["a"], secret={"env": "CHANNEL_SECRET"}),
        },
        components={"payments": "Payments", "app": "Mobile app"},
        hooks={"alertmanager_token": {"env": "AM_TOKEN"}},
        routes=[route(action="publish")],
        serve={
            "metrics_token": {"env": "METRICS_TOKEN"},
            "heartbeat_url": {"env": "HEARTBEAT_URL"},
            "heartbeat_interval_seconds": 0.05,
            "access_log": True,
        },
    )
    stream = json_log(b)
    hook = {"data": json.dumps(FIRING), "headers": {"Content-Type": "application/json"}}
    async with serving(b) as base:
        await fetch(
            f"{base}/hooks/alertmanager", **{**hook, "headers": {"Authorization": "Bearer guess"}}
        )
        status, _ = await fetch(
            f"{base}/hooks/alertmanager",
            **{**hook, "headers": {**hook["headers"], "Authorization": f"Bearer {TOKEN}"}},
        )
        assert status == 200
        result = await b.publish(OPENING)
        await asyncio.wait_for(b.wait([result.update.id]), timeout=10)
        await fetch(f"{base}/status.en.json?token={TOKEN}")  # a token in a query string
        await wait_until(lambda: "heartbeat_url" in stream.getvalue())
    # A careless line elsewhere: the handler still blanks it.
    logging.getLogger("tests").warning(
        "leak %s %s Authorization: Bearer %s", heartbeat_url, METRICS_TOKEN, "not-configured"
    )

    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= line.keys()
    intake = next(line for line in lines if line["logger"] == "broadcaster.alerts")
    assert intake["source"] == "alertmanager" and intake["outcome"] == "published"
    assert intake["incident_id"] and intake["update_id"]
    published = [line for line in lines if line["logger"] == "broadcaster.core"]
    assert {line["update_id"] for line in published} >= {intake["update_id"], result.update.id}
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert {(line["path"], line["status"]) for line in access} >= {
        ("/hooks/alertmanager", 403),
        ("/hooks/alertmanager", 200),
        ("/status.en.json", 200),
    }
    assert all(line["client"].startswith("127.0.0.1:") for line in access)
    assert "?" not in "".join(line["message"] for line in access)
    heartbeat = next(line for line in lines if line["logger"] == "broadcaster.heartbeat")
    assert heartbeat["outcome"] == "refused" and heartbeat["status"] == 503
    leak = next(line for line in lines if line["logger"] == "tests")
    assert leak["message"] == f"leak {REDACTED} {REDACTED} Authorization: Bearer {REDACTED}"
    for value in (*secrets.values(), HEARTBEAT_TOKEN, "not-configured"):
        assert value not in text


def test_serve_command_writes_json_lines_with_its_startup_and_access_lines(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = tmp_path / "broadcaster.toml"
    (tmp_path / "metrics.token").write_text(METRICS_TOKEN)
    config.write_text(
        tomli_w.dumps(
            {
                "channels": {"status-page": BANNER},
                "serve": {
                    "port": port,
                    "public_url": "https://status.example.com",
                    "metrics_token": {"file": "metrics.token"},
                    "access_log": True,
                },
            }
        )
    )
    broadcaster_bin = str(Path(sys.executable).with_name("broadcaster"))
    server = subprocess.Popen(
        [broadcaster_bin, "--config", str(config), "serve", "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{port}/healthz?token={METRICS_TOKEN}", timeout=2
            ).read(),
            timeout=20,
        )
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    startup = next(line for line in lines if line["logger"] == "broadcaster.serve")
    assert "reached at https://status.example.com" in startup["message"]
    assert any(line.get("path") == "/healthz" for line in lines)
    assert METRICS_TOKEN not in stderr
