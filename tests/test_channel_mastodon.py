"""The Mastodon adapter: the real Mastodon.py client against the fake instance on 127.0.0.1,
driven through Broadcaster.publish and wait like any delivery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broadcaster.core import Broadcaster, PublishResult
from broadcaster.errors import ChannelBrokenError, PermanentError, PostGoneError, TransientError
from broadcaster.models import ChannelProgress, DeliveryState, IncidentStatus, UpdateRequest
from broadcaster.sandbox.mastodon import (
    DELETE_STATUS,
    EDIT_STATUS,
    POST_STATUS,
    FakeMastodon,
    MastodonFailure,
    countable_length,
)
from channels.base import Message, Recipient
from channels.mastodon import MastodonChannel, classify_mastodon_error
from tests.conftest import MakeBroadcaster

TOKEN = "mastodon-test-token-0123456789"
WRITE_ONLY = "mastodon-write-statuses-only"
READ_ONLY = "mastodon-read-only"
STATUS_URL = "https://status.example.com/incidents"


@pytest.fixture(autouse=True)
def _no_proxy_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # requests (under Mastodon.py) honours proxy variables; the fake is on the loopback.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("MASTODON_TEST_TOKEN", TOKEN)


@pytest.fixture
async def fake() -> AsyncIterator[FakeMastodon]:
    tokens = {TOKEN: "read write", WRITE_ONLY: "write:statuses", READ_ONLY: "read"}
    async with FakeMastodon(tokens=tokens) as instance:
        yield instance


def mastodon_channel(fake: FakeMastodon, **extra: Any) -> dict[str, Any]:
    """A Mastodon channel config pointed at the fake, with fast retries."""
    return {
        "type": "mastodon",
        "base_url": fake.url,
        "access_token": {"env": "MASTODON_TEST_TOKEN"},
        "languages": ["fr"],
        "backoff_seconds": 0.05,
        "backoff_max_seconds": 0.5,
        "rate_limit": {},
        **extra,
    }


async def open_mastodon(
    make_broadcaster: MakeBroadcaster, fake: FakeMastodon, **extra: Any
) -> Broadcaster:
    b: Broadcaster = await make_broadcaster(
        {"masto": mastodon_channel(fake, **extra)}, status_page_url=STATUS_URL
    )
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
    return result, next(p for p in progress if p.channel == "masto")


async def doctor_check(b: Broadcaster) -> tuple[bool, str]:
    check = next(c for c in await b.doctor() if c.subject == "channel masto")
    return check.ok, check.detail


async def test_status_text_accents_and_emoji_are_exactly_what_mastodon_receives(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_mastodon(make_broadcaster, fake)
    result, progress = await publish_and_wait(b, opening("Les paiements échouent 💳 à Noël"))
    assert progress.counts == {DeliveryState.SENT: 1}
    (post,) = fake.posts
    assert post.text == f"Enquête en cours : Les paiements échouent 💳 à Noël. {STATUS_URL}"
    assert (post.visibility, post.language, post.in_reply_to_id) == ("public", "fr", None)
    (call,) = fake.calls_to(POST_STATUS)
    assert call.token == TOKEN
    (delivery,) = await b.deliveries(result.incident.id)
    assert call.idempotency_key == delivery.delivery_key
    assert delivery.provider_id == post.id
    assert delivery.permalink == post.url == f"{fake.url}/@status/{post.id}"


async def test_500_graphemes_with_links_as_23_pass_and_501_fail_the_check(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_mastodon(make_broadcaster, fake, visibility="unlisted")
    base = "Panne 💳 https://example.com/" + "x" * 60 + " "
    measured = (await b.preview(opening(base + "é"))).renders[0].measures[0].graphemes
    # "👩‍💻" is one grapheme of five code points; the 80-character link counts as 23.
    padding = 500 - measured
    at_limit = opening(base + "👩‍💻" * padding + "é")
    preview = await b.preview(at_limit)
    assert preview.ok and preview.renders[0].measures[0].graphemes == 500
    text = preview.renders[0].text()
    assert countable_length(text) == 500 < len(text)  # the fake counts as Mastodon does
    over = await b.preview(opening(base + "👩‍💻" * (padding + 1) + "é"))
    (failure,) = over.failures
    assert (failure.check, failure.measure, failure.limit) == ("graphemes", 501, 500)
    _, progress = await publish_and_wait(b, at_limit)
    assert progress.counts == {DeliveryState.SENT: 1}
    assert fake.posts[0].text == text and fake.posts[0].visibility == "unlisted"


async def test_followups_reply_to_the_previous_post(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_mastodon(make_broadcaster, fake)
    first, _ = await publish_and_wait(b, opening())
    for status in (IncidentStatus.IDENTIFIED, IncidentStatus.RESOLVED):
        _, progress = await publish_and_wait(b, followup(status), first.incident.id)
        assert progress.counts == {DeliveryState.SENT: 1}
    one, two, three = fake.posts
    assert one.in_reply_to_id is None
    assert two.in_reply_to_id == one.id
    assert three.in_reply_to_id == two.id  # a chain readers can follow, not a fan


async def test_429_rate_limit_reset_is_honoured(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster
) -> None:
    fake.fail(POST_STATUS, MastodonFailure(status=429, reset_in=0.4))
    b = await open_mastodon(make_broadcaster, fake)
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}
    refused, accepted = fake.calls_to(POST_STATUS)
    assert (refused.status, accepted.status) == (429, 200)
    # Not before the reset the instance announced (the backoff alone was 0.05 s).
    assert accepted.at - refused.at >= 0.4 - 0.02
    assert len(fake.posts) == 1


async def test_lost_answers_are_retried_with_the_same_idempotency_key_and_post_once(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster
) -> None:
    # Posted, then a proxy's 504; posted (the same), then the connection dropped.
    fake.fail(
        POST_STATUS,
        MastodonFailure(status=504, applied=True),
        MastodonFailure(drop=True, applied=True),
    )
    b = await open_mastodon(make_broadcaster, fake)
    result, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}
    calls = fake.calls_to(POST_STATUS)
    assert [c.status for c in calls] == [504, None, 200]
    (delivery,) = await b.deliveries(result.incident.id)
    assert {c.idempotency_key for c in calls} == {delivery.delivery_key}
    (post,) = fake.statuses
    assert delivery.provider_id == post.id and delivery.attempts == 3


async def test_5xx_is_retried(fake: FakeMastodon, make_broadcaster: MakeBroadcaster) -> None:
    fake.fail(POST_STATUS, MastodonFailure(status=500), MastodonFailure(status=503))
    b = await open_mastodon(make_broadcaster, fake)
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}
    assert [c.status for c in fake.calls_to(POST_STATUS)] == [500, 503, 200]


async def test_422_fails_only_that_delivery(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_mastodon(make_broadcaster, fake)
    first, _ = await publish_and_wait(b, opening())
    fake.fail(POST_STATUS, MastodonFailure(status=422, error="Validation failed: Text is spam"))
    second, progress = await publish_and_wait(b, opening("Autre panne"))
    assert progress.counts == {DeliveryState.FAILED: 1}
    (failed,) = await b.deliveries(second.incident.id)
    assert failed.last_error == "masto: post: HTTP 422 Validation failed: Text is spam"
    assert len(fake.calls_to(POST_STATUS)) == 2  # never retried
    _, progress = await publish_and_wait(b, followup(IncidentStatus.RESOLVED), first.incident.id)
    assert progress.counts == {DeliveryState.SENT: 1}  # the channel still works


async def test_invalid_token_stops_the_channel_and_doctor_says_why(
    fake: FakeMastodon,
    make_broadcaster: MakeBroadcaster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 and Mastodon.py included
    monkeypatch.setenv("MASTODON_TEST_TOKEN", "revoked-token-secret")
    b = await open_mastodon(make_broadcaster, fake)
    result, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.QUEUED: 1}  # kept for when it is fixed
    expected = (
        "masto: post: HTTP 401 The access token is invalid — the instance refused the access "
        "token (Preferences → Development)"
    )
    assert progress.broken == expected
    (queued,) = await b.deliveries(result.incident.id)
    assert queued.attempts == 0 and not fake.posts

    ok, detail = await doctor_check(b)
    assert not ok
    assert detail == (
        "masto: verify credentials: HTTP 401 The access token is invalid — the instance "
        f"refused the access token (Preferences → Development) (at {fake.url})"
    )
    assert "revoked-token-secret" not in detail + str(queued.last_error) + caplog.text

    monkeypatch.delenv("MASTODON_TEST_TOKEN")
    ok, detail = await doctor_check(b)
    assert (ok, detail) == (
        False,
        "masto: secret 'access_token' not found in environment variable MASTODON_TEST_TOKEN",
    )


async def test_token_without_write_scope_stops_the_channel(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MASTODON_TEST_TOKEN", READ_ONLY)
    b = await open_mastodon(make_broadcaster, fake)
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.QUEUED: 1}
    assert progress.broken == (
        "masto: post: HTTP 403 This action is outside the authorized scopes "
        "— the access token needs the write:statuses scope"
    )


async def test_doctor_passes_with_a_write_statuses_token_that_cannot_read_the_profile(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await open_mastodon(make_broadcaster, fake)
    assert await doctor_check(b) == (True, "mastodon, ok")
    monkeypatch.setenv("MASTODON_TEST_TOKEN", WRITE_ONLY)
    assert await doctor_check(b) == (True, "mastodon, ok")
    assert [c.status for c in fake.calls_to("verify_credentials")] == [200, 403]
    _, progress = await publish_and_wait(b, opening())
    assert progress.counts == {DeliveryState.SENT: 1}


async def test_edit_and_delete_a_status(
    fake: FakeMastodon, make_broadcaster: MakeBroadcaster
) -> None:
    b = await open_mastodon(make_broadcaster, fake)
    first, _ = await publish_and_wait(b, opening())
    (delivery,) = await b.deliveries(first.incident.id)
    status_id = str(delivery.provider_id)
    correction = await b.preview(opening("Tous les paiements échouent"))
    channel = b.channels["masto"]
    assert isinstance(channel, MastodonChannel)
    message = Message(
        render=correction.renders[0],
        recipient=Recipient(id=""),
        thread=None,
        incident_id=first.incident.id,
        update_id=first.update.id,
        delivery_key="edit",
    )
    try:
        receipt = await channel.edit(status_id, message)
        assert receipt.provider_id == status_id and receipt.permalink == delivery.permalink
        edited = fake.status(status_id)
        assert edited is not None and edited.edited
        assert edited.text == correction.renders[0].text()
        assert edited.history[0].startswith("Enquête en cours : Les paiements échouent")

        await channel.delete(status_id, Recipient(id=""))
        assert fake.posts == []
        with pytest.raises(PostGoneError):  # already gone: a retraction counts it done
            await channel.delete(status_id, Recipient(id=""))
        assert [c.status for c in fake.calls_to(DELETE_STATUS)] == [200, 404]
        with pytest.raises(PostGoneError, match="HTTP 404 Record not found"):
            await channel.edit(status_id, message)
        assert [c.status for c in fake.calls_to(EDIT_STATUS)] == [200, 404]
    finally:
        await channel.close()


def _api_error(cls_name: str, status: int, error: str | None) -> Exception:
    import mastodon.errors

    cls = getattr(mastodon.errors, cls_name)
    exc: Exception = cls("Mastodon API returned error", status, "Reason", error)
    return exc


@pytest.mark.parametrize(
    ("cls_name", "status", "error", "expected"),
    [
        ("MastodonUnauthorizedError", 401, "The access token is invalid", ChannelBrokenError),
        (
            "MastodonAPIError",
            403,
            "This action is outside the authorized scopes",
            ChannelBrokenError,
        ),
        ("MastodonAPIError", 403, "Your login is currently disabled", ChannelBrokenError),
        ("MastodonNotFoundError", 404, "Record not found", PostGoneError),
        ("MastodonAPIError", 422, "Validation failed: Text can't be blank", PermanentError),
        ("MastodonAPIError", 408, None, TransientError),
        ("MastodonInternalServerError", 500, None, TransientError),
        ("MastodonBadGatewayError", 502, None, TransientError),
        ("MastodonServiceUnavailableError", 503, None, TransientError),
        ("MastodonGatewayTimeoutError", 504, None, TransientError),
    ],
)
def test_mastodon_errors_are_classified_by_status(
    cls_name: str, status: int, error: str | None, expected: type[Exception]
) -> None:
    classified = classify_mastodon_error(_api_error(cls_name, status, error), "masto: post")
    assert type(classified) is expected
    assert str(classified).startswith(f"masto: post: HTTP {status} {error or 'Reason'}")


def test_rate_limit_and_network_errors_are_transient() -> None:
    import time

    from mastodon.errors import MastodonNetworkError, MastodonRatelimitError

    limited = classify_mastodon_error(
        MastodonRatelimitError("Hit rate limit."), "m", time.time() + 30
    )
    assert isinstance(limited, TransientError) and limited.retry_after is not None
    assert 29 <= limited.retry_after <= 30
    unknown = classify_mastodon_error(MastodonRatelimitError("Hit rate limit."), "m", None)
    assert isinstance(unknown, TransientError) and unknown.retry_after is None
    try:
        try:
            raise TimeoutError("read timed out")
        except TimeoutError as cause:
            raise MastodonNetworkError(f"Could not complete request: {cause}")  # noqa: B904
    except MastodonNetworkError as exc:
        network = classify_mastodon_error(exc, "m")
    assert isinstance(network, TransientError) and str(network) == "m: TimeoutError"
