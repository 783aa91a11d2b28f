"""The Bluesky adapter: the real `atproto` AsyncClient against the fake PDS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broadcaster.core import Broadcaster, PublishResult
from broadcaster.errors import CheckFailedError
from broadcaster.models import ChannelProgress, DeliveryState, IncidentStatus, UpdateRequest
from broadcaster.sandbox import FakePds, XrpcFailure
from channels.base import Recipient
from tests.conftest import MakeBroadcaster

PASSWORD = "abcd-efgh-ijkl-mnop"
STATUS_URL = "https://status.example.com/incidents"
CREATE = "com.atproto.repo.createRecord"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx (under atproto) honours proxy variables; the fake is on the loopback.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("BSKY_APP_PASSWORD", PASSWORD)


@pytest.fixture
async def pds() -> AsyncIterator[FakePds]:
    async with FakePds(handle="status.example.com", password=PASSWORD) as fake:
        yield fake


def bluesky_channel(pds: FakePds, **extra: Any) -> dict[str, Any]:
    return {
        "type": "bluesky",
        "handle": pds.handle,
        "app_password": {"env": "BSKY_APP_PASSWORD"},
        "base_url": pds.url,
        "languages": ["fr"],
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


async def open_bluesky(
    make_broadcaster: MakeBroadcaster, pds: FakePds, **settings: Any
) -> Broadcaster:
    settings.setdefault("status_page_url", STATUS_URL)
    b: Broadcaster = await make_broadcaster({"bsky": bluesky_channel(pds)}, **settings)
    return b


def opening(summary: str = "Les paiements échouent pour certains clients") -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title="Paiements",
        fields={"summary": summary},
        actor="test",
    )


def followup(status: IncidentStatus) -> UpdateRequest:
    return UpdateRequest(status=status, fields={"summary": "Un déploiement fautif"}, actor="test")


async def publish_and_wait(
    b: Broadcaster, request: UpdateRequest, incident: int | None = None
) -> tuple[PublishResult, ChannelProgress]:
    result = await b.publish(request, incident)
    progress = await asyncio.wait_for(b.wait([result.update.id]), timeout=30)
    return result, next(p for p in progress if p.channel == "bsky")


def byte_slice(text: str, part: str) -> dict[str, Any]:
    start = text.encode().index(part.encode())
    return {
        "$type": "app.bsky.richtext.facet#byteSlice",
        "byteStart": start,
        "byteEnd": start + len(part.encode()),
    }


async def test_post_has_link_and_tag_facets_at_utf8_byte_offsets(
    pds: FakePds, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    _, progress = await publish_and_wait(b, opening("Les paiements échouent 💳 #panne"))
    assert progress.counts == {DeliveryState.SENT: 1}
    (post,) = pds.posts
    text = post.value["text"]
    assert text == f"Enquête en cours : Les paiements échouent 💳 #panne. {STATUS_URL}"
    assert post.value["langs"] == ["fr"]
    assert "reply" not in post.value
    # Bytes, not characters: "ê", "é" and "💳" are 2, 2 and 4 bytes in UTF-8.
    assert byte_slice(text, STATUS_URL)["byteStart"] == text.index(STATUS_URL) + 1 + 1 + 3
    assert post.value["facets"] == [
        {
            "$type": "app.bsky.richtext.facet",
            "index": byte_slice(text, "#panne"),
            "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "panne"}],
        },
        {
            "$type": "app.bsky.richtext.facet",
            "index": byte_slice(text, STATUS_URL),
            "features": [{"$type": "app.bsky.richtext.facet#link", "uri": STATUS_URL}],
        },
    ]
    (delivery,) = await b.deliveries(1)
    assert delivery.provider_id == post.uri
    assert delivery.permalink == f"https://bsky.app/profile/{pds.handle}/post/{post.rkey}"


async def test_exactly_300_graphemes_pass_and_301_fail_the_check(
    pds: FakePds, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    base = "Les paiements échouent 💳 "
    measured = (await b.preview(opening(base + "é"))).renders[0].measures[0].graphemes
    # "👩‍💻" is one grapheme of five code points: graphemes, not len(), are counted.
    padding = 300 - measured + 1
    at_limit = opening(base + "👩‍💻" * (padding - 1) + "é")
    preview = await b.preview(at_limit)
    assert preview.renders[0].measures[0].graphemes == 300
    assert preview.ok
    over = await b.preview(opening(base + "👩‍💻" * padding + "é"))
    (failure,) = over.failures
    assert (failure.check, failure.measure, failure.limit) == ("graphemes", 301, 300)
    assert str(failure).startswith("bsky: update is 301 graphemes, limit 300")
    with pytest.raises(CheckFailedError):
        await b.publish(opening(base + "👩‍💻" * padding + "é"))
    _, progress = await publish_and_wait(b, at_limit)
    assert progress.counts == {DeliveryState.SENT: 1}
    assert pds.posts[0].value["text"] == preview.renders[0].text()


async def test_followups_reply_under_the_first_post_after_the_previous_one(
    pds: FakePds, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    first, _ = await publish_and_wait(b, opening())
    for status in (IncidentStatus.IDENTIFIED, IncidentStatus.RESOLVED):
        _, progress = await publish_and_wait(b, followup(status), first.incident.id)
        assert progress.counts.get(DeliveryState.SENT) == 1
    one, two, three = pds.posts
    ref = {"$type": "com.atproto.repo.strongRef"}
    assert "reply" not in one.value
    assert two.value["reply"] == {
        "$type": "app.bsky.feed.post#replyRef",
        "root": {**ref, "uri": one.uri, "cid": one.cid},
        "parent": {**ref, "uri": one.uri, "cid": one.cid},
    }
    assert three.value["reply"]["root"] == {**ref, "uri": one.uri, "cid": one.cid}
    assert three.value["reply"]["parent"] == {**ref, "uri": two.uri, "cid": two.cid}


async def test_session_is_kept_owner_only_and_reused_by_the_next_run(
    pds: FakePds, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    await publish_and_wait(b, opening())
    assert pds.create_session_calls == 1
    session_file = tmp_path / ".broadcaster" / "bluesky" / "bsky.session"
    assert stat.S_IMODE(os.stat(session_file).st_mode) == 0o600
    saved = session_file.read_text()
    access_jwt = saved.split(":::")[2]
    assert access_jwt.count(".") == 2
    assert access_jwt.encode() not in (tmp_path / "broadcaster.db").read_bytes()

    # Another CLI run: a new process, its own store, the same data folder.
    again = await open_bluesky(make_broadcaster, pds, store=f"sqlite:///{tmp_path}/second.db")
    _, progress = await publish_and_wait(again, opening("Autre panne"))
    assert progress.counts == {DeliveryState.SENT: 1}
    assert pds.create_session_calls == 1  # resumed, not logged in again
    assert len(pds.posts) == 2
    assert saved.startswith(f"{pds.url}\n")  # the service the session belongs to


async def test_a_session_from_another_service_is_not_sent_to_this_one(
    pds: FakePds, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    await publish_and_wait(b, opening())
    # The config now names another PDS (moved, or a new test run on a new port).
    async with FakePds(handle=pds.handle, password=PASSWORD) as moved:
        again = await make_broadcaster(
            {"bsky": bluesky_channel(moved)}, store=f"sqlite:///{tmp_path}/second.db"
        )
        _, progress = await publish_and_wait(again, opening("Autre panne"))
        assert progress.counts == {DeliveryState.SENT: 1}
        assert moved.create_session_calls == 1 and len(moved.posts) == 1


async def test_expired_token_refreshes_the_session_and_posts(
    pds: FakePds, make_broadcaster: MakeBroadcaster, tmp_path: Path
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    pds.fail(CREATE, XrpcFailure(400, "ExpiredToken", "Token has expired"))
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}
    assert pds.refresh_session_calls == 1 and pds.create_session_calls == 1
    (delivery,) = await b.deliveries(1)
    assert delivery.attempts == 1  # refreshed and retried within the same attempt
    # The refreshed tokens were saved: the old refresh token is spent.
    saved = (tmp_path / ".broadcaster" / "bluesky" / "bsky.session").read_text()
    assert saved.split(":::")[3] in pds._refresh


async def test_rate_limit_reset_is_honoured(
    pds: FakePds, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    pds.fail(CREATE, XrpcFailure(429, "RateLimitExceeded", "Rate Limit Exceeded", reset_in=1.2))
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}
    refused, accepted = pds.calls_of(CREATE)
    assert refused.status == 429 and accepted.status == 200
    reset = float(refused.headers["ratelimit-reset"])
    assert accepted.at >= reset - 0.05  # not before the window reset, backoff was 0.05 s


async def test_5xx_is_retried(pds: FakePds, make_broadcaster: MakeBroadcaster) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    pds.fail(CREATE, XrpcFailure(500, "InternalServerError"), XrpcFailure(502, "BadGateway"))
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}
    assert [c.status for c in pds.calls_of(CREATE)] == [500, 502, 200]


async def test_other_400_fails_only_that_delivery(
    pds: FakePds, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    pds.fail(CREATE, XrpcFailure(400, "InvalidRequest", "Invalid app.bsky.feed.post record"))
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(1)
    assert failed.last_error == "bsky: post: 400 InvalidRequest"
    assert len(pds.calls_of(CREATE)) == 1


async def test_bad_app_password_stops_the_channel_and_doctor_says_why(
    pds: FakePds, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BSKY_APP_PASSWORD", "wrong-pass-word-here")
    b = await open_bluesky(make_broadcaster, pds)
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.QUEUED: 1}  # kept for when it is fixed
    assert progress.broken is not None and "refused the credentials" in progress.broken
    (queued,) = await b.deliveries(1)
    assert queued.attempts == 0
    assert not pds.posts

    check = next(c for c in await b.doctor() if c.subject == "channel bsky")
    assert not check.ok
    assert check.detail == (
        "bsky: login as status.example.com: 401 AuthenticationRequired "
        "— Bluesky refused the credentials"
    )
    assert "wrong-pass" not in check.detail

    monkeypatch.delenv("BSKY_APP_PASSWORD")
    check = next(c for c in await b.doctor() if c.subject == "channel bsky")
    assert check.detail == (
        "bsky: secret 'app_password' not found in environment variable BSKY_APP_PASSWORD"
    )


async def test_doctor_logs_in_once_then_resumes(
    pds: FakePds, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    for _ in range(3):
        check = next(c for c in await b.doctor() if c.subject == "channel bsky")
        assert check.ok, check.detail
    assert pds.create_session_calls == 1


async def test_revoked_session_logs_in_again(
    pds: FakePds, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    await publish_and_wait(b, opening())
    pds.revoke_tokens()  # the account's password changed: every session ends
    _, progress = await publish_and_wait(b, opening("Encore"))
    assert progress.counts == {DeliveryState.SENT: 1}
    assert pds.create_session_calls == 2


async def test_delete_removes_the_post(pds: FakePds, make_broadcaster: MakeBroadcaster) -> None:
    b = await open_bluesky(make_broadcaster, pds)
    await publish_and_wait(b, opening())
    (delivery,) = await b.deliveries(1)
    assert delivery.provider_id is not None
    channel = b.channels["bsky"]
    try:
        await channel.delete(delivery.provider_id, Recipient(id=""))
    finally:
        await channel.close()
    assert pds.posts == []
    assert pds.calls_of("com.atproto.repo.deleteRecord")[0].status == 200
