"""The webhook receiver simulator answers as scripted and records what it received."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from standardwebhooks import Webhook

from broadcaster.sandbox import Behaviour, Received, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"incident-broadcaster-test-secret").decode()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


def signed_headers(body: str, *, msg_id: str, secret: str = SECRET) -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
    }


async def post(
    session: aiohttp.ClientSession, url: str, payload: Any, *, webhook_id: str | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Webhook-Id": webhook_id} if webhook_id else {}
    async with session.post(url, json=payload, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def test_200_is_recorded_with_its_webhook_id(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    assert receiver.url.startswith("http://127.0.0.1:")
    assert receiver.target("status") == f"{receiver.url}/hook/status"
    status, _, answer = await post(
        session, receiver.target("status"), {"incident": 1}, webhook_id="msg_1"
    )
    assert (status, answer) == (200, {"ok": True})
    [received] = receiver.received
    assert isinstance(received, Received)
    assert received.path == "/hook/status"
    assert received.webhook_id == "msg_1"
    assert received.body == {"incident": 1}
    assert received.status == 200
    assert received.signature_valid is None  # no secret configured
    assert abs(received.at - time.time()) < 5
    assert received.headers["webhook-id"] == "msg_1"
    assert receiver.received_ids() == ["msg_1"]


async def test_429_retry_after_is_sent_then_200(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    receiver.script("status", Behaviour(status=429, retry_after=2, times=1))
    status, headers, _ = await post(session, receiver.target("status"), {}, webhook_id="a")
    assert status == 429
    assert headers["Retry-After"] == "2"
    status, headers, _ = await post(session, receiver.target("status"), {}, webhook_id="a")
    assert status == 200
    assert "Retry-After" not in headers
    assert receiver.received_ids() == ["a"]
    assert [a.status for a in receiver.attempts] == [429, 200]


async def test_fractional_retry_after_is_kept_for_fast_tests(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    receiver.default(Behaviour(status=429, retry_after=0.25))
    _, headers, _ = await post(session, receiver.target("x"), {})
    assert headers["Retry-After"] == "0.25"


async def test_503_twice_then_ok(receiver: WebhookReceiver, session: aiohttp.ClientSession) -> None:
    receiver.script("status", Behaviour(status=503, times=2), Behaviour(status=202, times=1))
    statuses = [(await post(session, receiver.target("status"), {}))[0] for _ in range(4)]
    assert statuses == [503, 503, 202, 200]
    assert len(receiver.received) == 2
    assert [a.status for a in receiver.attempts] == [503, 503, 202, 200]


async def test_scripts_are_per_target_and_default_applies_elsewhere(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    receiver.default(Behaviour(status=410))
    receiver.script("/custom/path", Behaviour(status=200))
    assert (await post(session, receiver.target("gone"), {}))[0] == 410
    assert (await post(session, f"{receiver.url}/custom/path", {}))[0] == 200
    assert (await post(session, f"{receiver.url}/custom/path", {}))[0] == 200  # forever
    assert [r.path for r in receiver.received] == ["/custom/path", "/custom/path"]


async def test_drop_closes_connection_without_response(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    receiver.script("status", Behaviour(drop=True, times=1))
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, receiver.target("status"), {}, webhook_id="lost")
    assert receiver.received == []
    [attempt] = receiver.attempts
    assert attempt.status is None and attempt.webhook_id == "lost"
    assert (await post(session, receiver.target("status"), {}))[0] == 200


async def test_delay_answers_slowly(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    receiver.script("slow", Behaviour(delay=0.3, times=1))
    started = time.monotonic()
    assert (await post(session, receiver.target("slow"), {}))[0] == 200
    assert time.monotonic() - started >= 0.3
    # A client that gives up sooner sees a timeout.
    receiver.script("slow", Behaviour(delay=2.0, times=1))
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            receiver.target("slow"), json={}, timeout=aiohttp.ClientTimeout(total=0.2)
        ):
            pass


async def test_slow_2xx_counts_as_received_once_answered(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    receiver.script("slow", Behaviour(delay=0.3, times=1))
    request = asyncio.create_task(post(session, receiver.target("slow"), {}))
    await asyncio.sleep(0.1)
    assert len(receiver.attempts) == 1
    assert receiver.received == []
    await receiver.wait_for(1, timeout=5)
    await request


async def test_signature_valid_for_correctly_signed_request(
    session: aiohttp.ClientSession,
) -> None:
    body = json.dumps({"incident": 7, "status": "investigating"})
    async with WebhookReceiver(secret=SECRET) as receiver:
        headers = signed_headers(body, msg_id="msg_signed")
        async with session.post(receiver.target("status"), data=body, headers=headers) as r:
            assert r.status == 200
        [received] = receiver.received
    assert received.signature_valid is True
    assert received.body == {"incident": 7, "status": "investigating"}


async def test_signature_invalid_for_forged_or_unsigned_request(
    session: aiohttp.ClientSession,
) -> None:
    body = json.dumps({"incident": 7})
    forger = "whsec_" + base64.b64encode(b"not-the-right-secret").decode()
    async with WebhookReceiver(secret=SECRET) as receiver:
        forged = signed_headers(body, msg_id="msg_forged", secret=forger)
        tampered = signed_headers(body, msg_id="msg_tampered")
        garbled = {**signed_headers(body, msg_id="msg_garbled"), "webhook-signature": "nonsense"}
        for headers, data in [(forged, body), (tampered, body + " "), (garbled, body), ({}, body)]:
            async with session.post(receiver.target("status"), data=data, headers=headers) as r:
                assert r.status == 200  # recorded, not refused: the test decides
        results = [r.signature_valid for r in receiver.received]
    assert results == [False, False, False, False]


async def test_non_json_body_is_kept_raw(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    async with session.post(receiver.target("form"), data=b"a=1&b=2") as response:
        assert response.status == 200
    [received] = receiver.received
    assert received.body is None
    assert received.raw == b"a=1&b=2"


async def test_script_refuses_a_forever_behaviour_before_others(
    receiver: WebhookReceiver,
) -> None:
    with pytest.raises(ValueError, match="would never apply"):
        receiver.script("status", Behaviour(status=503), Behaviour(status=200))


async def test_wait_for_times_out_saying_what_it_saw(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    receiver.default(Behaviour(status=500))
    await post(session, receiver.target("status"), {})
    with pytest.raises(TimeoutError, match=r"0 of 1 .*statuses answered: \[500\]"):
        await receiver.wait_for(1, timeout=0.1)


async def test_control_api_drives_it_from_a_plain_http_client(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    control = f"{receiver.url}/_sim"
    script = {"target": "status", "behaviours": [{"status": 503, "times": 1}]}
    async with session.post(f"{control}/script", json=script) as response:
        assert response.status == 200
    assert (await post(session, receiver.target("status"), {"n": 1}, webhook_id="w1"))[0] == 503
    assert (await post(session, receiver.target("status"), {"n": 2}, webhook_id="w1"))[0] == 200

    async with session.get(f"{control}/received") as response:
        received = await response.json()
    assert [(r["path"], r["webhook_id"], r["body"], r["status"]) for r in received] == [
        ("/hook/status", "w1", {"n": 2}, 200)
    ]
    async with session.get(f"{control}/attempts", params={"since": "1"}) as response:
        assert [a["status"] for a in await response.json()] == [200]

    async with session.post(f"{control}/default", json={"status": 410}) as response:
        assert response.status == 200
    assert (await post(session, receiver.target("other"), {}))[0] == 410

    async with session.post(f"{control}/reset") as response:
        assert response.status == 200
    assert receiver.received == [] and receiver.attempts == []
    assert (await post(session, receiver.target("other"), {}))[0] == 200


async def test_control_api_rejects_bad_requests_with_a_reason(
    receiver: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    control = f"{receiver.url}/_sim"
    bad = {"target": "status", "behaviours": [{"status": 42}]}
    async with session.post(f"{control}/script", json=bad) as response:
        assert response.status == 400
        assert "status" in (await response.json())["error"]
    async with session.post(f"{control}/script", json={"behaviours": []}) as response:
        assert response.status == 400
    async with session.post(f"{control}/nope") as response:
        assert response.status == 404
    assert receiver.attempts == []  # control requests are not webhooks


def test_start_in_thread_works_from_synchronous_code() -> None:
    receiver = WebhookReceiver()
    receiver.start_in_thread()
    try:
        receiver.script("status", Behaviour(status=503, times=1))
        request = urllib.request.Request(
            receiver.target("status"),
            data=b'{"incident": 1}',
            headers={"content-type": "application/json", "webhook-id": "sync_1"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 503
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        assert [r.webhook_id for r in receiver.wait_for_blocking(1, timeout=5)] == ["sync_1"]
        assert receiver.received_ids() == ["sync_1"]
        with urllib.request.urlopen(f"{receiver.url}/_sim/received", timeout=5) as response:
            assert json.load(response)[0]["body"] == {"incident": 1}
    finally:
        receiver.stop_thread()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(receiver.target("status"), data=b"{}", timeout=2)


def test_sync_context_manager_runs_in_a_thread() -> None:
    with WebhookReceiver() as receiver:
        with urllib.request.urlopen(receiver.target("a"), data=b"{}", timeout=5) as response:
            assert response.status == 200
        assert len(receiver.received) == 1


async def test_start_fails_loudly_when_the_port_is_taken(receiver: WebhookReceiver) -> None:
    port = int(receiver.url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        await WebhookReceiver(port=port).start()


async def test_keeps_up_with_thousands_of_requests(receiver: WebhookReceiver) -> None:
    count = 3000
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def send(i: int) -> int:
            async with client.post(
                receiver.target("load"), json={"i": i}, headers={"webhook-id": f"msg_{i}"}
            ) as response:
                return response.status

        started = time.monotonic()
        statuses = await asyncio.gather(*(send(i) for i in range(count)))
        elapsed = time.monotonic() - started
    assert set(statuses) == {200}
    assert sorted(receiver.received_ids()) == sorted(f"msg_{i}" for i in range(count))
    # Loose bound (client and server share one loop here); catches per-request logging
    # or parsing regressions that make it crawl.
    assert count / elapsed > 500, f"{count / elapsed:.0f} requests/s"


@pytest.mark.skipif(os.name != "posix", reason="port reuse semantics differ")
async def test_stop_releases_the_port() -> None:
    receiver = WebhookReceiver()
    await receiver.start()
    port = int(receiver.url.rsplit(":", 1)[1])
    await receiver.stop()
    async with WebhookReceiver(port=port) as again:
        assert again.url.endswith(f":{port}")
