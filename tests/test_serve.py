"""`broadcaster serve`: the live public side, health probes, and dispatch while it runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
import uvicorn

from broadcaster.core import Broadcaster
from broadcaster.errors import ConfigError
from broadcaster.models import (
    ChannelProgress,
    ComponentState,
    DeliveryState,
    IncidentStatus,
    UpdateRequest,
)
from broadcaster.sandbox import Behaviour, WebhookReceiver
from broadcaster.server import create_app, server_config
from broadcaster.server.languages import negotiate_language
from tests.conftest import MakeBroadcaster, webhook_channel

BANNER = {"type": "banner", "languages": ["en", "fr"], "output": "public"}
OPENING = UpdateRequest(
    status=IncidentStatus.INVESTIGATING,
    title="Charging sessions fail",
    components={"app": ComponentState.MAJOR_OUTAGE},
    fields={"summary": "Starting a charge fails.", "summary.fr": "Le démarrage échoue."},
    actor="test",
)


@asynccontextmanager
async def serving(broadcaster: Broadcaster, *, dispatch: bool = True) -> AsyncIterator[str]:
    """The app on uvicorn on 127.0.0.1, an ephemeral port, configured as `serve` runs it;
    yields its base URL."""
    app = create_app(broadcaster, dispatch=dispatch)
    config = server_config(app, broadcaster.settings.serve, host="127.0.0.1", port=0)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, dict(response.headers), await response.read()


async def test_public_side_is_served_live_from_the_store(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {"status-page": BANNER}, components={"app": "Mobile app"}, serve={"site_cache_seconds": 0}
    )
    async with serving(b) as base:
        status, _, body = await get(f"{base}/")
        assert status == 200 and b"All systems operational" in body

        result = await b.publish(OPENING)
        await asyncio.wait_for(b.wait([result.update.id]), timeout=10)

        status, headers, body = await get(f"{base}/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "Charging sessions fail" in body.decode()
        status, _, body = await get(f"{base}/fr/")
        assert "Le démarrage échoue." in body.decode()
        status, headers, body = await get(f"{base}/status.fr.json")
        assert headers["Access-Control-Allow-Origin"] == "*"  # apps on other origins read it
        assert json.loads(body)["incidents"][0]["title"] == "Charging sessions fail"
        status, headers, _ = await get(f"{base}/banner.js")
        assert status == 200 and "javascript" in headers["Content-Type"]
        status, headers, _ = await get(f"{base}/feed.atom")
        assert status == 200 and "atom" in headers["Content-Type"]
        status, _, body = await get(f"{base}/api/v2/summary.json")
        assert json.loads(body)["status"]["indicator"] in ("major", "critical")
        status, _, _ = await get(f"{base}/en/")
        assert status == 200  # the default language also answers by name
        status, _, _ = await get(f"{base}/../secrets")
        assert status == 404


async def fetch(url: str, accept_language: str | None = None) -> aiohttp.ClientResponse:
    """One GET, redirects not followed; the body is read before the response is returned."""
    headers = {"Accept-Language": accept_language} if accept_language is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, allow_redirects=False) as response,
    ):
        await response.read()
        return response


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "en"),
        ("", "en"),
        ("fr", "fr"),
        ("fr-CH, fr;q=0.9, en;q=0.8", "fr"),  # a region falls back to its language
        ("de-DE, de;q=0.9, fr;q=0.7, en;q=0.8", "en"),  # by weight, not by position
        ("de, *;q=0.1", "en"),  # anything: the default
        ("fr;q=0, *", "en"),
        ("en;q=0, *", "fr"),  # the default refused: another one
        ("EN-gb , FR ; Q=0.5", "en"),  # case and spaces do not matter
        ("fr;q=2, en;q=0.5", "en"),  # an invalid weight drops that entry only
        ("x-😀, fr", "fr"),
        ("de", "en"),
    ],
)
def test_accept_language_negotiation(header: str | None, expected: str) -> None:
    assert negotiate_language(header, ["en", "fr"], "en") == expected


def test_accept_language_takes_a_configured_regional_variant() -> None:
    assert negotiate_language("fr-CH, en;q=0.5", ["en", "fr-CA"], "en") == "fr-CA"
    assert negotiate_language("pt-br", ["en", "pt", "pt-BR"], "en") == "pt-BR"


async def test_root_page_follows_accept_language_and_explicit_urls_never_do(
    make_broadcaster: MakeBroadcaster,
) -> None:
    b = await make_broadcaster({"status-page": BANNER}, serve={"site_cache_seconds": 0})
    async with serving(b, dispatch=False) as base:
        english = await fetch(f"{base}/", "de, en;q=0.5")
        assert english.status == 200 and english.headers["Content-Language"] == "en"
        assert english.headers["Vary"] == "Accept-Language"  # caches keep one per language
        french = await fetch(f"{base}/", "fr-FR, fr;q=0.9, en;q=0.8")
        assert french.status == 302 and french.headers["Location"] == "fr/"
        assert french.headers["Vary"] == "Accept-Language"

        # What the language switch links to is the reader's choice: no negotiation, no Vary.
        chosen = await fetch(f"{base}/index.html", "fr")
        assert chosen.status == 200 and chosen.headers["Content-Language"] == "en"
        assert "Vary" not in chosen.headers
        assert 'lang="en"' in (await chosen.text())
        chosen = await fetch(f"{base}/fr/", "en")
        assert chosen.status == 200 and chosen.headers["Content-Language"] == "fr"
        assert "Vary" not in chosen.headers

        # Served elsewhere, a page's relative links would break: redirect to where they work.
        for path, location in (("/fr", "fr/"), ("/en/", "../index.html"), ("/en", "index.html")):
            moved = await fetch(f"{base}{path}", "fr")
            assert (moved.status, moved.headers["Location"]) == (302, location), path


async def test_new_incidents_handed_to_serve_go_out_and_the_unsent_return_on_stop(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    """A publish in the serving process hands a new incident's deliveries straight to
    its dispatcher; one still waiting for a slot when serve stops is queued again, not
    left `sending`, and the next dispatcher sends it."""
    receiver.default(Behaviour(delay=2))  # the first is at the partner until after the stop
    hooks = webhook_channel(receiver, ["a"], concurrency=1)
    b = await make_broadcaster({"status-page": BANNER, "hooks": hooks})
    async with serving(b):
        await asyncio.sleep(0.3)  # the server takes the dispatcher lease
        first = await b.publish(OPENING)
        second = await b.publish(OPENING.model_copy(update={"title": "Logins fail"}))
        await asyncio.sleep(0.2)  # the first is at the partner; the second waits its turn
    # Stopped: the first finished, the second never started and is back in the queue.
    sent = await b.deliveries(first.incident.id, channel="hooks")
    assert [d.state for d in sent] == [DeliveryState.DELIVERED]
    waiting = await b.deliveries(second.incident.id, channel="hooks")
    assert [(d.state, d.attempts) for d in waiting] == [(DeliveryState.QUEUED, 0)]
    receiver.default(Behaviour())
    progress = await asyncio.wait_for(b.wait([second.update.id]), timeout=10)
    hooks_progress = next(p for p in progress if p.channel == "hooks")
    assert hooks_progress.counts == {DeliveryState.DELIVERED: 1}


async def test_serve_dispatches_and_a_cli_on_the_same_store_only_watches(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    channels = {"status-page": BANNER, "hooks": webhook_channel(receiver, ["a", "b", "c"])}
    server_side = await make_broadcaster(channels)
    cli_side = await make_broadcaster(channels)  # another process's view of the same store
    seen: list[bool] = []

    async def record(_progress: list[ChannelProgress], dispatching: bool) -> None:
        seen.append(dispatching)

    async with serving(server_side):
        await asyncio.sleep(0.3)  # the server takes the dispatcher lease
        result = await cli_side.publish(OPENING)
        progress = await asyncio.wait_for(cli_side.wait([result.update.id], record), timeout=15)
    assert seen and not any(seen)  # the CLI never dispatched: the server did
    hooks = next(p for p in progress if p.channel == "hooks")
    assert hooks.counts == {"delivered": 3}
    assert len(receiver.received) == 3


async def test_readyz_fails_when_dispatch_stalls(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster(
        {"status-page": BANNER, "hooks": webhook_channel(receiver, ["a"])},
        serve={"ready_stall_seconds": 0.2},
    )
    async with serving(b, dispatch=False) as base:
        status, _, body = await get(f"{base}/readyz")
        assert status == 200
        await b.publish(OPENING)
        await asyncio.sleep(0.4)  # nobody dispatches
        status, _, body = await get(f"{base}/readyz")
        assert status == 503 and "has waited" in json.loads(body)["reason"]
        status, _, _ = await get(f"{base}/healthz")
        assert status == 200  # alive, just not ready


async def test_serve_needs_a_banner_channel_and_says_so(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster
) -> None:
    b = await make_broadcaster({"hooks": webhook_channel(receiver, ["a"])})
    with pytest.raises(ConfigError, match='type = "banner"'):
        create_app(b)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_serve_command_answers_and_stops_gracefully_on_sigterm(
    tmp_path: Path, thread_receiver: WebhookReceiver
) -> None:
    thread_receiver.default(Behaviour(delay=0.3))
    port = free_port()
    config = tmp_path / "broadcaster.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "channels": {
                    "status-page": BANNER,
                    "hooks": webhook_channel(thread_receiver, [f"t{i}" for i in range(20)]),
                },
                "serve": {"port": port},
            }
        )
    )
    broadcaster_bin = str(Path(sys.executable).with_name("broadcaster"))
    server = subprocess.Popen(
        [broadcaster_bin, "--config", str(config), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        health = wait_for(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read(),
            timeout=20,
        )
        assert json.loads(health) == {"status": "ok"}
        published = subprocess.run(
            [broadcaster_bin, "--config", str(config), "open", "--title", "API down",
             "--set", "summary=Requests fail.", "--yes", "--no-wait"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        thread_receiver.wait_for_blocking(1, timeout=10)  # the server is sending
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    # Nothing left half-recorded: every delivery is settled or still queued, none "sending".
    import sqlite3

    with sqlite3.connect(tmp_path / "broadcaster.db") as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state"))
    assert "sending" not in states
    assert states.get("delivered", 0) >= 1
    assert os.path.exists(tmp_path / "public" / "index.html")


async def test_metrics_need_the_token_and_count_deliveries_and_hook_requests(
    receiver: WebhookReceiver, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_TOKEN", "scrape-me")
    receiver.script("gone", Behaviour(status=410))
    receiver.script("busy", Behaviour(status=429, retry_after=0.1, times=1))
    b = await make_broadcaster(
        {"status-page": BANNER, "hooks": webhook_channel(receiver, ["ok", "gone", "busy"])},
        serve={"metrics_token": {"env": "METRICS_TOKEN"}},
    )
    async with serving(b) as base:
        result = await b.publish(OPENING)
        await asyncio.wait_for(b.wait([result.update.id]), timeout=10)
        async with aiohttp.ClientSession() as session:
            for path, status in (("/hooks/alertmanager", 404), ("/hooks/no-such-source", 405)):
                async with session.post(f"{base}{path}", data=b"{}") as response:
                    assert response.status == status
            async with session.get(f"{base}/metrics") as response:
                assert response.status == 401
            headers = {"Authorization": "Bearer scrape-me"}
            async with session.get(f"{base}/metrics", headers=headers) as response:
                assert response.status == 200
                text = await response.text()
    assert 'broadcaster_deliveries{channel="hooks",state="delivered"} 2.0' in text
    assert 'broadcaster_deliveries{channel="hooks",state="failed"} 1.0' in text
    assert 'broadcaster_deliveries_retried{channel="hooks"} 1.0' in text
    assert 'broadcaster_channel_broken{channel="hooks"} 0.0' in text
    assert "broadcaster_oldest_due_delivery_age_seconds 0.0" in text
    assert 'broadcaster_webhook_requests_total{source="alertmanager",status="404"} 1.0' in text
    assert 'broadcaster_webhook_requests_total{source="other",status="405"} 1.0' in text
